"""Graph rewrites that turn one Dynamo graph into cache-aware variants, one pass per file (see README.md for the
invariants every pass keeps). Each pass takes the `GraphBuilder` of the variant under construction and what it
works on (units, scored units, token streams), declares the typed inputs it reads and the cache entries it writes
through the builder, and leaves what later passes need (replaced nodes, Taylor factors) on it."""

from .checks import PASSES, PassInvariantError, checks_enabled, graph_pass
from .clusters import cluster_tokens, refresh_clusters
from .expose_units import expose_units
from .final_output import expose_final, read_final
from .graph_builder import GraphBuilder, copy_dynamo_meta
from .propagate_shapes import example_spec, propagate_shapes
from .recompute_subset import recompute_subset
from .residuals import (expose_residual, indicator_signal, keep_reference, probe_outputs, read_residual,
                        residual_signal, take_carried)
from .reuse_units import reuse_units
from .scores import record_scores
from .select_and_recompute import Selection, age_unrefreshed, restart_staleness, select_and_recompute
from .taylor_forecast import forecast_units
from .taylor_update import update_factors

__all__ = [
    "GraphBuilder", "PASSES", "PassInvariantError", "Selection", "age_unrefreshed", "checks_enabled",
    "cluster_tokens", "copy_dynamo_meta", "example_spec", "expose_final", "expose_units", "forecast_units",
    "graph_pass", "propagate_shapes", "expose_residual", "indicator_signal", "keep_reference", "probe_outputs",
    "read_residual", "residual_signal", "take_carried", "read_final", "recompute_subset", "record_scores",
    "refresh_clusters",
    "restart_staleness", "reuse_units", "select_and_recompute", "update_factors",
]
