"""Train an NLIP model on noisy image-text pairs with any method (`nlip-train`).

    nlip-train --dataset fashion_mnist --noise_ratio 0.4 --model_size tiny --method nlip \
        --num_train_epochs 3 --output_dir outputs/nlip-fmnist
    nlip-train --train_dir my_pairs/ --model_name_or_path openai/clip-vit-base-patch32 --method npc --output_dir out
    accelerate launch -m nlip_cli.train --train_shards 'shards/*.tar' --streaming --max_steps 10000 ...

Pre-training from a size preset (`--model_size`) or fine-tuning a checkpoint (`--model_name_or_path`: NLIP, or CLIP
converted on the fly), as a dual encoder or, with `--model_type pretraining`, with NLIP's captioning decoder. Every
`transformers.TrainingArguments` option works (mixed precision, gradient accumulation, checkpoints and
`--resume_from_checkpoint`, `--push_to_hub`, `--report_to`), and so do `accelerate launch` and `torchrun`: only the main
process writes files. At the end `output_dir` holds the model, processor, remote-code files, README model card,
`nlip_training_summary.json` and the final noise state (`nlip_noise_state.*`: per-pair noise probabilities by index),
and, like transformers' example scripts, `train_results.json`, `eval_results.json` and `all_results.json`.

Options can also come from a JSON or YAML file (`nlip-train args.yaml`, keys = option names; options after the file
override it). `--do_train` / `--do_eval`: without either, nlip-train trains and then evaluates when there is an eval
split; given, only what they ask for runs (`--do_eval` alone evaluates --model_name_or_path). `--lora_r N` fine-tunes
LoRA adapters (peft) instead of every weight.

Defaults fit for contrastive training (applied only when the option is not given; see `TRAINING_DEFAULTS`): the
Trainer's own batch of 8 would give the contrastive loss 7 negatives per pair.

| model | per_device_train_batch_size | learning_rate |
|---|---|---|
| `--model_size tiny` | 64 | 1e-3 |
| `--model_size small` | 128 | 5e-4 |
| `--model_size base` | 128 | 1e-4 |
| `--model_size pretrained-small` | 32 | 5e-5 |
| `--model_name_or_path` (fine-tuning) | 64 | 5e-5 (transformers' run_clip.py example) |
| both towers locked (`--freeze_vision_tower --freeze_text_tower`) | 64 | 1e-3 |

`per_device_eval_batch_size` defaults to the training batch size. On a machine without a GPU, DataLoader memory pinning
is off unless asked for (it only warns there).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import EvalPrediction, HfArgumentParser, set_seed

from nlip_cli.cli import add_version_argument, parse_command_line
from trainers.data.sources import DataArguments, ImageTextData, iter_captions, load_pairs
from nlip_cli.lora_arguments import LORA_ADAPTER_DIR, LoraArguments, apply_lora
from trainers.models import (
    ModelArguments,
    build_preset_model,
    concept_vocabulary,
    load_training_model,
)
from trainers.data.collator import ImageTextCollator
from trainers.distributed import end_process_group
from trainers.data.pairs import column_values
from trainers.evaluation.embeddings import build_zero_shot_classifier
from trainers.evaluation.metrics import retrieval_metrics, zero_shot_accuracy
from trainers.trainer import NLIPTrainer
from trainers.training_args import NLIPTrainingArguments

logger = logging.getLogger("nlip.train")

DESCRIPTION = (
    "Train an NLIP model (dual encoder or NLIPForPreTraining with a captioner) on image-text pairs with a noise-robust "
    "method: clip, nlip, npc, srcl or a '+' combination. Data: a real offline dataset (--dataset), an imagefolder "
    "(--train_dir) or webdataset shards (--train_shards). Model: a size preset (--model_size) or a checkpoint "
    "(--model_name_or_path, NLIP or CLIP). All transformers TrainingArguments apply. Batch size and learning rate "
    "default per model (tiny preset 64 / 1e-3, small 128 / 5e-4, base 128 / 1e-4, a checkpoint 64 / 5e-5) unless "
    "given. Options may also come from a JSON/YAML file: nlip-train args.yaml [more options]."
)
# (per_device_train_batch_size, learning_rate) by --model_size; None: fine-tuning a --model_name_or_path checkpoint.
TRAINING_DEFAULTS: dict[str | None, tuple[int, float]] = {
    "tiny": (64, 1e-3),
    "small": (128, 5e-4),
    "base": (128, 1e-4),
    "pretrained-small": (32, 5e-5),
    None: (64, 5e-5),
}
# Both towers locked (LiT-style, --freeze_vision_tower --freeze_text_tower): only the projections train.
LOCKED_TOWERS_DEFAULTS = (64, 1e-3)
# Captions read from a stream to train a preset's tokenizer.
TOKENIZER_STREAM_CAPTIONS = 100_000


@dataclass
class EvalMetrics:
    """`compute_metrics` of the eval split: retrieval R@1/5/10 and rSum over the eval pairs (one caption each), plus
    zero-shot top-1/top-5 when the data has class labels. Predictions are `(image_embeds, text_embeds)` and label ids
    the eval examples' `index` (what `NLIPTrainer.prediction_step` returns)."""

    trainer: NLIPTrainer | None
    processor: Any
    labels_by_index: np.ndarray | None = None
    class_names: list[str] | None = None
    templates: tuple[str, ...] = ()

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        images, texts = (torch.nn.functional.normalize(torch.as_tensor(x).float(), dim=-1) for x in eval_pred.predictions)
        metrics = retrieval_metrics(images @ texts.T)
        if self.labels_by_index is not None:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)
            classifier = build_zero_shot_classifier(model, self.processor, self.class_names, self.templates)
            labels = self.labels_by_index[np.asarray(eval_pred.label_ids, dtype=np.int64)]
            metrics.update({f"zero_shot_{k}": v for k, v in zero_shot_accuracy(images, classifier, labels).items()})
        return metrics


