"""Copy a token-wise unit's region onto a few rows: what every subset recompute (PARTIAL, CLUSTER) is built on."""

from __future__ import annotations

from typing import Callable

from torch import fx

from ..analysis import Unit
from .graph_builder import GraphBuilder


def recompute_region(b: GraphBuilder, unit: Unit, gather: Callable[[fx.Node], fx.Node],
                     copies: dict | None = None) -> fx.Node:
    """Copy the unit's region before its output, reading `gather(stop)` for each token-layout stop.

    Stops already replaced (attention outputs read from a cache or a forecast: `b.replaced`) are gathered from
    their replacement. Returns the copy of the unit output, on the gathered rows; `copies`, when given, receives
    the copy of every region node and stop (original node -> its node on the gathered rows).
    """
    g = b.graph
    out = b.env[unit.outputs[0]]
    sub: dict[fx.Node, fx.Node] = {}
    with g.inserting_before(out):
        for stop in unit.gather:
            sub[stop] = gather(b.current(stop))
        for stop in unit.passthrough:
            sub[stop] = b.current(stop)
        for n in unit.region:
            new = g.node_copy(n, lambda a: sub[a] if a in sub else b.current(a))
            new.meta = {k: v for k, v in n.meta.items() if k != "example_value"}
            sub[n] = new
    if copies is not None:
        copies.update(sub)
    return sub[unit.outputs[0]]
