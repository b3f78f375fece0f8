# Copyright 2026 The nlip authors. Licensed under the Apache License, Version 2.0.
"""Hub model cards for NLIP checkpoints: what a training run records (`TrainingSummary`, saved as
`nlip_training_summary.json`) rendered through `trainers/model_card_template.md` into a `huggingface_hub.ModelCard`.

Only what is recorded appears on the card: absent or unknown (None/NaN) values and empty sections are left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .objectives import method_names, objective_class


TRAINING_SUMMARY_NAME = "nlip_training_summary.json"
TEMPLATE_PATH = Path(__file__).resolve().parent / "model_card_template.md"
PIPELINE_TAGS = {"zero-shot-image-classification": "AutoModel", "image-to-text": "AutoModelForImageTextToText"}
# What the loading snippets show when the Hub repo is not known yet (a local training run): visibly a placeholder.
REPO_PLACEHOLDER = "<your-username>/<repo-name>"
# What each saved class is, for the card's first lines and title.
HEADS = {
    "NLIPModel": ("dual encoder", "a dual encoder (image tower + text tower projected into one embedding space)"),
    "NLIPForPreTraining": (
        "pre-training checkpoint",
        "a pre-training checkpoint: a dual encoder plus a concept-conditioned captioning decoder, trained jointly; it "
        "loads as the dual encoder (`AutoModel`) or as the captioner (`AutoModelForImageTextToText`)",
    ),
    "NLIPForCaptioning": ("captioner", "a captioning model (image tower + concept-conditioned text decoder)"),
}
# Metric names of `trainers.evaluation.metrics.retrieval_metrics`: reported under a retrieval task in `model-index`.
RETRIEVAL_METRIC = re.compile(r"(i2t|t2i)_R@\d+|rsum")


NOISE_STATISTIC_LABELS = {
    "mean_noise_probability": "Mean noise probability `ε`",
    "estimated_noisy_fraction": "Estimated noisy fraction (`ε > 0.5`)",
    "roc_auc": "Noise-detection ROC-AUC vs. ground truth",
    "precision": "Noise-detection precision vs. ground truth",
    "recall": "Noise-detection recall vs. ground truth",
    "separation": "Separation of the mixture's components (Ashman's D; > 2: two distinct modes)",
    "num_pairs": "Pairs scored",
    "epoch": "Epoch of the estimate",
}


def _combination_note(parts: list[str]) -> str | None:
    """How the parts of a combined method enter one objective (None for a single method), from their cards."""
    if len(parts) < 2:
        return None
    cards = [objective_class(name).card for name in parts]
    weights = [card.combined_weight for card in cards if card.combined_weight]
    clauses = [f"the per-pair weights ({' × '.join(weights)}) multiply each pair's contrastive term"] if weights else []
    clauses += [card.combined_clause for card in cards if card.combined_clause]
    return f"The components are combined in one objective: {' and '.join(clauses)}." if clauses else None


def last_evaluation(log_history: list[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """`{"evaluation": metrics}` of the last evaluation in a Trainer's `log_history` (None without one)."""
    evaluation = None
    for entry in log_history:
        metrics = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
        metrics = {k: v for k, v in metrics.items() if k not in ("runtime", "samples_per_second", "steps_per_second")}
        if metrics:
            evaluation = {"evaluation": metrics}
    return evaluation


def training_hyperparameters(args: Any) -> dict[str, Any]:
    """The training hyper-parameters a model card lists, from `NLIPTrainingArguments`."""
    hyperparameters = {
        "learning_rate": args.learning_rate,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": args.world_size,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "optimizer": getattr(args.optim, "value", args.optim),
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "weight_decay": args.weight_decay,
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        "seed": args.seed,
    }
    locked = [name for name, on in (("vision", args.freeze_vision_tower), ("text", args.freeze_text_tower)) if on]
    if locked:
        hyperparameters["locked_towers"] = " + ".join(locked) + (
            f" (last {args.unfreeze_last_n} blocks trainable)" if args.unfreeze_last_n else " (LiT-style)"
        )
    return hyperparameters


