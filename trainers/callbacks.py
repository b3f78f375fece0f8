"""`NLIPTrainer`'s epoch- and step-level schedule, as `TrainerCallback`s holding a reference to the trainer.

At the start of each epoch, in this order: the collators learn the epoch (`CaptionEpochCallback`); the concept bank
is re-embedded (`ConceptBankCallback`, pre-training with a concept bank); the noise GMM is (re)fit
(`NoiseEstimationCallback`, after `noise_warmup_epochs`, every `gmm_refit_epochs`; in `pass` mode after an extra
no-grad pass) and the noise statistics are logged; NPC's memory bank is rebuilt (`MemoryBankCallback`); the synthetic
captions are regenerated (`CompletionCallback`). Each action records the epoch it ran for in the noise state, so a run
resumed in the middle of an epoch does not repeat it, and a run resumed at an epoch boundary does it.
`SRCLScheduleCallback` sets SRCL's α from the global step before every optimizer step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


if TYPE_CHECKING:
    from .trainer import NLIPTrainer


def epoch_index(state: TrainerState) -> int:
    """The 0-based epoch the training loop is in (`state.epoch` is fractional within an epoch, and restored on resume)."""
    return int(math.floor((state.epoch or 0.0) + 1e-6))


def is_due(epoch: int, last: int | None, start: int, every: int) -> bool:
    """Whether an action run every `every` epochs from epoch `start`, last run at epoch `last`, is due at `epoch`."""
    if epoch < start or last == epoch:
        return False
    return last is None or epoch - last >= every


class _TrainerCallback(TrainerCallback):
    def __init__(self, trainer: NLIPTrainer):
        self.trainer = trainer


class NoiseEstimationCallback(_TrainerCallback):
    """Fits the noise GMM after warm-up and every `gmm_refit_epochs`; logs noise statistics every epoch once a fit
    exists, and once more at the end of training (a final fit on the last epoch's losses, for the report)."""

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        trainer, noise_state = self.trainer, self.trainer.noise_state
        epoch = epoch_index(state)
        first_fit = args.noise_warmup_epochs
        if epoch >= first_fit and (epoch - first_fit) % args.gmm_refit_epochs == 0 and noise_state.last_fit_epoch != epoch:
            trainer.fit_noise_model(epoch)
        if noise_state.num_fits and noise_state.prepared_epoch < epoch:
            trainer.log_noise_statistics()
        noise_state.prepared_epoch = max(noise_state.prepared_epoch, epoch)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if (state.epoch or 0.0) + 1e-6 < args.noise_warmup_epochs:
            return
        self.trainer.fit_noise_model(epoch_index(state))
        self.trainer.log_noise_statistics(prefix="final_")


class MemoryBankCallback(_TrainerCallback):
    """Rebuilds NPC's clean memory bank every `npc_memory_refresh_epochs` once the noise GMM has been fit."""

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        noise_state = self.trainer.noise_state
        epoch = epoch_index(state)
        if not noise_state.is_estimated:
            return
        if is_due(epoch, noise_state.memory_epoch, args.noise_warmup_epochs, args.npc_memory_refresh_epochs):
            self.trainer.rebuild_memory_bank(epoch)


class CompletionCallback(_TrainerCallback):
    """Regenerates the synthetic captions every `completion_refresh_epochs` from the end of warm-up (they only enter
    the loss weighted by the noise probabilities, which are 0 before the first fit)."""

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        epoch = epoch_index(state)
        last = self.trainer.noise_state.completion_epoch
        if is_due(epoch, last, args.noise_warmup_epochs, args.completion_refresh_epochs):
            self.trainer.refresh_synthetic_captions(epoch)


class CaptionEpochCallback(_TrainerCallback):
    """Tells the collators the epoch before its dataloader iterator starts: a multi-caption example's random caption
    depends on `(seed, epoch, index)`, so a resumed run draws the captions the uninterrupted run drew."""

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.trainer.set_caption_epoch(epoch_index(state))


class ConceptBankCallback(_TrainerCallback):
    """Re-embeds the concept bank with the current text tower at the start of every epoch and at the end of training,
    so the concepts the captioner is trained and saved with are retrieved in the model's current embedding space. It
    runs before `NoiseEstimationCallback` marks the epoch prepared: a run resumed mid-epoch keeps the checkpoint's
    bank (part of its weights)."""

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.trainer.noise_state.prepared_epoch < epoch_index(state):
            self.trainer.refresh_concept_bank()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.trainer.refresh_concept_bank()


class SRCLScheduleCallback(_TrainerCallback):
    """Sets SRCL's α (the reference similarity's mixing weight) linearly in the global step before each optimizer
    step; a function of the step, so a resumed run continues the schedule exactly."""

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.trainer.srcl_alpha = args.srcl_alpha(state.global_step, state.max_steps)
