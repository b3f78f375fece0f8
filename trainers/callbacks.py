"""`TrainingScheduleCallback`: the one callback that drives a run's epoch- and step-level work, in a fixed order.

At the start of each epoch, in the order given (the trainer's: the collators learn the epoch and the concept bank is
re-embedded; the noise tracker fits the mixture and logs the statistics; then each objective in registration order:
NLIP's synthetic captions, NPC's memory bank), before each optimizer step every objective's `on_step_begin` (SRCL's α),
and at the end of training the trainer's and the tracker's `on_train_end`. The callback holds the participants and a
`TrainingContext`, never the trainer; each participant records the epoch its work ran for, so a run resumed in the
middle of an epoch does not repeat it and a run resumed at an epoch boundary does it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .context import TrainingContext


def epoch_index(state: TrainerState) -> int:
    """The 0-based epoch the training loop is in (`state.epoch` is fractional within an epoch, and restored on resume)."""
    return int(math.floor((state.epoch or 0.0) + 1e-6))


class TrainingScheduleCallback(TrainerCallback):
    """Calls the run's participants in order.

    Args:
        data_hooks: the data-level work (`on_epoch_begin(epoch, prepared)`, `on_train_end()`): collator epochs, the
            concept bank. `prepared` says whether the epoch's work already ran (a mid-epoch resume).
        noise: the `NoiseTracker` (None without one).
        objectives: the run's objectives, in order.
        context: what they are called with.
    """

    def __init__(self, data_hooks: Any, noise: Any, objectives: Sequence[Any], context: TrainingContext):
        self.data_hooks, self.noise, self.objectives, self.context = data_hooks, noise, list(objectives), context

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        epoch = epoch_index(state)
        prepared = self.noise is not None and self.noise.state.prepared_epoch >= epoch
        self.data_hooks.on_epoch_begin(epoch, prepared)
        if self.noise is None:
            return
        self.noise.on_epoch_begin(epoch, state.global_step, self.context)
        for objective in self.objectives:
            objective.on_epoch_begin(epoch, self.context)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for objective in self.objectives:
            objective.on_step_begin(state.global_step, state.max_steps, self.context)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.data_hooks.on_train_end()
        if self.noise is not None:
            self.noise.on_train_end(state.epoch or 0.0, state.global_step, self.context)
