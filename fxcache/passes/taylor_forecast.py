"""TaylorSeer / ClusCa, forecast blocks: every use of a unit output reads `sum_i coef[i] * F_i`, with the factors
and `taylor_coef` (m+1,) = delta^i / i! (0 past the orders present) as inputs."""

from __future__ import annotations

import torch

from ..analysis import Unit
from ..graph_io import Key, Role, Slot
from .checks import graph_pass
from .graph_builder import GraphBuilder


@graph_pass
def forecast_units(b: GraphBuilder, units: list[Unit], order: int) -> None:
    """Leaves `b.coef`, and per unit output key its factor placeholders in `b.factors` (for CLUSTER's refresh)."""
    if not units:
        return
    if b.coef is None:
        b.coef = b.take(Role.TAYLOR_COEF, Key.scalar(Slot.TAYLOR_COEF), (order + 1,), torch.float32)
    for unit in units:
        for key, node in zip(unit.cache_keys, unit.outputs):
            value = node.meta["example_value"]
            phs = [b.take(Role.CACHE, key.factor(i), value.shape, value.dtype, value) for i in range(order + 1)]
            target = b.env[node]
            with b.graph.inserting_before(target):
                total = None
                for i, ph in enumerate(phs):
                    c_i = b.graph.call_function(torch.select, (b.coef, 0, i))
                    term = b.graph.call_function(torch.mul, (ph, c_i))
                    total = term if total is None else b.graph.call_function(torch.add, (total, term))
            target.replace_all_uses_with(total)
            b.replaced[node] = total
            b.factors[key] = phs
