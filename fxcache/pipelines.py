"""`fxcache.enable(pipe, "duca")`: cache a diffusers pipeline's transformer(s) in one call; `fxcache.disable(pipe)`.

Each transformer component (`transformer`, and `transformer_2` of two-expert pipelines such as Wan 2.2) gets a
backend of its own, compiled with `dynamic=False`. Every call of the pipeline is one fxcache request, from its
first step to its return or its exception, so nothing of one call is ever read by the next. The branch names the
pipeline gives its `cache_context`s set the number of CFG branches a request keeps caches for.
"""

from __future__ import annotations

import functools
import inspect
import re

import torch

from .api import CacheBackend, cache_backend
from .config import CacheConfig
from .errors import ConfigError
from .runtime.attach import attach, detach
from .runtime.requests import Request

_CONTEXT_NAMES = re.compile(r"""cache_context\(\s*(?:name\s*=\s*)?["']([^"']+)["']""")
_SUBCLASSES: dict[type, type] = {}


def transformer_components(pipe) -> list[str]:
    """Names of the pipeline's transformer components, in order (`transformer`, `transformer_2`, ...)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise ConfigError(f"{type(pipe).__name__} is not a diffusers pipeline (it has no `components`); compile the "
                          "transformer with torch.compile(model, backend=fxcache.cache_backend(...)) instead")
    return [name for name, c in components.items()
            if name.startswith("transformer") and isinstance(c, torch.nn.Module)]


def context_names(pipe) -> list[str]:
    """The `cache_context` names the pipeline's `__call__` uses ("cond", "uncond", ...), read from its source."""
    try:
        source = inspect.getsource(type(pipe).__call__)
    except (OSError, TypeError):
        return []
    return sorted(set(_CONTEXT_NAMES.findall(source)))


def enable(pipe, method_or_config: str | CacheConfig = "duca", *, components: tuple[str, ...] | None = None,
           lowering: str = "inductor", mode: str | None = None, max_branches: int | None = None,
           **options) -> CacheBackend | tuple[CacheBackend, ...]:
    """Compile the pipeline's transformer(s) with an fxcache backend each and make every pipeline call a request.

    Args:
        pipe: a diffusers pipeline.
        method_or_config, **options: as for `fxcache.cache_backend` (method options and backend options).
        components: the components to cache (default: every `transformer*` component).
        lowering, mode: the backend's lowering and torch.compile's mode (e.g. "reduce-overhead" for CUDA graphs).
        max_branches: CFG branches per request (default: the pipeline's cache-context names, else 3).
    Returns the backend, or a tuple of backends in component order for two-transformer pipelines.
    """
    if "_fxcache" in pipe.__dict__:
        raise ConfigError(f"fxcache is already enabled on this {type(pipe).__name__}; call fxcache.disable(pipe) "
                          "first to change the method or its options")
    names = list(components) if components is not None else transformer_components(pipe)
    if not names:
        raise ConfigError(f"{type(pipe).__name__} has no transformer component (components: "
                          f"{', '.join(getattr(pipe, 'components', {}))}); pass components=(...) naming it")
    if max_branches is None:
        found = context_names(pipe)
        max_branches = max(len(found), 1) if found else 3
    originals, backends, shared = {}, [], _shared_backends(pipe, names, method_or_config, options)
    for name in names:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"pipeline component {name!r} is {type(module).__name__}, not a torch module")
        if shared:
            backends.append(shared[name])
            originals[name] = module
            continue
        if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or "_compiled_call_impl" in module.__dict__ \
                and module.__dict__["_compiled_call_impl"] is not None:
            raise ConfigError(f"pipeline component {name!r} is already compiled; pass the plain module (fxcache.enable "
                              "compiles it)")
        backends.append(cache_backend(method_or_config, lowering=lowering, max_branches=max_branches, **options))
        originals[name] = module
    if not shared:
        for name, backend in zip(names, backends):
            module = originals[name]
            attach(module, backend)  # the pipeline's signals count from the first call
            setattr(pipe, name, torch.compile(module, backend=backend, dynamic=False, mode=mode))
    cls = type(pipe)
    pipe.__dict__["_fxcache"] = {"backends": tuple(backends), "originals": originals, "class": cls,
                                 "shared": bool(shared)}
    pipe.__class__ = _request_subclass(cls)
    return backends[0] if len(backends) == 1 else tuple(backends)


def _shared_backends(pipe, names, method_or_config, options) -> dict:
    """{component: backend} when the components are already compiled with fxcache backends (a pipeline made with
    `from_pipe` from an enabled one shares its compiled transformer): `enable` then only adds request boundaries.
    Empty when none is; an error when only some are, or the method asked for is not theirs."""
    from .api import _find_backend

    found = {}
    for name in names:
        try:
            found[name] = _find_backend(getattr(pipe, name, None))
        except ConfigError:
            pass
    if not found:
        return {}
    if len(found) != len(names) or not all(isinstance(b, CacheBackend) for b in found.values()):
        raise ConfigError(f"only some of {names} are compiled with fxcache; pass a pipeline with plain transformers")
    configs = [b.config for b in found.values()]
    wanted = method_or_config if isinstance(method_or_config, CacheConfig) else None
    if options or (wanted is not None and wanted not in configs) or (
            wanted is None and any(c.method != method_or_config for c in configs)):
        raise ConfigError(f"the transformer of this {type(pipe).__name__} is already compiled with fxcache "
                          f"({', '.join(sorted(c.method for c in configs))}), shared with another pipeline "
                          "(from_pipe); call fxcache.enable(pipe) without other options to add request boundaries, "
                          "or fxcache.disable() the pipeline it came from to change the method")
    return found


def disable(pipe) -> None:
    """Undo `enable`: the original transformer modules, the pipeline's own class, caches freed. A pipeline that
    shares another's compiled transformer (`from_pipe`) keeps it; only its request boundaries go."""
    state = pipe.__dict__.pop("_fxcache", None)
    if state is None:
        raise ConfigError(f"fxcache is not enabled on this {type(pipe).__name__}")
    pipe.__class__ = state["class"]
    if state.get("shared"):
        return
    for (name, module), backend in zip(state["originals"].items(), state["backends"]):
        backend.reset()
        detach(module, backend)
        setattr(pipe, name, module)


def backends(pipe) -> tuple[CacheBackend, ...]:
    state = pipe.__dict__.get("_fxcache")
    return state["backends"] if state else ()


def _request_subclass(cls: type) -> type:
    """`cls` whose `__call__` runs inside one fxcache request (same name, so the pipeline's config is unchanged)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        base_call = cls.__call__

        @functools.wraps(base_call)
        def __call__(self, *args, **kwargs):
            state = self.__dict__.get("_fxcache")
            if state is None:
                return base_call(self, *args, **kwargs)
            with Request(tuple(b.scope for b in state["backends"])):
                return base_call(self, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_fxcache_base": cls})
        _SUBCLASSES[cls] = sub
    return sub
