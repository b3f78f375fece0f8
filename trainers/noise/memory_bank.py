"""NPC's clean memory bank (step 1 of the paper's method; Zhang et al., "Negative Pre-aware for Noisy Cross-modal Matching",
AAAI 2024).

The clean set is the pairs with clean probability above a threshold. Every training sample gets two memory entries: the
clean pair whose image is nearest to its image, and the clean pair whose caption is nearest to its caption (cosine
similarity of normalised features). Nearest neighbours are found block by block (a chunk of queries × a chunk of clean
keys, keeping a running maximum), so N × C similarities are never held at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class MemoryBank:
    """Clean set and per-sample memory entries, as dataset positions (int64, CPU).

    Attributes:
        clean_indices: `[C]` positions of the clean pairs (`clean_prob > threshold`), ascending.
        image_neighbors: `[N]` for each sample, the position of the clean pair whose image feature is nearest to its
            image feature (its image-side memory entry).
        text_neighbors: `[N]` the same for caption (text) features (its text-side memory entry).
        threshold: the clean-probability threshold the clean set was selected with.
    """

    clean_indices: torch.Tensor
    image_neighbors: torch.Tensor
    text_neighbors: torch.Tensor
    threshold: float

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-compatible)."""
        return {
            "clean_indices": self.clean_indices,
            "image_neighbors": self.image_neighbors,
            "text_neighbors": self.text_neighbors,
            "threshold": torch.tensor([self.threshold], dtype=torch.float64),
        }

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing = {"clean_indices", "image_neighbors", "text_neighbors", "threshold"} - set(state_dict)
        if missing:
            raise ValueError(f"MemoryBank state_dict is missing {sorted(missing)}.")
        if state_dict["image_neighbors"].shape != state_dict["text_neighbors"].shape:
            raise ValueError("MemoryBank state_dict: `image_neighbors` and `text_neighbors` must have the same shape.")
        self.clean_indices = state_dict["clean_indices"].to("cpu", torch.int64)
        self.image_neighbors = state_dict["image_neighbors"].to("cpu", torch.int64)
        self.text_neighbors = state_dict["text_neighbors"].to("cpu", torch.int64)
        self.threshold = float(state_dict["threshold"].reshape(-1)[0])

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> MemoryBank:
        empty = torch.empty(0, dtype=torch.int64)
        bank = cls(clean_indices=empty, image_neighbors=empty, text_neighbors=empty, threshold=0.0)
        bank.load_state_dict(state_dict)
        return bank


@torch.no_grad()
def _nearest_clean(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    *,
    exclude_self: bool,
    chunk_size: int,
    key_chunk_size: int,
    device: torch.device,
    progress_bar: bool,
    desc: str,
) -> torch.Tensor:
    """For each query row, the position (from `key_positions`) of the key with the largest cosine similarity."""
    keys = F.normalize(keys.to(device=device, dtype=torch.float32), dim=-1)
    key_positions = key_positions.to(device)
    neighbors = torch.empty(queries.shape[0], dtype=torch.int64)
    # One reusable similarity buffer: fresh 64 MiB blocks cost page faults on CPU (about 40% of the time).
    buffer = torch.empty(min(chunk_size, queries.shape[0]) * min(key_chunk_size, keys.shape[0]), device=device)
    for start in tqdm(range(0, queries.shape[0], chunk_size), desc=desc, disable=not progress_bar):
        block = F.normalize(queries[start : start + chunk_size].to(device=device, dtype=torch.float32), dim=-1)
        best = torch.full((block.shape[0],), float("-inf"), device=device)
        best_position = torch.full((block.shape[0],), -1, dtype=torch.int64, device=device)
        for key_start in range(0, keys.shape[0], key_chunk_size):
            positions = key_positions[key_start : key_start + key_chunk_size]
            similarity = buffer[: block.shape[0] * positions.shape[0]].view(block.shape[0], positions.shape[0])
            torch.mm(block, keys[key_start : key_start + key_chunk_size].T, out=similarity)
            if exclude_self:  # a clean key inside this query block is the query at row `position - start`
                inside = torch.nonzero((positions >= start) & (positions < start + block.shape[0])).squeeze(1)
                similarity[positions[inside] - start, inside] = float("-inf")
            block_best, block_argmax = similarity.max(dim=1)
            better = block_best > best  # strict: on ties the earlier clean pair is kept, as argmax does
            best = torch.where(better, block_best, best)
            best_position = torch.where(better, positions[block_argmax], best_position)
        neighbors[start : start + block.shape[0]] = best_position.cpu()
    return neighbors


