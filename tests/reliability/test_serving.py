"""A server gets solo results: a graph Dynamo traces again continues its requests, Dynamo's recompile limits reach
every thread that calls the model, a call Dynamo runs outside fxcache restarts its request (never a silent stale
step), and a bounded soak of threads sharing one pipeline, with faults, equals each request run alone."""

from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest
import torch

import fxcache
from fxcache import FxCacheWarning
from fxcache.testing import make_inputs, make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))

import soak_serving  # noqa: E402

TS = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0]
_EPOCH = [0]  # read by `Retraced.forward`: Dynamo guards its value, so flipping it makes Dynamo trace again


def retraced_dit():
    """A DiT whose forward reads a global flag that changes nothing it computes: flipping the flag fails a guard,
    and Dynamo traces the same graph again, as it does now and then under threads."""
    model = make_model("dit")

    class Retraced(type(model)):
        def forward(self, *args, **kwargs):
            if _EPOCH[0] % 2:
                pass
            return super().forward(*args, **kwargs)

    model.__class__ = Retraced
    return model


def _loop(compiled, flip_at=()):
    """One request of 6 steps; the global flag flips at the given steps."""
    inputs = make_inputs("dit")
    outs = []
    try:
        with torch.no_grad(), fxcache.request(compiled):
            for i, t in enumerate(TS):
                if i in flip_at:
                    _EPOCH[0] += 1
                inputs["timestep"] = torch.full_like(inputs["timestep"], t)
                outs.append(compiled(**inputs))
    finally:
        _EPOCH[0] = 0
    return outs


@pytest.mark.parametrize("method,opts", [("fora", dict(interval=3)), ("taylorseer", dict(interval=3, warmup_steps=1))])
def test_a_graph_dynamo_traces_again_continues_the_request(method, opts):
    backend = fxcache.cache_backend(method, lowering="eager", **opts)
    compiled = torch.compile(retraced_dit(), backend=backend, dynamic=False)
    outs = _loop(compiled, flip_at=(2, 4))
    assert backend.duplicate_graphs >= 1 and len(backend.runners) == 1
    fresh_backend = fxcache.cache_backend(method, lowering="eager", **opts)
    expected = _loop(torch.compile(retraced_dit(), backend=fresh_backend, dynamic=False))
    assert [r["kind"] for r in backend.stats()] == [r["kind"] for r in fresh_backend.stats()]
    assert [r["step"] for r in backend.stats()] == list(range(6))
    for o, e in zip(outs, expected):
        assert torch.equal(o[0], e[0])


@pytest.mark.inductor
def test_a_graph_traced_under_other_global_state_is_not_a_duplicate():
    """The same code traced under autocast is another graph (Inductor bakes the autocast dtype in): a call
    without autocast after one with it runs in float32."""
    model = torch.nn.Linear(8, 8)
    backend = fxcache.cache_backend("fora")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randn(4, 8)
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            assert compiled(x).dtype == torch.bfloat16
        out = compiled(x)
    assert backend.duplicate_graphs == 0 and len(backend.runners) == 2
    assert out.dtype == torch.float32 and torch.allclose(out, model(x), atol=1e-6)


def test_graphs_dynamo_traces_again_do_not_use_up_the_recompile_limit():
    """With recompile_limit=2, one shape and a duplicate of it (a global setting flipped) would leave a second
    shape to run in eager; the limits grow by one per duplicate, so it compiles and is cached."""
    backend = fxcache.cache_backend("fora", lowering="eager", interval=2)
    compiled = torch.compile(retraced_dit(), backend=backend, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2, accumulated_recompile_limit=2):
        _loop(compiled, flip_at=(2, 4))
        with torch.no_grad():
            compiled(**make_inputs("dit", batch=2))
    assert backend.duplicate_graphs >= 1 and len(backend.runners) == 2
    assert all(r["cached"] for r in backend.stats())


