"""Helpers shipped for tests and benchmarks: tiny diffusers models and their inputs."""

from .models import MODEL_NAMES, expected_units, make_inputs, make_model
from .reference import HookedReference

__all__ = ["MODEL_NAMES", "HookedReference", "expected_units", "make_inputs", "make_model"]
