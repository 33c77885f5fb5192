"""fxcache: training-free feature caching for diffusion transformers, as a torch.compile backend.

    model = torch.compile(transformer, backend=fxcache.cache_backend("duca"), dynamic=False)
"""

from . import methods as _methods  # noqa: F401  (registers the methods)
from .api import CacheBackend, Explanation, FxCacheWarning, cache_backend, explain, reset, stats, step
from .config import CacheConfig, StepKind, get_method, method_names, register_method
from .errors import ConfigError, ExportError, FxCacheError, MissingDependencyError, UnsupportedGraphError
from .export import export
from .methods import ClusCaConfig, DuCaConfig, FORAConfig, TaylorSeerConfig, ToCaConfig
from .runtime import lowering_names, register_lowering

__version__ = "0.1.0"

__all__ = [
    "CacheBackend", "CacheConfig", "ClusCaConfig", "ConfigError", "DuCaConfig", "ExportError", "Explanation", "FORAConfig",
    "FxCacheError", "FxCacheWarning", "MissingDependencyError", "StepKind", "TaylorSeerConfig", "ToCaConfig", "UnsupportedGraphError",
    "cache_backend", "explain", "export", "get_method", "lowering_names", "method_names", "register_lowering",
    "register_method", "reset", "stats", "step",
]
