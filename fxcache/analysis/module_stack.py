"""Read Dynamo's `nn_module_stack` metadata: normalised module paths and the classes along them."""

from __future__ import annotations

import re

import torch
from torch import fx

_TOKEN = re.compile(r"\['([^']+)'\]|\.([A-Za-z_0-9]+)|\[(\d+)\]")
_SKIP = {"__dict__", "_modules", "_parameters", "_buffers"}
#: the traced forward's module argument, whatever it is called (`self`, `s`, ...)
_ROOT = re.compile(r"""^[LG]\[(?:'[^']*'|"[^"]*")\]|^self""")


def norm_path(path: str) -> str:
    """`L['self'].__dict__['_modules']['transformer_blocks'].0.attn` -> `transformer_blocks.0.attn`. A module
    reached through a bound method of itself (`transformer_blocks.0.forward.__self__.norm1`: a block whose
    `forward` is an instance attribute, as diffusers' hooks leave it after `disable_cache()`) is that module."""
    path = _ROOT.sub("", path)
    tokens: list[str] = []
    for t in (a or b or c for a, b, c in _TOKEN.findall(path)):
        if t == "__self__" and tokens:
            tokens.pop()  # `<module>.<method>.__self__` is `<module>`
        elif t not in _SKIP:
            tokens.append(t)
    return ".".join(tokens)


def stack_entries(node: fx.Node) -> list[tuple[str, type]]:
    """The module stack of `node` as (normalised path, module class), root to leaf."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value[0], value[1]
        if isinstance(cls, str):  # some versions store the qualified name
            cls = type(cls.rsplit(".", 1)[-1], (), {})
        out.append((norm_path(path), cls))
    return out


def is_param_placeholder(node: fx.Node) -> bool:
    """Placeholders that Dynamo lifted from module parameters or buffers (not user inputs)."""
    if node.op != "placeholder":
        return False
    value = node.meta.get("example_value")
    if isinstance(value, torch.nn.Parameter):
        return True
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    if callable(name):
        try:
            name = name()
        except Exception:  # pragma: no cover - defensive
            name = None
    return isinstance(name, str) and ("_parameters" in name or "_buffers" in name)


def child_of(node: fx.Node, parent: str) -> tuple[str, str] | None:
    """The direct child of module `parent` that `node` runs in, as (path, class name), or None."""
    depth = parent.count(".") + 1
    for path, cls in stack_entries(node):
        if path.startswith(parent + ".") and path.count(".") == depth:
            return path, cls.__name__
    return None


def classes_on_stack(node: fx.Node) -> list[str]:
    return [cls.__name__ for _, cls in stack_entries(node)]
