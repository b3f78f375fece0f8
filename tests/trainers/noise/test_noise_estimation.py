import copy
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture

from trainers.noise.estimation import CleanProbabilityEstimator, NoiseEstimate, evidence_clean_prob


def _bimodal(num_samples=20_000, noise_rate=0.3, seed=0):
    """Clean losses around 0.5, noisy ones around 3 (what a warmed-up contrastive model shows)."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(num_samples) < noise_rate
    losses = np.where(noisy, rng.normal(3.0, 0.5, num_samples), rng.gamma(4.0, 0.125, num_samples))
    return losses.astype(np.float32), noisy


def test_separates_bimodal_losses():
    losses, noisy = _bimodal()
    estimate = CleanProbabilityEstimator().fit(losses)
    assert isinstance(estimate, NoiseEstimate) and estimate.reason is None
    assert estimate.clean_prob.dtype == np.float32 and estimate.clean_prob.shape == losses.shape
    assert roc_auc_score(noisy, estimate.noise_prob) > 0.99
    assert abs(estimate.noise_prob.mean() - 0.3) < 0.02
    assert abs(estimate.means[0] - 0.5) < 0.05 and abs(estimate.means[1] - 3.0) < 0.1
    assert abs(estimate.weights[1] - 0.3) < 0.02
    assert 0.9 < estimate.loss_threshold < 2.2
    assert np.array_equal(CleanProbabilityEstimator().fit(losses).clean_prob, estimate.clean_prob)  # seeded


def test_fits_on_a_subsample_and_predicts_on_all():
    losses, noisy = _bimodal(num_samples=50_000, seed=1)
    estimator = CleanProbabilityEstimator(max_fit_samples=1_000, seed=3)
    estimate = estimator.fit(losses)
    assert estimate.clean_prob.shape == (50_000,)
    assert roc_auc_score(noisy, estimate.noise_prob) > 0.99


def test_clean_probability_is_non_increasing_in_loss():
    # A narrow clean mode and a broad noisy one: the raw posterior would call the lowest losses noisy.
    rng = np.random.default_rng(2)
    losses = np.concatenate([rng.normal(1.0, 0.05, 5000), rng.normal(3.0, 1.0, 5000)])
    estimator = CleanProbabilityEstimator()
    estimator.fit(losses)
    grid = np.linspace(-5, 10, 2001)
    clean_prob = estimator.predict(grid).clean_prob
    assert np.all(np.diff(clean_prob) <= 0)
    assert clean_prob[0] > 0.95 and clean_prob[-1] < 0.01
    # The unclipped posterior (from the fitted parameters, in normalised units) at the lowest loss would be ≈ 0.
    mixture = estimator.state_dict()["mixture"]
    lowest = (grid[0] - mixture["loss_min"]) / (mixture["loss_max"] - mixture["loss_min"])
    densities = [
        weight * norm.pdf(lowest, mean, np.sqrt(variance))
        for mean, variance, weight in zip(mixture["means"], mixture["variances"], mixture["weights"])
    ]
    assert densities[0] / sum(densities) < 1e-3


def test_non_finite_losses_are_skipped_in_fit():
    losses, noisy = _bimodal(num_samples=5_000)
    with_bad = np.concatenate([losses, [np.nan, np.inf, -np.inf]])
    estimate = CleanProbabilityEstimator().fit(with_bad)
    assert estimate.reason is None
    assert roc_auc_score(noisy, estimate.noise_prob[:5000]) > 0.99
    nan_prob, inf_prob, minus_inf_prob = estimate.clean_prob[-3:]
    assert nan_prob == 1.0  # no evidence, as for a LossBank entry never seen
    assert inf_prob < 0.01 and minus_inf_prob > 0.99


@pytest.mark.parametrize(
    "losses, reason",
    [
        (np.full(100, 0.7), "all 100 finite losses are equal (0.7)"),
        (np.full(50, np.nan), "only 0 finite losses out of 50"),
        (np.array([np.inf, -np.inf, np.nan] * 10), "only 0 finite losses out of 30"),
        (np.array([0.1, 2.0, 5.0]), "only 3 finite losses out of 3 (need at least min_samples=10)"),
        (np.array([]), "only 0 finite losses out of 0"),
    ],
)
def test_degenerate_inputs_fall_back_to_clean(losses, reason, caplog):
    estimator = CleanProbabilityEstimator()
    with caplog.at_level(logging.WARNING, logger="trainers.noise.estimation"):
        estimate = estimator.fit(losses)
    assert estimate.reason.startswith(reason), estimate.reason
    assert reason in caplog.text
    assert np.array_equal(estimate.clean_prob, np.ones(len(losses), dtype=np.float32))
    assert estimate.means is None and not estimator.is_fitted
    assert np.array_equal(estimator.predict([5.0, 0.1]).clean_prob, [1.0, 1.0])


def test_fit_failure_falls_back(monkeypatch, caplog):
    def failing_fit(self, X, y=None):
        raise ValueError("simulated collapse")

    monkeypatch.setattr(GaussianMixture, "fit", failing_fit)
    losses, _ = _bimodal(num_samples=1_000)
    with caplog.at_level(logging.WARNING, logger="trainers.noise.estimation"):
        estimate = CleanProbabilityEstimator().fit(losses)
    assert estimate.reason == "GaussianMixture fit failed: simulated collapse"
    assert "simulated collapse" in caplog.text
    assert (estimate.clean_prob == 1).all()


def test_refit_after_fallback_recovers():
    estimator = CleanProbabilityEstimator()
    estimator.fit(np.full(20, 1.0))
    losses, noisy = _bimodal(num_samples=2_000)
    estimate = estimator.fit(torch.from_numpy(losses))
    assert estimate.reason is None and estimator.is_fitted and estimator.reason is None
    assert roc_auc_score(noisy, estimate.noise_prob) > 0.99


def test_predict_before_fit_is_clean():
    estimate = CleanProbabilityEstimator().predict(np.array([0.1, 3.0]))
    assert np.array_equal(estimate.clean_prob, [1.0, 1.0])
    assert estimate.reason == "the estimator has not been fit yet"


def test_state_dict_round_trip_gives_identical_predictions():
    losses, _ = _bimodal(num_samples=3_000)
    estimator = CleanProbabilityEstimator(max_fit_samples=2_000, seed=5)
    fitted = estimator.fit(losses)
    state = json.loads(json.dumps(estimator.state_dict()))  # plain values only
    restored = CleanProbabilityEstimator()
    restored.load_state_dict(state)
    assert restored.max_fit_samples == 2_000 and restored.seed == 5
    new_losses = np.linspace(-1, 6, 500)
    assert np.array_equal(restored.predict(new_losses).clean_prob, estimator.predict(new_losses).clean_prob)
    assert restored.predict(losses).means == fitted.means
    assert restored.predict(losses).loss_threshold == fitted.loss_threshold
    # A fallback state restores as a fallback.
    estimator.fit(np.full(5, 1.0))
    restored.load_state_dict(estimator.state_dict())
    assert restored.predict(new_losses).reason.startswith("only 5 finite losses")
    with pytest.raises(ValueError, match=r"missing \['mixture'\]"):
        restored.load_state_dict({k: v for k, v in estimator.state_dict().items() if k != "mixture"})


def test_bad_arguments():
    with pytest.raises(ValueError, match="1-D"):
        CleanProbabilityEstimator().fit(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="min_samples"):
        CleanProbabilityEstimator(min_samples=1)
    with pytest.raises(ValueError, match="max_fit_samples"):
        CleanProbabilityEstimator(max_fit_samples=5)


def test_a_broad_clean_component_keeps_the_lowest_losses_clean():
    """A broad clean mode under a narrow noisy peak (heavy noise: most losses pile up near the random-pair loss). At
    the clean component's mean the narrow noisy peak still wins, so clipping there would call every pair noisy; the
    low tail must stay clean and the high tail noisy."""
    rng = np.random.default_rng(0)
    rng.normal(size=700)  # a draw for which the fit has this shape
    clean, noisy = rng.normal(4.0, 0.4, 280), rng.normal(4.15, 0.08, 420)
    estimator = CleanProbabilityEstimator()
    estimate = estimator.fit(np.concatenate([clean, noisy]))
    mixture = estimator._mixture
    assert mixture.variances[0] > mixture.variances[1]  # the clean component is the broader one
    assert mixture.log_odds(np.array(mixture.means[0])) < 0  # ... and loses at its own mean
    assert 0.2 < float((estimate.noise_prob > 0.5).mean()) < 0.95
    assert float(estimate.clean_prob[:280][clean < 3.5].min()) > 0.9  # the clearly low losses are clean
    grid = np.linspace(2.0, 7.0, 1001)
    clean_prob = estimator.predict(grid).clean_prob
    assert np.all(np.diff(clean_prob) <= 0)
    # Beyond the log-odds' vertex (above the noisy mean) the broad clean component would win again: held at the vertex.
    assert clean_prob[-1] == clean_prob.min() < 0.2
    threshold = estimate.loss_threshold
    assert threshold is not None and estimator.predict([threshold - 0.01]).clean_prob[0] > 0.5 > estimator.predict([threshold + 0.01]).clean_prob[0]


def test_a_fit_that_calls_almost_every_pair_noisy_is_not_trusted(caplog):
    """A small, barely separated loss sample whose mixture puts nearly all pairs in the noisy component (a narrow clean
    component on a handful of low losses) falls back to p = 1, and the reason says why; `max_noisy_fraction=1` uses
    it."""
    rng = np.random.default_rng(3)
    losses = np.concatenate([rng.normal(1.0, 0.01, 3), rng.normal(3.0, 0.3, 57)])
    trusting = CleanProbabilityEstimator(max_noisy_fraction=1.0).fit(losses)
    noisy_fraction = float((trusting.clean_prob < 0.5).mean())
    assert noisy_fraction > 0.9 and trusting.reason is None
    with caplog.at_level(logging.WARNING, logger="trainers.noise.estimation"):
        guarded = CleanProbabilityEstimator().fit(losses)
    assert np.array_equal(guarded.clean_prob, np.ones(60, dtype=np.float32))
    assert guarded.reason.startswith(f"the fit calls {noisy_fraction:.1%} of the pairs noisy, more than max_noisy_fraction=0.9")
    assert "max_noisy_fraction=0.9" in caplog.text
    # 80 % real noise is still estimated (under the 0.9 guard).
    losses, noisy = _bimodal(num_samples=5_000, noise_rate=0.8, seed=2)
    estimate = CleanProbabilityEstimator().fit(losses)
    assert estimate.reason is None and roc_auc_score(noisy, estimate.noise_prob) > 0.99
    with pytest.raises(ValueError, match=r"`max_noisy_fraction` must be in \(0, 1\]"):
        CleanProbabilityEstimator(max_noisy_fraction=0.0)


def test_a_fit_that_splits_the_losses_by_spread_is_not_trusted_with_min_separation(caplog):
    """Losses that have not separated (a narrow core and a broad tail at one level, as from scratch at 80 % noise
    before the memorisation effect) give a mixture of Ashman's D ≈ 0.2 that calls ~97 % of the pairs clean. With
    `min_separation=2` that fit falls back to p = 1 and says why; two real modes (D ≈ 5) pass the same guard."""
    rng = np.random.default_rng(0)
    unseparated = np.concatenate([rng.normal(4.85, 0.2, 9_000), rng.normal(5.0, 1.0, 1_000)])
    trusting = CleanProbabilityEstimator().fit(unseparated)
    (m0, m1), (v0, v1) = trusting.means, trusting.variances
    assert trusting.separation == pytest.approx(abs(m1 - m0) * np.sqrt(2 / (v0 + v1)), rel=1e-9)
    assert trusting.separation < 1.0 and (trusting.clean_prob > 0.5).mean() > 0.8
    with caplog.at_level(logging.WARNING, logger="trainers.noise.estimation"):
        guarded = CleanProbabilityEstimator(min_separation=2.0).fit(unseparated)
    assert np.array_equal(guarded.clean_prob, np.ones(10_000, dtype=np.float32)) and guarded.separation is None
    assert guarded.reason == (f"the mixture's components are not separated: Ashman's D = {trusting.separation:.3g} < "
                              "min_separation=2 (the losses are split by spread, not by level)")
    assert "Ashman's D" in caplog.text
    losses, noisy = _bimodal(num_samples=5_000, noise_rate=0.8, seed=2)
    separated = CleanProbabilityEstimator(min_separation=2.0).fit(losses)
    assert separated.reason is None and separated.separation > 4 and roc_auc_score(noisy, separated.noise_prob) > 0.99
    with pytest.raises(ValueError, match=r"`min_separation` must be >= 0; got -1"):
        CleanProbabilityEstimator(min_separation=-1)


def test_a_state_saved_before_the_noisy_fraction_guard_restores_without_it():
    losses, _ = _bimodal(num_samples=2_000)
    estimator = CleanProbabilityEstimator()
    estimator.fit(losses)
    old_state = {k: v for k, v in estimator.state_dict().items() if k not in ("max_noisy_fraction", "min_separation")}
    restored = CleanProbabilityEstimator(min_separation=3.0)
    restored.load_state_dict(old_state)
    assert restored.max_noisy_fraction == 1.0 and restored.min_separation == 0.0  # the behaviour of the code that wrote it
    assert np.array_equal(restored.predict(losses).clean_prob, estimator.predict(losses).clean_prob)


def test_evidence_clean_prob_caps_the_clean_weight():
    """`p' = p·w_n / (p·w_n + (1 − p)·w_c)` when the clean weight is the larger, `p` itself otherwise."""
    p = torch.tensor([0.95, 0.5, 0.999, 0.0])
    capped = evidence_clean_prob(p, (0.93, 0.07))
    torch.testing.assert_close(capped, p * 0.07 / (p * 0.07 + (1 - p) * 0.93))
    assert capped[0].item() == pytest.approx(0.0665 / 0.1130, rel=1e-5)  # 0.95 → 0.59: no longer "confidently clean"
    assert capped[2].item() > 0.98 and capped[3].item() == 0.0
    assert evidence_clean_prob(p, (0.4, 0.6)) is p and evidence_clean_prob(p, (0.5, 0.5)) is p


def test_evidence_clean_prob_is_the_posterior_under_equal_weights():
    """On a fitted mixture whose clean weight is high, the capped posterior equals the posterior of the same
    components with equal weights."""
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(1.0, 0.3, 900), rng.normal(2.5, 0.4, 100)])
    estimator = CleanProbabilityEstimator(seed=0)
    estimate = estimator.fit(losses)
    assert estimate.weights[0] > 0.8
    equal = copy.deepcopy(estimator)
    equal._mixture = dataclasses.replace(estimator._mixture, weights=[0.5, 0.5])
    np.testing.assert_allclose(evidence_clean_prob(estimate.clean_prob.astype(np.float64), estimate.weights),
                               equal.predict(losses).clean_prob, rtol=0, atol=1e-5)
    assert (evidence_clean_prob(estimate.clean_prob, estimate.weights) > 0.9).sum() < (estimate.clean_prob > 0.9).sum()
