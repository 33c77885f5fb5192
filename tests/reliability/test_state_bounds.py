"""Whose state a call reads, and how much state stays held: models that share parameters, models that are
garbage collected, unmarked requests over several input shapes, forced branches, the conditioning fingerprint."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import fxcache
from fxcache import FxCacheWarning
from fxcache.runtime import fingerprint
from fxcache.testing import make_inputs, make_model

TS = [999, 900, 800, 700, 600, 500]


def _compiled(model, backend):
    return torch.compile(model, backend=backend, dynamic=False)


def _step(model, t: int, x, *, batch: int = 1, size: int = 8, seed: int = 0):
    kw = make_inputs("dit", batch=batch, size=size, seed=seed)
    kw.update(hidden_states=x, timestep=torch.full((batch,), t, dtype=torch.long))
    return model(**kw)[0]


def _loops(models, *, batch: int = 1, size: int = 8, seed: int = 0) -> list[list[torch.Tensor]]:
    """One unmarked loop per model, their steps alternated (the second model's step between the first's)."""
    xs = [make_inputs("dit", batch=batch, size=size, seed=seed)["hidden_states"] for _ in models]
    outs = [[] for _ in models]
    with torch.no_grad():
        for t in TS:
            for k, m in enumerate(models):
                out = _step(m, t, xs[k], batch=batch, size=size, seed=seed)
                outs[k].append(out)
                xs[k] = xs[k] + 0.01 * out[:, :4]
    return outs


def _pair():
    """Two DiTs with their own blocks and one shared patch embedding (a fine-tune that kept it frozen): their
    graphs' first parameter is the same tensor."""
    first, second = make_model("dit", seed=0), make_model("dit", seed=1)
    second.pos_embed = first.pos_embed
    return first, second


def test_models_that_share_parameters_keep_their_own_caches():
    fresh = [_loops([_compiled(m, fxcache.cache_backend("duca", lowering="eager", interval=3))])[0]
             for m in _pair()]
    backend = fxcache.cache_backend("duca", lowering="eager", interval=3)
    together = _loops([_compiled(m, backend) for m in _pair()])
    assert "partial" in [r["kind"] for r in backend.stats()]
    for got, want in zip(together, fresh):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_garbage_collected_model_frees_its_caches():
    backend = fxcache.cache_backend("fora", lowering="eager", interval=3)
    for seed in range(3):
        model = _compiled(make_model("dit", seed=seed), backend)
        _loops([model])
        assert backend.cache_bytes() > 0
        del model
        gc.collect()
        assert backend.cache_bytes() == 0
    assert all(len(r._models) == 0 for r in backend.runners)


def test_unmarked_requests_over_several_shapes_hold_one_requests_caches():
    """Without request markers a new request ends the one before it in every graph of the model, not only in
    the graph of its own input shape."""
    backend = fxcache.cache_backend("duca", lowering="eager", interval=3)
    model = _compiled(make_model("dit"), backend)
    shapes = [(1, 8), (2, 8), (1, 12), (2, 8), (1, 8)]
    for i, (batch, size) in enumerate(shapes):
        _loops([model], batch=batch, size=size, seed=i)
        held_by_this_request = backend.stats()[-1]["cache_bytes"]
        assert backend.cache_bytes() == held_by_this_request > 0


def test_forced_branches_obey_max_branches():
    backend = fxcache.cache_backend("fora", lowering="eager", interval=3, max_branches=2)
    model = _compiled(make_model("dit"), backend)
    x = make_inputs("dit")["hidden_states"]
    with torch.no_grad(), fxcache.request(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, t in enumerate(TS[:3]):
            for branch in range(5):
                with fxcache.step(model, i, branch=branch):
                    _step(model, t, x, seed=branch)
            held = backend.cache_bytes()
    one_branch = backend.stats()[0]["cache_bytes"]
    assert held == 2 * one_branch
    assert any(issubclass(w.category, FxCacheWarning) and "max_branches=2" in str(w.message) for w in caught)
    assert {r["kind"] for r in backend.stats()} == {"full"}  # each forced branch was dropped before it could reuse


@pytest.mark.parametrize("numel", [7, 4099, 3 * 4099 + 5, 200_000])
def test_the_conditioning_fingerprint_sees_any_change_and_keeps_little(numel):
    x = torch.randn(numel, dtype=torch.float64, generator=torch.Generator().manual_seed(numel))
    base = fingerprint.position_weighted_sums(x)
    swapped = x.clone()
    swapped[[0, numel - 1]] = swapped[[numel - 1, 0]]
    nudged = x.clone()
    nudged[numel // 2] += 1e-6
    assert torch.equal(base, fingerprint.position_weighted_sums(x.clone()))
    for changed in (swapped, nudged):
        assert not torch.equal(base, fingerprint.position_weighted_sums(changed))
    # what stays: one 2 x PERIOD column table per device, a bounded number of (rows, 2) row tables
    assert all(tuple(w.shape) == (2, fingerprint._PERIOD) for w in fingerprint._WEIGHTS.values())
    assert len(fingerprint._WEIGHTS) <= 2 and len(fingerprint._ROWS) <= fingerprint._MAX_ROW_TABLES
    assert all(w.shape[1] == 2 for w in fingerprint._ROWS.values())
