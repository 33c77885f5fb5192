"""Exceptions raised by fxcache; each message says what was found, what is accepted and how to fix it."""

from __future__ import annotations


class FxCacheError(Exception):
    """Base class of every fxcache error."""


class ConfigError(FxCacheError, ValueError):
    """A cache method, option or lowering was given a value it does not accept."""


class UnknownOptionError(ConfigError, TypeError):
    """An option name a method, backend or call does not take (a TypeError too, as for unknown keywords)."""


class UnsupportedGraphError(FxCacheError):
    """The graph analysis could not find what caching needs (raised in strict mode).

    Attributes:
        reason: what was missing or not understood.
        node: the FX node involved, if one is.
        block: the block path involved, if one is.
    """

    def __init__(self, reason: str, *, node=None, block: str | None = None, summary: str | None = None):
        self.reason = reason
        self.node = node
        self.block = block
        parts = [reason]
        if block is not None:
            parts.append(f"block: {block}")
        if node is not None:
            fmt = getattr(node, "format_node", None)
            parts.append(f"node: {fmt() if fmt else node}")
            trace = getattr(node, "meta", {}).get("stack_trace")
            if trace:
                parts.append("user code:\n" + trace.strip())
        if summary:
            parts.append("what the analysis found:\n" + summary)
        super().__init__("\n".join(parts))


class ExportError(FxCacheError):
    """A model, variant or op could not be exported, or an exported artifact is missing or does not match."""


class MissingDependencyError(FxCacheError, ImportError):
    """An optional dependency (onnx, onnxruntime, torch-tensorrt, CUDA) is needed for what was asked."""


class FxCacheWarning(UserWarning):
    """fxcache runs a graph uncached (or otherwise falls back); the message says why."""
