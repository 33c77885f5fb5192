"""When two Dynamo graphs are the same graph: Dynamo sometimes traces a shape it has already compiled again (a guard
that failed for a moment under threads, a global setting toggled and back), and hands the backend a second,
identical graph. A request in flight must go on in it with its caches, so the backend gives such a graph the runner
it already has (whose state the requests keep) instead of a new, empty one."""

from __future__ import annotations

import json

import torch


def _input_signature(value) -> tuple:
    if isinstance(value, torch.Tensor):  # sizes as text: a symbolic size (dynamic shapes) is not hashable
        return ("tensor", str(tuple(value.shape)), str(tuple(value.stride())), value.dtype, value.device,
                value.requires_grad, isinstance(value, torch.nn.Parameter))
    return ("value", type(value).__name__, repr(value))


def global_state() -> str:
    """The global state Dynamo guards (grad mode, autocast, default dtype, deterministic algorithms, TF32 and
    reduced-precision reductions, torch function), but the thread count: a graph traced under other state is
    another graph (Inductor bakes autocast into its code, for one)."""
    state = json.loads(torch._C._dynamo.guards.GlobalStateGuard().__getstate__())
    state.pop("num_threads", None)
    return json.dumps(state, sort_keys=True)


def graph_signature(gm: torch.fx.GraphModule, example_inputs, *, origin: tuple, mode=None, options=None) -> tuple:
    """What a graph computes and what it is called with: its code, every input's shape, strides, dtype, device and
    grad flag, the global state it was traced under, torch.compile's mode and options, and `origin` (the module
    class and code object it was traced from). Equal signatures (and equal constants, `same_constants`) run
    interchangeably."""
    constants = tuple((n.target, _input_signature(_attr(gm, n.target))) for n in gm.graph.nodes if n.op == "get_attr")
    return (gm.code, tuple(_input_signature(x) for x in example_inputs), constants, global_state(),
            mode, repr(sorted((options or {}).items())), origin)


def _attr(gm: torch.fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def same_constants(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """The tensors the two graphs hold as attributes (get_attr) have equal values."""
    for n in a.graph.nodes:
        if n.op != "get_attr":
            continue
        x, y = _attr(a, n.target), _attr(b, n.target)
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and not (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
            return False
    return True
