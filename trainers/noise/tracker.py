"""`NoiseTracker`: owns a run's `NoiseState` (loss bank, mixture, noise probabilities, reference prior) and its
schedule: per-pair losses are recorded every step; after `noise_warmup_epochs`, every `gmm_refit_epochs`, the mixture
is fit at the start of an epoch (in `pass` mode after a no-grad pass over the training set) and the noise statistics
are logged; at the end of training a final fit is logged with the prefix `final_`. With `noise_prior_epoch` N >= 1 the
reference prior is scored at the start of epoch N by the run's own model (a snapshot: one no-grad pass)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..context import TrainingContext
from ..evaluation.embeddings import PairEmbeddings
from .reference_prior import ReferencePrior
from .state import NoiseState


logger = logging.getLogger(__name__)


def snapshot_name(epoch: int) -> str:
    """How logs and the model card name a snapshot reference (`noise_prior_epoch`)."""
    return f"the model at the start of epoch {epoch}"


class NoiseTracker:
    """The noise estimate of one run.

    Args:
        state: the noise state (sized to the training set's indices).
        is_noisy: ground-truth noisy mask by dataset index (for the logged ROC-AUC), when the data has one.
        args: the run's `NLIPTrainingArguments` (`noise_warmup_epochs`, `gmm_refit_epochs`, `noise_estimation_mode`).
        pass_features: whether a `pass`-mode state pass also keeps the features (a method's epoch work reuses them).
        present: which dataset indices the training set holds (for the injected noisy fraction of `settings`).
    """

    def __init__(self, state: NoiseState, is_noisy: torch.Tensor | None, args: Any, *, pass_features: bool = False,
                 present: torch.Tensor | None = None):
        self.state, self.is_noisy, self.args, self.pass_features = state, is_noisy, args, pass_features
        self.present = present

    def settings(self) -> dict[str, Any]:
        """The estimate's settings for the model card (and the reference prior's, and the injected noisy fraction
        when the data marks its noisy pairs)."""
        args = self.args
        settings: dict[str, Any] = {
            "noise_warmup_epochs": args.noise_warmup_epochs,
            "gmm_refit_epochs": args.gmm_refit_epochs,
            "noise_estimation_mode": args.noise_estimation_mode,
            "noise_max_noisy_fraction": args.noise_max_noisy_fraction,
            "noise_min_separation": args.noise_min_separation,
            "noise_loss_momentum": args.noise_loss_momentum,
        }
        prior = self.state.reference_prior
        if prior is not None:
            settings.update(
                noise_prior="reference",
                noise_prior_model=args.noise_prior_model or (snapshot_name(args.noise_prior_epoch)
                                                             if args.noise_prior_epoch else "the starting model"),
                noise_prior_score=(f"caption agreement of the {args.noise_prior_neighbours} nearest images"
                                   if args.noise_prior_neighbours else "image-text cosine"),
                noise_prior_weight=args.noise_prior_weight,
                reference_random_pair_cosine=round(prior.random_pair_cosine, 4),
            )
        if self.is_noisy is not None:
            present = self.present if self.present is not None else torch.ones_like(self.is_noisy)
            settings["injected_noisy_fraction"] = float(self.is_noisy[present].float().mean())
        return settings

    def summary_statistics(self) -> dict[str, float] | None:
        """The latest logged statistics under model-card names, with the pairs scored and the epoch of the estimate
        (None before any was logged)."""
        state = self.state
        if not state.statistics:
            return None
        renamed = {"mean_noise_prob": "mean_noise_probability"}
        statistics = {renamed.get(name.split("/", 1)[1], name.split("/", 1)[1]): value
                      for name, value in state.statistics.items()}
        statistics["num_pairs"] = float(int(state.loss_bank.seen.sum()))
        if state.last_fit_epoch is not None:
            statistics["epoch"] = float(state.last_fit_epoch)
        return {name: value for name, value in statistics.items() if not math.isnan(value)}

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
        if args.noise_prior == "reference" and 0 < args.noise_prior_epoch <= epoch and state.reference_prior is None:
            self.score_snapshot_prior(epoch, context)
        first_fit = args.noise_warmup_epochs
        if epoch >= first_fit and (epoch - first_fit) % args.gmm_refit_epochs == 0 and state.last_fit_epoch != epoch:
            self.fit(epoch, step, context)
        if state.num_fits and state.prepared_epoch < epoch:
            self.log_statistics(context)
        state.prepared_epoch = max(state.prepared_epoch, epoch)

    def score_prior(self, embed: Callable[[], PairEmbeddings], reference: str) -> tuple[ReferencePrior, float]:
        """Score every pair of `embed()` (a reference's embeddings of the training set) into the reference prior and
        use it with `noise_prior_weight`; logged with `reference` (what embedded the pairs). Returns the prior and
        the seconds the pass and the fit took."""
        start = time.perf_counter()
        prior = ReferencePrior.from_embeddings(embed(), self.state.num_samples,
                                               max_noisy_fraction=self.args.noise_max_noisy_fraction, seed=self.args.seed,
                                               neighbours=self.args.noise_prior_neighbours)
        self.state.set_reference_prior(prior, self.args.noise_prior_weight)
        seconds = time.perf_counter() - start
        logger.info("Reference prior from %s: %d pairs scored in %.1f s (random-pair cosine %.3f, mean noise "
                    "probability %.3f%s).", reference, prior.summary()["num_scored"], seconds, prior.random_pair_cosine,
                    prior.summary()["mean_noise_probability"], f"; {prior.reason}" if prior.reason else "")
        return prior, seconds

    def score_snapshot_prior(self, epoch: int, context: TrainingContext) -> ReferencePrior:
        """The reference prior from the model being trained as it is now (`noise_prior_epoch`): its embeddings of every
        training pair from one no-grad pass, debiased and mixed exactly like a frozen reference's; the pass's time is
        logged as `noise/reference_pass_s`."""

        def embed() -> PairEmbeddings:
            result = context.train_set_pass(epoch, features=True)
            return PairEmbeddings(result.image_features, result.text_features, result.index)

        prior, seconds = self.score_prior(embed, snapshot_name(epoch))
        context.log({"noise/reference_pass_s": seconds})
        return prior

    def on_train_end(self, epoch: float, step: int, context: TrainingContext) -> None:
        """A final fit on the last losses, logged as `final_noise/...` (none when training ended inside the warm-up)."""
        if epoch + 1e-6 < self.args.noise_warmup_epochs:
            return
        self.fit(int(math.floor(epoch + 1e-6)), step, context)
        self.log_statistics(context, prefix="final_")
