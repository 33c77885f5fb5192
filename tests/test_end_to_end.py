"""The contract on the four tiny diffusers architectures: exact where the maths says so, equal to an independent
hooked eager reference everywhere else, one graph, no recompiles, per-shape and per-branch state."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.testing import MODEL_NAMES
from helpers import (
    all_pairs, assert_loop_matches, cfg_calls, compile_cached, loop_inputs, make_inputs, make_model, reference_for,
    rel_err, run, run_reference,
)

STEPS = 10


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 2])
def test_first_step_equals_uncached(name, batch):
    model = make_model(name)
    compiled, backend = compile_cached(model, "duca")
    kw = make_inputs(name, batch=batch, t=0.9)
    with torch.no_grad():
        ref, out = model(**kw)[0], compiled(**kw)[0]
    assert rel_err(out, ref) <= 1e-6
    assert fxcache.stats(compiled)[0]["kind"] == "full"


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("method", ["duca", "fora", "toca", "taylorseer", "clusca"])
def test_interval_one_equals_uncached_over_a_loop(name, method):
    model = make_model(name)
    compiled, backend = compile_cached(model, method, interval=1)
    inputs = loop_inputs(name, STEPS)
    for out, ref in zip(run(compiled, inputs), run(model, inputs)):
        assert torch.equal(out, ref)
    assert {r["kind"] for r in fxcache.stats(compiled)} == {"full"}


@pytest.mark.parametrize("name,method,opts,batch", all_pairs(
    MODEL_NAMES, [("duca", dict(interval=5, ratio=0.5)), ("fora", dict(interval=3)), ("duca", dict(interval=4, ratio=0.0))],
    [1, 2]))
def test_cached_loop_equals_hooked_reference(name, method, opts, batch):
    model = make_model(name)
    compiled, backend = compile_cached(model, method, **opts)
    inputs = loop_inputs(name, STEPS, batch=batch)
    outs = run(compiled, inputs)
    ref = reference_for(name, make_model(name), backend.config)
    expected = run_reference(ref, inputs)
    assert_loop_matches(compiled, backend.config, outs, expected, run(model, inputs))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_two_generations_one_graph_no_recompile(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "duca", fullgraph=True)
    first = run(compiled, loop_inputs(name, STEPS))
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run(compiled, loop_inputs(name, STEPS))
    assert len(backend.runners) == 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # state resets when t rises: the second request repeats the first exactly
    steps = [r["step"] for r in fxcache.stats(compiled)]
    assert steps == list(range(STEPS)) * 2


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dynamo_sees_one_graph_without_breaks(name):
    out = torch._dynamo.explain(make_model(name))(**make_inputs(name))
    assert out.graph_count == 1 and out.graph_break_count == 0


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_batch_rows_equal_single_runs(name):
    """Token choice is shared by the rows, so each row of a batch-2 run equals its own batch-1 run."""
    model = make_model(name)
    compiled, backend = compile_cached(model, "duca", interval=5, ratio=0.5)
    inputs2 = loop_inputs(name, STEPS, batch=2)
    outs2 = run(compiled, inputs2)
    for row in range(2):
        single = []
        for kw in inputs2:
            kw1 = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else v)
                   for k, v in kw.items()}
            if name == "dit":
                kw1["class_labels"] = kw["class_labels"][row:row + 1]
            single.append(kw1)
        outs1 = run(compiled, single)
        for a, b in zip(outs2, outs1):
            assert rel_err(a[row:row + 1], b) <= 1e-5
    assert len(backend.runners) == 2  # batch 2 and batch 1: one graph and one runner each


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_two_resolutions_keep_separate_state(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "duca", interval=5, ratio=0.5)
    small, large = loop_inputs(name, STEPS, size=6), loop_inputs(name, STEPS, size=8)
    interleaved = [kw for pair in zip(small, large) for kw in pair]
    outs = run(compiled, interleaved)
    assert len(backend.runners) == 2
    for size, inputs, got in ((6, small, outs[0::2]), (8, large, outs[1::2])):
        ref = reference_for(name, make_model(name), backend.config)
        for o, e in zip(got, run_reference(ref, inputs)):
            assert rel_err(o, e) <= 1e-5
    by_graph = {}
    for r in fxcache.stats(compiled):
        by_graph.setdefault(r["graph"], []).append(r["step"])
    assert all(steps == list(range(STEPS)) for steps in by_graph.values())


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_sequential_cfg_branches_have_their_own_caches(name):
    """True CFG: two calls per step with the same t; each branch equals its own single-branch reference."""
    model = make_model(name)
    compiled, backend = compile_cached(model, "duca", interval=5, ratio=0.5)
    interleaved = cfg_calls(name, STEPS)
    outs = run(compiled, interleaved)
    records = fxcache.stats(compiled)
    assert [(r["step"], r["branch"]) for r in records] == [(s, b) for s in range(STEPS) for b in (0, 1)]
    ref = reference_for(name, make_model(name), backend.config)
    expected = run_reference(ref, interleaved, branches=2)
    for o, e in zip(outs, expected):
        assert rel_err(o, e) <= 1e-5


def test_skip_step_runs_no_block_and_uses_the_current_timestep():
    name = "dit"
    model = make_model(name)
    compiled, backend = compile_cached(model, "duca", interval=3, ratio=0.5)
    inputs = loop_inputs(name, 3)
    outs = run(compiled, inputs)
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "partial", "skip"]
    runner = backend.runners[0]
    block_nodes = {n.name for b in runner.plan.blocks for n in b.nodes}
    skip = runner.variant_of(fxcache.StepKind.SKIP).gm
    assert block_nodes and not block_nodes & {n.name for n in skip.graph.nodes}
    # Same cached head input, other timestep: the output must change (the head uses the current t).
    with fxcache.step(compiled, 2):
        again = run(compiled, [dict(inputs[2], timestep=inputs[2]["timestep"] - 300)])[0]
    assert rel_err(again, outs[2]) > 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_steps_on_an_unchanged_input_reproduce_the_full_step(name, batch):
    """Model-free invariant: with the input and t of the FULL step, a PARTIAL step (any k: the rows it recomputes
    equal the cached ones, so a token-mixing op wrongly put in a region shows up), a
    REUSE step and a SKIP step must all give the FULL output (ALGORITHMS.md 8.4 and 8.6)."""
    model = make_model(name)
    kw = make_inputs(name, batch=batch, t=0.5)
    for method, opts, kinds in (("duca", dict(interval=3, ratio=0.5), ["full", "partial", "skip"]),
                                ("fora", dict(interval=3), ["full", "reuse", "reuse"])):
        compiled, backend = compile_cached(model, method, **opts)
        outs = []
        with torch.no_grad():
            for i in range(3):
                with fxcache.step(compiled, i):
                    outs.append(compiled(**kw)[0])
        assert [r["kind"] for r in fxcache.stats(compiled)] == kinds
        for o in outs[1:]:
            assert rel_err(o, outs[0]) <= 1e-5
        torch._dynamo.reset()
