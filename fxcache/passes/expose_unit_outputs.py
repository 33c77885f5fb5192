"""FULL: every unit output (and the head input, for SKIP) becomes an extra graph output."""

from __future__ import annotations

from .graph_builder import GraphBuilder


def expose_unit_outputs(b: GraphBuilder, keys: list[tuple[str, object]]) -> list[str]:
    """Append env[node] for each (cache key, original node); returns the keys in output order."""
    for _, node in keys:
        b.extra_outputs.append(b.env[node])
    return [k for k, _ in keys]
