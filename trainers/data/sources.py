"""Which image-text pairs the nlip scripts read: a real offline dataset, an imagefolder, or webdataset shards.

`DataArguments` is parsed by `nlip-train`, `nlip-eval` and `nlip-audit`; `load_pairs` turns it into `image`/`text`/
`index` datasets (`trainers.data.pairs`), with optional synthetic caption noise (`trainers.noise.injection`, adds the
`is_noisy` ground truth) and what zero-shot evaluation needs (class names and prompt templates).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets

from trainers.data.pairs import (
    DEFAULT_MAX_IMAGE_PIXELS,
    LOST_COLUMN,
    SkipReport,
    column_values,
    load_imagefolder_pairs,
    load_webdataset_pairs,
    non_empty_captions,
    prepare_pairs,
)
from trainers.noise.injection import inject_caption_noise
from trainers.data.real_datasets import (
    FASHION_MNIST_TEMPLATES,
    load_emoji,
    load_fashion_mnist,
    load_openclipart,
    load_tuxpaint_stamps,
)

logger = logging.getLogger("nlip.scripts")

SPLITS = ("train", "eval")
# Split names an imagefolder / DatasetDict may use for evaluation data, in order of preference.
EVAL_SPLIT_NAMES = ("validation", "test", "eval", "valid")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class RealDataset:
    """A dataset `trainers.data.real_datasets` builds offline from a Debian package, and its zero-shot settings."""

    loader: Callable[..., datasets.DatasetDict]
    label_column: str | None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES


REAL_DATASETS: dict[str, RealDataset] = {
    "fashion_mnist": RealDataset(load_fashion_mnist, "label", FASHION_MNIST_TEMPLATES),
    "tuxpaint": RealDataset(load_tuxpaint_stamps, "category", ("a drawing of {}.", "a picture of {}.")),
    "openclipart": RealDataset(load_openclipart, "category", ("clip art of {}.", "a drawing of {}.")),
    "emoji": RealDataset(load_emoji, None),
}


@dataclass
class DataArguments:
    """The image-text pairs to read (one source), how many, and optional synthetic noise."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": f"A real dataset built offline from Debian packages: one of {list(REAL_DATASETS)} (train and test "
            "splits; built once, then cached). Alternative to --train_dir / --train_shards."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Any `datasets` source with an image column and a caption column (as in transformers' "
            "run_clip.py): a Hub dataset id, a local folder of data files (parquet, csv, jsonl, ... loaded with "
            "datasets.load_dataset) or a folder written by Dataset(Dict).save_to_disk. Its 'train' split (or its only "
            "split) is trained on and a 'validation'/'test' split evaluated. Columns: --image_column, "
            "--caption_column, --label_column."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of --dataset_name (datasets.load_dataset's `name`)."}
    )
    image_column: str = field(
        default="image",
        metadata={"help": "Column of --dataset_name holding the images (an Image feature, or image file paths)."},
    )
    train_dir: str | None = field(
        default=None,
        metadata={
            "help": "An imagefolder directory with captions in metadata.jsonl / metadata.csv (columns file_name and "
            "--caption_column). Sub-folders train/ and test/ (or validation/) become the splits; a folder without "
            "them is all training data."
        },
    )
    train_shards: str | None = field(
        default=None,
        metadata={
            "help": "Webdataset tar shards (img2dataset output: KEY.jpg + KEY.txt or KEY.json with a 'caption'): a "
            "directory, a glob ('shards/*.tar'), a brace range ('shards/{00000..00099}.tar', expanded by nlip: quote "
            "it), a file, a URL fsspec reads ('https://host/shards/{00000..00099}.tar', 'hf://datasets/...'), or "
            "webdataset 'pipe:COMMAND' shards, the command's output ('pipe:curl -sfL https://host/{00000..00099}.tar'). "
            "Truncated shards warn with the samples lost; img2dataset NAME_stats.json sidecars give exact counts."
        },
    )
    eval_dir: str | None = field(
        default=None, metadata={"help": "An imagefolder directory with evaluation pairs (overrides a test split)."}
    )
    eval_shards: str | None = field(
        default=None,
        metadata={"help": "Webdataset tar shards with evaluation pairs, in any form --train_shards takes (a directory, "
                  "glob, brace range, file, URL or 'pipe:' command)."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --train_shards instead of converting them to an Arrow dataset first (for data larger than "
            "the disk cache): nothing is read ahead, each process streams its own shards, and a pair's index is its "
            "shard's offset (from sidecars or a tar header scan) plus its position. Needs --max_steps; no "
            "--noise_ratio; not with method 'npc' or --noise_completion."
        },
    )
    streaming_resample: bool = field(
        default=False,
        metadata={
            "help": "With --streaming: draw shards with replacement, endlessly (open_clip's --dataset-resampled): each "
            "DataLoader worker of each process samples from all the shards with a seeded generator of its own, so a "
            "resume replays the draw. "
            "A pair keeps its index wherever it is drawn."
        },
    )
    caption_column: str = field(
        default="text",
        metadata={"help": "Column of the imagefolder metadata (or of --dataset_name) that holds the caption(s)."},
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "Column of class labels used for zero-shot classification: a ClassLabel, or plain strings (the "
            "class names, e.g. a 'label' field of an imagefolder's metadata.jsonl) or integers (names from "
            "--class_names); for webdataset shards, a KEY.<column> file (e.g. 'cls') or a field of KEY.json. "
            "Default: 'label' for fashion_mnist, 'category' for tuxpaint/openclipart, 'label' when the data has one; "
            "none otherwise (zero-shot evaluation is then skipped, with a warning)."
        },
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "Class names of an integer --label_column, in id order (default: the ids themselves)."},
    )
    zero_shot_templates: list[str] | None = field(
        default=None,
        metadata={
            "help": "Prompt templates of zero-shot classification, '{}' standing for the class name, e.g. "
            "'a photo of a {}.' (default: the dataset's own, e.g. Fashion-MNIST's caption templates)."
        },
    )
    noise_ratio: float = field(
        default=0.0,
        metadata={
            "help": "For experiments: shuffle the captions of this fraction of the pairs among themselves (the "
            "noisy-correspondence protocol) and add the ground truth column is_noisy. Applied to the split being "
            "trained on / evaluated / audited, after --max_*_samples, so the same options give the same noisy pairs."
        },
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the synthetic caption noise."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first this many (valid) training pairs (all when unset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first this many (valid) evaluation pairs (all when unset)."}
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where real datasets are cached (default $NLIP_CACHE/datasets or ~/.cache/nlip/datasets)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to decode and check images when loading the data."}
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": f"Skip (and count) images with more pixels than this, checked from the image header before "
            f"decoding (default {DEFAULT_MAX_IMAGE_PIXELS:,} = 8000 x 8000, below Pillow's own 89.5M; a 9500 x 9500 "
            "PNG of 263 KB would otherwise decode to ~270 MB). 0: no limit of ours (Pillow's applies)."
        },
    )

    def __post_init__(self):
        sources = {name: getattr(self, name) for name in ("dataset", "dataset_name", "train_dir", "train_shards")}
        given = [f"--{name}" for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(
                "Pass exactly one data source: --dataset (one of "
                f"{list(REAL_DATASETS)}), --dataset_name (any `datasets` source), --train_dir (an imagefolder) or "
                f"--train_shards (webdataset tar files); got {', '.join(given) if given else 'none'}."
            )
        if self.dataset_config_name is not None and self.dataset_name is None:
            raise ValueError("--dataset_config_name is the configuration of --dataset_name; pass --dataset_name too.")
        if self.dataset is not None and self.dataset not in REAL_DATASETS:
            raise ValueError(f"Unknown --dataset {self.dataset!r}; expected one of {list(REAL_DATASETS)}.")
        if self.eval_dir is not None and self.eval_shards is not None:
            raise ValueError("Pass at most one of --eval_dir and --eval_shards.")
        if self.streaming_resample and not self.streaming:
            raise ValueError("--streaming_resample draws shards of a stream: it needs --streaming.")
        if self.streaming and self.train_shards is None:
            raise ValueError("--streaming reads webdataset shards: it needs --train_shards.")
        if not 0.0 <= self.noise_ratio < 1.0:
            raise ValueError(f"--noise_ratio must be in [0, 1), got {self.noise_ratio}.")
        if self.streaming and self.noise_ratio > 0:
            raise ValueError("--noise_ratio needs a map-style dataset to shuffle captions in; drop --streaming.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}.")
        for template in self.zero_shot_templates or []:
            if template.count("{}") != 1:
                raise ValueError(f"--zero_shot_templates entry {template!r} must contain '{{}}' exactly once.")

    @property
    def name(self) -> str:
        """A short name of the data for model cards and reports."""
        if self.dataset is not None:
            return self.dataset
        if self.dataset_name is not None:
            if os.path.isdir(self.dataset_name):
                return os.path.basename(os.path.normpath(self.dataset_name))
            return self.dataset_name + (f" ({self.dataset_config_name})" if self.dataset_config_name else "")
        source = self.train_dir or self.train_shards
        name = os.path.basename(os.path.normpath(source)) or source
        if self.train_shards is not None and any(char in name for char in "*?[{"):
            # 'shards/*.tar' is named by its folder, not by the pattern
            folder = os.path.basename(os.path.dirname(os.path.normpath(source)))
            name = folder or "webdataset shards"
        return name

    @property
    def description(self) -> str:
        """What the data is, in words, for model cards: e.g. "the imagefolder `my_pairs`"."""
        if self.dataset is not None:
            return f"the `{self.dataset}` dataset (built offline by nlip from its Debian package)"
        if self.dataset_name is not None:
            if os.path.isdir(self.dataset_name):
                return f"the local `datasets` dataset `{self.name}`"
            return f"the Hugging Face dataset `{self.name}`"
        if self.train_dir is not None:
            return f"the imagefolder `{self.name}` (image files with captions in its metadata)"
        return f"webdataset shards in `{self.name}`"

    @property
    def hub_dataset_ids(self) -> list[str]:
        """Dataset names for a model card's `datasets:` metadata: a Hub id or a real dataset's name (local data: none)."""
        if self.dataset is not None:
            return [self.dataset]
        if self.dataset_name is not None and not os.path.isdir(self.dataset_name):
            return [self.dataset_name]
        return []


@dataclass
class ImageTextData:
    """The loaded splits and what zero-shot evaluation of them needs."""

    name: str
    train: datasets.Dataset | datasets.IterableDataset | None
    eval: datasets.Dataset | None
    label_column: str | None = None
    class_names: list[str] | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    zero_shot_skipped: str | None = None  # why zero-shot classification cannot run on this data (None: it can)
    # The pairs the loaders skipped, per split ("train", "eval"): `trainers.data.pairs.SkipReport` (missing / undecodable /
    # too large images, empty captions, images without a metadata row, truncated shards), with the broken files.
    skip_reports: dict[str, SkipReport] = field(default_factory=dict)

    def split(self, name: str) -> datasets.Dataset:
        """The `train` or `eval` split; ValueError naming what to pass when the data has none."""
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; expected one of {list(SPLITS)}.")
        dataset = getattr(self, name)
        if dataset is None:
            raise ValueError(
                f"The data {self.name!r} has no {name} split: pass --eval_dir / --eval_shards, use an imagefolder with a "
                f"test/ or validation/ sub-folder, or choose --split train."
            )
        return dataset


def _pick_eval_split(splits: datasets.DatasetDict) -> datasets.Dataset | None:
    for name in EVAL_SPLIT_NAMES:
        if name in splits:
            return splits[name]
    return None


def _single_split(splits: datasets.DatasetDict | datasets.Dataset, source: str) -> datasets.Dataset:
    """The pairs of an evaluation source: its only split, or its eval-named one."""
    if isinstance(splits, datasets.Dataset):
        return splits
    if len(splits) == 1:
        return next(iter(splits.values()))
    picked = _pick_eval_split(splits)
    if picked is None:
        raise ValueError(f"{source} has splits {list(splits)}; expected one split or one named {list(EVAL_SPLIT_NAMES)}.")
    return picked


def _real_dataset_limits(args: DataArguments, splits: Sequence[str]) -> dict[str, int | None] | int | None:
    """`max_samples_per_split` for a real dataset: the limit of each split that is needed, 0 for a split that is not
    (it is then not built at all)."""
    limits = {"train": args.max_train_samples if "train" in splits else 0,
              "test": args.max_eval_samples if "eval" in splits else 0}
    values = set(limits.values())
    return values.pop() if len(values) == 1 else limits


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")
    )


