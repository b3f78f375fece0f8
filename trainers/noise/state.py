"""The per-run noise state of `NLIPTrainer`, written into every checkpoint so that a resumed run continues exactly.

It holds the per-sample loss bank, the fitted mixture (clean-probability estimator), the noise probabilities the loss
uses, the reference prior, and where the epoch-level schedule stands (the methods' own state, such as NPC's memory
bank, is each objective's: `trainers.objectives.base`). Every
process holds an identical copy (per-sample values are gathered across processes before they are recorded), so
process zero alone writes it: tensors to `nlip_noise_state.safetensors`, everything else to `nlip_noise_state.json`.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .loss_bank import LossBank
from ..evaluation.metrics import noise_detection_metrics
from .estimation import CleanProbabilityEstimator, NoiseEstimate, evidence_clean_prob
from .reference_prior import ReferencePrior, combine_noise


NOISE_STATE_NAME = "nlip_noise_state"
NOISE_STATE_TENSORS = f"{NOISE_STATE_NAME}.safetensors"
NOISE_STATE_JSON = f"{NOISE_STATE_NAME}.json"
# 2: adds `data_fingerprint` and the batch-time skip counts. Version 1 states still load (their data cannot be verified).
# 3: NPC's memory bank and noise completion's captions move to their objectives' files; states of versions 1-2 still
# load, and their methods' part is handed to the objectives (`legacy_objective_state`).
# 4: adds the averaged losses of the latest fit (`fit_losses`, with `loss_momentum` > 0) and the step they reach;
# states of versions 1-3 load without them (an average then starts at the next fit).
_SCHEMA_VERSION = 4
_READABLE_VERSIONS = (1, 2, 3, 4)
_REQUIRED_METADATA = ("growable", "estimator", "prepared_epoch", "num_fits", "last_fit_epoch", "statistics",
                      "estimate_summary")
_LEGACY_METADATA = ("memory_epoch", "completion_epoch", "synthetic_captions")


class NoiseStateError(ValueError):
    """A saved noise state is damaged or does not fit the training data; the message names the file."""


class NoiseState:
    """Per-sample noise bookkeeping of one training run, indexed by the dataset's stable `index`.

    Args:
        num_samples: the largest dataset `index` + 1.
        growable: streaming data of unknown size: the bank and the noise probabilities grow with the indices seen.
        max_fit_samples: the most losses the mixture is fit on.
        max_noisy_fraction: a fit that calls more than this fraction noisy is not used (`CleanProbabilityEstimator`).
        min_separation: a fit whose components are closer than this in Ashman's D is not used (same place).
        loss_momentum: what the mixture is fit on. 0: each pair's latest loss. `m` in (0, 1): an exponential moving
            average over the fits, `L̄_i ← m·L̄_i + (1 − m)·L_i` for every pair whose loss was recorded since the
            previous fit (its first loss starts the average), which smooths out how a pair's InfoNCE loss depends on
            the negatives its batch happened to hold.
        seed: seed of the mixture fit's subsample and initialisation.

    Attributes:
        loss_bank: latest per-sample plain InfoNCE loss `CE_i`.
        estimator: the 2-component GMM over the loss bank (`CleanProbabilityEstimator`).
        fit_losses: with `loss_momentum` > 0, the averaged losses the latest fit used (NaN: never seen); else None.
        fit_losses_step: the latest loss-bank step included in `fit_losses` (-1 before any).
        prepared_epoch: the last epoch whose epoch-start actions (pass, fit, the objectives' epoch work) ran; a run
            resumed in the middle of that epoch does not repeat them.
        num_fits: how many times the mixture was fit; `last_fit_epoch`: the epoch of the latest fit (None before).
        statistics: the latest logged noise statistics (mean noise probability, estimated noisy fraction, ROC-AUC...).
        data_fingerprint: what the training data was (`trainers.data.fingerprint.data_fingerprint`: size and a hash of the
            index -> key map), checked when a checkpoint is resumed; None when unknown (states of schema version 1).
        batch_skips: per process, what its batches skipped so far: `{"skipped_pairs": SkipReport.to_dict(),
            "empty_batches": batches with no valid pair, "epoch": e, "empty_in_epoch": those of epoch e}` (a resumed
            run skips `empty_in_epoch` more batches on top of the Trainer's own batch skipping, to stay exact).
        legacy_objective_state: after loading a state of schema 1-2, its methods' part (`{"tensors": NPC's memory
            bank, "metadata": memory_epoch, completion_epoch, synthetic_captions}`) for the objectives; else None.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        growable: bool = False,
        max_fit_samples: int = 100_000,
        max_noisy_fraction: float = 0.9,
        min_separation: float = 0.0,
        loss_momentum: float = 0.0,
        seed: int = 0,
    ):
        if not 0.0 <= loss_momentum < 1.0:
            raise ValueError(f"`loss_momentum` must be in [0, 1); got {loss_momentum}.")
        self.loss_bank = LossBank(num_samples, growable=growable)
        self.loss_momentum = loss_momentum
        self.fit_losses: torch.Tensor | None = None
        self.fit_losses_step = -1
        self.estimator = CleanProbabilityEstimator(
            max_fit_samples=max_fit_samples, max_noisy_fraction=max_noisy_fraction, min_separation=min_separation,
            seed=seed,
        )
        self._noise_prob = torch.zeros(num_samples, dtype=torch.float32)
        self.prepared_epoch = -1
        self.num_fits = 0
        self.last_fit_epoch: int | None = None
        self.statistics: dict[str, float] = {}
        self.estimate_summary: dict[str, Any] = {}
        self.data_fingerprint: dict[str, Any] | None = None
        self.batch_skips: list[dict[str, Any]] = []
        self.reference_prior: ReferencePrior | None = None
        self.prior_weight = 1.0
        self.legacy_objective_state: dict[str, Any] | None = None

    @property
    def num_samples(self) -> int:
        return self.loss_bank.num_samples

    @property
    def noise_prob(self) -> torch.Tensor:
        """float32 `[num_samples]` noise probabilities `ε_i` (0 before the first fit and for samples never seen).

        With a reference prior: `w·ε_prior + (1 − w)·ε_loss` (`w = prior_weight`), the prior alone until the first
        usable loss-based fit (a new tensor; without a prior the table itself)."""
        if self._noise_prob.shape[0] < self.num_samples:
            grown = torch.zeros(self.num_samples, dtype=torch.float32)
            grown[: self._noise_prob.shape[0]] = self._noise_prob
            self._noise_prob = grown
        return self._with_prior(self._noise_prob)

    def _with_prior(self, loss_based: torch.Tensor) -> torch.Tensor:
        """The loss-based `ε` blended with the reference prior (the prior alone before the first usable fit)."""
        if self.reference_prior is None:
            return loss_based
        usable = loss_based if self._has_loss_fit() else None
        return combine_noise(usable, self.reference_prior.noise_prob, self.prior_weight)

    def _has_loss_fit(self) -> bool:
        return self.num_fits > 0 and self.estimator.is_fitted

    def noise_prob_on_evidence(self) -> torch.Tensor:
        """`noise_prob` with the loss-based part's clean weight capped at its noisy weight (`evidence_clean_prob`):
        a pair counts as clean on its loss's likelihood, not on a mixture that calls most pairs clean. The same as
        `noise_prob` before the first usable fit and whenever the mixture's clean weight is at most its noisy one."""
        table = self.noise_prob
        weights = self.estimate_summary.get("weights")
        if weights is None or not self._has_loss_fit():
            return table
        return self._with_prior(1.0 - evidence_clean_prob(1.0 - self._noise_prob, tuple(weights)))

    @property
    def is_estimated(self) -> bool:
        """Whether noise probabilities are in use: a reference prior, or a mixture fit (False before warm-up ends
        and after a fallback)."""
        return self.reference_prior is not None or self._has_loss_fit()

    def set_reference_prior(self, prior: ReferencePrior, weight: float) -> None:
        """Use `prior` (scored on this state's indices) with weight `weight` in the noise probabilities."""
        if prior.score.shape[0] != self.num_samples:
            raise ValueError(f"The reference prior covers {prior.score.shape[0]} pairs; the noise state {self.num_samples}.")
        combine_noise(None, prior.noise_prob, weight)  # validates the weight
        self.reference_prior, self.prior_weight = prior, weight

    def record(self, indices: torch.Tensor, losses: torch.Tensor, step: int) -> None:
        """Store the per-sample losses of dataset `indices` recorded at optimizer step `step`."""
        self.loss_bank.update(indices.detach().cpu(), losses.detach().float().cpu(), step=step)

    def noise_prob_of(self, indices: torch.Tensor) -> torch.Tensor:
        """`ε` of dataset `indices`, on their device (0 for indices beyond the bank, e.g. new streaming samples)."""
        table = self.noise_prob
        cpu = indices.detach().cpu().long()
        values = torch.zeros(cpu.shape, dtype=torch.float32)
        known = cpu < table.shape[0]
        values[known] = table[cpu[known]]
        return values.to(indices.device)

    def losses_to_fit(self) -> torch.Tensor:
        """The per-pair losses the next fit uses: the latest ones, or (`loss_momentum` > 0) their running average
        updated with every loss recorded since the previous fit, which it becomes."""
        latest = self.loss_bank.losses
        if self.loss_momentum == 0.0:
            return latest
        previous = torch.full_like(latest, float("nan"))
        if self.fit_losses is not None:
            previous[: self.fit_losses.shape[0]] = self.fit_losses
        new = self.loss_bank.steps > self.fit_losses_step
        average = torch.where(previous.isnan(), latest, self.loss_momentum * previous + (1 - self.loss_momentum) * latest)
        self.fit_losses = torch.where(new, average, previous)
        if self.loss_bank.seen.any():
            self.fit_losses_step = int(self.loss_bank.steps.max())
        return self.fit_losses

    def fit(self, epoch: int) -> NoiseEstimate:
        """Fit the mixture to the loss bank (`losses_to_fit`) and replace the noise probabilities with its posterior."""
        estimate = self.estimator.fit(self.losses_to_fit())
        self._noise_prob = torch.from_numpy(np.ascontiguousarray(estimate.noise_prob, dtype=np.float32))
        self.num_fits += 1
        self.last_fit_epoch = epoch
        self.estimate_summary = {
            "means": estimate.means,
            "variances": estimate.variances,
            "weights": estimate.weights,
            "loss_threshold": estimate.loss_threshold,
            "separation": estimate.separation,
            "fallback_reason": estimate.reason,
        }
        return estimate

    def compute_statistics(self, is_noisy: torch.Tensor | None = None) -> dict[str, float]:
        """Noise statistics over the samples seen so far; with the ground-truth `is_noisy` mask (indexed like the bank)
        also ROC-AUC, precision, recall and F1 of the noisy class. Stored in `statistics` and returned."""
        seen = self.loss_bank.seen
        noise = self.noise_prob[: seen.shape[0]][seen]
        stats = {
            "noise/mean_noise_prob": float(noise.mean()) if noise.numel() else float("nan"),
            "noise/estimated_noisy_fraction": float((noise > 0.5).float().mean()) if noise.numel() else float("nan"),
            "noise/seen_fraction": float(seen.float().mean()) if seen.numel() else float("nan"),
            "noise/num_fits": float(self.num_fits),
        }
        means = self.estimate_summary.get("means")
        if means is not None:
            stats["noise/clean_loss_mean"], stats["noise/noisy_loss_mean"] = float(means[0]), float(means[1])
        separation = self.estimate_summary.get("separation")  # absent from states of earlier versions
        if separation is not None:
            stats["noise/separation"] = float(separation)
        if is_noisy is not None and self.is_estimated and noise.numel():
            truth = is_noisy[: seen.shape[0]][seen]
            detection = noise_detection_metrics(noise, truth)
            stats.update({f"noise/{name}": value for name, value in detection.items() if name != "estimated_noisy_fraction"})
        self.statistics = stats
        return stats

    # ------------------------------------------------------------------------------------------------ serialisation

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """`(tensors, metadata)`: safetensors-compatible tensors and JSON-serialisable values."""
        tensors = {f"loss_bank.{name}": value for name, value in self.loss_bank.state_dict().items()}
        tensors["noise_prob"] = self.noise_prob.clone()
        if self.fit_losses is not None:
            tensors["fit_losses"] = self.fit_losses.clone()
        prior = None
        if self.reference_prior is not None:
            prior_state = self.reference_prior.state_dict()
            for name in ("score", "clean_prob", "image_embeds", "text_embeds"):
                if name in prior_state:
                    tensors[f"reference_prior.{name}"] = prior_state[name]
            prior = {"random_pair_cosine": prior_state["random_pair_cosine"], "reason": prior_state["reason"],
                     "weight": self.prior_weight}
        metadata = {
            "schema_version": _SCHEMA_VERSION,
            "growable": self.loss_bank.growable,
            "estimator": self.estimator.state_dict(),
            "prepared_epoch": self.prepared_epoch,
            "num_fits": self.num_fits,
            "last_fit_epoch": self.last_fit_epoch,
            "statistics": self.statistics,
            "estimate_summary": self.estimate_summary,
            "data_fingerprint": self.data_fingerprint,
            "batch_skips": self.batch_skips,
            "reference_prior": prior,
            "fit_losses_step": self.fit_losses_step,
        }
        return tensors, metadata

    def load_state_dict(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, Any],
        *,
        where: str = "the noise state",
        expected_num_samples: int | None = None,
    ) -> None:
        """Restore from `state_dict()` output. Everything is checked before anything is replaced: a missing key, a
        wrong version, tensors of different lengths, or (non-growable state) a length other than
        `expected_num_samples` raise a `NoiseStateError` naming `where` (the file) and what was found."""
        version = metadata.get("schema_version") if isinstance(metadata, dict) else None
        if not isinstance(metadata, dict):
            raise NoiseStateError(f"{where}: expected a JSON object, got {type(metadata).__name__}.")
        if version not in _READABLE_VERSIONS:
            raise NoiseStateError(
                f"{where}: noise state schema version {version!r} is not one of the supported {list(_READABLE_VERSIONS)}."
            )
        missing = [name for name in _REQUIRED_METADATA if name not in metadata]
        if missing:
            raise NoiseStateError(f"{where}: missing entries {missing} (a damaged or hand-edited file).")
        required_tensors = ("noise_prob", "loss_bank.losses", "loss_bank.steps", "loss_bank.counter")
        missing = [name for name in required_tensors if name not in tensors]
        if missing:
            raise NoiseStateError(f"{where}: missing tensors {missing} (a damaged or hand-edited file).")
        lengths = {name: int(tensors[name].shape[0]) if tensors[name].ndim == 1 else None
                   for name in ("noise_prob", "loss_bank.losses", "loss_bank.steps")}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            found = ", ".join(f"{name} {tuple(tensors[name].shape)}" for name in lengths)
            raise NoiseStateError(f"{where}: the per-sample tensors must be 1-D of one length; found {found}.")
        size = lengths["noise_prob"]
        fit_losses = tensors.get("fit_losses")
        if fit_losses is not None and (fit_losses.ndim != 1 or fit_losses.shape[0] > size):
            raise NoiseStateError(
                f"{where}: fit_losses of shape {tuple(fit_losses.shape)} for {size} per-sample entries."
            )
        if expected_num_samples is not None and not metadata["growable"] and size != expected_num_samples:
            raise NoiseStateError(
                f"{where}: holds {size} per-sample entries but the training data has {expected_num_samples} indices "
                f"({'fewer' if expected_num_samples < size else 'more'} pairs than the checkpoint was trained on)."
            )
        try:
            loss_bank = LossBank(0, growable=metadata["growable"])
            loss_bank.load_state_dict({k[len("loss_bank.") :]: v for k, v in tensors.items() if k.startswith("loss_bank.")})
            estimator = copy.deepcopy(self.estimator)
            estimator.load_state_dict(metadata["estimator"])
            prior_metadata = metadata.get("reference_prior")
            prior = None if prior_metadata is None else ReferencePrior.from_state_dict(
                {**{k[len("reference_prior."):]: v for k, v in tensors.items() if k.startswith("reference_prior.")},
                 **prior_metadata}, num_samples=size)
        except (ValueError, KeyError, TypeError) as error:
            raise NoiseStateError(f"{where}: {type(error).__name__}: {error}") from None
        legacy = None
        if version < 3:
            captions = metadata.get("synthetic_captions")
            if captions is not None and len(captions) != size:
                raise NoiseStateError(f"{where}: {len(captions)} synthetic captions for {size} samples.")
            legacy = {"tensors": {k: v for k, v in tensors.items() if k.startswith("memory_bank.")},
                      "metadata": {name: metadata.get(name) for name in _LEGACY_METADATA}}
        self.loss_bank, self.estimator = loss_bank, estimator
        self._noise_prob = tensors["noise_prob"].to(torch.float32).clone()
        for name in ("prepared_epoch", "num_fits", "last_fit_epoch"):
            setattr(self, name, metadata[name])
        self.statistics = dict(metadata["statistics"])
        self.estimate_summary = dict(metadata["estimate_summary"])
        self.legacy_objective_state = legacy
        self.data_fingerprint = metadata.get("data_fingerprint")
        self.batch_skips = list(metadata.get("batch_skips") or [])
        self.reference_prior = prior
        self.prior_weight = 1.0 if prior_metadata is None else float(prior_metadata["weight"])
        self.fit_losses = None if fit_losses is None else fit_losses.to(torch.float32).clone()
        self.fit_losses_step = int(metadata.get("fit_losses_step", -1))

    def save(self, directory: str | os.PathLike) -> None:
        """Write `nlip_noise_state.safetensors` and `nlip_noise_state.json` into `directory`."""
        os.makedirs(directory, exist_ok=True)
        tensors, metadata = self.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, NOISE_STATE_TENSORS))
        with open(os.path.join(directory, NOISE_STATE_JSON), "w", encoding="utf-8") as file:
            json.dump(metadata, file)

    def load(self, directory: str | os.PathLike, expected_num_samples: int | None = None) -> None:
        """Restore the state written by `save` into `directory`; a damaged file raises a `NoiseStateError` naming it
        (see `load_state_dict` for `expected_num_samples`)."""
        tensors_path = os.path.join(directory, NOISE_STATE_TENSORS)
        json_path = os.path.join(directory, NOISE_STATE_JSON)
        for path in (tensors_path, json_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"No noise state at {path!r}: the checkpoint was not written by NLIPTrainer (or is incomplete)."
                )
        metadata = read_metadata(directory)
        try:
            tensors = load_file(tensors_path)
        except Exception as error:  # safetensors raises SafetensorError / OSError for truncated or foreign files
            raise NoiseStateError(f"{tensors_path}: not a readable safetensors file ({type(error).__name__}: {error}).") \
                from None
        self.load_state_dict(tensors, metadata, where=f"{tensors_path} / {json_path}",
                             expected_num_samples=expected_num_samples)

    @staticmethod
    def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
        return read_metadata(directory)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(directory, NOISE_STATE_TENSORS))


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a saved noise state; a `NoiseStateError` names the file when it is not valid UTF-8 JSON."""
    path = os.path.join(directory, NOISE_STATE_JSON)
    try:
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise NoiseStateError(f"{path}: not valid JSON ({error}); the checkpoint's noise state is damaged.") from None
    if not isinstance(metadata, dict):
        raise NoiseStateError(f"{path}: expected a JSON object, got {type(metadata).__name__}.")
    return metadata
