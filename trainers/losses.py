"""Contrastive losses for noisy image-text pairs.

Every function here is a pure function of tensors: embeddings of shape `[B, D]` (normalised inside with
`F.normalize`, so already-normalised inputs are fine), `logit_scale` the multiplicative scale `1/τ` (a float or a 0-dim
tensor such as `model.logit_scale.exp()`), and `reduction` in `{"mean", "sum", "none"}` where `"none"` returns the
per-sample vector `[B]`.

Conventions shared by all losses:

- `CE_i` is the symmetric per-sample InfoNCE (the CLIP loss)
  `½(−log softmax_j(z_i·)_i − log softmax_j(z_·i)_i)` with `z_ij = logit_scale · cos(v_i, t_j)`.
- `sample_weights` (`[B]`) multiply the per-sample loss before reduction, and `"mean"` divides by the batch size `B`,
  **not** by the sum of the weights: a batch of low-confidence samples then really gets a smaller gradient.
- The loss is computed in at least float32 whatever the embedding dtype (mixed precision safe; float64 stays float64).
- Under data parallelism the caller passes globally gathered features (all-gather with autograd): every process then
  computes the same global loss; nothing here is process-specific.

Methods (cite these when using the losses):

- NLIP: Huang et al., "NLIP: Noise-robust Language-Image Pre-training", AAAI 2023.
- NPC: Zhang et al., "Negative Pre-aware for Noisy Cross-modal Matching", AAAI 2024.
- SRCL: Jiang et al., "Vision Language Pre-training by Contrastive Learning with Cross-Modal Similarity Regulation",
  ACL 2023.
- RCL: Hu et al., "Cross-Modal Retrieval with Partially Mismatched Pairs", TPAMI 2023 (the complementary loss);
  its InfoNCE term as in Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels", ICCV 2019, and
  Ma et al., "Normalized Loss Functions for Deep Learning with Noisy Labels", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


REDUCTIONS = ("mean", "sum", "none")

# Weights of negatives: one [B, B] tensor (used as w^v, with w^t its transpose) or a pair (w^v, w^t).
NegativeWeights = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

DEFAULT_SRCL_TEMPERATURE = 0.1
NITC_FORMS = ("balanced", "paper")


def _check_pair(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, names: str = "image_embeds/text_embeds"
) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(
            f"{names} must both be 2-D [B, D]; got shapes {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"{names} must have the same shape [B, D] (row i of each is pair i); got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}."
        )
    if image_embeds.shape[0] == 0:
        raise ValueError(f"{names} are empty: a contrastive loss needs at least one pair.")


def _per_sample_vector(value, batch_size: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """`value` (tensor, array or sequence) as a `[B]` tensor of `like`'s device and dtype, or a clear error."""
    vector = torch.as_tensor(value, device=like.device).to(like.dtype)
    if vector.shape != (batch_size,):
        raise ValueError(f"`{name}` must have shape [{batch_size}] (one value per pair); got {tuple(vector.shape)}.")
    return vector


def _reduce(per_sample: torch.Tensor, sample_weights, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}; got {reduction!r}.")
    if sample_weights is not None:
        per_sample = per_sample * _per_sample_vector(sample_weights, per_sample.shape[0], per_sample, "sample_weights")
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _log_negative_weights(weights: torch.Tensor, batch_size: int, like: torch.Tensor, name: str) -> torch.Tensor:
    """log w as a detached [B, B] tensor (`like`'s dtype) with a zero (weight 1) diagonal; weights must be >= 0."""
    weights = torch.as_tensor(weights, device=like.device).detach().to(like.dtype)
    if weights.shape != (batch_size, batch_size):
        raise ValueError(f"`{name}` must have shape [{batch_size}, {batch_size}]; got {tuple(weights.shape)}.")
    if bool((weights < 0).any()) or bool(torch.isnan(weights).any()):
        raise ValueError(f"`{name}` must be non-negative and not NaN (they multiply e^z inside the softmax).")
    return weights.log().fill_diagonal_(0.0)


def _split_negative_weights(negative_weights: NegativeWeights | None):
    if negative_weights is None:
        return None, None
    if isinstance(negative_weights, torch.Tensor):
        return negative_weights, negative_weights.transpose(0, 1)
    if isinstance(negative_weights, Sequence) and len(negative_weights) == 2:
        return negative_weights[0], negative_weights[1]
    raise TypeError(
        "`negative_weights` must be a [B, B] tensor (w^v, with w^t = its transpose) or a tuple (w_v, w_t); "
        f"got {type(negative_weights).__name__}."
    )


