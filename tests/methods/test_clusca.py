"""ClusCa: config, the in-graph k-means and member choice, and the model-level contract on the tiny models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache.graph_io import Key, Slot
from fxcache import ClusCaConfig, ConfigError, StepKind
from fxcache.ops.kmeans import cluster_members, clusca_refresh, kmeans
from fxcache.testing import MODEL_NAMES, expected_units
from fxcache.testing.reference import ClusCaReference
from helpers import (
    all_pairs, cfg_calls, compile_cached, loop_inputs, make_model, rel_err, run, run_reference,
    run_twice_without_recompiles,
)

STEPS = 9
OPTS = dict(interval=4, order=1, clusters=4, warmup_steps=1, kmeans_iters=3)


def refreshed_units(name: str, model) -> dict[str, tuple[str, int]]:
    """Token-wise feed-forward units of the first block list -> (block clustered for their stream, output pos)."""
    n = len(model.transformer_blocks)
    last = f"transformer_blocks.{n - 1}"
    if name in ("dit", "pixart"):
        return {f"transformer_blocks.{i}.ff": (last, 0) for i in range(n)}
    out = {}
    for i, blk in enumerate(model.transformer_blocks):
        out[f"transformer_blocks.{i}.ff"] = (last, 1)
        if getattr(blk, "ff_context", None) is not None:
            txt_last = max(j for j, b in enumerate(model.transformer_blocks) if getattr(b, "ff_context", None))
            out[f"transformer_blocks.{i}.ff_context"] = (f"transformer_blocks.{txt_last}", 0)
    return out


def clusca_reference(name, config):
    model = make_model(name)
    return ClusCaReference(model, config, refreshed=refreshed_units(name, model), **expected_units(name, model))


# -- config -----------------------------------------------------------------------------------------------------


def test_defaults_are_the_flux_paper_setting():
    c = ClusCaConfig()
    assert (c.interval, c.order, c.clusters, c.gamma, c.warmup_steps, c.kmeans_iters) == (5, 1, 16, 0.005, 3, 10)
    assert [s for s in range(20) if c.step_kind(s) is StepKind.FULL] == [0, 1, 2, 7, 12, 17]


@pytest.mark.parametrize("bad", [dict(gamma=-0.1), dict(gamma=2.0), dict(clusters=0), dict(kmeans_iters=-1),
                                 dict(order=9), dict(gamma="0.1")])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match="ClusCaConfig"):
        ClusCaConfig(**bad)


def test_a_stream_shorter_than_k_gets_one_cluster_per_token():
    model = make_model("flux")  # 64 image tokens, 8 text tokens
    compiled, backend = compile_cached(model, "clusca", clusters=16, interval=3, warmup_steps=1)
    run(compiled, loop_inputs("flux", 2))
    request = backend.scope.current()
    state = next(s for (runner, _), s in request.states.items() if runner is backend.runners[0]).store.caches[0]
    centroids, labels = (lambda t: Key.stream(Slot.CENTROIDS, t)), (lambda t: Key.stream(Slot.LABELS, t))
    assert state[centroids(64)].shape[1] == 16
    assert state[centroids(8)].shape[1] == 8
    assert sorted(state[labels(8)][0].tolist()) == list(range(8))  # each text token is its own cluster


# -- the in-graph pieces ------------------------------------------------------------------------------------------


@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), iters=st.integers(0, 4))
def test_kmeans_labels_are_nearest_centroids_and_centroids_are_member_means(seed, k, iters):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 20, 3, generator=g)
    init = torch.randperm(20, generator=g)[:k]
    labels, cents = kmeans(x, torch.zeros(2, k, 3), init, torch.zeros(1), iters)
    assert labels.shape == (2, 20) and cents.shape == (2, k, 3)
    assert torch.equal(labels, torch.cdist(x, cents, p=1).argmin(-1))
    if iters == 0:
        assert torch.equal(cents, x[:, init])


def test_kmeans_warm_start_reads_the_previous_centroids():
    x = torch.tensor([[[0.0], [0.1], [10.0], [10.1]]])
    prev = torch.tensor([[[10.0], [0.0]]])
    labels, cents = kmeans(x, prev, torch.tensor([0, 1]), torch.ones(1), 1)
    assert labels.tolist() == [[1, 1, 0, 0]]
    assert torch.allclose(cents, torch.tensor([[[10.05], [0.05]]]))


def test_an_emptied_cluster_keeps_its_centroid():
    x = torch.tensor([[[0.0], [0.2], [0.4]]])
    prev = torch.tensor([[[0.2], [100.0]]])
    _, cents = kmeans(x, prev, torch.tensor([0, 1]), torch.ones(1), 2)
    assert cents[0, 1, 0] == 100.0


@given(seed=st.integers(0, 10_000), k=st.integers(1, 8))
def test_one_member_per_cluster_picked(seed, k):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (2, 30), generator=g)
    rand = torch.rand(1, 30, generator=g)
    picks = cluster_members(labels, rand, k)
    assert picks.shape == (2, k)
    for b in range(2):
        for c in range(k):
            members = (labels[b] == c).nonzero().flatten()
            if len(members):
                assert int(picks[b, c]) == int(members[rand[0, members].argmax()])
            else:  # an empty cluster repeats a real pick
                assert int(picks[b, c]) in picks[b, [c2 for c2 in range(k) if (labels[b] == c2).any()]].tolist()


def test_refresh_with_gamma_zero_replaces_exactly_the_picked_rows_of_the_forecast():
    g = torch.Generator().manual_seed(0)
    f0, f1 = torch.randn(1, 10, 4, generator=g), torch.randn(1, 10, 4, generator=g)
    coef = torch.tensor([1.0, 2.0])
    idx = torch.tensor([[3, 7]])
    y = torch.randn(1, 2, 4, generator=g)
    labels = torch.zeros(1, 10, dtype=torch.long)
    out, new_f0 = clusca_refresh(y, idx, labels, coef, 0.0, f0, f1)
    expected = f0 + 2.0 * f1
    expected[0, 3], expected[0, 7] = y[0, 0], y[0, 1]
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(new_f0 + 2.0 * f1, out, atol=1e-6)  # the anchor keeps forecasting the fresh rows


def test_refresh_propagates_gamma_of_the_gap_to_the_cluster_value():
    f0 = torch.zeros(1, 4, 1)
    idx = torch.tensor([[0, 2]])
    y = torch.tensor([[[1.0], [5.0]]])
    labels = torch.tensor([[0, 0, 1, 1]])
    out, _ = clusca_refresh(y, idx, labels, torch.tensor([1.0]), 0.5, f0)
    assert out.flatten().tolist() == [1.0, 0.5, 5.0, 2.5]


# -- model level ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,gamma,batch", all_pairs(MODEL_NAMES, [0.0, 0.05], [1, 2]))
def test_loop_equals_hooked_reference(name, gamma, batch):
    model = make_model(name)
    compiled, backend = compile_cached(model, "clusca", gamma=gamma, **OPTS)
    inputs = loop_inputs(name, STEPS, batch=batch)
    outs = run(compiled, inputs)
    expected = run_reference(clusca_reference(name, backend.config), inputs)
    torch._dynamo.reset()
    taylor = run(compile_cached(make_model(name), "taylorseer", interval=4, order=1, warmup_steps=1)[0], inputs)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert kinds == [backend.config.step_kind(s).value for s in range(STEPS)]
    assert "cluster" in kinds
    for s, (o, e, t) in enumerate(zip(outs, expected, taylor)):
        assert rel_err(o, e) <= 1e-5, (s, kinds[s])
        if kinds[s] == "cluster":
            assert rel_err(o, t) > 1e-6, f"step {s}: ClusCa equals its TaylorSeer base: no token was refreshed"


@pytest.mark.parametrize("name", ["flux", "dit"])
def test_sequential_cfg_and_two_generations_without_recompiles(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "clusca", fullgraph=True, **OPTS)
    calls = cfg_calls(name, STEPS, uncond_seed=5)
    first, second = run_twice_without_recompiles(compiled, calls)
    assert len(backend.runners) == 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    expected = run_reference(clusca_reference(name, backend.config), calls, branches=2)
    for o, e in zip(first, expected):
        assert rel_err(o, e) <= 1e-5



@pytest.mark.inductor
def test_inductor_lowering_equals_hooked_reference():
    """k-means, member choice and the refresh through Inductor (TaylorSeer's update and forecast ride along)."""
    compiled, backend = compile_cached(make_model("dit"), "clusca", lowering="inductor", gamma=0.05, **OPTS)
    inputs = loop_inputs("dit", 6)
    outs = run(compiled, inputs)
    expected = run_reference(clusca_reference("dit", backend.config), inputs)
    assert {r["kind"] for r in fxcache.stats(compiled)} == {"full", "cluster"}
    for o, e in zip(outs, expected):
        assert rel_err(o, e) <= 2e-5
