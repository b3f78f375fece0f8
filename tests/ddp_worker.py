"""Data-parallel NLIPTrainer runs for `test_trainer_ddp.py`.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTPUT_DIR

runs every configuration of `CONFIGS` with the global batch split over the processes (gloo, CPU) and saves, per
process, the loss of each micro-batch, the (DDP-averaged) gradients before each optimizer step, and the final loss bank
and noise probabilities to `OUTPUT_DIR/<name>-rank<r>.pt`. `run_config` with `world_size=1` is the single-process
reference on the same global batches (sequential sampling makes them the same pairs).
"""

from __future__ import annotations

import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repository root too: its packages must win over the tests' mirror folders of the same names (tests/trainers).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nlip_testing import processor, synthetic_pairs, tiny_model, training_args  # noqa: E402
from trainers.distributed import end_process_group  # noqa: E402


NUM_PAIRS = 16
# name -> (global micro-batch, gradient accumulation steps, training arguments)
CONFIGS = {
    # Pass-mode estimation before the first step, so the noise probabilities and SRCL weights enter every step;
    # gradient accumulation: two micro-batches of 4 global pairs per update.
    "nlip+srcl": (4, 2, dict(method="nlip+srcl", noise_warmup_epochs=0, noise_estimation_mode="pass")),
    # NPC: distributed pass, memory bank, sibling step with averaged gradients, gathered memory entries.
    "npc": (8, 1, dict(method="npc", noise_warmup_epochs=0, noise_estimation_mode="pass", npc_clean_threshold=0.5)),
    # LiT: a locked vision tower served from the on-disk feature cache (a folder per process); 4 steps of 8 pairs are
    # two epochs, so the second is read from the cache.
    "nlip-locked-cached": (8, 1, dict(method="nlip", noise_warmup_epochs=0, noise_estimation_mode="pass",
                                      freeze_vision_tower=True, frozen_feature_cache="disk", max_steps=4)),
}


def run_config(name: str, output_dir: str, world_size: int) -> dict:
    """Train `name` with SGD (2 optimizer steps unless it says otherwise) and return what the test compares."""
    global_batch, accumulation, options = CONFIGS[name]
    from transformers import TrainerCallback

    from trainers.trainer import NLIPTrainer

    class Recorder(NLIPTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append(loss.detach().clone())
            return loss

    class GradientRecorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            record["gradients"].append(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            )

    record: dict = {"losses": [], "gradients": []}
    args = training_args(
        output_dir,
        per_device_train_batch_size=global_batch // world_size,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        ddp_backend="gloo" if world_size > 1 else None,
        **{"max_steps": 2, **options},
    )
    trainer = Recorder(
        model=tiny_model(), args=args, train_dataset=synthetic_pairs(NUM_PAIRS), processing_class=processor(),
        callbacks=[GradientRecorder()],
    )
    trainer.train()
    record["loss_bank"] = trainer.noise_state.loss_bank.state_dict()
    record["noise_prob"] = trainer.noise_state.noise_prob.clone()
    npc = trainer.objectives.get("npc")
    bank = None if npc is None else npc.memory_bank
    record["memory_neighbors"] = torch.stack([bank.image_neighbors, bank.text_neighbors]) if bank else torch.empty(0)
    record["weights"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    record["cache"] = {
        tower: {"cached": len(cache), "hits": cache.hits, "misses": cache.misses, "path": cache.path}
        for tower, cache in trainer.feature_caches.items()
    }
    return record


def main() -> None:
    output_dir = sys.argv[1]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    for name in CONFIGS:
        record = run_config(name, os.path.join(output_dir, f"run-{name}"), world_size)
        torch.save(record, os.path.join(output_dir, f"{name}-rank{rank}.pt"))


if __name__ == "__main__":
    main()
    end_process_group()  # as nlip_cli/train.py: no gloo threads left at interpreter exit
