"""Quality regression on the committed trained FLUX-style digit model (the demo's default).

Thresholds were measured at this test's settings (20 digits, 50 steps, guidance 2, eager lowering, torch 2.13 CPU);
BENCHMARKS.md ("Quality regression threshold") has the numbers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxcache
from fxcache import StepKind
from fxcache.quality.classifier import load_classifier
from fxcache.quality.metrics import psnr
from fxcache.quality.reference import load
from fxcache.quality.sampling import sample

#: Measured mean PSNR vs uncached here: DuCa defaults 37.4 dB, FORA N=3 42.4, TaylorSeer 41.4, DuCa with N=10
#: 30.2, the broken schedule below 16.3; other noise (the floor) 12.7. 33 dB leaves 4 dB for numerical drift
#: across machines and torch versions and still fails a DuCa that caches twice as long as its default.
DUCA_MIN_PSNR = 33.0
#: The classifier's held-out accuracy is 0.972; these 20 guided samples measured 1.0.
MIN_ACCURACY = 0.9


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrokenSchedule(fxcache.DuCaConfig):
    """A deliberately wrong DuCa: after the first step every step skips all blocks (stale head input)."""

    def step_kind(self, step: int) -> StepKind:
        return StepKind.FULL if step == 0 else StepKind.SKIP


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ref = load("flux")
    labels = torch.arange(10).repeat_interleave(2)
    base = sample(ref, ref.transformer, labels, steps=50, seed=0)
    return ref, labels, base


def cached_psnr(setup, config) -> float:
    ref, labels, base = setup
    torch._dynamo.reset()
    model = torch.compile(ref.transformer, backend=fxcache.cache_backend(config, lowering="eager"), dynamic=False)
    out = sample(ref, model, labels, steps=50, seed=0)
    return psnr(out, base).mean().item()


def test_duca_defaults_stay_above_the_threshold(setup):
    assert cached_psnr(setup, fxcache.DuCaConfig()) >= DUCA_MIN_PSNR


def test_a_broken_schedule_falls_below_the_threshold(setup):
    assert cached_psnr(setup, BrokenSchedule()) < DUCA_MIN_PSNR


def test_the_trained_model_draws_the_digits_asked_for(setup):
    ref, labels, base = setup
    with torch.no_grad():
        accuracy = (load_classifier()(base).argmax(1) == labels).float().mean().item()
    assert accuracy >= MIN_ACCURACY


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_every_committed_reference_draws_the_digits_asked_for(family):
    ref = load(family)
    assert ref.meta["family"] == family and ref.meta["steps"] > 0
    labels = torch.arange(10).repeat_interleave(2)
    images = sample(ref, ref.transformer, labels, steps=30, seed=0)
    with torch.no_grad():
        accuracy = (load_classifier()(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= MIN_ACCURACY
