"""Evaluation metrics as plain functions over numpy arrays / torch tensors, plus thin `compute_metrics` adapters.

- `retrieval_metrics`: image->text and text->image Recall@K (multi-caption aware) and rSum, in percent.
- `zero_shot_accuracy`: top-1 / top-5 accuracy of image embeddings against class (prompt-ensemble) embeddings.
- `captioning_metrics`: BLEU-4 and CIDEr(-D) through the `evaluate` modules shipped in `trainers/evaluation/metric_modules/`.
- `noise_detection_metrics`: ROC-AUC and precision/recall/F1 of the noisy class for per-pair noise estimates.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
from transformers import EvalPrediction

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor | Sequence

METRIC_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metric_modules")


def _as_tensor(values: ArrayLike, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", dtype)
    try:
        return torch.as_tensor(np.asarray(values), dtype=dtype)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric array or tensor: {err}") from err


def _recall_at(ranks: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Percentage of queries whose first correct item is within the top k (`ranks` are 0-based)."""
    return {k: 100.0 * (ranks < k).double().mean().item() for k in ks}


def retrieval_metrics(
    similarity: ArrayLike,
    text_to_image: ArrayLike | None = None,
    *,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval, and rSum (their sum), all in percent.

    Args:
        similarity: `[N_images, N_texts]` scores (higher = more similar).
        text_to_image: for each text, the row of its image (COCO-style: 5 texts per image). None: one text per image,
            text j belongs to image j (square `similarity`).
        ks: the K of Recall@K.

    An image counts as retrieved at K when any of its texts is in its top K; a text when its image is in its top K.
    Ties count against the query (a negative scoring equal to the best positive ranks above it), so a constant
    similarity gives ~0 rather than a perfect score.
    Returns keys `i2t_R@{k}`, `t2i_R@{k}` and `rsum`.
    """
    sim = _as_tensor(similarity, "similarity")
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D [N_images, N_texts], got shape {tuple(sim.shape)}.")
    num_images, num_texts = sim.shape
    if text_to_image is None:
        if num_images != num_texts:
            raise ValueError(
                f"similarity is {num_images}x{num_texts}; pass text_to_image when images and texts are not one-to-one."
            )
        text_to_image = torch.arange(num_texts)
    owner = _as_tensor(text_to_image, "text_to_image", torch.long).reshape(-1)
    if owner.numel() != num_texts:
        raise ValueError(f"text_to_image has {owner.numel()} entries but similarity has {num_texts} texts (columns).")
    if num_texts and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError(f"text_to_image values must lie in [0, {num_images}), got [{owner.min()}, {owner.max()}].")
    captions_per_image = torch.bincount(owner, minlength=num_images)
    if (captions_per_image == 0).any():
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(f"Images {missing} have no text in text_to_image; every image needs at least one.")

    i2t_ranks, t2i_ranks = [], []
    for start in range(0, num_images, chunk_size):
        rows = sim[start : start + chunk_size]
        positive = owner.unsqueeze(0) == torch.arange(start, start + rows.shape[0]).unsqueeze(1)
        best_positive = rows.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        i2t_ranks.append(((rows >= best_positive) & ~positive).sum(dim=1))
    for start in range(0, num_texts, chunk_size):
        columns = sim[:, start : start + chunk_size].T  # [texts, images]
        own = owner[start : start + chunk_size]
        positive_score = columns.gather(1, own.unsqueeze(1))
        is_own = torch.arange(num_images).unsqueeze(0) == own.unsqueeze(1)
        t2i_ranks.append(((columns >= positive_score) & ~is_own).sum(dim=1))

    i2t = _recall_at(torch.cat(i2t_ranks), ks)
    t2i = _recall_at(torch.cat(t2i_ranks), ks)
    metrics = {f"i2t_R@{k}": value for k, value in i2t.items()}
    metrics.update({f"t2i_R@{k}": value for k, value in t2i.items()})
    metrics["rsum"] = sum(i2t.values()) + sum(t2i.values())
    return metrics


def zero_shot_accuracy(
    image_embeds: ArrayLike,
    classifier: ArrayLike | Callable[[torch.Tensor], torch.Tensor],
    labels: ArrayLike,
) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) zero-shot accuracy in percent.

    `classifier` is either the `[num_classes, D]` class text embeddings (e.g. from
    `trainers.evaluation.embeddings.build_zero_shot_classifier`; both sides are L2-normalised here, so scores are cosines) or a
    callable mapping the `[N, D]` image embeddings to `[N, num_classes]` scores.
    """
    images = _as_tensor(image_embeds, "image_embeds")
    targets = _as_tensor(labels, "labels", torch.long).reshape(-1)
    if images.ndim != 2 or images.shape[0] != targets.numel():
        raise ValueError(
            f"image_embeds must be [N, D] with N = len(labels) = {targets.numel()}, got shape {tuple(images.shape)}."
        )
    if callable(classifier):
        scores = _as_tensor(classifier(images), "classifier(image_embeds)")
    else:
        classes = _as_tensor(classifier, "classifier")
        if classes.ndim != 2 or classes.shape[1] != images.shape[1]:
            raise ValueError(
                f"class embeddings must be [num_classes, {images.shape[1]}], got shape {tuple(classes.shape)}."
            )
        scores = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(classes, dim=-1).T
    num_classes = scores.shape[1]
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{targets.min()}, {targets.max()}].")
    top = scores.topk(min(5, num_classes), dim=1).indices
    hits = top == targets.unsqueeze(1)
    metrics = {"top1": 100.0 * hits[:, 0].double().mean().item()}
    if num_classes >= 5:
        metrics["top5"] = 100.0 * hits.any(dim=1).double().mean().item()
    return metrics


