"""Hear what a diffusers pipeline tells its transformer: where a request ends, and which CFG branch a call is.

diffusers pipelines call `transformer._reset_stateful_cache()` at the end of every `__call__`
(`maybe_free_model_hooks`) and wrap each transformer call in `transformer.cache_context("cond" / "uncond")`.
An attached module gets instance-level wrappers of both (the originals still run): the first ends the caller's
request in every backend serving the module, the second names the branch of the calls inside it. Dynamo does not
trace either (the forward never reads them), so attaching never recompiles.

A backend finds its module when Dynamo compiles it (the frame being traced) and, for a module that reuses a
graph compiled for another one of its class, on its first call (the calling frame).

A pipeline call also shows where it *starts*, even when it is not wrapped (`fxcache.enable`) and its previous call
ended in an exception or an interrupt (no end-of-call reset then): its own `__call__` frame on the stack.
`pipeline_call_mark()` finds it; an implicit request keeps the frame it serves (a live frame's identity is never
reused) until it ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import weakref

import torch

#: the `cache_context` name (and its keyword fields) of the current call, set by an attached module's wrapper
CONTEXT_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("fxcache_cache_context", default=None)
_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
_WRAPPED = ("_reset_stateful_cache", "cache_context")
_MISSING = object()


def attach(module: torch.nn.Module, backend) -> None:
    """Let `backend` hear `module`'s request-boundary signals (idempotent)."""
    if not isinstance(module, torch.nn.Module):
        return
    backends = _ATTACHED.get(module)
    if backends is None:
        backends = _ATTACHED[module] = []
        _install(module)
    if not any(b is backend for b in backends):
        backends.append(backend)


def detach(module: torch.nn.Module, backend=None) -> None:
    """Stop `backend` (every backend when None) hearing `module`; the wrappers go with the last one."""
    backends = _ATTACHED.get(module)
    if backends is None:
        return
    backends[:] = [b for b in backends if backend is not None and b is not backend]
    if not backends:
        del _ATTACHED[module]
        originals = module.__dict__.pop("_fxcache_originals", {})
        for name in _WRAPPED:
            module.__dict__.pop(name, None)
            if originals.get(name, _MISSING) is not _MISSING:
                module.__dict__[name] = originals[name]


def backends_of(module) -> list:
    return list(_ATTACHED.get(module, ()))


def _install(module: torch.nn.Module) -> None:
    module.__dict__["_fxcache_originals"] = {name: module.__dict__.get(name, _MISSING) for name in _WRAPPED}
    ref = weakref.ref(module)
    reset = getattr(module, "_reset_stateful_cache", None)
    context = getattr(module, "cache_context", None)

    def _reset_stateful_cache(*args, **kwargs):
        """The pipeline call ended (diffusers' `maybe_free_model_hooks`): end the caller's fxcache request."""
        if reset is not None:
            reset(*args, **kwargs)
        mod = ref()
        for backend in backends_of(mod) if mod is not None else ():
            backend.scope.end_current()

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs):
        """diffusers' cache context; fxcache reads its name as the CFG branch of the calls inside."""
        token = CONTEXT_NAME.set(name if isinstance(name, str) else None)
        try:
            if context is not None:
                with context(name, **kwargs):
                    yield
            else:
                yield
        finally:
            CONTEXT_NAME.reset(token)

    module.__dict__["_reset_stateful_cache"] = _reset_stateful_cache
    module.__dict__["cache_context"] = cache_context


def traced_frame():
    """(module, code) of the frame Dynamo is tracing now, or (None, None) outside a Dynamo compile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # not inside Dynamo, or another torch version's internals
        return None, None
    if tx is None:
        return None, None
    module = getattr(tx, "f_locals", {}).get("self")
    return (module if isinstance(module, torch.nn.Module) else None), getattr(tx, "f_code", None)


def calling_module(parameter: torch.Tensor, depth: int = 16):
    """The nn.Module among the calling frames' `self`s that owns `parameter` (the compiled forward's frame)."""
    frame = sys._getframe(1)
    seen = set()
    for _ in range(depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, torch.nn.Module) and id(obj) not in seen:
            seen.add(id(obj))
            if any(p is parameter for p in obj.parameters()) or any(b is parameter for b in obj.buffers()):
                return obj
        frame = frame.f_back
    return None


def code_label(code) -> str:
    """How Dynamo names a code object in its recompile-limit warning."""
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


_PIPELINE_DEPTH = 48  # frames between a transformer call and the pipeline's `__call__` (Dynamo, hooks, wrappers)


def _is_pipeline(obj) -> bool:
    return any(c.__name__ == "DiffusionPipeline" for c in type(obj).__mro__)


def pipeline_call_mark(frame=None):
    """The `__call__` frame of the innermost diffusers pipeline call on the stack, or None: each pipeline call has
    its own, whatever the previous call did (schedulers, shared by `from_pipe` pipelines, are no such mark)."""
    frame = frame or sys._getframe(1)
    for _ in range(_PIPELINE_DEPTH):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "__call__" and code.co_argcount and code.co_varnames[0] == "self":
            obj = frame.f_locals.get("self")
            if obj is not None and _is_pipeline(obj):
                return frame
        frame = frame.f_back
    return None
