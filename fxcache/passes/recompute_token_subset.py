"""PARTIAL: each token-wise unit's region is copied onto k gathered rows and scattered into its cache."""

from __future__ import annotations

import torch
from torch import fx

from ..analysis import Unit
from .graph_builder import GraphBuilder


def recompute_token_subset(
    b: GraphBuilder,
    unit: Unit,
    idx_row: fx.Node,
    cache_in: fx.Node,
    cached: dict[fx.Node, fx.Node],
) -> fx.Node:
    """Insert `index_copy(cache, 1, idx, region(index_select(stops, 1, idx)))`; returns the new cache node.

    `cached` maps original nodes already replaced by cache placeholders (attention outputs) to them, so a region
    that reads an attention output gathers its rows from the cache.
    """
    g = b.graph
    out = b.env[unit.outputs[0]]

    def current(n: fx.Node) -> fx.Node:
        return cached.get(n, b.env.get(n))

    sub: dict[fx.Node, fx.Node] = {}
    with g.inserting_before(out):
        for stop in unit.gather:
            sub[stop] = g.call_function(torch.index_select, (current(stop), 1, idx_row))
        for stop in unit.passthrough:
            sub[stop] = current(stop)
        for n in unit.region:
            new = g.node_copy(n, lambda a: sub[a] if a in sub else current(a))
            new.meta = {k: v for k, v in n.meta.items() if k != "example_value"}
            sub[n] = new
        written = g.call_function(torch.index_copy, (cache_in, 1, idx_row, sub[unit.outputs[0]]))
    out.replace_all_uses_with(written)
    return written
