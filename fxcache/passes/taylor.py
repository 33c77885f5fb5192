"""Taylor factors in the graph (TaylorSeer, ClusCa): FULL updates them, FORECAST evaluates them.

Per cached unit output Y the caches hold F_0..F_m. The step-dependent scalars come in as small tensors, so a new
step never changes the graph:
    FULL:     new_0 = Y;  new_{i+1} = (new_i - old_i) * diff[i]      diff[i] = 1/d, or 0 where old_i is absent
    FORECAST: Y_hat = sum_i coef[i] * F_i                           coef[i] = delta^i / i!, or 0 past the order
"""

from __future__ import annotations

import torch
from torch import fx

from .graph_builder import GraphBuilder
from .read_units_from_cache import safe_name


def factor_key(order: int, key: str) -> str:
    return f"taylor{order}:{key}"


def update_taylor_factors(b: GraphBuilder, keys: list[tuple[str, fx.Node]], order: int) -> tuple[list[str], list[str]]:
    """FULL: take old F_0..F_{m-1} and `taylor_diff` (m,) as inputs, append new F_0..F_m to the outputs.

    Returns (input cache keys in placeholder order, written cache keys in output order).
    """
    inputs, written = [], []
    diff = b.add_placeholder("taylor_diff") if order > 0 else None
    for key, node in keys:
        new = b.env[node]
        factors = [new]
        for i in range(order):
            old = b.add_placeholder(safe_name(factor_key(i, key)), node.meta.get("example_value"))
            inputs.append(factor_key(i, key))
            d_i = b.graph.call_function(torch.select, (diff, 0, i))  # appended at the end of the graph
            delta = b.graph.call_function(torch.sub, (factors[-1], old))
            factors.append(b.graph.call_function(torch.mul, (delta, d_i)))
        for i, f in enumerate(factors):
            b.extra_outputs.append(f)
            written.append(factor_key(i, key))
    return inputs, written


def forecast_from_factors(b: GraphBuilder, keys: list[tuple[str, fx.Node]], order: int) -> tuple[list[str], dict]:
    """FORECAST: every use of a unit output reads `sum_i coef[i] * F_i`; F_i and `taylor_coef` are inputs.

    Returns (input cache keys in placeholder order, {original node: forecast node}). `b.taylor` gets the
    coefficient placeholder and, per original node, its factor placeholders (for CLUSTER's refresh).
    """
    coef = b.add_placeholder("taylor_coef")
    b.taylor = {"coef": coef}
    inputs, forecasts = [], {}
    for key, node in keys:
        phs = []
        for i in range(order + 1):
            phs.append(b.add_placeholder(safe_name(factor_key(i, key)), node.meta.get("example_value")))
            inputs.append(factor_key(i, key))
        target = b.env[node]
        with b.graph.inserting_before(target):
            total = None
            for i, ph in enumerate(phs):
                c_i = b.graph.call_function(torch.select, (coef, 0, i))
                term = b.graph.call_function(torch.mul, (ph, c_i))
                total = term if total is None else b.graph.call_function(torch.add, (total, term))
        target.replace_all_uses_with(total)
        forecasts[node] = total
        b.taylor[node] = phs
    return inputs, forecasts
