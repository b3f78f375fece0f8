import math

import pytest
import torch
import torch.nn.functional as F

from trainers.losses import (
    Contribution,
    combine_contributions,
    contrastive_logits,
    contrastive_loss,
    complementary_contrastive_loss,
    nitc_loss,
    npc_confidence,
    srcl_weight_pair,
    srcl_negative_weights,
)


# ---- independent references: explicit loops over python floats ------------------------------------------------------


def _cosine_matrix(image, text):
    def unit(row):
        norm = math.sqrt(sum(x * x for x in row))
        return [x / norm for x in row]

    image, text = [unit(r) for r in image.tolist()], [unit(r) for r in text.tolist()]
    return [[sum(a * b for a, b in zip(v, t)) for t in text] for v in image]


def reference_ce(image, text, scale, weights_v=None, weights_t=None):
    """CE_i = ½(L^v_i + L^t_i) with weighted negatives, one loop per term."""
    s = _cosine_matrix(image, text)
    size = len(s)
    losses = []
    for i in range(size):
        denominator_v = sum(
            math.exp(scale * s[i][j]) * (1.0 if j == i or weights_v is None else weights_v[i][j]) for j in range(size)
        )
        denominator_t = sum(
            math.exp(scale * s[j][i]) * (1.0 if j == i or weights_t is None else weights_t[i][j]) for j in range(size)
        )
        loss_v = -(scale * s[i][i] - math.log(denominator_v))
        loss_t = -(scale * s[i][i] - math.log(denominator_t))
        losses.append(0.5 * (loss_v + loss_t))
    return losses


def reference_srcl_weights(similarity, temperature):
    """w_ij = 1/exp(s_ij/τ), each row's off-diagonal entries rescaled to mean 1, diagonal 1."""
    size = len(similarity)
    weights = []
    for i in range(size):
        raw = [1.0 / math.exp(similarity[i][j] / temperature) for j in range(size)]
        mean = sum(raw[j] for j in range(size) if j != i) / (size - 1)
        weights.append([1.0 if j == i else raw[j] / mean for j in range(size)])
    return weights


def _batch(size=5, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    text = image + 0.8 * torch.randn(size, dim, generator=generator, dtype=torch.float64)
    return image, text


def _orthogonal_pairs(size):
    """v_i = e_i and t_i = e_i + e_{size+i}: cos(v_i, t_i) = 1/√2 and every other pair has similarity 0."""
    image = torch.zeros(size, 2 * size, dtype=torch.float64)
    text = torch.zeros(size, 2 * size, dtype=torch.float64)
    for i in range(size):
        image[i, i] = text[i, i] = text[i, size + i] = 1.0
    return image, text


def _close(tensor, expected, tol=1e-9):
    assert torch.allclose(tensor.double(), torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol), (
        tensor,
        expected,
    )


# ---- contrastive ----------------------------------------------------------------------------------------------------


def test_contrastive_logits_is_scaled_cosine():
    image, text = _batch()
    logits = contrastive_logits(image, text, 3.0)
    _close(logits, [[3.0 * s for s in row] for row in _cosine_matrix(image, text)])


def test_contrastive_loss_hand_computed_two_pairs():
    # v0 = e1, v1 = e2, t0 = e1, t1 = (e1 + e2)/√2, scale 2: s = [[1, 1/√2], [0, 1/√2]].
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r = 1 / math.sqrt(2)
    loss_v0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2 * r)))
    loss_t0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    loss_v1 = -math.log(math.exp(2 * r) / (math.exp(0) + math.exp(2 * r)))
    loss_t1 = -math.log(math.exp(2 * r) / (math.exp(2 * r) + math.exp(2 * r)))
    expected = [0.5 * (loss_v0 + loss_t0), 0.5 * (loss_v1 + loss_t1)]
    _close(contrastive_loss(image, text, 2.0, reduction="none"), expected)
    _close(contrastive_loss(image, text, torch.tensor(2.0), reduction="sum"), sum(expected))
    _close(contrastive_loss(image, text, 2.0), sum(expected) / 2)


