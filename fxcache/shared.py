"""Transformers that several pipelines share: what `fxcache.enable` compiled, found again from any pipeline.

diffusers pipelines share modules freely (`FluxImg2ImgPipeline.from_pipe(pipe)`,
`FluxImg2ImgPipeline(**pipe.components)`), before or after `enable` compiled them. A pipeline made after holds
the compiled transformer; one made before holds the plain module, which would run uncached. So `enable` keeps,
for every plain module it compiled, the compiled module and backend (a `Compiled`), and enabling another pipeline
that holds either gives that pipeline the compiled module: one compile, one backend, and each pipeline call a
request with caches of its own. Settings other than those it was compiled with are refused, saying why.
"""

from __future__ import annotations

import weakref

import torch

from .errors import ConfigError

#: enable's backend keywords, and how to read each off a backend (compared when a shared transformer is enabled)
_BACKEND_SETTINGS = {
    "strict": lambda b: b.strict, "block_lists": lambda b: tuple(b.block_lists),
    "timestep_input": lambda b: b.timestep_input, "inplace": lambda b: b.inplace,
    "keep_caches": lambda b: b.scope.keep_caches, "time_direction": lambda b: b.scope.time_direction,
    "max_branches": lambda b: b.scope.max_branches, "lowering": lambda b: b.lowering,
}


class Compiled:
    """The transformer(s) of one `enable`: per component its compiled module (held weakly: the pipelines hold it)
    and backend, how it was compiled, and the pipelines enabled on it (`users`)."""

    def __init__(self, owner: str, backends: dict, wrappers: dict, *, mode=None, options=None, ours: bool = True):
        self.owner = owner  # the class name of the pipeline it was compiled for ("" when compiled by the user)
        self.backends = dict(backends)
        self._wrappers = {name: weakref.ref(w) for name, w in wrappers.items()}
        self.mode, self.options = mode, options
        self.ours = ours  # compiled by `enable` (which undoes it when its last pipeline is disabled)
        self.users: "weakref.WeakSet" = weakref.WeakSet()
        self.shared = False  # more than one pipeline was enabled on it: their stats are told apart

    def wrapper(self, name: str):
        return self._wrappers[name]()

    def alive(self) -> bool:
        return all(ref() is not None for ref in self._wrappers.values())


#: a plain module enable compiled, or the compiled module it made (or a user's fxcache-compiled one) -> Compiled
_REGISTRY: "weakref.WeakKeyDictionary[torch.nn.Module, Compiled]" = weakref.WeakKeyDictionary()


def register(entry: Compiled, plain: dict) -> None:
    """Find `entry` again from its compiled modules and from the `plain` modules it compiled ({name: module})."""
    for name in entry.backends:
        _REGISTRY[entry.wrapper(name)] = entry
    for module in plain.values():
        _REGISTRY[module] = entry


def unregister(entry: Compiled) -> None:
    for module in [m for m, e in list(_REGISTRY.items()) if e is entry]:
        _REGISTRY.pop(module, None)


