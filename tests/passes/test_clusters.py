"""cluster_tokens (ClusCa's FULL steps) and refresh_clusters (its CLUSTER steps)."""

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
