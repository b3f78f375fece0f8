"""Input paths of trainers.data.pairs: imagefolder (jsonl/csv), webdataset shards (map-style and streaming), in-memory."""

import csv
import io
import json
import logging
import tarfile

import datasets
import numpy as np
import PIL.Image
import pytest
from datasets.distributed import split_dataset_by_node
from nlip_testing import add_file
from test_collator import tiny_processor
from torch.utils.data import DataLoader

from trainers.data.collator import ImageTextCollator
from trainers.data.pairs import (
    EMPTY_CAPTION,
    MISSING_IMAGE,
    UNDECODABLE_IMAGE,
    LOST_COLUMN,
    TRUNCATED_SHARD,
    InvalidPairError,
    SkipReport,
    dataset_rows,
    load_imagefolder_pairs,
    load_webdataset_pairs,
    prepare_pairs,
)


@pytest.fixture
def processor():
    return tiny_processor()


def test_dataset_rows_reads_in_order_batched_or_not():
    """`dataset_rows` gives `dataset[row]` for each row, in the order asked (repeats too), for an Arrow dataset (one
    batched read) and for a plain sequence."""
    pairs = datasets.Dataset.from_dict({"index": [10, 11, 12, 13], "text": ["a", "b", "c", "d"]})
    rows = np.array([3, 0, 3, 1])
    assert dataset_rows(pairs, rows) == [pairs[int(row)] for row in rows]
    assert dataset_rows(pairs.with_format("torch"), [2])[0]["index"].item() == 12
    assert dataset_rows(["a", "b", "c"], [2, 0]) == ["c", "a"]


def image_bytes(value: int, fmt: str = "PNG", size: int = 8) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (size, size), (value, 255 - value, 0)).save(buffer, fmt)
    return buffer.getvalue()


def write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i}.png").write_bytes(image_bytes(20 * i))


@pytest.fixture
def jsonl_folder(tmp_path):
    """4 good images with 2 captions each, plus a truncated PNG, a missing file and an empty caption list."""
    folder = tmp_path / "jsonl"
    write_images(folder, 5)
    (folder / "bad.png").write_bytes(image_bytes(0)[:40])
    rows = [{"file_name": f"{i}.png", "text": [f"caption {i} a", f"caption {i} b"]} for i in range(4)]
    rows += [
        {"file_name": "4.png", "text": ["", "  "]},
        {"file_name": "bad.png", "text": ["a truncated image"]},
        {"file_name": "missing.png", "text": ["no such file"]},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_imagefolder_jsonl_skips_and_counts_bad_pairs(jsonl_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        dataset, report = load_imagefolder_pairs(jsonl_folder, split="train", return_report=True)
    assert len(dataset) == 4
    assert dataset["text"] == [[f"caption {i} a", f"caption {i} b"] for i in range(4)]
    assert dataset["index"] == [0, 1, 2, 3]
    assert dataset.features["index"] == datasets.Value("int64")
    assert dataset[2]["image"].getpixel((0, 0)) == (40, 215, 0)
    assert report.skipped == 3
    assert report.reasons == {UNDECODABLE_IMAGE: 1, MISSING_IMAGE: 1, EMPTY_CAPTION: 1}
    assert {key.rsplit("/", 1)[-1] for key, _ in report.examples} == {"bad.png", "missing.png", "4.png"}
    assert "bad.png" in caplog.text and "missing.png" in caplog.text
    assert str(report) == "3 image-text pairs skipped (1 empty caption, 1 missing image, 1 undecodable image)"


def test_imagefolder_strict_names_the_file(jsonl_folder):
    with pytest.raises(InvalidPairError, match=r"jsonl/4\.png: empty caption") as err:
        load_imagefolder_pairs(jsonl_folder, split="train", strict=True)
    assert "3 of 7 pairs are invalid" in str(err.value)


def test_imagefolder_csv_repeated_rows_become_caption_lists(tmp_path):
    folder = tmp_path / "csv"
    write_images(folder, 3)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "source"])
        for i in range(3):
            for j in range(i + 1):  # image i has i + 1 captions
                writer.writerow([f"{i}.png", f"image {i} caption {j}", f"site{i}"])
    dataset = load_imagefolder_pairs(folder, caption_column="caption", split="train")
    assert set(dataset.column_names) == {"image", "text", "source", "index"}
    assert dataset["text"] == [[f"image {i} caption {j}" for j in range(i + 1)] for i in range(3)]
    assert dataset["source"] == ["site0", "site1", "site2"]
    assert dataset["index"] == [0, 1, 2]


def test_imagefolder_csv_one_caption_per_image_stays_a_string(tmp_path):
    folder = tmp_path / "csv1"
    write_images(folder, 2)
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a red square\n1.png,a green square\n")
    dataset = load_imagefolder_pairs(folder, split="train")
    assert dataset["text"] == ["a red square", "a green square"]


