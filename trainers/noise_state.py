"""The per-run noise state of `NLIPTrainer`, written into every checkpoint so that a resumed run continues exactly.

It holds the per-sample loss bank, the fitted mixture (clean-probability estimator), the noise probabilities the loss
uses, NPC's memory bank, the synthetic captions of noise completion, and where the epoch-level schedule stands. Every
process holds an identical copy (per-sample values are gathered across processes before they are recorded), so
process zero alone writes it: tensors to `nlip_noise_state.safetensors`, everything else to `nlip_noise_state.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .loss_bank import LossBank
from .memory_bank import MemoryBank
from .metrics import noise_detection_metrics
from .noise_estimation import CleanProbabilityEstimator, NoiseEstimate


NOISE_STATE_NAME = "nlip_noise_state"
NOISE_STATE_TENSORS = f"{NOISE_STATE_NAME}.safetensors"
NOISE_STATE_JSON = f"{NOISE_STATE_NAME}.json"
_SCHEMA_VERSION = 1


class NoiseState:
    """Per-sample noise bookkeeping of one training run, indexed by the dataset's stable `index`.

    Args:
        num_samples: the largest dataset `index` + 1.
        growable: streaming data of unknown size: the bank and the noise probabilities grow with the indices seen.
        max_fit_samples: the most losses the mixture is fit on.
        seed: seed of the mixture fit's subsample and initialisation.

    Attributes:
        loss_bank: latest per-sample plain InfoNCE loss `CE_i`.
        estimator: the 2-component GMM of DESIGN §4.1.
        memory_bank: NPC's clean memory bank (None until built).
        synthetic_captions: noise completion's caption per index (None until generated; an entry is None for an index
            without an image).
        prepared_epoch: the last epoch whose epoch-start actions (pass, fit, memory bank, completion) ran; a run resumed
            in the middle of that epoch does not repeat them.
        num_fits: how many times the mixture was fit; `last_fit_epoch`, `memory_epoch`, `completion_epoch`: the epochs
            of the latest fit / memory-bank build / caption refresh (None before the first).
        statistics: the latest logged noise statistics (mean noise probability, estimated noisy fraction, ROC-AUC...).
    """

    def __init__(self, num_samples: int, *, growable: bool = False, max_fit_samples: int = 100_000, seed: int = 0):
        self.loss_bank = LossBank(num_samples, growable=growable)
        self.estimator = CleanProbabilityEstimator(max_fit_samples=max_fit_samples, seed=seed)
        self._noise_prob = torch.zeros(num_samples, dtype=torch.float32)
        self.memory_bank: MemoryBank | None = None
        self.synthetic_captions: list[str | None] | None = None
        self.prepared_epoch = -1
        self.num_fits = 0
        self.last_fit_epoch: int | None = None
        self.memory_epoch: int | None = None
        self.completion_epoch: int | None = None
        self.statistics: dict[str, float] = {}
        self.estimate_summary: dict[str, Any] = {}

    @property
    def num_samples(self) -> int:
        return self.loss_bank.num_samples

    @property
    def noise_prob(self) -> torch.Tensor:
        """float32 `[num_samples]` noise probabilities `ε_i` (0 before the first fit and for samples never seen)."""
        if self._noise_prob.shape[0] < self.num_samples:
            grown = torch.zeros(self.num_samples, dtype=torch.float32)
            grown[: self._noise_prob.shape[0]] = self._noise_prob
            self._noise_prob = grown
        return self._noise_prob

    @property
    def is_estimated(self) -> bool:
        """Whether a mixture fit has produced noise probabilities (False before warm-up ends and after a fallback)."""
        return self.num_fits > 0 and self.estimator.is_fitted

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

    def fit(self, epoch: int) -> NoiseEstimate:
        """Fit the mixture to the loss bank and replace the noise probabilities with its posterior."""
        estimate = self.estimator.fit(self.loss_bank.losses)
        self._noise_prob = torch.from_numpy(np.ascontiguousarray(estimate.noise_prob, dtype=np.float32))
        self.num_fits += 1
        self.last_fit_epoch = epoch
        self.estimate_summary = {
            "means": estimate.means,
            "variances": estimate.variances,
            "weights": estimate.weights,
            "loss_threshold": estimate.loss_threshold,
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
        if self.memory_bank is not None:
            tensors.update({f"memory_bank.{name}": value for name, value in self.memory_bank.state_dict().items()})
        metadata = {
            "schema_version": _SCHEMA_VERSION,
            "growable": self.loss_bank.growable,
            "estimator": self.estimator.state_dict(),
            "prepared_epoch": self.prepared_epoch,
            "num_fits": self.num_fits,
            "last_fit_epoch": self.last_fit_epoch,
            "memory_epoch": self.memory_epoch,
            "completion_epoch": self.completion_epoch,
            "statistics": self.statistics,
            "estimate_summary": self.estimate_summary,
            "synthetic_captions": self.synthetic_captions,
        }
        return tensors, metadata

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        if metadata.get("schema_version") != _SCHEMA_VERSION:
            raise ValueError(
                f"Noise state schema version {metadata.get('schema_version')!r} is not the supported {_SCHEMA_VERSION}."
            )
        self.loss_bank = LossBank(0, growable=metadata["growable"])
        self.loss_bank.load_state_dict({k[len("loss_bank.") :]: v for k, v in tensors.items() if k.startswith("loss_bank.")})
        self._noise_prob = tensors["noise_prob"].to(torch.float32).clone()
        memory = {k[len("memory_bank.") :]: v for k, v in tensors.items() if k.startswith("memory_bank.")}
        self.memory_bank = MemoryBank.from_state_dict(memory) if memory else None
        self.estimator.load_state_dict(metadata["estimator"])
        for name in ("prepared_epoch", "num_fits", "last_fit_epoch", "memory_epoch", "completion_epoch"):
            setattr(self, name, metadata[name])
        self.statistics = dict(metadata["statistics"])
        self.estimate_summary = dict(metadata["estimate_summary"])
        self.synthetic_captions = metadata["synthetic_captions"]

    def save(self, directory: str | os.PathLike) -> None:
        """Write `nlip_noise_state.safetensors` and `nlip_noise_state.json` into `directory`."""
        os.makedirs(directory, exist_ok=True)
        tensors, metadata = self.state_dict()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, NOISE_STATE_TENSORS))
        with open(os.path.join(directory, NOISE_STATE_JSON), "w", encoding="utf-8") as file:
            json.dump(metadata, file)

    def load(self, directory: str | os.PathLike) -> None:
        """Restore the state written by `save` into `directory`."""
        tensors_path = os.path.join(directory, NOISE_STATE_TENSORS)
        json_path = os.path.join(directory, NOISE_STATE_JSON)
        for path in (tensors_path, json_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"No noise state at {path!r}: the checkpoint was not written by NLIPTrainer (or is incomplete)."
                )
        with open(json_path, encoding="utf-8") as file:
            metadata = json.load(file)
        self.load_state_dict(load_file(tensors_path), metadata)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(directory, NOISE_STATE_TENSORS))
