"""Presets: the papers' settings per model family, selectable by name, overridable field by field."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache import ConfigError
from helpers import loop_inputs, make_model, run

METHODS = ["fora", "duca", "toca", "taylorseer", "clusca"]
CASES = [(m, p) for m in METHODS + ["magcache"] for p in sorted(fxcache.get_method(m).PRESETS)]


@pytest.mark.parametrize("method,preset", CASES)
def test_every_preset_emits_each_step_kind_it_declares(method, preset):
    """A preset's schedule, over its own step count (50 where it names none), runs every kind its variants are
    built for, starts with a FULL step and refreshes again later (a preset that never refreshes would drift)."""
    config = fxcache.cache_backend(method, preset=preset, lowering="eager").config
    steps = getattr(config, "num_steps", None) or 50
    kinds = [config.step_kind(s) for s in range(steps)]
    assert set(kinds) == set(config.kinds), (preset, sorted(set(kinds)), sorted(config.kinds))
    assert kinds[0] is fxcache.StepKind.FULL and fxcache.StepKind.FULL in kinds[steps // 2:]
    assert kinds.count(fxcache.StepKind.FULL) < steps  # the preset caches something
    assert "PRESETS" in fxcache.get_method(method).__dict__ and fxcache.get_method(method).__doc__


# FULL steps of a 50-step FLUX run, from the papers' settings and ALGORITHMS.md (1.4: #FULL = W + floor((50-W)/N);
# errata 11): FORA N=3 W=1, ToCa N=4 W=3, DuCa N=5 W=3, TaylorSeer N=6 W=3 (FULL at 0,1,2,8,...,44), ClusCa N=5 W=3
FLUX_FULL_STEPS = {"fora": 17, "toca": 14, "duca": 12, "taylorseer": 10, "clusca": 12}


@pytest.mark.parametrize("method", METHODS)
def test_flux_presets_refresh_as_often_as_the_papers_settings(method):
    config = fxcache.cache_backend(method, preset="flux", lowering="eager").config
    full = [s for s in range(50) if config.step_kind(s) is fxcache.StepKind.FULL]
    assert len(full) == FLUX_FULL_STEPS[method], full
    if method == "taylorseer":
        assert full == [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]
    if method == "duca":  # after warm-up, cycles of F C A C A (ALGORITHMS.md 3: j odd conservative, even aggressive)
        F, C, A = fxcache.StepKind.FULL, fxcache.StepKind.PARTIAL, fxcache.StepKind.SKIP
        assert [config.step_kind(s) for s in range(2, 12)] == [F, C, A, C, A, F, C, A, C, A]


def test_flux_presets_are_the_papers_headline_settings():
    assert fxcache.cache_backend("duca", preset="flux").config == fxcache.DuCaConfig(interval=5, ratio=0.9,
                                                                                     warmup_steps=3,
                                                                                     ratio_schedule="flux")
    assert fxcache.cache_backend("clusca", preset="flux").config == fxcache.ClusCaConfig(anchor="ref", draws="per_unit",
                                                                                          kmeans="ref")
    ts = fxcache.cache_backend("taylorseer", preset="flux").config
    full = [s for s in range(50) if ts.step_kind(s) == fxcache.StepKind.FULL]
    assert len(full) == 10  # 50 / (50 / 10) = 4.99x FLOPs in the paper


def test_options_override_the_preset():
    config = fxcache.cache_backend("clusca", preset="FLUX", gamma=0.0, clusters=8).config
    assert (config.gamma, config.clusters, config.interval) == (0.0, 8, 5)


@pytest.mark.parametrize("bad", ["sdxl", 3])
def test_unknown_preset_lists_the_known_ones(bad):
    with pytest.raises(ConfigError, match="presets: dit, flux, video"):
        fxcache.cache_backend("taylorseer", preset=bad)


@pytest.mark.parametrize("method,preset,model", [("toca", "flux", "flux"), ("toca", "dit", "dit"),
                                                 ("toca", "pixart", "pixart"), ("clusca", "dit", "dit"),
                                                 ("duca", "flux", "flux")])
def test_presets_run_on_their_family(method, preset, model):
    m = make_model(model)
    backend = fxcache.cache_backend(method, preset=preset, lowering="eager", strict=True,
                                    **({"clusters": 4} if method == "clusca" else {}))
    compiled = torch.compile(m, backend=backend, dynamic=False)
    outs = run(compiled, loop_inputs(model, 8))
    assert all(torch.isfinite(o).all() for o in outs)
    kinds = {r["plan"].kind.value for r in fxcache.stats(compiled)}
    assert kinds == {k.value for k in backend.config.kinds}  # every step kind of the method ran
