"""Paired image metrics against the uncached output (PSNR, SSIM, relative L2) and set metrics (Frechet distance of
classifier features, class accuracy). Images are (N, C, H, W) in [-1, 1] (data range 2). PSNR and SSIM are
torchmetrics'; the Frechet distance here compares against stored (mean, covariance) of the real digits.

A set of images is summed up by its **pooled** PSNR, 10 log10(range^2 / the mean of the per-image MSEs) -- the mean
of per-image PSNRs would let one near-identical image (tens of dB) hide several bad ones -- next to the spread of
the per-image PSNRs (`PsnrSummary`)."""

from __future__ import annotations

import dataclasses

import torch

RANGE = 2.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, dB (torchmetrics); identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = a.clamp(-1, 1).double(), b.clamp(-1, 1).double()
    return peak_signal_noise_ratio(a, b, data_range=RANGE, reduction="none", dim=tuple(range(1, a.dim())))


def pooled_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """One PSNR over the whole set, dB: from the MSE over every pixel of every image (torchmetrics, `dim=None`),
    which for images of one size is the mean of the per-image MSEs; +inf when every image is identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = a.clamp(-1, 1).double(), b.clamp(-1, 1).double()
    return float(peak_signal_noise_ratio(a, b, data_range=RANGE))


@dataclasses.dataclass(frozen=True)
class PsnrSummary:
    """A set's pooled PSNR and its per-image PSNRs (dB; +inf for an image identical to its reference)."""

    pooled: float
    per_image: tuple[float, ...]

    @property
    def low(self) -> float:
        return min(self.per_image)

    @property
    def high(self) -> float:
        return max(self.per_image)


def psnr_summary(a: torch.Tensor, b: torch.Tensor) -> PsnrSummary:
    """`pooled_psnr(a, b)` with the per-image PSNRs of the same pairs."""
    return PsnrSummary(pooled_psnr(a, b), tuple(float(v) for v in psnr(a, b)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image mean SSIM (torchmetrics: Wang et al. 2004, 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = a.clamp(-1, 1).double(), b.clamp(-1, 1).double()
    return structural_similarity_index_measure(a, b, data_range=RANGE, reduction="none")


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
