"""`noise_prior="reference"` in NLIPTrainer: the pairs are scored once before the first step, the prior is the noise
probability NITC uses from step 0, and it is saved in checkpoints and restored on resume without a new pass."""

import pytest
import torch
from transformers import TrainerCallback

from nlip_testing import embed_batch, processor, single_thread, synthetic_pairs, tiny_model, training_args
from modeling_nlip import NLIPModel
from trainers.data.collator import ImageTextCollator
from trainers.evaluation.embeddings import compute_embeddings
from trainers.losses import contrastive_loss, nitc_loss, srcl_weight_pair
from trainers.noise.reference_prior import ReferencePrior
from trainers.noise.state import NoiseState
from trainers.trainer import NLIPTrainer


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _trainer(tmp_path, pairs, **overrides):
    args = training_args(tmp_path, method="nlip", noise_prior="reference", per_device_train_batch_size=8,
                         **overrides)
    return NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor(),
                       prior_model=tiny_model(seed=3))


def test_prior_is_scored_before_training_and_feeds_nitc(tmp_path):
    pairs = synthetic_pairs(16)
    trainer = _trainer(tmp_path, pairs, max_steps=1, noise_prior_weight=0.5)
    prior = trainer.score_reference_prior()
    assert prior.score.shape == (16,) and not torch.isnan(prior.score).any()
    assert trainer.noise_state.is_estimated and trainer.noise_state.num_fits == 0
    # Before any loss-based fit the prior alone is ε (the weight applies once the mixture is fit).
    torch.testing.assert_close(trainer.noise_state.noise_prob, prior.noise_prob)
    batch = ImageTextCollator(processor(), caption_choice="first")([pairs[i] for i in range(8)])
    model = trainer.model
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    expected = nitc_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp(), prior.noise_prob[batch["index"]])
    torch.testing.assert_close(trainer.compute_loss(model, batch), expected)


def test_prior_round_trips_through_a_checkpoint_and_resume_does_not_rescore(tmp_path):
    pairs = synthetic_pairs(16)
    trainer = _trainer(tmp_path / "run", pairs, num_train_epochs=2, save_strategy="epoch", noise_warmup_epochs=1)
    trainer.train()
    prior = trainer.noise_state.reference_prior
    checkpoint = tmp_path / "run" / "checkpoint-2"
    restored = NoiseState(16)
    restored.load(checkpoint)
    torch.testing.assert_close(restored.reference_prior.score, prior.score)
    assert torch.equal(restored.reference_prior.clean_prob, prior.clean_prob)
    assert trainer.training_summary().noise_settings["noise_prior"] == "reference"
    # Resuming needs no reference model: the checkpoint holds the scores.
    args = training_args(tmp_path / "run", method="nlip", noise_prior="reference", per_device_train_batch_size=8,
                         num_train_epochs=2, save_strategy="epoch", noise_warmup_epochs=1)
    resumed = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(resumed.noise_state.reference_prior.clean_prob, prior.clean_prob)


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match=r"`noise_prior` must be one of \('none', 'reference'\)"):
        training_args(tmp_path, noise_prior="oracle")
    with pytest.raises(ValueError, match="`noise_prior_model` is set but `noise_prior` is not 'reference'"):
        training_args(tmp_path, noise_prior_model="some/model")
    with pytest.raises(ValueError, match=r"`noise_prior_weight` must be in \[0, 1\]"):
        training_args(tmp_path, noise_prior="reference", noise_prior_weight=2.0)
    with pytest.raises(ValueError, match="`noise_prior_epoch` must be >= 0; got -1"):
        training_args(tmp_path, noise_prior="reference", noise_prior_epoch=-1)
    for options in ({}, {"noise_prior": "reference", "noise_prior_model": "some/model"}):
        with pytest.raises(ValueError, match="`noise_prior_epoch`=1 scores the pairs with the run's own snapshot: it "
                                             "needs noise_prior='reference' and no noise_prior_model"):
            training_args(tmp_path, noise_prior_epoch=1, **options)
    with pytest.raises(ValueError, match="`prior_model` is given but noise_prior_epoch=1"):
        _trainer(tmp_path, synthetic_pairs(16), noise_prior_epoch=1)
    with pytest.raises(ValueError, match="`noise_prior_neighbours` must be >= 0; got -2"):
        training_args(tmp_path, noise_prior="reference", noise_prior_neighbours=-2)
    with pytest.raises(ValueError, match="`noise_prior_neighbours`=5 scores the reference prior by neighbour "
                                         "agreement: it needs noise_prior='reference'"):
        training_args(tmp_path, noise_prior_neighbours=5)


