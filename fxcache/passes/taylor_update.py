"""TaylorSeer / ClusCa, FULL steps: the Taylor factors of every unit output are updated in the graph.

Per unit output Y the caches hold F_0..F_m. With `taylor_diff` (m,) = 1/d where old F_i exists and 0 elsewhere:
    new_0 = Y;  new_{i+1} = (new_i - old_i) * diff[i]
so the graph never changes with the step (ALGORITHMS.md 1.5).
"""

from __future__ import annotations

import torch

from ..analysis import Unit
from ..graph_io import Key, Role, Slot
from .checks import graph_pass
from .graph_builder import GraphBuilder


@graph_pass
def update_factors(b: GraphBuilder, units: list[Unit], order: int) -> None:
    if not units:
        return
    diff = b.take(Role.TAYLOR_DIFF, Key.scalar(Slot.TAYLOR_DIFF), (order,), torch.float32) if order > 0 else None
    for unit in units:
        for key, node in zip(unit.cache_keys, unit.outputs):
            value = node.meta["example_value"]
            factors = [b.env[node]]
            for i in range(order):
                old = b.take(Role.CACHE, key.factor(i), value.shape, value.dtype, value)
                d_i = b.graph.call_function(torch.select, (diff, 0, i))  # appended at the end of the graph
                delta = b.graph.call_function(torch.sub, (factors[-1], old))
                factors.append(b.graph.call_function(torch.mul, (delta, d_i)))
            for i, f in enumerate(factors):
                b.give(Role.CACHE, key.factor(i), f)
