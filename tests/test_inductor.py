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


def test_compile_mode_and_options_reach_the_lowering():
    model = make_model("dit")
    backend = fxcache.cache_backend("fora", interval=2)
    compiled = torch.compile(model, backend=backend, dynamic=False, options={"epilogue_fusion": False})
    with torch.no_grad():
        compiled(**loop_inputs("dit", 1)[0])
    assert backend.runners[0].options == {"epilogue_fusion": False}