def _load_datasets_source(args: DataArguments, splits: Sequence[str]) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """(train, eval) of --dataset_name: limited to `max_*_samples` *before* the image-decoding check, columns renamed
    to `image`/`text` and `index` added (`trainers.data.pairs.prepare_pairs`)."""
    name = args.dataset_name
    if _is_saved_dataset(name):
        loaded = datasets.load_from_disk(name)
    else:
        loaded = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.dataset_cache_dir)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    train_split = "train" if "train" in loaded else (next(iter(loaded)) if len(loaded) == 1 else None)
    if train_split is None and "train" in splits:
        raise ValueError(f"--dataset_name {name!r} has splits {list(loaded)} but no 'train' split.")
    eval_name = next((split for split in EVAL_SPLIT_NAMES if split in loaded and split != train_split), None)

    def prepare(split: str | None, limit: int | None, needed: bool) -> datasets.Dataset | None:
        if split is None or not needed:
            return None
        dataset = _limit(loaded[split], limit)
        return prepare_pairs(dataset, image_column=args.image_column, text_column=args.caption_column,
                             num_proc=args.preprocessing_num_workers)

    return (prepare(train_split, args.max_train_samples, "train" in splits),
            prepare(eval_name, args.max_eval_samples, "eval" in splits))


def _load_sources(
    args: DataArguments, splits: Sequence[str] = SPLITS
) -> tuple[datasets.Dataset | datasets.IterableDataset | None, datasets.Dataset | None, dict[str, SkipReport]]:
    """(train, eval, the loaders' skip reports by split) as the loaders give them, before subsetting and noise. Real
    datasets build only the splits in `splits`, each only up to its `max_*_samples`."""
    options = {"num_proc": args.preprocessing_num_workers, "max_image_pixels": args.max_image_pixels or None,
               "return_report": True}
    reports: dict[str, SkipReport] = {}
    if args.dataset is not None:
        built = REAL_DATASETS[args.dataset].loader(
            max_samples_per_split=_real_dataset_limits(args, splits), cache_dir=args.dataset_cache_dir
        )
        train, evaluation = built.get("train"), built.get("test")
    elif args.dataset_name is not None:
        train, evaluation = _load_datasets_source(args, splits)
    elif args.train_dir is not None:
        limits = {"train": args.max_train_samples, **dict.fromkeys(EVAL_SPLIT_NAMES, args.max_eval_samples)}
        loaded, report = load_imagefolder_pairs(args.train_dir, caption_column=args.caption_column,
                                                max_samples_per_split=limits, **options)
        reports["train"] = report.splits.get("train", report)
        if "train" not in loaded:
            raise ValueError(f"--train_dir {args.train_dir!r} has splits {list(loaded)} but no 'train' split.")
        train, evaluation = loaded["train"], _pick_eval_split(loaded)
        eval_name = next((name for name in EVAL_SPLIT_NAMES if name in loaded), None)
        if eval_name is not None:
            reports["eval"] = report.splits.get(eval_name, SkipReport())
    else:
        train, reports["train"] = load_webdataset_pairs(args.train_shards, streaming=args.streaming,
                                                        resample=args.streaming_resample, **options)
        evaluation = None
    if args.eval_dir is not None:
        loaded, reports["eval"] = load_imagefolder_pairs(args.eval_dir, caption_column=args.caption_column,
                                                         max_samples_per_split=args.max_eval_samples, **options)
        evaluation = _single_split(loaded, f"--eval_dir {args.eval_dir!r}")
    elif args.eval_shards is not None:
        evaluation, reports["eval"] = load_webdataset_pairs(args.eval_shards, **options)
    return train, evaluation, reports


