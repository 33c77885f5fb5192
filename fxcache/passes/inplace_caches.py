"""In-place caches: a variant that writes its caches into persistent buffers instead of returning them.

For CUDA graphs (`mode="reduce-overhead"`): a graph may only mutate inputs whose address never changes, and its
outputs are overwritten by the next replay, so caches cannot travel as outputs. Here every cache entry the variant
reads or writes is a buffer input, marked static for cudagraphs, and each written entry is `copy_`'d into its buffer
at the end of the graph, after every read. The graph returns the model's outputs only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..graph_io import GraphValue, Role
from .graph_builder import copy_dynamo_meta

STATIC = {"_dynamo_static_input_type": "unguarded"}  # what Dynamo sets for torch._dynamo.mark_static_address


def make_inplace(variant):
    """A copy of `variant` whose caches are buffer inputs updated in place; returns the new Variant.

    Every persistent input (cache, state) becomes the branch's buffer; an entry the variant only writes gets a
    `Role.BUFFER` input; `outputs` becomes empty and `writes` lists what the variant updates (the runner's record
    of which entries are valid).
    """
    gm = variant.gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old_out = graph.graph_copy(gm.graph, env)
    phs = [env[n] for n in gm.graph.nodes if n.op == "placeholder"]
    first_extra = len(phs) - len(variant.inputs)
    buffers = {v.key: phs[first_extra + i] for i, v in enumerate(variant.inputs) if v.role.persistent}
    inputs = list(variant.inputs)
    added = []
    for written in variant.outputs:
        if written.key in buffers or written.role.passed:
            continue
        with graph.inserting_after(phs[-1] if not added else added[-1]):
            ph = graph.placeholder(f"buf_{len(added)}")
        ph.meta["example_value"] = torch.empty(written.shape, dtype=written.dtype, device="meta")
        buffers[written.key] = ph
        added.append(ph)
        inputs.append(GraphValue(Role.BUFFER, written.key, written.shape, written.dtype))
    for ph in buffers.values():
        ph.meta["tensor_dict"] = dict(STATIC)
    values = list(old_out) if isinstance(old_out, (tuple, list)) else [old_out]
    model_outputs, cache_values = values[:variant.num_outputs], values[variant.num_outputs:]
    passed = []
    for written, value in zip(variant.outputs, cache_values):
        if written.role.passed:  # a probe's carried values and signal stay outputs (read within the call)
            passed.append(value)
            continue
        graph.call_function(torch.ops.aten.copy_.default, (buffers[written.key], value))
    graph.output(tuple(model_outputs) + tuple(passed))
    graph.lint()
    new = fx.GraphModule(gm, graph)
    copy_dynamo_meta(new, gm, env, added)
    new.recompile()
    return dataclasses.replace(variant, gm=new, inputs=inputs, outputs=[v for v in variant.outputs if v.role.passed],
                               writes=[v for v in variant.outputs if not v.role.passed])
