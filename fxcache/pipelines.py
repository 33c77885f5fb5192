"""`fxcache.enable(pipe, "duca")`: cache a diffusers pipeline's transformer(s) in one call; `fxcache.disable(pipe)`.

Each transformer component (`transformer`, and `transformer_2` of two-expert pipelines such as Wan 2.2) gets a
backend of its own, compiled with `dynamic=False`. Every call of the pipeline is one fxcache request, from its
first step to its return or its exception, so nothing of one call is ever read by the next. The branch names the
pipeline gives its `cache_context`s set the number of CFG branches a request keeps caches for.

Nothing quietly runs uncached: a pipeline sharing an enabled pipeline's transformer gets the compiled one
(`shared.py`), Dynamo's recompile limits are raised to `max_shapes` (past them new shapes would run in eager), and
a call whose step count is not the one the schedule is written for says so before its first step.
"""

from __future__ import annotations

import collections
import difflib
import functools
import inspect
import logging
import re

import torch

from . import shared
from .api import CacheBackend, cache_backend
from .config import CacheConfig, config_path, load_config
from .errors import ConfigError
from .runtime.attach import attach, detach
from .runtime.requests import Request
from .runtime.step_count import check_steps

log = logging.getLogger("fxcache")
DEFAULT_MAX_SHAPES = 64
_LIMITS = ("recompile_limit", "accumulated_recompile_limit")

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


def enable(pipe, method_or_config: str | CacheConfig | None = None, *, components: tuple[str, ...] | None = None,
           lowering: str | None = None, mode: str | None = None, options: dict | None = None,
           max_branches: int | None = None, max_shapes: int = DEFAULT_MAX_SHAPES,
           **settings) -> CacheBackend | tuple[CacheBackend, ...]:
    """Compile the pipeline's transformer(s) with an fxcache backend each and make every pipeline call a request.

    Args:
        pipe: a diffusers pipeline.
        method_or_config, **settings: as for `fxcache.cache_backend` (method options and backend options);
            the method defaults to "duca". A config file path (a str ending in ".json", or a path object) loads
            the config `fxcache.calibrate(...).save(path)` wrote (`fxcache.load_config`; method options override
            its fields).
        components: the components to cache (default: every `transformer*` component).
        lowering: the backend's lowering (default "inductor"); mode, options: torch.compile's (e.g.
            mode="reduce-overhead" for CUDA graphs, options={...} Inductor settings), passed to the lowering.
        max_branches: CFG branches per request (default: the pipeline's cache-context names, else 3).
        max_shapes: input shapes (resolution x batch size) Dynamo may compile at least, per transformer: its
            recompile limit is raised to it (and the accumulated limit to 8x), in every thread that calls the
            pipeline; a higher limit already set is kept (a minimum, not a cap).
    A pipeline whose transformer another enabled pipeline shares (`from_pipe`, or made from its `components`,
    before or after that pipeline was enabled) gets that compiled transformer: one compile and backend, each
    call a request of its own; settings other than those it was compiled with are refused.
    Returns the backend, or a tuple of backends in component order for two-transformer pipelines.
    """
    _check_pipeline(pipe)
    if "_fxcache" in pipe.__dict__:
        raise ConfigError(f"fxcache is already enabled on this {type(pipe).__name__}; call fxcache.disable(pipe) "
                          "first to change the method or its options")
    names = list(components) if components is not None else transformer_components(pipe)
    if not names:
        raise ConfigError(f"{type(pipe).__name__} has no transformer component (components: "
                          f"{', '.join(getattr(pipe, 'components', {}))}); pass components=(...) naming it")
    _check_compile_options(lowering, mode, options)
    if config_path(method_or_config) is not None:  # a file: the config it holds, as if passed as one
        method_or_config, settings = _load_file(method_or_config, settings)
    if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
        raise ConfigError(f"max_shapes must be an int >= 1 (the input shapes each transformer may compile), "
                          f"got {max_shapes!r}")
    modules = {}
    for name in names:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"pipeline component {name!r} is {type(module).__name__}, not a torch module")
        modules[name] = module
    entry = shared.lookup(pipe, modules)
    if entry is not None:
        explicit = dict(settings, **{k: v for k, v in (("lowering", lowering), ("max_branches", max_branches))
                                      if v is not None})
        shared.check_settings(pipe, entry, modules, method_or_config, explicit, mode=mode, options=options)
        wrappers = {name: entry.wrapper(name) for name in names}
    else:
        entry, wrappers = _compile(pipe, modules, method_or_config, settings, lowering=lowering or "inductor",
                                   mode=mode, options=options, max_branches=max_branches)
    backends = [entry.backends[name] for name in names]
    originals = {name: modules[name] for name in names}  # what the pipeline held: `disable` gives it back
    for name in names:
        if modules[name] is not wrappers[name]:
            setattr(pipe, name, wrappers[name])
    if entry.users:
        entry.shared = True
    entry.users.add(pipe)
    _raise_limits(backends, max_shapes)
    cls = type(pipe)
    pipe.__dict__["_fxcache"] = {"backends": tuple(backends), "originals": originals, "class": cls, "entry": entry,
                                 "requests": collections.deque(maxlen=max(b.scope.records.maxlen for b in backends))}
    pipe.__class__ = _request_subclass(cls)
    return backends[0] if len(backends) == 1 else tuple(backends)


