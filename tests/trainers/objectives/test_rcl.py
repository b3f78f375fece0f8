"""`rcl`: the trainer's loss is the complementary contrastive loss with `rcl_infonce_weight`'s InfoNCE term."""

import pytest
import torch

from nlip_testing import embed_batch, method_trainer
from trainers.losses import complementary_contrastive_loss


@pytest.mark.parametrize("overrides", [{}, {"rcl_infonce_weight": 0.0}, {"rcl_infonce_weight": 2.0}])
def test_rcl_loss_is_the_complementary_loss(tmp_path, tiny_batch, overrides):
    pairs, batch = tiny_batch
    trainer = method_trainer(tmp_path, pairs, "rcl", **overrides)
    beta = overrides.get("rcl_infonce_weight", 0.5)
    assert trainer.objectives["rcl"].settings() == {"rcl_infonce_weight": beta}
    images, texts, scale = embed_batch(trainer.model, batch)
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch),
                               complementary_contrastive_loss(images, texts, scale, infonce_weight=beta))
