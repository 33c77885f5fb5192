"""On a CUDA GPU: CUDA graphs replay every step kind with no skip and no recompile, equal to the functional path,
two generations identical; Inductor on CUDA equals the eager lowering for every method. Skipped without a GPU
(benchmarks/gpu_check.sh runs them on a GPU machine: `pytest -m gpu tests/gpu`)."""

from __future__ import annotations

import logging

import pytest
import torch

import fxcache
from fxcache.config import make_config

from helpers import loop_inputs, make_model, rel_err, run, run_twice_without_recompiles

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (no CUDA device here)")]

STEPS = 8


def cuda_loop(name: str, steps: int = STEPS, batch: int = 2) -> list[dict]:
    return [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            for kw in loop_inputs(name, steps, batch=batch)]


def functional(model, config, inputs):
    backend = fxcache.cache_backend(config, lowering="eager", inplace=False, strict=True)
    out = run(torch.compile(model, backend=backend, dynamic=False), inputs)
    torch._dynamo.reset()
    return out, [r["kind"] for r in backend.stats()]


@pytest.mark.parametrize("method,opts", [("duca", dict(interval=3)), ("fora", dict(interval=3)),
                                         ("taylorseer", dict(interval=3, order=2, warmup_steps=1))])
def test_reduce_overhead_replays_cuda_graphs_without_skips_or_recompiles(method, opts, caplog):
    """mode="reduce-overhead": in-place caches, every variant a CUDA graph, results equal to the functional path."""
    from torch._dynamo.utils import counters

    model, config = make_model("flux").cuda(), make_config(method, **opts)
    inputs = cuda_loop("flux")
    expected, kinds = functional(model, config, inputs)
    assert len(set(kinds)) > 1, "the loop must exercise cached steps"
    counters.clear()
    backend = fxcache.cache_backend(config, strict=True)
    compiled = torch.compile(model, backend=backend, dynamic=False, mode="reduce-overhead")
    with caplog.at_level(logging.WARNING):
        first, second = run_twice_without_recompiles(compiled, inputs)
    assert backend.runners[0].inplace and backend.runners[0].cudagraphs
    assert not [r for r in caplog.records if "skipping cudagraphs" in r.getMessage()]
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert [r["kind"] for r in backend.stats()][:STEPS] == kinds
    assert max(rel_err(a, b) for a, b in zip(first, expected)) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "two generations differ"


@pytest.mark.parametrize("method,opts", [
    ("toca", dict(interval=3, fresh_ratio=0.3, score="knorm", staleness_weight=0.25)),
    ("clusca", dict(interval=3, clusters=4, warmup_steps=1, kmeans_iters=3)),
    ("duca", dict(interval=3)),
])
def test_inductor_on_cuda_equals_the_eager_lowering(method, opts):
    model, config = make_model("pixart").cuda(), make_config(method, **opts)
    inputs = cuda_loop("pixart")
    expected, kinds = functional(model, config, inputs)
    backend = fxcache.cache_backend(config, lowering="inductor", strict=True)
    got = run(torch.compile(model, backend=backend, dynamic=False), inputs)
    assert [r["kind"] for r in backend.stats()] == kinds
    assert max(rel_err(a, b) for a, b in zip(got, expected)) < 1e-4
