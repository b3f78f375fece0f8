"""Clean-probability estimation from per-sample losses (the memorisation effect; shared by NLIP and NPC).

Networks fit clean pairs before they memorise noisy ones, so early in training the loss of a pair separates clean from
noisy. A 2-component Gaussian mixture (scikit-learn) is fit to the min-max normalised losses and the posterior of the
lower-mean component is the clean probability `p_i` (noise probability `ε_i = 1 − p_i`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture


logger = logging.getLogger(__name__)

_SETTINGS = ("max_fit_samples", "min_samples", "seed", "max_iter", "tol", "reg_covar", "max_noisy_fraction",
             "min_separation")
# Settings added after the first checkpoint format, with the value older states implicitly used.
_LATER_SETTINGS = {"max_noisy_fraction": 1.0, "min_separation": 0.0}


@dataclass
class NoiseEstimate:
    """Clean probabilities of a set of losses and the mixture they came from.

    Attributes:
        clean_prob: float32 `[N]` posterior of the clean (lower-mean) component; 1 for NaN losses and everywhere when
            the estimator fell back.
        means: `(clean, noisy)` component means, in loss units; None after a fallback.
        variances: `(clean, noisy)` component variances, in squared loss units; None after a fallback.
        weights: `(clean, noisy)` mixture weights; None after a fallback.
        loss_threshold: the loss at which the clean probability crosses 0.5; None after a fallback or when it does not
            cross within the range of the losses it was fit on.
        separation: Ashman's D of the two components (`_Mixture.separation`); None after a fallback.
        reason: why the estimator fell back to `p = 1` for all samples; None when the mixture was used.
    """

    clean_prob: np.ndarray
    means: tuple[float, float] | None = None
    variances: tuple[float, float] | None = None
    weights: tuple[float, float] | None = None
    loss_threshold: float | None = None
    separation: float | None = None
    reason: str | None = None

    @property
    def noise_prob(self) -> np.ndarray:
        return 1.0 - self.clean_prob


def evidence_clean_prob(clean_prob, weights: tuple[float, float]):
    """The clean posterior with the clean component's weight capped at the noisy one's: when `w_c > w_n`,
    `p' = p·w_n / (p·w_n + (1 − p)·w_c)` (the posterior under equal weights), else `p` unchanged.

    `p > t` then needs the *likelihood* to favour clean by the odds `t/(1 − t)`. Without the cap, a mixture that puts
    most pairs in its clean component (e.g. `w_c = 0.93` before the losses separate at 80 % noise) gives `p > 0.9` to
    pairs with no evidence at all. `clean_prob`: a tensor or array of posteriors `p`; `weights`: `(w_c, w_n)`.
    """
    clean_weight, noisy_weight = weights
    if clean_weight <= noisy_weight:
        return clean_prob
    return clean_prob * noisy_weight / (clean_prob * noisy_weight + (1.0 - clean_prob) * clean_weight)


@dataclass
class _Mixture:
    """Fitted parameters in normalised-loss units, clean component first (plain floats, so they serialise exactly)."""

    loss_min: float
    loss_max: float
    means: list[float] = field(default_factory=list)
    variances: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def log_odds(self, normalised: np.ndarray) -> np.ndarray:
        """log p(clean | x) − log p(noisy | x), vectorised over a float64 array."""
        (m0, m1), (v0, v1), (w0, w1) = self.means, self.variances, self.weights
        constant = math.log(w0 / w1) - 0.5 * math.log(v0 / v1)
        return constant - 0.5 * np.square(normalised - m0) / v0 + 0.5 * np.square(normalised - m1) / v1

    def monotone_range(self) -> tuple[float, float]:
        """The interval on which the clean posterior falls as the loss grows. The log-odds are a quadratic in the loss:
        with unequal variances it turns at its vertex, below it when the clean component is the narrower (concave: a
        broad noisy component wins again on the low tail) and above it when the clean component is the broader
        (convex: it wins again on the high tail). The range runs from that vertex to infinity or from minus infinity
        to it; with equal variances the log-odds are linear and fall everywhere."""
        (m0, m1), (v0, v1) = self.means, self.variances
        curvature = 1.0 / v1 - 1.0 / v0  # twice the quadratic's x² coefficient
        if abs(curvature) < 1e-12 / min(v0, v1):
            return -math.inf, math.inf
        vertex = (m1 / v1 - m0 / v0) / curvature
        return (vertex, math.inf) if curvature < 0 else (-math.inf, vertex)

    def separation(self) -> float:
        """Ashman's D of the two components, `|μ_n − μ_c|·√(2 / (σ²_c + σ²_n))` (unit-free; > 2 for a clean split)."""
        (m0, m1), (v0, v1) = self.means, self.variances
        return abs(m1 - m0) * math.sqrt(2.0 / (v0 + v1))

    def to_loss_units(self, normalised: float) -> float:
        return self.loss_min + normalised * (self.loss_max - self.loss_min)


