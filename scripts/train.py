"""Train an NLIP model on noisy image-text pairs with any method (`nlip-train`).

    nlip-train --dataset fashion_mnist --noise_ratio 0.4 --model_size tiny --method nlip \
        --num_train_epochs 3 --output_dir outputs/nlip-fmnist
    nlip-train --train_dir my_pairs/ --model_name_or_path openai/clip-vit-base-patch32 --method npc --output_dir out
    accelerate launch -m scripts.train --train_shards 'shards/*.tar' --streaming --max_steps 10000 ...

Pre-training from a size preset (`--model_size`) or fine-tuning a checkpoint (`--model_name_or_path`: NLIP, or CLIP
converted on the fly), as a dual encoder or, with `--model_type pretraining`, with NLIP's captioning decoder. Every
`transformers.TrainingArguments` option works (mixed precision, gradient accumulation, checkpoints and
`--resume_from_checkpoint`, `--push_to_hub`, `--report_to`), and so do `accelerate launch` and `torchrun`: only the main
process writes files. At the end `output_dir` holds the model, processor, remote-code files, README model card,
`nlip_training_summary.json` and the final noise state (`nlip_noise_state.*`: per-pair noise probabilities by index).
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

from scripts.data_arguments import DataArguments, ImageTextData, iter_captions, load_pairs
from scripts.model_arguments import (
    ModelArguments,
    build_preset_model,
    concept_vocabulary,
    load_training_model,
)
from trainers.collator import ImageTextCollator
from trainers.data import column_values
from trainers.evaluation import build_zero_shot_classifier
from trainers.metrics import retrieval_metrics, zero_shot_accuracy
from trainers.trainer import NLIPTrainer
from trainers.training_args import NLIPTrainingArguments

logger = logging.getLogger("nlip.train")

DESCRIPTION = (
    "Train an NLIP model (dual encoder or NLIPForPreTraining with a captioner) on image-text pairs with a noise-robust "
    "method: clip, nlip, npc, srcl or a '+' combination. Data: a real offline dataset (--dataset), an imagefolder "
    "(--train_dir) or webdataset shards (--train_shards). Model: a size preset (--model_size) or a checkpoint "
    "(--model_name_or_path, NLIP or CLIP). All transformers TrainingArguments apply."
)
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
    for name in ("nlip", "trainers", "scripts"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    if training_args.disable_tqdm:
        datasets.disable_progress_bars()


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, NLIPTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, NLIPTrainingArguments), prog="nlip-train",
                              description=DESCRIPTION)
    return parser.parse_args_into_dataclasses(args=argv)


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
    labels = None
    if data.label_column is not None and data.eval is not None:
        by_index = np.zeros(int(max(column_values(data.eval, "index"))) + 1, dtype=np.int64)
        by_index[column_values(data.eval, "index")] = column_values(data.eval, data.label_column)
        labels = by_index
    return EvalMetrics(trainer, processor, labels, data.class_names, data.templates)


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
    lines = [f"Training finished: {report['method']} on {report['dataset']} ({report['num_train_pairs']} pairs)"]
    for title, values in (("noise statistics", report["noise_statistics"]), ("evaluation", report["eval_metrics"])):
        if values:
            lines.append(f"  {title}:")
            lines.extend(f"    {name:<32} {value:.4f}" if isinstance(value, float) else f"    {name:<32} {value}"
                         for name, value in values.items())
    lines.append(f"  saved to {report['output_dir']}")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the command with `argv` (default: `sys.argv[1:]`); returns its report when `argv` is given (in-process use)."""
    model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    check_compatibility(model_args, data_args, training_args)
    set_seed(training_args.seed)

    data = load_pairs(data_args, noise_split="train")
    model, processor = build_model(model_args, data_args, data)
    num_concepts = add_concept_bank(model, model_args, data, processor, show_progress=not training_args.disable_tqdm)
    collator = ImageTextCollator(processor, max_length=processor.tokenizer.model_max_length, seed=training_args.seed)
    trainer = NLIPTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=processor,
    )
    if data.eval is not None:
        trainer.compute_metrics = eval_metrics_fn(trainer, processor, data)

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.noise_state.save(training_args.output_dir)
    eval_metrics = trainer.evaluate() if data.eval is not None else {}

    card = {"finetuned_from": model_args.model_name_or_path, "dataset": data.name}
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
        "noise_ratio": data_args.noise_ratio,
        "train_metrics": train_result.metrics,
        "noise_statistics": {k.split("/", 1)[-1]: v for k, v in statistics.items()},
        "eval_metrics": {k: v for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "concept_bank_size": num_concepts,
    }
    if trainer.is_world_process_zero():
        print_summary(report)
        logger.info("Report: %s", json.dumps(report, default=str))
    # From the command line (console script, python -m) return None, so that `sys.exit(main())` exits with 0.
    return report if argv is not None else None


if __name__ == "__main__":
    main()
