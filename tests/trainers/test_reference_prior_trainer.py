"""`noise_prior="reference"` in NLIPTrainer: the pairs are scored once before the first step, the prior is the noise
probability NITC uses from step 0, and it is saved in checkpoints and restored on resume without a new pass."""

import pytest
import torch

from nlip_testing import processor, single_thread, synthetic_pairs, tiny_model, training_args
from trainers.data.collator import ImageTextCollator
from trainers.losses import nitc_loss
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
