"""Export a cached transformer to deployable artifacts (ONNX, TensorRT) with a manifest; see `export`."""

from .api import export
from .manifest import MANIFEST, Artifact, Manifest, read_manifest
from .tensorrt import lower_tensorrt, require_tensorrt  # noqa: F401  (registers lowering="tensorrt")

__all__ = ["MANIFEST", "Artifact", "Manifest", "export", "read_manifest", "require_tensorrt"]
