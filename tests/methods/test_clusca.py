"""ClusCa: config, the in-graph k-means and member choice, and the model-level contract on the tiny models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcache
from fxcache.graph_io import GraphValue, Key, Role, Slot
from fxcache import ClusCaConfig, ConfigError, StepKind
from fxcache.methods import recipe_for
from fxcache.ops.kmeans import cluster_members, clusca_refresh, clusca_refresh_ref, init_rows, kmeans, kmeans_ref
from fxcache.testing import MODEL_NAMES, expected_units
from fxcache.testing.reference import ClusCaReference
from helpers import (
    all_pairs, cfg_calls, compile_cached, loop_inputs, make_model, rel_err, run, run_reference,
    run_twice_without_recompiles,
)

STEPS = 9
OPTS = dict(interval=4, order=1, clusters=4, warmup_steps=1, kmeans_iters=3)
AUTHORS = dict(anchor="ref", draws="per_unit", kmeans="ref")  # the options of the dit / flux presets


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


@pytest.mark.parametrize("name,bad", [("anchor", "reanchor"), ("anchor", None), ("draws", "per_row"),
                                      ("draws", "Per_Unit"), ("kmeans", "lloyd"), ("kmeans", 1)])
def test_bad_choices_are_refused_with_the_allowed_values(name, bad):
    with pytest.raises(ConfigError, match=rf"ClusCaConfig\.{name} must be one of .*, got {bad!r}"):
        ClusCaConfig(**{name: bad})


def test_the_defaults_keep_our_formulation_and_the_paper_presets_reproduce_the_authors():
    assert (ClusCaConfig().anchor, ClusCaConfig().draws, ClusCaConfig().kmeans) == ("exact", "shared", "fixed")
    for preset, full in (("dit", 14), ("flux", 12)):
        c = fxcache.cache_backend("clusca", preset=preset).config
        assert (c.anchor, c.draws, c.kmeans) == ("ref", "per_unit", "ref"), preset
        steps = c.num_steps or 50
        assert sum(c.step_kind(s) is StepKind.FULL for s in range(steps)) == full, preset  # 3.57x / 4.17x at most
    dit = fxcache.cache_backend("clusca", preset="dit").config
    assert (dit.interval, dit.order, dit.clusters, dit.gamma, dit.kmeans_iters) == (4, 4, 16, 0.0, 100)
    assert [s for s in range(50) if dit.step_kind(s) is StepKind.FULL][:4] == [0, 1, 5, 9]
    assert fxcache.cache_backend("clusca", preset="video").config.anchor == "exact"


def test_an_artifact_made_for_other_draws_is_named():
    def check(config, role, key, shape, dtype):
        return recipe_for(config).check_io(None, None, [GraphValue(role, key, shape, dtype)])

    kinit, rand = Key.stream(Slot.KMEANS_INIT, 16), Key.stream(Slot.MEMBER_DRAW, 16)
    assert "kmeans='fixed' k-means, but config kmeans='ref'" in check(
        ClusCaConfig(clusters=4, kmeans="ref"), Role.PERMUTATION, kinit, (4,), torch.int64)
    assert "kmeans='ref' k-means, but config kmeans='fixed'" in check(
        ClusCaConfig(clusters=4), Role.UNIFORM, kinit, (2, 4), torch.float32)
    assert "from 8 tokens, but config clusters=4" in check(
        ClusCaConfig(clusters=4, kmeans="ref"), Role.UNIFORM, kinit, (2, 8), torch.float32)
    assert "per unit, but config draws='shared'" in check(ClusCaConfig(), Role.UNIFORM, rand, (3, 2, 16),
                                                          torch.float32)
    assert "once per stream, but config draws='per_unit'" in check(ClusCaConfig(draws="per_unit"), Role.UNIFORM,
                                                                   rand, (1, 16), torch.float32)


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


# -- the authors' pieces (Cache4Diffusion @91a1949) ------------------------------------------------------------


def test_the_authors_anchor_overwrites_f0_so_a_fresh_row_outputs_y_plus_the_higher_terms():
    g = torch.Generator().manual_seed(0)
    f0, f1 = torch.randn(1, 10, 4, generator=g), torch.randn(1, 10, 4, generator=g)
    coef = torch.tensor([1.0, 2.0])  # delta = 2, order 1
    idx = torch.tensor([[3, 7]])
    y = torch.randn(1, 2, 4, generator=g)
    out, new_f0 = clusca_refresh_ref(y, idx, torch.zeros(1, 10, dtype=torch.long), coef, 0.0, f0, f1)
    expected_f0 = f0.clone()
    expected_f0[0, 3], expected_f0[0, 7] = y[0, 0], y[0, 1]
    assert torch.equal(new_f0, expected_f0)  # update_cache.py L12: F0.scatter_(1, idx, y)
    assert torch.allclose(out[0, 3], y[0, 0] + 2.0 * f1[0, 3]) and torch.allclose(out[0, 7], y[0, 1] + 2.0 * f1[0, 7])
    rest = [j for j in range(10) if j not in (3, 7)]
    assert torch.allclose(out[0, rest], f0[0, rest] + 2.0 * f1[0, rest])
    exact, _ = clusca_refresh(y, idx, torch.zeros(1, 10, dtype=torch.long), coef, 0.0, f0, f1)
    assert torch.allclose(exact[0, 3], y[0, 0]) and not torch.allclose(out[0, 3], y[0, 0])


def test_the_authors_propagation_blends_f0_only_with_the_sum_of_the_clusters_picks():
    f0 = torch.zeros(1, 4, 1)
    f1 = torch.ones(1, 4, 1)
    labels = torch.tensor([[0, 0, 1, 1]])
    y = torch.tensor([[[1.0], [5.0]]])
    out, new_f0 = clusca_refresh_ref(y, torch.tensor([[0, 2]]), labels, torch.tensor([1.0, 1.0]), 0.5, f0, f1)
    # F0 = [1, 0, 5, 0] after the overwrite; 0.5 * cluster value + 0.5 * F0; then + F1 * delta
    assert new_f0.flatten().tolist() == [1.0, 0.5, 5.0, 2.5]
    assert out.flatten().tolist() == [2.0, 1.5, 6.0, 3.5]
    # cluster 1 empty: both picks are token 0 (select_fresh_tokens.py), and their k == 1 branch sums, not averages
    out, new_f0 = clusca_refresh_ref(torch.tensor([[[2.0], [2.0]]]), torch.tensor([[0, 0]]),
                                     torch.tensor([[0, 0, 0, 0]]), torch.tensor([1.0]), 0.5, torch.zeros(1, 4, 1))
    assert new_f0.flatten().tolist() == [3.0, 2.0, 2.0, 2.0]


def test_per_unit_draws_pick_members_per_unit_and_row_and_an_empty_cluster_picks_token_0():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 40), generator=g)
    labels[:, 0] = 1  # cluster 3 of 4 is empty in both rows
    rand = torch.rand(5, 2, 40, generator=g)  # 5 units, 2 rows
    picks = cluster_members(labels, rand, 4, empty="first")
    assert picks.shape == (5, 2, 4)
    for u in range(5):
        for b in range(2):
            for c in range(3):
                members = (labels[b] == c).nonzero().flatten()
                assert int(picks[u, b, c]) == int(members[rand[u, b, members].argmax()])
            assert int(picks[u, b, 3]) == 0
    assert len({tuple(picks[u, 0, :3].tolist()) for u in range(5)}) == 5  # every unit its own members
    assert all(not torch.equal(picks[u, 0, :3], picks[u, 1, :3]) for u in range(5))  # and every row
    shared = cluster_members(labels, rand[0, :1], 4)  # ours: one draw for all rows; the empty cluster repeats
    assert shared[:, 3].tolist() == shared[:, 1].tolist()


def authors_fit(X, centroids, max_iters):
    """cluster_utils/Kmeans.py `fit`, as a plain loop: (labels, centroids, iterations run)."""
    run = 0
    for _ in range(max_iters):
        run += 1
        labels = torch.cdist(X, centroids, p=1).argmin(dim=-1)
        one_hot = F.one_hot(labels, num_classes=centroids.shape[1]).type_as(X)
        counts = one_hot.sum(dim=1) + 1e-8
        new = torch.bmm(one_hot.permute(0, 2, 1), X) / counts.unsqueeze(-1)
        if torch.allclose(centroids, new, rtol=1e-4):
            break
        centroids = new
    return labels, centroids, run


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), iters=st.sampled_from([1, 2, 3, 5, 100]),
       warm=st.booleans())
def test_the_authors_kmeans_equals_their_loop_with_its_early_stop(seed, k, iters, warm):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 3, generator=g) + 4 * torch.randint(0, 3, (2, 24, 1), generator=g)
    draw = torch.rand(2, k, generator=g)
    start = torch.randn(2, k, 3, generator=g) if warm else x[torch.arange(2)[:, None], init_rows(draw, 24)]
    labels, cents = kmeans_ref(x, start if warm else torch.zeros(2, k, 3), draw, torch.ones(1) * warm, iters)
    want_labels, want_cents, _ = authors_fit(x, start, iters)
    assert torch.equal(labels, want_labels)
    assert torch.allclose(cents, want_cents, atol=1e-6)


def test_the_authors_kmeans_stops_at_allclose_and_keeps_the_centroids_it_stopped_at():
    x = torch.tensor([[[0.0], [40.0], [100.0]]]) + 1e6
    prev = torch.tensor([[[0.0], [80.0]]]) + 1e6
    # one step moves the centroids to 1e6 + [20, 100]: within rtol 1e-4, so the loop stops on the first iteration
    # and returns the centroids it had (iterating on would return 1e6 + [20, 100])
    want_labels, want_cents, run = authors_fit(x, prev, 100)
    assert run == 1 and want_cents.flatten().tolist() == [1e6, 1e6 + 80]
    labels, cents = kmeans_ref(x, prev, torch.zeros(1, 2), torch.ones(1), 100)
    assert labels.tolist() == [[0, 0, 1]] and torch.equal(cents, want_cents)
    _, fixed = kmeans(x, prev, torch.tensor([0, 1]), torch.ones(1), 5)
    assert fixed.flatten().tolist() == [1e6 + 20, 1e6 + 100]  # ours iterates on


def test_the_authors_kmeans_gives_an_empty_cluster_a_zero_centroid():
    x = torch.tensor([[[5.0], [6.0], [10.0]]])
    draw = torch.tensor([[0.1, 0.2]])  # both starts are token 0 (randint with replacement): cluster 1 stays empty
    assert init_rows(draw, 3).tolist() == [[0, 0]]
    labels, cents = kmeans_ref(x, torch.zeros(1, 2, 1), draw, torch.zeros(1), 100)
    assert labels.tolist() == [[0, 0, 0]]
    assert cents.flatten().tolist() == [7.0, 0.0]
    _, ours = kmeans(x, torch.zeros(1, 2, 1), torch.tensor([0, 1]), torch.zeros(1), 3)
    assert ours[0, 1, 0] != 0.0


def test_the_authors_start_draws_tokens_per_row_with_replacement():
    draw = torch.tensor([[0.0, 0.5, 0.999999], [0.2, 0.2, 1.0 - 2 ** -24]])
    assert init_rows(draw, 10).tolist() == [[0, 5, 9], [2, 2, 9]]


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


# (model, anchor, draws, kmeans, gamma, batch, order): every option of the authors' code at least twice, each
# with ours around it
FAITHFUL = [("dit", "ref", "per_unit", "ref", 0.0, 2, 2), ("flux", "ref", "per_unit", "ref", 0.05, 1, 1),
            ("sd3", "ref", "shared", "fixed", 0.05, 2, 1), ("pixart", "exact", "per_unit", "ref", 0.05, 2, 2)]


@pytest.mark.parametrize("name,anchor,draws,kmeans_mode,gamma,batch,order", FAITHFUL)
def test_the_authors_options_equal_the_reference(name, anchor, draws, kmeans_mode, gamma, batch, order):
    """The variants equal ClusCaReference, whose authors' options transcribe Cache4Diffusion; and each option
    changes the run (the reference with our value of it differs)."""
    opts = dict(OPTS, order=order, gamma=gamma, kmeans_iters=20, anchor=anchor, draws=draws, kmeans=kmeans_mode)
    compiled, backend = compile_cached(make_model(name), "clusca", **opts)
    config = backend.config
    inputs = loop_inputs(name, STEPS, batch=batch)
    outs = run(compiled, inputs)
    ref = clusca_reference(name, config)
    expected = run_reference(ref, inputs)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert kinds == [config.step_kind(s).value for s in range(STEPS)] and "cluster" in kinds
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 1e-5, (s, kinds[s])
    for field, ours in (("anchor", "exact"), ("draws", "shared"), ("kmeans", "fixed")):
        if getattr(config, field) != ours:
            other = run_reference(clusca_reference(name, dataclasses.replace(config, **{field: ours})), inputs)
            assert max(rel_err(o, e) for o, e in zip(outs, other)) > 1e-4, \
                f"{field}={getattr(config, field)!r} gives the same run as {field}={ours!r}"
    if draws == "per_unit":  # the last CLUSTER step: each unit and row drew its own members
        first, second = ref.picks["transformer_blocks.0.ff"], ref.picks["transformer_blocks.1.ff"]
        assert not torch.equal(first, second)
        if batch == 2:
            assert not torch.equal(first[0], first[1])


def test_the_authors_anchor_biases_the_next_full_steps_first_difference():
    """anchor="ref": a CLUSTER step overwrites F_0 rows with exact values, and the next FULL step's F_1 is
    (Y - that F_0) / d, not (Y - the previous FULL value) / d."""
    compiled, backend = compile_cached(make_model("dit"), "clusca", interval=2, order=1, clusters=4, warmup_steps=1,
                                       kmeans_iters=5, gamma=0.0, **AUTHORS)
    ff = Key.unit_output("transformer_blocks.0.ff")
    f0, f1 = ff.factor(0), ff.factor(1)
    seen = []
    for kw in loop_inputs("dit", 3, batch=2):  # FULL, CLUSTER, FULL
        run(compiled, [kw])
        request = backend.scope.current()
        store = next(s for (r, _), s in request.states.items() if r is backend.runners[0]).store.caches[0]
        seen.append({k: store[k].clone() for k in (f0, f1) if k in store})
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "cluster", "full"]
    changed = (seen[1][f0] != seen[0][f0]).any(-1)  # (B, N): the rows the CLUSTER step overwrote
    assert 1 <= int(changed[0].sum()) <= 4 and 1 <= int(changed[1].sum()) <= 4
    assert torch.allclose(seen[2][f1], (seen[2][f0] - seen[1][f0]) / 2, atol=1e-6)  # d = 2 - 0
    assert not torch.allclose(seen[2][f1], (seen[2][f0] - seen[0][f0]) / 2, atol=1e-4)


@pytest.mark.parametrize("name,authors", [("flux", False), ("dit", False), ("dit", True)])
def test_sequential_cfg_and_two_generations_without_recompiles(name, authors):
    model = make_model(name)
    compiled, backend = compile_cached(model, "clusca", fullgraph=True, **OPTS, **(AUTHORS if authors else {}))
    calls = cfg_calls(name, STEPS, uncond_seed=5)
    first, second = run_twice_without_recompiles(compiled, calls)
    assert len(backend.runners) == 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    expected = run_reference(clusca_reference(name, backend.config), calls, branches=2)
    for o, e in zip(first, expected):
        assert rel_err(o, e) <= 1e-5



@pytest.mark.inductor
@pytest.mark.parametrize("authors", [False, True])
def test_inductor_lowering_equals_hooked_reference(authors):
    """k-means, member choice and the refresh through Inductor (TaylorSeer's update and forecast ride along)."""
    compiled, backend = compile_cached(make_model("dit"), "clusca", lowering="inductor", gamma=0.05, **OPTS,
                                       **(AUTHORS if authors else {}))
    inputs = loop_inputs("dit", 6)
    outs = run(compiled, inputs)
    expected = run_reference(clusca_reference("dit", backend.config), inputs)
    assert {r["kind"] for r in fxcache.stats(compiled)} == {"full", "cluster"}
    for o, e in zip(outs, expected):
        assert rel_err(o, e) <= 2e-5
