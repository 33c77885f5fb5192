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


def resolve_timestep_input(gm: fx.GraphModule, spec: int | str) -> tuple[int, fx.Node] | None:
    """An explicit timestep input: a placeholder index among user inputs' placeholders, or a name substring."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(spec, int):
        users = [i for i, n in enumerate(placeholders) if not is_param_placeholder(n)]
        if 0 <= spec < len(users):
            return users[spec], placeholders[users[spec]]
        return None
    for i, n in enumerate(placeholders):
        if not is_param_placeholder(n) and spec in n.name:
            return i, n
    return None