class CleanProbabilityEstimator:
    """Fits a 2-component GMM to per-sample losses and predicts each sample's clean probability.

    The mixture is fit on at most `max_fit_samples` finite losses drawn at random (seeded, so a restored run refits
    identically) and applied to all losses with a vectorised numpy posterior, so 10M losses take seconds.

    Choices, documented:

    - Losses are min-max normalised with the fit data's range; `predict` reuses that range.
    - The posterior is evaluated at the normalised loss clipped to the range where it falls as the loss grows
      (`_Mixture.monotone_range`). A broader component wins again on its far tail: a broad noisy component would call
      the lowest-loss pairs noisy, a broad clean one the highest-loss pairs clean. Clipping at the log-odds' vertex
      makes `p` non-increasing in the loss without changing it where it already was (+inf maps to the value at the
      vertex, or to 0).
    - NaN losses (e.g. `LossBank` entries never seen) are left out of the fit and get `p = 1` (no evidence, as before
      the first fit); ±inf are left out of the fit and predicted through the clipping above.
    - Degenerate input — fewer than `min_samples` finite losses, all finite losses equal, or a failed fit — does not
      raise: every sample gets `p = 1`, and `reason` says why (also logged as a warning).
    - A fit is not trusted blindly: when it calls more than `max_noisy_fraction` of the finite losses noisy (`p < 0.5`)
      it is discarded the same way (`p = 1`, `reason` says so). On small data the per-pair losses barely separate and a
      mixture can put almost every pair in its "noisy" component (95 % of 60 pairs with 30 % noise); down-weighting
      nearly everything only removes signal.
    - With `min_separation` > 0, a fit whose components are closer than that in Ashman's D
      (`|μ_n − μ_c|·√(2 / (σ²_c + σ²_n))`, `NoiseEstimate.separation`) is discarded the same way. Before the losses
      separate (from scratch at 80 % noise, every loss near the chance level `ln B`), the mixture splits them by spread,
      not by level: a narrow "clean" core holding ~90 % of the pairs beside a broad tail (D ≈ 0.0–0.9), which NPC
      then builds its clean memory bank from. 0 (the default) trusts every such fit: on Fashion-MNIST at 80 % noise
      discarding them did not help NPC (`bench/noise_fit.py --method npc`).

    Args:
        max_fit_samples: the most losses the mixture is fit on.
        min_samples: the fewest finite losses worth fitting.
        seed: seed of the subsample and of the mixture's initialisation.
        max_iter, tol, reg_covar: passed to `sklearn.mixture.GaussianMixture`. `reg_covar=5e-4` (as in DivideMix/NCR,
            whose losses are also normalised to [0, 1]) keeps a component from collapsing onto repeated values.
    """

    def __init__(
        self,
        *,
        max_fit_samples: int = 100_000,
        min_samples: int = 10,
        seed: int = 0,
        max_iter: int = 100,
        tol: float = 1e-3,
        reg_covar: float = 5e-4,
        max_noisy_fraction: float = 0.9,
        min_separation: float = 0.0,
    ):
        if min_samples < 2:
            raise ValueError(f"`min_samples` must be >= 2 to fit two components; got {min_samples}.")
        if max_fit_samples < min_samples:
            raise ValueError(f"`max_fit_samples` ({max_fit_samples}) must be >= `min_samples` ({min_samples}).")
        if not 0.0 < max_noisy_fraction <= 1.0:
            raise ValueError(f"`max_noisy_fraction` must be in (0, 1]; got {max_noisy_fraction}.")
        if min_separation < 0.0:
            raise ValueError(f"`min_separation` must be >= 0; got {min_separation}.")
        self.max_noisy_fraction = max_noisy_fraction
        self.min_separation = min_separation
        self.max_fit_samples = max_fit_samples
        self.min_samples = min_samples
        self.seed = seed
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self._mixture: _Mixture | None = None
        self._reason: str | None = "the estimator has not been fit yet"

    @property
    def is_fitted(self) -> bool:
        """Whether the last `fit` produced a usable mixture (False before any fit and after a fallback)."""
        return self._mixture is not None

    @property
    def reason(self) -> str | None:
        """Why predictions are the `p = 1` fallback; None when a mixture is in use."""
        return self._reason

    def _fall_back(self, reason: str) -> None:
        self._mixture, self._reason = None, reason
        logger.warning("Noise estimation falls back to clean probability 1 for all samples: %s", reason)

    def fit(self, losses) -> NoiseEstimate:
        """Fit the mixture to `losses` (1-D numpy array, list or torch tensor) and predict on them."""
        values = _as_float64(losses)
        finite = values[np.isfinite(values)]
        if finite.size < self.min_samples:
            self._fall_back(
                f"only {finite.size} finite losses out of {values.size} (need at least min_samples={self.min_samples})"
            )
            return self.predict(values)
        loss_min, loss_max = float(finite.min()), float(finite.max())
        if loss_max - loss_min <= 1e-12 * max(1.0, abs(loss_max)):
            self._fall_back(f"all {finite.size} finite losses are equal ({loss_min:.6g}); nothing to separate")
            return self.predict(values)
        if finite.size > self.max_fit_samples:
            finite = np.random.default_rng(self.seed).choice(finite, self.max_fit_samples, replace=False)
        normalised = (finite - loss_min) / (loss_max - loss_min)
        gmm = GaussianMixture(
            n_components=2, max_iter=self.max_iter, tol=self.tol, reg_covar=self.reg_covar, random_state=self.seed
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gmm.fit(normalised[:, None])
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as error:
            self._fall_back(f"GaussianMixture fit failed: {error}")
            return self.predict(values)
        if not gmm.converged_:
            logger.warning(
                "GaussianMixture did not converge in %d iterations; using its last estimate.", self.max_iter
            )
        order = np.argsort(gmm.means_.ravel())
        self._mixture = _Mixture(
            loss_min=loss_min,
            loss_max=loss_max,
            means=[float(m) for m in gmm.means_.ravel()[order]],
            variances=[float(v) for v in gmm.covariances_.ravel()[order]],
            weights=[float(w) for w in gmm.weights_[order]],
        )
        self._reason = None
        separation = self._mixture.separation()
        if separation < self.min_separation:
            self._fall_back(
                f"the mixture's components are not separated: Ashman's D = {separation:.3g} < min_separation="
                f"{self.min_separation:g} (the losses are split by spread, not by level)"
            )
            return self.predict(values)
        estimate = self.predict(values)
        noisy_fraction = float((estimate.clean_prob[np.isfinite(values)] < 0.5).mean())
        if noisy_fraction > self.max_noisy_fraction:
            self._fall_back(
                f"the fit calls {noisy_fraction:.1%} of the pairs noisy, more than max_noisy_fraction="
                f"{self.max_noisy_fraction:g}; a mixture that flags almost everything is not separating clean from noisy"
            )
            return self.predict(values)
        logger.info(
            "Noise estimation: clean/noisy loss means %.4g/%.4g, weights %.3f/%.3f, estimated noise rate %.3f.",
            *estimate.means,
            *estimate.weights,
            float(estimate.noise_prob.mean()),
        )
        return estimate

    def predict(self, losses) -> NoiseEstimate:
        """Clean probabilities of `losses` under the fitted mixture (all ones, with `reason`, if there is none)."""
        values = _as_float64(losses)
        mixture = self._mixture
        if mixture is None:
            return NoiseEstimate(clean_prob=np.ones(values.shape, dtype=np.float32), reason=self._reason)
        normalised = (values - mixture.loss_min) / (mixture.loss_max - mixture.loss_min)
        # ±inf losses are taken as losses far outside the fit range (1e6 ranges), where the posterior has its limit.
        normalised = np.clip(np.nan_to_num(normalised, posinf=1e6, neginf=-1e6), *mixture.monotone_range())
        clean_prob = expit(mixture.log_odds(normalised)).astype(np.float32)
        clean_prob[np.isnan(values)] = 1.0
        scale = mixture.loss_max - mixture.loss_min
        return NoiseEstimate(
            clean_prob=clean_prob,
            means=tuple(mixture.to_loss_units(m) for m in mixture.means),
            variances=tuple(v * scale**2 for v in mixture.variances),
            weights=tuple(mixture.weights),
            loss_threshold=_threshold(mixture),
            separation=mixture.separation(),
        )

    def state_dict(self) -> dict:
        """Settings and fitted parameters as plain Python values (JSON-serialisable); restores predictions exactly."""
        return {
            **{name: getattr(self, name) for name in _SETTINGS},
            "mixture": None if self._mixture is None else asdict(self._mixture),
            "reason": self._reason,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = {**_LATER_SETTINGS, **state_dict}
        expected = set(self.state_dict())
        missing = expected - set(state_dict)
        if missing:
            raise ValueError(f"CleanProbabilityEstimator state_dict is missing {sorted(missing)}.")
        for name in _SETTINGS:
            setattr(self, name, state_dict[name])
        self._reason = state_dict["reason"]
        self._mixture = None if state_dict["mixture"] is None else _Mixture(**state_dict["mixture"])


def _as_float64(losses) -> np.ndarray:
    values = np.asarray(losses.detach().cpu() if hasattr(losses, "detach") else losses, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"`losses` must be 1-D (one loss per sample); got shape {values.shape}.")
    return values


def _threshold(mixture: _Mixture, iterations: int = 60) -> float | None:
    """Loss where the clean posterior crosses 0.5, by bisection on the normalised fit range [0, 1] clipped to where
    it is monotone; None when it does not cross there."""
    start, end = mixture.monotone_range()
    low, high = max(0.0, start), min(1.0, end)
    if not (low < high and mixture.log_odds(np.array(low)) >= 0 >= mixture.log_odds(np.array(high))):
        return None
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if mixture.log_odds(np.array(middle)) >= 0 else (low, middle)
    return mixture.to_loss_units(0.5 * (low + high))
