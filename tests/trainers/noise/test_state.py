"""`NoiseState`: what the mixture is fit on (the latest losses, or their average over the fits) and its round trip."""

import math

import numpy as np
import pytest
import torch

from trainers.evaluation.metrics import noise_detection_metrics
from trainers.noise.state import NoiseState, NoiseStateError


def _record(state, losses, step):
    state.record(torch.arange(len(losses)), torch.tensor(losses, dtype=torch.float32), step=step)


def test_latest_losses_are_fit_without_momentum():
    state = NoiseState(3)
    _record(state, [1.0, 2.0, 3.0], step=0)
    assert torch.equal(state.losses_to_fit(), torch.tensor([1.0, 2.0, 3.0]))
    assert state.fit_losses is None


def test_average_over_fits_follows_the_formula():
    state = NoiseState(4, loss_momentum=0.75)
    state.record(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 4.0]), step=0)
    first = state.losses_to_fit()  # the first loss of a pair starts its average; index 3 was never seen
    assert torch.equal(first[:3], torch.tensor([1.0, 2.0, 4.0])) and math.isnan(first[3])
    state.record(torch.tensor([0, 1, 3]), torch.tensor([3.0, 2.0, 8.0]), step=1)  # index 2 not seen since the fit
    second = state.losses_to_fit()
    expected = torch.tensor([0.75 * 1 + 0.25 * 3, 2.0, 4.0, 8.0])
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-7)
    assert state.fit_losses_step == 1
    # No new loss since the previous fit: the next fit (e.g. at the end of training) uses the same average.
    torch.testing.assert_close(state.losses_to_fit(), expected, rtol=0, atol=1e-7)


def test_a_state_pass_at_the_fit_step_counts_once():
    """In `pass` mode every loss of a fit is recorded at the epoch's first step; the next pass at a later step."""
    state = NoiseState(2, loss_momentum=0.5)
    _record(state, [1.0, 3.0], step=4)
    state.fit(epoch=1)
    _record(state, [3.0, 1.0], step=8)
    state.fit(epoch=2)
    torch.testing.assert_close(state.fit_losses, torch.tensor([2.0, 2.0]))


def test_averaging_separates_noisy_pairs_better_than_the_latest_loss():
    """Per-pair losses that scatter from epoch to epoch (the batch's negatives) around a lower clean mean: the
    averaged losses rank the noisy pairs better, and the mixture fit on them detects more of them."""
    rng = np.random.default_rng(0)
    is_noisy = rng.random(2000) < 0.4
    latest, averaged = NoiseState(2000), NoiseState(2000, loss_momentum=0.8)
    for epoch in range(6):
        losses = np.where(is_noisy, 2.0, 1.0) + rng.normal(0.0, 0.8, 2000)
        for state in (latest, averaged):
            _record(state, losses.tolist(), step=epoch)
            state.fit(epoch)
    truth = torch.from_numpy(is_noisy)
    latest_auc = noise_detection_metrics(latest.noise_prob, truth)["roc_auc"]
    averaged_auc = noise_detection_metrics(averaged.noise_prob, truth)["roc_auc"]
    assert latest_auc < 0.85 and averaged_auc > 0.93, (latest_auc, averaged_auc)


def test_the_average_survives_a_round_trip():
    state = NoiseState(3, loss_momentum=0.5)
    _record(state, [1.0, 2.0, 3.0], step=0)
    state.fit(epoch=1)
    tensors, metadata = state.state_dict()
    assert metadata["schema_version"] == 4 and metadata["fit_losses_step"] == 0
    restored = NoiseState(3, loss_momentum=0.5)
    restored.load_state_dict(tensors, metadata, expected_num_samples=3)
    for each in (state, restored):
        _record(each, [3.0, 2.0, 1.0], step=1)
        each.fit(epoch=2)
    torch.testing.assert_close(restored.fit_losses, state.fit_losses)
    torch.testing.assert_close(restored.noise_prob, state.noise_prob)


def test_a_state_of_schema_3_loads_without_an_average():
    state = NoiseState(3)
    _record(state, [1.0, 2.0, 3.0], step=0)
    tensors, metadata = state.state_dict()
    metadata = {**metadata, "schema_version": 3}
    metadata.pop("fit_losses_step")
    restored = NoiseState(3, loss_momentum=0.5)
    restored.load_state_dict(tensors, metadata)
    assert restored.fit_losses is None and restored.fit_losses_step == -1
    torch.testing.assert_close(restored.losses_to_fit(), torch.tensor([1.0, 2.0, 3.0]))


