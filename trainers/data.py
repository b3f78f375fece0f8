"""Turn the image-text data users have into training-ready `datasets` with `image`, `text` and `index` columns.

Three inputs are supported: an `imagefolder` directory with `metadata.jsonl`/`metadata.csv` captions, img2dataset-style
`webdataset` tar shards (map-style or streaming), and an in-memory `datasets.Dataset`. Broken pairs (missing or
undecodable image, empty caption) are skipped and counted in a `SkipReport` by default, or raise an `InvalidPairError`
naming the file with `strict=True`, so that a bad file never surfaces as a crash deep inside a DataLoader worker.

Map-style datasets are validated once, up front, by a decoding pass (cached by `datasets` for file-backed data). A
streaming dataset cannot be validated ahead of time: its `image` column stays undecoded (`Image(decode=False)`, dicts
with `bytes`/`path`) and `ImageTextCollator` decodes, skips and counts at batch time.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)

MISSING_IMAGE = "missing image"
UNDECODABLE_IMAGE = "undecodable image"
EMPTY_CAPTION = "empty caption"

# How many skipped pairs are logged one by one (and kept in `SkipReport.examples`) before only the counts are updated.
MAX_LOGGED_SKIPS = 20

AnyPairs = datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict

_REASON_COLUMN = "_skip_reason"
_KEY_COLUMN = "_skip_key"


class InvalidPairError(ValueError):
    """An image-text pair is unusable (missing/undecodable image or empty caption) and `strict=True` was asked for."""


@dataclass
class SkipReport:
    """Counts of skipped image-text pairs by reason; the first `(key or file name, reason)` are kept for the log."""

    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def add(self, key: str, reason: str, detail: str = "") -> None:
        """Count one skipped pair; log it (with `detail`, e.g. the decoder's error) if among the first few."""
        self.reasons[reason] += 1
        if len(self.examples) < MAX_LOGGED_SKIPS:
            self.examples.append((key, reason))
            logger.warning("Skipping image-text pair %s: %s%s", key, reason, f" ({detail})" if detail else "")
        elif len(self.examples) == MAX_LOGGED_SKIPS and self.skipped == MAX_LOGGED_SKIPS + 1:
            logger.warning("More than %d pairs skipped; further skips are only counted.", MAX_LOGGED_SKIPS)

    def update(self, other: SkipReport) -> None:
        """Add another report's counts (and as many of its examples as fit) to this one."""
        self.reasons.update(other.reasons)
        self.examples.extend(other.examples[: max(0, MAX_LOGGED_SKIPS - len(self.examples))])

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


def decode_image(value: Any) -> tuple[PIL.Image.Image | None, str | None, str]:
    """Decode an image given as a PIL image, a path, or a `{"bytes", "path"}` dict.

    Returns `(image, None, "")` on success and `(None, reason, detail)` when the image is missing or cannot be decoded,
    so that callers decide whether to skip or raise.
    """
    if value is None or (isinstance(value, dict) and value.get("bytes") is None and not value.get("path")):
        return None, MISSING_IMAGE, "no image data"
    if isinstance(value, PIL.Image.Image):
        return value, None, ""
    try:
        return datasets.Image().decode_example(value), None, ""
    except FileNotFoundError as err:
        return None, MISSING_IMAGE, str(err)
    except Exception as err:  # Pillow raises many types: UnidentifiedImageError, OSError, SyntaxError, ...
        return None, UNDECODABLE_IMAGE, f"{type(err).__name__}: {err}"


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
    batch: dict[str, list], indices: list[int], image_column: str, text_column: str, key_column: str | None
) -> dict:
    """`datasets.map` function: the skip reason ('' when fine) and the key of every pair of a batch."""
    reasons, keys = [], []
    for row, (image, text) in enumerate(zip(batch[image_column], batch[text_column], strict=True)):
        key = str(batch[key_column][row]) if key_column else image_key(image, fallback=f"row {indices[row]}")
        _, reason, detail = decode_image(image)
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
) -> tuple[datasets.Dataset, SkipReport]:
    """Decode every image once and drop the pairs with a missing/undecodable image or an empty caption.

    The check is a `datasets.map` that writes only the reasons (cached for file-backed data, so a later run re-reads
    the answer instead of re-decoding; its progress bar follows `datasets.disable_progress_bars()`). Rows are keyed by
    `key_column` when given, else by the image's path (or row number). With `strict=True` the first bad pair raises
    an `InvalidPairError` naming its file.
    """
    checked = dataset.cast_column(image_column, datasets.Image(decode=False))
    problems = checked.map(
        _pair_problems,
        batched=True,
        batch_size=64,
        with_indices=True,
        fn_kwargs={"image_column": image_column, "text_column": text_column, "key_column": key_column},
        remove_columns=checked.column_names,
        num_proc=num_proc,
        desc="Checking image-text pairs",
    )
    reasons = column_values(problems, _REASON_COLUMN)
    report = SkipReport()
    bad = [row for row, reason in enumerate(reasons) if reason]
    if not bad:
        return dataset, report
    keys = column_values(problems, _KEY_COLUMN)
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
    bad_rows = set(bad)
    return dataset.select([row for row in range(len(reasons)) if row not in bad_rows]), report


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
) -> datasets.Dataset:
    """Validate (updating `report`) and index a map-style dataset already holding `image` and `text` columns."""
    if validate:
        dataset, split_report = validate_pairs(dataset, key_column=key_column, strict=strict, num_proc=num_proc)
        report.update(split_report)
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
    dataset = _finish(dataset, report, validate=validate, strict=strict, key_column=None, num_proc=num_proc)
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


