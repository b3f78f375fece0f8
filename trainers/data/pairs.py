"""Turn the image-text data users have into training-ready `datasets` with `image`, `text` and `index` columns.

Three inputs are supported: an `imagefolder` directory with `metadata.jsonl`/`metadata.csv` captions, img2dataset-style
`webdataset` tar shards (map-style or streaming, local or any fsspec URL; `trainers.data.shards`), and an in-memory
`datasets.Dataset`. Broken pairs (missing or undecodable image, an image over `max_image_pixels`, empty caption, an
imagefolder image without a metadata row, samples lost in a truncated shard) are skipped and counted by reason, with
the broken files, in a `SkipReport` by default, or raise an `InvalidPairError` naming the file with `strict=True`, so
that a bad file never surfaces as a crash deep inside a DataLoader worker. Metadata that is not UTF-8 raises a
`MetadataError` naming the file, line and column; data in which every pair is invalid raises at once.

Map-style datasets are validated once, up front, by a decoding pass (cached by `datasets` for file-backed data). A
streaming dataset cannot be validated ahead of time: its `image` column stays undecoded (`Image(decode=False)`, dicts
with `bytes`/`path`) and `ImageTextCollator` decodes, skips and counts at batch time.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image

from .shards import (
    ShardError,
    is_pipe,
    is_remote,
    iter_shard_samples,
    resolve_shards,
    shard_name,
    shard_offset,
    sidecar_count,
)

logger = logging.getLogger(__name__)

MISSING_IMAGE = "missing image"
UNDECODABLE_IMAGE = "undecodable image"
EMPTY_CAPTION = "empty caption"
TOO_MANY_PIXELS = "image over the pixel limit"
TRUNCATED_SHARD = "lost in a truncated shard"
UNLISTED_IMAGE = "image without a metadata row"

# Images with more pixels than this are skipped and counted (`max_image_pixels` of the loaders and the collator;
# `--max_image_pixels`). 64 Mpx (8192 x 8192) decodes to 192 MB of RGB; Pillow's own limit is 89.5 Mpx (a warning) and
# 179 Mpx (an error). Web crawls rarely hold larger images, and training resizes to a few hundred pixels anyway.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# The most broken file paths a SkipReport keeps (all are counted).
MAX_LISTED_FILES = 1000

# How many skipped pairs are logged one by one (and kept in `SkipReport.examples`) before only the counts are updated.
MAX_LOGGED_SKIPS = 20

AnyPairs = datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict

_REASON_COLUMN = "_skip_reason"
# The fallback keys of pairs without a file name ("row 12", "index 7"): not listed as broken files.
_ROW_KEY = re.compile(r"^(row|index) -?\d+$")
_KEY_COLUMN = "_skip_key"


class InvalidPairError(ValueError):
    """An image-text pair is unusable (missing/undecodable image or empty caption) and `strict=True` was asked for."""


@dataclass
class SkipReport:
    """Counts of skipped image-text pairs by reason; the first `(key or file name, reason)` are kept for the log."""

    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    # The broken files (unreadable images, images without a metadata row, truncated shards), first MAX_LISTED_FILES.
    files: list[str] = field(default_factory=list)
    # Per split, when a loader read several (the report itself holds their sum).
    splits: dict[str, SkipReport] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def _add_file(self, file: str | None) -> None:
        if file and len(self.files) < MAX_LISTED_FILES and file not in self.files:
            self.files.append(file)

    def add(self, key: str, reason: str, detail: str = "", file: str | None = None) -> None:
        """Count one skipped pair; log it (with `detail`, e.g. the decoder's error) if among the first few. `file`: the
        broken file to list (default: `key` for an unreadable image)."""
        self.reasons[reason] += 1
        if file is None and reason in (MISSING_IMAGE, UNDECODABLE_IMAGE, TOO_MANY_PIXELS) and not _ROW_KEY.match(key):
            file = key
        self._add_file(file)
        if len(self.examples) < MAX_LOGGED_SKIPS:
            self.examples.append((key, reason))
            logger.warning("Skipping image-text pair %s: %s%s", key, reason, f" ({detail})" if detail else "")
        elif len(self.examples) == MAX_LOGGED_SKIPS and self.skipped == MAX_LOGGED_SKIPS + 1:
            logger.warning("More than %d pairs skipped; further skips are only counted.", MAX_LOGGED_SKIPS)

    def add_count(self, reason: str, count: int, file: str | None = None) -> None:
        """Count `count` pairs lost at once (e.g. the rest of a truncated shard, logged by its reader)."""
        if count > 0:
            self.reasons[reason] += int(count)
            self._add_file(file)

    def update(self, other: SkipReport | Mapping[str, Any]) -> None:
        """Add another report's counts (and as many of its examples and files as fit) to this one; `other` may also
        be a `to_dict()` mapping (as the collator passes skips out of DataLoader workers)."""
        if isinstance(other, Mapping):
            other = SkipReport.from_dict(other)
        self.reasons.update(other.reasons)
        self.examples.extend(other.examples[: max(0, MAX_LOGGED_SKIPS - len(self.examples))])
        for file in other.files:
            self._add_file(file)

    def to_dict(self) -> dict[str, Any]:
        """`{reason: count, ..., "files": [broken file paths]}` (JSON-serialisable; what summaries record)."""
        return {**{reason: int(count) for reason, count in sorted(self.reasons.items())}, "files": list(self.files)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkipReport:
        report = cls(reasons=Counter({k: int(v) for k, v in data.items() if k != "files"}))
        for file in data.get("files", []):
            report._add_file(file)
        return report

    def __str__(self) -> str:
        if not self.skipped:
            return "no image-text pairs skipped"
        by_reason = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        return f"{self.skipped} image-text pairs skipped ({by_reason})"


# ----------------------------------------------------------------------------------------------------- pair checks


def column_values(dataset: datasets.Dataset, column: str) -> list:
    """A column as a Python list, read in one batch (`dataset[column]` is a lazy `Column` that formats row by row)."""
    return dataset.select_columns([column])[:][column]


def dataset_rows(dataset: Sequence, rows: Sequence[int]) -> list:
    """The examples at `rows`, in one batched read where the dataset offers one (`__getitems__`, as `DataLoader` uses:
    a `datasets.Dataset` then takes every row in one Arrow call instead of formatting them one by one)."""
    rows = [int(row) for row in rows]
    read_batch = getattr(dataset, "__getitems__", None)
    return read_batch(rows) if read_batch is not None else [dataset[row] for row in rows]


def image_key(value: Any, fallback: str) -> str:
    """The file name (or `shard.tar/key.ext` for webdataset) an image value came from, for error messages."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    if isinstance(value, str):
        return value
    filename = getattr(value, "filename", "")
    return filename or fallback


def _open_image(value: str | dict) -> PIL.Image.Image:
    """Open (lazily: the header only) an image given as a path or a `{"bytes", "path"}` dict."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if value.get("bytes") is not None:
        return PIL.Image.open(io.BytesIO(value["bytes"]))
    path = value["path"]
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as file:
            return PIL.Image.open(io.BytesIO(file.read()))
    return PIL.Image.open(path)


def check_max_image_pixels(max_image_pixels: int | None) -> int | None:
    """Validate a pixel limit (None or 0: no limit of ours) and raise Pillow's own limit to it if it is above."""
    if max_image_pixels is None or max_image_pixels == 0:
        return None
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 0:
        raise ValueError(f"max_image_pixels must be a positive integer (or 0/None: no limit), got {max_image_pixels!r}.")
    if PIL.Image.MAX_IMAGE_PIXELS is not None and max_image_pixels > PIL.Image.MAX_IMAGE_PIXELS:
        PIL.Image.MAX_IMAGE_PIXELS = max_image_pixels  # Pillow errors at twice its limit: ours decides instead
    return max_image_pixels


def decode_image(
    value: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[PIL.Image.Image | None, str | None, str]:
    """Decode an image given as a PIL image, a path, or a `{"bytes", "path"}` dict.

    Returns `(image, None, "")` on success and `(None, reason, detail)` when the image is missing, cannot be decoded or
    has more than `max_pixels` pixels (checked from the header, before decoding; None: no limit), so that callers
    decide whether to skip or raise.
    """
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and not value.get("path")):
        return None, MISSING_IMAGE, "no image data"
    if isinstance(value, PIL.Image.Image):
        image = value
    else:
        try:
            with warnings.catch_warnings():
                if max_pixels is not None:  # our limit decides: no DecompressionBombWarning from Pillow
                    warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                image = _open_image(value)
        except FileNotFoundError as err:
            return None, MISSING_IMAGE, str(err)
        except PIL.Image.DecompressionBombError as err:
            return None, TOO_MANY_PIXELS, str(err)
        except Exception as err:  # UnidentifiedImageError, OSError, ...
            return None, UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}"
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        return None, TOO_MANY_PIXELS, f"{width}x{height} = {width * height:,} pixels > max_image_pixels {max_pixels:,}"
    if image is value:
        return image, None, ""
    try:
        image.load()
    except Exception as err:  # Pillow raises many types: OSError (truncated), SyntaxError, ValueError, ...
        return None, UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}"
    return image, None, ""