def test_contrastive_loss_equals_clip_cross_entropy():
    image, text = _batch(size=6)
    scale = torch.tensor(math.log(1 / 0.07)).exp()
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    _close(contrastive_loss(image, text, scale), clip.item())
    _close(contrastive_loss(image, text, scale, reduction="none"), reference_ce(image, text, scale.item()))


def test_contrastive_loss_is_float32_for_half_inputs():
    image, text = _batch()
    loss = contrastive_loss(image.bfloat16(), text.bfloat16(), 5.0)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - contrastive_loss(image, text, 5.0).item()) < 0.05


def test_sample_weights_mean_divides_by_batch_size_not_weight_sum():
    image, text = _batch(size=4)
    weights = torch.tensor([1.0, 0.5, 0.0, 0.25])
    ce = reference_ce(image, text, 4.0)
    _close(
        contrastive_loss(image, text, 4.0, sample_weights=weights),
        sum(w * c for w, c in zip(weights.tolist(), ce)) / 4,
    )
    _close(
        contrastive_loss(image, text, 4.0, sample_weights=weights, reduction="none"),
        [w * c for w, c in zip(weights.tolist(), ce)],
    )


def test_negative_weights_single_tensor_and_tuple():
    image, text = _batch(size=4)
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(4, 4, generator=generator, dtype=torch.float64) * 2
    weights_t = torch.rand(4, 4, generator=generator, dtype=torch.float64) * 2
    # One tensor: w^t is its transpose (the pair (i, j) has the same weight from both sides).
    _close(
        contrastive_loss(image, text, 3.0, negative_weights=weights, reduction="none"),
        reference_ce(image, text, 3.0, weights.tolist(), weights.T.tolist()),
        tol=1e-6,
    )
    _close(
        contrastive_loss(image, text, 3.0, negative_weights=(weights, weights_t), reduction="none"),
        reference_ce(image, text, 3.0, weights.tolist(), weights_t.tolist()),
        tol=1e-6,
    )


def test_negative_weights_ignore_diagonal_and_zero_removes_negative():
    image, text = _batch(size=3)
    ones = torch.ones(3, 3)
    _close(
        contrastive_loss(image, text, 3.0, negative_weights=ones), contrastive_loss(image, text, 3.0).item(), tol=1e-6
    )
    diagonal_changed = ones.clone().fill_diagonal_(7.0)
    _close(
        contrastive_loss(image, text, 3.0, negative_weights=diagonal_changed),
        contrastive_loss(image, text, 3.0).item(),
        tol=1e-6,
    )
    # All negatives weighted 0: only the positive is left in each denominator, so the loss is exactly 0.
    _close(contrastive_loss(image, text, 3.0, negative_weights=torch.eye(3), reduction="none"), [0.0, 0.0, 0.0])


