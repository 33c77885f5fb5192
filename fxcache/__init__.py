"""fxcache: training-free feature caching for diffusion transformers, as a torch.compile backend.

    fxcache.enable(pipe, "duca")                                                    # a diffusers pipeline
    model = torch.compile(transformer, backend=fxcache.cache_backend("duca"), dynamic=False)   # any loop
"""

from . import methods as _methods  # noqa: F401  (registers the methods)
from .api import (CacheBackend, Explanation, FxCacheWarning, cache_backend, cache_bytes, explain, request, reset, stats,
                  step)
from .config import CacheConfig, StepKind, get_method, load_config, method_names, register_method
from .errors import (ConfigError, ExportError, FxCacheError, MissingDependencyError, UnknownOptionError,
                     UnsupportedGraphError)
from . import deploy  # noqa: F401  (fxcache.deploy.CachedSession after `import fxcache`)
from .export import export
from .methods import (ClusCaConfig, DBCacheConfig, DuCaConfig, FBCacheConfig, FORAConfig, MagCacheConfig,
                      TaylorSeerConfig, TeaCacheConfig, ToCaConfig)
from .pipelines import disable, enable
from .runtime import lowering_names, register_lowering
from .runtime.requests import Request

from .version import __version__  # noqa: F401

__all__ = [
    "CacheBackend", "CacheConfig", "ClusCaConfig", "ConfigError", "DBCacheConfig", "DuCaConfig", "ExportError",
    "Explanation", "FBCacheConfig", "FORAConfig", "MagCacheConfig",
    "FxCacheError", "FxCacheWarning", "MissingDependencyError", "Request", "StepKind", "TaylorSeerConfig",
    "TeaCacheConfig",
    "ToCaConfig",
    "UnknownOptionError", "UnsupportedGraphError", "cache_backend", "cache_bytes", "disable", "enable", "explain",
    "export", "get_method", "load_config", "lowering_names", "method_names", "register_lowering", "register_method",
    "request", "reset", "stats", "step", "calibrate", "Calibration", "magcache_ratios", "teacache_coefficients",
]

#: found in `fxcache.quality.calibration` on first use: it samples pipelines and measures images (torchmetrics,
#: numpy), which `import fxcache` alone does not need
_CALIBRATION = ("calibrate", "Calibration", "magcache_ratios", "teacache_coefficients")


def __getattr__(name: str):
    if name in _CALIBRATION:
        from .quality import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module 'fxcache' has no attribute {name!r}")
