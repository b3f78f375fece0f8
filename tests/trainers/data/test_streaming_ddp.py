"""The README's multi-process CPU recipe, as written: `torchrun --nproc_per_node 2 -m nlip_cli.train ... --ddp_backend
gloo --use_cpu true`, streaming webdataset shards from a loopback HTTP server (a brace range). The run is killed with
SIGKILL after its first checkpoint and resumed with `--resume_from_checkpoint latest`: it ends with the weights and loss
bank of the uninterrupted run. A finished run frees its process group before the interpreter exits."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from shard_server import serve_directory

from nlip_testing import REPO_ROOT, add_file, save_tiny_dual_checkpoint

REPO = str(REPO_ROOT)
NUM_SHARDS, PER_SHARD, MAX_STEPS, SAVE_STEPS = 4, 12, 6, 2


def _png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, 128, 255 - value)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    words = ["red", "green", "blue", "dog", "cat", "car", "tree", "house"]
    for shard in range(NUM_SHARDS):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{shard}{i:04d}"
                caption = f"a photo of a {words[(shard + i) % 8]} {words[(3 * i) % 8]}".encode()
                add_file(tar, f"{key}.png", _png((37 * shard + 11 * i) % 256))
                add_file(tar, f"{key}.txt", caption)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_dual_checkpoint(tmp_path_factory.mktemp("dual"))


def _command(checkpoint, url, output_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "nlip_cli.train", "--model_name_or_path", checkpoint,
            "--train_shards", url + "/{00000..00003}.tar", "--streaming", "--max_steps", str(MAX_STEPS),
            "--per_device_train_batch_size", "4", "--method", "nlip", "--noise_warmup_epochs", "0",
            "--learning_rate", "3e-3", "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
            "--ddp_backend", "gloo", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0", "--seed", "0", "--output_dir", str(output_dir), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": REPO}


def _descendants(pid: int) -> list[int]:
    """Every process descended from `pid` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def _run(command, timeout=300):
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_two_process_streaming_run_killed_and_resumed_is_exact(shards, checkpoint, tmp_path):
    with serve_directory(shards) as server:
        full = tmp_path / "full"
        result = _run(_command(checkpoint, server.url, full))
        assert "Training finished" in result.stdout
        assert sorted(os.listdir(shards)) == [f"{i:05d}.tar" for i in range(NUM_SHARDS)]

        killed = tmp_path / "killed"
        process = subprocess.Popen(_command(checkpoint, server.url, killed), cwd=REPO, env=_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = killed / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.02)  # let the checkpoint's last files land
        # SIGKILL torchrun and its workers (which torch.distributed.elastic starts in sessions of their own).
        for pid in [*_descendants(process.pid), process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(timeout=30)
        assert first.exists()
        assert not (killed / "model.safetensors").exists(), "the run ended before it was killed"
        # Resume from the first checkpoint, whatever the run wrote after it before it died.
        for name in os.listdir(killed):
            if name.startswith("checkpoint-") and name != f"checkpoint-{SAVE_STEPS}":
                shutil.rmtree(killed / name)
        for name in ("model.safetensors", "nlip_noise_state.safetensors"):
            (killed / name).unlink(missing_ok=True)
        _run(_command(checkpoint, server.url, killed, "--resume_from_checkpoint", "latest"))

    reference, resumed = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=f"weight {name}")
    bank, resumed_bank = load_file(full / "nlip_noise_state.safetensors"), load_file(killed / "nlip_noise_state.safetensors")
    assert int((bank["loss_bank.steps"] >= 0).sum()) == MAX_STEPS * 8  # 48 distinct pairs: each seen once
    for name in ("loss_bank.losses", "loss_bank.steps", "noise_prob"):
        torch.testing.assert_close(resumed_bank[name], bank[name], rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


FREES_THE_GROUP = """
import gc, os, sys, torch
from nlip_cli.train import main
main(sys.argv[1:])
alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
print(f"rank {os.environ['RANK']}: initialized={torch.distributed.is_initialized()} ddp_alive={alive}")
"""


def test_a_finished_run_frees_its_process_group_before_exit(shards, checkpoint, tmp_path):
    """DDP's reducer holds the process group, and the trainer sits in reference cycles: unless `main` collects it
    before destroy_process_group, the gloo threads live on into the interpreter's shutdown, which they can abort
    ("terminate called without an active exception", SIGABRT: about 1 run in 10 under load)."""
    script = tmp_path / "run_and_check.py"
    script.write_text(FREES_THE_GROUP)
    command = _command(checkpoint, str(shards), tmp_path / "out",  # the local shards, not a server
                       "--max_steps", "2", "--save_strategy", "no")
    module = command.index("nlip_cli.train") - 1
    command[module:module + 2] = [str(script)]  # torchrun runs the script in place of -m nlip_cli.train
    result = _run(command)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2
    assert all(line.endswith("initialized=False ddp_alive=0") for line in lines), lines
