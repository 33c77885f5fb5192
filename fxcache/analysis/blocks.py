"""Find the ordered transformer blocks of a Dynamo graph from module-path metadata: module lists with the usual
names, else, found by structure, the module lists whose entries (one class, at least two) each hold an attention
and pass the stream from one to the next."""

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


def walk(starts, step):
    """Each node reachable from `starts` once, in depth-first order; `step(node)` gives the next nodes."""
    todo, seen = list(starts), set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        yield x
        todo.extend(step(x))


_INDEXED = re.compile(r"^(.+)\.(\d+)$")


def is_softmax(n: fx.Node) -> bool:
    """A softmax call: the map of an attention written out as softmax(q @ k^T)."""
    name = getattr(n.target, "__name__", str(n.target))
    return n.op in ("call_function", "call_method") and name in ("softmax", "_softmax")


def _mixes_tokens(n: fx.Node, deeper) -> bool:
    """`n` is an SDPA call or a softmax, or runs inside an `*Attention*` module (`deeper`: its stack entries below
    the entry that holds it)."""
    sdpa = n.op == "call_function" and getattr(n.target, "__name__", "") == "scaled_dot_product_attention"
    return sdpa or is_softmax(n) or any("Attention" in cls.__name__ for _, cls in deeper)


def structural_block_lists(gm: fx.GraphModule) -> list[str]:
    """Module lists found by structure, whatever their name: at least two entries of one class, each holding a
    token-mixing attention (an `*Attention*` child, SDPA or a softmax), each entry's output read by the next (the
    residual stream runs through them); lists inside another such list are left out. In graph order."""
    classes: dict[str, dict[int, str]] = {}
    mixing: dict[str, set[int]] = {}
    for n in gm.graph.nodes:
        entries = stack_entries(n) or []
        for depth, (path, cls) in enumerate(entries):
            m = _INDEXED.match(path)
            if not m:
                continue
            lst, i = m.group(1), int(m.group(2))
            classes.setdefault(lst, {})[i] = cls.__name__
            if _mixes_tokens(n, entries[depth + 1:]):
                mixing.setdefault(lst, set()).add(i)
    lists = [lst for lst, idx in classes.items()
             if len(idx) >= 2 and len(set(idx.values())) == 1 and mixing.get(lst, set()) >= set(idx)]
    lists = [lst for lst in lists if not any(lst != o and lst.startswith(o + ".") for o in lists)]
    return [lst for lst in lists if _chained(find_blocks(gm, (lst,)))]


def _chained(blocks: list[Block]) -> bool:
    """Each block reads what the one before it computed (directly, or through glue between them)."""
    for a, b in zip(blocks, blocks[1:]):
        before = a.node_set
        upstream = walk(b.inputs, lambda x: () if x in before or x.op == "placeholder" else x.all_input_nodes)
        if not any(x in before for x in upstream):
            return False
    return True


def mixes_tokens(block: Block) -> bool:
    """Whether a block holds a token-mixing attention (an `*Attention*` module inside it, SDPA or a softmax)."""
    for n in block.nodes:
        entries = stack_entries(n) or []
        below = next((i for i, (path, _) in enumerate(entries) if path == block.name), None)
        if _mixes_tokens(n, entries[below + 1:] if below is not None else []):
            return True
    return False


def without_token_mixing_lists(blocks: list[Block]) -> list[Block]:
    """`blocks` less the module lists none of whose entries mix tokens (a list of per-token MLPs that happens to
    have a usual name, such as `layers`, next to the real blocks)."""
    lists: dict[str, list[Block]] = {}
    for b in blocks:
        lists.setdefault(b.name.rsplit(".", 1)[0], []).append(b)
    keep = {name for name, members in lists.items() if any(mixes_tokens(b) for b in members)}
    return [b for b in blocks if b.name.rsplit(".", 1)[0] in keep]
