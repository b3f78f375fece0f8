"""Synthetic caption noise with a ground-truth mask: the noisy-correspondence protocol, and optional truncation.

Noisy correspondence (the literature's protocol): pick round(ratio * N) pairs at random and shuffle their captions
among themselves. We shuffle with a derangement, so every picked pair really receives another pair's caption, and mark
noise by the caption's *origin*: `is_noisy[i]` is True iff pair i's caption came from another pair (`caption_source[i]
!= i`). Two picked pairs can hold the same caption string (e.g. templated class captions: "a photo of a bag"); after
the swap such a pair still reads its old text yet is marked noisy, since its caption was taken from a pair whose image
it was not written for. Exactly round(ratio * N) pairs (Python's round: half to even) are marked noisy.

Hard swaps (`swap_within=`, LEMoN's category noise): a picked pair gets the caption of another pair of the *same*
category (e.g. the Tux Paint folder "animals"), optionally of a different class (`differ_by=`: Fashion-MNIST's
"sneaker" for a "sandal" image, both footwear) — a caption that is wrong but close, which a loss-based detector finds
much harder than a random one. A picked pair whose category has no eligible other pair takes a random eligible pair
from any category (counted in the log).
"""

from __future__ import annotations

import logging

import datasets
import numpy as np

from ..data.pairs import column_values

logger = logging.getLogger(__name__)


def _check(dataset: datasets.Dataset, ratio: float, text_column: str, new_column: str) -> None:
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"Noise injection needs a map-style datasets.Dataset, got {type(dataset).__name__}.")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}.")
    if text_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {text_column!r}; columns present: {dataset.column_names}.")
    if new_column in dataset.column_names:
        raise ValueError(f"The dataset already has a {new_column!r} column: noise was injected into it before.")


def _replace_column(dataset: datasets.Dataset, name: str, values: list) -> datasets.Dataset:
    """Swap in new values for a column, keeping its feature type and the column order."""
    order = dataset.column_names
    feature = dataset.features[name]
    return dataset.remove_columns(name).add_column(name, values, feature=feature).select_columns(order)


def random_derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of 0..n-1 without fixed points (rejection sampling, ~e draws on average)."""
    if n == 1:
        raise ValueError("A single element has no derangement.")
    while True:
        permutation = rng.permutation(n)
        if not np.any(permutation == np.arange(n)):
            return permutation


def _hard_sources(
    picked: np.ndarray, category: np.ndarray, differ: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """For each picked row, a random other row of its category (and of another `differ` value); rows whose category
    has none take a random eligible row of any category. Returns the sources and how many fell back."""
    rows = np.arange(category.shape[0])
    sources, fallbacks = np.empty(picked.shape[0], dtype=np.int64), 0
    for k, row in enumerate(picked):
        eligible = rows != row if differ is None else differ != differ[row]
        same = eligible & (category == category[row])
        if not same.any():
            fallbacks += 1
            same = eligible
        if not same.any():
            raise ValueError(f"Row {row} has no other pair to take a caption from (every pair shares its `differ_by` value).")
        sources[k] = rng.choice(rows[same])
    return sources, fallbacks


def inject_caption_noise(
    dataset: datasets.Dataset,
    ratio: float,
    *,
    seed: int = 0,
    text_column: str = "text",
    swap_within: str | None = None,
    differ_by: str | None = None,
) -> datasets.Dataset:
    """Give round(ratio * N) random pairs another pair's caption and mark them.

    Default (random noise): the picked pairs' captions are shuffled among themselves (a derangement). With
    `swap_within` (a column of categories): hard noise, each picked pair takes the caption of a random other pair of
    the same category — of another `differ_by` value when that column is given (see the module docstring).

    Adds `is_noisy` (bool, the ground truth) and `caption_source` (int64, the row whose caption each row now holds).
    A list of captions moves as a whole. Seeded: the same `seed` gives the same noise.
    """
    _check(dataset, ratio, text_column, "is_noisy")
    for name in (swap_within, differ_by):
        if name is not None and name not in dataset.column_names:
            raise ValueError(f"The dataset has no column {name!r} to swap captions by; columns present: {dataset.column_names}.")
    if differ_by is not None and swap_within is None:
        raise ValueError("`differ_by` refines a hard swap: give `swap_within` (the category column) too.")
    n = len(dataset)
    num_noisy = round(ratio * n)
    if num_noisy == 1 and swap_within is None:
        raise ValueError(
            f"ratio={ratio} of {n} pairs picks a single pair, which has no other pair to swap captions with; "
            "use a ratio that picks 0 or at least 2 pairs."
        )
    rng = np.random.default_rng(seed)
    source = np.arange(n, dtype=np.int64)
    if num_noisy and swap_within is None:
        picked = rng.choice(n, size=num_noisy, replace=False)
        source[picked] = picked[random_derangement(num_noisy, rng)]
    elif num_noisy:
        picked = rng.choice(n, size=num_noisy, replace=False)
        differ = None if differ_by is None else np.asarray(column_values(dataset, differ_by))
        source[picked], fallbacks = _hard_sources(picked, np.asarray(column_values(dataset, swap_within)), differ, rng)
        if fallbacks:
            logger.info("Hard caption swap: %d of %d picked pairs had no other pair in their %r and took one from "
                        "another category.", fallbacks, num_noisy, swap_within)
    texts = column_values(dataset, text_column)
    noisy = _replace_column(dataset, text_column, [texts[row] for row in source])
    noisy = noisy.add_column("is_noisy", (source != np.arange(n)).tolist(), feature=datasets.Value("bool"))
    logger.info("Injected caption noise into %d of %d pairs (ratio %.3f, seed %d).", num_noisy, n, ratio, seed)
    return noisy.add_column("caption_source", source, feature=datasets.Value("int64"))


def _truncate(text: str, max_words: int) -> str:
    return " ".join(text.split()[:max_words])


def truncate_captions(
    dataset: datasets.Dataset, ratio: float, *, max_words: int = 2, seed: int = 0, text_column: str = "text"
) -> datasets.Dataset:
    """Make round(ratio * N) random captions incomplete by keeping only their first `max_words` words.

    Only captions longer than `max_words` words can be picked (with several captions per image: any of them), so every
    pair marked `is_incomplete` really lost words; when fewer are eligible, all eligible ones are cut (logged).
    """
    _check(dataset, ratio, text_column, "is_incomplete")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}.")
    texts = column_values(dataset, text_column)
    eligible = [
        row
        for row, text in enumerate(texts)
        if any(len(caption.split()) > max_words for caption in (text if isinstance(text, list) else [text]))
    ]
    num_cut = round(ratio * len(dataset))
    if num_cut > len(eligible):
        logger.warning(
            "Asked to truncate %d captions but only %d have more than %d words; truncating those.",
            num_cut,
            len(eligible),
            max_words,
        )
        num_cut = len(eligible)
    rng = np.random.default_rng(seed)
    cut = np.zeros(len(dataset), dtype=bool)
    cut[rng.choice(np.asarray(eligible, dtype=np.int64), size=num_cut, replace=False)] = True
    new_texts = [
        ([_truncate(c, max_words) for c in text] if isinstance(text, list) else _truncate(text, max_words))
        if is_cut
        else text
        for text, is_cut in zip(texts, cut, strict=True)
    ]
    truncated = _replace_column(dataset, text_column, new_texts)
    return truncated.add_column("is_incomplete", cut.tolist(), feature=datasets.Value("bool"))
