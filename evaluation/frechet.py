"""Fréchet distance between two Gaussians (the maths of FID, in any feature space).

d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2). The matrix square root is
taken of the symmetric PSD matrix S1^1/2 S2 S1^1/2 by eigendecomposition (real, stable;
its trace equals Tr((S1 S2)^1/2), the form pytorch-fid computes with scipy's sqrtm).
"""
from __future__ import annotations

import numpy as np

from diffusion.errors import UserError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> mean (D,), covariance (D, D) (unbiased, N - 1), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise UserError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (FID's convention: no square root)."""
    root1 = _psd_sqrt(cov1)
    middle = _psd_sqrt(root1 @ cov2 @ root1)
    d2 = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(middle)
    return float(max(d2, 0.0))


def frechet_distance_to_features(features: np.ndarray, mu2, cov2) -> float:
    """frechet_distance(*gaussian_stats(features), mu2, cov2), computed in the smaller space.

    With X = (features - mean) / sqrt(N - 1) (N x D), cov1 = X^T X, and the non-zero eigenvalues
    of cov1 cov2 = X^T (X cov2) are those of X cov2 X^T (N x N, symmetric PSD). So when N < D
    (few samples, 2048-d Inception features) Tr((cov1 cov2)^1/2) comes from an N x N
    eigendecomposition instead of two D x D ones; the same value, exactly in exact arithmetic.
    """
    f = np.asarray(features, dtype=np.float64)
    mu1, cov1 = gaussian_stats(f)
    n, d = f.shape
    if n >= d:
        return frechet_distance(mu1, cov1, mu2, cov2)
    x = (f - mu1) / np.sqrt(n - 1)
    small = x @ np.asarray(cov2, dtype=np.float64) @ x.T  # (N, N)
    eig = np.linalg.eigvalsh((small + small.T) / 2)
    tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
    d2 = np.sum((mu1 - mu2) ** 2) + np.sum(x * x) + np.trace(cov2) - 2.0 * tr_sqrt
    return float(max(d2, 0.0))
