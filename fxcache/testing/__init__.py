"""Helpers shipped for tests and benchmarks: tiny diffusers models and their inputs."""

from .models import MODEL_NAMES, make_inputs, make_model

__all__ = ["MODEL_NAMES", "make_inputs", "make_model"]
