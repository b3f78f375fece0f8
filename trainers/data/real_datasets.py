"""Real image-text datasets available offline from Debian packages, as cached `datasets.DatasetDict`s.

| loader | Debian package | pairs | captions |
|---|---|---|---|
| `load_fashion_mnist` | dataset-fashion-mnist | 60k train / 10k test, 28x28 grey | class templates; `label` |
| `load_tuxpaint_stamps` | tuxpaint-stamps-default | ~785 PNG stamps | the stamp's English description |
| `load_openclipart` | openclipart-png | ~8.1k clip-art PNGs | the PNG's Title (naturally noisy) |
| `load_emoji` | fonts-noto-color-emoji (+ PyPI `emoji`) | ~1.9k emoji | the emoji's name |

Every split has `image`, `text` and `index` (0..N-1 in split order). The first call builds the dataset with
`Dataset.from_generator` and saves it under the cache directory (`cache_dir`, else `$NLIP_CACHE/datasets`, else
`~/.cache/nlip/datasets`); later calls memory-map it without decoding anything. The cache key covers every option, so
`max_samples_per_split` subsets build (quickly) on their own; `rebuild=True` rebuilds after a package upgrade.
`max_samples_per_split` is one limit for every split or a `{split: limit}` mapping (0: that split is not built).
Datasets without an official split get a seeded train/test split (`test_size`, `seed`); subsets take the first
`max_samples_per_split` examples of each split in that seeded order, so they mix all categories. Transparent images
are composited onto white and downscaled to at most `max_image_size` pixels on their longer side.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
from filelock import FileLock

from .pairs import add_index, split_limit, to_rgb

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Caption templates of the training captions, and the prompt ensemble for zero-shot evaluation (`template.format(c)`).
FASHION_MNIST_TEMPLATES = ("a photo of a {}", "a picture of a {}", "a {}", "an image of a {}")

DEBIAN_SOURCES = {
    "fashion_mnist": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist"),
    "tuxpaint_stamps": ("tuxpaint-stamps-default", "/usr/share/tuxpaint/stamps"),
    "openclipart": ("openclipart-png", "/usr/share/openclipart/png"),
    "emoji": ("fonts-noto-color-emoji", "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
}
# Larger source images are skipped: openclipart holds ~20 posters of 5k-25k px per side that would take most of the
# build time and gigabytes of memory to decode, for thumbnails.
MAX_SOURCE_PIXELS = 25_000_000
EMOJI_BITMAP_SIZE = 109  # NotoColorEmoji is a bitmap font: it only renders at this size (136x128 px glyphs)

_CACHE_VERSION = 1


class MissingDataPackageError(FileNotFoundError):
    """The Debian package holding a dataset is not installed (the message says how to install it)."""


def _source_path(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The dataset's files: `data_dir` when given, else where its Debian package installs them."""
    package, default = DEBIAN_SOURCES[name]
    path = Path(data_dir) if data_dir is not None else Path(default)
    if not path.exists():
        raise MissingDataPackageError(
            f"{name}: {path} not found. Install it with `apt-get install -y --no-install-recommends {package}` "
            "(after `apt-get update`), or pass data_dir= pointing at a copy of the files."
        )
    return path


def default_cache_dir() -> Path:
    """`$NLIP_CACHE/datasets`, else `~/.cache/nlip/datasets`."""
    return Path(os.environ.get("NLIP_CACHE", "~/.cache/nlip")).expanduser() / "datasets"


