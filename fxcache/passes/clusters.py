"""ClusCa in the graph: the residual stream is clustered at FULL steps; at CLUSTER steps one member per cluster
of each refreshed unit is recomputed and the unit's forecast is refreshed from it."""

from __future__ import annotations

import operator

import torch

from ..analysis.clusters import ClusterGroup
from ..graph_io import Key, Role, Slot
from ..ops.kmeans import clusca_refresh, clusca_refresh_ref, cluster_members, kmeans, kmeans_ref
from ..ops.rows import gather_rows
from .checks import graph_pass
from .graph_builder import GraphBuilder
from .regions import recompute_region


@graph_pass
def cluster_tokens(b: GraphBuilder, groups: dict[int, ClusterGroup], iters: int, mode: str = "fixed") -> None:
    """FULL: k-means of each group's feature (B, N, D), warm-started from the branch's centroids when it has
    them (`warm`), else from drawn tokens; labels and centroids are written.

    mode "fixed": `ops.kmeans` (`iters` iterations; one drawn permutation (K,) starts every row). "ref": the
    authors' `ops.kmeans_ref` (early stop, zero centroids for empty clusters; a cold start draws K tokens per row
    with replacement, from a (B, K) uniform draw)."""
    warm = b.take(Role.WARM, Key.scalar(Slot.WARM), (1,), torch.float32)
    for tokens, group in groups.items():
        prev = b.take(Role.CACHE, Key.stream(Slot.CENTROIDS, tokens), group.centroids_shape, torch.float32)
        key = Key.stream(Slot.KMEANS_INIT, tokens)
        if mode == "ref":
            init = b.take(Role.UNIFORM, key, (group.labels_shape[0], group.clusters), torch.float32)
            fn = kmeans_ref
        else:
            init = b.take(Role.PERMUTATION, key, (group.clusters,), torch.int64)
            fn = kmeans
        res = b.graph.call_function(fn, (b.env[group.feature], prev, init, warm, iters))  # after the blocks
        b.give(Role.CACHE, Key.stream(Slot.LABELS, tokens), b.graph.call_function(operator.getitem, (res, 0)))
        b.give(Role.CACHE, Key.stream(Slot.CENTROIDS, tokens), b.graph.call_function(operator.getitem, (res, 1)))


@graph_pass
def refresh_clusters(b: GraphBuilder, groups: dict[int, ClusterGroup], gamma: float, anchor: str = "exact",
                     draws: str = "shared") -> None:
    """CLUSTER (after `forecast_units`): per group, one member per cluster and batch row is drawn; each refreshed
    unit is recomputed on those rows and its output and F_0 refreshed from them (`anchor`: "exact",
    `ops.clusca_refresh`; "ref", `ops.clusca_refresh_ref`), the largest stream propagated with weight gamma.
    Writes each refreshed unit's new F_0.

    draws "shared": one (1, N) draw per stream serves every row and unit (an empty cluster repeats a real pick).
    "per_unit": one (units, B, N) draw per stream, so every unit and batch row picks its own members (an empty
    cluster picks token 0), as the authors' per-call `torch.rand(B, N)`."""
    g = b.graph
    refresh = clusca_refresh_ref if anchor == "ref" else clusca_refresh
    for tokens, group in groups.items():
        labels = b.take(Role.CACHE, Key.stream(Slot.LABELS, tokens), group.labels_shape, torch.int64)
        per_unit = draws == "per_unit"
        shape = (len(group.units), group.labels_shape[0], tokens) if per_unit else (1, tokens)
        rand = b.take(Role.UNIFORM, Key.stream(Slot.MEMBER_DRAW, tokens), shape, torch.float32)
        with b.inserting_after_placeholders():
            members = g.call_function(cluster_members, (labels, rand, group.clusters),
                                      {"empty": "first" if per_unit else "repeat"})
            picks = [g.call_function(operator.getitem, (members, i)) for i in range(len(group.units))] \
                if per_unit else [members] * len(group.units)
        weight = gamma if group.propagate else 0.0
        for unit, idx in zip(group.units, picks):
            node, key = unit.outputs[0], unit.cache_keys[0]
            out = b.env[node]
            rows = recompute_region(b, unit, lambda src, idx=idx: g.call_function(gather_rows, (src, idx)))
            with g.inserting_before(out):
                res = g.call_function(refresh, (rows, idx, labels, b.coef, weight, *b.factors[key]))
                value = g.call_function(operator.getitem, (res, 0))
                f0 = g.call_function(operator.getitem, (res, 1))
            b.replaced[node].replace_all_uses_with(value)
            b.replaced[node] = value
            b.give(Role.CACHE, key.factor(0), f0)
