"""The last block's output (the head's input): written by the steps before a SKIP step, read by the SKIP step,
which then runs no block at all (DuCa's aggressive step)."""

from __future__ import annotations

from torch import fx

from ..graph_io import Key, Role
from .checks import graph_pass
from .graph_builder import GraphBuilder


@graph_pass
def expose_final(b: GraphBuilder, outputs: list[fx.Node]) -> None:
    for i, node in enumerate(outputs):
        b.give(Role.CACHE, Key.final(i), b.current(node))


@graph_pass
def read_final(b: GraphBuilder, outputs: list[fx.Node]) -> None:
    for i, node in enumerate(outputs):
        value = node.meta["example_value"]
        ph = b.take(Role.CACHE, Key.final(i), value.shape, value.dtype, value)
        b.env[node].replace_all_uses_with(ph)
        b.replaced[node] = ph
