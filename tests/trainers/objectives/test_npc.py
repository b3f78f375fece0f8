"""`npc`: the trainer's NPC step follows the paper's equations (sibling look-ahead, confidences, memory loss)."""

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


def test_npc_reads_locked_towers_from_the_feature_cache(tmp_path):
    """With both towers locked LiT-style, the image tower runs once per training image (first epoch); afterwards the
    batch, NPC's sibling step, its memory entries and the memory-bank pass all read the cache."""
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
