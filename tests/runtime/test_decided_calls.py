"""The seam of the methods decided per call, in the runtime: persistent in-place buffers (the CUDA-graph layout)
give the decisions and outputs of the functional store, and `explain` says what a call runs."""

from __future__ import annotations

import copy

import pytest
import torch

import fxcache
from fxcache.testing import make_inputs, make_model

STEPS = 8


def sample(model, kw):
    x, outs = kw["hidden_states"].clone(), []
    with torch.no_grad():
        for s in range(STEPS):
            out = model(**dict(kw, hidden_states=x, timestep=torch.tensor([1.0 - s / STEPS])))[0]
            outs.append(out.clone())
            x = x - out / STEPS
    return outs


@pytest.fixture(scope="module")
def flux():
    return make_model("flux", num_layers=2, num_single_layers=3).eval()


@pytest.mark.parametrize("config", [fxcache.FBCacheConfig(threshold=0.45),
                                    fxcache.DBCacheConfig(first_blocks=2, last_blocks=1, threshold=0.45,
                                                          warmup_steps=1),
                                    fxcache.TeaCacheConfig(threshold=0.5, num_steps=STEPS)],
                         ids=["fbcache", "dbcache", "teacache"])
def test_in_place_buffers_give_the_functional_decisions_and_outputs(flux, config):
    runs = {}
    for inplace in (False, True):
        model = torch.compile(copy.deepcopy(flux), dynamic=False,
                              backend=fxcache.cache_backend(config, lowering="eager", inplace=inplace))
        runs[inplace] = (sample(model, make_inputs("flux")), [r["kind"] for r in fxcache.stats(model)])
    assert runs[True][1] == runs[False][1]
    assert any(k != "full" for k in runs[True][1]), "some calls must reuse to test the cached tail"
    for a, b in zip(runs[True][0], runs[False][0]):
        assert torch.equal(a, b)


def test_explain_names_the_probe_and_the_blocks_a_cached_call_skips(flux, capsys):
    config = fxcache.DBCacheConfig(first_blocks=2, last_blocks=1)
    explained = fxcache.explain(flux, **make_inputs("flux"), method=config)
    labels = list(explained.variants[0])
    assert labels == ["probe[f f s s s]", "full", "residual[f f r r f]"]
    out = capsys.readouterr().out
    assert ("a probe runs transformer_blocks.0..transformer_blocks.1" in out
            and "adds the residual of single_transformer_blocks.0..single_transformer_blocks.1" in out
            and "and runs single_transformer_blocks.2" in out)
