"""Method overhead benchmark (not a test): the training-step time of each method vs plain `clip`, measured inside real
`NLIPTrainer.train()` runs, plus the epoch-level work each method adds (noise-state pass, GMM fit, memory bank).

Every method trains the same model (a copy) on the same random image-text pairs, with the noise state in use from the
first step (`noise_warmup_epochs=0`, `pass` estimation: the GMM is fit and NPC's memory bank built before step 1).
A step is timed from `on_step_begin` to `on_step_end` (forward, loss, backward, optimizer step; the batch is already
loaded, but NPC's memory entries are fetched and collated inside the step, as they are in training). Runs are
interleaved: `--repetitions` rounds, each training every method for `--steps` steps, the order reversed every other
round, so a busy machine slows all methods alike; ratios are of median step times (of the fastest steps alongside).

    python bench/method_overhead.py [--size small|tiny] [--batch-size 32] [--steps 8] [--repetitions 3] [--bf16]
        [--threads N] [--output bench/results/method_overhead.json]

Prints the JSON summary and writes it to `--output`.
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

import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from transformers import TrainerCallback

from modeling_nlip import NLIPConfig, NLIPModel, NLIPProcessor
from trainers.trainer import NLIPTrainer
from trainers.training_args import NLIPTrainingArguments


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nlip_testing import BASE_WORDS, tiny_image_processor, tiny_tokenizer  # noqa: E402  (a small offline tokenizer)


DEFAULT_OUTPUT = Path(__file__).parent / "results" / "method_overhead.json"
# name -> (method, uses the reference model)
METHODS = {
    "clip": ("clip", False),
    "nlip": ("nlip", False),
    "srcl": ("srcl", False),
    "srcl_reference": ("srcl", True),
    "nlip+srcl": ("nlip+srcl", False),
    "npc": ("npc", False),
    "npc+nlip": ("npc+nlip", False),
}
SIZES = {
    # hidden size, layers, heads, image size, patch size, projection dim
    "tiny": dict(hidden=32, layers=2, heads=4, image=32, patch=8, projection=16),
    "small": dict(hidden=128, layers=4, heads=4, image=64, patch=8, projection=128),
}


def build_model(size: dict, tokenizer) -> NLIPModel:
    def tower(model_type: str, **extra) -> dict:
        return dict(model_type=model_type, hidden_size=size["hidden"], intermediate_size=4 * size["hidden"],
                    num_hidden_layers=size["layers"], num_attention_heads=size["heads"], **extra)

    config = NLIPConfig(
        vision_config=tower("clip_vision_model", image_size=size["image"], patch_size=size["patch"]),
        text_config=tower("clip_text_model", vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id),
        projection_dim=size["projection"],
    )
    torch.manual_seed(0)
    return NLIPModel(config)


def random_pairs(num_pairs: int, image_size: int, seed: int = 0) -> datasets.Dataset:
    """Random RGB images with 6-word captions from the tokenizer's vocabulary, and `index`."""
    rng = np.random.default_rng(seed)
    words = BASE_WORDS[20:]
    return datasets.Dataset.from_dict(
        {
            "image": [PIL.Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
                      for _ in range(num_pairs)],
            "text": [" ".join(rng.choice(words, size=6)) for _ in range(num_pairs)],
            "index": list(range(num_pairs)),
        },
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "index": datasets.Value("int64")}
        ),
    )


class Timer(TrainerCallback):
    """Wall time of each optimizer step and of the epoch-start work of the callbacks registered before it."""

    def __init__(self):
        self.steps: list[float] = []
        self.epoch_start: list[float] = []
        self.memory_fetch: list[float] = []
        self._begin = None

    def wrap_memory_fetch(self, trainer: NLIPTrainer) -> None:
        """Also time NPC's fetching and collating of the memory entries (part of its step time)."""
        npc = trainer.objectives.get("npc")
        if npc is None:
            return
        fetch = npc.extra_inputs

        def timed(inputs, context):
            start = time.perf_counter()
            result = fetch(inputs, context)
            if result:
                self.memory_fetch.append(time.perf_counter() - start)
            return result

        npc.extra_inputs = timed

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        self._epoch_clock = time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Registered last: the noise-state callbacks ran between the loop's epoch start and here.
        self._sync()
        self.epoch_start.append(time.perf_counter() - self._epoch_clock)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.steps.append(time.perf_counter() - self._begin)


class EpochClock(TrainerCallback):
    """Registered first: marks the start of the epoch-start callbacks for `Timer`."""

    def __init__(self, timer: Timer):
        self.timer = timer

    def on_epoch_begin(self, args, state, control, **kwargs):
        Timer._sync()
        self.timer._epoch_clock = time.perf_counter()


