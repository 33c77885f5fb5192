"""A copy of the Dynamo graph under construction: placeholders after the last one, extra outputs, meta copy."""

from __future__ import annotations

import torch
from torch import fx

from .dead_code import eliminate_dead_code


class GraphBuilder:
    """Copies `gm.graph`; keeps the mapping old node -> new node in `env`."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        out = self.graph.graph_copy(gm.graph, self.env)
        self.single_output = not isinstance(out, (tuple, list))
        self.outputs = [out] if self.single_output else list(out)
        self.extra_outputs: list[fx.Node] = []
        self.added: list[fx.Node] = []
        phs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self._last_placeholder = phs[-1] if phs else None

    def add_placeholder(self, name: str, example: torch.Tensor | None = None) -> fx.Node:
        if self._last_placeholder is None:
            ctx = self.graph.inserting_before(next(iter(self.graph.nodes)))
        else:
            ctx = self.graph.inserting_after(self._last_placeholder)
        with ctx:
            ph = self.graph.placeholder(name)
        if example is not None:
            ph.meta["example_value"] = example
        self._last_placeholder = ph
        self.added.append(ph)
        return ph

    def inserting_after_placeholders(self):
        """Insertion point before the first computation (for values every later node may read)."""
        first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        return self.graph.inserting_before(first)

    def finish(self) -> fx.GraphModule:
        self.graph.output(tuple(self.outputs + self.extra_outputs))
        eliminate_dead_code(self.graph)
        self.graph.lint()
        new = fx.GraphModule(self.gm, self.graph)
        copy_dynamo_meta(new, self.gm, self.env, self.added)
        return new


def copy_dynamo_meta(new: fx.GraphModule, gm: fx.GraphModule, env: dict, added: list[fx.Node]) -> None:
    """Keep what Dynamo attached to the graph: compile ids, parameter sources, placeholder sources."""
    new.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old, nw in env.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            nw._dynamo_source = old._dynamo_source
    for ph in added:
        ph._dynamo_source = None