def build_memory_bank(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    clean_prob,
    *,
    threshold: float = 0.9,
    min_clean_fraction: float = 0.0,
    chunk_size: int = 4096,
    key_chunk_size: int | None = None,
    exclude_self: bool = True,
    device: torch.device | str | None = None,
    progress_bar: bool = True,
) -> MemoryBank:
    """Select the clean set (`clean_prob > threshold`) and each sample's nearest clean image and caption.

    Args:
        image_features, text_features: `[N, D]` features of all training pairs, row = dataset position (normalised
            here; any dtype, computed in float32).
        clean_prob: `[N]` clean probabilities (e.g. `NoiseEstimate.clean_prob`).
        threshold: pairs with `clean_prob > threshold` form the clean set (NPC uses 0.9).
        min_clean_fraction: when fewer than `⌊min_clean_fraction·N⌋` pairs pass the threshold, the clean set is that
            many pairs with the highest clean probabilities instead (only pairs with `clean_prob > 0`): a mixture that
            separates weakly leaves a handful of pairs above any high threshold, and a memory bank of a handful of
            pairs makes every sample's memory entries the same few pairs. 0 (default) keeps the threshold alone.
        chunk_size: queries per block; `key_chunk_size` (default `chunk_size`) clean keys per block. A block holds
            `chunk_size × key_chunk_size` float32 similarities (64 MiB at the defaults).
        exclude_self: a clean sample is not its own memory entry (default True). With it, a clean sample's memory
            entry would be itself, so NPC's before/after ratio would only measure fitting the sample itself and give
            it confidence 1 by construction; excluding it tests clean-set samples against another clean pair too.
            Needs at least 2 clean pairs.
        device: where to compute (e.g. "cuda" for CPU-held features); default the features' device.
        progress_bar: show a tqdm bar over query blocks.

    Raises:
        ValueError: when no pair (or, with `exclude_self`, fewer than two) passes the threshold — the caller decides
            the fallback (e.g. lower the threshold or skip NPC re-weighting this epoch).
    """
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            "`image_features` and `text_features` must be 2-D [N, D] with the same N; got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    num_samples = image_features.shape[0]
    clean_prob = torch.as_tensor(clean_prob).reshape(-1).cpu()
    if clean_prob.shape[0] != num_samples:
        raise ValueError(f"`clean_prob` must have one value per pair ({num_samples}); got {clean_prob.shape[0]}.")
    if chunk_size < 1 or (key_chunk_size is not None and key_chunk_size < 1):
        raise ValueError(f"`chunk_size`/`key_chunk_size` must be >= 1; got {chunk_size}/{key_chunk_size}.")
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        finite_rows = torch.isfinite(features).all(dim=1)
        if not bool(finite_rows.all()):
            rows = torch.nonzero(~finite_rows).squeeze(1)[:5].tolist()
            raise ValueError(f"`{name}` has non-finite values (first rows: {rows}); neighbours would be undefined.")
    if not 0.0 <= min_clean_fraction < 1.0:
        raise ValueError(f"`min_clean_fraction` must be in [0, 1); got {min_clean_fraction}.")
    clean_indices = torch.nonzero(clean_prob > threshold).squeeze(1)
    floor = min(int(min_clean_fraction * num_samples), int((clean_prob > 0).sum()))
    if clean_indices.numel() < floor:
        clean_indices = clean_prob.topk(floor).indices.sort().values
    needed = 2 if exclude_self else 1
    if clean_indices.numel() < needed:
        raise ValueError(
            f"The clean set has {clean_indices.numel()} pair(s) with clean_prob > threshold={threshold} (max "
            f"clean_prob {float(clean_prob.max()) if num_samples else float('nan'):.4f}); building the memory bank "
            f"needs at least {needed}{' with exclude_self=True' if exclude_self else ''}. Lower `threshold`."
        )
    device = torch.device(device) if device is not None else image_features.device
    options = dict(
        exclude_self=exclude_self,
        chunk_size=chunk_size,
        key_chunk_size=key_chunk_size or chunk_size,
        device=device,
        progress_bar=progress_bar,
    )
    key_indices = clean_indices.to(image_features.device)
    image_neighbors = _nearest_clean(
        image_features, image_features[key_indices], clean_indices, desc="Memory bank (images)", **options
    )
    text_neighbors = _nearest_clean(
        text_features,
        text_features[key_indices.to(text_features.device)],
        clean_indices,
        desc="Memory bank (texts)",
        **options,
    )
    return MemoryBank(
        clean_indices=clean_indices,
        image_neighbors=image_neighbors,
        text_neighbors=text_neighbors,
        threshold=float(threshold),
    )
