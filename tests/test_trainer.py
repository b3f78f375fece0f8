"""NLIPTrainer: end-to-end runs per method on noisy Fashion-MNIST, the loss wiring, gradient accumulation, mixed
precision, pass-mode estimation, noise completion, logging and evaluation."""

import math

import pytest
import torch
from transformers import TrainerCallback

from modeling_nlip import NLIPForCaptioning, NLIPForPreTraining, NLIPModel
from tiny import tiny_decoder_config, tiny_nlip_config, tiny_text_config, tiny_tokenizer, tiny_vision_config
from trainer_testing import (
    noisy_fashion_mnist,
    processor,
    single_thread,
    synthetic_pairs,
    tiny_model,
    training_args,
)
from trainers.callbacks import epoch_index
from trainers.data.collator import ImageTextCollator
from trainers.losses import (
    complementary_contrastive_loss,
    contrastive_loss,
    nitc_loss,
    npc_confidence,
    srcl_weight_pair,
)
from trainers.evaluation.metrics import retrieval_compute_metrics
from trainers.objectives.schedule import is_due
from trainers.trainer import NLIPTrainer


# Estimated on the noisy Fashion-MNIST runs below (512 pairs, 40 % shuffled captions, fine-tuning a tiny model
# pretrained on 512 clean test pairs): ROC-AUC of the noise probabilities vs the injected mask measured 0.82-0.85 for
# every method (online estimation, 2 epochs), 0.84 for NPC (pass estimation). Chance is 0.5.
MIN_ROC_AUC = 0.75


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def fashion():
    return noisy_fashion_mnist(512, ratio=0.4)


@pytest.fixture(scope="module")
def pretrained(fashion, tmp_path_factory):
    """A tiny dual encoder pretrained (plain CLIP loss, NLIPTrainer) on the 512 clean Fashion-MNIST test pairs."""
    output_dir = tmp_path_factory.mktemp("pretrained")
    with single_thread():
        args = training_args(
            output_dir, num_train_epochs=8, learning_rate=3e-3, lr_scheduler_type="constant", max_grad_norm=0.0,
            noise_warmup_epochs=100,
        )
        trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=fashion["test"], processing_class=processor())
        trainer.train()
        trainer.save_model(str(output_dir))
    return output_dir