def _load_or_build(
    name: str,
    options: dict[str, Any],
    build: Callable[[str], datasets.DatasetDict],
    cache_dir: str | os.PathLike | None,
    rebuild: bool,
) -> datasets.DatasetDict:
    """Load the cached `DatasetDict` for `(name, options)`, building it once with `build(generator_cache_dir)` first.

    Builds are serialised with a file lock and written to a temporary directory that is renamed into place, so an
    interrupted or concurrent build never leaves a half-written cache behind.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = root / f"{name}-v{_CACHE_VERSION}-{digest}"
    with FileLock(f"{target}.lock"):
        if rebuild and target.exists():
            shutil.rmtree(target)
        if not target.exists():
            logger.info("Building %s into %s (first use; later loads are memory-mapped).", name, target)
            with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-build-") as tmp:
                build(os.path.join(tmp, "generator")).save_to_disk(os.path.join(tmp, "dataset"))
                os.replace(os.path.join(tmp, "dataset"), target)
    return datasets.load_from_disk(str(target))


def _generate(items: list, make_example: Callable[..., dict | None], options: dict[str, Any]) -> Iterator[dict]:
    """`from_generator` body: `make_example(item, **options)` for each item, skipping (and logging) the None ones."""
    for item in items:
        example = make_example(item, **options)
        if example is None:
            logger.warning("Skipping %s: no usable image or caption.", item)
        else:
            yield example


def _build_splits(
    splits: dict[str, list],
    make_example: Callable[..., dict | None],
    options: dict[str, Any],
    features: datasets.Features,
    generator_cache: str,
    num_proc: int | None,
) -> datasets.DatasetDict:
    """One `from_generator` dataset per split, with `index` 0..N-1 added."""
    built = {}
    for split, items in splits.items():
        try:
            dataset = datasets.Dataset.from_generator(
                _generate,
                features=features,
                gen_kwargs={"items": items, "make_example": make_example, "options": options},
                cache_dir=generator_cache,
                num_proc=num_proc if num_proc and len(items) >= num_proc else None,
                split=datasets.NamedSplit(split),
            )
        except ValueError as err:
            if "corresponds to no data" not in str(err):  # `datasets`' error for a generator that yielded nothing
                raise
            raise ValueError(
                f"None of the {len(items)} {split} items gave a usable example (see the warnings above); "
                "take more samples (max_samples_per_split) or a larger test_size."
            ) from err
        built[split] = add_index(dataset)
    return datasets.DatasetDict(built)


def _seeded_split(
    items: list, test_size: float, seed: int, limit: int | Mapping[str, int | None] | None
) -> dict[str, list]:
    """A seeded random train/test split of `items`, each split truncated to its limit (in the shuffled order; see
    `split_limit`; a split limited to 0 is left out)."""
    order = np.random.default_rng(seed).permutation(len(items))
    num_test = round(test_size * len(items))
    if not 0 < num_test < len(items):
        raise ValueError(f"test_size={test_size} of {len(items)} items leaves an empty split.")
    splits = {
        "train": [items[i] for i in order[num_test:]][: split_limit(limit, "train")],
        "test": [items[i] for i in order[:num_test]][: split_limit(limit, "test")],
    }
    return {name: chosen for name, chosen in splits.items() if split_limit(limit, name) != 0}


def _load_with_seeded_split(
    name: str,
    list_items: Callable[[], tuple[list, datasets.Features]],
    make_example: Callable[..., dict | None],
    example_options: dict[str, Any],
    *,
    cache_key: dict[str, Any] | None = None,
    test_size: float,
    seed: int,
    max_samples_per_split: int | Mapping[str, int | None] | None,
    cache_dir: str | os.PathLike | None,
    num_proc: int | None,
    rebuild: bool,
) -> datasets.DatasetDict:
    """Load, or build once, a dataset made of `make_example(item, **example_options)` over a seeded split of items.

    `list_items()` returns the items and the features they imply; it only runs when building, so a cached load
    touches no source file. The cache key holds `example_options`, the split options and `cache_key` (other inputs).
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    options = {
        **example_options,
        **(cache_key or {}),
        "limit": max_samples_per_split,
        "test_size": test_size,
        "seed": seed,
    }

    def build(generator_cache: str) -> datasets.DatasetDict:
        items, features = list_items()
        splits = _seeded_split(items, test_size, seed, max_samples_per_split)
        return _build_splits(splits, make_example, example_options, features, generator_cache, num_proc)

    return _load_or_build(name, options, build, cache_dir, rebuild)


def _file_features(files: list[str]) -> datasets.Features:
    """Features of a dataset of image files: `category` is a ClassLabel over the files' top-level folders."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "category": datasets.ClassLabel(names=sorted({file.split("/")[0] for file in files})),
            "file_name": datasets.Value("string"),
        }
    )


def _read_image_file(path: str, max_image_size: int | None) -> tuple[PIL.Image.Image, dict[str, Any]] | None:
    """An image file as RGB on white, downscaled to at most `max_image_size` px, with its metadata (`info`, e.g. PNG
    text chunks). None when it cannot be read or has more than `MAX_SOURCE_PIXELS` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(path)
        with image:
            if image.width * image.height > MAX_SOURCE_PIXELS:
                logger.warning("Skipping %s: %dx%d pixels is over MAX_SOURCE_PIXELS.", path, *image.size)
                return None
            image.load()  # PNG text chunks that follow the image data are only read by load()
            info = dict(image.info)
            rgb = to_rgb(image)
            if rgb is image:  # leaving the `with` closes `image`, which would invalidate an RGB image returned as is
                rgb = image.copy()
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as err:
        logger.warning("Skipping %s: %s", path, err)
        return None
    if max_image_size is not None and max(rgb.size) > max_image_size:
        rgb.thumbnail((max_image_size, max_image_size), PIL.Image.Resampling.LANCZOS)
    return rgb, info


def _clean_text(text: Any) -> str:
    return " ".join(text.split()) if isinstance(text, str) else ""


