"""ToCa, PARTIAL blocks: each scored unit chooses its k tokens inside the graph (score, staleness, spatial bonus,
top-k) and is recomputed on them; its cache and its staleness are written back."""

from __future__ import annotations

import dataclasses
import operator

import torch

from ..analysis.scored import ScoredUnit
from ..graph_io import Key, Role
from ..ops.scores import bonus_applies, select_tokens, similarity_score
from .checks import graph_pass
from .graph_builder import GraphBuilder
from .regions import recompute_region
from .scores import score_shape


@dataclasses.dataclass(frozen=True)
class Selection:
    """How tokens are chosen (ToCa's score options)."""

    score: str
    staleness_weight: float
    interval: int
    spatial_grid: int
    spatial_bonus: float


@graph_pass
def select_and_recompute(b: GraphBuilder, units: list[tuple[ScoredUnit, int]], how: Selection) -> None:
    """`units`: (scored unit, k) with k >= 1."""
    g = b.graph
    for su, k in units:
        unit, node = su.unit, su.unit.outputs[0]
        stale = b.take(Role.STATE, Key.stale(su.name), (unit.tokens,), torch.float32)
        if how.score == "random":
            drawn = b.take(Role.UNIFORM, Key.score_draw(su.name), (unit.tokens,), torch.float32)
        elif how.score != "staleness":
            recorded = b.take(Role.CACHE, Key.score(su.name), *score_shape(su, how.score))
        value = node.meta["example_value"]
        cache = b.take(Role.CACHE, unit.cache_keys[0], value.shape, value.dtype, value)
        out = b.env[node]
        with g.inserting_before(out):
            if how.score == "random":
                base = drawn
            elif how.score == "staleness":
                base = g.call_function(torch.zeros_like, (stale,))
            elif how.score == "similarity":
                base = g.call_function(similarity_score, (b.current(su.source), recorded))
            else:
                base = recorded
            grid = how.spatial_grid if bonus_applies(unit.tokens, how.spatial_grid) else 0
            sel = g.call_function(select_tokens, (base, stale, k, how.staleness_weight, how.interval, grid,
                                                  how.spatial_bonus))
            idx = g.call_function(operator.getitem, (sel, 0))
            new_stale = g.call_function(operator.getitem, (sel, 1))
        rows = recompute_region(b, unit, lambda src: g.call_function(torch.index_select, (src, 1, idx)))
        with g.inserting_before(out):
            written = g.call_function(torch.index_copy, (cache, 1, idx, rows))
        out.replace_all_uses_with(written)
        b.replaced[node] = written
        b.give(Role.CACHE, unit.cache_keys[0], written)
        b.give(Role.STATE, Key.stale(su.name), new_stale)
