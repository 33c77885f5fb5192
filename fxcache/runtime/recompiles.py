"""Dynamo's recompile limits, for models an fxcache backend serves: the limits reach every thread that calls the
model, and a call Dynamo runs outside fxcache is never a silent step of a request.

Past `torch._dynamo.config.recompile_limit` (8 by default) graphs of one code object, Dynamo runs new input shapes
of it in plain eager, with one log line and no error: the model silently stops caching. Many diffusers
transformers share one wrapped `forward` (peft's `apply_lora_scale`), and `module.compile()` compiles
`nn.Module._call_impl`, shared by every module, so the limit is shared too. Dynamo's settings are per thread (a
`ContextVar`): a limit raised in the main thread does not reach a server's worker threads.

* `Limits` keeps the highest limits seen where the backend compiled a graph, and raises a calling
  thread's limits to them (once per thread and change): the wrapped compiled entry (`outside.py`) does so before
  Dynamo looks a call up, a request when it is entered, and every runner call. A graph
  Dynamo traces again (it does under threads) takes a slot: the limits grow by one for each.
* A handler watches Dynamo's log for the limit line, said once per code object, in the thread whose call is about
  to run in eager: the backend serving the called model warns, and that call's request is marked, so its next
  fxcache call starts over (FULL, no cache from before the gap is read). Later eager calls are silent in Dynamo;
  `outside.py` finds each of them and records it in `stats`.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import sys
import threading
import weakref

import torch

_LOGGER = "torch._dynamo.convert_frame"
_LAST: "dict[str, weakref.ref]" = {}  # code label -> the backend that compiled it most recently
_NAMES = ("recompile_limit", "accumulated_recompile_limit")
_VERSIONS = itertools.count(1)


class Limits:
    """The recompile limits a backend's models run with, in every thread that calls them."""

    def __init__(self):
        self.values: dict[str, int] = {}
        self._version = 0
        self._applied: contextvars.ContextVar = contextvars.ContextVar(f"fxcache_limits_{id(self)}", default=0)
        self._lock = threading.Lock()

    def note(self) -> None:
        """Take the calling thread's limits where they are higher (called where the backend compiles a graph)."""
        config = torch._dynamo.config
        with self._lock:
            for name in _NAMES:
                value = getattr(config, name)
                if isinstance(value, int) and value > self.values.get(name, 0):
                    self.values[name] = value
                    self._version = next(_VERSIONS)

    def require(self, **values: int) -> None:
        """Raise the limits to at least `values` (`fxcache.enable`'s `max_shapes`), for every thread that calls
        the models from now on."""
        with self._lock:
            for name, value in values.items():
                if name not in _NAMES:
                    raise ValueError(f"unknown Dynamo limit {name!r}; known: {', '.join(_NAMES)}")
                if value > self.values.get(name, 0):
                    self.values[name] = value
                    self._version = next(_VERSIONS)

    def grow(self) -> None:
        """Dynamo traced a graph it already had (a duplicate): it takes a slot of the limits, so the limits of
        every thread grow by one, and duplicates never use up the shapes the user sized them for."""
        with self._lock:
            for name in list(self.values):
                self.values[name] += 1
            self._version = next(_VERSIONS)

    def apply(self) -> None:
        """Raise the calling thread's (context's) limits to the noted ones: cheap when already done."""
        version = self._version
        if self._applied.get() == version:
            return
        config = torch._dynamo.config
        for name, value in list(self.values.items()):
            if getattr(config, name) < value:
                setattr(config, name, value)
        self._applied.set(version)


def _called_backend(func: str):
    """The backend serving the model whose call hit the limit: a module call on the stack it serves, else the
    backend that compiled that code object last."""
    from ..analysis.pieces import module_calls
    from .attach import backends_of

    for module, _ in module_calls(sys._getframe(1), depth=None):
        for m in (module, getattr(module, "_orig_mod", None)):
            found = backends_of(m) if isinstance(m, torch.nn.Module) else []
            if found:
                return found[-1]
    ref = _LAST.get(func)
    return ref() if ref is not None else None


class _Watch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not str(record.msg).startswith("torch._dynamo hit config."):
                return
            args = record.args if isinstance(record.args, tuple) else ()
            limit_name = str(args[0]) if args else "recompile_limit"
            limit = args[1] if len(args) > 1 else "?"
            func = str(args[2]) if len(args) > 2 else ""
            backend = _called_backend(func)
            if backend is None:
                return
            backend._warn_once(
                f"fxcache: Dynamo hit torch._dynamo.config.{limit_name} ({limit}) for {func}: new input shapes "
                f"of this model now run in plain eager, uncached. Every input shape (and batch size) is a graph "
                f"of its own, and the diffusers transformers whose forward is wrapped by the same decorator "
                f"share the limit. Raise it before the first call, e.g. "
                f"torch._dynamo.config.recompile_limit = 64 and "
                f"torch._dynamo.config.accumulated_recompile_limit = 512 (fxcache applies the limits set where "
                f"the model was compiled in every thread that calls it).", key="recompile_limit")
            backend.scope.ran_outside(record=False)  # the wrapped entry records it (`outside.py`)
        except Exception:  # never let a log record break the model call
            return


_HANDLER = _Watch(level=logging.WARNING)


def watch(backend, code_label: str) -> None:
    """Warn `backend` when Dynamo gives up on `code_label`, the code object it is compiling now."""
    _LAST[code_label] = weakref.ref(backend)
    logger = logging.getLogger(_LOGGER)
    if _HANDLER not in logger.handlers:  # torch._logging.set_logs() may have cleared it
        logger.addHandler(_HANDLER)
