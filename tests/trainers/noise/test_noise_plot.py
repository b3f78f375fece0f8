"""The loss-distribution plot: written as a real PNG with and without a fitted mixture."""

import numpy as np
from PIL import Image

from trainers.noise.estimation import CleanProbabilityEstimator
from trainers.noise.plot import plot_loss_distribution


def test_plot_with_fitted_mixture_and_ground_truth(tmp_path):
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(1.0, 0.3, 300), rng.normal(3.0, 0.5, 200)])
    is_noisy = np.r_[np.zeros(300, bool), np.ones(200, bool)]
    estimate = CleanProbabilityEstimator().fit(losses)
    assert estimate.loss_threshold is not None and 1.0 < estimate.loss_threshold < 3.0
    path = plot_loss_distribution(losses, estimate, tmp_path / "loss.png", is_noisy=is_noisy)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_plot_after_fallback_names_the_reason(tmp_path):
    estimate = CleanProbabilityEstimator().fit(np.ones(50))
    assert estimate.means is None and estimate.reason
    path = plot_loss_distribution(np.ones(50), estimate, tmp_path / "flat.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
