"""Reference prior: a frozen, already aligned reference model scores every training pair once, before training.

In the spirit of OSA (Li et al., "One-step Noisy Label Mitigation", 2024): a model that is already aligned (e.g. the
pretrained checkpoint being fine-tuned, or a model trained on other, clean data) separates matching from mismatched
pairs far better than the per-pair losses of a model that is still learning. Each pair gets the debiased score

    c_i = cos(v_i, t_i) − β,    β = mean cosine of random (non-matching) pairs under the same reference model,

so `c_i ≤ 0` means "no more similar than a random pair". With `neighbours = k ≥ 1` the score is instead the caption
agreement of the pair's k nearest images (beyond the papers; a deep-k-NN filter in the spirit of Bahri et al.,
"Deep k-NN for Noisy Labels", ICML 2020, carried over to captions):

    c_i = mean_{j ∈ kNN(v_i)} cos(t_i, t_j) − β_t,    β_t = mean cosine of random caption pairs,

i.e. "do the images most like mine carry captions like mine". It needs no image-text alignment at all, only image
features that put similar images together and caption features that put similar captions together, so a reference
that is not aligned (unimodal pretrained towers, an early snapshot of a run from scratch) can still score pairs; under
random noise the clean caption stays the plurality among the neighbours. The clean probability `p_i` is the posterior of the
low-"loss" component of the same two-component mixture the loss-based estimate uses (`CleanProbabilityEstimator`),
fitted on `−c_i`, and is 0 wherever `c_i ≤ 0`. Choices, documented: OSA's released code weighs each pair by a
polynomial of its debiased logit normalised by the batch maximum, which gives the most similar pair of every batch
weight 0; we use a global, monotone posterior instead. The scores are computed once (one no-grad pass over the data),
kept by dataset index and saved with the noise state, so training steps pay nothing for them. The reference's
normalised embeddings are kept too, so that SRCL can use the reference's similarity matrix of any batch
(`similarity`) without running the reference model during training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..evaluation.embeddings import PairEmbeddings
from .estimation import CleanProbabilityEstimator


def random_pair_cosine(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, *, num_pairs: int = 200_000, seed: int = 0
) -> float:
    """β: the mean cosine of `num_pairs` random non-matching pairs `(v_i, t_j)`, `j ≠ i` (all of them when there are
    fewer), a seeded sample so millions of pairs cost a fixed amount."""
    count = image_embeds.shape[0]
    if count < 2:
        raise ValueError("The random-pair cosine needs at least 2 pairs.")
    image_embeds = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    text_embeds = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    if count * (count - 1) <= num_pairs:
        similarity = image_embeds @ text_embeds.T
        return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(count, (num_pairs,), generator=generator)
    offsets = torch.randint(1, count, (num_pairs,), generator=generator)  # j = i + offset (mod N) is never i
    columns = (rows + offsets) % count
    return float((image_embeds[rows] * text_embeds[columns]).sum(-1).mean())


def neighbour_agreement(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, neighbours: int, *, chunk_size: int | None = None
) -> torch.Tensor:
    """`[N]` mean cosine `cos(t_i, t_j)` over the `neighbours` pairs `j ≠ i` whose images are most similar to `v_i`
    (cosine; an exact search, O(N²·D)). Rows go `chunk_size` at a time (default: as many as keep the `chunk × N`
    similarities near 2^25 entries), so memory stays bounded at any N."""
    count = image_embeds.shape[0]
    if not 1 <= neighbours < count:
        raise ValueError(f"The neighbour agreement needs 1 <= neighbours < the number of pairs ({count}); got {neighbours}.")
    chunk_size = chunk_size or max(1, 2**25 // count)
    image_embeds = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    text_embeds = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    agreement = torch.empty(count, dtype=torch.float64)
    for start in range(0, count, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, count))
        similarity = image_embeds[rows] @ image_embeds.T
        similarity[torch.arange(len(rows)), rows] = -math.inf  # not its own neighbour
        nearest = similarity.topk(neighbours, dim=1).indices
        neighbour_texts = torch.zeros(len(rows), text_embeds.shape[1], dtype=torch.float64)
        for column in nearest.T:  # mean_j t_i·t_j = t_i · mean_j t_j, one neighbour rank at a time
            neighbour_texts += text_embeds[column]
        agreement[rows] = (text_embeds[rows] * neighbour_texts).sum(-1) / neighbours
    return agreement


@dataclass
class ReferencePrior:
    """Debiased reference scores of the training pairs, by dataset index, and the clean probabilities they give.

    Attributes:
        score: `[num_samples]` float32 `c_i` (NaN for an index no pair had).
        random_pair_cosine: β (of random caption pairs, `β_t`, for the neighbour agreement).
        clean_prob: `[num_samples]` float32 `p_i` (1 for an unscored index: no evidence).
        reason: why `clean_prob` is all ones (a degenerate score distribution), else None.
        image_embeds, text_embeds: `[num_samples, D]` float32 normalised reference embeddings (zeros for an unscored
            index); None in a prior saved before they were kept.
    """

    score: torch.Tensor
    random_pair_cosine: float
    clean_prob: torch.Tensor
    reason: str | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None

    @classmethod
    def from_embeddings(
        cls, embeddings: PairEmbeddings, num_samples: int, *, max_noisy_fraction: float = 0.9, seed: int = 0,
        neighbours: int = 0,
    ) -> ReferencePrior:
        """Score the pairs of `embeddings` (reference-model embeddings with their dataset `index`): the debiased
        image-text cosine, or with `neighbours` ≥ 1 the debiased caption agreement of that many nearest images."""
        index = embeddings.index.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
            raise ValueError(f"Reference embeddings hold dataset indices outside [0, {num_samples}).")
        image = torch.nn.functional.normalize(embeddings.image_embeds.double(), dim=-1)
        text = torch.nn.functional.normalize(embeddings.text_embeds.double(), dim=-1)
        if neighbours:
            if neighbours >= len(index):
                raise ValueError(f"noise_prior_neighbours={neighbours} needs more scored pairs than that; the training "
                                 f"set has {len(index)}.")
            beta = random_pair_cosine(text, text, seed=seed)
            raw = neighbour_agreement(image, text, neighbours)
        else:
            beta = random_pair_cosine(image, text, seed=seed)
            raw = (image * text).sum(-1)
        score = torch.full((num_samples,), float("nan"), dtype=torch.float32)
        score[index] = (raw - beta).float()
        estimator = CleanProbabilityEstimator(max_noisy_fraction=max_noisy_fraction, seed=seed)
        estimate = estimator.fit(-score.double().numpy())
        clean_prob = torch.from_numpy(estimate.clean_prob.copy())
        clean_prob[score <= 0] = 0.0  # no more similar than a random pair: not a clean pair
        image_table = torch.zeros(num_samples, image.shape[1], dtype=torch.float32)
        text_table = torch.zeros(num_samples, text.shape[1], dtype=torch.float32)
        image_table[index], text_table[index] = image.float(), text.float()
        return cls(score=score, random_pair_cosine=beta, clean_prob=clean_prob, reason=estimate.reason,
                   image_embeds=image_table, text_embeds=text_table)

    def similarity(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference's normalised image and text embeddings of dataset indices `index` (on `index`'s device),
        whose product is the reference's cosine-similarity matrix of that batch; None without stored embeddings."""
        if self.image_embeds is None or self.text_embeds is None:
            return None
        rows = index.detach().cpu().long()
        return self.image_embeds[rows].to(index.device), self.text_embeds[rows].to(index.device)

    @property
    def noise_prob(self) -> torch.Tensor:
        return 1.0 - self.clean_prob

    def summary(self) -> dict[str, float | int | str | None]:
        """Plain statistics for logs, the training summary and the model card."""
        scored = self.score[~torch.isnan(self.score)]
        return {
            "random_pair_cosine": self.random_pair_cosine,
            "num_scored": int(scored.numel()),
            "mean_score": float(scored.mean()) if scored.numel() else None,
            "below_random_fraction": float((scored <= 0).double().mean()) if scored.numel() else None,
            "mean_noise_probability": float(self.noise_prob[~torch.isnan(self.score)].mean()) if scored.numel() else None,
            "reason": self.reason,
        }

    def state_dict(self) -> dict:
        state = {
            "score": self.score.clone(),
            "random_pair_cosine": self.random_pair_cosine,
            "clean_prob": self.clean_prob.clone(),
            "reason": self.reason,
        }
        if self.image_embeds is not None:
            state.update(image_embeds=self.image_embeds.clone(), text_embeds=self.text_embeds.clone())
        return state

    @classmethod
    def from_state_dict(cls, state: dict, num_samples: int) -> ReferencePrior:
        missing = {"score", "random_pair_cosine", "clean_prob", "reason"} - set(state)
        if missing:
            raise ValueError(f"Reference-prior state is missing {sorted(missing)}.")
        prior = cls(
            score=torch.as_tensor(state["score"], dtype=torch.float32),
            random_pair_cosine=float(state["random_pair_cosine"]),
            clean_prob=torch.as_tensor(state["clean_prob"], dtype=torch.float32),
            reason=state["reason"],
            image_embeds=None if state.get("image_embeds") is None else torch.as_tensor(state["image_embeds"]).float(),
            text_embeds=None if state.get("text_embeds") is None else torch.as_tensor(state["text_embeds"]).float(),
        )
        embeds = [t for t in (prior.image_embeds, prior.text_embeds) if t is not None]
        if prior.score.shape != (num_samples,) or prior.clean_prob.shape != (num_samples,) or \
                any(t.ndim != 2 or t.shape[0] != num_samples for t in embeds):
            raise ValueError(
                f"Reference-prior state covers {prior.score.shape[0]} pairs, but the training data has {num_samples}."
            )
        return prior


def combine_noise(loss_noise: torch.Tensor | None, prior_noise: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """`ε = w·ε_prior + (1 − w)·ε_loss` (`w = prior_weight`); the prior alone before the first loss-based fit."""
    if not 0.0 <= prior_weight <= 1.0:
        raise ValueError(f"`prior_weight` must be in [0, 1]; got {prior_weight}.")
    if loss_noise is None:
        return prior_noise
    return prior_weight * prior_noise + (1.0 - prior_weight) * loss_noise