def test_contrastive_loss_bad_input():
    image, text = _batch(size=3)
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(image, text[:2], 1.0)
    with pytest.raises(ValueError, match="reduction"):
        contrastive_loss(image, text, 1.0, reduction="avg")
    with pytest.raises(ValueError, match=r"`sample_weights` must have shape \[3\]"):
        contrastive_loss(image, text, 1.0, sample_weights=torch.ones(4))
    with pytest.raises(ValueError, match=r"`w_v` must have shape \[3, 3\]"):
        contrastive_loss(image, text, 1.0, negative_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        contrastive_loss(image, text, 1.0, negative_weights=-torch.ones(3, 3))
    with pytest.raises(TypeError, match="negative_weights"):
        contrastive_loss(image, text, 1.0, negative_weights=(torch.ones(3, 3),))


# ---- NITC -----------------------------------------------------------------------------------------------------------


def test_nitc_zero_noise_is_infonce():
    image, text = _batch()
    _close(nitc_loss(image, text, 5.0, torch.zeros(5)), contrastive_loss(image, text, 5.0).item())


def test_nitc_full_noise_is_similarity_penalty():
    image, text = _batch()
    s = _cosine_matrix(image, text)
    _close(
        nitc_loss(image, text, 5.0, torch.ones(5), strength=0.3, reduction="none", form="paper"),
        [0.3 * s[i][i] for i in range(5)],
    )


def test_nitc_intermediate_noise_and_synthetic_captions():
    image, text = _batch(size=4, seed=2)
    _, synthetic = _batch(size=4, seed=3)
    noise = [0.0, 0.2, 0.7, 1.0]
    s = _cosine_matrix(image, text)
    ce = reference_ce(image, text, 4.0)
    ce_synthetic = reference_ce(image, synthetic, 4.0)
    expected = [(1 - e) * ce[i] + 0.1 * e * s[i][i] for i, e in enumerate(noise)]
    _close(nitc_loss(image, text, 4.0, noise, reduction="none", form="paper"), expected, tol=1e-6)
    expected = [(1 - e) * ce[i] + e * ce_synthetic[i] + 0.1 * e * s[i][i] for i, e in enumerate(noise)]
    _close(nitc_loss(image, text, 4.0, noise, synthetic_text_embeds=synthetic, reduction="none", form="paper"), expected,
           tol=1e-6)


def test_nitc_composes_with_negative_and_sample_weights():
    image, text = _batch(size=4)
    weights = torch.rand(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    confidence = [1.0, 0.5, 0.1, 0.9]
    noise = [0.1, 0.4, 0.0, 0.9]
    s = _cosine_matrix(image, text)
    ce = reference_ce(image, text, 2.0, weights.tolist(), weights.T.tolist())
    expected = sum(c * ((1 - e) * ce[i] + 0.2 * e * s[i][i]) for i, (c, e) in enumerate(zip(confidence, noise))) / 4
    loss = nitc_loss(image, text, 2.0, noise, strength=0.2, negative_weights=weights, sample_weights=confidence,
                     form="paper")
    _close(loss, expected, tol=1e-6)


def _reference_balanced_nitc(image, text, scale, noise, strength=0.1, synthetic=None, confidence=None):
    """Balanced NITC, one loop per term: Σ c·((1−ε)CE + ε·CE_syn) / Σ c·((1−ε) + ε·[syn]) + λ·mean ε·relu(s_ii − s̄)."""
    s = _cosine_matrix(image, text)
    size = len(s)
    ce = reference_ce(image, text, scale)
    ce_synthetic = reference_ce(image, synthetic, scale) if synthetic is not None else [0.0] * size
    confidence = confidence or [1.0] * size
    numerator = sum(c * ((1 - e) * ce[i] + e * ce_synthetic[i]) for i, (c, e) in enumerate(zip(confidence, noise)))
    denominator = sum(c * ((1 - e) + (e if synthetic is not None else 0.0)) for c, e in zip(confidence, noise))
    random_pair = sum(s[i][j] for i in range(size) for j in range(size) if i != j) / (size * (size - 1))
    penalty = sum(e * max(s[i][i] - random_pair, 0.0) for i, e in enumerate(noise)) / size
    return numerator / denominator + strength * penalty


@pytest.mark.parametrize("with_synthetic", [False, True])
def test_nitc_balanced_matches_its_formula(with_synthetic):
    image, text = _batch(size=5, seed=2)
    _, synthetic = _batch(size=5, seed=3)
    noise, confidence = [0.0, 0.2, 0.7, 1.0, 0.95], [1.0, 0.5, 0.1, 0.9, 1.0]
    synthetic = synthetic if with_synthetic else None
    expected = _reference_balanced_nitc(image, text, 4.0, noise, 0.3, synthetic, confidence)
    loss = nitc_loss(image, text, 4.0, noise, strength=0.3, synthetic_text_embeds=synthetic, sample_weights=confidence)
    _close(loss, expected, tol=1e-6)
    per_sample = nitc_loss(image, text, 4.0, noise, strength=0.3, synthetic_text_embeds=synthetic,
                           sample_weights=confidence, reduction="none")
    _close(per_sample.mean(), expected, tol=1e-6)


def test_nitc_balanced_keeps_the_contrastive_gradient_when_most_pairs_are_called_noisy():
    """The failure of the paper form at heavy noise: with ε = 0.9 everywhere its contrastive gradient is 10× smaller
    than InfoNCE's; the balanced form's is InfoNCE's, and its push-apart term stops at the random-pair similarity."""
    image, text = _batch(size=6, seed=5)
    image.requires_grad_(True)

    def grad_of(loss):
        (grad,) = torch.autograd.grad(loss, image)
        return grad

    plain = grad_of(contrastive_loss(image, text, 5.0))
    noise = torch.full((6,), 0.9, dtype=torch.float64)
    paper = grad_of(nitc_loss(image, text, 5.0, noise, strength=0.0, form="paper"))
    balanced = grad_of(nitc_loss(image, text, 5.0, noise, strength=0.0))
    torch.testing.assert_close(paper, 0.1 * plain)
    torch.testing.assert_close(balanced, plain)
    # A pair already less similar than random pairs gets no push-apart gradient at all.
    anti = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)), dim=-1)
    anti_text = -anti
    anti.requires_grad_(True)
    ones = torch.ones(6, dtype=torch.float64)
    (grad,) = torch.autograd.grad(nitc_loss(anti, anti_text, 5.0, ones, strength=1.0), anti)
    assert float(grad.abs().max()) == 0.0  # every caption has weight 0 and s_ii = −1 < s̄


