"""Score every image-text pair of a dataset with a trained model: similarity, noise probability and concepts.

Used by `nlip-audit` (the per-pair table and report) and `nlip-eval` (noise detection against a ground truth).

Noise probability, our choice: each pair's symmetric InfoNCE loss is computed against one **fixed** set of random
negatives (`num_negatives` other pairs of the dataset, drawn once with `seed`), not within shuffled batches. Every pair
then meets the same negatives, so scores do not depend on batch composition or order, a re-run gives the same numbers,
and the cost is one embedding pass plus an `N x K` similarity product. The 2-component GMM of training
(`trainers.noise.estimation.CleanProbabilityEstimator`) is fit to these losses; the posterior of the
high-loss component is the pair's noise probability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from trainers.evaluation.embeddings import build_zero_shot_classifier, compute_embeddings
from trainers.noise.estimation import CleanProbabilityEstimator, NoiseEstimate

logger = logging.getLogger("nlip.scripts")


@dataclass
class PairScores:
    """Per-pair scores, row i for the dataset example with `index[i]` (rows in dataset order).

    Attributes:
        similarity: cosine similarity of the pair's image and (first) caption embeddings.
        loss: symmetric InfoNCE loss of the pair against the fixed negative set.
        noise_prob: GMM posterior of the high-loss component (all 0 when the GMM fell back; see `estimate.reason`).
        image_embeds / text_embeds: L2-normalised embeddings, `[N, D]`.
    """

    index: np.ndarray
    similarity: np.ndarray
    loss: np.ndarray
    noise_prob: np.ndarray
    estimate: NoiseEstimate
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


def fixed_negative_losses(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: float,
    num_negatives: int = 256,
    seed: int = 0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-pair symmetric InfoNCE `½(CE(v_i → {t_i} ∪ T_neg) + CE(t_i → {v_i} ∪ V_neg))` with one fixed random set of
    `num_negatives` pairs as negatives for every pair (a pair is never its own negative). Inputs are normalised."""
    num_pairs = image_embeds.shape[0]
    if num_pairs < 2:
        raise ValueError(f"Scoring pairs against negatives needs at least 2 pairs, got {num_pairs}.")
    generator = torch.Generator().manual_seed(seed)
    negatives = torch.randperm(num_pairs, generator=generator)[: min(num_negatives, num_pairs)]
    losses = []
    for start in range(0, num_pairs, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, num_pairs))
        images, texts = image_embeds[rows].float(), text_embeds[rows].float()
        positive = logit_scale * (images * texts).sum(-1, keepdim=True)
        own = negatives.unsqueeze(0) == rows.unsqueeze(1)
        image_to_text = (logit_scale * images @ text_embeds[negatives].float().T).masked_fill(own, float("-inf"))
        text_to_image = (logit_scale * texts @ image_embeds[negatives].float().T).masked_fill(own, float("-inf"))
        directions = [torch.logsumexp(torch.cat([positive, logits], dim=1), dim=1) - positive.squeeze(1)
                      for logits in (image_to_text, text_to_image)]
        losses.append(0.5 * (directions[0] + directions[1]))
    return torch.cat(losses)


def score_pairs(
    model: torch.nn.Module,
    processor,
    dataset: datasets.Dataset,
    *,
    num_negatives: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> PairScores:
    """Embed every pair of `dataset` (its first caption) with `model` and score it (see the module docstring)."""
    embeddings = compute_embeddings(model, dataset, processor=processor, batch_size=batch_size, progress=progress)
    order = torch.argsort(embeddings.index)
    image_embeds, text_embeds = embeddings.image_embeds[order], embeddings.text_embeds[order]
    logit_scale = float(model.logit_scale.detach().exp())
    losses = fixed_negative_losses(image_embeds, text_embeds, logit_scale, num_negatives, seed)
    # Scoring reports every fit, even one that calls most pairs noisy: the ranking by loss is what an audit needs
    # (the training guard `max_noisy_fraction` protects the loss weights, not a report).
    estimate = CleanProbabilityEstimator(seed=seed, max_noisy_fraction=1.0).fit(losses)
    if estimate.reason is not None:
        logger.warning("The noise GMM fell back (%s): every pair gets noise probability 0.", estimate.reason)
    return PairScores(
        index=embeddings.index[order].numpy(),
        similarity=(image_embeds * text_embeds).sum(-1).numpy(),
        loss=losses.numpy(),
        noise_prob=estimate.noise_prob.astype(np.float32),
        estimate=estimate,
        image_embeds=image_embeds,
        text_embeds=text_embeds,
    )


def concept_bank(
    model: torch.nn.Module, processor, vocabulary: Sequence[str] | None, template: str = "a photo of a {}"
) -> tuple[list[str], torch.Tensor] | None:
    """`(names, [n, D] normalised embeddings)` to retrieve concepts from: the model's own concept bank when it has
    one, else `vocabulary` embedded with the model's text tower as `template.format(name)` (None without either)."""
    if getattr(model, "has_concept_bank", False):
        return list(model.config.concept_vocabulary), torch.nn.functional.normalize(model.concept_embeds.float().cpu(), dim=-1)
    if not vocabulary:
        return None
    return list(vocabulary), build_zero_shot_classifier(model, processor, list(vocabulary), [template])


def top_concepts(image_embeds: torch.Tensor, bank: tuple[list[str], torch.Tensor], top_k: int) -> list[list[str]]:
    """The `top_k` concept names of each (normalised) image embedding, most similar first."""
    names, embeds = bank
    indices = (image_embeds.float() @ embeds.T).topk(min(top_k, len(names)), dim=1).indices
    return [[names[i] for i in row] for row in indices.tolist()]


__all__ = ["PairScores", "concept_bank", "fixed_negative_losses", "score_pairs", "top_concepts"]
