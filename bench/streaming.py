"""Streaming webdataset throughput and time to first batch (not a test).

Writes img2dataset-style shards (`KEY.jpg` + `KEY.txt`; 256 x 256 JPEGs of about 11 KB, from a pool of 64 distinct
images) into a temporary folder, then measures through `trainers.data.pairs.load_webdataset_pairs(streaming=True)` and a
`DataLoader` with `ImageTextCollator` (JPEG decode, resize and crop to 224 px, CLIP normalisation, tokenisation):

- **throughput**: pairs/s over `--pairs` pairs (in shards of `--throughput-shard-samples`), from local files and from
  a loopback HTTP server (`tests/shard_server.py`, in a process of its own: Range support like an object store) and
  from webdataset `pipe:cat SHARD` commands (a process per shard); median of `--repeats` passes;
- **time to first batch** as shards grow (`--ttfb-shard-samples`, e.g. 100 / 1,000 / 10,000 samples = 1 / 11 / 110
  MB): from the `load_webdataset_pairs` call to the first collated batch, for process 0 of 2 (its first shard is
  shard 0: nothing to count) and process 1 of 2 (its first shard is shard 1: shard 0's sample count comes from its
  `_stats.json` sidecar, or without one from a header scan of the local file / one streamed read of the URL), local
  and HTTP, against what the old loader did before its first batch on every process (read every shard in full to
  count it: here shard 0's full read alone; the old loader read all shards).

    python bench/streaming.py [--pairs 2048] [--batch-size 64] [--workers 0] [--threads 2] [--repeats 3]
                              [--ttfb-shard-samples 100 1000 10000] [--output bench/results/streaming.json]

Prints a JSON summary and writes it to `--output`. Target: time to first batch independent of the shard size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from datasets.distributed import split_dataset_by_node  # noqa: E402

from nlip_testing import tiny_tokenizer  # noqa: E402
from trainers.data.collator import ImageTextCollator  # noqa: E402
from trainers.data.pairs import load_webdataset_pairs  # noqa: E402
from trainers.data.shards import iter_shard_samples, shard_count  # noqa: E402

IMAGE_SIZE, POOL = 256, 64


def image_pool(seed: int = 0) -> list[bytes]:
    """Encoded JPEGs of smooth random colour fields (photo-like sizes: about 11 KB at 256 px, quality 85)."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(POOL):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(small).resize((IMAGE_SIZE, IMAGE_SIZE), PIL.Image.BICUBIC)
        noise = rng.integers(-12, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
        image = PIL.Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        pool.append(buffer.getvalue())
    return pool


def write_shards(folder: Path, prefix: str, num_shards: int, samples: int, pool: list[bytes],
                 sidecars: bool) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    words = ["red", "green", "blue", "dog", "cat", "car", "tree", "house", "on", "a", "road", "the", "beach"]
    for shard in range(num_shards):
        path = folder / f"{prefix}{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(samples):
                key = f"{shard:05d}{i:06d}"
                caption = " ".join(words[(i * k + shard) % len(words)] for k in (1, 3, 5, 7, 11)).encode()
                for name, data in ((f"{key}.jpg", pool[(shard * 7 + i) % len(pool)]), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if sidecars:
            (folder / f"{prefix}{shard:05d}_stats.json").write_text(json.dumps({"successes": samples}))
        paths.append(path)
    return paths


def processor():
    """What the nlip presets use: the PIL CLIP image processor (the torchvision one is ~10x slower on CPU here)."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(model_max_length=32))


def loader(stream, collator, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, collate_fn=collator, num_workers=workers)


def throughput(pattern: str, collator, batch_size: int, workers: int, repeats: int) -> dict:
    """pairs/s through the collator, and (`read_only`) samples/s of the stream alone (tar reading, no decoding)."""
    rates, counts, read_rates = [], [], []
    for _ in range(repeats):
        start, pairs = time.perf_counter(), 0
        for batch in loader(load_webdataset_pairs(pattern, streaming=True), collator, batch_size, workers):
            pairs += batch["index"].shape[0]
        elapsed = time.perf_counter() - start
        rates.append(pairs / elapsed)
        counts.append(pairs)
        start = time.perf_counter()
        samples = sum(1 for _ in load_webdataset_pairs(pattern, streaming=True))
        read_rates.append(samples / (time.perf_counter() - start))
    return {"pairs": counts[0], "pairs_per_s": statistics.median(rates), "pairs_per_s_all": rates,
            "read_only_samples_per_s": statistics.median(read_rates)}


def first_batch_time(pattern: str, collator, batch_size: int, rank: int) -> float:
    shard_count.cache_clear()
    start = time.perf_counter()
    stream = load_webdataset_pairs(pattern, streaming=True)
    if rank:
        stream = split_dataset_by_node(stream, rank=rank, world_size=2)
    batch = next(iter(loader(stream, collator, batch_size, 0)))
    elapsed = time.perf_counter() - start
    assert batch["index"].shape[0] == batch_size
    return elapsed


def full_read_time(shard: str) -> float:
    """What the previous loader did for every shard before the first batch: read it in full to count it."""
    start = time.perf_counter()
    for _ in iter_shard_samples(shard, read_data=True):
        pass
    return time.perf_counter() - start


class Server:
    """`tests/shard_server.py` in a process of its own."""

    def __init__(self, folder: Path):
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "shard_server.py"), str(folder), "1800"],
                                        stdout=subprocess.PIPE, text=True)
        self.url = self.process.stdout.readline().strip()

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--throughput-shard-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttfb-shard-samples", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "streaming.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    collator = ImageTextCollator(processor(), caption_choice="first")
    pool = image_pool()
    load_start = os.getloadavg()[0]
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "workers": args.workers,
                                 "python": platform.python_version(), "torch": torch.__version__,
                                 "load_average_1min_start": load_start},
                     "settings": {"batch_size": args.batch_size, "image": f"{IMAGE_SIZE}px JPEG, ~{np.mean([len(p) for p in pool]) / 1024:.1f} KB",
                                  "processor": "resize + crop 224, CLIP normalisation, tokenise"}}
    with tempfile.TemporaryDirectory(prefix="nlip-bench-streaming-") as root:
        root = Path(root)
        num_shards = max(1, args.pairs // args.throughput_shard_samples)
        write_shards(root / "throughput", "", num_shards, args.throughput_shard_samples, pool, sidecars=True)
        for size in args.ttfb_shard_samples:
            write_shards(root / f"ttfb-{size}", "", 2, size, pool, sidecars=False)
            write_shards(root / f"ttfb-{size}-sidecar", "", 2, size, pool, sidecars=True)
        server = Server(root)
        try:
            pattern = "{" + f"00000..{num_shards - 1:05d}" + "}.tar"
            results["throughput"] = {
                "local": throughput(str(root / "throughput" / pattern), collator, args.batch_size, args.workers,
                                    args.repeats),
                "http": throughput(f"{server.url}/throughput/{pattern}", collator, args.batch_size, args.workers,
                                   args.repeats),
                "pipe": throughput(f"pipe:cat {root / 'throughput'}/{pattern}", collator, args.batch_size,
                                   args.workers, args.repeats),
            }
            for where in ("http", "pipe"):
                results["throughput"][f"{where}_over_local"] = (results["throughput"][where]["pairs_per_s"]
                                                                / results["throughput"]["local"]["pairs_per_s"])
            ttfb = []
            for size in args.ttfb_shard_samples:
                shard_bytes = (root / f"ttfb-{size}" / "00000.tar").stat().st_size
                row = {"samples_per_shard": size, "shard_mb": shard_bytes / 1e6}
                for where, base in (("local", str(root)), ("http", server.url)):
                    for rank, folder in ((0, f"ttfb-{size}"), (1, f"ttfb-{size}"), (1, f"ttfb-{size}-sidecar")):
                        pattern = f"{base}/{folder}/{{00000..00001}}.tar"
                        count = "header_scan" if where == "local" else "streamed_count"
                        name = f"{where}_rank{rank}" + ("_sidecar" if folder.endswith("sidecar") else
                                                        f"_{count}" if rank else "")
                        times = [first_batch_time(pattern, collator, args.batch_size, rank) for _ in range(args.repeats)]
                        row[f"{name}_s"] = statistics.median(times)
                    row[f"{where}_old_full_read_of_shard0_s"] = statistics.median(
                        full_read_time(f"{base}/ttfb-{size}/00000.tar") for _ in range(args.repeats))
                ttfb.append(row)
                print(json.dumps(row), flush=True)
            results["time_to_first_batch"] = ttfb
        finally:
            server.close()
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
