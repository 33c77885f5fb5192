"""Residual caching of a run of blocks, and the probe / tail split of a call decided at run time.

- `expose_residual`: a computed step writes, per stream after blocks [start, end), the stream minus its value
  before them.
- `read_residual`: a cached step rebuilds each stream after the run as its stream before it plus that residual;
  the run's blocks drop out of the graph.
- `probe_outputs`: the probe graph returns no model output, only the values the rest of the call reads (carried)
  and what it writes (a reference for the next call's signal).
- `take_carried`: the tail graph reads the carried values instead of computing them.
- `relative_change`: the signal of FBCache, DBCache and TeaCache, `mean|a - b| / mean|b|` in the model's dtype
  (as the peers compute it), over the whole batch and per row.
"""

from __future__ import annotations

import torch
from torch import fx

from ..graph_io import Key, Role, Slot
from .checks import graph_pass
from .graph_builder import GraphBuilder


def _example(node: fx.Node) -> torch.Tensor:
    return node.meta["example_value"]


@graph_pass
def expose_residual(b: GraphBuilder, pairs: list[tuple[fx.Node, fx.Node]], start: int, end: int,
                    order: int | None = None) -> None:
    """`order`: keep Taylor factors F_0..F_m of each residual instead (F_0 the residual, F_{i+1} = (F_i - old
    F_i) * taylor_diff[i]), for a cached call to forecast it (DBCache's TaylorSeer calibrator)."""
    diff = None
    if order:
        diff = b.take(Role.TAYLOR_DIFF, Key.scalar(Slot.TAYLOR_DIFF), (order,), torch.float32)
    for i, (after, before) in enumerate(pairs):
        node = b.current(after)
        with b.graph.inserting_after(node):
            residual = b.graph.call_function(torch.sub, (node, b.current(before)))
        key = Key.residual(i, start, end)
        if order is None:
            b.give(Role.CACHE, key, residual)
            continue
        value = _example(after)
        factors = [residual]
        with b.inserting_at_end():
            for k in range(order):
                old = b.take(Role.CACHE, key.factor(k), value.shape, value.dtype, value)
                step = b.graph.call_function(torch.sub, (factors[-1], old))
                factors.append(b.graph.call_function(torch.mul, (step, b.graph.call_function(
                    torch.select, (diff, 0, k)))))
        for k, f in enumerate(factors):
            b.give(Role.CACHE, key.factor(k), f)


FOCA_PARTS = ("full", "full_prev", "k", "km1")


@graph_pass
def expose_foca(b: GraphBuilder, pairs: list[tuple[fx.Node, fx.Node]], start: int, end: int) -> None:
    """A computed call of a FoCa-forecast residual: F_full_prev <- F_full, F_full <- R, F_km1 <- F_k, F_k <- R."""
    for i, (after, before) in enumerate(pairs):
        node, value = b.current(after), _example(after)
        with b.graph.inserting_after(node):
            residual = b.graph.call_function(torch.sub, (node, b.current(before)))
        old = {p: b.take(Role.CACHE, Key.residual(i, start, end, p), value.shape, value.dtype, value)
               for p in ("full", "k")}
        b.give(Role.CACHE, Key.residual(i, start, end, "full_prev"), old["full"])
        b.give(Role.CACHE, Key.residual(i, start, end, "full"), residual)
        b.give(Role.CACHE, Key.residual(i, start, end, "km1"), old["k"])
        b.give(Role.CACHE, Key.residual(i, start, end, "k"), residual)


@graph_pass
def read_foca(b: GraphBuilder, pairs: list[tuple[fx.Node, fx.Node]], start: int, end: int) -> None:
    """A reused call: the residual forecast `P = F_full + g (F_full - F_full_prev + F_k - F_km1)`, the window shifted
    by `u` (`foca` = (g, u), `runtime/foca.py`)."""
    foca = b.take(Role.FOCA, Key.scalar(Slot.FOCA), (2,), torch.float32)
    g = b.graph
    for i, (after, before) in enumerate(pairs):
        value = _example(after)
        t = {p: b.take(Role.CACHE, Key.residual(i, start, end, p), value.shape, value.dtype, value)
             for p in FOCA_PARTS}
        target = b.current(after)
        with g.inserting_before(target.next):
            weight = g.call_function(torch.select, (foca, 0, 0))
            update = g.call_function(torch.select, (foca, 0, 1))
            slope = g.call_function(torch.add, (g.call_function(torch.sub, (t["full"], t["full_prev"])),
                                                g.call_function(torch.sub, (t["k"], t["km1"]))))
            forecast = g.call_function(torch.add, (t["full"], g.call_function(torch.mul, (slope, weight))))
            keep = g.call_function(torch.rsub, (update, 1.0))
            new_k = g.call_function(torch.add, (g.call_function(torch.mul, (forecast, update)),
                                                g.call_function(torch.mul, (t["k"], keep))))
            new_km1 = g.call_function(torch.add, (g.call_function(torch.mul, (t["k"], update)),
                                                  g.call_function(torch.mul, (t["km1"], keep))))
            rebuilt = g.call_function(torch.add, (b.current(before), forecast))
        target.replace_all_uses_with(rebuilt, delete_user_cb=lambda user: user is not rebuilt)
        b.replaced[after] = rebuilt
        b.give(Role.CACHE, Key.residual(i, start, end, "k"), new_k)
        b.give(Role.CACHE, Key.residual(i, start, end, "km1"), new_km1)


