"""Helpers shipped for tests and benchmarks: tiny diffusers models and their inputs."""

from .check import CheckReport, check_model
from .models import MODEL_NAMES, expected_units, make_inputs, make_model
from .reference import HookedReference

__all__ = ["CheckReport", "MODEL_NAMES", "HookedReference", "check_model", "expected_units", "make_inputs",
           "make_model"]
