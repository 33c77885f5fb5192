"""Say so when Dynamo stops compiling a model an fxcache backend serves.

Past `torch._dynamo.config.recompile_limit` (8 by default) graphs of one code object, Dynamo runs new input shapes
of it in plain eager, with one log line and no error: the model silently stops caching. Many diffusers
transformers share one wrapped `forward` (peft's `apply_lora_scale`), and `module.compile()` compiles
`nn.Module._call_impl`, shared by every module, so the limit is shared too. This handler watches Dynamo's log for
that line and turns it into an `FxCacheWarning` with the fix, once, for the backend that last compiled that code
object (a shared code object would otherwise warn every live backend that ever compiled it).
"""

from __future__ import annotations

import logging
import weakref

_LOGGER = "torch._dynamo.convert_frame"
_LAST: "dict[str, weakref.ref]" = {}  # code label -> the backend that compiled it most recently


class _Watch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not str(record.msg).startswith("torch._dynamo hit config."):
                return
            args = record.args if isinstance(record.args, tuple) else ()
            limit_name = str(args[0]) if args else "recompile_limit"
            limit = args[1] if len(args) > 1 else "?"
            func = str(args[2]) if len(args) > 2 else ""
        except Exception:  # never let a log record break the model call
            return
        ref = _LAST.get(func)
        backend = ref() if ref is not None else None
        if backend is not None:
            backend._warn_once(
                f"fxcache: Dynamo hit torch._dynamo.config.{limit_name} ({limit}) for {func}: new input shapes "
                f"of this model now run in plain eager, uncached. Every input shape (and batch size) is a graph "
                f"of its own, and the diffusers transformers whose forward is wrapped by the same decorator "
                f"share the limit. Raise it before the first call, e.g. "
                f"torch._dynamo.config.recompile_limit = 64 and "
                f"torch._dynamo.config.accumulated_recompile_limit = 512.", key="recompile_limit")


_HANDLER = _Watch(level=logging.WARNING)


def watch(backend, code_label: str) -> None:
    """Warn `backend` when Dynamo gives up on `code_label`, the code object it is compiling now."""
    _LAST[code_label] = weakref.ref(backend)
    logger = logging.getLogger(_LOGGER)
    if _HANDLER not in logger.handlers:  # torch._logging.set_logs() may have cleared it
        logger.addHandler(_HANDLER)
