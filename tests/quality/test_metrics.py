"""Metrics and the pieces of the quality harness that need no trained model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcache.quality.metrics import feature_stats, frechet_distance, pooled_psnr, psnr, psnr_summary, rel_l2, ssim
from fxcache.quality.reference import build, load, pack, save, unpack
from fxcache.quality.sampling import sample


def images(seed, n=3):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_of_a_known_error():
    a = torch.zeros(1, 1, 32, 32)
    b = a + 0.2  # mse 0.04, data range 2: 10 log10(4 / 0.04) = 20 dB
    assert psnr(b, a).item() == pytest.approx(20.0)
    assert math.isinf(psnr(a, a).item())


def test_pooled_psnr_is_from_the_mean_mse_not_the_mean_of_per_image_psnrs():
    a = torch.zeros(3, 1, 8, 8)
    b = a.clone()
    b[0] += 0.2  # MSE 0.04: 20 dB
    b[1] += 0.02  # MSE 0.0004: 40 dB; b[2] is identical (+inf)
    pooled = 10 * math.log10(4 / ((0.04 + 0.0004 + 0.0) / 3))  # 24.73 dB
    summary = psnr_summary(b, a)
    assert summary.pooled == pytest.approx(pooled, abs=1e-4) and pooled_psnr(b, a) == summary.pooled
    assert summary.per_image[:2] == pytest.approx((20.0, 40.0)) and math.isinf(summary.per_image[2])
    assert (summary.low, summary.high) == (summary.per_image[0], math.inf)
    assert math.isinf(pooled_psnr(a, a))
    # one near-identical image does not hide a bad one: the mean of per-image PSNRs (clipped at 100) says 53 dB
    assert float(psnr(b, a).clamp_max(100).mean()) > 50 > summary.pooled


@settings(max_examples=15)
@given(seed=st.integers(0, 1000), scale=st.floats(0.01, 0.5))
def test_ssim_is_one_for_identical_images_symmetric_and_falls_with_noise(seed, scale):
    a = images(seed)
    noisy = (a + scale * torch.randn(a.shape, generator=torch.Generator().manual_seed(seed + 1))).clamp(-1, 1)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ssim(a, noisy), ssim(noisy, a))
    assert (ssim(a, noisy) < 1).all()
    more = (a + 2 * scale * torch.randn(a.shape, generator=torch.Generator().manual_seed(seed + 1))).clamp(-1, 1)
    assert (ssim(a, more) <= ssim(a, noisy) + 1e-9).all()


def test_rel_l2_per_image():
    a = torch.ones(2, 1, 4, 4)
    b = a.clone()
    b[1] *= 1.5
    assert rel_l2(b, a).tolist() == pytest.approx([0.0, 0.5])


@given(seed=st.integers(0, 1000))
def test_frechet_distance_is_zero_for_one_set_and_the_mean_gap_for_a_shift(seed):
    f = torch.randn(400, 5, generator=torch.Generator().manual_seed(seed))
    shift = torch.tensor([1.0, 0, 0, 2.0, 0])
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(f + shift, f) == pytest.approx(5.0, abs=1e-6)
    assert frechet_distance(f + shift, feature_stats(f)) == pytest.approx(5.0, abs=1e-6)


def test_pack_unpack_round_trip():
    x = images(0)
    assert pack(x).shape == (3, 64, 16)
    assert torch.equal(unpack(pack(x)), x)
    assert torch.equal(pack(x)[0, 1], x[0, 0, 0:4, 4:8].reshape(-1))  # token 1 = the second 4x4 patch of row 0


@pytest.mark.parametrize("family", ["flux", "dit", "pixart"])
def test_save_and_from_pretrained_round_trip(family, tmp_path):
    ref = build(family, seed=3)
    save(ref, str(tmp_path))
    again = load(str(tmp_path))
    assert again.family == family
    labels = torch.tensor([1, 7])
    a = sample(ref, ref.transformer, labels, steps=3, seed=0)
    b = sample(again, again.transformer, labels, steps=3, seed=0)
    assert next(again.transformer.parameters()).dtype == torch.float32
    assert psnr(b, a).min() > 50  # float16 on disk: rounding only


def test_missing_reference_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference.json missing"):
        load(str(tmp_path))


def test_sampling_cfg_modes_agree_and_bad_mode_is_refused():
    ref = build("dit")
    labels = torch.tensor([0, 3])
    batched = sample(ref, ref.transformer, labels, steps=4, cfg="batched")
    sequential = sample(ref, ref.transformer, labels, steps=4, cfg="sequential")
    assert torch.allclose(batched, sequential, atol=1e-5)
    with pytest.raises(ValueError, match="cfg must be"):
        sample(ref, ref.transformer, labels, steps=2, cfg="parallel")