class LogRecorder(TrainerCallback):
    """What every `report_to` logger receives: the `logs` of each `on_log`."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


METHOD_SETTINGS = {
    "clip": {},
    "nlip": {},
    "srcl": {},
    "nlip+srcl": {},
    # NPC fine-tunes: the memory bank is built before the first step from a pass of the pretrained model.
    "npc": dict(noise_warmup_epochs=0, noise_estimation_mode="pass", num_train_epochs=1),
}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_method_end_to_end(method, fashion, pretrained, tmp_path):
    recorder = LogRecorder()
    model = NLIPModel.from_pretrained(pretrained)
    before = {name: param.clone() for name, param in model.named_parameters()}
    args = training_args(tmp_path, method=method, **{"num_train_epochs": 2, **METHOD_SETTINGS[method]}, logging_steps=8)
    trainer = NLIPTrainer(
        model=model, args=args, train_dataset=fashion["train"], processing_class=processor(), callbacks=[recorder]
    )
    trainer.train()

    assert all(not torch.equal(before[name], param) for name, param in model.named_parameters()), "a weight never moved"
    noise_logs = [logs for logs in recorder.logs if "noise/roc_auc" in logs]
    first_fit = args.noise_warmup_epochs
    assert [logs["epoch"] for logs in noise_logs] == [float(e) for e in range(first_fit, int(args.num_train_epochs))]
    final = next(logs for logs in recorder.logs if "final_noise/roc_auc" in logs)
    assert final["final_noise/roc_auc"] >= MIN_ROC_AUC, final
    for logs in noise_logs:
        assert logs["noise/roc_auc"] >= MIN_ROC_AUC, logs
        assert 0.0 < logs["noise/mean_noise_prob"] < 1.0 and logs["noise/true_noisy_fraction"] == pytest.approx(0.4, abs=0.01)
    state = trainer.noise_state
    assert state.loss_bank.seen.all() and state.num_fits == len(noise_logs) + 1
    # The noise probabilities are those of the bank's losses under the fitted mixture.
    expected = 1.0 - state.estimator.predict(state.loss_bank.losses).clean_prob
    torch.testing.assert_close(state.noise_prob, torch.from_numpy(expected))

    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert train_logs and all(math.isfinite(logs["loss"]) for logs in train_logs)
    if "srcl" in method:
        assert all(logs["srcl/alpha"] == 0.0 for logs in train_logs)
    if "nlip" in method:
        assert train_logs[0]["nlip/batch_noise_prob"] == 0.0  # warm-up: plain contrastive
        assert train_logs[-1]["nlip/batch_noise_prob"] > 0.1
    if method == "npc":
        npc = trainer.objectives["npc"]
        assert npc.memory_bank is not None and npc.memory_epoch == 0
        clean = set(npc.memory_bank.clean_indices.tolist())
        assert 0 < len(clean) < len(fashion["train"])
        assert set(npc.memory_bank.image_neighbors.tolist()) <= clean
        confidences = [logs["npc/confidence"] for logs in train_logs]
        assert all(0.0 < c < 1.0 for c in confidences), confidences  # some samples are down-weighted
        assert npc.sibling is not None


# ------------------------------------------------------------------------------------------------ loss wiring


@pytest.fixture
def tiny_batch():
    pairs = synthetic_pairs(8)
    collator = ImageTextCollator(processor(), caption_choice="first")
    return pairs, collator([pairs[i] for i in range(len(pairs))])


def _trainer(tmp_path, pairs, method, **overrides):
    args = training_args(tmp_path, method=method, per_device_train_batch_size=8, **overrides)
    return NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())


def _embeds(model, batch):
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    return out.image_embeds, out.text_embeds, model.logit_scale.exp()


def test_compute_loss_matches_the_loss_functions(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    noise = torch.linspace(0.0, 0.9, 8)

    trainer = _trainer(tmp_path, pairs, "clip")
    loss, details = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    images, texts, scale = _embeds(trainer.model, batch)
    torch.testing.assert_close(loss, contrastive_loss(images, texts, scale))
    torch.testing.assert_close(details.per_sample, contrastive_loss(images, texts, scale, reduction="none").detach())
    assert torch.equal(details.index, batch["index"])

    trainer = _trainer(tmp_path, pairs, "nlip", nitc_strength=0.3)
    trainer.noise_state.noise_prob[:] = noise
    images, texts, scale = _embeds(trainer.model, batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), nitc_loss(images, texts, scale, noise, strength=0.3))
    trainer = _trainer(tmp_path, pairs, "nlip", nitc_strength=0.3, nitc_form="paper")
    trainer.noise_state.noise_prob[:] = noise
    images, texts, scale = _embeds(trainer.model, batch)
    expected = nitc_loss(images, texts, scale, noise, strength=0.3, form="paper")
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected)
    assert not torch.allclose(expected, nitc_loss(images, texts, scale, noise, strength=0.3))

    trainer = _trainer(tmp_path, pairs, "rcl")
    images, texts, scale = _embeds(trainer.model, batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), complementary_contrastive_loss(images, texts, scale))

    trainer = _trainer(tmp_path, pairs, "srcl", srcl_weight_temperature=0.05)
    images, texts, scale = _embeds(trainer.model, batch)
    expected = contrastive_loss(images, texts, scale, negative_weights=srcl_weight_pair(images, texts, temperature=0.05))
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected)


def test_compute_loss_with_reference_model(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    reference = tiny_model(seed=1)
    args = training_args(tmp_path, method="srcl", srcl_reference_model="unused-path", per_device_train_batch_size=8,
                         max_steps=4)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor(),
                          reference_model=reference)
    srcl = trainer.objectives["srcl"]
    srcl.alpha = 0.7
    images, texts, scale = _embeds(trainer.model, batch)
    ref_images, ref_texts, _ = _embeds(reference, batch)
    weights = srcl_weight_pair(images, texts, reference_image_embeds=ref_images, reference_text_embeds=ref_texts, alpha=0.7)
    expected = contrastive_loss(images, texts, scale, negative_weights=weights)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected)
    # The schedule: α goes linearly from 1 to 0 over the 4 steps.
    alphas = []

    class Alpha(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            alphas.append(None)

        def on_step_end(self, args, state, control, **kwargs):
            alphas[-1] = srcl.alpha

    trainer.add_callback(Alpha())
    trainer.train()
    assert alphas == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])


def test_npc_step_matches_the_paper_equations(tmp_path, tiny_batch):
    """The trainer's NPC loss is the confidence-weighted InfoNCE plus the memory entries' InfoNCE, with confidences
    from a sibling that took one optimizer step."""
    pairs, batch = tiny_batch
    trainer = _trainer(tmp_path, pairs, "npc", optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    trainer.create_optimizer()
    trainer.noise_state.noise_prob[:] = torch.tensor([0.9, 0, 0, 0, 0.9, 0, 0, 0])  # pairs 0 and 4 are noisy
    from trainers.noise.memory_bank import build_memory_bank

    with torch.no_grad():
        images, texts, _ = _embeds(trainer.model, batch)
    npc = trainer.objectives["npc"]
    npc.memory_bank = build_memory_bank(images, texts, 1 - trainer.noise_state.noise_prob, progress_bar=False)
    bank = npc.memory_bank
    loss, details = trainer.compute_loss(trainer.model, batch, return_outputs=True)

    # Reference: memory entries deduplicated by index, the sibling = the model after one SGD step on the batch.
    memory = torch.cat([bank.image_neighbors, bank.text_neighbors]).unique()
    images, texts, scale = _embeds(trainer.model, batch)
    memory_images, memory_texts = images[memory], texts[memory]  # memory entries are pairs of this same batch
    before = contrastive_loss(memory_images, memory_texts, scale, reduction="none").detach()
    sibling = tiny_model()
    sibling.load_state_dict(trainer.model.state_dict())
    contrastive_loss(*_embeds(sibling, batch)).backward()
    with torch.no_grad():
        for param in sibling.parameters():
            param -= 0.5 * param.grad
        sib_images, sib_texts, sib_scale = _embeds(sibling, batch)
        after = contrastive_loss(sib_images[memory], sib_texts[memory], sib_scale, reduction="none")
    position = {int(m): k for k, m in enumerate(memory)}
    image_side = torch.tensor([position[int(i)] for i in bank.image_neighbors])
    text_side = torch.tensor([position[int(i)] for i in bank.text_neighbors])
    confidence = npc_confidence(before[image_side], after[image_side], before[text_side], after[text_side])
    contribution = details.contributions["npc"]
    torch.testing.assert_close(contribution.sample_weights, confidence)
    assert (confidence < 1).any()
    memory_loss = contrastive_loss(memory_images, memory_texts, scale)
    torch.testing.assert_close(contribution.losses["npc/memory_loss"], memory_loss)
    torch.testing.assert_close(loss, contrastive_loss(images, texts, scale, sample_weights=confidence) + memory_loss)


# -------------------------------------------------------------------------------- gradient accumulation, bf16


class RecordBatches(NLIPTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.seen_batches.append({key: inputs[key].clone() for key in ("input_ids", "attention_mask", "pixel_values")})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_gradient_accumulation_averages_micro_batch_losses(tmp_path):
    """GA=2 over micro-batches of 4 = one SGD step on the mean of the two micro-batch losses (each with its own 4-pair
    negatives), which is not the loss of one 8-pair batch."""
    pairs = synthetic_pairs(8)
    args = training_args(tmp_path, method="clip", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant",
                         train_sampling_strategy="sequential")
    trainer = RecordBatches(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    trainer.seen_batches = []
    trainer.train()
    assert len(trainer.seen_batches) == 2

    def sgd_step(loss_fn):
        model = tiny_model()
        loss_fn(model).backward()
        with torch.no_grad():
            return {name: param - 0.5 * param.grad for name, param in model.named_parameters()}

    micro = sgd_step(lambda m: sum(contrastive_loss(*_embeds(m, batch)) for batch in trainer.seen_batches) / 2)
    big_batch = ImageTextCollator(processor())([pairs[i] for i in range(8)])  # sequential: the same 8 pairs
    big = sgd_step(lambda m: contrastive_loss(*_embeds(m, big_batch)))
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, micro[name], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(trainer.model.text_projection.weight, big["text_projection.weight"], atol=1e-6)


def test_bf16_mixed_precision_runs(tmp_path):
    pairs = synthetic_pairs(16)
    args = training_args(tmp_path, method="nlip+srcl", per_device_train_batch_size=8, max_steps=2, bf16=True,
                         noise_warmup_epochs=0, logging_steps=1)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    trainer.train()
    losses = [logs["loss"] for logs in trainer.state.log_history if "loss" in logs]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert trainer.noise_state.loss_bank.seen.all()
    assert trainer.noise_state.loss_bank.losses.dtype == torch.float32


# -------------------------------------------------------------------------------------- estimation schedule


def test_pass_mode_records_a_full_pass_at_epoch_start(tmp_path):
    pairs = synthetic_pairs(16)
    args = training_args(tmp_path, method="nlip", per_device_train_batch_size=8, num_train_epochs=2,
                         noise_warmup_epochs=1, noise_estimation_mode="pass")
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    trainer.train()
    bank = trainer.noise_state.loss_bank
    # Pass at the start of epoch 1 (step 2) and at the end of training (step 4); no online recording in between.
    assert bank.seen.all() and set(bank.steps.tolist()) == {4}
    assert trainer.noise_state.num_fits == 2 and trainer.noise_state.last_fit_epoch == 2
    result = trainer.train_set_pass(2, features=True)
    assert torch.equal(result.index.sort().values, torch.arange(16))
    assert result.image_features.shape == (16, 16)
    torch.testing.assert_close(bank.losses[result.index], result.losses)


def test_epoch_schedule_helpers():
    from transformers import TrainerState

    assert epoch_index(TrainerState(epoch=0.0)) == 0 and epoch_index(TrainerState(epoch=2.0)) == 2
    assert epoch_index(TrainerState(epoch=1.9999)) == 1
    assert [is_due(e, None, 1, 2) for e in range(3)] == [False, True, True]
    assert [is_due(e, 1, 1, 2) for e in range(1, 5)] == [False, False, True, True]


def test_dataset_without_index_is_rejected(tmp_path):
    pairs = synthetic_pairs(4).remove_columns("index")
    with pytest.raises(ValueError, match="train_dataset must be a datasets.Dataset with an integer 'index' column"):
        NLIPTrainer(model=tiny_model(), args=training_args(tmp_path), train_dataset=pairs, processing_class=processor())
    duplicated = synthetic_pairs(4).map(lambda example: {"index": 0})
    with pytest.raises(ValueError, match="'index' column must hold unique non-negative integers"):
        NLIPTrainer(model=tiny_model(), args=training_args(tmp_path), train_dataset=duplicated, processing_class=processor())


def test_trainer_requires_nlip_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="`args` must be NLIPTrainingArguments"):
        NLIPTrainer(model=tiny_model(), args=TrainingArguments(str(tmp_path), use_cpu=True), processing_class=processor())
    with pytest.raises(ValueError, match="needs a `data_collator` or a `processing_class`"):
        NLIPTrainer(model=tiny_model(), args=training_args(tmp_path))


# ----------------------------------------------------------------------------------------- noise completion


def _pretraining_model():
    tokenizer = tiny_tokenizer()
    config = tiny_nlip_config(
        tokenizer,
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(tokenizer),
        decoder_config=tiny_decoder_config(tokenizer),
    )
    torch.manual_seed(0)
    return NLIPForPreTraining(config)


def test_noise_completion_with_pretraining_model(tmp_path):
    pairs = synthetic_pairs(16)
    args = training_args(tmp_path, method="nlip", noise_completion=True, completion_max_new_tokens=4,
                         per_device_train_batch_size=8, num_train_epochs=2, noise_warmup_epochs=1, logging_steps=1)
    trainer = NLIPTrainer(model=_pretraining_model(), args=args, train_dataset=pairs, processing_class=processor())
    seen_synthetic = []
    nlip = trainer.objectives["nlip"]
    original = nlip.extra_inputs

    def spy(inputs, context):
        result = original(inputs, context)
        seen_synthetic.append(bool(result))
        return result

    nlip.extra_inputs = spy
    trainer.train()
    captions = nlip.synthetic_captions
    assert nlip.completion_epoch == 1
    assert len(captions) == 16 and all(isinstance(c, str) for c in captions)
    assert seen_synthetic == [False, False, True, True]  # epoch 0: warm-up, no captions yet
    logs = [entry for entry in trainer.state.log_history if "pretraining/lm_loss" in entry]
    assert logs and all(math.isfinite(entry["pretraining/lm_loss"]) for entry in logs)


def test_noise_completion_with_captioning_checkpoint(tmp_path):
    tokenizer = tiny_tokenizer()
    config = tiny_nlip_config(tokenizer, decoder_config=tiny_decoder_config(tokenizer))
    torch.manual_seed(0)
    captioner_dir = tmp_path / "captioner"
    NLIPForCaptioning(config).save_pretrained(captioner_dir)
    processor().save_pretrained(captioner_dir)
    pairs = synthetic_pairs(8)
    args = training_args(tmp_path / "run", method="nlip", noise_completion=True, completion_model=str(captioner_dir),
                         completion_max_new_tokens=3, per_device_train_batch_size=8, num_train_epochs=1,
                         noise_warmup_epochs=0)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    captioner = trainer.objectives["nlip"].captioner
    assert isinstance(captioner, NLIPForCaptioning)
    trainer.train()
    captions = trainer.objectives["nlip"].synthetic_captions
    expected = captioner.caption([pairs[i]["image"] for i in range(8)], processor(), max_new_tokens=3)
    assert captions == expected


def test_noise_completion_needs_a_captioner(tmp_path):
    args = training_args(tmp_path, method="nlip", noise_completion=True)
    with pytest.raises(ValueError, match="noise_completion needs a captioner"):
        NLIPTrainer(model=tiny_model(), args=args, train_dataset=synthetic_pairs(4), processing_class=processor())


# ----------------------------------------------------------------------------------------------- evaluation


def test_evaluate_with_retrieval_metrics(tmp_path):
    pairs = synthetic_pairs(12)
    args = training_args(tmp_path, method="clip", per_device_eval_batch_size=5)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, eval_dataset=pairs,
                          processing_class=processor(), compute_metrics=retrieval_compute_metrics)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_rsum"] <= 600
    assert {"eval_i2t_R@1", "eval_t2i_R@10"} <= set(metrics)


def test_streaming_dataset_grows_the_loss_bank(tmp_path):
    pairs = synthetic_pairs(16).to_iterable_dataset()
    args = training_args(tmp_path, method="nlip", per_device_train_batch_size=8, max_steps=2, noise_warmup_epochs=0)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    assert trainer.noise_state.num_samples == 0 and trainer.noise_state.loss_bank.growable
    trainer.train()
    assert trainer.noise_state.num_samples == 16 and trainer.noise_state.loss_bank.seen.all()
    assert trainer.noise_state.noise_prob.shape == (16,)
    with pytest.raises(ValueError, match="needs a map-style train_dataset"):
        NLIPTrainer(model=tiny_model(), args=training_args(tmp_path, method="npc", max_steps=2), train_dataset=pairs,
                    processing_class=processor())


def test_model_card_and_training_summary(tmp_path):
    from trainers.model_card import TrainingSummary

    pairs = synthetic_pairs(32)
    args = training_args(tmp_path / "tiny-run", method="nlip+srcl", per_device_train_batch_size=8, num_train_epochs=2,
                         eval_strategy="epoch")
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, eval_dataset=pairs.select(range(8)),
                          processing_class=processor())
    trainer.train()
    trainer.create_model_card(dataset=["synthetic-pairs"], finetuned_from="nlip-tester/base")
    summary = TrainingSummary.load(tmp_path / "tiny-run")
    assert summary.model_name == "tiny-run" and summary.method == "nlip+srcl" and summary.base_model == "nlip-tester/base"
    assert summary.noise_settings["srcl_weight_temperature"] == 0.1 and summary.noise_settings["noise_warmup_epochs"] == 1
    assert summary.noise_statistics["roc_auc"] == pytest.approx(trainer.noise_state.statistics["noise/roc_auc"])
    assert summary.noise_statistics["num_pairs"] == 32 and summary.noise_statistics["epoch"] == 2
    assert summary.training_hyperparameters["optimizer"] == "adamw_torch"
    assert set(summary.evaluation_results["evaluation"]) >= {"loss"}
    readme = (tmp_path / "tiny-run" / "README.md").read_text()
    assert "Method: `nlip+srcl`." in readme and "| Noise-detection ROC-AUC vs. ground truth |" in readme
    assert {"modeling_nlip.py", "configuration_nlip.py"} <= {p.name for p in (tmp_path / "tiny-run").iterdir()}


def test_evaluation_scores_the_first_of_several_captions(tmp_path):
    """Training batches pick a random caption of a multi-caption example; evaluation batches always take the first,
    so eval metrics do not change from one evaluation to the next."""
    pairs = synthetic_pairs(8)
    multi = pairs.map(lambda row: {"text": [row["text"], "a different caption"]})
    trainer = _trainer(tmp_path, multi, "clip", per_device_eval_batch_size=8, seed=3)
    tokenizer = trainer.processing_class.tokenizer
    first = tokenizer(list(pairs["text"]), padding=True, return_tensors="pt")["input_ids"]
    for _ in range(2):
        batch = next(iter(trainer.get_eval_dataloader(multi)))
        assert torch.equal(batch["input_ids"], first)
    pad = tokenizer.pad_token_id
    training_rows = {tuple(t for t in row if t != pad) for _ in range(3)
                     for row in next(iter(trainer.get_train_dataloader()))["input_ids"].tolist()}
    first_rows = {tuple(t for t in row if t != pad) for row in first.tolist()}
    assert training_rows - first_rows  # the training collator still draws the second captions too
    assert trainer.data_collator.caption_choice == "random"


def test_pretraining_trains_the_captioner_on_retrieved_concepts(tmp_path):
    """With a concept bank, every training step prefixes the captions with retrieved concepts, and the bank is
    re-embedded with the current text tower at each epoch start and at the end (so it matches the saved weights)."""
    model = _pretraining_model()
    model.build_concept_bank(["photo", "red", "blue", "car"], processor(), show_progress=False)
    args = training_args(tmp_path, method="clip", per_device_train_batch_size=8, num_train_epochs=2, learning_rate=1e-2)
    trainer = NLIPTrainer(model=model, args=args, train_dataset=synthetic_pairs(16), processing_class=processor())
    prefix_lengths, banks = [], []
    forward = model.forward

    def spy(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        prefix_lengths.append(outputs.lm_logits.shape[1] - kwargs["input_ids"].shape[1])
        return outputs

    model.forward = spy
    refresh = trainer.refresh_concept_bank

    def record():
        refresh()
        banks.append(model.concept_embeds.clone())

    trainer.refresh_concept_bank = record
    trainer.train()
    assert len(prefix_lengths) == 4 and all(length > 0 for length in prefix_lengths)
    assert len(banks) == 3  # epochs 0 and 1, and the end of training
    assert not torch.allclose(banks[0], banks[-1])  # the text tower moved
    model.forward = forward
    with torch.no_grad():
        prompts = processor().tokenizer([f"a photo of a {c}" for c in model.concept_vocabulary], padding=True, return_tensors="pt")
        expected = torch.nn.functional.normalize(model.eval().get_text_features(**prompts).pooler_output, dim=-1)
    torch.testing.assert_close(model.concept_embeds, expected, atol=1e-5, rtol=1e-4)
