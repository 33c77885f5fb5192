"""Tests of the authors' DiT oracle itself (``authors_dit.py`` on ``original_dit.py``): its schedule tables against
docs/authors/dit-schedules.md, and its numerics against the uncached model where they must agree."""

from __future__ import annotations

import os
import re
from collections import Counter

import pytest
import torch

from authors_dit import (ClusCaDiT, DuCaDiT, FORADiT, TaylorSeerDiT, ToCaDiT, kmeans_fit, schedule_tables)
from original_dit import SpacedSchedule, ddim_sample, make_original_dit, modulate

torch.set_num_threads(1)

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "authors", "dit-schedules.md")
T = 50


def _ints(text):
    return [int(v) for v in text.split(",")]


def _pair(tab, s):
    return tab["kinds"][s][0], set(tab["kinds"][s][1:])


# ----------------------------------------------------------------------------------------------------------------------
# schedule tables vs the doc (DiT-XL/2: 28 blocks, 256 tokens, DDIM-50)
# ----------------------------------------------------------------------------------------------------------------------

def test_toca_table_rows_and_counts():
    tab = schedule_tables("toca")
    # s: (block 0, blocks 1-27, Nt used by block 0, Nt after, k for l=0..27 (None = FULL))
    rows = {
        4: ("full", "partial", 5, 4, [None] + [0] * 27),
        12: ("partial", "partial", 4, 4, _ints("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,2,2,2,2,2,2")),
        17: ("full", "partial", 4, 3, [None] + _ints("16,16,16,16,17,17,17,18,18,18,18,19,19,19,20,20,20,21,21,21,"
                                                     "21,22,22,22,23,23,23")),
        31: ("full", "full", 3, 2, [None] * 28),
        48: ("partial", "partial", 2, 2, _ints("104,106,108,110,112,114,116,118,120,122,124,125,127,129,131,133,"
                                               "135,137,139,141,143,145,147,149,151,153,155,156")),
    }
    for s, (b0, rest, nt_used, nt_after, ks) in rows.items():
        assert _pair(tab, s) == (b0, {rest}), s
        assert (tab["nt_used"][s], tab["nt_after"][s]) == (nt_used, nt_after), s
        assert tab["k"][s] == ks, s
    counts = Counter((k[0], k[1]) for k in tab["kinds"])
    assert counts == {("full", "full"): 18, ("full", "partial"): 2, ("partial", "partial"): 30}
    assert [s for s, k in enumerate(tab["kinds"]) if k[0] == "full" and k[1] == "full"] == \
        [0, 5, 9, 13, 19, 22, 25, 28] + list(range(31, 50, 2))
    assert all(k == 0 for s in range(12) for k in tab["k"][s] if k is not None)   # k = 0 for s <= 11


def test_fora_table():
    tab = schedule_tables("fora")
    full = [0] + list(range(1, 50, 3))
    for s in range(T):
        if s in full:
            assert set(tab["kinds"][s]) == {"full"}, s
        else:
            assert set(tab["kinds"][s]) == {"partial"} and set(tab["k"][s]) == {0}, s
    assert set(tab["nt_after"]) == {3}
    assert len(full) == 18


def test_duca_table_rows_and_counts():
    tab = schedule_tables("duca")
    rows = {
        2: ("skip", "skip", 5, 5, [None] * 28),
        17: ("full", "skip", 4, 3, [None] * 28),
        30: ("partial", "partial", 3, 3, _ints("37,38,39,39,40,41,42,42,43,44,44,45,46,47,47,48,49,49,50,51,51,52,"
                                               "53,54,54,55,56,56")),
        32: ("partial", "partial", 2, 2, _ints("41,42,43,44,45,45,46,47,48,48,49,50,51,52,52,53,54,55,55,56,57,58,"
                                               "59,59,60,61,62,62")),
    }
    for s, (b0, rest, nt_used, nt_after, ks) in rows.items():
        assert _pair(tab, s) == (b0, {rest}), s
        assert (tab["nt_used"][s], tab["nt_after"][s]) == (nt_used, nt_after), s
        assert tab["k"][s] == ks, s
    counts = Counter((k[0], k[1]) for k in tab["kinds"])
    assert counts == {("full", "full"): 18, ("full", "partial"): 1, ("full", "skip"): 1, ("partial", "partial"): 22,
                      ("skip", "skip"): 8}
    assert [s for s, k in enumerate(tab["kinds"]) if k[0] == "skip"] == [2, 7, 11, 15, 20, 23, 26, 29]
    assert _pair(tab, 4) == ("full", {"partial"}) and set(tab["k"][4][1:]) == {0}


