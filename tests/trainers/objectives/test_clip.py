"""`clip`: the trainer's loss is plain InfoNCE over the batch, and its details are the batch's."""

import torch

from nlip_testing import embed_batch, method_trainer
from trainers.losses import contrastive_loss


def test_clip_loss_is_infonce(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    trainer = method_trainer(tmp_path, pairs, "clip")
    loss, details = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    images, texts, scale = embed_batch(trainer.model, batch)
    torch.testing.assert_close(loss, contrastive_loss(images, texts, scale))
    torch.testing.assert_close(details.per_sample, contrastive_loss(images, texts, scale, reduction="none").detach())
    assert torch.equal(details.index, batch["index"])
