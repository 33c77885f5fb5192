"""Cached blocks: each unit output is read from its cache (a placeholder takes over every use of the output)."""

from __future__ import annotations

from ..analysis import Unit
from ..graph_io import Role
from .checks import graph_pass
from .graph_builder import GraphBuilder


@graph_pass
def reuse_units(b: GraphBuilder, units: list[Unit]) -> None:
    for unit in units:
        for key, node in zip(unit.cache_keys, unit.outputs):
            value = node.meta["example_value"]
            ph = b.take(Role.CACHE, key, value.shape, value.dtype, value)
            b.env[node].replace_all_uses_with(ph)
            b.replaced[node] = ph