def setup_logging(training_args: NLIPTrainingArguments) -> None:
    """Log at INFO on the main process and at WARNING elsewhere (transformers' example scripts' convention)."""
    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    for name in ("nlip", "trainers", "nlip_cli"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if training_args.disable_tqdm:
        datasets.disable_progress_bars()


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, NLIPTrainingArguments), prog="nlip-train",
                              description=DESCRIPTION)
    return add_version_argument(parser)


def parse_args_and_given(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, LoraArguments, NLIPTrainingArguments, set[str]]:
    """The parsed arguments (a leading JSON/YAML file read first) with the per-model defaults applied, and the names
    of the options the user gave."""
    (model_args, data_args, lora_args, training_args), given = parse_command_line(build_parser(), argv)
    apply_training_defaults(model_args, training_args, given)
    return model_args, data_args, lora_args, training_args, given


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, NLIPTrainingArguments]:
    model_args, data_args, _, training_args, _ = parse_args_and_given(argv)
    return model_args, data_args, training_args


def apply_training_defaults(model_args: ModelArguments, training_args: NLIPTrainingArguments, given: set[str]) -> dict:
    """Set batch size and learning rate from `TRAINING_DEFAULTS` where the user did not give them (the Trainer's 8 /
    5e-5 suit neither a contrastive loss nor training from scratch); returns what was set."""
    key = model_args.model_size if model_args.model_name_or_path is None else None
    batch_size, learning_rate = TRAINING_DEFAULTS.get(key, TRAINING_DEFAULTS[None])
    if getattr(training_args, "freeze_vision_tower", False) and getattr(training_args, "freeze_text_tower", False):
        batch_size, learning_rate = LOCKED_TOWERS_DEFAULTS
    applied = {}
    if "per_device_train_batch_size" not in given and "train_batch_size" not in given:
        applied["per_device_train_batch_size"] = batch_size
    if "learning_rate" not in given:
        applied["learning_rate"] = learning_rate
    if "per_device_eval_batch_size" not in given and "eval_batch_size" not in given:
        applied["per_device_eval_batch_size"] = applied.get("per_device_train_batch_size",
                                                            training_args.per_device_train_batch_size)
    for name, value in applied.items():
        setattr(training_args, name, value)
    if applied:
        logger.info("Defaults for %s: %s (pass the options to change them).",
                    f"--model_size {model_args.model_size}" if model_args.model_name_or_path is None else "fine-tuning",
                    ", ".join(f"--{name} {value}" for name, value in applied.items()))
    return applied


def run_phases(training_args: NLIPTrainingArguments, given: set[str], data: ImageTextData) -> tuple[bool, bool]:
    """(train?, evaluate?): both by default (evaluation when there is an eval split); exactly what --do_train /
    --do_eval ask for when either is given."""
    if not {"do_train", "do_eval"} & given:
        return True, data.eval is not None
    do_train, do_eval = bool(training_args.do_train), bool(training_args.do_eval and "do_eval" in given)
    if "do_eval" not in given and training_args.do_eval and data.eval is not None:
        do_eval = True  # --do_train with an eval strategy: evaluate as the Trainer does
    if do_eval and data.eval is None:
        raise ValueError("--do_eval needs evaluation data: an eval split (test/ or validation/), --eval_dir or "
                         "--eval_shards.")
    if not do_train and not do_eval:
        raise ValueError("--do_train false and --do_eval false: nothing to do.")
    return do_train, do_eval


