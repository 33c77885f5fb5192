"""Paired image metrics against the uncached output (PSNR, SSIM, relative L2) and set metrics (Frechet distance of
classifier features, class accuracy). Images are (N, 1, H, W) in [-1, 1] (data range 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

RANGE = 2.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, dB; identical images give +inf."""
    mse = ((a.clamp(-1, 1).double() - b.clamp(-1, 1).double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(RANGE ** 2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, valid)."""
    a, b = a.clamp(-1, 1).double(), b.clamp(-1, 1).double()
    w = _gauss().to(a)
    c1, c2 = (0.01 * RANGE) ** 2, (0.03 * RANGE) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a ** 2
    var_b = F.conv2d(b * b, w) - mu_b ** 2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image ||a - b|| / ||b||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def feature_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of features (N, D), float64."""
    f = f.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> float:
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2) of features (N, D), against features or
    precomputed (mean, covariance)."""
    mu_a, sa = feature_stats(fa)
    mu_b, sb = fb if isinstance(fb, tuple) else feature_stats(fb)
    mu_b, sb = mu_b.double(), sb.double()
    root = _sqrtm_psd(sa)
    cross = _sqrtm_psd(root @ sb @ root)
    return float((mu_a - mu_b).square().sum() + torch.trace(sa) + torch.trace(sb) - 2 * torch.trace(cross))
