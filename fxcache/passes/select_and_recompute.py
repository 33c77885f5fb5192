"""ToCa, PARTIAL blocks: each scored unit chooses its k tokens inside the graph (score, staleness, spatial bonus,
top-k, per batch row or shared by the rows) and is recomputed on them; its cache and its staleness are written
back. Units with k = 0 and FULL blocks of a mixed step keep their staleness as the authors' code does."""

from __future__ import annotations

import dataclasses
import operator

import torch

from ..analysis.scored import ScoredUnit
from ..graph_io import Key, Role
from ..ops.rows import gather_rows, scatter_rows
from ..analysis.units import XATTN, _sdpa_arg
from ..ops.scores import (advance_staleness, bonus_applies, fresh_staleness, l2_normalise, refresh_entropy,
                          select_tokens, similarity_score)
from .checks import graph_pass
from .graph_builder import GraphBuilder
from .regions import recompute_region
from .scores import score_rows, score_shape


@dataclasses.dataclass(frozen=True)
class Selection:
    """How tokens are chosen (ToCa's score options). `each`: every batch row chooses its own tokens."""

    score: str
    staleness_weight: float
    interval: int
    spatial_grid: int
    spatial_bonus: float
    each: bool = True

    @property
    def tracks_staleness(self) -> bool:
        """Whether the staleness moves the choice (else a PARTIAL step only resets the chosen tokens' count)."""
        return self.staleness_weight > 0 or self.score == "staleness"


def _stale(b: GraphBuilder, su: ScoredUnit, how: Selection):
    return b.take(Role.STATE, Key.stale(su.name), (score_rows(su, how.each), su.unit.tokens), torch.float32)


def _node(copies: dict, b: GraphBuilder, n):
    if not isinstance(n, torch.fx.Node):
        return n
    return copies[n] if n in copies else b.current(n)


@graph_pass
def select_and_recompute(b: GraphBuilder, units: list[tuple[ScoredUnit, int]], how: Selection) -> dict:
    """`units`: (scored unit, k) with k >= 1. Returns, per block index, the s2 score its cross-attention refreshed
    (score "cross_entropy": the recomputed rows' fresh entropies, read by the block's later units, as the authors'
    PixArt code does); the caller writes it for the block's units that recompute nothing."""
    g = b.graph
    refreshed: dict[int, torch.fx.Node] = {}
    for su, k in units:
        unit, node = su.unit, su.unit.outputs[0]
        stale = _stale(b, su, how)
        if how.score == "random":
            drawn = b.take(Role.UNIFORM, Key.score_draw(su.name), (unit.tokens,), torch.float32)
        elif how.score == "cross_entropy" and unit.block in refreshed:
            recorded = refreshed[unit.block]  # the block's cross-attention refreshed it this step
        elif how.score != "staleness":
            recorded = b.take(Role.CACHE, Key.score(su.name), *score_shape(su, how.score, how.each))
        value = node.meta["example_value"]
        batch = int(value.shape[0])
        cache = b.take(Role.CACHE, unit.cache_keys[0], value.shape, value.dtype, value)
        out = b.env[node]
        with g.inserting_before(out):
            if how.score == "random":
                base = g.call_function(torch.unsqueeze, (drawn, 0))
            elif how.score == "staleness":
                base = g.call_function(torch.zeros_like, (stale,))
            elif how.score == "similarity":
                base = g.call_function(similarity_score, (b.current(su.source), recorded, how.each))
            elif how.score == "cross_entropy":
                base = g.call_function(l2_normalise, (recorded,))
            else:
                base = recorded
            grid = how.spatial_grid if bonus_applies(unit.tokens, how.spatial_grid) else 0
            sel = g.call_function(select_tokens, (base, stale, k, how.staleness_weight, how.interval, grid,
                                                  how.spatial_bonus))
            chosen = g.call_function(operator.getitem, (sel, 0))
            idx = g.call_function(torch.Tensor.expand, (chosen, batch, k))
            new_stale = g.call_function(operator.getitem, (sel, 1))
        copies: dict = {}
        rows = recompute_region(b, unit, lambda src: g.call_function(gather_rows, (src, idx)), copies)
        with g.inserting_before(out):
            written = g.call_function(scatter_rows, (cache, idx, rows))
            if how.score == "cross_entropy" and unit.kind == XATTN and su.attention is not None \
                    and su.attention.sdpa in copies:
                sdpa = su.attention.sdpa
                q, kk, mask = (_node(copies, b, _sdpa_arg(sdpa, i, n))
                               for i, n in ((0, "query"), (1, "key"), (3, "attn_mask")))
                refreshed[unit.block] = recorded = g.call_function(
                    refresh_entropy, (recorded, idx, q, kk, mask, sdpa.kwargs.get("scale"), how.each))
        out.replace_all_uses_with(written)
        b.replaced[node] = written
        b.give(Role.CACHE, unit.cache_keys[0], written)
        b.give(Role.STATE, Key.stale(su.name), new_stale)
        if how.score == "cross_entropy" and unit.block in refreshed:
            b.give(Role.CACHE, Key.score(su.name), recorded)
    return refreshed


@graph_pass
def age_unrefreshed(b: GraphBuilder, units: list[ScoredUnit], how: Selection) -> None:
    """PARTIAL blocks' scored units that recompute no token this step (k = 0): every token ages by one."""
    if not how.tracks_staleness:
        return
    for su in units:
        stale = _stale(b, su, how)
        with b.inserting_after_placeholders():
            aged = b.graph.call_function(advance_staleness, (stale,))
        b.give(Role.STATE, Key.stale(su.name), aged)


@graph_pass
def restart_staleness(b: GraphBuilder, units: list[ScoredUnit], how: Selection) -> None:
    """FULL blocks of a step that is not FULL (block 0 of the DiT references' mixed steps): their units were just
    recomputed everywhere, so their staleness restarts at 0 (a FULL step restarts every unit's in the store)."""
    if not how.tracks_staleness:
        return
    for su in units:
        out = b.current(su.unit.outputs[0])
        with b.graph.inserting_after(out):
            zero = b.graph.call_function(fresh_staleness, (out, score_rows(su, how.each)))
        b.give(Role.STATE, Key.stale(su.name), zero)
