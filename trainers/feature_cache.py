"""Cache of a locked tower's outputs, by the dataset's stable `index`: LiT-style training computes them once.

A tower locked with `NLIPTrainingArguments.freeze_vision_tower` / `freeze_text_tower` (parameters without gradient,
modules in eval mode) gives the same output for an example in every epoch. `NLIPTrainer` then stores each example's
pooled tower output (what the projection consumes) the first time it is seen and feeds it back to the model
(`NLIPModel.forward(vision_pooled_output=..., text_pooled_output=...)`) instead of running the tower again.

Entries are keyed by `index`; each also keeps a fingerprint of its input (the caption's token ids, for the text tower),
so an example whose input changes (a dataset with several captions per image, drawn at random each epoch) is
recomputed rather than served stale. Images are assumed deterministic per index (the collator does no random
augmentation). Storage is a float32 tensor in memory (grown as indices appear; streaming data too) or, with a
directory, a memory-mapped file on disk for data sets whose features do not fit in RAM (it needs the number of
examples and is rebuilt at every run).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from modeling_nlip.modeling_nlip import pool_tower_output


logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")


def token_fingerprints(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A 63-bit hash of each row's unpadded token ids (stable across processes and runs)."""
    ids = input_ids.detach().cpu()
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    values = []
    for row, row_mask in zip(ids, mask, strict=True):
        digest = hashlib.blake2b(row[row_mask].numpy().astype(np.int64).tobytes(), digest_size=8).digest()
        values.append(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.tensor(values, dtype=torch.long)


class FeatureCache:
    """Per-example features (one float32 vector each) by non-negative integer index, with an input fingerprint.

    Args:
        name: what is cached (`"vision"`, `"text"`); names the file on disk.
        num_samples: the number of indices (largest index + 1); None: grow as indices appear (memory only).
        directory: where the memory-mapped file lives; None: in memory.
    """

    def __init__(self, name: str, num_samples: int | None = None, directory: str | None = None):
        if directory is not None and num_samples is None:
            raise ValueError(
                "An on-disk feature cache needs the number of examples (a map-style dataset with an 'index' column); "
                "use the in-memory cache for streaming data."
            )
        self.name = name
        self.num_samples = num_samples
        self.directory = directory
        self.path = os.path.join(directory, f"{name}_features.f32") if directory is not None else None
        self._features: torch.Tensor | None = None
        self._memmap: np.memmap | None = None
        capacity = num_samples or 0
        self._filled = torch.zeros(capacity, dtype=torch.bool)
        self._fingerprint = torch.zeros(capacity, dtype=torch.long)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """The number of cached examples."""
        return int(self._filled.sum())

    @property
    def nbytes(self) -> int:
        return 0 if self._features is None else self._features.numel() * 4

    def _allocate(self, dim: int, capacity: int) -> None:
        if self._features is not None:
            if self._features.shape[1] != dim:
                raise ValueError(f"Feature cache {self.name!r} holds {self._features.shape[1]}-d features, got {dim}-d.")
            if capacity <= self._features.shape[0]:
                return
        if self.path is not None:
            if capacity > self.num_samples:
                raise IndexError(f"Index {capacity - 1} is beyond the {self.num_samples} examples of feature cache {self.name!r}.")
            os.makedirs(self.directory, exist_ok=True)
            self._memmap = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(self.num_samples, dim))
            self._features = torch.from_numpy(self._memmap)
            return
        grown = max(capacity, 2 * (0 if self._features is None else self._features.shape[0]), 1024)
        if self.num_samples is not None:
            grown = max(capacity, self.num_samples)
        features = torch.zeros(grown, dim, dtype=torch.float32)
        filled = torch.zeros(grown, dtype=torch.bool)
        fingerprint = torch.zeros(grown, dtype=torch.long)
        if self._features is not None:
            old = self._features.shape[0]
            features[:old], filled[:old], fingerprint[:old] = self._features, self._filled[:old], self._fingerprint[:old]
        self._features, self._filled, self._fingerprint = features, filled, fingerprint

    def lookup(self, index: torch.Tensor, fingerprint: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """`(features, hit)`: the cached rows of `index` (rows that miss are zeros; None when nothing is cached yet)
        and a bool mask of the hits (cached, and with the same fingerprint when one is given)."""
        index = index.detach().cpu().long()
        if (index < 0).any():
            raise IndexError("Feature cache indices must be non-negative.")
        hit = torch.zeros(index.shape[0], dtype=torch.bool)
        if self._features is None:
            self.misses += index.shape[0]
            return None, hit
        inside = index < self._filled.shape[0]
        rows = index.clamp(max=self._filled.shape[0] - 1)
        hit = inside & self._filled[rows]
        if fingerprint is not None:
            hit &= self._fingerprint[rows] == fingerprint.cpu()
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        features = self._features[rows].clone()
        features[~hit] = 0
        return features, hit

    def contains(self, index: int) -> bool:
        """Whether example `index` is cached (with any fingerprint)."""
        return 0 <= index < self._filled.shape[0] and bool(self._filled[index])

    def store(self, index: torch.Tensor, features: torch.Tensor, fingerprint: torch.Tensor | None = None) -> None:
        """Cache `features[i]` (float32, on CPU) for `index[i]`."""
        index = index.detach().cpu().long()
        if index.numel() == 0:
            return
        self._allocate(features.shape[1], int(index.max()) + 1)
        self._features[index] = features.detach().float().cpu()
        self._filled[index] = True
        if fingerprint is not None:
            self._fingerprint[index] = fingerprint.cpu()

    def clear(self) -> None:
        """Forget every entry (e.g. after the tower's weights changed)."""
        self._filled.zero_()
        self.hits = self.misses = 0


__all__ = ["CACHE_MODES", "FeatureCache", "token_fingerprints"]


def lock_towers(model: nn.Module, args: Any, *, num_samples: int | None, cacheable: bool = True, process_index: int = 0,
                num_processes: int = 1) -> dict[str, FeatureCache]:
    """Lock the towers named by `args.freeze_vision_tower` / `freeze_text_tower` (the model's `freeze_towers`, with
    `args.unfreeze_last_n`) and create a feature cache for each fully locked tower (`args.frozen_feature_cache`:
    memory or disk, a folder per process) when the model takes cached outputs (`cacheable` and a `forward` with
    `vision_pooled_output`: an `NLIPModel` dual encoder). Returns the caches by tower (`"vision"`, `"text"`)."""
    if not (args.freeze_vision_tower or args.freeze_text_tower):
        return {}
    if not hasattr(model, "freeze_towers"):
        raise TypeError(
            f"freeze_vision_tower / freeze_text_tower need an NLIP model (with `freeze_towers`); got {type(model).__name__}."
        )
    locked = model.freeze_towers(vision=args.freeze_vision_tower, text=args.freeze_text_tower,
                                 unfreeze_last_n=args.unfreeze_last_n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Locked %d tower parameter tensors; %d parameters train.", len(locked), trainable)
    frozen = model.frozen_tower_names()
    if args.frozen_feature_cache == "none" or not frozen:
        return {}
    if not cacheable or "vision_pooled_output" not in inspect.signature(model.forward).parameters:
        logger.info("Locked towers are not cached for %s (only an NLIPModel dual encoder takes cached tower outputs).",
                    type(model).__name__)
        return {}
    directory = args.feature_cache_dir if args.frozen_feature_cache == "disk" else None
    if directory is not None and num_processes > 1:
        directory = os.path.join(directory, f"process_{process_index}")
    caches = {}
    for tower in frozen:
        which = "vision" if tower == "vision_model" else "text"
        caches[which] = FeatureCache(which, num_samples=num_samples, directory=directory)
    logger.info("Caching the outputs of the locked %s tower(s) by dataset index (%s).", " and ".join(caches),
                args.frozen_feature_cache)
    return caches


@torch.no_grad()
def locked_tower_output(
    cache: FeatureCache,
    which: str,
    model: nn.Module,
    index: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The locked `which` tower's pooled outputs of the examples `index` (on the inputs' device) and which were
    cache hits: cached ones from `cache`, the others computed by `model`'s tower (eval mode, no gradient) and stored.
    Texts are fingerprinted by their token ids, so a changed caption is recomputed."""
    fingerprint = token_fingerprints(input_ids, attention_mask) if which == "text" else None
    features, hit = cache.lookup(index, fingerprint)
    missing = (~hit).nonzero().squeeze(1)
    if missing.numel():
        rows = missing.to(index.device)
        if which == "vision":
            outputs = model.vision_model(pixel_values=pixel_values[rows], return_dict=True)
            computed = pool_tower_output(outputs, model.config.vision_pooling)
        else:
            mask = attention_mask[rows]
            outputs = model._text_tower_outputs(input_ids[rows], mask, None, None)
            computed = pool_tower_output(outputs, model.config.text_pooling, mask)
        computed = computed.float()
        cache.store(index[rows], computed, None if fingerprint is None else fingerprint[missing])
        if features is None:
            features = torch.zeros(index.shape[0], computed.shape[1])
        features[missing] = computed.cpu()
    device = pixel_values.device if which == "vision" else input_ids.device
    return features.to(device), hit
