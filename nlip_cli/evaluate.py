"""Evaluate a trained NLIP (or CLIP) checkpoint on image-text pairs (`nlip-eval`).

    nlip-eval --model_name_or_path outputs/nlip-fmnist --dataset fashion_mnist --max_eval_samples 1000 \
        --output_json results.json
    nlip-eval --model_name_or_path outputs/nlip-fmnist --dataset fashion_mnist --split train \
        --max_train_samples 3000 --noise_ratio 0.4      # noise detection on the (re-)injected training noise

Tasks, each run when it applies (or as chosen with --tasks):

- `retrieval`: image->text and text->image Recall@1/5/10 (every caption of a multi-caption pair counts) and rSum;
- `zero_shot`: top-1/top-5 accuracy when the data has a ClassLabel column (class names + prompt templates);
- `captioning`: BLEU-4 and CIDEr-D of generated captions against the pairs' captions, when the checkpoint has a
  captioning decoder;
- `noise_detection`: ROC-AUC / precision / recall of per-pair noise probabilities against the `is_noisy` ground truth
  (present with --noise_ratio): from scoring each pair with the model (`trainers.noise.pair_scoring`), and from the training
  run's own estimates when the checkpoint folder holds its noise state (`nlip_noise_state.*`, same pairs required).

Results are printed as a table and written as JSON with --output_json.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser, set_seed

from nlip_cli.cli import add_version_argument, parse_command_line
from trainers.data.sources import SPLITS, DataArguments, ImageTextData, load_pairs
from trainers.models import LoadedCheckpoint, load_checkpoint
from trainers.noise.pair_scoring import score_pairs
from trainers.data.pairs import column_values, decode_image, non_empty_captions, to_rgb
from trainers.evaluation.embeddings import evaluate_retrieval, evaluate_zero_shot
from trainers.evaluation.metrics import captioning_metrics, noise_detection_metrics
from trainers.noise.state import NoiseState

logger = logging.getLogger("nlip.evaluate")

TASKS = ("retrieval", "zero_shot", "captioning", "noise_detection")
# Caption generation settings shared by nlip-caption, nlip-eval (captioning metrics) and nlip-audit (suggested
# captions), so that the same checkpoint writes the same captions in all three: beam search with 3 beams.
DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_NEW_TOKENS = 30
DESCRIPTION = (
    "Evaluate an NLIP or CLIP checkpoint on image-text pairs: retrieval (R@1/5/10, rSum), zero-shot classification, "
    "captioning (BLEU-4, CIDEr) and noise detection (ROC-AUC against is_noisy); each task runs when it applies. "
    "Prints a table; --output_json writes the results."
)


@dataclass
class EvaluateArguments:
    """What to evaluate and how."""

    model_name_or_path: str = field(
        metadata={"help": "Checkpoint folder or Hub id: NLIP (dual encoder, pre-training or captioner) or CLIP."}
    )
    split: str = field(
        default="eval",
        metadata={"help": "Split to evaluate: 'eval' (the data's test/validation split, or --eval_dir/--eval_shards) "
                          "or 'train'."},
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={"help": f"Tasks to run, among {list(TASKS)} (default: every task that applies). A task given here "
                          "that does not apply is an error."},
    )
    output_json: str | None = field(default=None, metadata={"help": "Write the results to this JSON file."})
    batch_size: int = field(default=64, metadata={"help": "Pairs per forward pass."})
    num_beams: int = field(
        default=DEFAULT_NUM_BEAMS,
        metadata={"help": "Beam width of caption generation (1: greedy); the same default in nlip-caption, nlip-eval "
                          "and nlip-audit."},
    )
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "The most tokens of a generated caption."})
    num_negatives: int = field(
        default=256,
        metadata={"help": "Noise detection: size of the fixed random negative set each pair's loss is computed "
                          "against (see trainers/noise/pair_scoring.py)."},
    )
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available, else cpu)."})
    seed: int = field(default=0, metadata={"help": "Seed of the negative set and of the noise GMM."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {list(SPLITS)}, got {self.split!r}.")
        unknown = sorted(set(self.tasks or []) - set(TASKS))
        if unknown:
            raise ValueError(f"Unknown --tasks {unknown}; expected some of {list(TASKS)}.")
        for name in ("batch_size", "num_beams", "max_new_tokens", "num_negatives"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}.")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def applicable_tasks(checkpoint: LoadedCheckpoint, data: ImageTextData, dataset: datasets.Dataset) -> dict[str, str | None]:
    """For each task, None when it applies, else why not."""
    no_encoder = None if checkpoint.encoder is not None else "the checkpoint has no text tower (captioner only)"
    return {
        "retrieval": no_encoder,
        "zero_shot": no_encoder or (None if data.label_column else (data.zero_shot_skipped or "the data has no class labels")
                                    + "; pass --label_column (a column of class names or class ids)"),
        "captioning": None if checkpoint.captioner is not None else "the checkpoint has no captioning decoder",
        "noise_detection": no_encoder or (
            None if "is_noisy" in dataset.column_names else "the data has no is_noisy ground truth (--noise_ratio)"
        ),
    }


def select_tasks(requested: list[str] | None, reasons: dict[str, str | None]) -> list[str]:
    if requested is None:
        for task, reason in reasons.items():
            if reason is not None:
                # zero-shot accuracy is what users most often expect: say loudly that it is not computed
                log = logger.warning if task == "zero_shot" else logger.info
                log("Skipping %s%s: %s.", task, " classification (NOT evaluated)" if task == "zero_shot" else "", reason)
        return [task for task, reason in reasons.items() if reason is None]
    missing = [f"{task} ({reasons[task]})" for task in requested if reasons[task] is not None]
    if missing:
        raise ValueError(f"Requested --tasks cannot run: {'; '.join(missing)}.")
    return list(requested)


@torch.no_grad()
def generate_captions(
    captioner, processor, dataset: datasets.Dataset, *, batch_size: int, num_beams: int, max_new_tokens: int,
    progress: bool = True,
) -> list[str]:
    """One generated caption per example of `dataset`, in order."""
    images_only = dataset.select_columns(["image"])
    captions: list[str] = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="Captioning", disable=not progress):
        images = []
        for value in images_only[start : start + batch_size]["image"]:
            image, reason, detail = decode_image(value)
            if image is None:
                raise ValueError(f"Cannot caption example {start + len(images)}: {reason} ({detail}).")
            images.append(to_rgb(image))
        captions.extend(captioner.caption(images, processor, num_beams=num_beams, max_new_tokens=max_new_tokens))
    return captions


def training_noise_detection(path: str, dataset: datasets.Dataset) -> dict[str, float] | None:
    """Noise detection of the training run's own estimates, when `path` holds its noise state covering `dataset`."""
    if not os.path.isdir(path) or not NoiseState.exists(path):
        return None
    state = NoiseState(0)
    state.load(path)
    indices = np.asarray(column_values(dataset, "index"), dtype=np.int64)
    if not state.is_estimated or indices.max() >= state.num_samples:
        logger.info("The checkpoint's noise state has no estimate for these pairs; skipping its noise detection.")
        return None
    seen = state.loss_bank.seen[indices].numpy()
    if not seen.all():
        logger.warning("The checkpoint's noise state saw %d of %d pairs; scoring those.", seen.sum(), len(seen))
    truth = np.asarray(column_values(dataset, "is_noisy"), dtype=bool)[seen]
    return noise_detection_metrics(state.noise_prob[indices].numpy()[seen], truth)


