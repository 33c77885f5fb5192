"""cluster_tokens (ClusCa's FULL steps) and refresh_clusters (its CLUSTER steps)."""

import torch

from fxcache.analysis.clusters import cluster_groups
from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, cluster_tokens, forecast_units, refresh_clusters

from pass_helpers import emitted


def test_kmeans_writes_labels_and_centroids(dit):
    gm, plan = dit
    b = GraphBuilder(gm)
    cluster_tokens(b, cluster_groups(plan, 4), 2)
    assert emitted(b) == ["input cache_cluster_warm", "input cache_clustercentroids_16", "input cache_kinit_16",
                          "kmeans", "getitem", "getitem"]
    assert [v.role for v in b.inputs] == [Role.WARM, Role.CACHE, Role.PERMUTATION]
    assert [k.name for _, k in b.written] == ["clusterlabels:16", "clustercentroids:16"]


def test_one_member_per_cluster_refreshes_each_unit(dit):
    gm, plan = dit
    groups = cluster_groups(plan, 4)
    b = GraphBuilder(gm)
    forecast_units(b, plan.units, 1)
    before = set(b.graph.nodes)
    refresh_clusters(b, groups, 0.005)
    ops = emitted(b, since=before)
    assert ops[:3] == ["input cache_clusterlabels_16", "input cache_rand_16", "cluster_members"]
    assert ops.count("gather_rows") == ops.count("clusca_refresh") == 2  # one per refreshed ff unit
    assert [k.name for _, k in b.written] == ["taylor0:transformer_blocks.0.ff:0", "taylor0:transformer_blocks.1.ff:0"]


def test_the_authors_kmeans_draws_its_start_per_row(dit):
    gm, plan = dit
    groups = cluster_groups(plan, 4)
    b = GraphBuilder(gm)
    cluster_tokens(b, groups, 2, "ref")
    assert emitted(b) == ["input cache_cluster_warm", "input cache_clustercentroids_16", "input cache_kinit_16",
                          "kmeans_ref", "getitem", "getitem"]
    assert [v.role for v in b.inputs] == [Role.WARM, Role.CACHE, Role.UNIFORM]
    batch = groups[16].labels_shape[0]
    assert b.inputs[2].shape == (batch, 4) and b.inputs[2].dtype == torch.float32  # (B, K) uniforms


def test_per_unit_draws_give_each_unit_its_members(dit):
    gm, plan = dit
    groups = cluster_groups(plan, 4)
    b = GraphBuilder(gm)
    forecast_units(b, plan.units, 1)
    before = set(b.graph.nodes)
    refresh_clusters(b, groups, 0.0, "ref", "per_unit")
    ops = emitted(b, since=before)
    units = len(groups[16].units)
    assert ops[:3 + units] == ["input cache_clusterlabels_16", "input cache_rand_16", "cluster_members"] + \
        ["getitem"] * units
    rand = next(v for v in b.inputs if v.role is Role.UNIFORM)
    assert rand.shape == (units, groups[16].labels_shape[0], 16)
    assert ops.count("clusca_refresh_ref") == units and "clusca_refresh" not in ops
    members = next(n for n in b.graph.nodes if n.op == "call_function" and n.target.__name__ == "cluster_members")
    refreshes = [n for n in b.graph.nodes if n.op == "call_function" and n.target.__name__ == "clusca_refresh_ref"]
    picks = [n.args[1] for n in refreshes]  # each unit reads its own row of the members
    assert [p.args for p in picks] == [(members, i) for i in range(units)]