def contrastive_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale) -> torch.Tensor:
    """`logits_per_image[i, j] = logit_scale · cos(v_i, t_j)`, shape `[B_image, B_text]`.

    `logits_per_text` is its transpose. Embeddings are L2-normalised here, so raw projections can be passed.
    """
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            "image_embeds and text_embeds must be 2-D with the same embedding size; got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
        )
    return logit_scale * (F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).transpose(0, 1))


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _pair_cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """`s_ii = cos(v_i, t_i)` in at least float32, shape `[B]`."""
    image_embeds, text_embeds = _at_least_float32(image_embeds), _at_least_float32(text_embeds)
    return (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds, dim=-1)).sum(-1)


def _per_sample_contrastive(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale, negative_weights: NegativeWeights | None
) -> torch.Tensor:
    """Symmetric per-sample InfoNCE `CE_i` ([B], at least float32), optionally with weighted negatives."""
    _check_pair(image_embeds, text_embeds)
    batch_size = image_embeds.shape[0]
    logits = _at_least_float32(contrastive_logits(image_embeds, text_embeds, logit_scale))
    positives = logits.diagonal()
    weights_v, weights_t = _split_negative_weights(negative_weights)
    per_direction = []
    for direction_logits, weights, name in ((logits, weights_v, "w_v"), (logits.transpose(0, 1), weights_t, "w_t")):
        if weights is not None:
            # log(e^{z_ii} + Σ_{j≠i} w_ij e^{z_ij}) = logsumexp_j(z_ij + log w_ij) with log w_ii = 0.
            direction_logits = direction_logits + _log_negative_weights(weights, batch_size, logits, name)
        per_direction.append(torch.logsumexp(direction_logits, dim=1) - positives)
    return 0.5 * (per_direction[0] + per_direction[1])


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale,
    *,
    sample_weights=None,
    negative_weights: NegativeWeights | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric InfoNCE (the CLIP loss), optionally with per-sample and per-negative weights.

    Per sample `CE_i = ½(L^v_i + L^t_i)` with
    `L^v_i = −log(e^{z_ii} / (e^{z_ii} + Σ_{j≠i} w^v_ij e^{z_ij}))` (image i against all texts) and
    `L^t_i = −log(e^{z_ii} / (e^{z_ii} + Σ_{j≠i} w^t_ij e^{z_ji}))` (text i against all images).
    Without weights this is exactly CLIP's `½(CE(logits_per_image) + CE(logits_per_text))`.

    Args:
        negative_weights: `w^v` as a `[B, B]` tensor — `w^v[i, j]` weighs text j as a negative of image i — in which
            case the text->image weights are its transpose (`w^t[i, j] = w^v[j, i]` weighs image j as a negative of
            text i, i.e. the same pair gets the same weight from both sides), or a tuple `(w_v, w_t)` with `w_t`
            indexed `[text, image]` (SRCL normalises each direction separately). Diagonals are ignored (the positive
            always has weight 1), weights must be >= 0 and are treated as constants (detached). The weighted
            denominator is computed in log space: `logsumexp_j(z_ij + log w_ij)`.
        sample_weights: `[B]` weights multiplying `CE_i` before reduction; `"mean"` returns `Σ_i w_i·CE_i / B`.

    Used by SRCL (Jiang et al., ACL 2023) for the negative weights and by NPC (Zhang et al., AAAI 2024) for the
    per-sample weights.
    """
    per_sample = _per_sample_contrastive(image_embeds, text_embeds, logit_scale, negative_weights)
    return _reduce(per_sample, sample_weights, reduction)


def nitc_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale,
    noise_prob,
    *,
    strength: float = 0.1,
    synthetic_text_embeds: torch.Tensor | None = None,
    negative_weights: NegativeWeights | None = None,
    synthetic_negative_weights: NegativeWeights | None = None,
    sample_weights=None,
    reduction: str = "mean",
    form: str = "balanced",
) -> torch.Tensor:
    """NLIP's noise-adaptive image-text contrastive loss (NITC; Huang et al., AAAI 2023).

    The paper's wording: pairs with a larger noise probability get less similarity, with regularisation of varying
    degree. Its exact equations are not public; two documented forms, `ε_i = noise_prob[i]`, `λ = strength`,
    `s_ii = cos(v_i, t_i)`, `a_i = 1 − ε_i` the weight of the real caption and `ŝ_i = a_i·CE_i + ε_i·CE(v_i, t̂_i)`
    the positive terms (the second only with synthetic captions `t̂`, noise completion):

    - `form="paper"` (the reference form): per sample `ŝ_i + λ·ε_i·s_ii`, `"mean"` divides by `B`. When the noise
      estimate calls most pairs noisy (ε → 1: heavy noise, or small data where losses barely separate) the contrastive
      gradient shrinks about `1/(1 − mean ε)`-fold while the push-apart term grows, and accuracy collapses below plain
      CLIP (Fashion-MNIST at 80 % noise: 22.1 % vs 38.9 %).
    - `form="balanced"` (the default): `Σ_i ŝ_i / Σ_i (a_i + ε_i·[t̂ given]) + λ·mean_i ε_i·relu(s_ii − s̄)`, where `s̄`
      is the batch's mean cosine of non-matching pairs (a constant). The positive terms are normalised by their total
      weight, so the contrastive gradient keeps plain InfoNCE's scale however many pairs are called noisy (all ε = 0:
      exactly InfoNCE; all ε equal: InfoNCE on the same batch). The push-apart term is bounded: a likely-noisy pair is
      pushed down to the similarity of a random pair, never further, so it cannot pull images away from everything
      that resembles their caption.

    With `reduction="none"` the per-sample terms are returned (balanced: `ŝ_i·B / Σ(weights) + λ·ε_i·relu(s_ii − s̄)`,
    whose mean is the loss).

    Args:
        noise_prob: `[B]` noise probabilities `ε_i = 1 − p_i` in [0, 1] (constants; 0 before the first GMM fit, which
            makes this plain InfoNCE).
        strength: `λ`, the weight of the similarity penalty on likely-noisy pairs.
        negative_weights: SRCL-style negative weights for the real-caption term `CE(v_i, t_i)` (see
            `contrastive_loss`).
        synthetic_negative_weights: the same for the synthetic-caption term `CE(v_i, t̂_i)`.
        sample_weights: `[B]` weights multiplying each sample's positive terms (e.g. NPC confidences): the paper form
            multiplies the whole per-sample term and divides by `B`; the balanced form includes them in the
            normalising weight.
        form: `"balanced"` or `"paper"`.
    """
    if form not in NITC_FORMS:
        raise ValueError(f"`form` must be one of {NITC_FORMS}; got {form!r}.")
    per_sample = _per_sample_contrastive(image_embeds, text_embeds, logit_scale, negative_weights)
    batch_size = per_sample.shape[0]
    noise = _per_sample_vector(noise_prob, batch_size, per_sample, "noise_prob").detach()
    if bool(((noise < 0) | (noise > 1) | torch.isnan(noise)).any()):
        raise ValueError("`noise_prob` must lie in [0, 1] (it is 1 − the GMM clean probability).")
    positive, positive_weight = (1 - noise) * per_sample, 1 - noise
    if synthetic_text_embeds is not None:
        _check_pair(image_embeds, synthetic_text_embeds, "image_embeds/synthetic_text_embeds")
        synthetic = _per_sample_contrastive(image_embeds, synthetic_text_embeds, logit_scale, synthetic_negative_weights)
        positive, positive_weight = positive + noise * synthetic, positive_weight + noise
    cosine = _pair_cosine(image_embeds, text_embeds)
    if form == "paper":
        return _reduce(positive + strength * noise * cosine, sample_weights, reduction)
    if sample_weights is not None:
        weights = _per_sample_vector(sample_weights, batch_size, per_sample, "sample_weights")
        positive, positive_weight = positive * weights, positive_weight * weights
    random_pair_cosine = _mean_off_diagonal(_detached_similarity(image_embeds, text_embeds))
    penalty = strength * noise * F.relu(cosine - random_pair_cosine)
    per_sample = positive * (batch_size / positive_weight.sum().clamp(min=1e-6)) + penalty
    return _reduce(per_sample, None, reduction)


def _mean_off_diagonal(similarity: torch.Tensor) -> torch.Tensor:
    """Mean of a square matrix's off-diagonal entries (the mean similarity of non-matching pairs); 0 for 1×1."""
    size = similarity.shape[0]
    if size < 2:
        return similarity.new_zeros(())
    return (similarity.sum() - similarity.diagonal().sum()) / (size * (size - 1))


