"""Dead-code elimination that keeps every side effect the variant still needs.

`torch.fx.Graph.eliminate_dead_code` treats `call_method` nodes as pure, so an in-place op whose result nobody
uses (`pos.data[:, k:].copy_(table)`, `x.add_(y)`) is deleted although later nodes read the tensor it wrote:
CogVideoX fills its positional embedding that way at any size other than its config's. Here a mutation stays
while the tensor it writes is read (by a node outside its views and mutations) or is a graph input, parameter or
buffer; a mutation of a temporary that nothing reads any more (inside a region a cached variant no longer runs)
goes, so cached variants stay cheap. Anything `torch.fx` calls impure (random ops, profiler marks) stays too.
"""

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


def _is_view(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _VIEW_METHODS
    if n.op == "call_function":
        return n.target in _VIEW_FUNCTIONS or "_get_data_attr" in getattr(n.target, "__name__", "")
    return False


def _root(n):
    """The tensor a chain of views and mutations ends at."""
    while isinstance(n, fx.Node) and (_is_view(n) or is_mutation(n)) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _aliases(root: fx.Node) -> set[fx.Node]:
    """`root` and every node that views it or mutates (and so returns) it, transitively."""
    seen, todo = {root}, [root]
    while todo:
        x = todo.pop()
        for u in x.users:
            if u not in seen and (_is_view(u) or is_mutation(u)) and u.args and u.args[0] is x:
                seen.add(u)
                todo.append(u)
    return seen


def _mutation_is_needed(m: fx.Node) -> bool:
    root = _root(m.args[0]) if m.args else None
    if not isinstance(root, fx.Node) or root.op == "placeholder":
        return True  # model state or an input: the write is an effect of the model call
    aliases = _aliases(root)
    return any(u not in aliases for a in aliases for u in a.users)


def _impure(n: fx.Node) -> bool:
    try:
        return n.is_impure()
    except Exception:  # a call_module without an owning module: keep it
        return True


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove dead nodes, keeping impure nodes and every mutation whose written tensor is read or is an input."""
    live = None
    while True:
        graph.eliminate_dead_code(
            is_impure_node=lambda n: _impure(n) or (is_mutation(n) and (live is None or n in live)))
        mutations = [n for n in graph.nodes if is_mutation(n)]
        needed = {m for m in mutations if _mutation_is_needed(m)}
        if live is not None and needed == live:
            return
        if live is None and len(needed) == len(mutations):
            return
        live = needed
