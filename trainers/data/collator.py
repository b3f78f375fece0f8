"""Batch image-text examples into model inputs: RGB images, one caption per image, padded token ids, stable indices."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .pairs import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EMPTY_CAPTION,
    LOST_COLUMN,
    TRUNCATED_SHARD,
    InvalidPairError,
    SkipReport,
    check_max_image_pixels,
    decode_image,
    image_key,
    non_empty_captions,
    to_rgb,
)

# Batch key of the pairs a batch skipped (`SkipReport.to_dict()`): how the counts get out of DataLoader workers.
SKIPPED_KEY = "skipped_pairs"


def is_empty_batch(batch: Any) -> bool:
    """Whether a collated batch kept no pair (every example was invalid): the trainer skips and counts it."""
    return isinstance(batch, dict) and "pixel_values" not in batch and SKIPPED_KEY in batch


@dataclass
class ImageTextCollator:
    """`DataLoader` collate function for `image`/`text`/`index` examples (see `trainers.data.pairs`).

    Returns `pixel_values`, `input_ids`, `attention_mask` and `index` (LongTensor), plus, when the examples carry
    them, `is_noisy` (BoolTensor), `synthetic_input_ids`/`synthetic_attention_mask` (from a `synthetic_text` column;
    an example whose synthetic caption is None or empty gets its own caption instead) and `concepts` (list of lists of
    str).

    Images may be PIL images or undecoded `{"bytes", "path"}` dicts (streaming datasets); transparent images are
    composited onto white. When `text` holds several captions, one non-empty caption is taken: the first, or a random
    one. A random pick is a function of `(seed, epoch, index)` alone: the same in every worker layout and process, and
    after a resume from a checkpoint, yet different each epoch (`set_epoch`, which `NLIPTrainer` calls at every epoch
    start, like a sampler's; the epoch lives in shared memory, so `persistent_workers` see it too). Examples with a
    missing/undecodable image, more than `max_image_pixels` pixels or no caption are skipped and counted in
    `skip_report` (per worker process when `num_workers > 0`) and in the batch's `skipped_pairs` entry
    (`SkipReport.to_dict()`; only when something was skipped), which is how `NLIPTrainer` counts them across workers
    and processes; with `strict=True` they raise `InvalidPairError` naming the file. Truncated-shard marker rows of a
    streaming webdataset (`lost_samples` > 0) are counted, never batched. A batch with no valid pair left is returned as
    `{"skipped_pairs": ...}` alone (`is_empty_batch`), which the trainer skips, instead of failing the run.

    Args:
        processor: called as `processor(images=..., text=..., padding=..., truncation=..., max_length=...,
            return_tensors="pt")`, with a `.tokenizer` for the synthetic captions (`CLIPProcessor`, `NLIPProcessor`).
        max_length: token limit (None: the tokenizer's `model_max_length`).
    """

    processor: Any
    max_length: int | None = None
    padding: bool | str = True
    truncation: bool = True
    caption_choice: Literal["random", "first"] = "random"
    seed: int = 0
    strict: bool = False
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    skip_report: SkipReport = field(default_factory=SkipReport)
    # Set by NLIPTrainer when a locked image tower's outputs are cached and nothing else reads the pixels: examples
    # whose index it returns True for are not decoded; their rows of `pixel_values` are zeros (all-cached batches get
    # a [B, 3, 1, 1] placeholder).
    is_image_cached: Callable[[int], bool] | None = field(default=None, repr=False, compare=False)
    # A shared-memory scalar: DataLoader workers, persistent ones included, read the epoch the trainer last set.
    _epoch: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.caption_choice not in ("random", "first"):
            raise ValueError(f"caption_choice must be 'random' or 'first', got {self.caption_choice!r}.")
        self.max_image_pixels = check_max_image_pixels(self.max_image_pixels)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch whose random captions are drawn (0 until `set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the random captions of `epoch` from now on, in this process and in every DataLoader worker."""
        self._epoch.share_memory_()  # a deep copy of the collator holds a private tensor: share it before workers start
        self._epoch.fill_(epoch)

    def _pick_caption(self, captions: list[str], index: int) -> str:
        if self.caption_choice == "first" or len(captions) == 1:
            return captions[0]
        # A string seed is hashed with SHA-512: stable across processes (unlike `hash()` of a tuple).
        return random.Random(f"{self.seed}/{self.epoch}/{index}").choice(captions)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask of `texts`, padded and truncated as the batches' captions are."""
        return self.processor.tokenizer(
            texts, padding=self.padding, truncation=self.truncation, max_length=self.max_length, return_tensors="pt"
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        images, texts, kept = [], [], []
        skipped = SkipReport()
        for example in examples:
            if "index" not in example:
                raise ValueError(
                    f"Example has no 'index' column (columns: {sorted(example)}); prepare the dataset with "
                    "trainers.data.pairs.prepare_pairs or one of the trainers.data.pairs loaders."
                )
            if example.get(LOST_COLUMN):
                if self.strict:
                    raise InvalidPairError(example["text"])
                for report in (self.skip_report, skipped):
                    report.add_count(TRUNCATED_SHARD, example[LOST_COLUMN], file=example["key"])
                continue
            key = example.get("key") or image_key(example.get("image"), fallback=f"index {example['index']}")
            if self.is_image_cached is not None and self.is_image_cached(int(example["index"])):
                image, reason, detail = None, None, None  # decoded (and valid) when it was first seen
            else:
                image, reason, detail = decode_image(example.get("image"), self.max_image_pixels)
            captions = non_empty_captions(example.get("text"))
            if reason is None and not captions:
                reason, detail = EMPTY_CAPTION, f"caption {example.get('text')!r}"
            if reason is not None:
                if self.strict:
                    raise InvalidPairError(f"Invalid image-text pair {key}: {reason} ({detail}).")
                self.skip_report.add(key, reason, detail)
                file = image_key(example.get("image"), fallback="") or example.get("key")
                skipped.add_count(reason, 1, file=None if reason == EMPTY_CAPTION else file)  # logged once, above
                continue
            images.append(None if image is None else to_rgb(image))
            texts.append(self._pick_caption(captions, int(example["index"])))
            kept.append(example)
        if not kept:
            return {SKIPPED_KEY: skipped.to_dict()}

        decoded = [image for image in images if image is not None]
        encoded = self.processor(
            **({"images": decoded} if decoded else {}),
            text=texts,
            padding=self.padding,
            truncation=self.truncation,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch: dict[str, Any] = {
            "pixel_values": _with_placeholders(encoded.get("pixel_values"), [image is not None for image in images]),
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "index": torch.tensor([int(example["index"]) for example in kept], dtype=torch.long),
        }
        if "is_noisy" in kept[0]:
            batch["is_noisy"] = torch.tensor([bool(example["is_noisy"]) for example in kept], dtype=torch.bool)
        if "synthetic_text" in kept[0]:
            synthetic = [
                (non_empty_captions(ex["synthetic_text"]) or [text])[0] for ex, text in zip(kept, texts, strict=True)
            ]
            synthetic_encoded = self.tokenize(synthetic)
            batch["synthetic_input_ids"] = synthetic_encoded["input_ids"]
            batch["synthetic_attention_mask"] = synthetic_encoded["attention_mask"]
        if "concepts" in kept[0]:
            batch["concepts"] = [list(example["concepts"] or []) for example in kept]
        if skipped.skipped:
            batch[SKIPPED_KEY] = skipped.to_dict()
        return batch


def _with_placeholders(pixel_values: torch.Tensor | None, decoded: list[bool]) -> torch.Tensor:
    """`pixel_values` of the decoded examples, with zero rows where an example's image was not decoded."""
    if all(decoded):
        return pixel_values
    shape = (3, 1, 1) if pixel_values is None else tuple(pixel_values.shape[1:])
    dtype = torch.float32 if pixel_values is None else pixel_values.dtype
    batch = torch.zeros((len(decoded), *shape), dtype=dtype)
    if pixel_values is not None:
        batch[torch.tensor(decoded)] = pixel_values
    return batch