def check_compatibility(model_args: ModelArguments, data_args: DataArguments, training_args: NLIPTrainingArguments) -> None:
    """Errors for option combinations that cannot work, before any data or model is loaded."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming data has no known length: set --max_steps (a positive number of optimizer steps).")
    if data_args.streaming and (training_args.noise_completion or "npc" in training_args.methods):
        raise ValueError("--noise_completion and method 'npc' look pairs up by index: they need map-style data, not --streaming.")
    if training_args.noise_completion and model_args.model_type != "pretraining" and training_args.completion_model is None:
        raise ValueError(
            "--noise_completion needs a captioner: train with --model_type pretraining, or pass --completion_model "
            "(an NLIPForCaptioning checkpoint)."
        )


def build_model(model_args: ModelArguments, data_args: DataArguments, data: ImageTextData):
    """The model and processor to train: loaded from a checkpoint or built from a preset (tokenizer trained on the
    training captions)."""
    if model_args.model_name_or_path is not None:
        return load_training_model(model_args)
    limit = TOKENIZER_STREAM_CAPTIONS if data_args.streaming else None
    return build_preset_model(model_args, list(iter_captions(data.train, limit)))


def eval_metrics_fn(trainer: NLIPTrainer, processor, data: ImageTextData) -> EvalMetrics:
    if data.eval is not None and data.label_column is None:
        warn_zero_shot_skipped(data)
    labels = None
    if data.label_column is not None and data.eval is not None:
        by_index = np.zeros(int(max(column_values(data.eval, "index"))) + 1, dtype=np.int64)
        by_index[column_values(data.eval, "index")] = column_values(data.eval, data.label_column)
        labels = by_index
    return EvalMetrics(trainer, processor, labels, data.class_names, data.templates)


def warn_zero_shot_skipped(data: ImageTextData) -> None:
    """A loud message (a warning in the log and on stderr) that zero-shot classification will not be evaluated, and why."""
    reason = data.zero_shot_skipped or "the data has no class labels"
    message = (f"Zero-shot classification is NOT evaluated on {data.name}: {reason}. Retrieval is evaluated; for "
               "zero-shot accuracy pass --label_column (a column of class names or class ids).")
    logger.warning(message)


def add_concept_bank(model, model_args: ModelArguments, data: ImageTextData, processor, show_progress: bool) -> int:
    """Give an NLIPForPreTraining its concept bank from the chosen vocabulary before training: `NLIPTrainer` trains the
    captioner on the concepts it retrieves from the bank (re-embedded every epoch), as it will caption. Returns its
    size (0: no bank, the captioner is trained and generates without a concept prefix)."""
    if not hasattr(model, "build_concept_bank"):
        return 0
    limit = TOKENIZER_STREAM_CAPTIONS if isinstance(data.train, datasets.IterableDataset) else None
    vocabulary = concept_vocabulary(model_args.concept_vocabulary, iter_captions(data.train, limit), model_args.max_concepts)
    if vocabulary is None:
        return 0
    model.build_concept_bank(vocabulary, processor, show_progress=show_progress)
    return len(vocabulary)


def print_summary(report: dict[str, Any]) -> None:
    size = (f"{report['num_train_pairs']} pairs" if report["num_train_pairs"] is not None
            else f"streamed: {report.get('pairs_seen')} distinct pairs seen")
    lines = [f"Training finished: {report['method']} on {report['dataset']} ({size})"]
    skipped = {k: v for k, v in (report.get("skipped_pairs") or {}).items() if k != "files" and v}
    if skipped:
        files = len((report.get("skipped_pairs") or {}).get("files") or [])
        lines.append("  skipped: " + ", ".join(f"{count} {reason}" for reason, count in skipped.items())
                     + (f" ({files} broken files listed in nlip_training_summary.json)" if files else ""))
    for title, values in (("noise statistics", report["noise_statistics"]), ("evaluation", report["eval_metrics"])):
        if values:
            lines.append(f"  {title}:")
            lines.extend(f"    {name:<32} {value:.4f}" if isinstance(value, float) else f"    {name:<32} {value}"
                         for name, value in values.items())
    lines.append(f"  saved to {report['output_dir']}")
    print("\n".join(lines))


def save_lora_model(trainer: NLIPTrainer, processor, output_dir: str) -> str:
    """Save the LoRA adapter into `output_dir/lora_adapter` and the merged model into `output_dir` (loadable by every
    nlip command and `from_pretrained`); returns the adapter folder."""
    adapter_dir = os.path.join(output_dir, LORA_ADAPTER_DIR)
    trainer.save_model(adapter_dir)
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        merged = model.merge_and_unload()
        merged.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return adapter_dir


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command with `argv` (default: `sys.argv[1:]`); returns its report when `argv` is given (in-process use)."""
    model_args, data_args, lora_args, training_args, given = parse_args_and_given(argv)
    setup_logging(training_args)
    check_compatibility(model_args, data_args, training_args)
    if lora_args.enabled and training_args.push_to_hub:
        raise ValueError("--push_to_hub with --lora_r would push the adapter folder mid-way; train, then push the "
                         "merged checkpoint with nlip-push --checkpoint_dir OUTPUT_DIR.")
    set_seed(training_args.seed)

    data = load_pairs(data_args, noise_split="train")
    do_train, do_eval = run_phases(training_args, given, data)
    if data.eval is None and not {"do_train", "do_eval"} & given:
        logger.warning("No evaluation data in %s: retrieval and zero-shot classification are NOT evaluated after "
                       "training (add a test/ or validation/ split, or pass --eval_dir / --eval_shards).", data.name)
    model, processor = build_model(model_args, data_args, data)
    num_concepts = add_concept_bank(model, model_args, data, processor, show_progress=not training_args.disable_tqdm)
    if lora_args.enabled:
        model = apply_lora(model, lora_args)
    collator = ImageTextCollator(processor, max_length=processor.tokenizer.model_max_length, seed=training_args.seed,
                                 max_image_pixels=data_args.max_image_pixels or None)
    trainer = NLIPTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=data.train,
        eval_dataset=data.eval if do_eval or training_args.eval_strategy != "no" else None,
        processing_class=processor,
        skip_report=data.skip_reports.get("train"),
    )
    if data.eval is not None and trainer.eval_dataset is not None:
        trainer.compute_metrics = eval_metrics_fn(trainer, processor, data)

    train_metrics: dict[str, Any] = {}
    if do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        train_metrics = dict(train_result.metrics)
        if isinstance(data.train, datasets.Dataset):
            train_metrics["train_samples"] = len(data.train)
        if not lora_args.enabled:
            trainer.save_model()
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            trainer.noise_state.data_fingerprint = trainer.data_fingerprint
            trainer.noise_state.save(training_args.output_dir)
    eval_metrics: dict[str, Any] = {}
    if do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(data.eval)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if do_train and lora_args.enabled:
        save_lora_model(trainer, processor, training_args.output_dir)

    if do_train:
        card = {"finetuned_from": model_args.model_name_or_path, "dataset": data_args.hub_dataset_ids,
                "dataset_description": data_args.description}
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message="End of training", **card)
        else:
            trainer.create_model_card(**card)

    statistics = trainer.noise_state.statistics if trainer.noise_state is not None else {}
    report = {
        "output_dir": os.path.abspath(training_args.output_dir),
        "method": training_args.method,
        "model_class": type(trainer.accelerator.unwrap_model(trainer.model)).__name__,
        "dataset": data.name,
        "num_train_pairs": len(data.train) if isinstance(data.train, datasets.Dataset) else None,
        "pairs_seen": int(trainer.noise_state.loss_bank.seen.sum()) if trainer.noise_state is not None else None,
        "skipped_pairs": trainer.skipped_pairs(),
        "noise_ratio": data_args.noise_ratio,
        "do_train": do_train,
        "do_eval": do_eval,
        "train_metrics": train_metrics,
        "noise_statistics": {k.split("/", 1)[-1]: v for k, v in statistics.items()},
        "eval_metrics": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "concept_bank_size": num_concepts,
        "lora_adapter_dir": os.path.join(os.path.abspath(training_args.output_dir), LORA_ADAPTER_DIR)
        if lora_args.enabled and do_train else None,
    }
    if trainer.is_world_process_zero():
        print_summary(report)
        logger.info("Report: %s", json.dumps(report, default=str))
    del trainer, model  # under torchrun/accelerate, DDP's reducer holds the process group: released before it ends
    end_process_group()
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
