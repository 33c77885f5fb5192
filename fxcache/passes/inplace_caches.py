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

from .graph_builder import copy_dynamo_meta

#: extra-input kinds that are cache entries (persistent per CFG branch); the others are per-step values
CACHE_KINDS = ("cache", "state")
STATIC = {"_dynamo_static_input_type": "unguarded"}  # what Dynamo sets for torch._dynamo.mark_static_address


def written_specs(variant) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every cache entry the variant reads or writes."""
    specs = {e.key: (tuple(e.shape), e.dtype) for e in variant.extra_inputs if e.kind in CACHE_KINDS}
    out = next(n for n in variant.gm.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    for key, node in zip(variant.extra_outputs, values[variant.num_outputs:]):
        value = node.meta.get("example_value")
        if value is None:
            raise ValueError(f"no example value for cache output {key}: run propagate_shapes first")
        specs.setdefault(key, (tuple(value.shape), value.dtype))
    return specs


def make_inplace(variant):
    """A copy of `variant` whose caches are buffer inputs updated in place; returns the new Variant.

    Its `extra_inputs` gain kind "buffer" entries for caches it only writes; `extra_outputs` becomes empty and
    `writes` lists the keys it updates (the runner's record of which entries are valid).
    """
    from ..variants import ExtraInput

    gm = variant.gm
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    old_out = graph.graph_copy(gm.graph, env)
    phs = [env[n] for n in gm.graph.nodes if n.op == "placeholder"]
    first_extra = len(phs) - len(variant.extra_inputs)
    buffers = {e.key: phs[first_extra + i] for i, e in enumerate(variant.extra_inputs) if e.kind in CACHE_KINDS}
    specs = written_specs(variant)
    extras = list(variant.extra_inputs)
    added = []
    for key in variant.extra_outputs:
        if key in buffers:
            continue
        with graph.inserting_after(phs[-1] if not added else added[-1]):
            ph = graph.placeholder(f"buf_{len(added)}")
        shape, dtype = specs[key]
        ph.meta["example_value"] = torch.empty(shape, dtype=dtype, device="meta")
        buffers[key] = ph
        added.append(ph)
        extras.append(ExtraInput("buffer", key, shape, dtype))
    for ph in buffers.values():
        ph.meta["tensor_dict"] = dict(STATIC)
    values = list(old_out) if isinstance(old_out, (tuple, list)) else [old_out]
    model_outputs, cache_values = values[:variant.num_outputs], values[variant.num_outputs:]
    for key, value in zip(variant.extra_outputs, cache_values):
        graph.call_function(torch.ops.aten.copy_.default, (buffers[key], value))
    graph.output(tuple(model_outputs))
    graph.lint()
    new = fx.GraphModule(gm, graph)
    copy_dynamo_meta(new, gm, env, added)
    new.recompile()
    return dataclasses.replace(variant, gm=new, extra_inputs=extras, extra_outputs=[],
                               writes=list(variant.extra_outputs))
