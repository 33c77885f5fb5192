"""A copy of the Dynamo graph under construction: typed extra inputs after the last placeholder, typed extra
outputs after the model's, Dynamo's meta copied."""

from __future__ import annotations

import torch
from torch import fx

from ..graph_io import GraphValue, Key, Role
from .dead_code import eliminate_dead_code


class GraphBuilder:
    """Copies `gm.graph`; keeps the mapping old node -> new node in `env`.

    Passes declare what the variant takes beyond the model's inputs with `take` (a placeholder per typed value, in
    call order) and what it writes with `give` (an output per cache entry, after the model's outputs): the
    variant's I/O is these declarations, nothing else."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        out = self.graph.graph_copy(gm.graph, self.env)
        self.single_output = not isinstance(out, (tuple, list))
        # the model's outputs are held by a sink node until `finish`, so a pass that replaces a node the model
        # returns directly (a graph that ends in a block: a piece of a graph-broken forward) replaces it there too
        self._sink = self.graph.call_function(_model_outputs, tuple([out] if self.single_output else out))
        self.extra_outputs: list[fx.Node] = []
        self.added: list[fx.Node] = []
        self.inputs: list[GraphValue] = []  # extra inputs, in placeholder order
        self.written: list[tuple[Role, Key]] = []  # cache entries written, in the order of `extra_outputs`
        # what passes leave for later passes: original unit output -> the node that stands for it now (a cache
        # placeholder, a forecast); per unit output, its Taylor factor placeholders; the Taylor coefficients
        self.replaced: dict[fx.Node, fx.Node] = {}
        self.factors: dict[Key, list[fx.Node]] = {}
        self.coef: fx.Node | None = None
        phs = [n for n in self.graph.nodes if n.op == "placeholder"]
        self._last_placeholder = phs[-1] if phs else None

    @property
    def outputs(self) -> list:
        """The model's outputs as the variant computes them now."""
        return list(self._sink.args)

    def current(self, node: fx.Node) -> fx.Node:
        """The node that computes `node`'s value in the variant: its replacement, else its copy."""
        return self.replaced.get(node, self.env.get(node))

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

    def take(self, role: Role, key: Key, shape, dtype: torch.dtype, example=None) -> fx.Node:
        """Declare an extra input of the variant and make its placeholder (named after the key)."""
        if any(v.key == key for v in self.inputs):
            raise ValueError(f"{key.name} is already an input of this variant")
        ph = self.add_placeholder(key.placeholder, example)
        self.inputs.append(GraphValue(role, key, tuple(int(d) for d in shape), dtype))
        return ph

    def give(self, role: Role, key: Key, node: fx.Node) -> None:
        """Declare a cache entry the variant writes: `node`'s value, returned after the model's outputs."""
        if any(k == key for _, k in self.written):
            raise ValueError(f"{key.name} is already written by this variant")
        self.extra_outputs.append(node)
        self.written.append((role, key))

    def inserting_at_end(self):
        """Insertion point after every node of the model (before the outputs are gathered)."""
        return self.graph.inserting_before(self._sink)

    def drop_model_outputs(self) -> None:
        """The variant returns none of the model's outputs (a probe: its outputs are the values it passes on)."""
        self._sink.args = ()
        self.single_output = False

    def inserting_after_placeholders(self):
        """Insertion point before the first computation (for values every later node may read)."""
        first = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
        return self.graph.inserting_before(first)

    def finish(self) -> fx.GraphModule:
        from .checks import check, checks_enabled

        if checks_enabled():
            check(self, "the last pass")
        outputs = list(self._sink.args)
        self.graph.erase_node(self._sink)
        self.graph.output(tuple(outputs + self.extra_outputs))
        eliminate_dead_code(self.graph)
        self.graph.lint()
        new = fx.GraphModule(self.gm, self.graph)
        copy_dynamo_meta(new, self.gm, self.env, self.added)
        return new


def _model_outputs(*values):
    """The sink of a variant's model outputs while passes run (never called: `finish` removes it)."""
    return values


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
