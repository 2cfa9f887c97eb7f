"""What every model has, measured between two sets of images: PSNR, SSIM, relative L2, and
the Frechet distance of features (for evaluators that bring a feature network)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 2.0  # images live in [-1, 1]


def psnr_db(reference: Tensor, test: Tensor) -> float:
    """PSNR over the [-1, 1] data range (peak-to-peak 2), both clamped to it."""
    mse = float((reference.clamp(-1, 1) - test.clamp(-1, 1)).double().pow(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(DATA_RANGE**2 / mse)


def error_spread(reference: Tensor, test: Tensor) -> dict[str, float]:
    """How the final error is shared among samples (both clamped to [-1, 1]): the median sample's
    PSNR, and the share of the squared error held by the worst 1% of samples (at least one).  The
    PSNR of the mean squared error can belong to a few samples whose trajectory tipped to another
    image; these two say when it does."""
    mse = (reference.clamp(-1, 1) - test.clamp(-1, 1)).double().pow(2).flatten(1).mean(1)
    worst = max(1, len(mse) // 100)
    total = float(mse.sum())
    median = float(mse.median())
    return {
        "psnr_db_median": float("inf") if median == 0 else float(10 * np.log10(DATA_RANGE**2 / median)),
        "worst_1pct_error_share": 0.0 if total == 0 else float(mse.sort(descending=True).values[:worst].sum()) / total,
    }


def rel_l2(reference: Tensor, test: Tensor) -> Tensor:
    """(B,) ||test - ref|| / ||ref|| per sample."""
    ref = reference.flatten(1).double()
    return (test.flatten(1).double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(reference: Tensor, test: Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) over the
    images and channels of two (N, C, H, W) sets in [-1, 1]; the window shrinks (odd) to fit
    smaller images, statistics over the valid region."""
    a, b = reference.clamp(-1, 1).double(), test.clamp(-1, 1).double()
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    channels = a.shape[1]
    kernel = _gaussian_window(size, sigma).expand(channels, 1, size, size).contiguous()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """(B,) cosine similarity between a[i] and b[i], flattened, in float64."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    from scipy import linalg

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    # ReLU features have dead dimensions: a tiny ridge keeps the covariances invertible.
    ridge = 1e-6 * np.eye(features_a.shape[1])
    cov_a, cov_b = np.cov(features_a, rowvar=False) + ridge, np.cov(features_b, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
