"""Loaders of the offline Debian datasets, on small subsets built into a temporary cache directory."""

import os
from pathlib import Path

import datasets
import PIL.Image
import PIL.PngImagePlugin
import pytest

from trainers.data import real_datasets
from trainers.data.real_datasets import (
    DEBIAN_SOURCES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_TEMPLATES,
    MissingDataPackageError,
    load_emoji,
    load_fashion_mnist,
    load_openclipart,
    load_tuxpaint_stamps,
)


def needs_package(name):
    package, path = DEBIAN_SOURCES[name]
    return pytest.mark.skipif(
        not os.path.exists(path),
        reason=f"Debian package {package} not installed ({path} missing): "
        f"apt-get install -y --no-install-recommends {package}",
    )


def assert_pairs(dataset_dict, size):
    assert set(dataset_dict) == {"train", "test"}
    for split in dataset_dict.values():
        assert len(split) == size
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["index"] == datasets.Value("int64") and split["index"] == list(range(size))
        assert all(isinstance(text, str) and text.strip() for text in split["text"])


@needs_package("fashion_mnist")
def test_fashion_mnist_subset_and_cache(tmp_path, monkeypatch):
    data = load_fashion_mnist(max_samples_per_split=32, cache_dir=tmp_path)
    assert_pairs(data, 32)
    train = data["train"]
    assert train.features["label"].names == list(FASHION_MNIST_CLASSES)
    assert train["label"][:10] == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published order of the training labels
    assert data["test"]["label"][:5] == [9, 2, 1, 1, 6]
    captions = {t.format(c): label for label, c in enumerate(FASHION_MNIST_CLASSES) for t in FASHION_MNIST_TEMPLATES}
    assert [captions[text] for text in train["text"]] == train["label"]  # each caption names its image's class
    assert len({text.split(" ")[0] + text.split(" ")[1] for text in train["text"]}) > 1  # several templates in use
    image = train[0]["image"]
    assert image.size == (28, 28) and image.mode == "L"

    # a second call memory-maps the cache: nothing is read from the package again
    monkeypatch.setattr(real_datasets, "_read_idx", lambda path, limit: pytest.fail("the cached dataset was rebuilt"))
    again = load_fashion_mnist(max_samples_per_split=32, cache_dir=tmp_path)
    assert again["train"]["text"] == train["text"]
    assert again["train"].cache_files and str(tmp_path) in again["train"].cache_files[0]["filename"]


@needs_package("fashion_mnist")
def test_fashion_mnist_captions_are_seeded(tmp_path):
    first = load_fashion_mnist(max_samples_per_split=16, cache_dir=tmp_path / "a")["train"]["text"]
    same = load_fashion_mnist(max_samples_per_split=16, cache_dir=tmp_path / "b")["train"]["text"]
    other = load_fashion_mnist(max_samples_per_split=16, seed=1, cache_dir=tmp_path / "a")["train"]["text"]
    assert first == same and first != other


def test_missing_package_says_how_to_install(tmp_path):
    fix = "apt-get install -y --no-install-recommends"
    with pytest.raises(MissingDataPackageError, match=f"{fix} dataset-fashion-mnist"):
        load_fashion_mnist(data_dir=tmp_path / "absent", cache_dir=tmp_path)
    with pytest.raises(MissingDataPackageError, match=f"{fix} openclipart-png"):
        load_openclipart(data_dir=tmp_path / "absent", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"test_size must be in \(0, 1\)"):
        load_emoji(test_size=0.0, cache_dir=tmp_path)


@needs_package("tuxpaint_stamps")
def test_tuxpaint_stamps_subset(tmp_path):
    data = load_tuxpaint_stamps(max_samples_per_split=6, cache_dir=tmp_path)
    assert_pairs(data, 6)
    root = Path(DEBIAN_SOURCES["tuxpaint_stamps"][1])
    train = data["train"]
    for example in train:
        with open((root / example["file_name"]).with_suffix(".txt"), encoding="utf-8") as f:
            assert example["text"] == " ".join(f.readline().split())  # the English line
        assert example["image"].mode == "RGB" and max(example["image"].size) <= 256
        category = train.features["category"].int2str(example["category"])
        assert example["file_name"].startswith(category + "/")
    assert set(train["file_name"]).isdisjoint(data["test"]["file_name"])