def complementary_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale,
    *,
    infonce_weight: float = 0.0,
    sample_weights=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Complementary contrastive loss (RCL; Hu et al., "Cross-Modal Retrieval with Partially Mismatched Pairs", TPAMI
    2023): learn from what a pair is *not*, which a shuffled caption cannot get wrong.

    With `p^v_ij = softmax_j(z_ij)` (image i over all texts) and `p^t_ij` the text-side softmax, per sample
    `½(−Σ_{j≠i} log(1 − p^v_ij) − Σ_{j≠i} log(1 − p^t_ij))`: every non-matching pair is pushed apart, the matching
    pair is never pulled together directly (only through the softmax), so a mismatched "positive" costs at most one
    negative term out of `B − 1`. It needs no noise estimate and no extra pass. As RCL's `log` variant, with the
    temperature the caller's `logit_scale` (RCL fixes τ = 0.05, i.e. a scale of 20). Each term is bounded: `p_ij` is
    clipped at `1 − 1e-7` (RCL adds 1e-10 inside the log), so one pair costs at most `−log(1e-7) ≈ 16`.

    With `infonce_weight` β > 0 each sample adds `β·CE_i` (its symmetric InfoNCE, `contrastive_loss`): the pairing of
    an active with a passive loss of Symmetric Cross Entropy (Wang et al., ICCV 2019) and active-passive losses (Ma et
    al., ICML 2020). Alone, the complementary loss is ≈ `1 − p_ii` while the `p_ij` are small — mean absolute error,
    which is robust but underfits; the InfoNCE term supplies the pull towards the own caption, the complementary one
    keeps pushing the negatives apart. β = 0 is RCL's loss.
    """
    if infonce_weight < 0:
        raise ValueError(f"`infonce_weight` (β) must be >= 0; got {infonce_weight}.")
    _check_pair(image_embeds, text_embeds)
    logits = _at_least_float32(contrastive_logits(image_embeds, text_embeds, logit_scale))
    batch_size = logits.shape[0]
    if batch_size < 2:
        raise ValueError("complementary_contrastive_loss needs at least 2 pairs (it learns from the non-matching ones).")
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=logits.device)
    per_direction = []
    for direction_logits in (logits, logits.transpose(0, 1)):
        probabilities = direction_logits.softmax(dim=1).clamp(max=1 - 1e-7)
        per_direction.append(-(torch.log1p(-probabilities) * off_diagonal).sum(dim=1))
    per_sample = 0.5 * (per_direction[0] + per_direction[1])
    if infonce_weight > 0:
        per_sample = per_sample + infonce_weight * _per_sample_contrastive(image_embeds, text_embeds, logit_scale, None)
    return _reduce(per_sample, sample_weights, reduction)


def srcl_negative_weights(
    online_similarity: torch.Tensor,
    *,
    reference_similarity: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = DEFAULT_SRCL_TEMPERATURE,
) -> torch.Tensor:
    """SRCL negative weights (Jiang et al., ACL 2023), detached, shape `[B, B]`.

    From the mixed cosine similarity `ŝ = α·s_ref + (1 − α)·s_online` (row i = anchor i, column j = candidate j),
    `σ_ij = exp(ŝ_ij / τ_w)` and `w_ij ∝ 1/σ_ij`; each row's off-diagonal weights are rescaled to mean 1 (computed as
    `(B − 1)·softmax_{j≠i}(−ŝ_ij/τ_w)`, stable for any τ_w) and the diagonal is set to 1 (it is not a negative). A
    negative that looks like the anchor's positive (a likely false negative) thus weighs less than an easy one.

    Pass the image->text similarity matrix to get `w^v`, and its transpose to get `w^t`.

    Default `temperature = 0.1`: cosine similarities between unrelated pairs spread by a few hundredths, while a false
    negative sits ~0.1–0.2 above them, so τ_w = 0.1 leaves ordinary negatives within a factor ≈ e^{±0.5} of 1 and
    brings false negatives down to ≈ e^{-1}–e^{-2} (0.37–0.14), in line with the paper's observation that false
    negatives end with weights ≤ 0.2. Smaller τ_w suppresses harder; larger τ_w tends to plain InfoNCE (all weights 1).

    Args:
        online_similarity: `[B, B]` cosine similarities from the model being trained.
        reference_similarity: `[B, B]` cosine similarities from a frozen reference model; required when `alpha > 0`.
        alpha: mixing weight of the reference in [0, 1] (the paper decays it from 1 to 0 over training).
        temperature: `τ_w` > 0.
    """
    if online_similarity.ndim != 2 or online_similarity.shape[0] != online_similarity.shape[1]:
        raise ValueError(f"`online_similarity` must be a square [B, B] matrix; got {tuple(online_similarity.shape)}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]; got {alpha}.")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0; got {temperature}.")
    similarity = _at_least_float32(online_similarity.detach())
    if alpha > 0:
        if reference_similarity is None:
            raise ValueError(f"`alpha`={alpha} > 0 mixes in a reference model, but `reference_similarity` is None.")
        if reference_similarity.shape != online_similarity.shape:
            raise ValueError(
                f"`reference_similarity` must have the shape of `online_similarity` {tuple(online_similarity.shape)}; "
                f"got {tuple(reference_similarity.shape)}."
            )
        reference = reference_similarity.detach().to(similarity.device, similarity.dtype)
        similarity = alpha * reference + (1 - alpha) * similarity
    batch_size = similarity.shape[0]
    if batch_size == 1:
        return torch.ones_like(similarity)
    diagonal = torch.eye(batch_size, dtype=torch.bool, device=similarity.device)
    logits = (-similarity / temperature).masked_fill(diagonal, float("-inf"))
    weights = (batch_size - 1) * torch.softmax(logits, dim=1)
    return weights.masked_fill(diagonal, 1.0)


def _detached_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity matrix `[B, B]` without gradient, in at least float32."""
    return contrastive_logits(_at_least_float32(image_embeds.detach()), _at_least_float32(text_embeds.detach()), 1.0)


