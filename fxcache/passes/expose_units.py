"""FULL blocks: each unit output is written to its cache (an extra output of the variant)."""

from __future__ import annotations

from ..analysis import Unit
from ..graph_io import Role
from .checks import graph_pass
from .graph_builder import GraphBuilder


@graph_pass
def expose_units(b: GraphBuilder, units: list[Unit]) -> None:
    for unit in units:
        for key, node in zip(unit.cache_keys, unit.outputs):
            b.give(Role.CACHE, key, b.env[node])
