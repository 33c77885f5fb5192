"""Export a cached transformer to deployable artifacts (ONNX, TensorRT) with a manifest; see `export`."""

from .api import export
from .manifest import MANIFEST, Artifact, Manifest, read_manifest

__all__ = ["MANIFEST", "Artifact", "Manifest", "export", "read_manifest"]
