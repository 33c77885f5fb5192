"""A method that decides each call at run time exports its probe and both tails, and `CachedSession` replays the
rule: the same per-call decisions and outputs as the compiled model, on a sampling loop where some calls reuse."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcache
from fxcache.deploy import CachedSession
from fxcache.export import read_manifest
from fxcache.testing import make_inputs, make_model

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (in the dev extra)")

STEPS = 8


def sample(model, kw):
    x, outs = kw["hidden_states"].clone(), []
    with torch.no_grad():
        for s in range(STEPS):
            out = model(**dict(kw, hidden_states=x, timestep=torch.tensor([1.0 - s / STEPS])))[0]
            outs.append(out)
            x = x - out / STEPS
    return outs


@pytest.mark.parametrize("config", [fxcache.FBCacheConfig(threshold=0.45),
                                    fxcache.TeaCacheConfig(threshold=0.5, num_steps=STEPS)],
                         ids=["fbcache", "teacache"])
def test_the_session_replays_the_rule_of_the_compiled_model(tmp_path, config):
    model = make_model("flux", num_layers=2, num_single_layers=3).eval()
    kw = make_inputs("flux")
    compiled = torch.compile(copy.deepcopy(model), dynamic=False,
                             backend=fxcache.cache_backend(config, lowering="eager", strict=True))
    expected = sample(compiled, kw)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert "full" in kinds[1:] and any(k != "full" for k in kinds), kinds  # both tails ran after the first call
    manifest = fxcache.export(model, kw, config, out_dir=str(tmp_path), format="onnx", num_steps=STEPS)
    assert manifest.schedule == [] and sorted(a.step_plan().part for a in manifest.artifacts) == \
        ["probe", "tail", "tail"]
    assert read_manifest(str(tmp_path)).schedule == []
    session = CachedSession(str(tmp_path))
    got = sample(session, kw)
    assert [r["kind"] for r in session.stats()] == kinds
    for a, b in zip(got, expected):
        assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())
