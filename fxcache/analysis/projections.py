"""Find the attention internals that ToCa's scores read: key/value projections and attention calls of a block.

Diffusers' `Attention` modules name their projections `to_q/to_k/to_v` (the stream the module is called on) and
`add_q_proj/add_k_proj/add_v_proj` (the text stream of joint attention); they are matched by those names and by
token count, so one score source serves the unit of the same stream.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .blocks import Block, is_softmax
from .module_stack import stack_entries
from .units import ATTN, Unit, _is_sdpa, _sdpa_arg

_PROJ = {"k": ("to_k", "add_k_proj"), "v": ("to_v", "add_v_proj")}


@dataclasses.dataclass
class Projection:
    node: fx.Node  # (B, tokens, D)
    heads: int


def _shape(n: fx.Node):
    v = n.meta.get("example_value")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _leaf(n: fx.Node) -> str:
    st = stack_entries(n)
    return st[-1][0].rsplit(".", 1)[-1] if st else ""


def _heads(block: Block, child: str) -> int | None:
    for n in block.nodes:
        if _is_sdpa(n) and stack_entries(n) and any(p == child for p, _ in stack_entries(n)):
            q = _sdpa_arg(n, 0, "query")
            s = _shape(q) if isinstance(q, fx.Node) else None
            if s and len(s) == 4:
                return s[1]
    return None


def find_projection(block: Block, unit: Unit, which: str, batch: int) -> Projection | None:
    """The block's key (`which="k"`) or value projection with the unit's token count, from a token-mixing
    attention child (self or joint attention), or None."""
    names = _PROJ[which]
    attn_children = [u.name for u in block.units if u.kind == ATTN]
    for n in block.nodes:
        s = _shape(n)
        if s is None or len(s) != 3 or s[0] != batch or s[1] != unit.tokens or _leaf(n) not in names:
            continue
        if any(u.op == "call_function" and _leaf(u) == _leaf(n) for u in n.users):
            continue  # not the projection's last node (e.g. a bias add inside it)
        child = next((c for c in attn_children if any(p == c for p, _ in stack_entries(n))), None)
        if child is None:
            continue
        heads = _heads(block, child)
        if heads and s[2] % heads == 0:
            return Projection(n, heads)
    return None


@dataclasses.dataclass
class AttentionSource:
    """An attention call whose map a score reads, and where the unit's tokens sit among its keys: an SDPA call, or
    (attention written out as q @ k^T and softmax, timm's non-fused path) the softmax whose output is the map."""

    sdpa: fx.Node | None
    offset: int  # first key position of the unit's stream (attention received); 0 for cross-attention
    length: int
    probs: fx.Node | None = None  # the (B, heads, Lq, Lk) softmax of an explicit attention


def _upstream(start: fx.Node, stop: set) -> set:
    todo, seen = [start], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x not in stop:
            todo.extend(x.all_input_nodes)
    return seen


def _child_sdpas(block: Block, child: str) -> list[fx.Node]:
    return [n for n in block.nodes if _is_sdpa(n) and any(p == child for p, _ in stack_entries(n))]


def _explicit_map(block: Block, child: str, batch: int, tokens: int) -> fx.Node | None:
    """A softmax over keys, (batch, heads, tokens, tokens), inside the attention child: an attention written out."""
    for n in block.nodes:
        s = _shape(n)
        if (s is not None and len(s) == 4 and s[0] == batch and s[2] == s[3] == tokens and is_softmax(n)
                and any(p == child for p, _ in stack_entries(n))):
            return n
    return None


def find_self_attention_map(block: Block, unit: Unit, batch: int) -> AttentionSource | None:
    """The block's self/joint attention, and the key positions of the unit's stream. Self-attention over the unit's
    tokens is found by the key length alone (any projection layout: separate or fused qkv); joint attention
    concatenates streams, and the offset is found from the key projection of the unit's stream."""
    proj = find_projection(block, unit, "k", batch)
    for child in [u.name for u in block.units if u.kind == ATTN]:
        for sdpa in _child_sdpas(block, child):
            key = _sdpa_arg(sdpa, 1, "key")
            ks = _shape(key)
            if ks is None or len(ks) != 4 or ks[0] != batch:
                continue
            keys = ks[2]
            if keys == unit.tokens:  # self-attention over the unit's tokens, whatever its projections (fused qkv)
                return AttentionSource(sdpa, 0, keys)
            if proj is None:  # joint attention: the unit's slice is found from its stream's key projection
                continue
            for n in _upstream(key, {proj.node}):
                if n.op != "call_function" or getattr(n.target, "__name__", "") not in ("cat", "concat"):
                    continue
                parts, dim = n.args[0], n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
                offset = 0
                for part in parts:
                    ps = _shape(part)
                    if ps is None:
                        break
                    if proj.node in _upstream(part, {proj.node}):
                        if ps[dim] == unit.tokens:
                            return AttentionSource(sdpa, offset, unit.tokens)
                        break
                    offset += ps[dim]
    for child in [u.name for u in block.units if u.kind == ATTN]:  # no SDPA: an explicit softmax map
        probs = _explicit_map(block, child, batch, unit.tokens)
        if probs is not None:
            return AttentionSource(None, 0, unit.tokens, probs)
    return None


def find_cross_attention_map(block: Block, unit: Unit, batch: int) -> AttentionSource | None:
    """The block's cross-attention whose queries are the unit's tokens (PixArt-style blocks)."""
    from .units import XATTN

    for child in [u.name for u in block.units if u.kind == XATTN]:
        for sdpa in _child_sdpas(block, child):
            q = _shape(_sdpa_arg(sdpa, 0, "query"))
            if q is not None and len(q) == 4 and q[0] == batch and q[2] == unit.tokens:
                return AttentionSource(sdpa, 0, unit.tokens)
    return None
