"""Issue 17 through the commands: every skipped pair reaches nlip-audit's summary (and HTML) and nlip-train's summary
JSON and model card; bad arguments fail early and named; `--resume_from_checkpoint True` resumes the newest
checkpoint; `--streaming` trains from loopback-HTTP shards with a brace range."""

import contextlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from shard_server import serve_directory

from nlip_cli import audit, train
from nlip_testing import add_file, save_tiny_dual_checkpoint
from trainers.data.pairs import MISSING_IMAGE, UNLISTED_IMAGE


@pytest.fixture(scope="module")
def dual_checkpoint(tmp_path_factory):
    return save_tiny_dual_checkpoint(tmp_path_factory.mktemp("dual"))


@pytest.fixture(scope="module")
def folder_with_broken_files(tmp_path_factory):
    """25 metadata rows, 2 of them naming missing files, and one image no row lists."""
    root = tmp_path_factory.mktemp("broken")
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as metadata:
        for i in range(25):
            if i not in (3, 17):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
            metadata.write(json.dumps({"file_name": f"{i:02d}.png", "text": f"a photo of thing {i}"}) + "\n")
    Image.new("RGB", (8, 8)).save(root / "unlisted.png")
    return str(root)


def test_audit_summary_and_report_list_the_broken_files(tmp_path, dual_checkpoint, folder_with_broken_files):
    """Before: `"pairs_in_data": 23, "pairs_not_scored": 0` for 25 pairs with 2 missing files, and no file named."""
    result = audit.main(["--model_name_or_path", dual_checkpoint, "--train_dir", folder_with_broken_files,
                         "--output_dir", str(tmp_path), "--disable_tqdm", "--report_rows", "5"])
    skipped = result["summary"]["skipped_pairs"]
    root = folder_with_broken_files
    assert skipped == {MISSING_IMAGE: 2, UNLISTED_IMAGE: 1, "files": [
        os.path.join(root, "unlisted.png"), os.path.join(root, "03.png"), os.path.join(root, "17.png")]}
    assert json.load(open(result["paths"]["summary"]))["skipped_pairs"] == skipped
    html = open(result["paths"]["html"], encoding="utf-8").read()
    assert "17.png" in html and "unlisted.png" in html


def test_train_summary_and_model_card_count_the_skips(tmp_path, dual_checkpoint, folder_with_broken_files):
    output_dir = tmp_path / "out"
    report = train.main(["--model_name_or_path", dual_checkpoint, "--train_dir", folder_with_broken_files,
                         "--output_dir", str(output_dir), "--max_steps", "2", "--per_device_train_batch_size", "8",
                         "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
                         "--save_strategy", "steps", "--save_steps", "1"])
    assert report["skipped_pairs"][MISSING_IMAGE] == 2 and report["skipped_pairs"][UNLISTED_IMAGE] == 1
    summary = json.load(open(output_dir / "nlip_training_summary.json"))
    assert summary["skipped_pairs"][MISSING_IMAGE] == 2 and len(summary["skipped_pairs"]["files"]) == 3
    card = (output_dir / "README.md").read_text()
    assert "## Training pairs left out" in card and "| missing image | 2 |" in card and "17.png" in card

    # `--resume_from_checkpoint True` resumes the newest checkpoint of output_dir (before: a path "True" not found)
    resumed = train.main(["--model_name_or_path", dual_checkpoint, "--train_dir", folder_with_broken_files,
                          "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "8",
                          "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
                          "--resume_from_checkpoint", "True"])
    assert resumed["train_metrics"]["epoch"] > 0
    state = json.load(open(output_dir / "trainer_state.json"))
    assert state["global_step"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--per_device_train_batch_size", "0"], r"`per_device_train_batch_size` \(--per_device_train_batch_size\) must be"),
    (["--gradient_accumulation_steps", "0"], r"`gradient_accumulation_steps` \(--gradient_accumulation_steps\) must"),
])
def test_zero_arguments_fail_before_loading(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        train.main(["--train_dir", str(tmp_path / "nowhere"), "--model_size", "tiny", "--output_dir", str(tmp_path),
                    *argv])


def _png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 0, 255 - value)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("through", ["http", "pipe"])
def test_streaming_training_from_loopback_http_or_a_pipe_command(through, tmp_path, dual_checkpoint):
    """`--train_shards` as URLs of a loopback HTTP server, or as webdataset `pipe:` commands that write the files."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(8):
                add_file(tar, f"{shard}{i:04d}.png", _png(20 * i))
                add_file(tar, f"{shard}{i:04d}.txt", b"a photo")
    with serve_directory(folder) if through == "http" else contextlib.nullcontext() as server:
        shards = server.url + "/{00000..00001}.tar" if through == "http" else f"pipe:cat {folder}/{{00000..00001}}.tar"
        report = train.main(["--model_name_or_path", dual_checkpoint, "--train_shards", shards, "--streaming",
                             "--max_steps", "3", "--per_device_train_batch_size", "4", "--output_dir",
                             str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"])
    assert report["num_train_pairs"] is None and report["pairs_seen"] == 12
    metadata = json.load(open(tmp_path / "out" / "nlip_noise_state.json"))
    assert metadata["data_fingerprint"]["kind"] == "stream" and metadata["data_fingerprint"]["num_shards"] == 2
    assert metadata["data_fingerprint"]["first_shard"] == "00000.tar"
