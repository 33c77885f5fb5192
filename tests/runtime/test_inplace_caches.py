"""In-place caches (the CUDA-graph path, `mode="reduce-overhead"`), checked on CPU.

The same graphs without CUDA graphs: caches live in persistent per-branch buffers the variants update in place,
per-step inputs in persistent buffers, and the variants return only the model's outputs. Results must equal the
default (functional) path exactly, buffer addresses must never change, and the buffers must be the inputs
cudagraphs treats as static. The same on a GPU under CUDA graphs: tests/gpu.
"""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.graph_io import Role
from fxcache.config import make_config

from helpers import loop_inputs, make_model, rel_err, run, run_twice_without_recompiles

METHODS = [
    ("duca", dict(interval=3)),
    ("fora", dict(interval=3)),
    ("toca", dict(interval=3, fresh_ratio=0.3, score="knorm", staleness_weight=0.25)),
    ("taylorseer", dict(interval=3, order=2, warmup_steps=1)),
    ("clusca", dict(interval=3, clusters=4, warmup_steps=1, kmeans_iters=3)),
]


def graph_state(backend):
    """The state of the backend's first graph in this thread's (implicit) request."""
    request = backend.scope.current()
    return next(s for (runner, _), s in request.states.items() if runner is backend.runners[0])


def compiled(model, config, inplace, lowering="eager", **kw):
    backend = fxcache.cache_backend(config, lowering=lowering, inplace=inplace, strict=True)
    return torch.compile(model, backend=backend, dynamic=False, **kw), backend


CASES = [("flux", m, o) for m, o in METHODS] + [("pixart", m, o) for m, o in METHODS if m in ("duca", "toca")]


@pytest.mark.parametrize("name,method,opts", CASES, ids=[f"{n}-{m}" for n, m, _ in CASES])
def test_inplace_equals_functional_over_two_generations(name, method, opts):
    model, config = make_model(name), make_config(method, **opts)
    inputs = loop_inputs(name, 8, batch=2)
    functional, _ = compiled(model, config, inplace=False)
    expected = run(functional, inputs) + run(functional, inputs)
    torch._dynamo.reset()
    inplace, backend = compiled(model, config, inplace=True)
    first, second = run_twice_without_recompiles(inplace, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first + second, expected))
    runner, state = backend.runners[0], graph_state(backend)
    assert runner.inplace and not hasattr(state.store, "caches"), "in-place mode keeps no caches returned as outputs"
    assert state.store.buffers[0] and backend.cache_bytes() > 0


def test_buffers_keep_their_address_and_variants_return_model_outputs_only():
    model, config = make_model("flux"), make_config("duca", interval=3)
    inputs = loop_inputs("flux", 7, batch=1)
    c, backend = compiled(model, config, inplace=True)
    runner = None
    addresses = []
    with torch.no_grad():
        for kw in inputs + inputs:
            c(**kw)
            runner = backend.runners[0]
            addresses.append({k: v.data_ptr() for k, v in graph_state(backend).store.buffers[0].items()})
    final = addresses[-1]
    assert all(a.items() <= final.items() for a in addresses), "a cache buffer moved"
    for plan, variant in runner.variants.items():
        out = next(n for n in variant.gm.graph.nodes if n.op == "output")
        assert len(out.args[0]) == variant.num_outputs == 1 and variant.outputs == []
        copies = [n for n in variant.gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
        assert len(copies) == len(variant.writes)
        if plan.kind is not fxcache.StepKind.SKIP:
            assert variant.writes


def test_cache_buffers_are_the_static_inputs_cudagraphs_sees():
    """What AOT autograd hands to cudagraphs as static inputs: every cache buffer (and the weights)."""
    from torch._functorch._aot_autograd.frontend_utils import _try_get_metadata_from_dynamo

    model, config = make_model("pixart"), make_config("duca", interval=3)
    c, backend = compiled(model, config, inplace=True)
    run(c, loop_inputs("pixart", 1, batch=2))
    for variant in backend.runners[0].variants.values():
        phs = [n for n in variant.gm.graph.nodes if n.op == "placeholder"]
        _, static = _try_get_metadata_from_dynamo(variant.gm, {}.keys(), len(phs), [None] * len(phs))
        first_extra = len(phs) - len(variant.inputs)
        buffers = {first_extra + i for i, v in enumerate(variant.inputs) if v.role.persistent}
        assert buffers and buffers <= set(static)
        per_step = {first_extra + i for i, v in enumerate(variant.inputs) if v.role is Role.INDICES}
        assert not per_step & set(static)  # copied by cudagraphs on replay, like any other input


def test_inplace_through_inductor_matches_functional():
    model, config = make_model("pixart"), make_config("duca", interval=3)
    inputs = loop_inputs("pixart", 6, batch=2)
    expected = run(compiled(model, config, inplace=False)[0], inputs)
    torch._dynamo.reset()
    got = run(compiled(model, config, inplace=True, lowering="inductor")[0], inputs)
    assert max(rel_err(a, b) for a, b in zip(got, expected)) < 1e-5


def test_reduce_overhead_turns_inplace_on():
    model = make_model("pixart")
    backend = fxcache.cache_backend("duca", lowering="eager")
    c = torch.compile(model, backend=backend, dynamic=False, mode="reduce-overhead")
    with torch.no_grad():
        c(**loop_inputs("pixart", 1, batch=1)[0])
    assert backend.runners[0].inplace and backend.runners[0].cudagraphs
    with pytest.raises(fxcache.ConfigError, match="inplace must be True, False or None"):
        fxcache.cache_backend("duca", inplace="yes")


def test_requests_reuse_the_buffers_of_finished_ones():
    """keep_caches (on by default for in-place caches): a finished request's buffers serve the next request of the
    same shape at the same addresses (CUDA graphs record them), zeroed, with results equal to a fresh run."""
    model, config = make_model("flux"), make_config("duca", interval=3)
    inputs = loop_inputs("flux", 5, batch=1)
    c, backend = compiled(model, config, inplace=True)
    addresses, outs = [], []
    with torch.no_grad():
        for _ in range(2):
            with fxcache.request(c) as req:
                outs.append(run(c, inputs))
                state = next(s for (r, _), s in req.states.items() if r is backend.runners[0])
                addresses.append({k: v.data_ptr() for k, v in state.store.buffers[0].items()}
                                 | {("step", k): v.data_ptr() for k, v in state.store.step_buffers.items()})
            # the kept buffers are held memory: counted until reset() frees them
            assert backend.cache_bytes() == backend.runners[0].pooled_bytes() > 0
    assert addresses[0] == addresses[1] and addresses[0]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    fxcache.reset(c)
    assert backend.cache_bytes() == 0 and backend.runners[0].pooled_bytes() == 0
