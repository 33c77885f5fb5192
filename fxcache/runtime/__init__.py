"""Run time: the per-graph runner, the step rule, lowerings and token choice."""

from .lowering import get_lowering, lowering_names, register_lowering
from .runner import Runner, UncachedRunner
from .step import StepTracker
from .tokens import random_token_indices

__all__ = [
    "Runner", "StepTracker", "UncachedRunner", "get_lowering", "lowering_names", "random_token_indices",
    "register_lowering",
]
