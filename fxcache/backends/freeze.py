"""A variant prepared for an engine: weights become constants, exporter traps are removed."""

from __future__ import annotations

import torch
from torch import fx


def lift_constants(gm: fx.GraphModule, example_args, keep: list[int]) -> fx.GraphModule:
    """A copy of `gm` whose placeholders not in `keep` are constants (buffers of the new module) with the example
    values. Dynamo passes weights as graph inputs; an exported engine must hold them instead."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    root = torch.nn.Module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep_set = set(keep)
    for i, (old, value) in enumerate(zip(placeholders, example_args)):
        if i in keep_set:
            continue
        name = f"const_{i}"
        root.register_buffer(name, value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value))
        new = env[old]
        with graph.inserting_before(new):
            attr = graph.get_attr(name)
        attr.meta = dict(new.meta)
        new.replace_all_uses_with(attr)
        graph.erase_node(new)
    graph.lint()
    return fx.GraphModule(root, graph)


def remove_noop_squeeze(gm: fx.GraphModule) -> int:
    """Drop `squeeze(dim)` on a dim whose size is not 1: torch leaves the tensor as it is, but the ONNX exporter
    emits a Squeeze that onnxruntime rejects. Returns how many were dropped."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" and node.op != "call_method":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "squeeze" not in name or "unsqueeze" in name or len(node.args) < 2:
            continue
        src = node.args[0]
        value = src.meta.get("example_value", src.meta.get("val")) if isinstance(src, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        if all(isinstance(d, int) and value.shape[d] != 1 for d in dims):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return dropped