def test_recompile_limits_set_where_the_model_compiled_reach_a_worker_thread():
    model = make_model("dit")
    backend = fxcache.cache_backend("fora", lowering="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=77, accumulated_recompile_limit=777):
        with torch.no_grad():
            compiled(**make_inputs("dit"))
    seen = {}

    def worker():
        seen["before"] = torch._dynamo.config.recompile_limit
        with torch.no_grad():
            compiled(**make_inputs("dit"))
        seen["after"] = (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["before"] == 8, "a new thread starts with Dynamo's default limit"
    assert seen["after"] == (77, 777)


def test_a_worker_whose_first_call_is_a_new_shape_gets_the_limits_before_dynamo_checks_them():
    """A custom server loop (a request per job, no pipeline) in a thread whose limit is lower than the one the
    model was compiled under (on torch 2.13 a new thread has Dynamo's default): its very first call needs a new
    graph past its own limit, and compiles because the request and the compiled entry give the thread the model's
    limits before Dynamo checks them."""
    model = retraced_dit()
    backend = fxcache.cache_backend("fora", lowering="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=4, accumulated_recompile_limit=64), torch.no_grad():
        for batch in (1, 2):
            compiled(**make_inputs("dit", batch=batch))

    def worker():
        torch._dynamo.config.recompile_limit = 2  # spent by the two graphs above
        with torch.no_grad(), fxcache.request(compiled):
            compiled(**make_inputs("dit", batch=3))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(backend.runners) == 3 and all(r["cached"] for r in backend.stats())


def test_a_pipeline_worker_whose_first_call_is_a_new_shape_compiles_it():
    """The same through an enabled pipeline (a `from_pipe` pipeline per worker): the wrapped compiled transformer
    gives the worker the limits before Dynamo checks them."""
    from diffusers import FluxPipeline
    from reliability.pipelines import flux_generate, flux_pipeline

    pipe = flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = fxcache.enable(pipe, "fora", lowering="eager", interval=2)
    with torch._dynamo.config.patch(recompile_limit=5, accumulated_recompile_limit=64):
        flux_generate(pipe, steps=3)
        flux_generate(pipe, steps=3, height=24, width=24)

    def worker():
        torch._dynamo.config.recompile_limit = 2  # spent by the two shapes above
        mine = FluxPipeline.from_pipe(pipe)
        mine.set_progress_bar_config(disable=True)
        flux_generate(mine, steps=3, height=32, width=32)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(backend.runners) == 3 and all(r["cached"] for r in backend.stats())


def test_a_call_dynamo_runs_in_eager_restarts_the_request_with_a_warning():
    """Past the recompile limit Dynamo runs a call in plain eager, unseen by fxcache: the request it belongs to
    must not go on reading caches a step behind. It is recorded, the next call runs FULL, and a warning says why."""
    model = make_model("dit")

    class FreshCode(type(model)):
        """A forward code object of its own: the limit counts graphs per code object."""

        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model.__class__ = FreshCode
    backend = fxcache.cache_backend("fora", lowering="eager", interval=4)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    small, large = make_inputs("dit"), make_inputs("dit", batch=2)
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), fxcache.request(compiled):
            warnings.simplefilter("always")
            for i, t in enumerate(TS[:3]):
                small["timestep"] = torch.full_like(small["timestep"], t)
                compiled(**small)
            large["timestep"] = torch.full((2,), TS[3])
            compiled(**large)  # a new shape past the limit: Dynamo runs it in eager, and says so
            small["timestep"] = torch.full_like(small["timestep"], TS[4])
            compiled(**small)
            large["timestep"] = torch.full((2,), TS[5])
            compiled(**large)  # again: Dynamo runs it in eager without a word
            small["timestep"] = torch.full_like(small["timestep"], 300.0)
            compiled(**small)
    records = backend.stats()
    assert [(r["graph"], r["step"], r["kind"], r["cached"]) for r in records] == [
        (0, 0, "full", True), (0, 1, "reuse", True), (0, 2, "reuse", True), (-1, -1, "full", False),
        (0, 0, "full", True), (-1, -1, "full", False), (0, 0, "full", True)]
    said = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    assert any("ran outside fxcache" in m and "starts over" in m for m in said), said
    assert any("recompile_limit" in m for m in said), said


def test_counting_flops_installs_no_global_module_hook():
    """While fxcache counts a variant's FLOPs (lazily, on a request's thread), other threads' Dynamo must not see
    global module hooks: they make guards fail (a compiled shape traced again) and tracing fail ("already tracked
    for mutation")."""
    from fxcache.passes.propagate_shapes import eager_flops, flop_counter

    seen = []

    def probe():
        seen.append(bool(torch.nn.modules.module._has_any_global_hook()))
        return torch.nn.Linear(4, 4)(torch.randn(2, 4))

    with flop_counter() as counter:
        probe()
    assert eager_flops(probe) == counter.get_total_flops() == 2 * 2 * 4 * 4
    assert seen == [False, False]


@pytest.mark.parametrize("pipeline,threads,requests,shapes", [("flux", 4, 6, 2), ("lumina2", 3, 4, 2)])
def test_threads_sharing_one_pipeline_with_faults_get_their_solo_results(pipeline, threads, requests, shapes):
    """The soak of benchmarks/soak_serving.py, bounded: threads with their own `from_pipe` pipelines share one
    enabled transformer; some requests raise from the step callback or are interrupted."""
    result = soak_serving.soak(pipeline, threads=threads, requests=requests, shapes=shapes, seed=1)
    assert result.crashed == 0, result.errors
    assert result.compared >= threads * requests // 2
    assert result.differ == 0, result.errors
