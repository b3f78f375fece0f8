"""Data that loses nothing silently (issue 17): truncated shards (data or header) warn with the shard and the count lost,
`strict=True` raises; streaming from brace ranges and loopback HTTP without a pre-scan, with a stable index; broken
metadata names the file and line; unlisted images, images over the pixel limit and all-invalid data are counted or
named."""

import json
import logging
import os
import tarfile
import time

import datasets
import PIL.Image
import pytest
from datasets.distributed import split_dataset_by_node
from shard_server import serve_directory
from nlip_testing import add_file, png, write_shard
from test_collator import tiny_processor

from trainers.data.collator import SKIPPED_KEY, ImageTextCollator, is_empty_batch
from trainers.data.pairs import (
    LOST_COLUMN,
    TOO_MANY_PIXELS,
    TRUNCATED_SHARD,
    UNLISTED_IMAGE,
    InvalidPairError,
    MetadataError,
    load_imagefolder_pairs,
    load_webdataset_pairs,
)
from trainers.data.shards import (
    expand_braces,
    iter_shard_samples,
    resolve_shards,
    shard_count,
    shard_name,
    sidecar_count,
    tar_argument,
)
from trainers.data.sources import DataArguments, load_pairs


@pytest.fixture
def twelve(tmp_path):
    folder = tmp_path / "twelve"
    folder.mkdir()
    return write_shard(folder / "00000.tar", 0, 12)


def cut_inside_header(shard, member):
    with tarfile.open(shard) as tar:
        cut = tar.getmember(member).offset + 100  # 100 bytes into the member's 512-byte header
    shard.write_bytes(shard.read_bytes()[:cut])


# ---------------------------------------------------------------------------------------------- truncated shards


def test_shard_cut_inside_a_header_warns_with_the_count_lost(twelve, caplog):
    """Before: tarfile ends quietly at a header cut short (8 of 12 samples dropped, no warning, strict passed)."""
    cut_inside_header(twelve, "00004.png")
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        dataset, report = load_webdataset_pairs(twelve, return_report=True)
    assert dataset["key"] == [f"00000.tar/{i:05d}" for i in range(4)]
    assert "00000.tar is truncated or corrupt (cut inside a tar header): 4 complete samples read, at least 1 sample" \
        " lost (the damaged one; without a _stats.json sidecar" in caplog.text
    assert report.reasons == {TRUNCATED_SHARD: 1} and report.files == [str(twelve)]
    with pytest.raises(InvalidPairError, match=r"00000\.tar is truncated or corrupt \(cut inside a tar header\)"):
        load_webdataset_pairs(twelve, strict=True)
    with pytest.raises(InvalidPairError, match="cut inside a tar header"):
        list(load_webdataset_pairs(twelve, streaming=True, strict=True))

    # With img2dataset's sidecar count the exact loss is known: 8 of 12.
    (twelve.parent / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 12}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        stream = list(load_webdataset_pairs(twelve, streaming=True))
    assert [ex["index"] for ex in stream if not ex[LOST_COLUMN]] == [0, 1, 2, 3]
    assert "8 of its 12 samples lost (sidecar count)" in caplog.text
    collator = ImageTextCollator(tiny_processor(), max_length=8)
    batch = collator(stream)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch[SKIPPED_KEY] == {TRUNCATED_SHARD: 8, "files": [str(twelve)]}


def test_shard_cut_inside_data_and_corrupt_header(twelve, caplog):
    data = twelve.read_bytes()
    with tarfile.open(twelve) as tar:
        header = tar.getmember("00006.txt").offset
        cut = tar.getmember("00009.png").offset_data + 20
    twelve.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        assert len(load_webdataset_pairs(twelve)) == 9
    assert "unexpected end of data" in caplog.text and "9 complete samples read" in caplog.text
    damaged = bytearray(data)
    damaged[header : header + 100] = b"\x07" * 100  # a corrupt header in the middle: the shard ends at 00006
    twelve.write_bytes(bytes(damaged))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        dataset, report = load_webdataset_pairs(twelve, return_report=True)
    # 00006.png was read whole before the damaged header of 00006.txt: the pair is kept, and found to lack a caption
    assert len(dataset) == 6 and report.reasons == {TRUNCATED_SHARD: 1, "empty caption": 1}
    assert "corrupt tar header" in caplog.text and "7 complete samples read" in caplog.text
    assert shard_count(str(twelve)) == 7  # the header scan stops where reading stops: indices stay consistent


