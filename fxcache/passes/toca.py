"""ToCa passes: FULL records each unit's score source; PARTIAL selects tokens in the graph and recomputes them."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from ..analysis import Unit
from ..analysis.projections import (
    AttentionSource,
    find_cross_attention_map,
    find_projection,
    find_self_attention_map,
)
from ..analysis.units import _sdpa_arg
from ..errors import UnsupportedGraphError
from .graph_builder import GraphBuilder
from .recompute_token_subset import recompute_token_subset
from .select_tokens import (
    attention_received_score,
    bonus_applies,
    cross_entropy_score,
    norm_score,
    select_tokens,
    similarity_score,
)


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


def scored_units(plan, config) -> list[ScoredUnit]:
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
                if config.score in ("knorm", "vnorm"):
                    proj = find_projection(block, unit, config.score[0], plan.batch)
                    if proj is None:
                        raise UnsupportedGraphError(
                            f"ToCa score {config.score!r}: no {config.score[0]}-projection with {unit.tokens} tokens "
                            f"in an attention of {block.name} for {unit.name}; use score='random' or 'similarity'",
                            block=block.name)
                    su.source, su.heads = proj.node, proj.heads
                elif config.score == "similarity":
                    su.source = unit.gather[0]
                elif config.score in ("attention", "cross_entropy"):
                    find = find_self_attention_map if config.score == "attention" else find_cross_attention_map
                    su.attention = find(block, unit, plan.batch)
                    if su.attention is None:
                        what = "self/joint attention over" if config.score == "attention" else "cross-attention from"
                        raise UnsupportedGraphError(
                            f"ToCa score {config.score!r}: no {what} the {unit.tokens} tokens of {unit.name} in "
                            f"{block.name}; use score='random', 'vnorm' or 'similarity'", block=block.name)
                out.append(su)
    return out


def score_key(name: str) -> str:
    return f"tocascore:{name}"


def stale_key(name: str) -> str:
    return f"tocastale:{name}"


def rand_key(name: str) -> str:
    return f"tocarand:{name}"


def add_score_outputs(b: GraphBuilder, units: list[ScoredUnit], config) -> list[str]:
    """FULL: per unit, the score (k-/v-norm) or the reference input (similarity) as an extra output."""
    written = []
    for su in units:
        if su.attention is not None:
            a = su.attention
            q, k = (b.env[_sdpa_arg(a.sdpa, i, n)] for i, n in ((0, "query"), (1, "key")))
            mask = _sdpa_arg(a.sdpa, 3, "attn_mask")
            mask = b.env[mask] if isinstance(mask, fx.Node) else None
            scale = a.sdpa.kwargs.get("scale")
            if config.score == "attention":
                args = (q, k, mask, scale, a.offset, a.length)
                b.extra_outputs.append(b.graph.call_function(attention_received_score, args))
            else:
                b.extra_outputs.append(b.graph.call_function(cross_entropy_score, (q, k, mask, scale)))
            written.append(score_key(su.name))
            continue
        if su.source is None:
            continue
        src = b.env[su.source]
        if config.score in ("knorm", "vnorm"):
            src = b.graph.call_function(norm_score, (src, su.heads, config.prefer == "low"))
        b.extra_outputs.append(src)
        written.append(score_key(su.name))
    return written


def score_spec(su: ScoredUnit, config) -> tuple[tuple[int, ...], torch.dtype]:
    if config.score == "similarity":
        v = su.source.meta["example_value"]
        return tuple(v.shape), v.dtype
    return (su.unit.tokens,), torch.float32


def add_selected_recompute(b: GraphBuilder, su: ScoredUnit, k: int, config, cache_in: fx.Node, cached: dict,
                           inputs: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node]:
    """PARTIAL: choose k tokens in the graph and recompute the unit on them; returns (new cache, new staleness)."""
    g = b.graph
    unit = su.unit
    anchor = b.env[unit.outputs[0]]
    stale = inputs[stale_key(su.name)]
    with g.inserting_before(anchor):
        if config.score == "random":
            base = inputs[rand_key(su.name)]
        elif config.score == "staleness":
            base = g.call_function(torch.zeros_like, (stale,))
        elif config.score == "similarity":
            current = cached.get(su.source, b.env[su.source])
            base = g.call_function(similarity_score, (current, inputs[score_key(su.name)]))
        else:
            base = inputs[score_key(su.name)]
        grid = config.spatial_grid if bonus_applies(unit.tokens, config.spatial_grid) else 0
        sel = g.call_function(select_tokens, (base, stale, k, config.staleness_weight, config.interval, grid,
                                              config.spatial_bonus))
        idx = g.call_function(operator.getitem, (sel, 0))
        new_stale = g.call_function(operator.getitem, (sel, 1))
    return recompute_token_subset(b, unit, idx, cache_in, cached), new_stale
