"""Dead-code elimination keeps every mutation whose written tensor is read or is an input (golden checks)."""

from __future__ import annotations

import torch
from torch import fx

from fxcache.analysis.aliases import is_mutation
from fxcache.passes.dead_code import eliminate_dead_code


def _ops(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target))
            for n in gm.graph.nodes if n.op in ("call_method", "call_function")]


def _eliminated(fn) -> fx.GraphModule:
    gm = fx.symbolic_trace(fn)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm


def test_a_write_into_a_temporary_that_is_read_later_stays():
    def fn(x, table):
        pos = x.new_zeros(4, 3)
        pos[1:].copy_(table)  # the CogVideoX pattern: the copy_'s own result is unused
        return x + pos

    gm = _eliminated(fn)
    assert "copy_" in _ops(gm)
    x, table = torch.randn(4, 3), torch.randn(3, 3)
    assert torch.equal(gm(x, table), fn(x, table))


def test_a_write_into_a_temporary_nobody_reads_goes_with_it():
    def fn(x):
        scratch = x * 2
        scratch.add_(1)  # nothing reads scratch: a region a cached variant no longer needs
        return x - 1

    assert _ops(_eliminated(fn)) == ["sub"]


def test_a_write_into_an_input_or_buffer_always_stays():
    def fn(x, state):
        state.mul_(0.5)
        return x + 1

    ops = _ops(_eliminated(fn))
    assert "mul_" in ops and "add" in ops


def test_setitem_and_inplace_results_count_as_reads():
    import operator

    g = fx.Graph()  # y = x.new_zeros(3); y[0] = 5; w = x.new_ones(3).mul_(2); x.neg() (dead); return x + y + w
    x = g.placeholder("x")
    y = g.call_method("new_zeros", (x, 3))
    g.call_function(operator.setitem, (y, 0, 5.0))
    w = g.call_method("mul_", (g.call_method("new_ones", (x, 3)), 2))
    g.call_method("neg", (x,))
    g.output(g.call_function(operator.add, (g.call_function(operator.add, (x, y)), w)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    ops = _ops(gm)
    assert "setitem" in ops and "mul_" in ops and "neg" not in ops
    v = torch.randn(3)
    assert torch.equal(gm(v), v + torch.tensor([5.0, 0, 0]) + 2)


def test_mutation_detection():
    g = fx.symbolic_trace(lambda x: x.clamp_(0, 1) + x.clamp(0, 1) + torch.ops.aten.add_.Tensor(x, x)).graph
    flags = {str(n.target): is_mutation(n) for n in g.nodes if n.op in ("call_method", "call_function")}
    assert flags["clamp_"] and not flags["clamp"] and flags["aten.add_.Tensor"]
