"""PARTIAL blocks (DuCa's conservative step): each token-wise unit is recomputed on k drawn tokens and scattered
into its cache; the tokens are an input, one row of indices per unit of a token stream, shared by the batch."""

from __future__ import annotations

import torch

from ..analysis import Unit
from ..graph_io import Key, Role, Slot
from .checks import graph_pass
from .graph_builder import GraphBuilder
from .regions import recompute_region


@graph_pass
def recompute_subset(b: GraphBuilder, streams: dict[int, list[Unit]], k: dict[int, int]) -> None:
    """`streams`: token count -> the units of that stream to recompute, in graph order; `k`: token count -> rows.

    Each unit's cache is an input; `index_copy(cache, 1, idx, region(index_select(stops, 1, idx)))` is its new
    value, read by the rest of the graph and written back."""
    g = b.graph
    for tokens, units in streams.items():
        idx = b.take(Role.INDICES, Key.stream(Slot.INDICES, tokens), (len(units), k[tokens]), torch.int64)
        for pos, unit in enumerate(units):
            node = unit.outputs[0]
            key, value = unit.cache_keys[0], node.meta["example_value"]
            cache = b.take(Role.CACHE, key, value.shape, value.dtype, value)
            out = b.env[node]
            with g.inserting_before(out):
                row = g.call_function(torch.select, (idx, 0, pos))
            rows = recompute_region(b, unit, lambda src: g.call_function(torch.index_select, (src, 1, row)))
            with g.inserting_before(out):
                written = g.call_function(torch.index_copy, (cache, 1, row, rows))
            out.replace_all_uses_with(written)
            b.replaced[node] = written
            b.give(Role.CACHE, key, written)
