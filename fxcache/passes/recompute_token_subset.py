"""PARTIAL / CLUSTER: a token-wise unit's region is copied onto k gathered rows.

PARTIAL shares one index vector (k,) across the batch (`index_select` / `index_copy`); CLUSTER picks rows per
batch row (B, k) (`gather` / `scatter`), since every row has its own clusters.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from ..analysis import Unit
from .graph_builder import GraphBuilder


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (B, k) of `x` (B or 1, N, ...) along dim 1, per batch row -> (B, k, ...)."""
    b, k = idx.shape
    x = x.expand(b, *x.shape[1:])
    index = idx.reshape(b, k, *([1] * (x.dim() - 2))).expand(b, k, *x.shape[2:])
    return torch.gather(x, 1, index)


def scatter_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x` with rows `idx` (B, k) along dim 1 replaced by `rows` (B, k, ...), per batch row."""
    b, k = idx.shape
    index = idx.reshape(b, k, *([1] * (x.dim() - 2))).expand(b, k, *x.shape[2:])
    return torch.scatter(x, 1, index, rows)


def recompute_region(
    b: GraphBuilder,
    unit: Unit,
    gather: Callable[[fx.Node], fx.Node],
    cached: dict[fx.Node, fx.Node],
) -> fx.Node:
    """Copy the unit's region before its output, reading `gather(stop)` for each token-layout stop.

    `cached` maps original nodes already replaced (attention outputs read from a cache or a forecast) to their
    replacements, so a region that reads one gathers its rows from there. Returns the copy of the unit output.
    """
    g = b.graph
    out = b.env[unit.outputs[0]]

    def current(n: fx.Node) -> fx.Node:
        return cached.get(n, b.env.get(n))

    sub: dict[fx.Node, fx.Node] = {}
    with g.inserting_before(out):
        for stop in unit.gather:
            sub[stop] = gather(current(stop))
        for stop in unit.passthrough:
            sub[stop] = current(stop)
        for n in unit.region:
            new = g.node_copy(n, lambda a: sub[a] if a in sub else current(a))
            new.meta = {k: v for k, v in n.meta.items() if k != "example_value"}
            sub[n] = new
    return sub[unit.outputs[0]]


def recompute_token_subset(
    b: GraphBuilder,
    unit: Unit,
    idx_row: fx.Node,
    cache_in: fx.Node,
    cached: dict[fx.Node, fx.Node],
) -> fx.Node:
    """Insert `index_copy(cache, 1, idx, region(index_select(stops, 1, idx)))`; returns the new cache node."""
    g = b.graph
    out = b.env[unit.outputs[0]]

    def gather(src: fx.Node) -> fx.Node:
        return g.call_function(torch.index_select, (src, 1, idx_row))

    rows = recompute_region(b, unit, gather, cached)
    with g.inserting_before(out):
        written = g.call_function(torch.index_copy, (cache_in, 1, idx_row, rows))
    out.replace_all_uses_with(written)
    return written