def test_bad_momentum_and_bad_average_are_named():
    with pytest.raises(ValueError, match=r"`loss_momentum` must be in \[0, 1\); got 1.0"):
        NoiseState(3, loss_momentum=1.0)
    state = NoiseState(3, loss_momentum=0.5)
    _record(state, [1.0, 2.0, 3.0], step=0)
    state.fit(epoch=1)
    tensors, metadata = state.state_dict()
    tensors["fit_losses"] = torch.zeros(5)
    with pytest.raises(NoiseStateError, match=r"the state: fit_losses of shape \(5,\) for 3 per-sample entries"):
        NoiseState(3).load_state_dict(tensors, metadata, where="the state")


def test_noise_prob_on_evidence_caps_only_the_loss_based_part():
    """Before a fit and after a fallback it is `noise_prob`; after a fit whose clean weight is the larger, the
    loss-based ε is taken on evidence (`evidence_clean_prob`), and a reference prior is blended in as in `noise_prob`."""
    from trainers.noise.estimation import evidence_clean_prob
    from trainers.noise.reference_prior import ReferencePrior

    rng = np.random.default_rng(0)
    state = NoiseState(1000)
    assert torch.equal(state.noise_prob_on_evidence(), state.noise_prob)  # nothing fitted: ε = 0
    losses = np.concatenate([rng.normal(1.0, 0.3, 900), rng.normal(2.5, 0.4, 100)])
    _record(state, losses.tolist(), step=0)
    state.fit(epoch=1)
    weights = state.estimate_summary["weights"]
    assert weights[0] > weights[1]
    expected = 1 - evidence_clean_prob(1 - state.noise_prob, tuple(weights))
    torch.testing.assert_close(state.noise_prob_on_evidence(), expected)
    assert (state.noise_prob_on_evidence() >= state.noise_prob - 1e-6).all()  # capping only removes clean evidence
    prior_noise = torch.linspace(0, 1, 1000)
    prior = ReferencePrior(score=torch.zeros(1000), random_pair_cosine=0.0, clean_prob=1 - prior_noise)
    state.set_reference_prior(prior, 0.25)
    torch.testing.assert_close(state.noise_prob_on_evidence(), 0.25 * prior.noise_prob + 0.75 * expected)
    flat = NoiseState(1000, max_noisy_fraction=0.01)  # every fit is discarded: ε stays 0
    _record(flat, losses.tolist(), step=0)
    flat.fit(epoch=1)
    assert torch.equal(flat.noise_prob_on_evidence(), flat.noise_prob)


def test_min_separation_discards_an_unseparated_fit_and_the_separation_is_logged():
    """`min_separation` reaches the estimator: losses split by spread (one level, D < 1) are not used (ε stays 0, the
    reason is kept), while a fit of two real modes is, and its Ashman's D is in the statistics and the summary."""
    rng = np.random.default_rng(1)
    unseparated = np.concatenate([rng.normal(4.85, 0.2, 900), rng.normal(5.0, 1.0, 100)])
    guarded = NoiseState(1000, min_separation=2.0)
    _record(guarded, unseparated.tolist(), step=0)
    guarded.fit(epoch=1)
    assert not guarded.is_estimated and torch.equal(guarded.noise_prob, torch.zeros(1000))
    assert guarded.estimate_summary["fallback_reason"].startswith("the mixture's components are not separated")
    assert "noise/separation" not in guarded.compute_statistics()
    separated = NoiseState(1000, min_separation=2.0)
    _record(separated, np.concatenate([rng.normal(1.0, 0.3, 700), rng.normal(3.0, 0.4, 300)]).tolist(), step=0)
    separated.fit(epoch=1)
    (m0, m1), (v0, v1) = separated.estimate_summary["means"], separated.estimate_summary["variances"]
    expected = abs(m1 - m0) * math.sqrt(2 / (v0 + v1))
    assert separated.is_estimated and expected > 4
    assert separated.compute_statistics()["noise/separation"] == pytest.approx(expected, rel=1e-6)
    tensors, metadata = separated.state_dict()
    restored = NoiseState(1000)
    restored.load_state_dict(tensors, metadata)
    assert restored.estimator.min_separation == 2.0