def test_nitc_rejects_unknown_form():
    image, text = _batch(size=2)
    with pytest.raises(ValueError, match=r"`form` must be one of \('balanced', 'paper'\)"):
        nitc_loss(image, text, 1.0, [0.5, 0.5], form="mean")


def test_nitc_rejects_out_of_range_noise():
    image, text = _batch(size=2)
    with pytest.raises(ValueError, match=r"`noise_prob` must lie in \[0, 1\]"):
        nitc_loss(image, text, 1.0, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"`noise_prob` must have shape \[2\]"):
        nitc_loss(image, text, 1.0, [0.5])


# ---- SRCL -----------------------------------------------------------------------------------------------------------


def test_srcl_weights_hand_computed_and_row_mean_one():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.0], [0.3, 0.3, 0.7]], requires_grad=True)
    weights = srcl_negative_weights(similarity, temperature=0.2)
    _close(weights, reference_srcl_weights(similarity.tolist(), 0.2), tol=1e-6)
    assert weights.requires_grad is False
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    _close(weights[off_diagonal].reshape(3, 2).mean(dim=1), [1.0, 1.0, 1.0], tol=1e-6)
    _close(weights.diagonal(), [1.0, 1.0, 1.0])
    # The more similar negative (a likely false negative) gets the smaller weight.
    assert weights[0, 2] < weights[0, 1]


def test_srcl_weights_alpha_mixing():
    online = torch.rand(4, 4, generator=torch.Generator().manual_seed(5))
    reference = torch.rand(4, 4, generator=torch.Generator().manual_seed(6))
    mixed = srcl_negative_weights(online, reference_similarity=reference, alpha=0.25)
    _close(mixed, srcl_negative_weights(0.25 * reference + 0.75 * online), tol=1e-6)
    _close(
        srcl_negative_weights(online, reference_similarity=reference, alpha=1.0),
        srcl_negative_weights(reference),
        tol=1e-6,
    )
    _close(srcl_negative_weights(online, reference_similarity=reference), srcl_negative_weights(online), tol=0)
    with pytest.raises(ValueError, match="reference_similarity"):
        srcl_negative_weights(online, alpha=0.5)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]"):
        srcl_negative_weights(online, reference_similarity=reference, alpha=1.5)
    _close(srcl_negative_weights(torch.zeros(1, 1)), [[1.0]])


