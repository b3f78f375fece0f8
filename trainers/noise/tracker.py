"""`NoiseTracker`: owns a run's `NoiseState` (loss bank, mixture, noise probabilities, reference prior) and its
schedule: per-pair losses are recorded every step; after `noise_warmup_epochs`, every `gmm_refit_epochs`, the mixture
is fit at the start of an epoch (in `pass` mode after a no-grad pass over the training set) and the noise statistics
are logged; at the end of training a final fit is logged with the prefix `final_`."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..context import TrainingContext
from .state import NoiseState


class NoiseTracker:
    """The noise estimate of one run.

    Args:
        state: the noise state (sized to the training set's indices).
        is_noisy: ground-truth noisy mask by dataset index (for the logged ROC-AUC), when the data has one.
        args: the run's `NLIPTrainingArguments` (`noise_warmup_epochs`, `gmm_refit_epochs`, `noise_estimation_mode`).
        pass_features: whether a `pass`-mode state pass also keeps the features (a method's epoch work reuses them).
    """

    def __init__(self, state: NoiseState, is_noisy: torch.Tensor | None, args: Any, *, pass_features: bool = False):
        self.state, self.is_noisy, self.args, self.pass_features = state, is_noisy, args, pass_features

    @property
    def is_estimated(self) -> bool:
        return self.state.is_estimated

    def noise_prob_of(self, index: torch.Tensor) -> torch.Tensor:
        return self.state.noise_prob_of(index)

    def record(self, index: torch.Tensor, per_sample: torch.Tensor, step: int) -> None:
        """Record a training batch's per-pair losses (online mode only; `pass` mode records the state pass's)."""
        if self.args.noise_estimation_mode == "online":
            self.state.record(index, per_sample, step=step)

    def fit(self, epoch: int, step: int, context: TrainingContext) -> None:
        """Refresh the loss bank (`pass` mode: an extra no-grad pass) and fit the mixture."""
        if self.args.noise_estimation_mode == "pass":
            result = context.train_set_pass(epoch, features=self.pass_features)
            self.state.record(result.index, result.losses, step=step)
        self.state.fit(epoch)

    def log_statistics(self, context: TrainingContext, prefix: str = "") -> dict[str, float]:
        """Log the noise statistics (mean ε, estimated noisy fraction, ROC-AUC vs `is_noisy` when known)."""
        stats = self.state.compute_statistics(self.is_noisy)
        context.log({f"{prefix}{name}": value for name, value in stats.items()})
        return stats

    def on_epoch_begin(self, epoch: int, step: int, context: TrainingContext) -> None:
        """Fit when due, log the statistics once per epoch after the first fit, and mark the epoch prepared (a run
        resumed in its middle repeats none of its epoch-start work)."""
        state, args = self.state, self.args
        first_fit = args.noise_warmup_epochs
        if epoch >= first_fit and (epoch - first_fit) % args.gmm_refit_epochs == 0 and state.last_fit_epoch != epoch:
            self.fit(epoch, step, context)
        if state.num_fits and state.prepared_epoch < epoch:
            self.log_statistics(context)
        state.prepared_epoch = max(state.prepared_epoch, epoch)

    def on_train_end(self, epoch: float, step: int, context: TrainingContext) -> None:
        """A final fit on the last losses, logged as `final_noise/...` (none when training ended inside the warm-up)."""
        if epoch + 1e-6 < self.args.noise_warmup_epochs:
            return
        self.fit(int(math.floor(epoch + 1e-6)), step, context)
        self.log_statistics(context, prefix="final_")