def evaluate(checkpoint: LoadedCheckpoint, data: ImageTextData, args: EvaluateArguments) -> dict[str, dict[str, float]]:
    """Run the applicable (or requested) tasks; returns `{task: {metric: value}}`."""
    dataset = data.split(args.split)
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError("nlip-eval needs map-style data: drop --streaming.")
    tasks = select_tasks(args.tasks, applicable_tasks(checkpoint, data, dataset))
    progress = not args.disable_tqdm
    processor, encoder = checkpoint.processor, checkpoint.encoder
    results: dict[str, dict[str, float]] = {}
    if "retrieval" in tasks:
        results["retrieval"] = evaluate_retrieval(encoder, processor, dataset, batch_size=args.batch_size, progress=progress)
    if "zero_shot" in tasks:
        results["zero_shot"] = evaluate_zero_shot(
            encoder, processor, dataset, data.class_names, data.templates, label_column=data.label_column,
            batch_size=args.batch_size, progress=progress,
        )
    if "captioning" in tasks:
        predictions = generate_captions(
            checkpoint.captioner, processor, dataset, batch_size=args.batch_size, num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens, progress=progress,
        )
        references = [non_empty_captions(text) for text in column_values(dataset, "text")]
        results["captioning"] = captioning_metrics(predictions, references)
    if "noise_detection" in tasks:
        scores = score_pairs(encoder, processor, dataset, num_negatives=args.num_negatives, batch_size=args.batch_size,
                             seed=args.seed, progress=progress)
        truth = np.asarray(column_values(dataset, "is_noisy"), dtype=bool)[scores.index]
        results["noise_detection"] = noise_detection_metrics(scores.noise_prob, truth)
        trained = training_noise_detection(args.model_name_or_path, dataset)
        if trained is not None:
            results["noise_detection_training_state"] = trained
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The results as an aligned text table: task | metric | value."""
    rows = [(task, metric, "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}")
            for task, metrics in results.items() for metric, value in metrics.items()]
    widths = [max(len(row[i]) for row in [("task", "metric", "value"), *rows]) for i in range(3)]
    line = "  ".join("-" * width for width in widths)
    header = "  ".join(("task".ljust(widths[0]), "metric".ljust(widths[1]), "value".rjust(widths[2])))
    body = ["  ".join((task.ljust(widths[0]), metric.ljust(widths[1]), value.rjust(widths[2])))
            for task, metric, value in rows]
    return "\n".join([header, line, *body])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command with `argv` (default: `sys.argv[1:]`); returns its report when `argv` is given (in-process use)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = add_version_argument(
        HfArgumentParser((EvaluateArguments, DataArguments), prog="nlip-eval", description=DESCRIPTION)
    )
    (args, data_args), _ = parse_command_line(parser, argv)
    if args.disable_tqdm:
        datasets.disable_progress_bars()
    set_seed(args.seed)
    checkpoint = load_checkpoint(args.model_name_or_path).to(args.device)
    data = load_pairs(data_args, noise_split=args.split, splits=(args.split,))
    results = evaluate(checkpoint, data, args)
    dataset = data.split(args.split)
    report = {
        "model_name_or_path": args.model_name_or_path,
        "architecture": checkpoint.architecture,
        "dataset": data.name,
        "split": args.split,
        "num_pairs": len(dataset),
        "results": results,
    }
    print(f"{checkpoint.architecture} {args.model_name_or_path} on {data.name} ({args.split}, {len(dataset)} pairs)")
    print(format_table(results))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
        print(f"Results written to {args.output_json}")
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