# --------------------------------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """Read the first `limit` items (all when None) of a gzipped IDX file: the MNIST format, a magic number with dtype
    code 0x08 (uint8) and the number of dimensions, then big-endian int32 dimensions and the data."""
    with gzip.open(path, "rb") as f:
        magic = f.read(4)
        if magic[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic.hex()}).")
        shape = [int.from_bytes(f.read(4), "big") for _ in range(magic[3])]
        shape[0] = shape[0] if limit is None else min(limit, shape[0])
        return np.frombuffer(f.read(int(np.prod(shape))), dtype=np.uint8).reshape(shape)


def _fashion_mnist_examples(
    images_path: str, labels_path: str, limit: int | None, templates: tuple[str, ...], seed: tuple[int, int]
) -> Iterator[dict]:
    images, labels = _read_idx(Path(images_path), limit), _read_idx(Path(labels_path), limit)
    template_ids = np.random.default_rng(seed).integers(len(templates), size=len(labels))
    for image, label, template in zip(images, labels, template_ids, strict=True):
        yield {
            "image": PIL.Image.fromarray(image, mode="L"),
            "text": templates[template].format(FASHION_MNIST_CLASSES[label]),
            "label": int(label),
        }


def load_fashion_mnist(
    *,
    max_samples_per_split: int | Mapping[str, int | None] | None = None,
    templates: Sequence[str] = FASHION_MNIST_TEMPLATES,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> datasets.DatasetDict:
    """Fashion-MNIST (train 60k / test 10k, 28x28 greyscale) with `image`, `text`, `label` (ClassLabel with
    `FASHION_MNIST_CLASSES`) and `index`. Each caption is one of `templates` filled with the class name, the template
    drawn per sample from a generator seeded by `(seed, split)`; subsets are the first `max_samples_per_split`."""
    root = _source_path("fashion_mnist", data_dir)
    files = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}
    for pattern in files.values():
        for kind, ndim in (("images", 3), ("labels", 1)):
            _source_path("fashion_mnist", root / pattern.format(kind, ndim))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES)),
        }
    )

    def build(generator_cache: str) -> datasets.DatasetDict:
        built = {}
        for split_id, (split, pattern) in enumerate(files.items()):
            if split_limit(max_samples_per_split, split) == 0:
                continue
            dataset = datasets.Dataset.from_generator(
                _fashion_mnist_examples,
                features=features,
                gen_kwargs={
                    "images_path": str(root / pattern.format("images", 3)),
                    "labels_path": str(root / pattern.format("labels", 1)),
                    "limit": split_limit(max_samples_per_split, split),
                    "templates": tuple(templates),  # tuples: `from_generator` would shard lists
                    "seed": (seed, split_id),
                },
                cache_dir=generator_cache,
                split=datasets.NamedSplit(split),
            )
            built[split] = add_index(dataset)
        return datasets.DatasetDict(built)

    options = {"root": str(root), "limit": max_samples_per_split, "templates": list(templates), "seed": seed}
    return _load_or_build("fashion_mnist", options, build, cache_dir, rebuild)


# ----------------------------------------------------------------------------------------------- Tux Paint stamps


def _tuxpaint_example(relative_path: str, root: str, max_image_size: int | None) -> dict | None:
    image_path = os.path.join(root, relative_path)
    with open(os.path.splitext(image_path)[0] + ".txt", encoding="utf-8", errors="replace") as f:
        caption = _clean_text(f.readline())  # the untagged first line is English; the others are "xx.utf8=..."
    loaded = _read_image_file(image_path, max_image_size)
    if loaded is None or not caption:
        return None
    return {"image": loaded[0], "text": caption, "category": relative_path.split("/")[0], "file_name": relative_path}


def load_tuxpaint_stamps(
    *,
    max_samples_per_split: int | Mapping[str, int | None] | None = None,
    test_size: float = 0.1,
    seed: int = 0,
    max_image_size: int | None = 256,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    rebuild: bool = False,
) -> datasets.DatasetDict:
    """Tux Paint's default stamps: each PNG stamp with the English description from the `.txt` beside it.

    Columns `image`, `text`, `category` (ClassLabel: the top-level folder, e.g. "animals"), `file_name` and `index`.
    Stamps that exist only as SVG (no PNG; ~165 of them) are not included: rasterising SVG needs a library outside our
    dependencies. Seeded train/test split.
    """
    root = _source_path("tuxpaint_stamps", data_dir)

    def list_stamps() -> tuple[list[str], datasets.Features]:
        stamps = sorted(
            path.relative_to(root).as_posix() for path in root.rglob("*.png") if path.with_suffix(".txt").is_file()
        )
        return stamps, _file_features(stamps)

    return _load_with_seeded_split(
        "tuxpaint_stamps",
        list_stamps,
        _tuxpaint_example,
        {"root": str(root), "max_image_size": max_image_size},
        test_size=test_size,
        seed=seed,
        max_samples_per_split=max_samples_per_split,
        cache_dir=cache_dir,
        num_proc=num_proc,
        rebuild=rebuild,
    )


# ----------------------------------------------------------------------------------------------------- openclipart


def _openclipart_example(relative_path: str, root: str, max_image_size: int | None) -> dict | None:
    loaded = _read_image_file(os.path.join(root, relative_path), max_image_size)
    if loaded is None:
        return None
    image, info = loaded
    title = _clean_text(info.get("Title")) or _clean_text(info.get("Description"))
    if not title:
        return None
    return {"image": image, "text": title, "category": relative_path.split("/")[0], "file_name": relative_path}


def load_openclipart(
    *,
    max_samples_per_split: int | Mapping[str, int | None] | None = None,
    test_size: float = 0.1,
    seed: int = 0,
    max_image_size: int | None = 256,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    rebuild: bool = False,
) -> datasets.DatasetDict:
    """Openclipart's public-domain clip-art PNGs, captioned with the `Title` stored in each PNG (else its
    `Description`). Titles are naturally noisy ("card", "Lemon SVG theme", "AIGA_Symbol_Signs"). Images without
    either are skipped at build time, so a subset can hold slightly fewer than `max_samples_per_split` examples.

    Columns `image`, `text`, `category` (ClassLabel: the top-level folder), `file_name` and `index`. Seeded
    train/test split.
    """
    root = _source_path("openclipart", data_dir)

    def list_files() -> tuple[list[str], datasets.Features]:
        files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.png"))
        return files, _file_features(files)

    return _load_with_seeded_split(
        "openclipart",
        list_files,
        _openclipart_example,
        {"root": str(root), "max_image_size": max_image_size},
        test_size=test_size,
        seed=seed,
        max_samples_per_split=max_samples_per_split,
        cache_dir=cache_dir,
        num_proc=num_proc,
        rebuild=rebuild,
    )


# ----------------------------------------------------------------------------------------------------------- emoji


@functools.cache
def _emoji_font(font_path: str) -> PIL.ImageFont.FreeTypeFont:
    return PIL.ImageFont.truetype(font_path, EMOJI_BITMAP_SIZE)


def _emoji_example(item: tuple[str, str], font_path: str) -> dict | None:
    """Render one `(emoji, name)` on white; None when the font has no glyph for it (blank, or several glyphs)."""
    char, name = item
    font = _emoji_font(font_path)
    left, top, right, bottom = font.getbbox(char)
    if font.getlength(char) > font.getlength("\N{GRINNING FACE}"):  # unsupported sequence: one glyph per code point
        return None
    canvas = PIL.Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    PIL.ImageDraw.Draw(canvas).text((-left, -top), char, font=font, embedded_color=True)
    if canvas.getchannel("A").getbbox() is None:
        return None
    return {"image": to_rgb(canvas), "text": name, "emoji": char}


def _emoji_items() -> tuple[list[tuple[str, str]], datasets.Features]:
    """`(emoji, English name)` of the fully-qualified emoji without skin-tone variants ("grinning face")."""
    import emoji

    skin_tones = {chr(code) for code in range(0x1F3FB, 0x1F400)}
    items = [
        (char, data["en"].strip(":").replace("_", " "))
        for char, data in sorted(emoji.EMOJI_DATA.items())
        if data["status"] == emoji.STATUS["fully_qualified"] and not skin_tones.intersection(char)
    ]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "emoji": datasets.Value("string")}
    )
    return items, features


def load_emoji(
    *,
    max_samples_per_split: int | Mapping[str, int | None] | None = None,
    test_size: float = 0.1,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    rebuild: bool = False,
) -> datasets.DatasetDict:
    """Noto Color Emoji glyphs (rendered by Pillow at the font's bitmap size, on white) captioned with their names
    from the PyPI `emoji` package ("grinning face", "flag: Germany"). Fully-qualified emoji without skin-tone variants;
    emoji the installed font cannot draw are skipped. Columns `image`, `text`, `emoji` (the character) and `index`.
    Seeded train/test split. `data_dir` is the path of `NotoColorEmoji.ttf`."""
    font_path = _source_path("emoji", data_dir)
    try:
        emoji_version = importlib.metadata.version("emoji")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError("load_emoji needs the `emoji` package for emoji names: `pip install emoji`.") from err
    return _load_with_seeded_split(
        "emoji",
        _emoji_items,
        _emoji_example,
        {"font_path": str(font_path)},
        cache_key={"font_bytes": os.path.getsize(font_path), "emoji_version": emoji_version},
        test_size=test_size,
        seed=seed,
        max_samples_per_split=max_samples_per_split,
        cache_dir=cache_dir,
        num_proc=num_proc,
        rebuild=rebuild,
    )
