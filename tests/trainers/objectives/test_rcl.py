"""`rcl`: the trainer's loss is the complementary contrastive loss."""

import torch

from nlip_testing import embed_batch, method_trainer
from trainers.losses import complementary_contrastive_loss


def test_rcl_loss_is_the_complementary_loss(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    trainer = method_trainer(tmp_path, pairs, "rcl")
    images, texts, scale = embed_batch(trainer.model, batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), complementary_contrastive_loss(images, texts, scale))