def srcl_weight_pair(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    reference_image_embeds: torch.Tensor | None = None,
    reference_text_embeds: torch.Tensor | None = None,
    alpha: float = 0.0,
    temperature: float = DEFAULT_SRCL_TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SRCL's negative weights of both directions (Jiang et al., ACL 2023): `(w^v, w^t)` with
    `w^v = srcl_negative_weights(S)` and `w^t = srcl_negative_weights(Sᵀ)`, where `S` is the batch's image->text cosine
    similarity (mixed with the reference model's, weight `alpha`, when reference embeddings are given). Each direction
    is normalised on its own, so `w^t ≠ (w^v)ᵀ` in general. SRCL's loss is `contrastive_loss` with
    `negative_weights=(w^v, w^t)`."""
    _check_pair(image_embeds, text_embeds)
    online = _detached_similarity(image_embeds, text_embeds)
    reference = None
    if (reference_image_embeds is None) != (reference_text_embeds is None):
        raise ValueError("Pass both `reference_image_embeds` and `reference_text_embeds`, or neither.")
    if reference_image_embeds is not None:
        _check_pair(reference_image_embeds, reference_text_embeds, "reference_image_embeds/reference_text_embeds")
        reference = _detached_similarity(reference_image_embeds, reference_text_embeds)
    weights_v = srcl_negative_weights(online, reference_similarity=reference, alpha=alpha, temperature=temperature)
    weights_t = srcl_negative_weights(
        online.T, reference_similarity=None if reference is None else reference.T, alpha=alpha, temperature=temperature
    )
    return weights_v, weights_t


def npc_confidence(
    memory_loss_before_image: torch.Tensor,
    memory_loss_after_image: torch.Tensor,
    memory_loss_before_text: torch.Tensor,
    memory_loss_after_text: torch.Tensor,
    *,
    eps: float = 1e-8,
) -> torch.Tensor:
    """NPC per-sample confidence (Zhang et al., AAAI 2024, step 3), detached, shape `[B]`.

    `r_i = ½(ℓ⁰_I,i/ℓ¹_I,i + ℓ⁰_T,i/ℓ¹_T,i)` where `ℓ⁰`/`ℓ¹` are the losses of sample i's image-side / text-side memory
    entries before / after one optimizer step of a sibling model on the batch; `w_i = tanh(r_i)` if `r_i < 1` else 1
    (training on sample i made its clean neighbours worse ⇒ low confidence).

    Division guard: each ratio is computed as `(ℓ⁰ + eps)/(ℓ¹ + eps)`, so a zero loss after the step gives a huge ratio
    (w = 1, not inf/NaN) and equal losses — including both zero — give ratio 1.
    """
    losses = [memory_loss_before_image, memory_loss_after_image, memory_loss_before_text, memory_loss_after_text]
    shape = torch.as_tensor(losses[0]).shape
    if len(shape) != 1 or any(torch.as_tensor(loss).shape != shape for loss in losses):
        raise ValueError(
            "The four NPC memory losses must be 1-D [B] tensors of the same length; got shapes "
            f"{[tuple(torch.as_tensor(loss).shape) for loss in losses]}."
        )
    before_image, after_image, before_text, after_text = (torch.as_tensor(loss).detach().float() for loss in losses)
    ratio = 0.5 * ((before_image + eps) / (after_image + eps) + (before_text + eps) / (after_text + eps))
    return torch.where(ratio < 1, torch.tanh(ratio), torch.ones_like(ratio))


@dataclass
class Contribution:
    """What one method adds to the loss of a batch (`trainers.objectives`); every field is optional and
    `combine_contributions` composes them.

    Attributes:
        sample_weights: `[B]` weights of each pair's positive terms (NPC's confidences); several multiply.
        negative_weights: `(w^v, w^t)` `[B, B]` weights of the negatives inside the softmax (SRCL); several multiply.
        synthetic_negative_weights: the same for the synthetic-caption term.
        noise_prob: `[B]` noise probabilities `ε`: the positive term becomes `nitc_loss` with `nitc_strength` /
            `nitc_form`.
        synthetic_text_embeds: `[B, D]` a second, `ε`-weighted positive per image (with `noise_prob`).
        complementary: replace the positive term by `complementary_contrastive_loss` (RCL).
        infonce_weight: with `complementary`, the weight β of its InfoNCE term.
        losses: extra loss terms added to the objective (NPC's memory-bank loss).
        metrics: values averaged into the training logs (not used here).
    """

    sample_weights: torch.Tensor | None = None
    negative_weights: tuple[torch.Tensor, torch.Tensor] | None = None
    synthetic_negative_weights: tuple[torch.Tensor, torch.Tensor] | None = None
    noise_prob: torch.Tensor | None = None
    nitc_strength: float = 0.1
    nitc_form: str = "balanced"
    synthetic_text_embeds: torch.Tensor | None = None
    complementary: bool = False
    infonce_weight: float = 0.0
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _product(values: list) -> object:
    """The elementwise product of tensors (or of `(w^v, w^t)` pairs); None for none, the value itself for one."""
    values = [value for value in values if value is not None]
    if not values:
        return None
    result = values[0]
    for value in values[1:]:
        result = tuple(a * b for a, b in zip(result, value)) if isinstance(result, tuple) else result * value
    return result


def combine_contributions(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale,
    contributions: Sequence[Contribution],
    *,
    per_sample: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of a (global) batch from the methods' contributions: the one place the loss algebra is
    composed.

    With `w` the product of the sample weights and `W` that of the negative weights:

    - a contribution with `noise_prob` ε (NLIP): `nitc_loss(ε, sample_weights=w, negative_weights=W, ...)`;
    - one with `complementary` (RCL): `complementary_contrastive_loss(infonce_weight=β, sample_weights=w)`;
    - otherwise `contrastive_loss(sample_weights=w, negative_weights=W)` — with nothing to weigh, the mean of
      `per_sample` when the caller already has the per-pair InfoNCE (CLIP);

    plus every contribution's extra `losses` (NPC's memory-bank loss). At most one contribution may shape the positive
    term (`noise_prob` or `complementary`), and negative weights do not apply to the complementary loss.
    """
    shaping = [c for c in contributions if c.noise_prob is not None or c.complementary]
    if len(shaping) > 1:
        raise ValueError("At most one contribution may replace the positive term (noise_prob or complementary).")
    sample_weights = _product([c.sample_weights for c in contributions])
    negative_weights = _product([c.negative_weights for c in contributions])
    noisy = shaping[0] if shaping and shaping[0].noise_prob is not None else None
    if noisy is not None:
        loss = nitc_loss(
            image_embeds,
            text_embeds,
            logit_scale,
            noisy.noise_prob,
            strength=noisy.nitc_strength,
            form=noisy.nitc_form,
            synthetic_text_embeds=noisy.synthetic_text_embeds,
            negative_weights=negative_weights,
            synthetic_negative_weights=_product([c.synthetic_negative_weights for c in contributions]),
            sample_weights=sample_weights,
        )
    elif shaping:
        if negative_weights is not None:
            raise ValueError("Negative weights do not apply to the complementary contrastive loss.")
        loss = complementary_contrastive_loss(
            image_embeds, text_embeds, logit_scale, infonce_weight=shaping[0].infonce_weight,
            sample_weights=sample_weights,
        )
    elif negative_weights is not None or sample_weights is not None or per_sample is None:
        loss = contrastive_loss(
            image_embeds, text_embeds, logit_scale, sample_weights=sample_weights, negative_weights=negative_weights
        )
    else:
        loss = per_sample.mean()
    for contribution in contributions:
        for term in contribution.losses.values():
            loss = loss + term
    return loss