def test_neighbour_prior_scores_the_reference_embeddings_by_neighbour_agreement(tmp_path):
    """`noise_prior_neighbours=3`: the prior is the reference's embeddings scored by the caption agreement of each
    pair's 3 nearest images, and the summary and model card say so."""
    pairs = synthetic_pairs(16)
    trainer = _trainer(tmp_path, pairs, max_steps=1, noise_prior_neighbours=3)
    prior = trainer.score_reference_prior()
    embeddings = compute_embeddings(tiny_model(seed=3), pairs, processor=processor(), progress=False)
    expected = ReferencePrior.from_embeddings(embeddings, 16, seed=0, neighbours=3)
    torch.testing.assert_close(prior.score, expected.score, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(prior.score, ReferencePrior.from_embeddings(embeddings, 16, seed=0).score)
    assert trainer.noise.settings()["noise_prior_score"] == "caption agreement of the 3 nearest images"


def test_snapshot_prior_is_scored_by_the_model_at_the_start_of_its_epoch(tmp_path):
    """`noise_prior_epoch=1`: no prior during epoch 0 (plain warm-up), then the run's own model as it is at the start
    of epoch 1 scores every pair, exactly as a frozen reference with those weights would; a resume from the
    checkpoint of epoch 0 scores it again at epoch 1, and the model card names the snapshot."""
    pairs = synthetic_pairs(16)
    args = training_args(tmp_path / "run", method="nlip", noise_prior="reference", noise_prior_epoch=1,
                         per_device_train_batch_size=8, num_train_epochs=2, save_strategy="epoch",
                         noise_warmup_epochs=1)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    seen = []

    class PriorAtEpochBegin(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            seen.append(trainer.noise_state.reference_prior is not None)

    trainer.add_callback(PriorAtEpochBegin())  # runs after the trainer's own schedule callback
    trainer.train()
    assert seen == [False, True]
    snapshot = NLIPModel.from_pretrained(tmp_path / "run" / "checkpoint-2")  # the weights at the start of epoch 1
    expected = ReferencePrior.from_embeddings(compute_embeddings(snapshot, pairs, processor=processor(), progress=False),
                                              16, seed=0)
    prior = trainer.noise_state.reference_prior
    torch.testing.assert_close(prior.score, expected.score, rtol=1e-4, atol=1e-5)
    assert trainer.noise.settings()["noise_prior_model"] == "the model at the start of epoch 1"
    assert trainer.noise.settings()["noise_prior_score"] == "image-text cosine"
    resumed = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(resumed.noise_state.reference_prior.score, prior.score)


def test_recommended_configuration_nlip_srcl_with_the_prior(tmp_path):
    """`nlip+srcl` with the prior (what `make demo` runs): from step 0 the loss is NITC with ε from the prior, on top
    of SRCL's negatives regulated by the reference similarity of the prior's stored embeddings (α = 1 at the start);
    the reference itself is never run during training."""
    pairs = synthetic_pairs(16)
    reference = tiny_model(seed=3)
    args = training_args(tmp_path, method="nlip+srcl", noise_prior="reference", per_device_train_batch_size=8,
                         max_steps=1)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor(),
                          prior_model=reference)
    prior = trainer.score_reference_prior()
    assert trainer.objectives["srcl"].effective_alpha(trainer.context) == 1.0
    batch = ImageTextCollator(processor(), caption_choice="first")([pairs[i] for i in range(8)])
    with torch.no_grad():
        images, texts, scale = embed_batch(trainer.model, batch)
        ref_images, ref_texts, _ = embed_batch(reference, batch)
        loss = trainer.compute_loss(trainer.model, batch)
    weights = srcl_weight_pair(images, texts, reference_image_embeds=ref_images, reference_text_embeds=ref_texts, alpha=1.0)
    expected = nitc_loss(images, texts, scale, prior.noise_prob[batch["index"]], negative_weights=weights)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # The prior's ε differs from "all clean", so NITC is not plain SRCL here: the check above can fail.
    assert float(prior.noise_prob[batch["index"]].max()) > 0.0
    plain_srcl = contrastive_loss(images, texts, scale, negative_weights=weights)
    assert not torch.allclose(loss, plain_srcl)
