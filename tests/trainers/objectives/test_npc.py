"""`npc`: the trainer's NPC step follows the paper's equations (sibling look-ahead, confidences, memory loss)."""

import numpy as np
import torch
from transformers import TrainerCallback

from nlip_testing import embed_batch, method_trainer, synthetic_pairs, tiny_model
from trainers.losses import contrastive_loss, npc_confidence


def test_npc_step_matches_the_paper_equations(tmp_path, tiny_batch):
    """The trainer's NPC loss is the confidence-weighted InfoNCE plus the memory entries' InfoNCE, with confidences
    from a sibling that took one optimizer step."""
    pairs, batch = tiny_batch
    trainer = method_trainer(tmp_path, pairs, "npc", optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    trainer.create_optimizer()
    trainer.noise_state.noise_prob[:] = torch.tensor([0.9, 0, 0, 0, 0.9, 0, 0, 0])  # pairs 0 and 4 are noisy
    from trainers.noise.memory_bank import build_memory_bank

    with torch.no_grad():
        images, texts, _ = embed_batch(trainer.model, batch)
    npc = trainer.objectives["npc"]
    npc.memory_bank = build_memory_bank(images, texts, 1 - trainer.noise_state.noise_prob, progress_bar=False)
    bank = npc.memory_bank
    loss, details = trainer.compute_loss(trainer.model, batch, return_outputs=True)

    # Reference: memory entries deduplicated by index, the sibling = the model after one SGD step on the batch.
    memory = torch.cat([bank.image_neighbors, bank.text_neighbors]).unique()
    images, texts, scale = embed_batch(trainer.model, batch)
    memory_images, memory_texts = images[memory], texts[memory]  # memory entries are pairs of this same batch
    before = contrastive_loss(memory_images, memory_texts, scale, reduction="none").detach()
    sibling = tiny_model()
    sibling.load_state_dict(trainer.model.state_dict())
    contrastive_loss(*embed_batch(sibling, batch)).backward()
    with torch.no_grad():
        for param in sibling.parameters():
            param -= 0.5 * param.grad
        sib_images, sib_texts, sib_scale = embed_batch(sibling, batch)
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


def test_npc_reads_locked_towers_from_the_feature_cache(tmp_path, monkeypatch):
    """With both towers locked LiT-style, the image tower runs once per training image (first epoch) and each image is
    decoded once; afterwards the batch, NPC's sibling step, its memory entries and the memory-bank pass all read the
    cache. The sibling shares the locked towers' parameters and copies the trainable ones."""
    import trainers.data.collator as collator_module

    decoded = []
    real_decode = collator_module.decode_image
    monkeypatch.setattr(collator_module, "decode_image", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    pairs = synthetic_pairs(32)
    trainer = method_trainer(tmp_path, pairs, "npc", num_train_epochs=3, noise_warmup_epochs=1, npc_clean_threshold=0.5,
                             freeze_vision_tower=True, freeze_text_tower=True, learning_rate=3e-3)
    calls = []
    epochs = []

    class EpochOf(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            epochs.append(int(state.epoch or 0))

    trainer.add_callback(EpochOf())
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.vision_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((epochs[-1], kwargs["pixel_values"].shape[0])), with_kwargs=True
    )
    trainer.train()
    npc = trainer.objectives["npc"]
    assert npc.memory_bank is not None and npc.sibling is not None
    assert sum(count for epoch, count in calls if epoch == 0) == 32  # every image once, during the first epoch
    assert [call for call in calls if call[0] > 0] == []  # never again: cached for the sibling, memory and the pass
    assert len(decoded) == 32  # the memory entries and the memory-bank passes decode no cached image either
    sibling = dict(npc.sibling.model.named_parameters())
    for name, param in model.named_parameters():
        assert (sibling[name] is param) == (not param.requires_grad), name
    assert {name for name, param in model.named_parameters() if param.requires_grad} >= {"logit_scale"}
    assert len(npc.sibling._pairs) == sum(param.requires_grad for param in model.parameters())


def test_memory_bank_clean_set_on_evidence_or_posterior(tmp_path):
    """A mixture that calls most pairs clean (clean weight 0.7, overlapping components) gives `p > 0.9` to pairs whose
    loss is no evidence of it: the default `npc_clean_set="evidence"` takes the posterior with the clean weight
    capped; NPC's rule (`"posterior"`) takes the posterior itself. The default floor (`npc_min_clean_fraction`, 10 %:
    6 pairs) does not bind here; a floor of 30 % grows the evidence set to 18 of the 60 pairs, the most probably clean
    ones."""
    from trainers.noise.estimation import evidence_clean_prob

    pairs = synthetic_pairs(60)
    rng = np.random.default_rng(0)
    losses = torch.tensor(np.concatenate([rng.normal(1.0, 0.4, 54), rng.normal(1.8, 0.5, 6)]), dtype=torch.float32)
    clean_sets = {}
    for name, overrides in (("evidence", {}), ("posterior", {"npc_clean_set": "posterior"}),
                            ("floored", {"npc_min_clean_fraction": 0.3})):
        trainer = method_trainer(tmp_path / name, pairs, "npc", **overrides)
        state = trainer.noise_state
        state.record(torch.arange(60), losses, step=0)
        state.fit(epoch=1)
        npc = trainer.objectives["npc"]
        npc.rebuild_memory_bank(1, trainer.context)
        clean_sets[name] = set(npc.memory_bank.clean_indices.tolist())
        assert npc.settings()["npc_clean_set"] == overrides.get("npc_clean_set", "evidence")
        assert npc.settings()["npc_min_clean_fraction"] == overrides.get("npc_min_clean_fraction", 0.1)
    clean_prob = 1 - state.noise_prob
    weights = tuple(state.estimate_summary["weights"])
    assert weights[0] > 0.65
    assert clean_sets["posterior"] == set(torch.nonzero(clean_prob > 0.9).flatten().tolist())
    assert clean_sets["evidence"] == set(torch.nonzero(evidence_clean_prob(clean_prob, weights) > 0.9).flatten().tolist())
    assert 6 <= len(clean_sets["evidence"]) < 18 and clean_sets["evidence"] < clean_sets["posterior"]
    capped = evidence_clean_prob(clean_prob, weights)
    assert clean_sets["floored"] == set(capped.topk(18).indices.tolist()) > clean_sets["evidence"]
