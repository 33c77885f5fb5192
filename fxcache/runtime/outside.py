"""Calls of a compiled model that no fxcache runner served: Dynamo ran them in plain eager.

Past its recompile limit Dynamo runs a call whose shape it has no graph for in eager; after the first such call it
says nothing more (the code object runs only its cached graphs from then on). A forced eager stance or
`torch.compiler.disable` around the model does the same. Such a call is a step of some request
that fxcache never saw, so that request's caches fall a step behind. The compiled entry of a model a backend serves
(an `OptimizedModule`'s `forward`, or the `_compiled_call_impl` of a module compiled in place) is wrapped: a call
during which no runner ran is reported to the backend (`RequestScope.ran_outside`), which records it and makes the
request start over at its next call. The wrapper runs outside Dynamo (it calls the compiled entry), so it costs no
graph break and no recompile; before the call, it gives the calling thread the recompile limits the model's
graphs were compiled under (`recompiles.Limits`).
"""

from __future__ import annotations

import contextvars
import functools
import sys
import weakref

import torch

#: calls of fxcache runners in this context so far (a model call that leaves it unchanged ran outside fxcache)
_SERVED: contextvars.ContextVar[int] = contextvars.ContextVar("fxcache_served", default=0)


def served() -> None:
    """A runner serves a graph call now."""
    _SERVED.set(_SERVED.get() + 1)


def _entry_of(module: torch.nn.Module):
    """(owner, attribute) of the compiled entry whose call runs `module`'s traced frame: the innermost
    `OptimizedModule` on the stack that wraps `module` (or a module holding it), or a module compiled in place."""
    from ..analysis.pieces import module_calls

    for outer, _ in module_calls(sys._getframe(2), depth=None):
        inner = getattr(outer, "_orig_mod", None)
        if isinstance(outer, torch._dynamo.eval_frame.OptimizedModule) and isinstance(inner, torch.nn.Module) \
                and (inner is module or any(m is module for m in inner.modules())):
            return outer, "forward"
        if outer.__dict__.get("_compiled_call_impl") is not None and (
                outer is module or any(m is module for m in outer.modules())):
            return outer, "_compiled_call_impl"
    return None


def watch_calls(module: torch.nn.Module | None, backend) -> None:
    """Wrap the compiled entry of `module` (the module Dynamo is tracing now) once, for `backend`."""
    if module is None:
        return
    found = _entry_of(module)
    if found is None:
        return
    owner, attr = found
    current = owner.__dict__.get(attr)
    if current is None:
        return
    watchers = getattr(current, "_fxcache_watchers", None)
    if watchers is not None:
        if not any(ref() is backend for ref in watchers):
            watchers.append(weakref.ref(backend))
        return
    watchers = [weakref.ref(backend)]

    @functools.wraps(current)
    def entry(*args, **kwargs):
        for ref in watchers:  # before Dynamo looks the call up: this thread gets the limits the model needs
            watching = ref()
            if watching is not None:
                watching.scope.limits.apply()
        before = _SERVED.get()
        out = current(*args, **kwargs)
        if _SERVED.get() == before:  # no runner ran: Dynamo ran the call in eager
            for ref in watchers:
                watching = ref()
                if watching is not None:
                    watching.scope.ran_outside()
        return out

    entry._fxcache_watchers = watchers
    owner.__dict__[attr] = entry