def train_once(name: str, model: NLIPModel, reference: NLIPModel, dataset, processor, options: argparse.Namespace,
               workdir: str) -> Timer:
    method, with_reference = METHODS[name]
    extra = dict(srcl_reference_model="in-memory", srcl_alpha_start=0.5, srcl_alpha_end=0.5) if with_reference else {}
    args = NLIPTrainingArguments(
        output_dir=os.path.join(workdir, name.replace("+", "_")),
        method=method,
        per_device_train_batch_size=options.batch_size,
        max_steps=options.steps,
        noise_warmup_epochs=0,
        noise_estimation_mode="pass",
        npc_clean_threshold=0.5,  # random pairs are never confidently clean
        learning_rate=1e-5,
        max_grad_norm=1.0,
        optim="adamw_torch",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=options.bf16,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )
    timer = Timer()
    trainer = NLIPTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=processor,
        reference_model=copy.deepcopy(reference) if with_reference else None,
    )
    trainer.callback_handler.callbacks.insert(0, EpochClock(timer))
    trainer.add_callback(timer)
    timer.wrap_memory_fetch(trainer)
    trainer.train()
    return timer


def run(options: argparse.Namespace) -> dict:
    torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    size = SIZES[options.size]
    tokenizer = tiny_tokenizer(model_max_length=16)
    processor = NLIPProcessor(image_processor=tiny_image_processor(size["image"]), tokenizer=tokenizer)
    model = build_model(size, tokenizer)
    reference = build_model(size, tokenizer)
    dataset = random_pairs(options.batch_size * options.steps, size["image"])
    names = [name for name in METHODS if name in options.methods]
    step_times = {name: [] for name in names}
    epoch_start = {name: [] for name in names}
    memory_fetch = {name: [] for name in names if "npc" in name}
    with tempfile.TemporaryDirectory() as workdir:
        train_once("clip", model, reference, dataset, processor, options, workdir)  # warm-up
        for repetition in range(options.repetitions):
            for name in names if repetition % 2 == 0 else reversed(names):
                timer = train_once(name, model, reference, dataset, processor, options, workdir)
                step_times[name].extend(timer.steps[1:])  # the first step allocates optimizer state
                epoch_start[name].extend(timer.epoch_start)
                if name in memory_fetch:
                    memory_fetch[name].extend(timer.memory_fetch[1:])
    median = {name: statistics.median(times) for name, times in step_times.items()}
    fastest = {name: min(times) for name, times in step_times.items()}
    return {
        "what": "median optimizer-step time of each method inside NLIPTrainer.train() / plain clip, and the epoch-start "
        "work (pass over the train set, GMM fit, NPC memory bank) each method adds",
        "environment": {
            "device": f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
            else f"cpu ({platform.processor() or platform.machine()})",
            "torch_threads": options.threads,
            "mixed_precision": "bf16" if options.bf16 else "no",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "setup": {
            "size": options.size,
            **size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": options.batch_size,
            "train_pairs": len(dataset),
            "steps_per_run": options.steps,
            "repetitions": options.repetitions,
            "timed_steps_per_method": len(next(iter(step_times.values()))),
        },
        "median_step_s": {name: round(value, 5) for name, value in median.items()},
        "ratio_vs_clip": {name: round(value / median["clip"], 3) for name, value in median.items()},
        "ratio_vs_clip_of_fastest_steps": {name: round(value / fastest["clip"], 3) for name, value in fastest.items()},
        "epoch_start_s": {name: round(statistics.median(times), 4) for name, times in epoch_start.items()},
        "npc_memory_fetch_s": {name: round(statistics.median(times), 5) for name, times in memory_fetch.items()},
        "npc_ratio_vs_clip_without_memory_fetch": {
            name: round((median[name] - statistics.median(times)) / median["clip"], 3) for name, times in memory_fetch.items()
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="Model size preset.")
    parser.add_argument("--batch-size", type=int, default=32, help="Per-device training batch size.")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per run (the train set has this many batches).")
    parser.add_argument("--repetitions", type=int, default=3, help="Interleaved rounds over the methods.")
    parser.add_argument("--bf16", action="store_true", help="Train with bf16 mixed precision (autocast).")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="Methods to time.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where to write the JSON summary.")
    options = parser.parse_args(argv)
    if "clip" not in options.methods:
        options.methods.insert(0, "clip")
    return options


def main(argv: list[str] | None = None) -> dict:
    options = parse_args(argv)
    results = run(options)
    print(json.dumps(results, indent=2))
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
