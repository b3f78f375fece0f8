"""Size per split and load time of each real offline dataset: cold (fresh cache directory: decode and build) and warm
(the cached build, memory-mapped). Prints JSON and writes bench/results/dataset_load_times.json.

    python bench/dataset_load_times.py [--datasets fashion_mnist emoji] [--max-samples-per-split N] [--num-proc P]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets

from trainers.data import real_datasets

LOADERS = {
    "fashion_mnist": real_datasets.load_fashion_mnist,
    "tuxpaint_stamps": real_datasets.load_tuxpaint_stamps,
    "openclipart": real_datasets.load_openclipart,
    "emoji": real_datasets.load_emoji,
}
RESULTS = Path(__file__).parent / "results" / "dataset_load_times.json"


def directory_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2**20


def time_loader(name: str, max_samples_per_split: int | None, num_proc: int | None) -> dict:
    """Cold and warm load of one dataset in a fresh temporary cache directory (removed afterwards)."""
    kwargs = {"max_samples_per_split": max_samples_per_split}
    if name != "fashion_mnist":
        kwargs["num_proc"] = num_proc
    cache_dir = Path(tempfile.mkdtemp(prefix=f"nlip-bench-{name}-"))
    try:
        start = time.perf_counter()
        LOADERS[name](cache_dir=cache_dir, **kwargs)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        warm_data = LOADERS[name](cache_dir=cache_dir, **kwargs)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        warm_data["train"][0]["image"].load()
        first_image = time.perf_counter() - start
        return {
            "sizes": {split: len(dataset) for split, dataset in warm_data.items()},
            "cold_s": round(cold, 3),
            "warm_s": round(warm, 4),
            "first_image_decode_s": round(first_image, 4),
            "cache_mb": round(directory_mb(cache_dir), 1),
        }
    except real_datasets.MissingDataPackageError as err:
        return {"skipped": str(err)}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(LOADERS), default=list(LOADERS))
    parser.add_argument("--max-samples-per-split", type=int, default=None, help="subset size (default: everything)")
    parser.add_argument("--num-proc", type=int, default=None, help="build processes for the file-based datasets")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    datasets.disable_progress_bars()
    results = {
        "command": " ".join(["python", "bench/dataset_load_times.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "datasets": datasets.__version__},
        "max_samples_per_split": args.max_samples_per_split,
        "num_proc": args.num_proc,
        "datasets": {name: time_loader(name, args.max_samples_per_split, args.num_proc) for name in args.datasets},
    }
    print(json.dumps(results, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
