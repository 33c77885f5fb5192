"""ToCa, FULL blocks: each scored unit's score at this step (or the value it is computed from later) is written to
a cache, for the partial steps that follow to choose tokens by."""

from __future__ import annotations

import torch
from torch import fx

from ..analysis.scored import ScoredUnit
from ..analysis.units import _sdpa_arg
from ..graph_io import Key, Role
from ..ops.scores import attention_received_score, cross_entropy_score, norm_score, received_from_map
from .checks import graph_pass
from .graph_builder import GraphBuilder


@graph_pass
def record_scores(b: GraphBuilder, units: list[ScoredUnit], score: str, prefer_low: bool, each: bool) -> None:
    """`score`: "attention" / "cross_entropy" (from the attention's q and k), "knorm" / "vnorm" (from the
    projection), "similarity" (the unit's input itself); "random" and "staleness" record nothing. `each`: one
    score row per batch row, else one shared row."""
    for su in units:
        key = Key.score(su.name)
        if su.attention is not None and su.attention.sdpa is None:  # an explicit softmax: the map itself
            a = su.attention
            node = b.graph.call_function(received_from_map, (b.env[a.probs], a.offset, a.length, each))
            b.give(Role.CACHE, key, node)
            continue
        if su.attention is not None:
            a = su.attention
            q, k = (b.env[_sdpa_arg(a.sdpa, i, n)] for i, n in ((0, "query"), (1, "key")))
            mask = _sdpa_arg(a.sdpa, 3, "attn_mask")
            mask = b.env[mask] if isinstance(mask, fx.Node) else None
            scale = a.sdpa.kwargs.get("scale")
            if score == "attention":
                node = b.graph.call_function(attention_received_score,
                                             (q, k, mask, scale, a.offset, a.length, each))
            else:
                node = b.graph.call_function(cross_entropy_score, (q, k, mask, scale, each))
            b.give(Role.CACHE, key, node)
            continue
        if su.source is None:
            continue
        src = b.env[su.source]
        if score in ("knorm", "vnorm"):
            src = b.graph.call_function(norm_score, (src, su.heads, prefer_low, each))
        b.give(Role.CACHE, key, src)


def score_rows(su: ScoredUnit, each: bool) -> int:
    """Rows of the unit's scores and staleness: its batch size when every row chooses its own tokens, else 1."""
    return int(su.unit.outputs[0].meta["example_value"].shape[0]) if each else 1


def score_shape(su: ScoredUnit, score: str, each: bool) -> tuple[tuple[int, ...], torch.dtype]:
    """What `record_scores` writes for the unit: the input itself for "similarity", else a (rows, tokens) score."""
    if score == "similarity":
        v = su.source.meta["example_value"]
        return tuple(v.shape), v.dtype
    return (score_rows(su, each), su.unit.tokens), torch.float32