@needs_package("openclipart")
def test_openclipart_subset(tmp_path):
    data = load_openclipart(max_samples_per_split=6, max_image_size=64, cache_dir=tmp_path)
    root = Path(DEBIAN_SOURCES["openclipart"][1])
    for split in data.values():
        assert 4 <= len(split) <= 6  # files without a title are skipped
        assert split["index"] == list(range(len(split)))
        for example in split:
            with PIL.Image.open(root / example["file_name"]) as original:
                original.load()
                title = " ".join((original.info.get("Title") or original.info.get("Description")).split())
            assert example["text"] == title
            assert example["image"].mode == "RGB" and max(example["image"].size) <= 64


@needs_package("emoji")
def test_emoji_subset(tmp_path):
    emoji = pytest.importorskip("emoji", reason="PyPI package emoji not installed: pip install emoji")
    data = load_emoji(max_samples_per_split=5, cache_dir=tmp_path)
    assert_pairs(data, 5)
    for example in data["train"]:
        assert example["text"] == emoji.EMOJI_DATA[example["emoji"]]["en"].strip(":").replace("_", " ")
        image = example["image"]
        assert image.size == (136, 128) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (255, 255, 255) and image.getextrema() != ((255, 255),) * 3


def test_tuxpaint_layout_on_generated_files(tmp_path):
    """The file rules on a generated stamps tree: PNG + .txt pairs only, the first (English) line, RGB on white."""
    root = tmp_path / "stamps"
    (root / "animals" / "cats").mkdir(parents=True)
    (root / "food").mkdir()
    PIL.Image.new("RGB", (300, 150), (10, 20, 30)).save(root / "animals" / "cats" / "tabby.png")
    (root / "animals" / "cats" / "tabby.txt").write_text("A  tabby cat.\nfr.utf8=Un chat tigré.\n", encoding="utf-8")
    PIL.Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "food" / "ghost.png")
    (root / "food" / "ghost.txt").write_text("An invisible apple.\nde.utf8=Ein Apfel.\n", encoding="utf-8")
    PIL.Image.new("RGB", (8, 8)).save(root / "food" / "tabby_mirror.png")  # no .txt: not a stamp
    (root / "food" / "pear.svg").write_text("<svg/>")
    (root / "food" / "pear.txt").write_text("A pear.\n")  # SVG only: not included
    data = load_tuxpaint_stamps(data_dir=root, cache_dir=tmp_path / "cache", test_size=0.5, max_image_size=100)
    examples = {ex["file_name"]: ex for split in data.values() for ex in split}
    assert sorted(examples) == ["animals/cats/tabby.png", "food/ghost.png"]
    tabby, ghost = examples["animals/cats/tabby.png"], examples["food/ghost.png"]
    assert tabby["text"] == "A tabby cat." and ghost["text"] == "An invisible apple."
    assert tabby["image"].size == (100, 50) and tabby["image"].getpixel((5, 5)) == (10, 20, 30)
    assert ghost["image"].mode == "RGB" and ghost["image"].getpixel((5, 5)) == (255, 255, 255)
    assert data["train"].features["category"].names == ["animals", "food"]


def test_openclipart_titles_on_generated_files(tmp_path, monkeypatch):
    root = tmp_path / "png"
    (root / "animals").mkdir(parents=True)

    def save(name, size=(10, 10), **text):
        info = PIL.PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        PIL.Image.new("P", size).save(root / "animals" / name, pnginfo=info)

    save("a.png", Title="Funny  frog")
    save("b.png", Description="only a description")
    save("c.png")  # neither: skipped
    save("d.png", size=(40, 40), Title="a poster")  # over the (patched) pixel limit: skipped
    (root / "animals" / "e.png").write_bytes(b"\x89PNG broken")
    monkeypatch.setattr(real_datasets, "MAX_SOURCE_PIXELS", 1000)
    found = {}
    for seed in range(4):  # the seeded split decides which files land in the 2-file test split
        try:
            data = load_openclipart(data_dir=root, cache_dir=tmp_path / "cache", test_size=0.4, seed=seed)
        except ValueError as err:  # the test file was one of the unusable ones
            assert "None of the 2 test items gave a usable example" in str(err)
            continue
        assert len(data["test"]) == 1  # one usable file of two
        found.update({ex["file_name"]: ex["text"] for split in data.values() for ex in split})
    assert found == {"animals/a.png": "Funny frog", "animals/b.png": "only a description"}
    with pytest.raises(ValueError, match="test_size=0.01 of 5 items leaves an empty split"):
        load_openclipart(data_dir=root, cache_dir=tmp_path / "cache", test_size=0.01)