def test_srcl_equals_infonce_when_all_weights_are_one():
    # Orthogonal pairs: every negative has similarity 0, so all SRCL weights are exactly 1.
    image, text = _orthogonal_pairs(4)
    _close(srcl_negative_weights(image @ text.T), torch.ones(4, 4))
    srcl = Contribution(negative_weights=srcl_weight_pair(image, text))
    _close(combine_contributions(image, text, 3.0, [srcl]), contrastive_loss(image, text, 3.0).item())


def test_srcl_loss_matches_reference_both_directions():
    image, text = _batch(size=4, seed=7)
    reference_image, reference_text = _batch(size=4, seed=8)
    s = _cosine_matrix(image, text)
    s_ref = _cosine_matrix(reference_image, reference_text)
    mixed = [[0.4 * s_ref[i][j] + 0.6 * s[i][j] for j in range(4)] for i in range(4)]
    mixed_t = [list(column) for column in zip(*mixed)]
    expected = reference_ce(image, text, 5.0, reference_srcl_weights(mixed, 0.1), reference_srcl_weights(mixed_t, 0.1))
    weights = srcl_weight_pair(
        image, text, reference_image_embeds=reference_image, reference_text_embeds=reference_text, alpha=0.4
    )
    _close(contrastive_loss(image, text, 5.0, negative_weights=weights, reduction="none"), expected, tol=1e-5)
    combined = combine_contributions(image, text, 5.0, [Contribution(negative_weights=weights)])
    _close(combined, sum(expected) / 4, tol=1e-5)
    with pytest.raises(ValueError, match="both"):
        srcl_weight_pair(image, text, reference_image_embeds=reference_image, alpha=0.4)


# ---- NPC ------------------------------------------------------------------------------------------------------------


def test_npc_confidence_values():
    before_image = torch.tensor([1.0, 1.0, 2.0, 0.0, 3.0])
    after_image = torch.tensor([1.0, 2.0, 1.0, 0.0, 0.0])
    before_text = torch.tensor([1.0, 1.0, 2.0, 0.0, 1.0])
    after_text = torch.tensor([1.0, 4.0, 4.0, 0.0, 0.0])
    confidence = npc_confidence(before_image, after_image, before_text, after_text)
    # r = [1, ½(½ + ¼) = 0.375, ½(2 + ½) = 1.25, 0/0 -> 1, x/0 -> huge]
    _close(confidence, [1.0, math.tanh(0.375), 1.0, 1.0, 1.0], tol=1e-6)
    assert npc_confidence(before_image.requires_grad_(), after_image, before_text, after_text).requires_grad is False
    with pytest.raises(ValueError, match="same length"):
        npc_confidence(before_image, after_image[:3], before_text, after_text)


def test_npc_confidence_tanh_below_one():
    ratios = torch.tensor([0.1, 0.5, 0.99, 1.0, 3.0])
    confidence = npc_confidence(ratios, torch.ones(5), ratios, torch.ones(5))
    _close(confidence, [math.tanh(0.1), math.tanh(0.5), math.tanh(0.99), 1.0, 1.0], tol=1e-6)


