"""Which nodes of an FX graph write into a tensor, and which share its storage: what dead-code elimination must
keep, and what the unit analysis must not cache (a unit output written in place after the unit)."""

from __future__ import annotations

import operator

import torch
from torch import fx

# ops whose output shares storage with their first argument (conservative: more aliases keep more mutations)
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "transpose_", "permute", "unsqueeze", "squeeze",
    "expand", "expand_as", "narrow", "select", "as_strided", "flatten", "unflatten", "t", "T", "mT", "detach",
    "contiguous", "split", "chunk", "unbind", "movedim", "swapaxes", "swapdims", "diagonal", "unfold", "real",
    "imag", "data", "__getitem__",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.narrow,
    torch.select, torch.flatten, torch.split, torch.chunk, torch.unbind, torch.movedim, torch.swapaxes,
    torch.diagonal, torch.as_strided, torch.detach, torch.t,
}


def is_mutation(n: fx.Node) -> bool:
    """An op that writes into its first argument."""
    if n.op == "call_method":
        return isinstance(n.target, str) and n.target.endswith("_") and not n.target.startswith("__")
    if n.op != "call_function":
        return False
    if n.target is operator.setitem:
        return True
    schema = getattr(n.target, "_schema", None)
    if schema is not None:
        return any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    name = getattr(n.target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def is_view(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _VIEW_METHODS
    if n.op == "call_function":
        return n.target in _VIEW_FUNCTIONS or "_get_data_attr" in getattr(n.target, "__name__", "")
    return False


def alias_root(n):
    """The tensor a chain of views and mutations ends at."""
    while isinstance(n, fx.Node) and (is_view(n) or is_mutation(n)) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def aliases(root: fx.Node) -> set[fx.Node]:
    """`root` and every node that views it or mutates (and so returns) it, transitively."""
    seen, todo = {root}, [root]
    while todo:
        x = todo.pop()
        for u in x.users:
            if u not in seen and (is_view(u) or is_mutation(u)) and u.args and u.args[0] is x:
                seen.add(u)
                todo.append(u)
    return seen
