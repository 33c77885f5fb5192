"""Cuts through a graph between its transformer blocks: the residual streams at a cut, how the streams at two
cuts pair up, and what a probe graph (the part of a call up to a run-time signal) carries over to the rest.

Methods that reuse the residual of a run of blocks (FBCache, DBCache, TeaCache, MagCache) rebuild the streams after
the run as the streams before it plus a cached residual, so each stream after the run needs its stream before the
run. A stream is a block's output read after that block (the image stream, FLUX's text stream); before block 0 the
streams are block 0's inputs. Streams pair up by shape and dtype; where two streams share both, only blocks of one
class pair them (by their position in the block's outputs, the same code traced twice); anything else is refused,
never guessed.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from ..errors import UnsupportedGraphError
from .blocks import walk


def _value(node: fx.Node):
    return node.meta.get("example_value")


def _signature(node: fx.Node):
    v = _value(node)
    return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None


def streams_at(graph, cut: int) -> list[fx.Node]:
    """The residual streams at `cut` (after blocks [0, cut)): block 0's tensor inputs at 0, else the outputs of
    block cut-1."""
    if cut == 0:
        return [n for n in graph.blocks[0].inputs if isinstance(_value(n), torch.Tensor)]
    return list(graph.blocks[cut - 1].outputs)


def pair_streams(graph, start: int, end: int, ends: list[fx.Node] | None = None) -> list[tuple[fx.Node, fx.Node]]:
    """[(stream at `end`, its stream at `start`)] for the streams after blocks [start, end) (`ends`: those of
    them wanted, default all). Raises UnsupportedGraphError when a stream has no unique partner."""
    if not 0 <= start < end <= len(graph.blocks):
        raise UnsupportedGraphError(f"no run of blocks [{start}, {end}) in a graph of {len(graph.blocks)} blocks")
    ends = streams_at(graph, end) if ends is None else ends
    starts = streams_at(graph, start)
    same_class = start >= 1 and graph.blocks[start - 1].cls == graph.blocks[end - 1].cls
    pairs, used = [], set()
    for i, e in enumerate(ends):
        sig = _signature(e)
        candidates = [s for s in starts if s not in used and _signature(s) == sig]
        if len(candidates) > 1 and same_class and len(starts) == len(ends) and starts[i] in candidates:
            candidates = [starts[i]]
        if len(candidates) != 1:
            what = "no" if not candidates else f"{len(candidates)} equally shaped"
            raise UnsupportedGraphError(
                f"the stream {e.name}{list(sig[0]) if sig else ''} after blocks {start}..{end - 1} has {what} "
                f"partner(s) among the streams before them ({', '.join(s.name for s in starts) or 'none'}), so the "
                f"residual of those blocks cannot be told per stream", block=graph.blocks[end - 1].name)
        used.add(candidates[0])
        pairs.append((e, candidates[0]))
    return pairs


def main_stream(graph) -> int:
    """Index in `graph.last_outputs` of the stream the model's output is made of (the image stream): of the last
    block's outputs that reach the output, the largest."""
    out = next(n for n in reversed(graph.blocks[-1].nodes[-1].graph.nodes) if n.op == "output")

    def reaches(node: fx.Node) -> bool:
        return any(n is out for n in walk([node], lambda x: x.users))

    ranked = [(reaches(n), _value(n).numel() if isinstance(_value(n), torch.Tensor) else 0, -i)
              for i, n in enumerate(graph.last_outputs)]
    return -max(ranked)[2]


def signal_stream(graph, cut: int) -> tuple[fx.Node, fx.Node]:
    """(the main stream at `cut`, the same stream before block 0): what FBCache and DBCache compare calls by."""
    last = graph.last_outputs[main_stream(graph)]
    at_cut = last if cut == len(graph.blocks) else dict(pair_streams(graph, cut, len(graph.blocks), [last]))[last]
    return at_cut, dict(pair_streams(graph, 0, cut, [at_cut]))[at_cut]


