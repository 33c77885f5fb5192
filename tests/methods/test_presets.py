"""Presets: the papers' settings per model family, selectable by name, overridable field by field."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache import ConfigError
from helpers import loop_inputs, make_model, run

METHODS = ["fora", "duca", "toca", "taylorseer", "clusca"]
CASES = [(m, p) for m in METHODS for p in sorted(fxcache.get_method(m).PRESETS)]


@pytest.mark.parametrize("method,preset", CASES)
def test_every_preset_is_a_valid_config_with_its_documented_values(method, preset):
    cls = fxcache.get_method(method)
    config = fxcache.cache_backend(method, preset=preset, lowering="eager").config
    for key, value in cls.PRESETS[preset].items():
        assert getattr(config, key) == value
    assert "PRESETS" in cls.__dict__ and cls.__doc__  # each method documents its presets


def test_flux_presets_are_the_papers_headline_settings():
    assert fxcache.cache_backend("duca", preset="flux").config == fxcache.DuCaConfig(interval=5, ratio=0.9,
                                                                                     warmup_steps=3)
    assert fxcache.cache_backend("clusca", preset="flux").config == fxcache.ClusCaConfig()
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
    kinds = {r["kind"] for r in fxcache.stats(compiled)}
    assert kinds == {k.value for k in backend.config.kinds}  # every step kind of the method ran