def _limit(dataset, limit: int | None):
    if dataset is None or limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(limit)
    return dataset.select(range(min(limit, len(dataset))))


def _zero_shot_settings(args: DataArguments, dataset) -> tuple[str | None, list[str] | None, tuple[str, ...], str | None]:
    """(label column, class names, templates, why not) for zero-shot classification of `dataset`: the first three
    when it has class labels (a ClassLabel column; see `encode_labels` for plain string / integer labels), else the
    reason zero-shot classification is skipped as the fourth."""
    real = REAL_DATASETS.get(args.dataset) if args.dataset else None
    templates = tuple(args.zero_shot_templates or (real.templates if real else DEFAULT_TEMPLATES))
    features = dataset.features if dataset is not None else None
    column = args.label_column or (real.label_column if real else "label")
    if features is None:
        return None, None, templates, "the data has no map-style split with known columns"
    if column is None:
        return None, None, templates, f"{args.name} has no class labels"
    if args.label_column is not None and column == "text":
        raise ValueError("--label_column 'text' is the caption column; zero-shot classification needs a column of "
                         "class labels (class names or class ids), e.g. 'label'.")
    if column not in features:
        if args.label_column is not None:
            raise ValueError(f"--label_column {column!r} is not a column of the data; columns: {list(features)}.")
        return None, None, templates, (
            f"the data has no {column!r} column; pass --label_column NAME (a column of class names or ids) to "
            f"evaluate zero-shot classification (columns: {list(features)})"
        )
    if not isinstance(features[column], datasets.ClassLabel):
        if args.label_column is not None:
            raise ValueError(
                f"--label_column {column!r} must hold class labels for zero-shot classification: a ClassLabel, "
                f"strings or integers; it is {features[column]}."
            )
        return None, None, templates, f"the {column!r} column is {features[column]}, not class labels"
    names = [name.replace("_", " ") for name in features[column].names]
    return column, names, templates, None