def lookup(pipe, modules: dict) -> Compiled | None:
    """The `Compiled` the pipeline's transformer modules belong to: None when they are plain and fxcache never
    compiled them; an error when only some do, or they come from different `enable` calls."""
    from .api import _find_backend
    from .runtime.attach import backends_of, detach

    found = {}
    for name, module in modules.items():
        entry = _REGISTRY.get(module)
        if entry is not None and entry.alive():
            if name not in entry.backends:
                raise ConfigError(
                    f"{type(pipe).__name__}.{name} is the transformer an enabled {entry.owner or 'pipeline'} holds "
                    f"as {', '.join(entry.backends)}: enable a pipeline that holds it under the same name")
            found[name] = entry
            continue
        if entry is not None:  # its compiled module is gone (no pipeline holds it): this module is plain again
            _REGISTRY.pop(module, None)
            for backend in entry.backends.values():
                detach(module, backend)
        if _is_compiled(module):
            try:
                backend = _find_backend(module)
            except ConfigError:
                continue  # compiled with another backend: `enable` refuses it
            found[name] = Compiled("", {name: backend}, {name: module}, ours=False)
            register(found[name], {})
        elif backends_of(module):
            raise ConfigError(
                f"{type(pipe).__name__}.{name} is a plain module that a model compiled with an fxcache backend "
                f"wraps (torch.compile(..., backend=fxcache.cache_backend(...))): give the pipeline that compiled "
                f"module (pipe.{name} = compiled), or fxcache.enable the pipeline that holds it")
    if not found:
        return None
    entries = {id(e) for e in found.values()}
    if len(found) != len(modules) or (len(entries) > 1 and any(e.ours for e in found.values())):
        raise ConfigError(
            f"of {type(pipe).__name__}'s components {list(modules)}, only {sorted(found)} are compiled with fxcache "
            f"(or they come from different fxcache.enable calls); pass a pipeline whose transformers are all plain, "
            f"or all from one enabled pipeline")
    if len(entries) == 1:
        return next(iter(found.values()))
    # the user compiled each transformer with an fxcache backend: one entry for them all
    merged = Compiled("", {n: e.backends[n] for n, e in found.items()},
                      {n: e.wrapper(n) for n, e in found.items()}, ours=False)
    register(merged, {})
    return merged


def check_settings(pipe, entry: Compiled, modules: dict, method_or_config, settings: dict, *, mode, options) -> None:
    """Enabling a pipeline on a shared transformer adds request boundaries only: settings that differ from those
    it was compiled with are refused, with the way out."""
    from .api import cache_backend
    from .config import CacheConfig

    backend = next(iter(entry.backends.values()))
    config = backend.config
    method_settings = {k: v for k, v in settings.items() if k not in _BACKEND_SETTINGS}
    differ = []
    if isinstance(method_or_config, CacheConfig):
        if method_or_config != config:
            differ.append(repr(method_or_config))
    elif method_or_config is not None or method_settings:
        if not isinstance(method_or_config, (str, type(None))):
            cache_backend(method_or_config)  # the usual error for a value of the wrong type
        name = config.method if method_or_config is None else method_or_config
        if method_settings:
            wanted = cache_backend(name, **method_settings).config
            if wanted != config:
                differ.append(repr(wanted))
        elif name != config.method:
            differ.append(repr(name))
    for key, value in settings.items():
        if key in _BACKEND_SETTINGS and _BACKEND_SETTINGS[key](backend) != value:
            differ.append(f"{key}={value!r}")
    if entry.ours:
        for key, value, had in (("mode", mode, entry.mode), ("options", options, entry.options)):
            if value is not None and value != had:
                differ.append(f"{key}={value!r}")
    if not differ:
        return
    names = list(modules)
    what = names[0] if len(names) == 1 else " and ".join(names)
    cls = type(pipe).__name__
    held = modules[names[0]]
    plain = f"pipe.{names[0]} = pipe.{names[0]}._orig_mod"
    if not entry.ours:
        how = f"is already compiled with an fxcache backend ({config!r})"
        out = f"or give the pipeline the plain module ({plain}) to compile it with {', '.join(differ)}"
    elif held is entry.wrapper(names[0]):
        how = (f"is the one fxcache.enable compiled for a {entry.owner} with {config!r} (this pipeline shares it: "
               f"made with from_pipe, or from that pipeline's components, after that call)")
        out = (f"or fxcache.disable every pipeline enabled on it and give this one the plain module ({plain}) to "
               f"compile it with {', '.join(differ)}")
    else:
        how = (f"is the module fxcache.enable compiled for a {entry.owner} with {config!r} (this pipeline was made "
               f"from that pipeline's components before that call)")
        out = f"or fxcache.disable every pipeline enabled on it first to compile it with {', '.join(differ)}"
    raise ConfigError(f"{cls}.{what} {how}: fxcache.enable(pipe) with no other settings shares it (one compiled "
                      f"transformer, each pipeline call a request with caches of its own), {out}")


def _is_compiled(module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or (
        isinstance(module, torch.nn.Module) and module.__dict__.get("_compiled_call_impl") is not None)