def test_imagefolder_splits_and_missing_caption_column(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        write_images(tmp_path / "split" / split, count)
        rows = [{"file_name": f"{i}.png", "text": f"{split} {i}"} for i in range(count)]
        (tmp_path / "split" / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_imagefolder_pairs(tmp_path / "split")
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 3, "test": 2}
    assert splits["test"]["index"] == [0, 1]
    with pytest.raises(ValueError, match=r"no column 'caption'; columns present: \['image', 'text'\]"):
        load_imagefolder_pairs(tmp_path / "split", caption_column="caption")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_imagefolder_pairs(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------- webdataset


@pytest.fixture
def shards(tmp_path):
    """Shard 0: 3 good jpg+txt samples, a truncated jpg, a caption without image. Shard 1: png+json, one empty."""
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(3):
            add_file(tar, f"{i:05d}.jpg", image_bytes(30 * i, "JPEG"))
            add_file(tar, f"{i:05d}.txt", f"caption {i}".encode())
        add_file(tar, "00003.jpg", image_bytes(0, "JPEG")[:50])
        add_file(tar, "00003.txt", b"truncated jpeg")
        add_file(tar, "00004.txt", b"no image at all")
    with tarfile.open(folder / "00001.tar", "w") as tar:
        for i in range(5, 8):
            add_file(tar, f"{i:05d}.png", image_bytes(30 * i))
            add_file(tar, f"{i:05d}.json", json.dumps({"caption": f"json caption {i}", "url": "x"}).encode())
        add_file(tar, "00008.png", image_bytes(1))
        add_file(tar, "00008.json", json.dumps({"caption": ""}).encode())
    return folder


def test_webdataset_map_style(shards):
    dataset, report = load_webdataset_pairs(shards, return_report=True)
    assert dataset["text"] == ["caption 0", "caption 1", "caption 2"] + [f"json caption {i}" for i in range(5, 8)]
    assert dataset["key"] == [f"00000.tar/{i:05d}" for i in range(3)] + [f"00001.tar/{i:05d}" for i in range(5, 8)]
    assert dataset["index"] == list(range(6))
    assert dataset[4]["image"].size == (8, 8)
    assert report.reasons == {UNDECODABLE_IMAGE: 1, MISSING_IMAGE: 1, EMPTY_CAPTION: 1}
    assert sorted(key for key, _ in report.examples) == ["00000.tar/00003", "00000.tar/00004", "00001.tar/00008"]
    with pytest.raises(InvalidPairError, match=r"00000\.tar/00003: undecodable image"):
        load_webdataset_pairs(str(shards / "*.tar"), strict=True)


def test_webdataset_truncated_and_corrupt_shards(shards, caplog):
    shard = shards / "00001.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("00006.png").offset_data + 10
    shard.write_bytes(shard.read_bytes()[:cut])  # the shard now ends inside the data of 00006.png
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        dataset, report = load_webdataset_pairs(shards, return_report=True)
    assert dataset["text"] == ["caption 0", "caption 1", "caption 2", "json caption 5"]
    assert "00001.tar is truncated or corrupt (ReadError: unexpected end of data): 1 complete samples read, " \
        "at least 1 sample lost" in caplog.text
    # shard 0's bad samples, and the sample cut in shard 1
    assert report.reasons == {UNDECODABLE_IMAGE: 1, MISSING_IMAGE: 1, TRUNCATED_SHARD: 1}
    assert str(shard) in report.files
    stream = [example for example in load_webdataset_pairs(shards, streaming=True)]
    assert [example["index"] for example in stream if not example[LOST_COLUMN]] == list(range(6))
    assert [example[LOST_COLUMN] for example in stream if example[LOST_COLUMN]] == [1]  # a marker row counts the loss

    shard.write_bytes(b"not a tar header" * 64)
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        assert len(load_webdataset_pairs(shards)) == 3
    assert "00001.tar is truncated or corrupt" in caplog.text and "0 complete samples read" in caplog.text
    with pytest.raises(InvalidPairError, match=r"Webdataset shard .*00001\.tar is truncated or corrupt"):
        load_webdataset_pairs(shards, strict=True)


def test_webdataset_split_mapping_and_keys(shards):
    only_png = load_webdataset_pairs({"train": [shards / "00001.tar"]}, image_keys=("png",), caption_keys=("json",))
    assert only_png["train"]["text"] == [f"json caption {i}" for i in range(5, 8)]
    with pytest.raises(FileNotFoundError, match="No webdataset tar shards found"):
        load_webdataset_pairs(shards / "*.tgz")


def test_webdataset_streaming_index_and_skip_in_collator(shards, processor):
    stream = load_webdataset_pairs(shards, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    examples = list(stream)
    # index = shard offset (5 samples in shard 0) + position in the shard, bad samples included
    assert [ex["index"] for ex in examples] == list(range(9))
    assert examples[5]["text"] == "json caption 5" and examples[4]["image"] is None
    assert isinstance(examples[0]["image"], dict) and examples[0]["image"]["path"] == "00000.tar/00000.jpg"

    collator = ImageTextCollator(processor, max_length=8)
    batch = collator(examples)
    assert batch["index"].tolist() == [0, 1, 2, 5, 6, 7]
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert collator.skip_report.reasons == {UNDECODABLE_IMAGE: 1, MISSING_IMAGE: 1, EMPTY_CAPTION: 1}
    with pytest.raises(InvalidPairError, match=r"00000\.tar/00003: undecodable image"):
        ImageTextCollator(processor, strict=True)(examples)


def test_webdataset_streaming_index_stable_across_workers(shards):
    stream = load_webdataset_pairs(shards, streaming=True)
    assert stream.num_shards == 2
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda example: example["index"])
    assert sorted(loader) == list(range(9))
    second_node = split_dataset_by_node(stream, rank=1, world_size=2)
    assert [example["index"] for example in second_node] == [5, 6, 7, 8]


# ---------------------------------------------------------------------------------------------------- in memory


def test_prepare_pairs_renames_validates_and_indexes(tmp_path):
    images = [PIL.Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(4)]
    raw = datasets.Dataset.from_dict(
        {"img": images, "caption": ["one", "", "three", "four"], "extra": [1, 2, 3, 4]},
        features=datasets.Features(
            {"img": datasets.Image(), "caption": datasets.Value("string"), "extra": datasets.Value("int32")}
        ),
    )
    dataset, report = prepare_pairs(raw, image_column="img", text_column="caption", return_report=True)
    assert dataset.column_names == ["image", "text", "extra", "index"]
    assert dataset["text"] == ["one", "three", "four"]
    assert dataset["extra"] == [1, 3, 4]
    assert dataset["index"] == [0, 1, 2]
    assert dataset[1]["image"].getpixel((0, 0)) == (2, 0, 0)
    assert report.reasons == {EMPTY_CAPTION: 1} and report.examples == [("row 1", EMPTY_CAPTION)]
    with pytest.raises(InvalidPairError, match="row 1: empty caption"):
        prepare_pairs(raw, image_column="img", text_column="caption", strict=True)


def test_prepare_pairs_path_column_and_errors(tmp_path):
    write_images(tmp_path, 2)
    paths = [str(tmp_path / "0.png"), str(tmp_path / "gone.png"), str(tmp_path / "1.png")]
    raw = datasets.Dataset.from_dict({"path": paths, "text": ["a", "b", "c"]})
    dataset, report = prepare_pairs(raw, image_column="path", return_report=True)
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset["text"] == ["a", "c"] and report.reasons == {MISSING_IMAGE: 1}
    assert report.examples[0][0].endswith("gone.png")

    with pytest.raises(ValueError, match=r"no column 'caption'; columns present: \['path', 'text'\]"):
        prepare_pairs(raw, image_column="path", text_column="caption")
    with pytest.raises(TypeError, match="must hold images"):
        prepare_pairs(datasets.Dataset.from_dict({"image": [1, 2], "text": ["a", "b"]}))
    with pytest.raises(ValueError, match="already has a 'text' column"):
        prepare_pairs(raw.add_column("caption", ["x", "y", "z"]), image_column="path", text_column="caption")


def test_skip_report_logs_only_the_first_skips(caplog):
    report = SkipReport()
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        for i in range(30):
            report.add(f"file{i}.png", MISSING_IMAGE)
    assert report.skipped == 30 and len(report.examples) == 20
    assert "file19.png" in caplog.text and "file20.png" not in caplog.text
    assert caplog.text.count("further skips are only counted") == 1
    other = SkipReport()
    other.add("x.png", EMPTY_CAPTION)
    report.update(other)
    assert report.reasons == {MISSING_IMAGE: 30, EMPTY_CAPTION: 1} and len(report.examples) == 20


def test_validation_is_cached_for_file_backed_data(jsonl_folder):
    """A second load re-reads the cached check (same counts), it does not depend on side effects of the map."""
    first = load_imagefolder_pairs(jsonl_folder, split="train", return_report=True)[1]
    second = load_imagefolder_pairs(jsonl_folder, split="train", return_report=True)[1]
    assert first.reasons == second.reasons and first.skipped == 3
    assert np.array_equal(load_imagefolder_pairs(jsonl_folder, split="train")["index"], np.arange(4))
