"""End to end through Inductor (the default lowering): a few compiles only, they take tens of seconds on CPU."""

from __future__ import annotations

import pytest
import torch

import fxcache
from helpers import compile_cached, loop_inputs, make_model, reference_for, rel_err, run, run_reference

pytestmark = pytest.mark.inductor
STEPS = 6


@pytest.mark.parametrize("name,method,opts", [("flux", "duca", dict(interval=3, ratio=0.5)),
                                              ("pixart", "fora", dict(interval=2))])
def test_inductor_loop_equals_hooked_reference(name, method, opts):
    model = make_model(name)
    compiled, backend = compile_cached(model, method, lowering="inductor", **opts)
    inputs = loop_inputs(name, STEPS)
    outs = run(compiled, inputs)
    expected = run_reference(reference_for(name, make_model(name), backend.config), inputs)
    uncached = run(model, inputs)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert len(set(kinds)) == len(backend.config.kinds)  # every variant was lowered and ran
    for s, (o, e, u) in enumerate(zip(outs, expected, uncached)):
        assert rel_err(o, e) <= 2e-5, (s, kinds[s])
        if kinds[s] != "full":
            assert rel_err(o, u) > 1e-4
    assert len(backend.runners) == 1


@pytest.mark.parametrize("compile_kwargs,expected", [
    (dict(options={"epilogue_fusion": False}), {"epilogue_fusion": False}),
    (dict(mode="max-autotune-no-cudagraphs"), {"max_autotune": True}),
])
def test_compile_mode_and_options_reach_the_lowering(monkeypatch, compile_kwargs, expected):
    """torch.compile's mode= and options= reach Inductor's compile_fx for every variant, as config patches that
    change what Inductor sees. compile_fx is replaced by a recorder that runs the graph eagerly (no C++ build)."""
    import torch._inductor.compile_fx as inductor

    seen = []

    def recording_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        with torch._inductor.config.patch(config_patches or {}):
            seen.append({k: getattr(torch._inductor.config, k) for k in expected})
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", recording_compile_fx)
    for key, value in expected.items():
        assert getattr(torch._inductor.config, key) != value  # the patch must change something to be seen
    model = make_model("dit")
    backend = fxcache.cache_backend("fora", interval=2)
    compiled = torch.compile(model, backend=backend, dynamic=False, **compile_kwargs)
    inputs = loop_inputs("dit", 3)
    outs = run(compiled, inputs)
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "full"]
    assert seen == [expected, expected]  # one lowering per variant (FULL, REUSE), each with the patches
    eager, _ = compile_cached(make_model("dit"), "fora", interval=2)
    for o, e in zip(outs, run(eager, inputs)):
        assert torch.equal(o, e)
