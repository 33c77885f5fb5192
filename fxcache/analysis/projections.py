"""Find the attention internals that ToCa's scores read: key/value projections and attention calls of a block.

Diffusers' `Attention` modules name their projections `to_q/to_k/to_v` (the stream the module is called on) and
`add_q_proj/add_k_proj/add_v_proj` (the text stream of joint attention); they are matched by those names and by
token count, so one score source serves the unit of the same stream.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .blocks import Block
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
