"""Backends: how a variant graph becomes something that runs. Each backend module has the same small interface:

    lower(gm, example_inputs, *, mode=None, options=None) -> callable     every backend (torch.compile's lowering)
    check()                                                             optional: raise now what `lower` would lack
    FORMAT                                                              artifact formats only (onnx, tensorrt):
        .suffix, .write(gm, inputs, in_specs, out_specs, stem, name) -> file name,
        .executor(path, in_specs, out_specs, providers) -> callable, .run(path, inputs, in_specs, out_specs)

Built in: "eager" (the rewritten graph as Python, the bit-exact reference), "inductor" (torch.compile's default),
"onnx" (onnxruntime) and "tensorrt" (torch-tensorrt). Modules are imported on first use, so optional
dependencies load only when asked for; `register_lowering` adds more. A leaf of the package: backends import
nothing of fxcache but its errors and dtype names.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

from ..errors import ConfigError, MissingDependencyError

Lowering = Callable[..., Callable]
_BUILTIN = ("eager", "inductor", "onnx", "tensorrt")
_REGISTERED: dict[str, Lowering] = {}


def register_lowering(name: str):
    """Decorator: `fn(gm, example_inputs, *, mode=None, options=None) -> callable` as `lowering=name`."""

    def deco(fn: Lowering) -> Lowering:
        if name in _BUILTIN or name in _REGISTERED:
            owner = _REGISTERED[name].__module__ if name in _REGISTERED else __name__
            raise ConfigError(f"lowering {name!r} is already registered by {owner}")
        _REGISTERED[name] = fn
        return fn

    return deco


def lowering_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def backend_module(name: str):
    """The module of a built-in backend."""
    return importlib.import_module(f"{__name__}.{name}")


def get_lowering(name: str) -> Lowering:
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    if not isinstance(name, str) or name not in _BUILTIN:
        close = difflib.get_close_matches(str(name), lowering_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown lowering {name!r}{hint} Registered: {', '.join(lowering_names())}")
    return backend_module(name).lower


def check_lowering(name: str) -> None:
    """Fail now (at `cache_backend()`) for an unknown lowering or one whose dependencies are missing."""
    get_lowering(name)
    if name in _BUILTIN:
        check = getattr(backend_module(name), "check", None)
        if check is not None:
            check()


def get_format(name: str):
    """The artifact format of an exporting backend ("onnx" or "tensorrt")."""
    if name not in ("onnx", "tensorrt"):
        raise ConfigError(f"format must be one of onnx, tensorrt, got {name!r}")
    return backend_module(name).FORMAT


def require(module: str, install: str, why: str):
    """Import an optional dependency or raise MissingDependencyError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{why} needs the `{module}` package: {install}") from None