def _compile(pipe, modules: dict, method_or_config, settings: dict, *, lowering: str, mode, options,
             max_branches) -> tuple[shared.Compiled, dict]:
    """A backend per transformer, each compiled with `dynamic=False` and hearing its module's pipeline signals;
    the `Compiled` and the compiled modules (it holds them weakly: the pipelines hold them)."""
    if max_branches is None:
        found = context_names(pipe)
        max_branches = max(len(found), 1) if found else 3
    for name, module in modules.items():
        if shared._is_compiled(module):
            raise ConfigError(f"pipeline component {name!r} is already compiled; pass the plain module (fxcache.enable "
                              "compiles it)")
    method = "duca" if method_or_config is None else method_or_config
    backends = {name: cache_backend(method, lowering=lowering, max_branches=max_branches, **settings)
                for name in modules}
    wrappers = {}
    for name, module in modules.items():
        attach(module, backends[name])  # the pipeline's signals count from the first call
        wrappers[name] = torch.compile(module, backend=backends[name], dynamic=False, mode=mode, options=options)
    entry = shared.Compiled(type(pipe).__name__, backends, wrappers, mode=mode, options=options)
    shared.register(entry, modules)
    return entry, wrappers


def _load_file(path, settings: dict) -> tuple[CacheConfig, dict]:
    """(the config in the file at `path`, with the method options among `settings` applied; the backend
    settings left), so that a pipeline enabled from a file is one enabled with that config."""
    backend_keys = {name for name, p in inspect.signature(cache_backend).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
    method_options = {k: v for k, v in settings.items() if k not in backend_keys}
    return load_config(path, **method_options), {k: v for k, v in settings.items() if k in backend_keys}


def _check_pipeline(pipe) -> None:
    if not isinstance(getattr(pipe, "components", None), dict) or isinstance(pipe, torch.nn.Module):
        hint = ("; for a transformer (or any model) use torch.compile(model, backend=fxcache.cache_backend(...), "
                "dynamic=False)" if isinstance(pipe, torch.nn.Module) else "")
        raise ConfigError(f"fxcache.enable takes a diffusers pipeline (an object with `components`, such as "
                          f"FluxPipeline or a pipeline made with from_pipe), got {_what(pipe)}{hint}")


def _what(value) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _check_compile_options(lowering, mode, options) -> None:
    """torch.compile's `mode` and `options` as torch.compile itself checks them, before anything is compiled."""
    if mode is not None and options is not None:
        raise ConfigError("pass either mode= or options= (torch.compile takes one of them), not both")
    if options is None:
        return
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError(f"options must be a dict of torch.compile options (setting name -> value), got "
                          f"{options!r}")
    if (lowering or "inductor") == "inductor":
        known = torch._inductor.config.get_config_copy()
        for key in options:
            if key.replace("-", "_") not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown Inductor option {key!r} in options={{...}}{hint}: options are "
                                  f"torch.compile's, passed to the Inductor lowering (torch._inductor.list_options() "
                                  f"lists them); method options go as keywords, e.g. enable(pipe, 'duca', "
                                  f"interval=4)")


_SAID: set[str] = set()


def _raise_limits(backends, max_shapes: int) -> None:
    """Dynamo's recompile limits fit for `max_shapes` shapes per transformer, now in this thread and in every
    thread that calls the pipeline (a request applies them before Dynamo looks a call up)."""
    config = torch._dynamo.config
    before = {name: getattr(config, name) for name in _LIMITS}
    for backend in backends:
        backend.scope.limits.require(recompile_limit=max_shapes, accumulated_recompile_limit=8 * max_shapes)
        backend.scope.limits.apply()
    raised = {name: getattr(config, name) for name in _LIMITS if getattr(config, name) > before[name]}
    if raised and "limits" not in _SAID:
        _SAID.add("limits")
        log.warning("fxcache.enable raised %s for the threads that call the pipeline (max_shapes=%d: each input "
                    "shape, resolution x batch size, is a graph of its own, and past the limit Dynamo runs new "
                    "shapes uncached in eager); pass max_shapes= to change it",
                    " and ".join(f"torch._dynamo.config.{n} from {before[n]} to {v}" for n, v in raised.items()),
                    max_shapes)


def disable(pipe) -> None:
    """Undo `enable`: the modules the pipeline held before (the plain transformer also for a pipeline made after
    another's `enable`, which held the compiled one), the pipeline's own class, caches freed. A transformer another
    enabled pipeline still shares stays compiled for it."""
    state = pipe.__dict__.pop("_fxcache", None) if isinstance(getattr(pipe, "__dict__", None), dict) else None
    if state is None:
        raise ConfigError(f"fxcache is not enabled on this {type(pipe).__name__}")
    pipe.__class__ = state["class"]
    entry = state["entry"]
    for name, module in state["originals"].items():
        if entry.ours and module is entry.wrapper(name):  # made after enable: it held enable's compiled module
            module = getattr(module, "_orig_mod", module)
        setattr(pipe, name, module)
    entry.users.discard(pipe)
    if len(entry.users) or not entry.ours:
        return
    shared.unregister(entry)
    for name, backend in entry.backends.items():
        backend.reset()
        wrapper = entry.wrapper(name)
        plain = getattr(wrapper, "_orig_mod", None) if wrapper is not None else state["originals"].get(name)
        if isinstance(plain, torch.nn.Module):
            detach(plain, backend)


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
            check_steps(self, base_call, args, kwargs, state["backends"])
            request = Request(tuple(b.scope for b in state["backends"]))
            state["requests"].append(request.id)
            with request:
                return base_call(self, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "_fxcache_base": cls})
        _SUBCLASSES[cls] = sub
    return sub
