"""Graph rewrites that turn one Dynamo graph into cache-aware variants (see README.md for invariants)."""

from .clusters import add_cluster_refresh, add_kmeans, cluster_members, clusca_refresh, kmeans
from .expose_unit_outputs import expose_unit_outputs
from .graph_builder import GraphBuilder, copy_dynamo_meta
from .propagate_shapes import example_spec, propagate_shapes
from .read_units_from_cache import read_units_from_cache, safe_name
from .recompute_token_subset import recompute_token_subset
from .taylor import factor_key, forecast_from_factors, update_taylor_factors

__all__ = [
    "add_cluster_refresh", "add_kmeans", "cluster_members", "clusca_refresh", "kmeans",
    "GraphBuilder", "copy_dynamo_meta", "example_spec", "expose_unit_outputs", "propagate_shapes",
    "factor_key", "forecast_from_factors", "read_units_from_cache", "recompute_token_subset", "safe_name",
    "update_taylor_factors",
]