@pytest.mark.parametrize("method,other", [("taylorseer", "forecast"), ("clusca", "cluster")])
def test_taylor_tables(method, other):
    tab = schedule_tables(method)
    full = [0, 1] + list(range(5, 50, 4))
    assert len(full) == 14
    for s in range(T):
        assert set(tab["kinds"][s]) == {"full" if s in full else other}, s
        if method == "clusca" and s not in full:
            assert set(tab["k"][s]) == {16}
    # factors held: s=0 {F0}, s=1 up to F1, s=5 F2, s=9 F3, s=13 F4 and on
    assert [tab["order"][s] for s in (0, 1, 2, 4, 5, 9, 13, 49)] == [0, 1, 1, 1, 2, 3, 4, 4]


def _parse_doc_table(section_title):
    text = open(DOC, encoding="utf-8").read()
    start = text.index(section_title)
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        m = re.match(r"\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*(.*?)\s*\|$",
                     line)
        if m:
            rows[int(m.group(1))] = m.groups()[2:]
    return rows


_KIND = {"FULL": "full", "PARTIAL": "partial", "SKIP(aggr)": "skip"}


@pytest.mark.skipif(not os.path.exists(DOC), reason="docs/authors/dit-schedules.md absent")
@pytest.mark.parametrize("method,title", [("toca", "### 1.3"), ("duca", "### 3.3")])
def test_whole_doc_table(method, title):
    """Every row of the doc's table (sections 1.3 / 3.3) against schedule_tables."""
    tab = schedule_tables(method)
    rows = _parse_doc_table(title)
    assert sorted(rows) == list(range(T))
    for s, (nt_used, b0, rest, nt_after, kcol) in rows.items():
        assert _pair(tab, s) == (_KIND[b0], {_KIND[rest]}), s
        assert (tab["nt_used"][s], tab["nt_after"][s]) == (int(nt_used), int(nt_after)), s
        ks = tab["k"][s]
        if kcol == "-":
            assert all(k is None for k in ks), s
        elif kcol.startswith("all "):
            v = int(kcol.split()[1])
            assert [k for k in ks if k is not None] == [v] * (27 if "l=1..27" in kcol else 28), s
        elif kcol.startswith("l0:-"):
            assert ks == [None] + _ints(kcol[len("l0:-"):].strip()), s
        else:
            assert ks == _ints(kcol), s


# ----------------------------------------------------------------------------------------------------------------------
# the oracle on the small DiT
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return make_original_dit(depth=4, input_size=16)


SHAPE = (1, 4, 16, 16)
LABEL = [3]


def test_ddim_uncached(model):
    assert SpacedSchedule("50").timestep_map[:4] == [0, 20, 41, 61] and SpacedSchedule("50").timestep_map[-1] == 999
    assert SpacedSchedule("ddim50").timestep_map[-1] == 980
    sample, xs = ddim_sample(model, SHAPE, LABEL, steps=T, cfg_scale=4.0, seed=0)
    assert sample.shape == SHAPE and len(xs) == T + 1
    assert torch.isfinite(sample).all() and all(torch.isfinite(x).all() for x in xs)
    again, _ = ddim_sample(model, SHAPE, LABEL, steps=T, cfg_scale=4.0, seed=0)
    assert torch.equal(sample, again)
    # the random weights are not adaLN-Zero: gates O(0.1-1)
    with torch.no_grad():
        c = model.t_embedder(torch.tensor([500])) + model.y_embedder(torch.tensor([3]))
        for blk in model.blocks:
            gates = blk.adaLN_modulation(c).chunk(6, dim=1)
            assert 0.1 < float(gates[2].abs().mean()) < 1.5 and 0.1 < float(gates[5].abs().mean()) < 1.5