def _tower(config: Any) -> str | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        config = config.to_dict()
    model_type = config.get("model_type") or config.get("architecture") or "custom"
    parts = []
    if model_type == "timm_wrapper" and config.get("architecture"):
        parts.append(f"timm `{config['architecture']}`")
        input_size = (config.get("pretrained_cfg") or {}).get("input_size")
        if input_size:
            parts.append(f"{input_size[-1]} px images")
    for key, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden size")):
        if config.get(key) is not None:
            parts.append(f"{config[key]} {label}")
    if config.get("image_size") is not None:
        patch = f", patch {config['patch_size']}" if config.get("patch_size") else ""
        parts.append(f"{config['image_size']} px images{patch}")
    name = config.get("_name_or_path") or config.get("pretrained_model_name")
    described = f"`{model_type}`" + (f" ({', '.join(parts)})" if parts else "")
    return described + (f", from `{name}`" if name and not str(name).startswith("/") else "")


def describe_towers(config: Any) -> dict[str, str]:
    """`{"vision": ..., "text": ..., "decoder": ...}`: each tower of an NLIP config in words (model type and size)."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    towers = {name: _tower(get(f"{name}_config")) for name in ("vision", "text", "decoder")}
    projection = get("projection_dim")
    if projection is not None:
        towers["projection"] = f"{projection}-dim shared embedding space"
    return {name: value for name, value in towers.items() if value}


def _is_known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _rows(mapping: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(key, formatted value) for the known values of `mapping`."""
    return [(key, _format(value)) for key, value in (mapping or {}).items() if _is_known(value)]


def _eval_result(dataset: str, metric: str, value: float, pipeline_tag: str) -> EvalResult:
    """A `model-index` entry; retrieval metrics go under an image-text retrieval task, the rest under the model's."""
    task_type = "image-text-retrieval" if RETRIEVAL_METRIC.fullmatch(metric) else pipeline_tag
    return EvalResult(task_type=task_type, task_name=task_type.replace("-", " ").capitalize(), dataset_type=dataset,
                      dataset_name=dataset, metric_type=metric, metric_name=metric, metric_value=value)


def _check_mapping(name: str, value: Any, numbers_only: bool) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise TypeError(f"{name} must be a dict with string keys, got {type(value).__name__}: {value!r}.")
    allowed = (int, float) if numbers_only else (int, float, str, bool, list, type(None))
    for key, item in value.items():
        if not isinstance(item, allowed) or (numbers_only and isinstance(item, bool)):
            expected = "a number" if numbers_only else "a number, string, bool or list"
            raise TypeError(f"{name}[{key!r}] must be {expected}, got {type(item).__name__}: {item!r}.")


