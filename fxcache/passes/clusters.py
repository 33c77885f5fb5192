"""ClusCa in the graph: the residual stream is clustered at FULL steps; at CLUSTER steps one member per cluster
of each refreshed unit is recomputed and the unit's forecast is refreshed from it."""

from __future__ import annotations

import operator

import torch

from ..analysis.clusters import ClusterGroup
from ..graph_io import Key, Role, Slot
from ..ops.kmeans import clusca_refresh, cluster_members, kmeans
from ..ops.rows import gather_rows
from .checks import graph_pass
from .graph_builder import GraphBuilder
from .regions import recompute_region


@graph_pass
def cluster_tokens(b: GraphBuilder, groups: dict[int, ClusterGroup], iters: int) -> None:
    """FULL: k-means of each group's feature (B, N, D), warm-started from the branch's centroids when it has
    them (`warm`), else from drawn tokens; labels and centroids are written."""
    warm = b.take(Role.WARM, Key.scalar(Slot.WARM), (1,), torch.float32)
    for tokens, group in groups.items():
        prev = b.take(Role.CACHE, Key.stream(Slot.CENTROIDS, tokens), group.centroids_shape, torch.float32)
        init = b.take(Role.PERMUTATION, Key.stream(Slot.KMEANS_INIT, tokens), (group.clusters,), torch.int64)
        res = b.graph.call_function(kmeans, (b.env[group.feature], prev, init, warm, iters))  # after the blocks
        b.give(Role.CACHE, Key.stream(Slot.LABELS, tokens), b.graph.call_function(operator.getitem, (res, 0)))
        b.give(Role.CACHE, Key.stream(Slot.CENTROIDS, tokens), b.graph.call_function(operator.getitem, (res, 1)))


@graph_pass
def refresh_clusters(b: GraphBuilder, groups: dict[int, ClusterGroup], gamma: float) -> None:
    """CLUSTER (after `forecast_units`): per group, one member per cluster and batch row is drawn; each refreshed
    unit is recomputed on those rows, its output and F_0 re-anchored to them, the largest stream propagated with
    weight gamma. Writes each refreshed unit's new F_0."""
    g = b.graph
    for tokens, group in groups.items():
        labels = b.take(Role.CACHE, Key.stream(Slot.LABELS, tokens), group.labels_shape, torch.int64)
        rand = b.take(Role.UNIFORM, Key.stream(Slot.MEMBER_DRAW, tokens), (1, tokens), torch.float32)
        with b.inserting_after_placeholders():
            members = g.call_function(cluster_members, (labels, rand, group.clusters))
        weight = gamma if group.propagate else 0.0
        for unit in group.units:
            node, key = unit.outputs[0], unit.cache_keys[0]
            out = b.env[node]
            rows = recompute_region(b, unit, lambda src: g.call_function(gather_rows, (src, members)))
            with g.inserting_before(out):
                res = g.call_function(clusca_refresh, (rows, members, labels, b.coef, weight, *b.factors[key]))
                value = g.call_function(operator.getitem, (res, 0))
                f0 = g.call_function(operator.getitem, (res, 1))
            b.replaced[node].replace_all_uses_with(value)
            b.replaced[node] = value
            b.give(Role.CACHE, key.factor(0), f0)
