"""REUSE / PARTIAL / SKIP: chosen nodes are replaced by cache placeholders."""

from __future__ import annotations

from torch import fx

from .graph_builder import GraphBuilder


def read_units_from_cache(b: GraphBuilder, keys: list[tuple[str, fx.Node]]) -> dict[fx.Node, fx.Node]:
    """For each (cache key, original node): a new placeholder replaces every use of the node's copy."""
    placeholders = {}
    for key, node in keys:
        ph = b.add_placeholder(safe_name(key), node.meta.get("example_value"))
        b.env[node].replace_all_uses_with(ph)
        placeholders[node] = ph
    return placeholders


def safe_name(key: str) -> str:
    """A placeholder name for a cache key."""
    return "cache_" + "".join(c if c.isalnum() else "_" for c in key)
