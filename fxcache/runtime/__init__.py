"""Run time: the per-graph runner, the dispatcher (which variant serves a call), the step rule, the cache store
and token choice. Lowerings live in `fxcache.backends` (re-exported here for compatibility)."""

from ..backends import get_lowering, lowering_names, register_lowering
from .runner import GraphVariants, Runner, UncachedRunner, VariantSource, compiled_runner
from .step import StepTracker
from .tokens import random_token_indices

__all__ = [
    "GraphVariants", "Runner", "StepTracker", "UncachedRunner", "VariantSource", "compiled_runner", "get_lowering",
    "lowering_names", "random_token_indices", "register_lowering",
]
