"""Noisy-correspondence injection (derangement of picked captions) and caption truncation."""

import datasets
import numpy as np
import pytest

from trainers.noise.injection import inject_caption_noise, random_derangement, truncate_captions


def pairs(n, captions=None):
    captions = captions if captions is not None else [f"caption number {i}" for i in range(n)]
    return datasets.Dataset.from_dict({"image_id": list(range(n)), "text": captions, "index": list(range(n))})


@pytest.mark.parametrize("n, ratio, expected", [(20, 0.3, 6), (50, 0.5, 25), (10, 1.0, 10), (10, 0.0, 0), (7, 0.4, 3)])
def test_exact_count_and_mask_follows_caption_origin(n, ratio, expected):
    clean = pairs(n)
    noisy = inject_caption_noise(clean, ratio, seed=1)
    source = np.array(noisy["caption_source"])
    is_noisy = np.array(noisy["is_noisy"])
    assert is_noisy.sum() == expected
    assert np.array_equal(is_noisy, source != np.arange(n))  # noisy iff the caption came from another pair
    assert noisy["text"] == [clean["text"][s] for s in source]
    assert sorted(source) == list(range(n))  # captions are only moved among pairs: a permutation
    assert set(source[is_noisy]) == set(np.flatnonzero(is_noisy))  # ... among the picked pairs only
    assert all(noisy["text"][i] != clean["text"][i] for i in np.flatnonzero(is_noisy))
    assert noisy["image_id"] == clean["image_id"] and noisy["index"] == clean["index"]  # images stay put
    assert noisy.column_names == ["image_id", "text", "index", "is_noisy", "caption_source"]
    assert noisy.features["is_noisy"] == datasets.Value("bool")


def test_seeded_and_reproducible():
    clean = pairs(40)
    first, again, other = (inject_caption_noise(clean, 0.5, seed=seed) for seed in (3, 3, 4))
    assert first["text"] == again["text"] and first["is_noisy"] == again["is_noisy"]
    assert first["is_noisy"] != other["is_noisy"]


def test_identical_captions_are_marked_by_origin():
    clean = pairs(12, ["a photo of a bag"] * 6 + ["a photo of a coat"] * 6)
    noisy = inject_caption_noise(clean, 0.5, seed=0)
    is_noisy = np.array(noisy["is_noisy"])
    assert is_noisy.sum() == 6
    unchanged_text = np.array([a == b for a, b in zip(noisy["text"], clean["text"], strict=True)])
    # some picked pairs received an identical string from another pair: still noisy, by origin
    assert (is_noisy & unchanged_text).any()
    assert np.array_equal(is_noisy, np.array(noisy["caption_source"]) != np.arange(12))


def test_caption_lists_move_as_a_whole():
    clean = pairs(6, [[f"img {i} cap a", f"img {i} cap b"] for i in range(6)])
    noisy = inject_caption_noise(clean, 1.0, seed=0)
    assert [text[0].split()[1] for text in noisy["text"]] == [str(s) for s in noisy["caption_source"]]
    assert noisy.features["text"] == clean.features["text"]


def test_errors():
    with pytest.raises(ValueError, match="picks a single pair"):
        inject_caption_noise(pairs(10), 0.1)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.5"):
        inject_caption_noise(pairs(10), 1.5)
    with pytest.raises(ValueError, match="no column 'caption'"):
        inject_caption_noise(pairs(10), 0.5, text_column="caption")
    with pytest.raises(ValueError, match="already has a 'is_noisy' column"):
        inject_caption_noise(inject_caption_noise(pairs(10), 0.5), 0.5)
    with pytest.raises(TypeError, match="map-style"):
        inject_caption_noise(pairs(10).to_iterable_dataset(), 0.5)


def test_random_derangement_has_no_fixed_point():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 100):
        permutation = random_derangement(n, rng)
        assert sorted(permutation) == list(range(n)) and not np.any(permutation == np.arange(n))


def test_truncate_captions():
    captions = [f"a photo of a dog number {i}" for i in range(8)] + ["a dog", "dog"]
    clean = pairs(10, captions)
    cut = truncate_captions(clean, 0.5, max_words=2, seed=0)
    incomplete = np.array(cut["is_incomplete"])
    assert incomplete.sum() == 5 and not incomplete[8:].any()  # short captions are never picked
    for i in range(10):
        assert cut["text"][i] == ("a photo" if incomplete[i] else captions[i])
    assert cut["is_incomplete"] == truncate_captions(clean, 0.5, max_words=2, seed=0)["is_incomplete"]
    assert cut["is_incomplete"] != truncate_captions(clean, 0.5, max_words=2, seed=1)["is_incomplete"]
    # more asked than eligible: all eligible are cut
    assert sum(truncate_captions(clean, 1.0, max_words=2)["is_incomplete"]) == 8
    lists = truncate_captions(pairs(2, [["one two three", "four five six"], ["seven"]]), 0.5, max_words=1)
    assert lists["text"] == [["one", "four"], ["seven"]] and lists["is_incomplete"] == [True, False]
    with pytest.raises(ValueError, match="max_words must be >= 1"):
        truncate_captions(clean, 0.5, max_words=0)


def test_hard_swap_takes_a_caption_from_the_same_category():
    categories = ["animals"] * 10 + ["plants"] * 10 + ["alone"]
    clean = datasets.Dataset.from_dict({"text": [f"c{i}" for i in range(21)], "category": categories, "index": list(range(21))})
    noisy = inject_caption_noise(clean, 0.6, seed=2, swap_within="category")
    source, is_noisy = np.array(noisy["caption_source"]), np.array(noisy["is_noisy"])
    assert is_noisy.sum() == round(0.6 * 21) and np.array_equal(is_noisy, source != np.arange(21))
    assert noisy["text"] == [clean["text"][s] for s in source]
    for row in np.flatnonzero(is_noisy):
        if categories[row] != "alone":  # the only pair of its category falls back to another category
            assert categories[source[row]] == categories[row]
    assert noisy["is_noisy"] == inject_caption_noise(clean, 0.6, seed=2, swap_within="category")["is_noisy"]


def test_hard_swap_with_another_class_of_the_same_category():
    labels = [0, 0, 1, 1, 2, 2, 3, 3] * 3  # classes 0/1 are "tops", 2/3 "footwear"
    category = [0 if label < 2 else 1 for label in labels]
    clean = datasets.Dataset.from_dict({"text": [f"a photo of class {l}" for l in labels], "label": labels,
                                        "group": category, "index": list(range(24))})
    noisy = inject_caption_noise(clean, 1.0, seed=0, swap_within="group", differ_by="label")
    source = np.array(noisy["caption_source"])
    assert all(labels[s] != labels[i] and category[s] == category[i] for i, s in enumerate(source))
    with pytest.raises(ValueError, match="`differ_by` refines a hard swap: give `swap_within`"):
        inject_caption_noise(clean, 0.5, differ_by="label")
    with pytest.raises(ValueError, match="no column 'folder' to swap captions by"):
        inject_caption_noise(clean, 0.5, swap_within="folder")
