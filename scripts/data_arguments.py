"""Which image-text pairs the nlip scripts read: a real offline dataset, an imagefolder, or webdataset shards.

`DataArguments` is parsed by `nlip-train`, `nlip-eval` and `nlip-audit`; `load_pairs` turns it into `image`/`text`/
`index` datasets (`trainers.data`), with optional synthetic caption noise (`trainers.noise_injection`, adds the
`is_noisy` ground truth) and what zero-shot evaluation needs (class names and prompt templates).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets

from trainers.data import column_values, load_imagefolder_pairs, load_webdataset_pairs, non_empty_captions
from trainers.noise_injection import inject_caption_noise
from trainers.real_datasets import (
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
    """A dataset `trainers.real_datasets` builds offline from a Debian package, and its zero-shot settings."""

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
            "directory, a glob such as 'shards/{00000..00099}.tar' expanded by the shell or 'shards/*.tar', or a file."
        },
    )
    eval_dir: str | None = field(
        default=None, metadata={"help": "An imagefolder directory with evaluation pairs (overrides a test split)."}
    )
    eval_shards: str | None = field(
        default=None, metadata={"help": "Webdataset tar shards with evaluation pairs (a directory, glob or file)."}
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --train_shards instead of converting them to an Arrow dataset first (for data larger than "
            "the disk cache). Needs --max_steps; no --noise_ratio; not with method 'npc' or --noise_completion."
        },
    )
    caption_column: str = field(
        default="text", metadata={"help": "Column of the imagefolder metadata that holds the caption(s)."}
    )
    label_column: str | None = field(
        default=None,
        metadata={
            "help": "ClassLabel column used for zero-shot classification (default: 'label' for fashion_mnist, "
            "'category' for tuxpaint/openclipart, 'label' when an imagefolder has one; none otherwise)."
        },
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
        default=None, metadata={"help": "Use only the first this many training pairs (all when unset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first this many evaluation pairs (all when unset)."}
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where real datasets are cached (default $NLIP_CACHE/datasets or ~/.cache/nlip/datasets)."},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes used to decode and check images when loading the data."}
    )

    def __post_init__(self):
        sources = {name: getattr(self, name) for name in ("dataset", "train_dir", "train_shards")}
        given = [f"--{name}" for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(
                "Pass exactly one data source: --dataset (one of "
                f"{list(REAL_DATASETS)}), --train_dir (an imagefolder) or --train_shards (webdataset tar files); got "
                f"{', '.join(given) if given else 'none'}."
            )
        if self.dataset is not None and self.dataset not in REAL_DATASETS:
            raise ValueError(f"Unknown --dataset {self.dataset!r}; expected one of {list(REAL_DATASETS)}.")
        if self.eval_dir is not None and self.eval_shards is not None:
            raise ValueError("Pass at most one of --eval_dir and --eval_shards.")
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
        source = self.train_dir or self.train_shards
        return os.path.basename(os.path.normpath(source)) or source


@dataclass
class ImageTextData:
    """The loaded splits and what zero-shot evaluation of them needs."""

    name: str
    train: datasets.Dataset | datasets.IterableDataset | None
    eval: datasets.Dataset | None
    label_column: str | None = None
    class_names: list[str] | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

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


def _load_sources(args: DataArguments) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None]:
    """(train, eval) as the loaders give them, before subsetting and noise."""
    options = {"num_proc": args.preprocessing_num_workers}
    if args.dataset is not None:
        limits = [limit for limit in (args.max_train_samples, args.max_eval_samples) if limit is not None]
        # Both limits given: build only that many per split (a small cache builds in seconds).
        splits = REAL_DATASETS[args.dataset].loader(
            max_samples_per_split=max(limits) if len(limits) == 2 else None, cache_dir=args.dataset_cache_dir
        )
        train, evaluation = splits["train"], splits["test"]
    elif args.train_dir is not None:
        splits = load_imagefolder_pairs(args.train_dir, caption_column=args.caption_column, **options)
        if "train" not in splits:
            raise ValueError(f"--train_dir {args.train_dir!r} has splits {list(splits)} but no 'train' split.")
        train, evaluation = splits["train"], _pick_eval_split(splits)
    else:
        train = load_webdataset_pairs(args.train_shards, streaming=args.streaming, **options)
        evaluation = None
    if args.eval_dir is not None:
        evaluation = _single_split(
            load_imagefolder_pairs(args.eval_dir, caption_column=args.caption_column, **options), f"--eval_dir {args.eval_dir!r}"
        )
    elif args.eval_shards is not None:
        evaluation = load_webdataset_pairs(args.eval_shards, **options)
    return train, evaluation


def _limit(dataset, limit: int | None):
    if dataset is None or limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(limit)
    return dataset.select(range(min(limit, len(dataset))))


def _zero_shot_settings(args: DataArguments, dataset) -> tuple[str | None, list[str] | None, tuple[str, ...]]:
    """(label column, class names, templates) for zero-shot classification of `dataset`, when it has class labels."""
    real = REAL_DATASETS.get(args.dataset) if args.dataset else None
    templates = tuple(args.zero_shot_templates or (real.templates if real else DEFAULT_TEMPLATES))
    features = dataset.features if dataset is not None else None
    column = args.label_column or (real.label_column if real else "label")
    if features is None or column is None:
        return None, None, templates
    if column not in features:
        if args.label_column is not None:
            raise ValueError(f"--label_column {column!r} is not a column of the data; columns: {list(features)}.")
        return None, None, templates
    if not isinstance(features[column], datasets.ClassLabel):
        if args.label_column is not None:
            raise ValueError(
                f"--label_column {column!r} must be a ClassLabel column (class ids with names) for zero-shot "
                f"classification; it is {features[column]}."
            )
        return None, None, templates
    names = [name.replace("_", " ") for name in features[column].names]
    return column, names, templates


def load_pairs(args: DataArguments, noise_split: str | None = "train") -> ImageTextData:
    """Load the train and eval pairs of `args`, limited to `max_*_samples`, with synthetic noise (`noise_ratio`) in
    `noise_split`. Every split has `image`, `text` and `index` (0..N-1) columns; a noisy split also `is_noisy`."""
    train, evaluation = _load_sources(args)
    train = _limit(train, args.max_train_samples)
    evaluation = _limit(evaluation, args.max_eval_samples)
    if args.noise_ratio > 0 and noise_split is not None:
        if noise_split == "train":
            train = inject_caption_noise(train, args.noise_ratio, seed=args.noise_seed)
        elif evaluation is not None:
            evaluation = inject_caption_noise(evaluation, args.noise_ratio, seed=args.noise_seed)
    label_column, class_names, templates = _zero_shot_settings(args, evaluation if evaluation is not None else train)
    return ImageTextData(args.name, train, evaluation, label_column, class_names, templates)


def iter_captions(dataset: datasets.Dataset | datasets.IterableDataset, limit: int | None = None) -> Iterator[str]:
    """Every non-empty caption of a dataset's `text` column (for a streaming one, of its first `limit` examples)."""
    if isinstance(dataset, datasets.IterableDataset):
        rows = (example["text"] for example in itertools.islice(dataset.select_columns(["text"]), limit))
    else:
        rows = column_values(dataset, "text")
    for text in rows:
        yield from non_empty_captions(text)


__all__ = ["REAL_DATASETS", "DataArguments", "ImageTextData", "RealDataset", "iter_captions", "load_pairs"]
