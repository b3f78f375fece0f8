"""Per-sample latest loss, indexed by a stable dataset index.

The noise estimator fits its mixture to these losses; in online mode the trainer records the loss the training step
already computed, in pass mode an extra no-grad pass fills it. Each entry is a float32 loss (NaN = never seen) plus an
int32 step stamp (-1 = never seen) so that when banks or updates meet, the latest value wins. That is 8 bytes per
sample: 800 MB for 100M samples.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file


_FORMAT = "nlip-loss-bank"


def _as_array(values, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D; got shape {array.shape}.")
    return array


def _wins(losses: np.ndarray, steps: np.ndarray, stored_losses: np.ndarray, stored_steps: np.ndarray) -> np.ndarray:
    """Where new values replace stored ones: a later step, or the same step and a larger loss (NaN loses)."""
    with np.errstate(invalid="ignore"):
        larger = (losses > stored_losses) | (np.isnan(stored_losses) & ~np.isnan(losses))
    return (steps > stored_steps) | ((steps == stored_steps) & larger)


class LossBank:
    """Latest per-sample loss for `num_samples` examples, stored on CPU.

    Args:
        num_samples: number of examples (valid indices are `0 .. num_samples - 1`).
        growable: when the dataset size is unknown (streaming), let `update`/`merge` grow the bank to fit larger
            indices (capacity doubles, so growing costs amortised O(1) per sample) instead of raising `IndexError`,
            and merge banks of any size.

    `update(indices, losses, step)` keeps, per index, the value with the largest step; ties (the same sample seen twice
    at one step, e.g. the padding of a distributed sampler) keep the larger loss, so merging is order-independent.
    """

    def __init__(self, num_samples: int, *, growable: bool = False):
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0; got {num_samples}.")
        self.growable = growable
        self._size = int(num_samples)
        self._losses = torch.full((self._size,), float("nan"), dtype=torch.float32)
        self._steps = torch.full((self._size,), -1, dtype=torch.int32)
        self._counter = 0  # the step used by `update` when none is given

    def __len__(self) -> int:
        return self._size

    @property
    def num_samples(self) -> int:
        return self._size

    @property
    def losses(self) -> torch.Tensor:
        """float32 `[num_samples]` view of the latest losses; NaN where a sample was never seen."""
        return self._losses[: self._size]

    @property
    def steps(self) -> torch.Tensor:
        """int32 `[num_samples]` view of the step at which each loss was recorded; -1 where never seen."""
        return self._steps[: self._size]

    @property
    def seen(self) -> torch.Tensor:
        """bool `[num_samples]` mask of the samples with a recorded loss."""
        return self.steps >= 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the bank's storage (its capacity, which may exceed `num_samples` when growable)."""
        return self._losses.nbytes + self._steps.nbytes

    def _ensure_size(self, size: int) -> None:
        if size <= self._size:
            return
        if not self.growable:
            raise IndexError(
                f"LossBank holds {self._size} samples (valid indices 0..{self._size - 1}); got index {size - 1}. "
                "Pass the dataset size as `num_samples`, or `growable=True` for streaming data."
            )
        capacity = self._losses.shape[0]
        if size > capacity:
            new_capacity = max(size, 2 * capacity, 1024)
            self._losses = torch.cat([self._losses, torch.full((new_capacity - capacity,), float("nan"))])
            self._steps = torch.cat([self._steps, torch.full((new_capacity - capacity,), -1, dtype=torch.int32)])
        self._size = size

    def update(self, indices, losses, step: int | None = None) -> None:
        """Record `losses[k]` for sample `indices[k]` (tensors, arrays or lists; any device).

        `step` stamps the values (use the global step so that banks of several processes merge correctly); when
        omitted, an internal counter incremented at each call is used. A stored value recorded at a later step is
        kept. Within one call, a repeated index keeps its larger loss.
        """
        indices, losses = _as_array(indices, "indices"), _as_array(losses, "losses")
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"`indices` must hold integer dataset indices; got dtype {indices.dtype}.")
        if indices.shape != losses.shape:
            raise ValueError(
                f"`indices` and `losses` must have the same length; got {indices.size} and {losses.size}."
            )
        if indices.size == 0:
            return
        if step is None:
            step = self._counter
        if not 0 <= step < 2**31:
            raise ValueError(f"`step` must be in [0, 2**31); got {step}.")
        lowest, highest = int(indices.min()), int(indices.max())
        if lowest < 0:
            raise IndexError(f"LossBank indices must be >= 0 (valid indices 0..{self._size - 1}); got {lowest}.")
        self._ensure_size(highest + 1)
        self._counter = max(self._counter, step + 1)
        self._write(indices.astype(np.int64, copy=False), losses.astype(np.float32, copy=False), step)

    def _write(self, indices: np.ndarray, losses: np.ndarray, step: int) -> None:
        """Latest-wins write of one call's values; a repeated index keeps its largest loss."""
        # Sort by (index, loss) so that the last entry of each index group is the largest loss (NaN counts as lowest).
        order = np.lexsort((np.nan_to_num(losses, nan=-np.inf), indices))
        indices, losses = indices[order], losses[order]
        last = np.append(indices[1:] != indices[:-1], True)
        indices, losses = indices[last], losses[last]
        # numpy views share memory with the tensors and avoid torch's per-op threading overhead on small batches.
        stored_losses, stored_steps = self._losses.numpy(), self._steps.numpy()
        wins = _wins(losses, np.int32(step), stored_losses[indices], stored_steps[indices])
        stored_losses[indices[wins]] = losses[wins]
        stored_steps[indices[wins]] = step

    def merge(self, other: LossBank) -> None:
        """Merge another bank into this one (e.g. the banks of several processes): per sample, the latest value wins.

        Both banks must have the same `num_samples`, unless this one is growable (it then grows to fit `other`).
        """
        if not isinstance(other, LossBank):
            raise TypeError(f"`other` must be a LossBank; got {type(other).__name__}.")
        size = other.num_samples
        if size != self._size and not self.growable:
            raise ValueError(f"Cannot merge a LossBank of {size} samples into one of {self._size} samples.")
        self._ensure_size(size)
        losses, steps = self._losses[:size].numpy(), self._steps[:size].numpy()
        other_losses, other_steps = other.losses.numpy(), other.steps.numpy()
        wins = _wins(other_losses, other_steps, losses, steps)
        losses[wins] = other_losses[wins]
        steps[wins] = other_steps[wins]
        self._counter = max(self._counter, other._counter)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors (safetensors-compatible): `losses`, `steps` and the internal step `counter`."""
        return {"losses": self.losses.clone(), "steps": self.steps.clone(), "counter": torch.tensor([self._counter])}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = {"losses", "steps", "counter"} - set(state_dict)
        if missing:
            raise ValueError(f"LossBank state_dict is missing {sorted(missing)}.")
        losses, steps = state_dict["losses"], state_dict["steps"]
        if losses.ndim != 1 or losses.shape != steps.shape:
            raise ValueError(
                f"LossBank state_dict needs 1-D `losses` and `steps` of one length; got {tuple(losses.shape)} and "
                f"{tuple(steps.shape)}."
            )
        self._losses = losses.to(torch.float32).clone()
        self._steps = steps.to(torch.int32).clone()
        self._size = losses.shape[0]
        self._counter = int(state_dict["counter"].reshape(-1)[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to a safetensors file."""
        state = {"losses": self.losses, "steps": self.steps, "counter": torch.tensor([self._counter])}
        save_file(state, os.fspath(path), metadata={"format": _FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike, *, growable: bool = False) -> LossBank:
        """Read a bank written by `save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No LossBank file at {os.fspath(path)!r}.")
        bank = cls(0, growable=growable)
        bank.load_state_dict(load_file(os.fspath(path)))
        return bank