@dataclass
class TrainingSummary:
    """What a training run records for its model card; stored as `nlip_training_summary.json` next to the weights.

    Every field is optional, but a card needs a `model_name` (`nlip-push` uses the repo name when absent).

    - `method`: `clip`, `nlip`, `npc`, `srcl` or a `+`-joined combination such as `"nlip+srcl"`.
    - `base_model`: Hub id of the checkpoint it was fine-tuned from.
    - `pipeline_tag`: `"zero-shot-image-classification"` (dual encoder) or `"image-to-text"` (captioner).
    - `noise_settings`: setting name -> value (number, string, bool or list), e.g. `{"noise_rate": 0.4}`.
    - `noise_statistics`: statistic -> number; the keys of `NOISE_STATISTIC_LABELS` get readable labels
      (`mean_noise_probability`, `estimated_noisy_fraction`, `roc_auc` when a ground-truth mask is known, ...).
    - `datasets`: training dataset names or Hub ids.
    - `evaluation_results`: dataset name -> {metric -> number}, e.g. `{"fashion_mnist test": {"top1": 71.2}}`.
    - `training_hyperparameters`: name -> value.
    - `license`: license id for the card metadata.
    - `architecture`: the saved class (`NLIPModel`, `NLIPForPreTraining`, `NLIPForCaptioning`): what the card says
      the checkpoint is and how it loads.
    - `towers`: tower name (`vision`, `text`, `decoder`, `projection`) -> description (`describe_towers`).
    - `dataset_description`: the training data in words, for local data without a Hub id.
    - `skipped_pairs`: the training pairs left out, reason -> count, plus `files` (broken file paths) and
      `empty_batches` (batches skipped whole); `NLIPTrainer.skipped_pairs()`.
    """

    model_name: str | None = None
    method: str | None = None
    base_model: str | None = None
    pipeline_tag: str = "zero-shot-image-classification"
    noise_settings: dict[str, Any] = field(default_factory=dict)
    noise_statistics: dict[str, float] | None = None
    datasets: list[str] = field(default_factory=list)
    evaluation_results: dict[str, dict[str, float]] | None = None
    training_hyperparameters: dict[str, Any] | None = None
    license: str = "apache-2.0"
    architecture: str | None = None
    towers: dict[str, str] | None = None
    dataset_description: str | None = None
    skipped_pairs: dict[str, Any] | None = None

    def __post_init__(self):
        if self.method is not None:
            method_names(self.method)
        if self.pipeline_tag not in PIPELINE_TAGS:
            raise ValueError(f"pipeline_tag={self.pipeline_tag!r}: expected one of {list(PIPELINE_TAGS)}.")
        if self.model_name is not None and not (isinstance(self.model_name, str) and self.model_name.strip()):
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}.")
        if not isinstance(self.datasets, list) or not all(isinstance(d, str) and d for d in self.datasets):
            raise TypeError(f"datasets must be a list of non-empty strings, got {self.datasets!r}.")
        _check_mapping("noise_settings", self.noise_settings, numbers_only=False)
        _check_mapping("noise_statistics", self.noise_statistics, numbers_only=True)
        _check_mapping("training_hyperparameters", self.training_hyperparameters, numbers_only=False)
        _check_mapping("skipped_pairs", self.skipped_pairs, numbers_only=False)
        if self.architecture is not None and self.architecture not in HEADS:
            raise ValueError(f"architecture={self.architecture!r}: expected one of {list(HEADS)}.")
        if self.towers is not None and (not isinstance(self.towers, dict)
                                        or not all(isinstance(v, str) for v in self.towers.values())):
            raise TypeError(f"towers must be a dict of tower name -> description, got {self.towers!r}.")
        if self.evaluation_results is not None and not isinstance(self.evaluation_results, dict):
            raise TypeError("evaluation_results must be a dict of dataset -> {metric: number}, "
                            f"got {self.evaluation_results!r}.")
        for dataset, metrics in (self.evaluation_results or {}).items():
            if not isinstance(metrics, dict):
                raise TypeError(f"evaluation_results[{dataset!r}] must be a dict of metric -> number, got {metrics!r}.")
            _check_mapping(f"evaluation_results[{dataset!r}]", metrics, numbers_only=True)

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write the summary to `output_dir/nlip_training_summary.json` and return that path."""
        path = Path(output_dir) / TRAINING_SUMMARY_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingSummary:
        """Read a summary from a `nlip_training_summary.json` file or the folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TRAINING_SUMMARY_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - fields):
            raise ValueError(f"{path} has unknown keys {unknown}; expected some of {sorted(fields)}.")
        return cls(**data)

    @property
    def head(self) -> str:
        """The saved class: `architecture`, else what `pipeline_tag` implies."""
        if self.architecture is not None:
            return self.architecture
        return "NLIPForCaptioning" if self.pipeline_tag == "image-to-text" else "NLIPModel"

    def title(self, repo_id: str | None) -> str:
        """The card's heading: the Hub repo's name when known, else what the checkpoint is (never a bare folder)."""
        if repo_id:
            return repo_id.split("/")[-1]
        words = f"NLIP {HEADS[self.head][0]}"
        if self.method:
            words += f" trained with `{self.method}`"
        data = self.datasets[0] if self.datasets else None
        if data:
            words += f" on {data}"
        return words

    def to_model_card(self, repo_id: str | None = None) -> ModelCard:
        """Render this summary as a model card; `repo_id` goes into the loading snippets (default: the visible
        placeholder `REPO_PLACEHOLDER`, to be replaced by the repo the checkpoint is pushed to)."""
        if self.model_name is None:
            raise ValueError("A model card needs a model_name.")
        methods = method_names(self.method) if self.method else []
        evaluation = {dataset: {m: v for m, v in metrics.items() if _is_known(v)}
                      for dataset, metrics in (self.evaluation_results or {}).items()}
        card_data = ModelCardData(
            model_name=self.model_name,
            base_model=self.base_model,
            datasets=self.datasets or None,
            library_name="transformers",
            license=self.license,
            pipeline_tag=self.pipeline_tag,
            tags=["nlip", "noisy-correspondence", self.pipeline_tag, *[m for m in methods if m != "nlip"], "custom_code"],
            eval_results=[
                _eval_result(dataset, metric, value, self.pipeline_tag)
                for dataset, metrics in evaluation.items() for metric, value in metrics.items()
            ] or None,
        )

        if not TEMPLATE_PATH.is_file():
            raise FileNotFoundError(f"Model card template not found at {TEMPLATE_PATH}.")
        return ModelCard.from_template(
            card_data,
            template_path=str(TEMPLATE_PATH),
            model_name=self.model_name,
            title=self.title(repo_id),
            repo_id=repo_id or REPO_PLACEHOLDER,
            repo_known=bool(repo_id),
            head=self.head,
            head_description=HEADS[self.head][1],
            towers=list((self.towers or {}).items()),
            dataset_description=self.dataset_description,
            method=self.method,
            method_names=methods,
            methods=[objective_class(m).card for m in methods],
            combination=_combination_note(methods),
            estimates_noise=bool(any(objective_class(m).uses_noise_estimate for m in methods) or self.noise_statistics),
            auto_class=PIPELINE_TAGS[self.pipeline_tag],
            noise_settings=_rows(self.noise_settings),
            noise_statistics=[(NOISE_STATISTIC_LABELS.get(k, f"`{k}`"), v) for k, v in _rows(self.noise_statistics)],
            evaluation_results=[(d, m, _format(v)) for d, metrics in evaluation.items() for m, v in metrics.items()],
            training_hyperparameters=_rows(self.training_hyperparameters),
            skipped_pairs=_skip_rows(self.skipped_pairs),
            skipped_files=list((self.skipped_pairs or {}).get("files") or [])[:20],
            num_skipped_files=len((self.skipped_pairs or {}).get("files") or []),
        )


def _skip_rows(skipped: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(what, count) rows of the skipped-pairs section; empty when nothing was skipped."""
    rows = [(reason, _format(count)) for reason, count in (skipped or {}).items()
            if reason not in ("files", "empty_batches") and isinstance(count, int) and count]
    if (skipped or {}).get("empty_batches"):
        rows.append(("batches with no valid pair (skipped whole)", _format(skipped["empty_batches"])))
    return rows


def render_model_card(*, repo_id: str | None = None, **summary: Any) -> ModelCard:
    """A `huggingface_hub.ModelCard` for an NLIP checkpoint; keyword arguments are the fields of `TrainingSummary`
    (`model_name`, `method`, `base_model`, `noise_settings`, `noise_statistics`, `datasets`, `evaluation_results`,
    `training_hyperparameters`, `license`, `pipeline_tag`)."""
    return TrainingSummary(**summary).to_model_card(repo_id=repo_id)


def write_model_card(output_dir: str | os.PathLike, *, repo_id: str | None = None, **summary: Any) -> Path:
    """Render the card (same arguments as `render_model_card`) and save it as `output_dir/README.md`."""
    path = Path(output_dir) / "README.md"
    render_model_card(repo_id=repo_id, **summary).save(path)
    return path
