"""Find the timestep input by data flow: the user placeholder that feeds a diffusers `Timesteps` module."""

from __future__ import annotations

from torch import fx

from .module_stack import is_param_placeholder, stack_entries


def find_timestep_input(gm: fx.GraphModule) -> tuple[int, fx.Node] | None:
    """(placeholder index, node) of the timestep input, or None when no `Timesteps` module is in the graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if not any(cls.__name__ == "Timesteps" for _, cls in stack_entries(n)):
            continue
        todo, seen = [n], set()
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            if x.op == "placeholder" and not is_param_placeholder(x):
                return placeholders.index(x), x
            todo.extend(x.all_input_nodes)
    return None


def resolve_timestep_input(gm: fx.GraphModule, spec: int | str,
                           forward_params: list[str] | None = None) -> tuple[int, fx.Node] | None:
    """An explicit timestep input: the forward's parameter `spec` (its name, a dotted path into a dict argument,
    or its index among the forward's parameters)."""
    from .inputs import input_paths

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    paths = input_paths(gm, forward_params)
    if isinstance(spec, int):
        if not forward_params or spec >= len(forward_params):
            return None
        spec = forward_params[spec]
    for i, path in paths.items():
        if path == spec:
            return i, placeholders[i]
    for i, path in paths.items():
        if path.split(".", 1)[0] == spec:
            return i, placeholders[i]
    return None
