"""Find the ordered transformer blocks of a Dynamo graph from module-path metadata."""

from __future__ import annotations

import dataclasses
import re

from torch import fx

from .module_stack import is_param_placeholder, stack_entries

#: Module-list names that hold the transformer blocks of diffusers DiTs (and most others).
DEFAULT_BLOCK_LISTS = (
    "transformer_blocks",
    "single_transformer_blocks",
    "joint_transformer_blocks",
    "blocks",
    "layers",
)


def block_regex(block_lists: tuple[str, ...]) -> re.Pattern:
    names = "|".join(re.escape(b) for b in sorted(block_lists, key=len, reverse=True))
    return re.compile(rf"^((?:{names}))\.(\d+)(?:\.|$)")


def nested_block_lists(gm: fx.GraphModule, block_lists: tuple[str, ...]) -> list[str]:
    """Paths of module lists with one of `block_lists`' names below the root (a wrapped transformer:
    `model.transformer_blocks`, PEFT's `base_model.model.transformer_blocks`): what to pass as block_lists."""
    names = "|".join(re.escape(b) for b in sorted(block_lists, key=len, reverse=True))
    pattern = re.compile(rf"^(.+\.(?:{names}))\.\d+(?:\.|$)")
    found = set()
    for n in gm.graph.nodes:
        for path, _ in stack_entries(n) or ():
            m = pattern.match(path)
            if m:
                found.add(m.group(1))
    return sorted(found)


@dataclasses.dataclass
class Block:
    """One transformer block: its first contiguous run of nodes in the graph."""

    name: str  # e.g. "single_transformer_blocks.3"
    cls: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # external, non-parameter nodes it reads
    outputs: list[fx.Node]  # its nodes read outside it
    units: list = dataclasses.field(default_factory=list)
    refused: dict = dataclasses.field(default_factory=dict)  # child path -> why it is not cached

    @property
    def node_set(self) -> set[fx.Node]:
        return set(self.nodes)


def block_of(node: fx.Node, pattern: re.Pattern) -> str | None:
    """The block path a node runs in (deepest stack entry matched against the block lists)."""
    entries = stack_entries(node)
    if not entries:
        return None
    for path, _ in reversed(entries):
        m = pattern.match(path)
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def _block_class(nodes: list[fx.Node], name: str) -> str:
    for n in nodes:
        for path, cls in stack_entries(n):
            if path == name:
                return cls.__name__
    return "?"


def find_blocks(gm: fx.GraphModule, block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS) -> list[Block]:
    """Blocks in graph order. A block is its first contiguous run; later runs (reuse outside the loop) are glue."""
    pattern = block_regex(block_lists)
    runs: list[tuple[str, list[fx.Node]]] = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        b = block_of(n, pattern)
        if b is None:
            runs.append(("", [n]))
            continue
        if runs and runs[-1][0] == b:
            runs[-1][1].append(n)
        else:
            runs.append((b, [n]))
    seen: dict[str, Block] = {}
    for name, nodes in runs:
        if not name or name in seen:
            continue
        members = set(nodes)
        inputs = list(
            dict.fromkeys(
                a for n in nodes for a in n.all_input_nodes if a not in members and not is_param_placeholder(a)
            )
        )
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        seen[name] = Block(name=name, cls=_block_class(nodes, name), nodes=nodes, inputs=inputs, outputs=outputs)
    return list(seen.values())