def images_left_encoded(dataset: Any, column: str = "image") -> Any:
    """`dataset` with its `datasets.Image` column left encoded (`{"bytes", "path"}` dicts, which `decode_image`
    reads), so that a collator decodes only the images it needs; any other dataset is returned as it is."""
    features = getattr(dataset, "features", None)
    feature = features.get(column) if features else None
    if not isinstance(feature, datasets.Image) or not feature.decode:
        return dataset
    return dataset.cast_column(column, datasets.Image(decode=False))


def non_empty_captions(text: Any) -> list[str]:
    """The captions of a `text` value (a str or a list of str) that are non-empty after stripping whitespace."""
    captions = text if isinstance(text, (list, tuple)) else [text]
    return [caption for caption in captions if isinstance(caption, str) and caption.strip()]


def to_rgb(image: PIL.Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> PIL.Image.Image:
    """Convert to RGB, compositing transparent images onto `background` (a plain `convert("RGB")` turns clip-art's
    transparent background black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _pair_problems(
    batch: dict[str, list],
    indices: list[int],
    image_column: str,
    text_column: str,
    key_column: str | None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    first_row: int = 0,
) -> dict:
    """`datasets.map` function: the skip reason ('' when fine) and the key of every pair of a batch (`first_row`: the
    row number, in the whole dataset, of the mapped part's first row)."""
    reasons, keys = [], []
    for row, (image, text) in enumerate(zip(batch[image_column], batch[text_column], strict=True)):
        key = str(batch[key_column][row]) if key_column else image_key(image, fallback=f"row {first_row + indices[row]}")
        _, reason, detail = decode_image(image, max_pixels)
        if reason is None and not non_empty_captions(text):
            reason, detail = EMPTY_CAPTION, f"caption {text!r}"
        reasons.append(f"{reason}\t{detail}" if reason else "")
        keys.append(key)
    return {_REASON_COLUMN: reasons, _KEY_COLUMN: keys}


def validate_pairs(
    dataset: datasets.Dataset,
    *,
    image_column: str = "image",
    text_column: str = "text",
    key_column: str | None = None,
    strict: bool = False,
    num_proc: int | None = None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    source: str = "The dataset",
    limit: int | None = None,
) -> tuple[datasets.Dataset, SkipReport]:
    """Decode every image once and drop the pairs with a missing/undecodable image, more than `max_image_pixels`
    pixels (checked before decoding) or an empty caption. When no pair is left, an `InvalidPairError` says so, naming
    `source` and the reasons.

    The check is a `datasets.map` that writes only the reasons (cached for file-backed data, so a later run re-reads
    the answer instead of re-decoding; its progress bar follows `datasets.disable_progress_bars()`). Rows are keyed by
    `key_column` when given, else by the image's path (or row number). With `strict=True` the first bad pair raises
    an `InvalidPairError` naming its file. With `limit`, the first `limit` valid pairs are returned and only the rows
    up to the last of them are checked (and counted in the report): the rows still needed are checked, in order,
    until enough pass or the dataset ends.
    """
    checked = dataset.cast_column(image_column, datasets.Image(decode=False))
    wanted = len(dataset) if limit is None else min(limit, len(dataset))
    reasons: list[str] = []
    keys: list[str] = []
    while len(reasons) < len(dataset):
        valid = len(reasons) - sum(map(bool, reasons))
        if valid >= wanted:
            break
        first, stop = len(reasons), min(len(dataset), len(reasons) + wanted - valid)
        part = checked if (first, stop) == (0, len(dataset)) else checked.select(range(first, stop))
        problems = part.map(
            _pair_problems,
            batched=True,
            batch_size=64,
            with_indices=True,
            fn_kwargs={
                "image_column": image_column,
                "text_column": text_column,
                "key_column": key_column,
                "max_pixels": check_max_image_pixels(max_image_pixels),
                "first_row": first,
            },
            remove_columns=checked.column_names,
            num_proc=num_proc,
            desc="Checking image-text pairs",
        )
        reasons += column_values(problems, _REASON_COLUMN)
        keys += column_values(problems, _KEY_COLUMN)
    report = SkipReport()
    bad = [row for row, reason in enumerate(reasons) if reason]
    if not bad:
        return (dataset if len(reasons) == len(dataset) else dataset.select(range(len(reasons)))), report
    if strict:
        reason, detail = reasons[bad[0]].split("\t", 1)
        raise InvalidPairError(
            f"Invalid image-text pair {keys[bad[0]]}: {reason} ({detail}); {len(bad)} of {len(reasons)} pairs are "
            "invalid. Fix or remove them, or pass strict=False to skip them."
        )
    for row in bad:
        reason, detail = reasons[row].split("\t", 1)
        report.add(keys[row], reason, detail)
    logger.warning("%s out of %d.", report, len(reasons))
    if len(bad) == len(reasons):
        raise InvalidPairError(
            f"{source}: every one of its {len(reasons)} image-text pairs is invalid ({report}); first: "
            f"{report.examples[0][0]}. Check the image files and the caption column."
        )
    bad_rows = set(bad)
    return dataset.select([row for row in range(len(reasons)) if row not in bad_rows]), report


def split_limit(max_samples_per_split: int | Mapping[str, int | None] | None, split: str) -> int | None:
    """The most examples of `split` to build: `max_samples_per_split` itself, or its entry for `split` when it is a
    mapping (a split it does not name is not limited). 0 means the split is not built at all."""
    if isinstance(max_samples_per_split, Mapping):
        return max_samples_per_split.get(split)
    return max_samples_per_split


def add_index(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add (or replace) the int64 `index` column 0..N-1 in dataset order: the stable id of per-sample state."""
    if "index" in dataset.column_names:
        logger.info("Replacing the existing 'index' column with 0..N-1.")
        dataset = dataset.remove_columns("index")
    return dataset.add_column("index", np.arange(len(dataset), dtype=np.int64), feature=datasets.Value("int64"))


def _check_columns(dataset: datasets.Dataset | datasets.IterableDataset, required: Sequence[str], what: str) -> None:
    """Raise a ValueError naming the first missing column and the columns that are present."""
    present = list(dataset.column_names or [])
    for column in required:
        if column not in present:
            raise ValueError(f"{what} has no column {column!r}; columns present: {present}.")


def _finish(
    dataset: datasets.Dataset,
    report: SkipReport,
    *,
    validate: bool,
    strict: bool,
    key_column: str | None,
    num_proc: int | None,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    source: str = "The dataset",
    split: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Validate (updating `report`, and `report.splits[split]`) and index a map-style dataset already holding `image`
    and `text` columns; `limit`: keep its first `limit` valid pairs, checking no row beyond them."""
    if limit is not None and not validate:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if validate:
        dataset, split_report = validate_pairs(
            dataset, key_column=key_column, strict=strict, num_proc=num_proc, max_image_pixels=max_image_pixels,
            source=source, limit=limit,
        )
        report.update(split_report)
        if split is not None:
            report.splits.setdefault(split, SkipReport()).update(split_report)
    return add_index(dataset)


def prepare_pairs(
    dataset: datasets.Dataset,
    *,
    image_column: str = "image",
    text_column: str = "text",
    validate: bool = True,
    strict: bool = False,
    num_proc: int | None = None,
    return_report: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> datasets.Dataset | tuple[datasets.Dataset, SkipReport]:
    """Make an in-memory (or any map-style) `datasets.Dataset` training-ready.

    Renames `image_column`/`text_column` to `image`/`text` (a column of paths becomes an `Image` feature), skips and
    counts broken pairs (`strict=True`: raise instead), and adds `index`. With `return_report=True` also returns the
    `SkipReport`.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"prepare_pairs expects a map-style datasets.Dataset, got {type(dataset).__name__}.")
    _check_columns(dataset, [image_column, text_column], "The dataset")
    for source, target in ((image_column, "image"), (text_column, "text")):
        if source != target:
            if target in dataset.column_names:
                raise ValueError(
                    f"Cannot rename column {source!r} to {target!r}: the dataset already has a {target!r} column."
                )
            dataset = dataset.rename_column(source, target)
    image_feature = dataset.features["image"]
    if isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string"):
        dataset = dataset.cast_column("image", datasets.Image())
    elif not isinstance(image_feature, datasets.Image):
        raise TypeError(
            f"Column {image_column!r} must hold images (a datasets.Image feature) or image file paths (strings), "
            f"got feature {image_feature}."
        )
    report = SkipReport()
    dataset = _finish(dataset, report, validate=validate, strict=strict, key_column=None, num_proc=num_proc,
                      max_image_pixels=max_image_pixels)
    return (dataset, report) if return_report else dataset


# ---------------------------------------------------------------------------------------------------- imagefolder


def _group_captions_by_image(dataset: datasets.Dataset) -> datasets.Dataset:
    """Merge rows that name the same image file (a CSV with one row per caption) into one row with a list of captions.

    The other columns keep the values of the image's first row. Datasets without repeated files are returned as is.
    """
    images = column_values(dataset.cast_column("image", datasets.Image(decode=False)), "image")
    paths = [image_key(value, fallback=f"row {row}") for row, value in enumerate(images)]
    first_row: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    for row, (path, text) in enumerate(zip(paths, column_values(dataset, "text"), strict=True)):
        first_row.setdefault(path, row)
        captions.setdefault(path, []).extend(text if isinstance(text, list) else [text])
    if len(first_row) == len(paths):
        return dataset
    grouped = dataset.select(list(first_row.values())).remove_columns("text")
    texts = [captions[path] for path in first_row]
    return grouped.add_column("text", texts, feature=datasets.List(datasets.Value("string")))


class MetadataError(ValueError):
    """An imagefolder's `metadata.jsonl` / `metadata.csv` cannot be read; the message names the file and line."""


def _metadata_file_names(path: str) -> list[str]:
    """The `file_name` entries of an imagefolder metadata file (relative to its folder), after checking that it is
    UTF-8 (and, for JSON lines, valid JSON): a `MetadataError` names the file, the line and what was found."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise MetadataError(
            f"{path}: line {line}, column {column} is not UTF-8 (byte 0x{data[error.start]:02x}); imagefolder "
            "metadata must be UTF-8. Re-encode the file, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    names: list[str] = []
    if path.endswith(".jsonl"):
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise MetadataError(f"{path}: line {line_number} is not valid JSON ({error}).") from None
            if not isinstance(row, dict):
                raise MetadataError(f"{path}: line {line_number} must be a JSON object, got {type(row).__name__}.")
            if isinstance(row.get("file_name"), str):
                names.append(row["file_name"])
    else:
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            if isinstance(row.get("file_name"), str):
                names.append(row["file_name"])
    return names


def _check_imagefolder(data_dir: str) -> tuple[list[str], list[str]]:
    """Check every metadata file of an imagefolder (see `_metadata_file_names`); return the metadata files and the
    image files that no metadata row lists (`imagefolder` leaves those out without a word)."""
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    extensions = {ext.lower() for ext in IMAGE_EXTENSIONS}
    metadata_files, images, listed = [], [], set()
    for root, _, files in os.walk(data_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name in ("metadata.jsonl", "metadata.csv"):
                metadata_files.append(path)
                listed.update(os.path.normpath(os.path.join(root, entry)) for entry in _metadata_file_names(path))
            elif os.path.splitext(name)[1].lower() in extensions:
                images.append(os.path.normpath(path))
    unlisted = [path for path in sorted(images) if path not in listed] if metadata_files else []
    return metadata_files, unlisted


def load_imagefolder_pairs(
    data_dir: str | os.PathLike,
    *,
    caption_column: str = "text",
    split: str | None = None,
    validate: bool = True,
    strict: bool = False,
    num_proc: int | None = None,
    return_report: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    max_samples_per_split: int | Mapping[str, int | None] | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict | tuple[datasets.Dataset | datasets.DatasetDict, SkipReport]:
    """Load an `imagefolder` directory with `metadata.jsonl`/`metadata.csv` captions as image-text pairs.

    Several captions per image: a list column in `metadata.jsonl`, or repeated `file_name` rows in `metadata.csv`
    (merged into a list). Splits come from sub-folders (`train/`, `test/`, ...) as in `datasets`; `split=None` returns
    a `DatasetDict`. Broken pairs are skipped and counted (`strict=True`: raise), and `index` is added per split.
    Image files that no metadata row lists are counted (`UNLISTED_IMAGE`, with their paths; `strict=True`: raise),
    and metadata that is not UTF-8 (or not JSON, for `.jsonl`) raises a `MetadataError` naming the file and line.
    `max_samples_per_split` (one limit, or `{split: limit}`; see `split_limit`) keeps each split's first valid pairs
    and decodes no image beyond them (the metadata is still read whole). `load_kwargs` go to `datasets.load_dataset`.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory.")
    _, unlisted = _check_imagefolder(str(data_dir))
    if unlisted and strict:
        raise InvalidPairError(
            f"{len(unlisted)} images in {str(data_dir)!r} have no metadata row (first: {unlisted[0]}); add rows for "
            "them or pass strict=False to leave them out (counted)."
        )
    loaded = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split=split, **load_kwargs)
    report = SkipReport()
    names = list(loaded) if isinstance(loaded, datasets.DatasetDict) else [split or "train"]
    aliases = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
    for path in unlisted:
        report.add(path, UNLISTED_IMAGE, file=path)
        top = os.path.relpath(path, data_dir).split(os.sep)[0].lower()
        owner = top if top in names else aliases.get(top) if aliases.get(top) in names else \
            names[0] if len(names) == 1 else "train"
        report.splits.setdefault(owner, SkipReport()).add_count(UNLISTED_IMAGE, 1, file=path)
    if unlisted:
        logger.warning("%d images in %s have no metadata row and are left out (first: %s).", len(unlisted),
                       data_dir, unlisted[0])

    def prepare(dataset: datasets.Dataset, name: str | None) -> datasets.Dataset:
        source = f"The imagefolder {str(data_dir)!r}" + (f" (split {name!r})" if name else "")
        _check_columns(dataset, ["image", caption_column], f"The imagefolder metadata in {str(data_dir)!r}")
        if caption_column != "text":
            if "text" in dataset.column_names:
                dataset = dataset.remove_columns("text")
            dataset = dataset.rename_column(caption_column, "text")
        dataset = _group_captions_by_image(dataset)
        return _finish(dataset, report, validate=validate, strict=strict, key_column=None, num_proc=num_proc,
                       max_image_pixels=max_image_pixels, source=source, split=name,
                       limit=split_limit(max_samples_per_split, name or "train"))

    if isinstance(loaded, datasets.DatasetDict):
        result = datasets.DatasetDict({name: prepare(dataset, name) for name, dataset in loaded.items()})
    else:
        result = prepare(loaded, split)
    return (result, report) if return_report else result


# ------------------------------------------------------------------------------------------------------ webdataset

# Column of webdataset rows that marks a truncated shard's lost samples (a marker row, not a pair: index -1).
LOST_COLUMN = "lost_samples"
# Prefix of `IterableDataset.info.description` that records the shard list of a streaming webdataset (what the
# trainer fingerprints a stream by).
STREAM_DESCRIPTION_PREFIX = "nlip-webdataset-stream:"


def _caption_from_fields(fields: dict[str, bytes | None], caption_keys: Sequence[str]) -> str | None:
    """The first caption found among `caption_keys`: a `.txt` file's text or a `.json` file's "caption" field."""
    for extension in caption_keys:
        data = fields.get(extension)
        if data is None:
            continue
        try:
            text = data.decode("utf-8")
            if extension in ("json", "jsn"):
                text = json.loads(text).get("caption")
        except (UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(text, str):
            return text
    return None


def _lost_marker(shard: str, lost: int, problem: str) -> dict[str, Any]:
    return {"image": None, "text": problem, "key": shard, "index": -1, LOST_COLUMN: lost}


def _generate_webdataset_pairs(
    shards: list[str],
    shard_ids: list[int],
    all_shards: tuple[str, ...],
    image_keys: tuple[str, ...],
    caption_keys: tuple[str, ...],
    strict: bool,
    stable_index: bool,
    signature: str,
    resample_seed: int | None = None,
) -> Iterator[dict[str, Any]]:
    """`from_generator` body: one row per sample, read in one sequential pass per shard (no pre-scan).

    With `stable_index` (streaming) `index` = the shard's offset (the sample count of the shards before it in
    `all_shards`: sidecar counts or header scans, done lazily and cached, only for the shards before the ones this
    worker reads) + the sample's position in its shard. A truncated shard adds a marker row (`LOST_COLUMN` = samples
    lost, index -1) that the collator / loader count. `signature` (file sizes and modification times) only makes
    `datasets`' cache fingerprint change with the files. With `resample_seed`, shards are drawn with replacement from
    all the shards, forever, by a generator seeded with the seed and the worker's first shard (deterministic: a resume
    replays it).
    """
    order = zip(shards, shard_ids, strict=True)
    if resample_seed is not None and shard_ids:
        # `datasets` runs this generator once per shard of a worker; the first run never ends. Its generator is seeded
        # by that shard (distinct for every worker of every process) and draws from all the shards.
        rng = random.Random(f"{resample_seed}/{shard_ids[0]}")
        everything = list(zip(all_shards, range(len(all_shards))))
        order = (rng.choice(everything) for _ in itertools.count())
    for shard, shard_id in order:
        name = shard_name(shard)
        losses: list[tuple[int, str]] = []
        try:
            offset = shard_offset(all_shards, shard_id, strict) if stable_index else 0
            expected = sidecar_count(shard) if stable_index else None
            samples = iter_shard_samples(
                shard, strict=strict, expected=expected, on_loss=lambda lost, problem: losses.append((lost, problem)),
                warn=stable_index,
            )
            for position, (key, fields) in enumerate(samples):
                if expected is not None and position >= expected:
                    logger.warning("Webdataset shard %s has more samples than its sidecar count %d; the rest are not "
                                   "read (their indices would collide with the next shard's).", shard, expected)
                    break
                extension = next((ext for ext in image_keys if fields.get(ext) is not None), None)
                yield {
                    "image": {"bytes": fields[extension], "path": f"{name}/{key}.{extension}"} if extension else None,
                    "text": _caption_from_fields(fields, caption_keys),
                    "key": f"{name}/{key}",
                    "index": offset + position,
                    LOST_COLUMN: 0,
                }
        except ShardError as error:
            raise InvalidPairError(str(error)) from None
        for lost, problem in losses:
            yield _lost_marker(shard, lost, problem)


_WEBDATASET_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "text": datasets.Value("string"),
        "key": datasets.Value("string"),
        "index": datasets.Value("int64"),
        LOST_COLUMN: datasets.Value("int64"),
    }
)


def _signature(shards: list[str]) -> str:
    """Sizes and modification times (ETags for URLs) of the shards, for `datasets`' cache fingerprint."""
    parts = []
    for shard in shards:
        if is_pipe(shard):
            parts.append(shard)  # a command's output has no size or date before it runs
        elif is_remote(shard):
            import fsspec

            try:
                fs, path = fsspec.core.url_to_fs(shard)
                info = fs.info(path)
                parts.append(f"{shard}:{info.get('size')}:{info.get('ETag') or info.get('etag') or ''}")
            except (OSError, ValueError):
                parts.append(shard)
        else:
            parts.append(f"{shard}:{os.path.getsize(shard)}:{os.path.getmtime(shard)}")
    return ";".join(parts)


def stream_shards(dataset: Any) -> list[str] | None:
    """The shard list a streaming dataset of `load_webdataset_pairs` reads (None for any other dataset)."""
    description = getattr(getattr(dataset, "info", None), "description", None) or ""
    if not description.startswith(STREAM_DESCRIPTION_PREFIX):
        return None
    return json.loads(description[len(STREAM_DESCRIPTION_PREFIX) :])["shards"]


def _webdataset_split(
    data_files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    streaming: bool,
    image_keys: Sequence[str],
    caption_keys: Sequence[str],
    validate: bool,
    strict: bool,
    num_proc: int | None,
    report: SkipReport,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    split: str | None = None,
    resample_seed: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    shards = resolve_shards(data_files)
    if resample_seed is not None and not streaming:
        raise ValueError("resample=True draws shards with replacement forever: it needs streaming=True.")
    gen_kwargs = {
        "shards": shards,
        "shard_ids": list(range(len(shards))),
        "all_shards": tuple(shards),
        "image_keys": tuple(key.lower() for key in image_keys),
        "caption_keys": tuple(key.lower() for key in caption_keys),
        "strict": strict,
        "stable_index": streaming,
        "signature": "" if streaming else _signature(shards),
        "resample_seed": resample_seed,
    }
    if streaming:
        stream = datasets.IterableDataset.from_generator(
            _generate_webdataset_pairs, features=_WEBDATASET_FEATURES, gen_kwargs=gen_kwargs
        )
        stream.info.description = STREAM_DESCRIPTION_PREFIX + json.dumps({"shards": shards})
        return stream
    if strict:  # fail before building anything: a header scan (no data read) finds truncated and corrupt shards
        for shard in shards:
            try:
                for _ in iter_shard_samples(shard, read_data=False, seekable=True, strict=True, warn=False):
                    pass
            except ShardError as error:
                raise InvalidPairError(str(error)) from None
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_webdataset_pairs, features=_WEBDATASET_FEATURES, gen_kwargs=gen_kwargs, num_proc=num_proc
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, (FileNotFoundError, InvalidPairError)):  # a missing or damaged shard, by name
            raise error.__cause__ from None
        raise
    lost = np.asarray(column_values(dataset, LOST_COLUMN), dtype=np.int64)
    split_report = SkipReport()
    for row in np.flatnonzero(lost):
        marker = dataset[int(row)]
        logger.warning(marker["text"])
        split_report.add_count(TRUNCATED_SHARD, int(marker[LOST_COLUMN]), file=marker["key"])
    if split_report.skipped:
        dataset = dataset.select(np.flatnonzero(lost == 0))
        report.update(split_report)
        if split is not None:
            report.splits.setdefault(split, SkipReport()).update(split_report)
    dataset = dataset.remove_columns(LOST_COLUMN).cast_column("image", datasets.Image())
    return _finish(dataset, report, validate=validate, strict=strict, key_column="key", num_proc=num_proc,
                   max_image_pixels=max_image_pixels, source=f"The webdataset shards {data_files!s}", split=split)


def load_webdataset_pairs(
    data_files: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any],
    *,
    streaming: bool = False,
    image_keys: Sequence[str] = ("jpg", "png", "jpeg", "webp"),
    caption_keys: Sequence[str] = ("txt", "json"),
    validate: bool = True,
    strict: bool = False,
    num_proc: int | None = None,
    return_report: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    resample: bool = False,
    seed: int = 0,
) -> AnyPairs | tuple[AnyPairs, SkipReport]:
    """Load img2dataset-style webdataset tar shards (`KEY.jpg` + `KEY.txt` / `KEY.json` with a "caption") as pairs.

    `data_files`: a directory (its `*.tar*`), a glob, a brace range (`shards/{00000..00099}.tar`), a tar file, a URL
    any installed fsspec filesystem reads (`https://...`, `hf://datasets/...`, `s3://...`; globs where the filesystem
    lists), a webdataset `pipe:COMMAND` (the command's standard output; see `trainers.data.shards`), a list of those,
    or a `{split: files}` mapping (returns a `DatasetDict`/`IterableDatasetDict`). The image
    is the first of `image_keys` a sample has; the caption the first of `caption_keys`. Columns: `image`, `text`, `key`
    (`shard.tar/KEY`) and `index`.

    A truncated or corrupt shard (cut inside a file or a header) gives the samples before the damage, a warning naming
    the shard and the samples lost, and a `TRUNCATED_SHARD` count (`strict=True`: `InvalidPairError`).

    Map-style: one sequential read per shard, broken pairs skipped and counted (`strict=True`: raise), `index` 0..N-1.
    Streaming (`streaming=True`, an `IterableDataset` sharded by tar file for DataLoader workers and
    `datasets.distributed.split_dataset_by_node`; nothing is read before iteration starts): `index` is the shard's
    offset (samples in the shards before it, from img2dataset `_stats.json` sidecars or a count of those shards
    only) plus the sample's position, stable across runs, resumes, processes and workers for the same shard list;
    images stay undecoded and `ImageTextCollator` skips and counts broken pairs and truncation losses (the report
    returned here stays empty). It also has a `lost_samples` column: marker rows (index -1) of truncation losses.
    `resample=True` (streaming only; open_clip's `--dataset-resampled`): each DataLoader worker of each process draws
    shards with replacement from all the shards, endlessly, with a generator of its own (seeded by `seed` and the
    worker's first shard); indices stay those of the pairs.
    """
    options = dict(
        streaming=streaming,
        image_keys=image_keys,
        caption_keys=caption_keys,
        validate=validate,
        strict=strict,
        num_proc=num_proc,
        report=SkipReport(),
        max_image_pixels=max_image_pixels,
        resample_seed=seed if resample else None,
    )
    if isinstance(data_files, Mapping):
        splits = {name: _webdataset_split(files, split=name, **options) for name, files in data_files.items()}
        result = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(splits)
    else:
        result = _webdataset_split(data_files, **options)
    return (result, options["report"]) if return_report else result