def load_imagefolder_pairs(
    data_dir: str | os.PathLike,
    *,
    caption_column: str = "text",
    split: str | None = None,
    validate: bool = True,
    strict: bool = False,
    num_proc: int | None = None,
    return_report: bool = False,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.DatasetDict | tuple[datasets.Dataset | datasets.DatasetDict, SkipReport]:
    """Load an `imagefolder` directory with `metadata.jsonl`/`metadata.csv` captions as image-text pairs.

    Several captions per image: a list column in `metadata.jsonl`, or repeated `file_name` rows in `metadata.csv`
    (merged into a list). Splits come from sub-folders (`train/`, `test/`, ...) as in `datasets`; `split=None` returns
    a `DatasetDict`. Broken pairs are skipped and counted (`strict=True`: raise), and `index` is added per split.
    `load_kwargs` go to `datasets.load_dataset`.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory.")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(data_dir), split=split, **load_kwargs)
    report = SkipReport()

    def prepare(dataset: datasets.Dataset) -> datasets.Dataset:
        _check_columns(dataset, ["image", caption_column], f"The imagefolder metadata in {str(data_dir)!r}")
        if caption_column != "text":
            if "text" in dataset.column_names:
                dataset = dataset.remove_columns("text")
            dataset = dataset.rename_column(caption_column, "text")
        dataset = _group_captions_by_image(dataset)
        return _finish(dataset, report, validate=validate, strict=strict, key_column=None, num_proc=num_proc)

    if isinstance(loaded, datasets.DatasetDict):
        result = datasets.DatasetDict({name: prepare(dataset) for name, dataset in loaded.items()})
    else:
        result = prepare(loaded)
    return (result, report) if return_report else result


# ------------------------------------------------------------------------------------------------------ webdataset

_WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/000012.jpg" -> ("dir/000012", "jpg")


def _iter_tar_samples(
    path: str, read_data: bool = True, strict: bool = False
) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Yield `(key, {extension: bytes})` per webdataset sample of a tar shard (consecutive files sharing a key).

    A shard cut inside a header ends there (tarfile reads it as the end of the archive); one cut inside a file's data,
    or with a corrupt header, ends before the sample being read, with a warning (`strict=True`: `InvalidPairError`
    naming the shard). Reading with and without data stops at the same sample, so the shard offsets used for
    streaming indices stay consistent.
    """
    key, fields = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                match = _WEBDATASET_KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                member_key, extension = match.group(1), match.group(2).lower()
                if key is not None and member_key != key:
                    yield key, fields
                    fields = {}
                key = member_key
                fields[extension] = tar.extractfile(member).read() if read_data else None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        if strict:
            raise InvalidPairError(f"Cannot read webdataset shard {path}: {err}") from err
        logger.warning(
            "Webdataset shard %s is truncated or corrupt (%s); skipping its samples from %s on.",
            path,
            err,
            key or "the start",
        )
        return
    if key is not None:
        yield key, fields


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


def _generate_webdataset_pairs(
    shards: list[str], offsets: list[int], image_keys: tuple[str, ...], caption_keys: tuple[str, ...], signature: str
) -> Iterator[dict[str, Any]]:
    """`from_generator` body: one row per sample, `index` = the shard's offset + the sample's position in it.

    `signature` (file sizes and modification times) only makes `datasets`' cache fingerprint change with the files.
    """
    for shard, offset in zip(shards, offsets, strict=True):
        name = os.path.basename(shard)
        for position, (key, fields) in enumerate(_iter_tar_samples(shard)):
            extension = next((ext for ext in image_keys if fields.get(ext) is not None), None)
            yield {
                "image": {"bytes": fields[extension], "path": f"{name}/{key}.{extension}"} if extension else None,
                "text": _caption_from_fields(fields, caption_keys),
                "key": f"{name}/{key}",
                "index": offset + position,
            }


def _resolve_shards(data_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a directory (all `*.tar*` inside), a glob, or a list of those into a sorted list of tar files."""
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    shards: list[str] = []
    for pattern in map(str, patterns):
        if os.path.isdir(pattern):
            found = sorted(glob.glob(os.path.join(pattern, "*.tar*")))
        else:
            found = sorted(glob.glob(pattern))
        if not found:
            raise FileNotFoundError(f"No webdataset tar shards found for {pattern!r} (a directory, a glob or a file).")
        shards.extend(found)
    return shards


_WEBDATASET_FEATURES = datasets.Features(
    {
        "image": datasets.Image(decode=False),
        "text": datasets.Value("string"),
        "key": datasets.Value("string"),
        "index": datasets.Value("int64"),
    }
)


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
) -> datasets.Dataset | datasets.IterableDataset:
    shards = _resolve_shards(data_files)
    counts = [sum(1 for _ in _iter_tar_samples(shard, read_data=False, strict=strict)) for shard in shards]
    gen_kwargs = {
        "shards": shards,
        "offsets": np.cumsum([0] + counts[:-1]).tolist(),
        "image_keys": tuple(key.lower() for key in image_keys),
        "caption_keys": tuple(key.lower() for key in caption_keys),
        "signature": ";".join(f"{os.path.getsize(s)}:{os.path.getmtime(s)}" for s in shards),
    }
    if streaming:
        return datasets.IterableDataset.from_generator(
            _generate_webdataset_pairs, features=_WEBDATASET_FEATURES, gen_kwargs=gen_kwargs
        )
    dataset = datasets.Dataset.from_generator(
        _generate_webdataset_pairs, features=_WEBDATASET_FEATURES, gen_kwargs=gen_kwargs, num_proc=num_proc
    ).cast_column("image", datasets.Image())
    return _finish(dataset, report, validate=validate, strict=strict, key_column="key", num_proc=num_proc)


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
) -> AnyPairs | tuple[AnyPairs, SkipReport]:
    """Load img2dataset-style webdataset tar shards (`KEY.jpg` + `KEY.txt` / `KEY.json` with a "caption") as pairs.

    `data_files`: a directory (its `*.tar*`), a glob, a tar file, a list of those, or a `{split: files}` mapping
    (returns a `DatasetDict`/`IterableDatasetDict`). The image is the first of `image_keys` a sample has; the caption
    the first of `caption_keys`. Columns: `image`, `text`, `key` (`shard.tar/KEY`) and `index`.

    Map-style: broken pairs are skipped and counted (`strict=True`: raise) and `index` is 0..N-1. Streaming
    (`streaming=True`, an `IterableDataset` sharded by tar file for DataLoader workers and
    `datasets.distributed.split_dataset_by_node`): `index` is the shard's offset (samples in the shards before it)
    plus the sample's position, stable across runs and workers for the same shard list; images stay undecoded and
    `ImageTextCollator` skips and counts broken pairs (its `skip_report`; the report returned here stays empty).
    """
    options = dict(
        streaming=streaming,
        image_keys=image_keys,
        caption_keys=caption_keys,
        validate=validate,
        strict=strict,
        num_proc=num_proc,
        report=SkipReport(),
    )
    if isinstance(data_files, Mapping):
        splits = {name: _webdataset_split(files, **options) for name, files in data_files.items()}
        result = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(splits)
    else:
        result = _webdataset_split(data_files, **options)
    return (result, options["report"]) if return_report else result
