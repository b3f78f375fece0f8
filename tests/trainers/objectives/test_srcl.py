"""`srcl`: the trainer's loss is InfoNCE with SRCL's negative weights, from the online similarity alone or mixed with
a reference model's by the α schedule."""

import pytest
import torch
from transformers import TrainerCallback

from nlip_testing import embed_batch, method_trainer, processor, tiny_model, training_args
from trainers.losses import contrastive_loss, srcl_weight_pair
from trainers.trainer import NLIPTrainer


def test_srcl_loss_uses_both_directions_weights(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    trainer = method_trainer(tmp_path, pairs, "srcl", srcl_weight_temperature=0.05)
    images, texts, scale = embed_batch(trainer.model, batch)
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
    images, texts, scale = embed_batch(trainer.model, batch)
    ref_images, ref_texts, _ = embed_batch(reference, batch)
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


def test_srcl_takes_its_reference_similarity_from_the_reference_prior(tmp_path, tiny_batch):
    """With `noise_prior="reference"` and no reference model, SRCL mixes in the reference similarity of the prior's
    stored embeddings (no reference forward per step); they round-trip through the noise state."""
    pairs, batch = tiny_batch
    reference = tiny_model(seed=3)
    args = training_args(tmp_path, method="srcl", noise_prior="reference", per_device_train_batch_size=8,
                         srcl_alpha_start=1.0, srcl_alpha_end=1.0, max_steps=1)
    trainer = NLIPTrainer(model=tiny_model(), args=args, train_dataset=pairs, processing_class=processor(),
                          prior_model=reference)
    trainer.score_reference_prior()
    srcl = trainer.objectives["srcl"]
    srcl.alpha = 0.6
    with torch.no_grad():
        images, texts, scale = embed_batch(trainer.model, batch)
        ref_images, ref_texts, _ = embed_batch(reference, batch)
        loss = trainer.compute_loss(trainer.model, batch)
    weights = srcl_weight_pair(images, texts, reference_image_embeds=ref_images, reference_text_embeds=ref_texts, alpha=0.6)
    torch.testing.assert_close(loss, contrastive_loss(images, texts, scale, negative_weights=weights), rtol=1e-5, atol=1e-6)
    # Without the stored embeddings (a prior saved before they were kept) SRCL has no reference: α counts as 0.
    prior = trainer.noise_state.reference_prior
    prior.image_embeds = prior.text_embeds = None
    with torch.no_grad():
        plain = contrastive_loss(images, texts, scale, negative_weights=srcl_weight_pair(images, texts))
        torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), plain)