@graph_pass
def read_residual(b: GraphBuilder, pairs: list[tuple[fx.Node, fx.Node]], start: int, end: int,
                  order: int | None = None) -> None:
    """`order`: the residual is forecast from its Taylor factors, `sum_k taylor_coef[k] * F_k`."""
    coef = b.take(Role.TAYLOR_COEF, Key.scalar(Slot.TAYLOR_COEF), (order + 1,), torch.float32) if order else None
    for i, (after, before) in enumerate(pairs):
        value = _example(after)
        key = Key.residual(i, start, end)
        target = b.current(after)
        if order is None:
            residual = b.take(Role.CACHE, key, value.shape, value.dtype, value)
        else:
            factors = [b.take(Role.CACHE, key.factor(k), value.shape, value.dtype, value) for k in range(order + 1)]
            with b.graph.inserting_before(target.next):  # in creation order, right after the run's end
                residual = None
                for k, f in enumerate(factors):
                    term = b.graph.call_function(torch.mul, (f, b.graph.call_function(torch.select, (coef, 0, k))))
                    residual = term if residual is None else b.graph.call_function(torch.add, (residual, term))
        with b.graph.inserting_after(residual if order else target):
            rebuilt = b.graph.call_function(torch.add, (b.current(before), residual))
        target.replace_all_uses_with(rebuilt, delete_user_cb=lambda user: user is not rebuilt)
        b.replaced[after] = rebuilt


@graph_pass
def take_carried(b: GraphBuilder, carried: list[fx.Node]) -> None:
    for i, node in enumerate(carried):
        value = _example(node)
        ph = b.take(Role.CARRY, Key.carry(i), value.shape, value.dtype, value)
        b.env[node].replace_all_uses_with(ph)
        b.replaced[node] = ph


@graph_pass
def probe_outputs(b: GraphBuilder, carried: list[fx.Node]) -> None:
    """The model's outputs go (the probe computes none); each carried value becomes an output."""
    b.drop_model_outputs()
    for i, node in enumerate(carried):
        b.give(Role.CARRY, Key.carry(i), b.current(node))


def relative_change(b: GraphBuilder, value: fx.Node, reference: fx.Node) -> fx.Node:
    """float32 (1 + B,): `mean|value - reference| / mean|reference|` over the whole batch, then per row; each mean
    and the ratio in the model's dtype, as the peers compute theirs."""
    g = b.graph
    with b.inserting_at_end():
        change = g.call_function(torch.abs, (g.call_function(torch.sub, (value, reference)),))
        size = g.call_function(torch.abs, (reference,))
        whole = g.call_function(torch.div, (g.call_function(torch.mean, (change,)),
                                            g.call_function(torch.mean, (size,))))
        rows = g.call_function(torch.div, (
            g.call_function(torch.mean, (g.call_function(torch.flatten, (change, 1)), 1)),
            g.call_function(torch.mean, (g.call_function(torch.flatten, (size, 1)), 1))))
        both = g.call_function(torch.cat, ([g.call_function(torch.reshape, (whole, (1,))), rows],))
        return g.call_method("float", (both,))


@graph_pass
def residual_signal(b: GraphBuilder, after: fx.Node, before: fx.Node) -> None:
    """FBCache / DBCache: the main stream's residual over the probe's blocks, compared with the reference the
    last computed call of the branch left; the residual is carried so that a computed tail makes it the next
    reference."""
    value = _example(after)
    with b.inserting_at_end():
        residual = b.graph.call_function(torch.sub, (b.current(after), b.current(before)))
    reference = b.take(Role.CACHE, Key.reference("residual"), value.shape, value.dtype, value)
    b.give(Role.SIGNAL, Key.signal(), relative_change(b, residual, reference))
    b.give(Role.CARRY, Key.carry(0, "reference"), residual)


@graph_pass
def keep_reference(b: GraphBuilder, example: fx.Node) -> None:
    """A computed tail: the residual its probe carried becomes the branch's reference."""
    value = _example(example)
    ph = b.take(Role.CARRY, Key.carry(0, "reference"), value.shape, value.dtype, value)
    b.give(Role.CACHE, Key.reference("residual"), ph)


@graph_pass
def indicator_signal(b: GraphBuilder, indicator: fx.Node) -> None:
    """TeaCache: the indicator compared with the previous call's, which it then replaces (every call)."""
    value = _example(indicator)
    reference = b.take(Role.CACHE, Key.reference("indicator"), value.shape, value.dtype, value)
    node = b.current(indicator)
    b.give(Role.SIGNAL, Key.signal(), relative_change(b, node, reference))
    b.give(Role.CACHE, Key.reference("indicator"), node)