def test_npc_loss_value_and_memory_gradient():
    image, text = _batch(size=4)
    memory_image, memory_text = _batch(size=6, seed=9)
    memory_image.requires_grad_()
    memory_text.requires_grad_()
    confidence = torch.tensor([1.0, 0.3, 0.0, 0.8])
    memory_loss = contrastive_loss(memory_image, memory_text, 3.0)
    loss = combine_contributions(image, text, 3.0, [Contribution(sample_weights=confidence, losses={"memory": memory_loss})])
    ce = reference_ce(image, text, 3.0)
    memory = sum(reference_ce(memory_image.detach(), memory_text.detach(), 3.0)) / 6
    _close(memory_loss, memory)
    _close(loss, sum(c * x for c, x in zip(confidence.tolist(), ce)) / 4 + memory)
    loss.backward()
    assert memory_image.grad is not None and memory_image.grad.abs().sum() > 0
    assert memory_text.grad.abs().sum() > 0


def test_npc_per_sample_weights_scale_each_samples_gradient():
    # v_i = e_i, t_i = (e_i + e_{4+i})/√2: the gradient of CE_i on v_i along e_{4+i} comes from CE_i alone (other
    # samples' terms move v_i only along their own texts' directions), so it must scale with w_i.
    size = 4
    image, text = _orthogonal_pairs(size)
    image.requires_grad_()
    confidence = torch.tensor([1.0, 0.5, 0.25, 0.0])
    memory = torch.eye(2, 2 * size, dtype=torch.float64)
    npc = Contribution(sample_weights=confidence, losses={"memory": contrastive_loss(memory, memory, 2.0)})
    combine_contributions(image, text, 2.0, [npc]).backward()
    own_direction = torch.stack([image.grad[i, size + i] for i in range(size)])
    assert own_direction[0] != 0
    _close(own_direction / own_direction[0], confidence.tolist(), tol=1e-9)
    # The official code's batch-scalar weighting would give every sample the same own-gradient instead.
    image.grad = None
    (confidence.mean() * contrastive_loss(image, text, 2.0)).backward()
    scalar_direction = torch.stack([image.grad[i, size + i] for i in range(size)])
    _close(scalar_direction / scalar_direction[0], [1.0] * size, tol=1e-9)


# ---- complementary (RCL) --------------------------------------------------------------------------------------------


def _reference_complementary(image, text, scale):
    s = _cosine_matrix(image, text)
    size = len(s)
    losses = []
    for i in range(size):
        terms = []
        for matrix in (s, [list(col) for col in zip(*s)]):
            row = [math.exp(scale * matrix[i][j]) for j in range(size)]
            total = sum(row)
            terms.append(-sum(math.log(1 - row[j] / total) for j in range(size) if j != i))
        losses.append(0.5 * (terms[0] + terms[1]))
    return losses


def test_complementary_loss_matches_its_formula_and_weights():
    image, text = _batch(size=5, seed=7)
    expected = _reference_complementary(image, text, 3.0)
    _close(complementary_contrastive_loss(image, text, 3.0, reduction="none"), expected, tol=1e-9)
    weights = [1.0, 0.0, 0.5, 2.0, 1.0]
    _close(complementary_contrastive_loss(image, text, 3.0, sample_weights=weights),
           sum(w * e for w, e in zip(weights, expected)) / 5, tol=1e-9)


def test_complementary_loss_infonce_term_matches_its_formula():
    image, text = _batch(size=5, seed=9)
    complementary, infonce = _reference_complementary(image, text, 3.0), reference_ce(image, text, 3.0)
    weights = [1.0, 0.0, 0.5, 2.0, 1.0]
    for beta in (0.0, 0.5, 2.0):
        expected = [c + beta * ce for c, ce in zip(complementary, infonce)]
        _close(complementary_contrastive_loss(image, text, 3.0, infonce_weight=beta, reduction="none"), expected, tol=1e-9)
        _close(complementary_contrastive_loss(image, text, 3.0, infonce_weight=beta, sample_weights=weights),
               sum(w * e for w, e in zip(weights, expected)) / 5, tol=1e-9)
    with pytest.raises(ValueError, match=r"`infonce_weight` \(β\) must be >= 0; got -0.1"):
        complementary_contrastive_loss(image, text, 3.0, infonce_weight=-0.1)


