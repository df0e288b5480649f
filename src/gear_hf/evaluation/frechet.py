"""The Fréchet distance between Gaussians fitted to two feature sets: FID, sFID, rFID, COCO FID and FD-DINOv2.

Every official path (ADM evaluator, pytorch-fid, GEAR's tools, the GPIC port) uses the TTUR function:
`d² = ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2·Tr sqrtm(Σ1·Σ2)` with `scipy.linalg.sqrtm`; when the root is not finite it
retries with ε = 1e-6 added to both diagonals, and it takes the real part unless an imaginary diagonal entry
exceeds 1e-3. `method="sqrtm"` is that function. `method="eigh"` is an exact rewrite that is much faster on CPU:
Tr sqrtm(Σ1Σ2) = Σ sqrt(eig(√Σ1 · Σ2 · √Σ1)), a symmetric eigenproblem; when a side was fitted to n ≤ d
features (Σ = AᵀA / (n − 1), A centred), the same eigenvalues come from the n × n matrix A · Σ_other · Aᵀ / (n − 1),
so small-set FIDs cost O(n·d²) instead of O(d³) (agreement with sqrtm is tested).
Statistics follow the ADM evaluator: μ = `np.mean(axis=0)` in the features' dtype, Σ = `np.cov(rowvar=False)`
(float64, N − 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FD_METHODS = ("sqrtm", "eigh")


@dataclass
class FIDStatistics:
    """Mean and covariance of a feature set (`mu` (d,), `sigma` (d, d)). `factor` is the centred features scaled
    by 1/sqrt(n − 1) (so sigma = factorᵀ·factor), kept when n ≤ d for the fast exact `eigh` route."""

    mu: np.ndarray
    sigma: np.ndarray
    factor: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray) -> FIDStatistics:
        features = np.asarray(features)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Statistics need a (N >= 2, d) feature array, got shape {features.shape}.")
        factor = None
        if len(features) <= features.shape[1]:
            centred = features.astype(np.float64) - features.astype(np.float64).mean(axis=0)
            factor = centred / np.sqrt(len(features) - 1)
        return cls(mu=np.mean(features, axis=0), sigma=np.cov(features, rowvar=False), factor=factor)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    from scipy import linalg
    from scipy import __version__ as scipy_version

    if tuple(int(p) for p in scipy_version.split(".")[:2]) >= (1, 16):  # `disp` deprecated in 1.16, gone in 1.18
        return linalg.sqrtm(matrix)
    return linalg.sqrtm(matrix, disp=False)[0]


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: singular product; adding {eps} to the diagonal of both covariances "
                      "(as the ADM evaluator does).", RuntimeWarning, stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}; "
                             "the covariances are not valid (too few samples or non-finite features?).")
        covmean = covmean.real
    return float(np.trace(covmean))


def _sqrt_eigvalsh_sum(matrix: np.ndarray) -> float:
    return float(np.sqrt(np.linalg.eigvalsh((matrix + matrix.T) / 2).clip(min=0)).sum())


def _trace_sqrt_product_eigh(s1: FIDStatistics, s2: FIDStatistics) -> float:
    if s2.factor is not None and (s1.factor is None or len(s2.factor) < len(s1.factor)):
        s1, s2 = s2, s1  # the trace is symmetric in the two sides: factor the smaller one
    sigma2 = s2.sigma.astype(np.float64)
    if s1.factor is not None:  # eig(Σ1Σ2) \ {0} = eig(A Σ2 Aᵀ) for Σ1 = AᵀA
        a = s1.factor
        inner = a @ (s2.factor.T @ (s2.factor @ a.T)) if s2.factor is not None else a @ sigma2 @ a.T
        return _sqrt_eigvalsh_sum(inner)
    values, vectors = np.linalg.eigh(s1.sigma.astype(np.float64))
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    return _sqrt_eigvalsh_sum(root1 @ sigma2 @ root1)


def frechet_distance_terms(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                           method: str = "sqrtm") -> tuple[float, float, float]:
    """(FD, ‖Δμ‖², trace term); FD = their sum. `method`: "sqrtm" (the TTUR/ADM function) or "eigh"."""
    return frechet_distance_stats(FIDStatistics(mu1, sigma1), FIDStatistics(mu2, sigma2), eps=eps, method=method)


def frechet_distance_stats(s1: FIDStatistics, s2: FIDStatistics, eps: float = 1e-6,
                           method: str = "sqrtm") -> tuple[float, float, float]:
    """`frechet_distance_terms` of two `FIDStatistics` (the `eigh` method uses their low-rank factors)."""
    if method not in FD_METHODS:
        raise ValueError(f"method must be one of {FD_METHODS}, got {method!r}.")
    mu1, mu2 = np.atleast_1d(s1.mu), np.atleast_1d(s2.mu)
    sigma1, sigma2 = np.atleast_2d(s1.sigma), np.atleast_2d(s2.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"The two statistics have different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape}. Compute both with the same feature extractor.")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"Fréchet distance: {name} has non-finite entries.")
    diff = mu1 - mu2
    if method == "sqrtm":
        trace_sqrt = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        trace_sqrt = _trace_sqrt_product_eigh(s1, s2)
    mean_term = float(diff.dot(diff))
    cov_term = float(np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return mean_term + cov_term, mean_term, cov_term


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see module docstring)."""
    return frechet_distance_terms(mu1, sigma1, mu2, sigma2, eps=eps, method=method)[0]


def fid_from_features(features1: np.ndarray, features2: np.ndarray, method: str = "sqrtm") -> float:
    """FD between the statistics of two feature sets (e.g. rFID: ground truth vs reconstructions)."""
    s1, s2 = FIDStatistics.from_features(features1), FIDStatistics.from_features(features2)
    return frechet_distance_stats(s1, s2, method=method)[0]


__all__ = ["FD_METHODS", "FIDStatistics", "fid_from_features", "frechet_distance", "frechet_distance_stats",
           "frechet_distance_terms"]
