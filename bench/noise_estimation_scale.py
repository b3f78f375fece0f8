"""Scale benchmark for the noise-estimation building blocks (not a test).

Measures (1) GMM fit + predict time on 10M synthetic losses, (2) the memory of a 100M-entry `LossBank` (tensor bytes
and process RSS delta) with update/merge/save/load times, (3) the time to build an NPC memory bank for 100k samples
against 10k clean pairs. Prints a JSON summary and writes it to `bench/results/noise_estimation_scale.json`.

    python bench/noise_estimation_scale.py [--device cuda] [--num-losses 10000000] [--bank-samples 100000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from sklearn.metrics import roc_auc_score

from trainers.noise.loss_bank import LossBank
from trainers.noise.memory_bank import build_memory_bank
from trainers.noise.estimation import CleanProbabilityEstimator


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_gmm(num_losses: int, noise_rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    noisy = rng.random(num_losses) < noise_rate
    losses = np.where(noisy, rng.normal(3.0, 0.5, num_losses), rng.gamma(4.0, 0.125, num_losses)).astype(np.float32)
    estimator = CleanProbabilityEstimator()
    estimate, fit_seconds = _timed(estimator.fit, losses)
    predicted, predict_seconds = _timed(estimator.predict, losses)
    return {
        "num_losses": num_losses,
        "max_fit_samples": estimator.max_fit_samples,
        "fit_and_predict_seconds": round(fit_seconds, 3),
        "predict_seconds": round(predict_seconds, 3),
        "roc_auc": round(float(roc_auc_score(noisy, predicted.noise_prob)), 5),
        "true_noise_rate": round(float(noisy.mean()), 4),
        "estimated_noise_rate": round(float(estimate.noise_prob.mean()), 4),
        "reason": estimate.reason,
    }


def bench_loss_bank(num_samples: int, batch_size: int, num_batches: int, seed: int) -> dict:
    rss_before = _rss()
    bank, allocate_seconds = _timed(LossBank, num_samples)
    rss_delta = _rss() - rss_before
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(num_batches):
        indices = torch.randint(num_samples, (batch_size,), generator=generator)
        bank.update(indices, torch.rand(batch_size, generator=generator), step=step)
    update_seconds = time.perf_counter() - start
    other = LossBank(num_samples)
    other.update(torch.randint(num_samples, (batch_size,), generator=generator), torch.rand(batch_size), step=10**6)
    _, merge_seconds = _timed(bank.merge, other)
    del other
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "loss_bank.safetensors"
        _, save_seconds = _timed(bank.save, path)
        file_bytes = path.stat().st_size
        restored, load_seconds = _timed(LossBank.load, path)
        assert torch.equal(restored.steps, bank.steps)
    return {
        "num_samples": num_samples,
        "tensor_bytes": bank.nbytes,
        "bytes_per_sample": bank.nbytes / num_samples,
        "rss_delta_bytes": rss_delta,
        "allocate_seconds": round(allocate_seconds, 3),
        "update_batch_size": batch_size,
        "update_seconds_per_batch": round(update_seconds / num_batches, 5),
        "merge_full_bank_seconds": round(merge_seconds, 3),
        "save_seconds": round(save_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "file_bytes": file_bytes,
    }


def bench_memory_bank(num_queries: int, num_clean: int, dim: int, device: str, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(num_queries, dim, generator=generator)
    text = torch.randn(num_queries, dim, generator=generator)
    clean_prob = torch.zeros(num_queries)
    clean_prob[torch.randperm(num_queries, generator=generator)[:num_clean]] = 1.0
    if device != "cpu":  # warm up kernels so the timing is the build, not the first launch
        build_memory_bank(image[:1000], text[:1000], clean_prob[:1000], device=device, progress_bar=False)
    bank, seconds = _timed(build_memory_bank, image, text, clean_prob, device=device, progress_bar=False)
    return {
        "num_queries": num_queries,
        "num_clean": int(bank.clean_indices.numel()),
        "dim": dim,
        "device": device,
        "chunk_size": 4096,
        "build_seconds": round(seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-losses", type=int, default=10_000_000)
    parser.add_argument("--bank-samples", type=int, default=100_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--clean", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "noise_estimation_scale.json"
    )
    args = parser.parse_args()

    results = {
        "environment": {
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        # The LossBank first, so the RSS delta is not blurred by memory the GMM benchmark freed.
        "loss_bank": bench_loss_bank(args.bank_samples, batch_size=32_768, num_batches=100, seed=args.seed),
        "gmm": bench_gmm(args.num_losses, noise_rate=0.3, seed=args.seed),
        "memory_bank": bench_memory_bank(args.queries, args.clean, args.dim, args.device, args.seed),
    }
    print(json.dumps(results, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
