"""`rcl`: the trainer's loss is the complementary contrastive loss."""

import pytest
import torch

from nlip_testing import embed_batch, method_trainer, single_thread, tiny_pair_batch
from trainers.losses import complementary_contrastive_loss


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def tiny_batch():
    return tiny_pair_batch()


def test_rcl_loss_is_the_complementary_loss(tmp_path, tiny_batch):
    pairs, batch = tiny_batch
    trainer = method_trainer(tmp_path, pairs, "rcl")
    images, texts, scale = embed_batch(trainer.model, batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), complementary_contrastive_loss(images, texts, scale))
