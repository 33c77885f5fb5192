"""Dead-code elimination that keeps every side effect the variant still needs.

`torch.fx.Graph.eliminate_dead_code` treats `call_method` nodes as pure, so an in-place op whose result nobody
uses (`pos.data[:, k:].copy_(table)`, `x.add_(y)`) is deleted although later nodes read the tensor it wrote:
CogVideoX fills its positional embedding that way at any size other than its config's. Here a mutation stays
while the tensor it writes is read (by a node outside its views and mutations) or is a graph input, parameter or
buffer; a mutation of a temporary that nothing reads any more (inside a region a cached variant no longer runs)
goes, so cached variants stay cheap. Anything `torch.fx` calls impure (random ops, profiler marks) stays too.
"""

from __future__ import annotations

from torch import fx

from ..analysis.aliases import alias_root, aliases, is_mutation


def _mutation_is_needed(m: fx.Node) -> bool:
    root = alias_root(m.args[0]) if m.args else None
    if not isinstance(root, fx.Node) or root.op == "placeholder":
        return True  # model state or an input: the write is an effect of the model call
    views = aliases(root)
    return any(u not in views for a in views for u in a.users)


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
