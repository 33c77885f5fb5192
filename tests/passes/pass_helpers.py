"""Helpers of the pass tests: the Dynamo graph of a tiny model (captured once per session) and a readable list of
what a pass emitted into a variant under construction."""

from __future__ import annotations

import torch

from fxcache.analysis import analyse
from fxcache.testing import make_inputs, make_model

_GRAPHS: dict = {}


def capture(name: str):
    """(Dynamo graph, its analysis) of `make_model(name)` called on `make_inputs(name)`, captured once."""
    if name not in _GRAPHS:
        graphs = []

        def backend(gm, example_inputs, **kwargs):
            graphs.append(gm)
            return gm.forward

        with torch.no_grad():
            torch.compile(make_model(name), backend=backend, dynamic=False)(**make_inputs(name))
        _GRAPHS[name] = graphs[0]
    gm = _GRAPHS[name]
    return gm, analyse(gm)


def short(n) -> str:
    if n.op == "placeholder":
        return f"input {n.target}"
    if n.op == "call_method":
        return f".{n.target}"
    return getattr(n.target, "__name__", str(n.target))


def emitted(b, since: set | None = None) -> list[str]:
    """The nodes the passes added to the builder's graph (not copies of the model's nodes), in graph order;
    `since`: only those not in this set of nodes (what a later pass added)."""
    old = set(b.env.values()) | (since or set()) | {b._sink}  # the sink of the model outputs is not emitted
    return [short(n) for n in b.graph.nodes if n not in old and n.op != "output"]