class _Spy:
    """Runs an oracle in the DDIM loop and, on the same input, the uncached model; keeps both outputs."""

    def __init__(self, oracle, model):
        self.oracle, self.model, self.pairs = oracle, model, []
        self.num_classes = model.num_classes

    def __call__(self, x, t, i, y, cfg):
        got = self.oracle.forward_with_cfg(x, t, y, cfg, i)
        with torch.no_grad():
            ref = self.model.forward_with_cfg(x, t, y, cfg)
        self.pairs.append((got, ref))
        return got


def _run(oracle, model, cfg=4.0):
    spy = _Spy(oracle, model)
    y = torch.tensor(LABEL + [model.num_classes])
    sample, _ = ddim_sample(lambda x, t, i: spy(x, t, i, y, cfg), SHAPE, LABEL, steps=T, cfg_scale=cfg, seed=1,
                            num_classes=model.num_classes)
    assert torch.isfinite(sample).all()
    return spy.pairs


@pytest.mark.parametrize("make", [
    lambda m: FORADiT(m, fresh_threshold=1),
    lambda m: DuCaDiT(m, fresh_ratio=0.0, fresh_threshold=1),
    lambda m: TaylorSeerDiT(m, interval=1),
    lambda m: ClusCaDiT(m, interval=1, cluster_num=16),
], ids=["fora", "duca", "taylorseer", "clusca"])
def test_all_full_equals_model(model, make):
    torch.manual_seed(0)
    oracle = make(model)
    a, xs_a = ddim_sample(oracle, SHAPE, LABEL, steps=T, seed=2)
    b, xs_b = ddim_sample(model, SHAPE, LABEL, steps=T, seed=2)
    assert all(set(r["blocks"]) == {"full"} for r in oracle.trace) and len(oracle.trace) == T
    assert all(torch.equal(u, v) for u, v in zip(xs_a, xs_b))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["toca", "fora", "duca", "taylorseer", "clusca"])
def test_trace_matches_tables_and_full_steps_equal_model(model, method):
    torch.manual_seed(0)
    oracle = {"toca": ToCaDiT, "fora": FORADiT, "duca": DuCaDiT, "taylorseer": TaylorSeerDiT,
              "clusca": ClusCaDiT}[method](model)
    pairs = _run(oracle, model)
    tab = schedule_tables(method, depth=4, tokens=64)
    assert [r["blocks"] for r in oracle.trace] == tab["kinds"]
    assert [r["k"] for r in oracle.trace] == tab["k"]
    assert [r["s"] for r in oracle.trace] == list(range(T)) and [r["i"] for r in oracle.trace] == list(range(T))[::-1]
    differs = False
    for rec, (got, ref) in zip(oracle.trace, pairs):
        if set(rec["blocks"]) == {"full"}:
            assert torch.equal(got, ref), rec["s"]
        else:
            differs |= not torch.allclose(got, ref)
        for k, idx in zip(rec["k"], rec["indices"]):
            if k is None:
                continue
            assert idx.shape == (2, k)
            if method != "clusca":
                assert all(len(set(row.tolist())) == k for row in idx)   # distinct rows
                continue
            labels = rec["labels"]   # one member per cluster; an empty cluster yields token 0 (select_fresh_tokens L15)
            for b in range(2):
                for cl in range(k):
                    j = int(idx[b, cl])
                    assert int(labels[b, j]) == cl or (j == 0 and not bool((labels[b] == cl).any()))
    assert differs    # caching changes the outputs on this model


def test_toca_first_step_equals_model(model):
    oracle = ToCaDiT(model)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t, y = torch.tensor([999, 999]), torch.tensor([3, 10])
    got = oracle.forward_with_cfg(x, t, y, 4.0, T - 1)
    with torch.no_grad():
        assert torch.equal(got, model.forward_with_cfg(x, t, y, 4.0))
    assert oracle.trace[0]["blocks"] == ["full"] * 4 and oracle.cal_threshold == 5
    # the authors' own attention arithmetic (attention.py L57-62) agrees up to rounding
    manual = ToCaDiT(model, manual_attention=True).forward_with_cfg(x, t, y, 4.0, T - 1)
    torch.testing.assert_close(manual, got, rtol=1e-4, atol=1e-4)


