"""Run exported cached transformers (ONNX / TensorRT) with the compiled runner's schedule logic."""

from .session import CachedSession

__all__ = ["CachedSession"]