@functools.cache
def _load_metric_module(name: str) -> Any:
    """Load one of our local `evaluate` modules (`bleu`, `cider`) from `trainers/evaluation/metric_modules/<name>/<name>.py`."""
    import evaluate

    return evaluate.load(os.path.join(METRIC_MODULES_DIR, name, f"{name}.py"))


def captioning_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 (0-1) and CIDEr-D (as coco-caption reports it: ~10 for captions equal to their references).

    `references[i]` is the reference caption or list of reference captions of `predictions[i]`. Both are lower-cased
    and stripped of punctuation before scoring (see `trainers.evaluation.metric_modules.tokenize_caption`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
    references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    bleu = _load_metric_module("bleu").compute(predictions=list(predictions), references=references)
    cider = _load_metric_module("cider").compute(predictions=list(predictions), references=references)
    return {"bleu4": bleu["bleu4"], "cider": cider["cider"]}


def noise_detection_metrics(
    noise_prob: ArrayLike | None = None,
    is_noisy: ArrayLike | None = None,
    *,
    clean_prob: ArrayLike | None = None,
    threshold: float = 0.5,
) -> dict[str, float]:
    """How well per-pair noise estimates find the truly noisy pairs.

    Give `noise_prob` (higher = noisier) or `clean_prob` (= 1 - noise_prob), and the ground-truth `is_noisy` mask. A
    pair is predicted noisy when its noise probability is above `threshold`. Returns `roc_auc` (NaN when the mask has a
    single class), `precision`, `recall`, `f1` of the noisy class, `estimated_noisy_fraction` (predicted noisy / N)
    and `true_noisy_fraction`.
    """
    if (noise_prob is None) == (clean_prob is None):
        raise ValueError("Pass exactly one of noise_prob and clean_prob.")
    if is_noisy is None:
        raise ValueError("is_noisy (the ground-truth mask) is required.")
    scores = _as_tensor(noise_prob if noise_prob is not None else clean_prob, "noise_prob/clean_prob").numpy()
    scores = scores.reshape(-1).astype(np.float64)
    if clean_prob is not None:
        scores = 1.0 - scores
    truth = _as_tensor(is_noisy, "is_noisy", torch.bool).numpy().reshape(-1)
    if scores.shape != truth.shape:
        raise ValueError(f"Got {scores.size} noise scores but {truth.size} is_noisy entries.")
    if not np.isfinite(scores).all():
        raise ValueError("noise_prob/clean_prob contains NaN or infinite values.")
    predicted = scores > threshold
    if truth.all() or not truth.any():
        logger.warning("is_noisy holds a single class; ROC-AUC is undefined (NaN).")
        roc_auc = float("nan")
    else:
        roc_auc = float(roc_auc_score(truth, scores))
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="binary", pos_label=True, zero_division=0
    )
    return {
        "roc_auc": roc_auc,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "estimated_noisy_fraction": float(predicted.mean()) if predicted.size else float("nan"),
        "true_noisy_fraction": float(truth.mean()) if truth.size else float("nan"),
    }


# ------------------------------------------------------------------------------------- Trainer `compute_metrics`


def retrieval_compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for retrieval: `predictions` = `(image_embeds, text_embeds)`, `label_ids` = the text->image
    map (or None for one text per image). Embeddings are L2-normalised before the cosine similarity."""
    predictions = eval_pred.predictions
    if not isinstance(predictions, (tuple, list)) or len(predictions) != 2:
        raise ValueError("retrieval_compute_metrics expects predictions = (image_embeds, text_embeds).")
    images, texts = (torch.nn.functional.normalize(_as_tensor(x, "embeddings"), dim=-1) for x in predictions)
    return retrieval_metrics(images @ texts.T, eval_pred.label_ids)


def noise_detection_compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """`compute_metrics` for noise detection: `predictions` = per-pair noise probabilities, `label_ids` = is_noisy."""
    return noise_detection_metrics(eval_pred.predictions, eval_pred.label_ids)


def captioning_compute_metrics(tokenizer: Any) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for generated captions: decodes `predictions` (token ids) and `label_ids` (-100 = ignored)
    with `tokenizer` and returns `captioning_metrics` (one reference per example)."""

    def compute(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = np.where(eval_pred.predictions < 0, tokenizer.pad_token_id, eval_pred.predictions)
        labels = np.where(eval_pred.label_ids < 0, tokenizer.pad_token_id, eval_pred.label_ids)
        decoded = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return captioning_metrics(decoded, references)

    return compute