def test_partial_with_all_tokens_is_uncached_mlp(model):
    """k = N: every MLP row recomputed -> the block equals attention-from-cache + the uncached MLP."""
    oracle = ToCaDiT(model, fresh_ratio=1.0, ratio_scheduler="constant", fresh_threshold=100)
    g = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    y = torch.tensor([3, 10])
    oracle(x0, torch.tensor([999, 999]), y, T - 1)
    attn_cache = {l: v.clone() for l, v in oracle.cache_attn.items()}
    t1 = torch.tensor([979, 979])
    got = oracle(x1, t1, y, T - 2)
    assert oracle.trace[-1]["blocks"] == ["partial"] * 4 and oracle.trace[-1]["k"] == [64] * 4
    for idx in oracle.trace[-1]["indices"]:
        assert torch.equal(idx.sort(dim=1).values, torch.arange(64).expand(2, 64))
    with torch.no_grad():
        h = model.x_embedder(x1) + model.pos_embed
        c = model.t_embedder(t1) + model.y_embedder(y)
        for l, blk in enumerate(model.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.adaLN_modulation(c).chunk(6, dim=1)
            h = h + gate_msa.unsqueeze(1) * attn_cache[l]
            h = h + gate_mlp.unsqueeze(1) * blk.mlp(modulate(blk.norm2(h), shift_mlp, scale_mlp))
        ref = model.unpatchify(model.final_layer(h, c))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # staleness: 0 everywhere after recomputing every row
    assert all(int(oracle.stale[l]["mlp"].max()) == 0 for l in range(4))


def test_duca_aggressive_step_uses_previous_last_block_output(model):
    oracle = DuCaDiT(model)
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([3, 10])
    for i in (49, 48):
        oracle(torch.randn(2, 4, 16, 16, generator=g), torch.tensor([i * 20] * 2), y, i)
    noise = oracle.noise.clone()
    t = torch.tensor([940, 940])
    got = oracle(torch.randn(2, 4, 16, 16, generator=g), t, y, 47)       # s = 2: aggressive in every block
    assert oracle.trace[-1]["blocks"] == ["skip"] * 4
    with torch.no_grad():
        c = model.t_embedder(t) + model.y_embedder(y)
        assert torch.equal(got, model.unpatchify(model.final_layer(noise, c)))


def test_clusca_global_rng_order(model):
    """k-means init: one torch.randint(0, N, (B, K)) at the first FULL step; then one torch.rand((B, N)) per cluster
    block; the chosen token of each cluster is its member with the largest draw."""
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(2, 4, 16, 16, generator=g) for _ in range(3)]
    y = torch.tensor([3, 10])
    torch.manual_seed(123)
    oracle = ClusCaDiT(model, cluster_num=16)
    for x, i in zip(xs, (49, 48, 47)):
        oracle(x, torch.tensor([i * 20] * 2), y, i)
    assert [r["blocks"][0] for r in oracle.trace] == ["full", "full", "cluster"]
    labels = oracle.cluster_info["labels"]
    torch.manual_seed(123)
    torch.randint(0, 64, (2, 16))
    for l in range(4):
        w = torch.rand(2, 64)
        chosen = oracle.trace[-1]["indices"][l]
        for b in range(2):
            for k in range(16):
                members = (labels[b] == k).nonzero().flatten()
                expect = members[w[b, members].argmax()] if len(members) else torch.tensor(0)
                assert int(chosen[b, k]) == int(expect)
    # reproducible from the seed
    torch.manual_seed(123)
    again = ClusCaDiT(model, cluster_num=16)
    for x, i in zip(xs, (49, 48, 47)):
        again(x, torch.tensor([i * 20] * 2), y, i)
    assert all(torch.equal(a, b) for a, b in zip(oracle.trace[-1]["indices"], again.trace[-1]["indices"]))


def test_kmeans_stops_and_labels():
    X = torch.cat([torch.zeros(1, 8, 3), torch.ones(1, 8, 3) * 5], dim=1)
    labels, centroids = kmeans_fit(X, 2, cache_centroids=X[:, [0, 15]])
    assert labels[0, :8].unique().numel() == 1 and labels[0, 8:].unique().numel() == 1
    assert labels[0, 0] != labels[0, 15]
    torch.testing.assert_close(centroids, X[:, [0, 15]])