def test_shard_without_end_of_archive_marker(twelve, caplog):
    with tarfile.open(twelve) as tar:
        boundary = tar.getmember("00010.png").offset  # a cut at a block boundary, right before a header
    twelve.write_bytes(twelve.read_bytes()[:boundary])
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        assert len(load_webdataset_pairs(twelve)) == 10
    assert "no end-of-archive marker" in caplog.text


# -------------------------------------------------------------------------------------------- shard resolution


def test_brace_ranges_and_lists():
    assert expand_braces("s/{00..02}.tar") == ["s/00.tar", "s/01.tar", "s/02.tar"]
    assert expand_braces("s/{8..10}.tar") == ["s/8.tar", "s/9.tar", "s/10.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]


def test_resolve_local_brace_range_and_errors(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"{i:05d}.tar", 10 * i, 2)
    (tmp_path / "00000_stats.json").write_text("{}")
    assert resolve_shards(str(tmp_path / "{00000..00002}.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert resolve_shards(tmp_path) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    with pytest.raises(FileNotFoundError, match=r"No webdataset tar shards found for '.*00003\.tar'"):
        resolve_shards(str(tmp_path / "{00000..00003}.tar"))


# ---------------------------------------------------------------------------------------- streaming over HTTP


def test_stream_from_loopback_http_without_a_prescan(tmp_path, caplog):
    """Streaming from `http://` brace ranges: the same stable indices as from disk; nothing is read before iteration;
    a process that starts at shard 1 learns shard 0's length from its sidecar alone, or without one by reading shard 0
    once (with a warning)."""
    folder = tmp_path / "http"
    folder.mkdir()
    for i in range(2):
        write_shard(folder / f"{i:05d}.tar", 100 * i, 6, padding=40_000)
    local = [(ex["key"], ex["index"]) for ex in load_webdataset_pairs(str(folder / "*.tar"), streaming=True)]
    assert [index for _, index in local] == list(range(12))
    with serve_directory(folder) as server:
        stream = load_webdataset_pairs(server.url + "/{00000..00001}.tar", streaming=True)
        assert server.bytes_sent == 0  # building the stream reads nothing
        assert stream.num_shards == 2
        assert [(ex["key"], ex["index"]) for ex in stream] == local
        shard_count.cache_clear()
        second = split_dataset_by_node(stream, rank=1, world_size=2)
        with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
            first_example = next(iter(second))
        assert first_example["key"] == "00001.tar/00100" and first_example["index"] == 6
        assert "No _stats.json sidecar for http://" in caplog.text

        (folder / "00000_stats.json").write_text(json.dumps({"successes": 6}))
        shard_count.cache_clear()
        before = dict(server.bytes_by_file)
        assert next(iter(second))["index"] == 6
        assert server.bytes_by_file["00000.tar"] == before["00000.tar"]  # the sidecar alone gave the count

        batch = ImageTextCollator(tiny_processor(), max_length=8)(list(stream.take(4)))
        assert batch["index"].tolist() == [0, 1, 2, 3] and batch["pixel_values"].shape[0] == 4
        mapped = load_webdataset_pairs(server.url + "/{00000..00001}.tar")
        assert mapped["key"] == [key for key, _ in local]


def test_stream_from_a_listing_filesystem_glob(tmp_path):
    """A glob on a filesystem that lists (fsspec's `memory://` here; `hf://` and `s3://` take the same path): the
    shards are found by listing, sorted, and give the same pairs and indices as the local copy, streamed or mapped."""
    import fsspec

    for i in range(2):
        write_shard(tmp_path / f"{i:05d}.tar", 100 * i, 5)
    fs = fsspec.filesystem("memory")
    for i in (1, 0):  # written out of order: the listing is sorted
        fs.pipe(f"/nlip-test-shards/{i:05d}.tar", (tmp_path / f"{i:05d}.tar").read_bytes())
    fs.pipe("/nlip-test-shards/00000_stats.json", json.dumps({"successes": 5}).encode())
    try:
        assert resolve_shards("memory://nlip-test-shards/*.tar") == [
            "memory:///nlip-test-shards/00000.tar", "memory:///nlip-test-shards/00001.tar"]
        local = [(ex["key"], ex["index"], ex["text"]) for ex in load_webdataset_pairs(str(tmp_path / "*.tar"), streaming=True)]
        remote = load_webdataset_pairs("memory://nlip-test-shards/*.tar", streaming=True)
        assert [(ex["key"], ex["index"], ex["text"]) for ex in remote] == local and len(local) == 10
        mapped = load_webdataset_pairs("memory://nlip-test-shards/*.tar")
        assert mapped["index"] == list(range(10)) and mapped["text"] == [text for _, _, text in local]
        with pytest.raises(FileNotFoundError, match=r"No webdataset tar shards found for 'memory://nlip-test-shards/\*.tgz'"):
            resolve_shards("memory://nlip-test-shards/*.tgz")
    finally:
        fs.rm("/nlip-test-shards", recursive=True)


def test_remote_glob_without_listing_is_a_named_error():
    with pytest.raises(ValueError, match=r"http:// URLs have no glob; give the shards as a brace range"):
        resolve_shards("http://127.0.0.1:9/shards/*.tar")


# ------------------------------------------------------------------------------------------- pipe: commands


def test_pipe_commands_give_the_pairs_of_the_files(tmp_path):
    """`pipe:COMMAND` shards (webdataset's form, e.g. `pipe:curl -sfL URL`): a brace range expands into one command
    per shard; the pairs, keys and stable indices are those of the files, streamed or mapped."""
    for i in range(2):
        write_shard(tmp_path / f"{i:05d}.tar", 100 * i, 5)
    pattern = f"pipe:cat {tmp_path}/{{00000..00001}}.tar"
    assert resolve_shards(pattern) == [f"pipe:cat {tmp_path}/00000.tar", f"pipe:cat {tmp_path}/00001.tar"]
    local = [(ex["key"], ex["index"], ex["text"]) for ex in load_webdataset_pairs(str(tmp_path / "*.tar"), streaming=True)]
    assert [(ex["key"], ex["index"], ex["text"]) for ex in load_webdataset_pairs(pattern, streaming=True)] == local
    mapped, report = load_webdataset_pairs(pattern, return_report=True, strict=True)
    assert mapped["key"] == [key for key, _, _ in local] and report.skipped == 0


@pytest.mark.parametrize("command, argument", [
    ("pipe:curl -sfL https://host/shards/00007.tar", "https://host/shards/00007.tar"),
    ("pipe:curl -sfL http://127.0.0.1:8080/00007.tar|cat", "http://127.0.0.1:8080/00007.tar"),
    ("pipe:aws s3 cp s3://bucket/shards/00007.tar.gz -", "s3://bucket/shards/00007.tar.gz"),
    ("pipe:cat '/my shards/00007.tar'; sleep 1", "/my shards/00007.tar"),
    ("pipe:my-fetcher --id 7", "7"),
])
def test_a_pipe_shard_is_named_by_its_tar_argument(command, argument):
    assert tar_argument(command) == argument
    assert shard_name(command) == argument.rsplit("/", 1)[-1]


def test_a_pipe_command_is_counted_from_the_sidecar_beside_its_tar_argument(tmp_path, caplog):
    """A process that starts at shard 1 takes shard 0's count from the `00000_stats.json` beside the command's tar
    argument (a path or a URL) without running its command; a command naming no tar file, a missing sidecar or one on
    a protocol fsspec cannot read here (`s3://` without s3fs) give no count, and the shard is counted by a read."""
    for i in range(2):
        write_shard(tmp_path / f"{i:05d}.tar", 100 * i, 5)
    ran = tmp_path / "ran"
    pattern = f"pipe:touch {ran}; cat {tmp_path}/{{00000..00001}}.tar"
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    second = split_dataset_by_node(load_webdataset_pairs(pattern, streaming=True), rank=1, world_size=2)
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        first_example = next(iter(second))
    assert (first_example["key"], first_example["index"]) == ("00001.tar/00100", 5)
    assert "sidecar" not in caplog.text
    assert ran.exists()  # shard 1's command ran...
    ran.unlink()
    assert shard_count(f"pipe:touch {ran}; cat {tmp_path}/00000.tar") == 5 and not ran.exists()  # ...shard 0's did not
    with serve_directory(tmp_path) as server:
        assert sidecar_count(f"pipe:curl -sfL {server.url}/00000.tar") == 5
        assert sidecar_count(f"pipe:curl -sfL {server.url}/00001.tar") is None  # 404
    assert sidecar_count(f"pipe:cat {tmp_path}/00001.tar") is None
    assert sidecar_count("pipe:aws s3 cp s3://bucket/shards/00000.tar -") is None
    assert sidecar_count("pipe:my-fetcher --id 0") is None
    assert "Ignoring the sidecar" not in caplog.text


def test_a_failing_pipe_command_is_a_missing_shard_or_a_truncated_one(tmp_path, caplog):
    """A command that fails before writing is a missing shard (named, with its status and stderr); one that fails
    part-way ends the shard there: the complete samples before the cut are kept and the loss is counted."""
    with pytest.raises(FileNotFoundError, match=r"pipe: shard command 'cat .*missing\.tar' exited with status 1 after 0 "
                                                r"bytes: cat: .*missing\.tar: No such file"):
        load_webdataset_pairs(f"pipe:cat {tmp_path}/missing.tar")
    shard = write_shard(tmp_path / "00000.tar", 0, 6, padding=3000)
    with tarfile.open(shard) as tar:
        cut = tar.getmember("00003.bin").offset_data + 1000  # inside the 4th sample's data
    command = f"pipe:head -c {cut} {shard}; exit 3"
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        dataset, report = load_webdataset_pairs(command, return_report=True)
    assert dataset["key"] == ["00000.tar/00000", "00000.tar/00001", "00000.tar/00002"]
    assert report.reasons == {TRUNCATED_SHARD: 1}
    assert f"exited with status 3 after {cut} bytes" in caplog.text
    with pytest.raises(InvalidPairError, match=r"Webdataset shard pipe:head .* is truncated or corrupt"):
        load_webdataset_pairs(command, strict=True)


def test_a_pipe_command_read_in_part_is_stopped(tmp_path):
    """A sample comes as soon as the command has written it, and closing the shard stops the command, which would
    otherwise go on for a minute."""
    shard = write_shard(tmp_path / "00000.tar", 0, 3)
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    samples = iter_shard_samples(f"pipe:echo $$ > {pid_file}; cat {shard}; exec sleep 60")
    assert next(samples)[0] == "00000"
    samples.close()
    assert time.monotonic() - started < 20
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    stream = load_webdataset_pairs(f"pipe:cat {shard}; sleep 60", streaming=True)
    assert next(iter(stream))["key"] == "00000.tar/00000" and time.monotonic() - started < 40


# ------------------------------------------------------------------------------------------------- imagefolder


def folder_with(tmp_path, metadata_name, content: bytes, images=2):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(images):
        (folder / f"{i}.png").write_bytes(png(i))
    (folder / metadata_name).write_bytes(content)
    return folder


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path):
    content = b'{"file_name": "0.png", "text": "fine"}\n{"file_name": "1.png", "text": "caf\xe9"}\n'
    folder = folder_with(tmp_path, "metadata.jsonl", content)
    with pytest.raises(MetadataError, match=r"metadata\.jsonl: line 2, column 36 is not UTF-8 \(byte 0xe9\)"):
        load_imagefolder_pairs(folder, split="train")


def test_non_utf8_csv_names_the_file_and_line(tmp_path):
    folder = folder_with(tmp_path, "metadata.csv", b"file_name,text\n0.png,ok\n1.png,na\xefve\n")
    with pytest.raises(MetadataError, match=r"metadata\.csv: line 3, column 9 is not UTF-8"):
        load_imagefolder_pairs(folder, split="train")


def test_invalid_json_line_is_named(tmp_path):
    folder = folder_with(tmp_path, "metadata.jsonl", b'{"file_name": "0.png", "text": "a"}\n{"file_name": \n')
    with pytest.raises(MetadataError, match=r"metadata\.jsonl: line 2 is not valid JSON"):
        load_imagefolder_pairs(folder, split="train")


def test_unlisted_images_are_counted(tmp_path, caplog):
    folder = folder_with(tmp_path, "metadata.jsonl", b'{"file_name": "0.png", "text": "only the first"}\n', images=3)
    with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
        dataset, report = load_imagefolder_pairs(folder, split="train", return_report=True)
    assert len(dataset) == 1
    assert report.reasons == {UNLISTED_IMAGE: 2}
    assert report.to_dict() == {UNLISTED_IMAGE: 2, "files": [str(folder / "1.png"), str(folder / "2.png")]}
    assert "2 images in" in caplog.text and "have no metadata row" in caplog.text
    with pytest.raises(InvalidPairError, match="2 images in .* have no metadata row"):
        load_imagefolder_pairs(folder, split="train", strict=True)


def test_every_pair_invalid_is_named_not_a_tokenizer_error(tmp_path):
    folder = folder_with(tmp_path, "metadata.jsonl", b'{"file_name": "0.png", "text": ""}\n{"file_name": "x.png", '
                         b'"text": "gone"}\n', images=1)
    with pytest.raises(InvalidPairError, match=r"The imagefolder .*folder.* every one of its 2 image-text pairs is "
                       r"invalid \(2 image-text pairs skipped \(1 empty caption, 1 missing image\)\)"):
        load_imagefolder_pairs(folder, split="train")


def test_pixel_limit_skips_huge_images_without_decoding(tmp_path):
    """A 9500 x 9500 PNG (90 Mpx; Pillow alone would decode it) is skipped and counted under the default limit."""
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "0.png").write_bytes(png(1))
    PIL.Image.new("1", (9500, 9500)).save(folder / "huge.png")
    rows = [{"file_name": "0.png", "text": "small"}, {"file_name": "huge.png", "text": "huge"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, report = load_imagefolder_pairs(folder, split="train", return_report=True)
    assert len(dataset) == 1 and report.reasons == {TOO_MANY_PIXELS: 1}
    assert report.files == [str(folder / "huge.png")]
    dataset, report = load_imagefolder_pairs(folder, split="train", return_report=True, max_image_pixels=None)
    assert len(dataset) == 2 and not report.skipped


def test_a_sample_limit_decodes_and_counts_only_the_rows_it_keeps(tmp_path):
    """`max_samples_per_split` (`--max_train_samples` / `--max_eval_samples` with `--train_dir`) keeps the first valid
    pairs, as validating the whole folder and then cutting would, but reads no image past them: a broken image
    further on is neither decoded nor counted."""
    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    rows = []
    for i in range(8):
        name = f"{i}.png"
        (folder / "train" / name).write_bytes(b"not a png" if i in (1, 6) else png(i))
        rows.append({"file_name": name, "text": f"picture {i}"})
    (folder / "train" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for i in range(3):
        (folder / "test" / f"{i}.png").write_bytes(png(i))
    (folder / "test" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"test {i}"}) + "\n" for i in range(3)))
    whole, whole_report = load_imagefolder_pairs(folder, return_report=True)
    assert whole["train"]["text"][:4] == ["picture 0", "picture 2", "picture 3", "picture 4"]
    assert whole_report.splits["train"].skipped == 2
    limited, report = load_imagefolder_pairs(folder, return_report=True, max_samples_per_split={"train": 4})
    assert limited["train"]["text"] == whole["train"]["text"][:4] and limited["train"]["index"] == [0, 1, 2, 3]
    assert report.splits["train"].skipped == 1 and report.files == [str(folder / "train" / "1.png")]
    assert len(limited["test"]) == 3  # a split the mapping does not name is not limited
    # More than the valid pairs: every row is read, every broken one counted.
    _, report = load_imagefolder_pairs(folder, return_report=True, max_samples_per_split=10)
    assert report.splits["train"].skipped == 2
    # Through the scripts' loader: the run's skip report counts what it read.
    data = load_pairs(DataArguments(train_dir=str(folder), max_train_samples=2, max_eval_samples=1))
    assert data.train["text"] == ["picture 0", "picture 2"] and len(data.eval) == 1
    assert data.skip_reports["train"].skipped == 1 and data.skip_reports["eval"].skipped == 0


def test_streaming_all_bad_batch_is_empty_not_fatal(tmp_path):
    """Before: 'InvalidPairError: Every example of a batch of 8 was invalid' inside the DataLoader."""
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for i in range(8):
            add_file(tar, f"{i:05d}.png", png(i)[:30])
            add_file(tar, f"{i:05d}.txt", b"a caption")
    stream = load_webdataset_pairs(tmp_path / "bad.tar", streaming=True)
    batch = ImageTextCollator(tiny_processor(), max_length=8)(list(stream))
    assert is_empty_batch(batch) and batch[SKIPPED_KEY]["undecodable image"] == 8
    assert isinstance(stream, datasets.IterableDataset) and os.path.basename(batch[SKIPPED_KEY]["files"][0]) == \
        "00000.png"


def test_stream_from_a_plain_http_server_without_range_requests(tmp_path, caplog):
    """`python -m http.server` ignores Range: shards stream with plain GETs (counts too)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        write_shard(folder / f"{i:05d}.tar", 100 * i, 3, padding=40_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{{00000..00001}}.tar"
        shard_count.cache_clear()
        with caplog.at_level(logging.WARNING, logger="trainers.data.pairs"):
            second = split_dataset_by_node(load_webdataset_pairs(url, streaming=True), rank=1, world_size=2)
            assert [ex["index"] for ex in second] == [3, 4, 5]
        assert "No _stats.json sidecar for http://" in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_resampled_stream_is_endless_deterministic_and_keeps_indices(tmp_path):
    for i in range(2):
        write_shard(tmp_path / f"{i:05d}.tar", 100 * i, 3)
    plain = {ex["key"]: ex["index"] for ex in load_webdataset_pairs(tmp_path, streaming=True)}
    stream = load_webdataset_pairs(tmp_path, streaming=True, resample=True, seed=3)
    draws = [(ex["key"], ex["index"]) for ex in stream.take(30)]
    assert len(draws) == 30 and all(plain[key] == index for key, index in draws)  # a pair keeps its index
    assert draws == [(ex["key"], ex["index"]) for ex in stream.take(30)]  # the same draw again (a resume replays it)
    other = [(ex["key"], ex["index"]) for ex in load_webdataset_pairs(tmp_path, streaming=True, resample=True,
                                                                       seed=4).take(30)]
    assert other != draws
    with pytest.raises(ValueError, match="needs streaming=True"):
        load_webdataset_pairs(tmp_path, resample=True)
    # Two processes draw differently (their generators are seeded by their first shard), each from all the shards.
    first = [ex["index"] for ex in split_dataset_by_node(stream, rank=0, world_size=2).take(30)]
    second = [ex["index"] for ex in split_dataset_by_node(stream, rank=1, world_size=2).take(30)]
    assert first != second
    assert all({index // 3 for index in draw} == {0, 1} for draw in (first, second))
