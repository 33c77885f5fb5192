"""ToCa: ratio schedules, in-graph selection, scores, and the equivalences of ALGORITHMS.md 8 on the tiny models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import UnsupportedGraphError
from fxcache import ConfigError, StepKind, ToCaConfig
from fxcache.methods import RATIO_SCHEDULES
from fxcache.ops.scores import select_tokens, spatial_bonus
from fxcache.testing import MODEL_NAMES, expected_units
from fxcache.testing.reference import ToCaReference
from helpers import (
    all_pairs, assert_loop_matches, cfg_calls, compile_cached, loop_inputs, make_model, rel_err, run,
    run_twice_without_recompiles,
)

STEPS = 9


def toca_reference(name, config, model=None):
    model = model or make_model(name)
    return ToCaReference(model, config, **expected_units(name, model))


# -- config and ratio schedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,match", [
    (dict(score="attention-ish"), "score must be one of"), (dict(prefer="mid"), "prefer"),
    (dict(fresh_ratio=1.5), "fresh_ratio"), (dict(staleness_weight=-1), "staleness_weight"),
    (dict(ratio_schedule="nope"), "ratio_schedule must be one of"),
    (dict(ratio_schedule="pixart"), "pass num_steps"), (dict(spatial_grid=-1), "spatial_grid"),
])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        ToCaConfig(**bad)


def test_flux_ratio_schedule_matches_the_reference_percentages():
    """ALGORITHMS.md 3.4: r=0.1 -> double block 0: 6%, block 18: 3.3%; single block 0: 24%, block 37: 2.1%."""
    sched = RATIO_SCHEDULES["flux"]

    def r(layer, layers, li):
        return 0.1 * sched.factor(step=0, num_steps=None, layer=layer, layers=layers, list_index=li, kind="mlp")

    assert r(0, 19, 0) == pytest.approx(0.06)
    assert r(18, 19, 0) == pytest.approx(0.0333, abs=1e-4)
    assert r(0, 38, 1) == pytest.approx(0.24)
    assert r(37, 38, 1) == pytest.approx(0.0207, abs=1e-4)


@given(step=st.integers(0, 49))
def test_dit_ddim50_gives_no_tokens_in_the_first_quarter(step):
    config = ToCaConfig(ratio_schedule="dit-ddim50", num_steps=50, step_buckets=50, fresh_ratio=0.07)
    k = config.unit_tokens(step=step, tokens=256, layer=0, layers=28, list_index=0, kind="mlp")
    p = (step + 1) / 50
    f_step = -1 + 4 * p
    expected = int(min(max(0.07 * f_step * 0.8 * (1 + 0.6 * 2.5), 0), 1) * 256 + 1e-9)  # f_layer(l=0) = 1 + w_l
    assert k == expected
    if p <= 0.25:
        assert k == 0


@given(t=st.integers(1, 100), buckets=st.integers(1, 10))
def test_step_buckets_bound_the_number_of_k_tables(t, buckets):
    config = ToCaConfig(ratio_schedule="pixart", num_steps=t, step_buckets=buckets)
    keys = {config.schedule_step(s) for s in range(t)}
    assert len(keys) <= buckets
    assert all(0 <= k < t for k in keys)
    assert ToCaConfig().schedule_step(17) == 0  # no step weight: one table


# -- selection ---------------------------------------------------------------------------------------------------


@given(n=st.integers(1, 64), rows=st.integers(1, 3), data=st.data())
def test_selection_picks_k_unique_sorted_tokens_per_row_and_resets_their_staleness(n, rows, data):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    base, stale = torch.rand(rows, n, generator=g), torch.randint(0, 5, (rows, n), generator=g).float()
    idx, new = select_tokens(base, stale, k, 0.25, 4, 0, 0.0)
    assert idx.shape == (rows, k)
    for r in range(rows):
        chosen = idx[r].tolist()
        assert chosen == sorted(set(chosen))
        assert (new[r, idx[r]] == 0).all()
        rest = torch.ones(n, dtype=torch.bool)
        rest[idx[r]] = False
        assert torch.equal(new[r, rest], stale[r, rest] + 1)
        score = base[r] + stale[r] * 0.25 / 4
        assert score[idx[r]].min() >= score[rest].max() if rest.any() else True


def test_rows_choose_their_own_tokens_and_a_shared_score_row_gives_every_row_the_same():
    """ALGORITHMS.md erratum 6: the authors score and take top-k per batch row."""
    base = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.1, 0.9, 0.2, 0.5]])
    idx, _ = select_tokens(base, torch.zeros(2, 4), 2, 0.0, 3, 0, 0.0)
    assert idx.tolist() == [[0, 2], [1, 3]]
    idx, new = select_tokens(base[:1], torch.zeros(2, 4), 2, 0.0, 3, 0, 0.0)
    assert idx.tolist() == [[0, 2], [0, 2]] and new.tolist() == [[0, 1, 0, 1]] * 2


def test_staleness_alone_is_round_robin():
    stale, seen = torch.zeros(1, 8), []
    for _ in range(4):
        idx, stale = select_tokens(torch.zeros(1, 8), stale, 2, 1.0, 4, 0, 0.0)
        seen += idx[0].tolist()
    assert sorted(seen) == list(range(8))


def test_spatial_bonus_boosts_each_cells_best_token_only():
    s = torch.arange(16, dtype=torch.float32)[None] + 1  # 4x4 grid, 2x2 cells
    out = spatial_bonus(s, 2, 0.5)[0]
    boosted = (out != s[0]).nonzero().flatten().tolist()
    assert boosted == [5, 7, 13, 15]  # the bottom-right token of each 2x2 cell
    assert torch.equal(out[boosted], s[0, boosted] * 1.5)
    flipped = spatial_bonus(torch.stack([s[0], s[0].flip(0)]), 2, 0.5)  # per row: row 1's best is top-left
    assert (flipped[1] != s[0].flip(0)).nonzero().flatten().tolist() == [0, 2, 8, 10]


@pytest.mark.parametrize("cell", [2, 4])
def test_spatial_bonus_cells_are_cell_by_cell_tokens_on_a_16x16_grid(cell):
    """ALGORITHMS.md erratum 5: `local_selection_with_bonus(score, bonus, g)` cuts the grid into cells of g x g
    tokens (DiT: 64 cells of 2 x 2 on 16 x 16), not g cells per side. Scores rising along the rows: each cell's
    best token is its bottom-right one, at row g*a + g-1 and column g*b + g-1."""
    s = torch.arange(256, dtype=torch.float32) + 1
    out = spatial_bonus(s[None], cell, 0.6)[0]
    boosted = (out != s).nonzero().flatten().tolist()
    per_side = 16 // cell
    assert len(boosted) == per_side * per_side
    assert boosted == sorted((cell * a + cell - 1) * 16 + cell * b + cell - 1
                             for a in range(per_side) for b in range(per_side))
    assert torch.allclose(out[boosted], s[boosted] * 1.6)


def test_spatial_bonus_on_a_16x16_token_dit_equals_hooked_reference():
    """The bonus inside the graph against the hooked reference on a grid where cells of 2 x 2 tokens and 2 cells
    per side differ (DiT at 32 x 32 latents: 16 x 16 tokens)."""
    opts = dict(interval=3, fresh_ratio=0.1, score="vnorm", staleness_weight=0.25, spatial_grid=2, spatial_bonus=0.6)
    model = make_model("dit", sample_size=32)
    compiled, backend = compile_cached(model, "toca", **opts)
    inputs = loop_inputs("dit", 5, size=32)
    outs = run(compiled, inputs)
    ref = toca_reference("dit", backend.config, make_model("dit", sample_size=32))
    expected = []
    for s, kw in enumerate(inputs):
        expected.append(ref(s, 0, **kw)[0])
        if s == 0:
            ref.k = {n: int(opts["fresh_ratio"] * ref.tokens[n] + 1e-9) for n in ref.order}
    assert set(ref.tokens.values()) >= {256}
    assert_loop_matches(compiled, backend.config, outs, expected, run(model, inputs))


# -- model level -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fresh_ratio_zero_equals_fora(name):
    model = make_model(name)
    inputs = loop_inputs(name, STEPS)
    toca, _ = compile_cached(model, "toca", fresh_ratio=0.0, interval=3, staleness_weight=0.25)
    outs = run(toca, inputs)
    torch._dynamo.reset()
    fora = run(compile_cached(model, "fora", interval=3)[0], inputs)
    assert [r["tokens"] for r in fxcache.stats(toca) if r["kind"] == "partial"] == [0] * 6
    for o, e in zip(outs, fora):
        assert torch.equal(o, e)



SCORE_CASES = [
    dict(score="random"),
    dict(score="random", fresh_ratio=1.0),  # every token recomputed: token-wise units are exact
    dict(score="staleness", staleness_weight=0.25),
    dict(score="vnorm", staleness_weight=0.25, spatial_grid=2, spatial_bonus=0.6),
    dict(score="knorm", prefer="high"),
    dict(score="similarity", staleness_weight=0.25),
    dict(score="attention", staleness_weight=0.25),
    dict(score="attention", staleness_weight=0.25, rows="each"),  # each batch row picks its own tokens
    dict(score="vnorm", staleness_weight=0.25, spatial_grid=2, spatial_bonus=0.6, rows="each"),
]


@pytest.mark.parametrize("name,opts,batch", all_pairs(MODEL_NAMES, SCORE_CASES, [1, 2]),
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_loop_equals_hooked_reference(name, opts, batch):
    opts = dict(dict(interval=4, fresh_ratio=0.3), **opts)
    model = make_model(name)
    compiled, backend = compile_cached(model, "toca", **opts)
    inputs = loop_inputs(name, STEPS, batch=batch)
    outs = run(compiled, inputs)
    ref = toca_reference(name, backend.config)
    expected = []  # ref.k is set after the first FULL call, when the token counts are known
    for s, kw in enumerate(inputs):
        expected.append(ref(s, 0, **kw)[0])
        if s == 0:
            ref.k = {n: int(opts["fresh_ratio"] * ref.tokens[n] + 1e-9) for n in ref.order}
    assert_loop_matches(compiled, backend.config, outs, expected, run(model, inputs))


@pytest.mark.parametrize("name", ["flux", "pixart"])
def test_sequential_cfg_shares_the_choice_and_keeps_caches_per_branch(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "toca", interval=3, fresh_ratio=0.3, staleness_weight=0.25)
    calls = cfg_calls(name, STEPS, uncond_seed=3)
    outs = run(compiled, calls)
    ref = toca_reference(name, backend.config)
    expected = []
    for i, kw in enumerate(calls):
        expected.append(ref(i // 2, i % 2, **kw)[0])
        if i == 0:
            ref.k = {n: int(0.3 * ref.tokens[n] + 1e-9) for n in ref.order}
    for o, e in zip(outs, expected):
        assert rel_err(o, e) <= 1e-5


@pytest.mark.parametrize("name", ["flux", "dit"])
def test_step_weighted_schedule_builds_one_variant_per_bucket_without_recompiles(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "toca", interval=2, fresh_ratio=0.3, ratio_schedule="pixart",
                                       num_steps=STEPS, step_buckets=3, fullgraph=True)
    first, second = run_twice_without_recompiles(compiled, loop_inputs(name, STEPS))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    runner = backend.runners[0]
    partial_plans = {p for p in runner.variants if p.kind is StepKind.PARTIAL}
    assert len(partial_plans) == 3
    tokens = [r["tokens"] for r in fxcache.stats(compiled)[:STEPS] if r["kind"] == "partial"]
    assert tokens[0] > tokens[-1]  # the PixArt schedule recomputes fewer tokens as sampling progresses


@pytest.mark.parametrize("batch", [1, 2])
def test_cross_attention_entropy_score_equals_hooked_reference(batch):
    test_loop_equals_hooked_reference("pixart", dict(score="cross_entropy", staleness_weight=0.25,
                                                     spatial_grid=2, spatial_bonus=0.4), batch)


@pytest.mark.parametrize("name", ["dit", "flux", "sd3"])
def test_cross_attention_score_without_cross_attention_is_a_clear_error(name):
    compiled, _ = compile_cached(make_model(name), "toca", score="cross_entropy")
    with pytest.raises(UnsupportedGraphError, match="no cross-attention from the"):
        run(compiled, loop_inputs(name, 1))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_two_generations_one_graph_no_recompile(name):
    compiled, backend = compile_cached(make_model(name), "toca", interval=3, fresh_ratio=0.3, score="vnorm",
                                       staleness_weight=0.25, fullgraph=True)
    first, second = run_twice_without_recompiles(compiled, loop_inputs(name, STEPS))
    assert len(backend.runners) == 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # staleness and scores reset with the generation


@pytest.mark.inductor
def test_inductor_lowering_equals_hooked_reference():
    """Top-k selection, staleness and the attention score through Inductor, on FLUX's joint attention."""
    opts = dict(interval=3, fresh_ratio=0.3, score="attention", staleness_weight=0.25)
    compiled, backend = compile_cached(make_model("flux"), "toca", lowering="inductor", **opts)
    inputs = loop_inputs("flux", 5)
    outs = run(compiled, inputs)
    ref = toca_reference("flux", backend.config)
    for s, kw in enumerate(inputs):
        e = ref(s, 0, **kw)[0]
        if s == 0:
            ref.k = {n: int(0.3 * ref.tokens[n] + 1e-9) for n in ref.order}
        assert rel_err(outs[s], e) <= 2e-5
    assert {r["kind"] for r in fxcache.stats(compiled)} == {"full", "partial"}


def test_a_partial_step_refreshes_the_cross_attention_entropy_of_its_recomputed_rows():
    """ALGORITHMS.md erratum 14: the authors' PixArt code scatters the fresh cross-attention map rows of a partial
    step back, so later choices in the cycle read the fresh entropies of those rows (and only of those)."""
    from fxcache.ops.scores import cross_entropy_score, refresh_entropy

    g = torch.Generator().manual_seed(0)
    q_old, q_new = torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g)
    k = torch.randn(2, 2, 5, 4, generator=g)
    raw = cross_entropy_score(q_old, k, None, None)
    idx = torch.tensor([[1, 4], [1, 4]])
    fresh = refresh_entropy(raw, idx, q_new[:, :, [1, 4]], k, None, None, True)
    full_new = cross_entropy_score(q_new, k, None, None)
    assert torch.allclose(fresh[:, [1, 4]], full_new[:, [1, 4]])
    keep = [0, 2, 3, 5]
    assert torch.equal(fresh[:, keep], raw[:, keep])
    assert torch.equal(fresh[0], fresh[1])  # the CFG halves of one prompt share their mean map
