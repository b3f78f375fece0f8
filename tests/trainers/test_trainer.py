"""NLIPTrainer: end-to-end runs per method on noisy Fashion-MNIST, gradient accumulation, mixed precision, pass-mode
estimation, logging and evaluation (each method's own loss wiring: `tests/trainers/objectives/`)."""

import math

import pytest
import torch
from transformers import TrainerCallback

from modeling_nlip import NLIPModel
from nlip_testing import (
    embed_batch,
    method_trainer,
    noisy_fashion_mnist,
    processor,
    single_thread,
    synthetic_pairs,
    tiny_model,
    tiny_pretraining_model,
    training_args,
)
from trainers.callbacks import epoch_index
from trainers.data.collator import ImageTextCollator
from trainers.losses import contrastive_loss
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

    micro = sgd_step(lambda m: sum(contrastive_loss(*embed_batch(m, batch)) for batch in trainer.seen_batches) / 2)
    big_batch = ImageTextCollator(processor())([pairs[i] for i in range(8)])  # sequential: the same 8 pairs
    big = sgd_step(lambda m: contrastive_loss(*embed_batch(m, big_batch)))
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
                         eval_strategy="epoch", noise_min_separation=0.5)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, eval_dataset=pairs.select(range(8)),
                          processing_class=processor())
    trainer.train()
    trainer.create_model_card(dataset=["synthetic-pairs"], finetuned_from="nlip-tester/base")
    summary = TrainingSummary.load(tmp_path / "tiny-run")
    assert summary.model_name == "tiny-run" and summary.method == "nlip+srcl" and summary.base_model == "nlip-tester/base"
    assert summary.noise_settings["srcl_weight_temperature"] == 0.1 and summary.noise_settings["noise_warmup_epochs"] == 1
    assert summary.noise_settings["noise_min_separation"] == 0.5 and trainer.noise_state.estimator.min_separation == 0.5
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
    trainer = method_trainer(tmp_path, multi, "clip", per_device_eval_batch_size=8, seed=3)
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
    model = tiny_pretraining_model()
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
