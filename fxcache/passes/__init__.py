"""Graph rewrites that turn one Dynamo graph into cache-aware variants (see README.md for invariants)."""

from .expose_unit_outputs import expose_unit_outputs
from .graph_builder import GraphBuilder, copy_dynamo_meta
from .propagate_shapes import example_spec, propagate_shapes
from .read_units_from_cache import read_units_from_cache
from .recompute_token_subset import recompute_token_subset

__all__ = [
    "GraphBuilder", "copy_dynamo_meta", "example_spec", "expose_unit_outputs", "propagate_shapes",
    "read_units_from_cache", "recompute_token_subset",
]
