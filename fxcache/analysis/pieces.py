"""Graphs that are pieces of a forward Dynamo split: which blocks of the whole model they hold.

A graph break inside the block loop leaves the model's forward eager and compiles each block's forward as a graph
of its own, rooted at the block (one graph serves every block of that class); a break between blocks or before them
leaves graphs rooted at the model that hold some of its blocks. Either way a piece's blocks are placed in the whole
model (layer, list length, which list) from the module tree, so a schedule that depends on the layer plans the same
step for a piece as for an unbroken graph.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import fx, nn

from .blocks import DEFAULT_BLOCK_LISTS

_CALL_IMPL = nn.Module._call_impl.__code__
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def _holds_attention(module: nn.Module) -> bool:
    return any("Attention" in type(m).__name__ for m in module.modules())


def module_block_lists(model: nn.Module) -> list[str]:
    """Paths of `model`'s module lists that hold transformer blocks, in registration order: lists whose entries
    (one class) each hold an `*Attention*` module, those with a usual name (`transformer_blocks`, `layers`, ...)
    even with one entry, others with two or more; a list whose entries hold such lists (stages of blocks) is left
    out for the lists inside it."""
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not all(_holds_attention(m) for m in module):
            continue
        named = path.rsplit(".", 1)[-1] in DEFAULT_BLOCK_LISTS
        if named or len(module) >= 2:
            found.append(path)
    return [p for p in found if not any(p != o and o.startswith(p + ".") for o in found)]


#: frames between a graph's compile or run and the `__call__` of the modules around it (Dynamo, hooks, a forward)
FRAME_DEPTH = 96


def module_calls(frame, depth: int | None = FRAME_DEPTH):
    """(module, frame locals) of each `nn.Module.__call__` frame from `frame` outward (`depth` frames at most)."""
    while frame is not None and depth != 0:
        if frame.f_code is _CALL_IMPL:
            locs = frame.f_locals
            module = locs.get("self")
            if isinstance(module, nn.Module):
                yield module, locs
        frame = frame.f_back
        if depth is not None:
            depth -= 1


def block_entry_of(root: nn.Module) -> tuple[nn.Module, str] | None:
    """(the enclosing module, the entry path `list.i` of `root` in it) when `root`, the module whose forward a
    graph was traced from, is an entry of a block list of a module whose `__call__` is on the stack (a block's
    forward compiled on its own); else None."""
    seen = {id(root)}
    for outer, _ in module_calls(sys._getframe(1)):
        if id(outer) not in seen:
            seen.add(id(outer))
            path = _entry_path(outer, root)
            if path is not None:
                return outer, path
    return None


def _entry_path(outer: nn.Module, root: nn.Module) -> str | None:
    """`list.i` when `root` is that entry of one of `outer`'s block lists, or the module inside it that holds its
    attention (an entry that wraps the real block, as HiDream's `HiDreamBlock` does)."""
    lists = module_block_lists(outer)
    for path in lists:
        for i, entry in enumerate(outer.get_submodule(path)):
            if entry is root or (_holds_attention(root) and any(m is root for m in entry.modules())):
                return f"{path}.{i}"
    return None


def entry_of(model: nn.Module, path: str) -> str | None:
    """The block-list entry (`list.i`) that the module at `path` in `model` is or lies in."""
    for lst in module_block_lists(model):
        m = re.match(rf"^{re.escape(lst)}\.(\d+)(?:\.|$)", path)
        if m:
            return f"{lst}.{m.group(1)}"
    return None


def prefix_module_stack(gm: fx.GraphModule, path: str, cls: type) -> None:
    """Make a graph traced from a block's own forward read as that block inside its model: every node's module
    path gets the block's path in front, and the block's own code (empty stack) runs in the block."""
    root = f"L['self'].{path}"
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        new = {"__fxcache_block__": (root, cls)}
        for key, value in stack.items():
            where, owner = value[0], value[1]
            rest = re.sub(r"""^[LG]\[(?:'[^']*'|"[^"]*")\]|^self""", "", where)
            if rest == "":
                continue
            new[key] = (root + rest, owner) + tuple(value[2:])
        n.meta["nn_module_stack"] = new


def coordinates(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int, int]]:
    """Block name (a path in `model`) -> (layer in its list, the list's length, the list's index among the
    model's block lists)."""
    lists = module_block_lists(model)
    out = {}
    for name in names:
        m = _INDEXED.match(name)
        if m is None:
            continue
        lst, i = m.group(1), int(m.group(2))
        if lst not in lists:
            lists.append(lst)
        try:
            length = len(model.get_submodule(lst))
        except (AttributeError, TypeError):
            length = i + 1
        out[name] = (i, length, lists.index(lst))
    return out


def module_path(model: nn.Module, module: nn.Module) -> str | None:
    if module is model:
        return ""
    for path, m in model.named_modules():
        if m is module:
            return path
    return None


def owns(module: nn.Module, tensor: torch.Tensor) -> bool:
    return any(p is tensor for p in module.parameters()) or any(b is tensor for b in module.buffers())
