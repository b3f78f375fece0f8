"""Picture of the noise estimate: per-pair losses split by ground truth, with the fitted two-component GMM on top."""

from __future__ import annotations

import os

import numpy as np

from .estimation import NoiseEstimate


def plot_loss_distribution(
    losses: np.ndarray,
    estimate: NoiseEstimate,
    path: str | os.PathLike,
    *,
    is_noisy: np.ndarray | None = None,
    title: str = "Per-pair contrastive loss and the fitted noise GMM",
    bins: int = 60,
    xlabel: str = "per-pair loss (latest recorded)",
) -> str:
    """Save a histogram of `losses` (density; injected-noise pairs in a second colour when `is_noisy` is given) with
    the GMM's clean and noisy components and the 0.5-posterior threshold overlaid. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(losses)
    edges = np.histogram_bin_edges(losses[finite], bins=bins)
    fig, ax = plt.subplots(figsize=(7, 4))
    if is_noisy is None:
        ax.hist(losses[finite], bins=edges, density=True, alpha=0.6, color="tab:gray", label="all pairs")
    else:
        noisy = np.asarray(is_noisy, dtype=bool)
        # Both groups share one density scale (each weighted by 1/N overall), so their heights add up to the whole.
        weight = 1.0 / (finite.sum() * np.diff(edges)[0])
        for mask, colour, label in ((~noisy, "tab:blue", "clean pairs (ground truth)"), (noisy, "tab:red", "injected noisy pairs")):
            values = losses[finite & mask]
            ax.hist(values, bins=edges, weights=np.full(values.shape, weight), alpha=0.55, color=colour, label=label)
    if estimate.means is not None:
        grid = np.linspace(edges[0], edges[-1], 400)
        for mean, variance, mix, colour, name in zip(estimate.means, estimate.variances, estimate.weights,
                                                      ("navy", "darkred"), ("GMM clean component", "GMM noisy component")):
            density = mix * np.exp(-0.5 * (grid - mean) ** 2 / variance) / np.sqrt(2 * np.pi * variance)
            ax.plot(grid, density, color=colour, linewidth=2, label=name)
        if estimate.loss_threshold is not None:
            ax.axvline(estimate.loss_threshold, color="black", linestyle="--", label="p(clean) = 0.5")
    else:
        ax.text(0.5, 0.9, f"no GMM: {estimate.reason}", transform=ax.transAxes, ha="center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