def run_escapes(graph, start: int, end: int) -> list[fx.Node]:
    """Nodes of blocks [start, end) (and the glue between them) that depend on the streams before the run and are
    read after it, other than the streams after it: a run with such values (long skip connections, U-ViT and
    HunyuanDiT style) cannot be replaced by its residual."""
    nodes = list(graph.blocks[start].nodes[0].graph.nodes)
    first = nodes.index(graph.blocks[start].nodes[0])
    last = nodes.index(graph.blocks[end - 1].nodes[-1])
    region = set(nodes[first:last + 1])
    starts = set(streams_at(graph, start))
    downstream = set(walk((u for s in starts for u in s.users), lambda x: x.users if x in region else ()))
    allowed = set(streams_at(graph, end))
    return [n for n in nodes[first:last + 1] if n in downstream and n not in allowed
            and any(u not in region for u in n.users)]


@dataclasses.dataclass
class Probe:
    """What a probe graph computes: `nodes` (every node up to its targets, in graph order) and `carried` (those of
    them the rest of the call reads, in graph order)."""

    nodes: list[fx.Node]
    carried: list[fx.Node]


def probe_of(gm: fx.GraphModule, targets: list[fx.Node]) -> Probe:
    """The probe whose graph computes `targets` and every node they need. A carried value that is not a tensor
    (a tuple of rotary tables) takes the items read from it along; anything else is refused."""
    inside = set(walk(targets, lambda x: () if x.op == "placeholder" else x.all_input_nodes))
    inside = {n for n in inside if n.op != "placeholder"}
    while True:
        grown = False
        for n in list(inside):
            if isinstance(_value(n), torch.Tensor):
                continue
            outside = [u for u in n.users if u not in inside]
            if outside and all(u.op == "call_function" and u.target is operator.getitem for u in outside):
                inside.update(outside)
                grown = True
        if not grown:
            break
    order = [n for n in gm.graph.nodes if n in inside]
    carried = [n for n in order if any(u not in inside for u in n.users)]
    bad = [n for n in carried if not isinstance(_value(n), torch.Tensor)]
    if bad:
        raise UnsupportedGraphError(f"the probe would carry {bad[0].name}, which is not a tensor "
                                    f"({type(_value(bad[0])).__name__})", node=bad[0])
    return Probe(order, carried)


def attention_input(graph) -> fx.Node:
    """The main stream as block 0's first attention reads it (normalised and modulated by the timestep): TeaCache's
    indicator for the families whose authors read `blocks[0].norm1(H_0, temb)[0]` (FLUX, HunyuanVideo, LTX-Video,
    Mochi, Lumina). Of the attention's inputs that depend on the main stream before block 0, the largest."""
    from .module_stack import is_param_placeholder, stack_entries

    block = graph.blocks[0]
    attention = next((u for u in block.units if u.kind == "attn"), None)
    if attention is None:
        raise UnsupportedGraphError("block 0 has no self-attention unit whose input could be the indicator",
                                    block=block.name)
    inside = [n for n in block.nodes
              if any(p == attention.name or p.startswith(attention.name + ".") for p, _ in stack_entries(n))]
    members = set(inside)
    reads = dict.fromkeys(a for n in inside for a in n.all_input_nodes
                          if a not in members and not is_param_placeholder(a))
    stream = signal_stream(graph, len(graph.blocks))[1]
    downstream = set(walk([stream], lambda x: x.users))
    candidates = [a for a in reads if a in downstream and isinstance(_value(a), torch.Tensor)
                  and _value(a).dim() >= 3 and _value(a).shape[0] == graph.batch]
    if not candidates:
        raise UnsupportedGraphError(f"no input of {attention.name} depends on the main stream before block 0",
                                    block=block.name)
    return max(candidates, key=lambda n: _value(n).numel())