def test_complementary_loss_pulls_the_own_caption_mostly_through_its_infonce_term():
    # Alone the complementary loss ≈ 1 − p_ii (MAE) while the p_ij are small: moving each image towards its own caption
    # lowers it ~B times less than it lowers InfoNCE (−log p_ii), which β adds.
    size = 32
    image, text = _batch(size=size, seed=10)
    closer = F.normalize(0.9 * F.normalize(image, dim=-1) + 0.1 * F.normalize(text, dim=-1), dim=-1)

    def pull(beta):
        before, after = (complementary_contrastive_loss(x, text, 2.0, infonce_weight=beta) for x in (image, closer))
        return (before - after).item()

    assert 0 < pull(0.0) and pull(1.0) - pull(0.0) > size / 4 * pull(0.0)


def test_complementary_loss_is_bounded():
    image, text = _batch(size=4, seed=8)
    # Whatever the logits, no term exceeds −log(1e-7): huge scales give a finite loss and gradient.
    image.requires_grad_(True)
    loss = complementary_contrastive_loss(image, text, 1e4)
    (grad,) = torch.autograd.grad(loss, image)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert float(complementary_contrastive_loss(image.detach(), text, 1e4, reduction="none").max()) <= 3 * -math.log(1e-7)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        complementary_contrastive_loss(image[:1], text[:1], 1.0)


# ---- combining the methods' contributions ---------------------------------------------------------------------------


def test_combine_contributions_composes_each_method_term():
    image, text = _batch(size=5, seed=3)
    noise = torch.tensor([0.0, 0.9, 0.2, 0.5, 1.0])
    confidence = torch.tensor([1.0, 0.5, 0.2, 0.8, 1.0])
    weights = srcl_weight_pair(image, text)
    # Nothing to weigh: plain InfoNCE (the per-pair losses' mean when the caller has them).
    _close(combine_contributions(image, text, 4.0, []), contrastive_loss(image, text, 4.0).item())
    per_sample = torch.full((5,), 2.5)
    _close(combine_contributions(image, text, 4.0, [Contribution()], per_sample=per_sample), 2.5)
    # NLIP + NPC + SRCL: one NITC term with the confidences as sample weights and SRCL's negative weights.
    expected = nitc_loss(image, text, 4.0, noise, strength=0.3, sample_weights=confidence, negative_weights=weights)
    parts = [Contribution(noise_prob=noise, nitc_strength=0.3), Contribution(sample_weights=confidence),
             Contribution(negative_weights=weights)]
    _close(combine_contributions(image, text, 4.0, parts), expected.item(), tol=1e-6)
    # Sample weights of several contributions multiply.
    twice = [Contribution(sample_weights=confidence), Contribution(sample_weights=confidence)]
    _close(combine_contributions(image, text, 4.0, twice),
           contrastive_loss(image, text, 4.0, sample_weights=confidence * confidence).item(), tol=1e-7)
    # RCL (+ NPC): the complementary loss, weighted; extra losses are added.
    rcl = [Contribution(complementary=True, infonce_weight=0.5),
           Contribution(sample_weights=confidence, losses={"m": torch.tensor(0.25)})]
    _close(combine_contributions(image, text, 4.0, rcl),
           complementary_contrastive_loss(image, text, 4.0, infonce_weight=0.5, sample_weights=confidence).item() + 0.25,
           tol=1e-6)


def test_combine_contributions_rejects_conflicting_terms():
    image, text = _batch(size=3)
    with pytest.raises(ValueError, match="At most one contribution may replace the positive term"):
        combine_contributions(image, text, 2.0, [Contribution(noise_prob=torch.zeros(3)), Contribution(complementary=True)])
    with pytest.raises(ValueError, match="Negative weights do not apply to the complementary"):
        combine_contributions(image, text, 2.0, [Contribution(complementary=True),
                                                 Contribution(negative_weights=srcl_weight_pair(image, text))])