LABEL_VALUE_TYPES = ("string", "large_string", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _label_source_column(args: DataArguments) -> str | None:
    real = REAL_DATASETS.get(args.dataset) if args.dataset else None
    return args.label_column or (real.label_column if real else "label")


def _add_webdataset_labels(args: DataArguments, dataset, shards: str | None):
    """Add `--label_column` to a map-style webdataset split from its shards: the text of each sample's
    `KEY.<label_column>` file (webdataset's `.cls` convention) or the field of that name in its `KEY.json`."""
    if (shards is None or args.label_column is None or not isinstance(dataset, datasets.Dataset)
            or args.label_column in dataset.column_names or "key" not in dataset.column_names):
        return dataset
    from trainers.data.zero_shot_labels import webdataset_labels

    labels = webdataset_labels(shards, args.label_column)
    if not labels:
        return dataset
    values = [labels.get(key) for key in column_values(dataset, "key")]
    missing = sum(value is None for value in values)
    if missing:
        logger.warning("%d of %d webdataset samples have no %r label; they count as their own class '(none)'.",
                       missing, len(values), args.label_column)
        values = ["(none)" if value is None else value for value in values]
    if all(isinstance(value, int) for value in values):
        feature = datasets.Value("int64")
    else:
        values, feature = [str(value) for value in values], datasets.Value("string")
    return dataset.add_column(args.label_column, values, feature=feature)


def encode_labels(args: DataArguments, splits: dict[str, datasets.Dataset | datasets.IterableDataset | None]) -> dict:
    """Turn a plain string or integer label column into one `ClassLabel` shared by every map-style split: string
    labels are the class names (sorted), integer labels are class ids named by `--class_names` (default: the ids)."""
    column = _label_source_column(args)
    present = {name: split for name, split in splits.items()
               if isinstance(split, datasets.Dataset) and column is not None and column in split.column_names}
    if not present:
        return splits
    features = [split.features[column] for split in present.values()]
    if all(isinstance(feature, datasets.ClassLabel) for feature in features):
        return splits
    if not all(isinstance(feature, datasets.Value) and feature.dtype in LABEL_VALUE_TYPES for feature in features):
        return splits  # reported by _zero_shot_settings
    values = [value for split in present.values() for value in column_values(split, column) if value is not None]
    if all(isinstance(value, str) for value in values):
        names = sorted(set(values))
        if args.class_names:
            logger.warning("--class_names is ignored: the %r labels are strings, which are their own names.", column)
    else:
        num_classes = int(max(values)) + 1 if values else 0
        if args.class_names:
            if len(args.class_names) < num_classes:
                raise ValueError(f"--class_names gives {len(args.class_names)} names but the {column!r} labels go up "
                                 f"to id {num_classes - 1}.")
            names = list(args.class_names)
        else:
            names = [str(i) for i in range(num_classes)]
            logger.warning(
                "The %r labels are integers without names: zero-shot prompts will read e.g. %r; pass --class_names "
                "with the class names in id order.", column, DEFAULT_TEMPLATES[0].format(names[0] if names else "0"),
            )
    feature = datasets.ClassLabel(names=names)
    encoded = dict(splits)
    for name, split in present.items():
        encoded[name] = split.cast_column(column, feature)
    logger.info("Zero-shot classes from the %r column: %d (%s%s).", column, len(names), ", ".join(names[:10]),
                ", ..." if len(names) > 10 else "")
    return encoded


def load_pairs(args: DataArguments, noise_split: str | None = "train", splits: Sequence[str] = SPLITS) -> ImageTextData:
    """Load the train and eval pairs of `args`, limited to `max_*_samples`, with synthetic noise (`noise_ratio`) in
    `noise_split`. Every split has `image`, `text` and `index` (0..N-1) columns; a noisy split also `is_noisy`.
    `splits`: the splits the caller uses; a real dataset builds only those (the others may come back as None)."""
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"Unknown splits {unknown}; expected some of {list(SPLITS)}.")
    train, evaluation, reports = _load_sources(args, splits)
    train = _limit(train, args.max_train_samples)
    evaluation = _limit(evaluation, args.max_eval_samples)
    train = _add_webdataset_labels(args, train, args.train_shards)
    evaluation = _add_webdataset_labels(args, evaluation, args.eval_shards)
    encoded = encode_labels(args, {"train": train, "eval": evaluation})
    train, evaluation = encoded["train"], encoded["eval"]
    if args.noise_ratio > 0 and noise_split is not None:
        if noise_split == "train":
            train = inject_caption_noise(train, args.noise_ratio, seed=args.noise_seed)
        elif evaluation is not None:
            evaluation = inject_caption_noise(evaluation, args.noise_ratio, seed=args.noise_seed)
    label_column, class_names, templates, skipped = _zero_shot_settings(
        args, evaluation if evaluation is not None else train
    )
    data = ImageTextData(args.name, train, evaluation, label_column, class_names, templates, skipped)
    data.skip_reports = reports
    return data


def iter_captions(dataset: datasets.Dataset | datasets.IterableDataset, limit: int | None = None) -> Iterator[str]:
    """Every non-empty caption of a dataset's `text` column (for a streaming one, of its first `limit` examples)."""
    if isinstance(dataset, datasets.IterableDataset):
        # (a webdataset stream's truncated-shard marker rows hold a message, not a caption)
        columns = ["text", *([LOST_COLUMN] if LOST_COLUMN in (dataset.column_names or []) else [])]
        rows = (example["text"] for example in itertools.islice(dataset.select_columns(columns), limit)
                if not example.get(LOST_COLUMN))
    else:
        rows = column_values(dataset, "text")
    for text in rows:
        yield from non_empty_captions(text)


__all__ = ["REAL_DATASETS", "DataArguments", "ImageTextData", "RealDataset", "encode_labels", "iter_captions", "load_pairs"]
