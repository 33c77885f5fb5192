"""ToCa's view of a graph: the units it scores, where each sits (for the ratio schedules) and what its score reads
at FULL steps (a key / value projection, the unit's input, or an attention map)."""

from __future__ import annotations

import dataclasses

from torch import fx

from ..errors import UnsupportedGraphError
from .projections import AttentionSource, find_cross_attention_map, find_projection, find_self_attention_map
from .units import Unit


@dataclasses.dataclass
class ScoredUnit:
    """A partially recomputable unit with where it sits (for the ratio schedule) and its score source."""

    unit: Unit
    layer: int  # index within its block list
    layers: int  # length of its block list
    list_index: int  # 0 for the first block list, 1 for a second (FLUX single-stream blocks)
    source: fx.Node | None = None  # FULL-step node the score reads (projection or unit input)
    heads: int = 0
    attention: AttentionSource | None = None  # attention whose map the score reads

    @property
    def name(self) -> str:
        return self.unit.name


def scored_units(plan, score: str) -> list[ScoredUnit]:
    """Every partially recomputable unit, where it sits, and the FULL-step value its `score` reads."""
    lists: dict[str, list] = {}
    for block in plan.blocks:
        lists.setdefault(block.name.rsplit(".", 1)[0], []).append(block)
    out = []
    for li, blocks in enumerate(lists.values()):
        for layer, block in enumerate(blocks):
            for unit in block.units:
                if not unit.partial:
                    continue
                su = ScoredUnit(unit, layer, len(blocks), li)
                if score in ("knorm", "vnorm"):
                    proj = find_projection(block, unit, score[0], plan.batch)
                    if proj is None:
                        raise UnsupportedGraphError(
                            f"score {score!r}: no {score[0]}-projection with {unit.tokens} tokens "
                            f"in an attention of {block.name} for {unit.name}; use score='random' or 'similarity'",
                            block=block.name)
                    su.source, su.heads = proj.node, proj.heads
                elif score == "similarity":
                    su.source = unit.gather[0]
                elif score in ("attention", "cross_entropy"):
                    find = find_self_attention_map if score == "attention" else find_cross_attention_map
                    su.attention = find(block, unit, plan.batch)
                    if su.attention is None:
                        what = "self/joint attention over" if score == "attention" else "cross-attention from"
                        raise UnsupportedGraphError(
                            f"score {score!r}: no {what} the {unit.tokens} tokens of {unit.name} in "
                            f"{block.name}; use score='random' or 'similarity'", block=block.name)
                out.append(su)
    return out
