"""What one model call computes, block by block: the plan a variant graph is built from.

A method's schedule gives each step a `StepPlan`: the step's kind (what `stats` records) and, per transformer
block, what that block does. Today's step kinds are the uniform plans (every block partial, every block reused,
...); a plan may also mix them, as the authors' ToCa / DuCa DiT code does on some steps (block 0 full, the rest
partial) and as block-level adaptive methods do (the first and last blocks full, the middle reused). Plans are
values: equal plans share one variant graph, so a step's variant is the variant of its plan.
"""

from __future__ import annotations

import dataclasses
import enum

from .config import StepKind


class BlockKind(str, enum.Enum):
    """What one block does in a step."""

    FULL = "full"  # computes everything and refreshes its caches
    PARTIAL = "partial"  # attention from cache; token-wise units recomputed on k tokens
    REUSE = "reuse"  # every unit from cache, current gates
    FORECAST = "forecast"  # every unit from its Taylor factors
    CLUSTER = "cluster"  # forecast, plus one recomputed token per cluster, propagated
    SKIPPED = "skipped"  # does not run: the step reads the last block's cached output (DuCa's SKIP)
    RESIDUAL = "residual"  # does not run: the streams after a run of such blocks are the streams before it plus
    #                        the residual the run added at the last computed step (FBCache, DBCache, TeaCache, ...)


@dataclasses.dataclass(frozen=True)
class BlockStep:
    """One block's part of a step. `k`: PARTIAL blocks only, the tokens each of its token-wise units recomputes,
    in unit order (0 where a unit recomputes none)."""

    kind: BlockKind
    k: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"kind": self.kind.value, "k": list(self.k)}


#: what part of a call a plan's graph computes: all of it; the probe of a method that decides at run time
#: (everything up to its signal, which it returns with the values the rest reads); the tail after a probe
WHOLE, PROBE, TAIL = "whole", "probe", "tail"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """`kind`: what the step is recorded as; `blocks`: one `BlockStep` per transformer block, in graph order.

    `part`: WHOLE for a graph that computes the call; a method that decides from a value computed in the call
    (a run-time signal) runs a PROBE graph, reads the signal, then one of its TAIL graphs, which take the values
    the probe carried over. A probe plan gives FULL to the blocks it runs, and so does a tail plan to the blocks
    its probe ran."""

    kind: StepKind
    blocks: tuple[BlockStep, ...]
    part: str = WHOLE

    @classmethod
    def uniform(cls, kind: StepKind, blocks: int, block: BlockStep | None = None) -> "StepPlan":
        """Every block does the same: FULL -> full blocks, SKIP -> skipped blocks, the rest their own kind."""
        if block is None:
            block = BlockStep(BlockKind.SKIPPED if kind is StepKind.SKIP else BlockKind(kind.value))
        return cls(kind, (block,) * blocks)

    def count(self, kind: BlockKind) -> int:
        return sum(1 for b in self.blocks if b.kind is kind)

    def uses(self, kind: BlockKind) -> bool:
        return any(b.kind is kind for b in self.blocks)

    @property
    def label(self) -> str:
        """A short name: the kind, with the blocks' kinds when they differ (`partial[f p p p]`)."""
        kinds = {b.kind for b in self.blocks}
        name = "probe" if self.part == PROBE else self.kind.value
        if len(kinds) <= 1:
            return name
        return f"{name}[{' '.join(b.kind.value[0] for b in self.blocks)}]"

    def describe(self) -> str:
        """The label, with the tokens each partial block's units recompute (`partial k=[16,2] [16,2]`)."""
        ks = [b.k for b in self.blocks if b.kind is BlockKind.PARTIAL]
        if not ks:
            return self.label
        return f"{self.label} k=" + " ".join("[" + ",".join(map(str, k)) + "]" for k in ks)

    def to_json(self) -> dict:
        out = {"kind": self.kind.value, "blocks": [b.to_json() for b in self.blocks]}
        if self.part != WHOLE:
            out["part"] = self.part
        return out


@dataclasses.dataclass(frozen=True)
class UnitView:
    """What a schedule needs to know of a unit: its kind, and for a token-wise unit recomputable on a subset its
    token count and where it sits (ToCa's ratio schedules weigh layer, unit kind and block list)."""

    name: str
    kind: str  # "attn" | "xattn" | "mlp"
    tokens: int  # 0 unless the unit can be recomputed on a token subset
    layer: int  # index of its block within its block list
    layers: int  # blocks in its block list
    list_index: int  # which block list: 0 for the first (FLUX: double-stream blocks), 1 for the second, ...

    @property
    def partial(self) -> bool:
        return self.tokens > 0


@dataclasses.dataclass(frozen=True)
class GraphView:
    """The blocks of a graph as schedules see them: made from the analysis (`of`) or read from a manifest, so the
    compiled runner, `fxcache.export` and the export session compute the same plans."""

    blocks: tuple[tuple[UnitView, ...], ...]
    #: whether the first block is the model's first (a graph that holds only later blocks, a piece of a forward
    #: that graph-breaks, never runs the FULL block 0 of the reference schedules' mixed steps)
    leads: bool = True

    @classmethod
    def of(cls, plan, where: dict[str, tuple[int, int, int]] | None = None) -> "GraphView":
        """`where`: block name -> (layer, layers, list index) in the whole model, for a graph holding only some of
        its blocks; by default each block list of the graph is whole and lists count in graph order."""
        if where is None:
            lists: dict[str, list] = {}
            for block in plan.blocks:
                lists.setdefault(block.name.rsplit(".", 1)[0], []).append(block)
            where = {}
            for li, blocks in enumerate(lists.values()):
                for layer, block in enumerate(blocks):
                    where[block.name] = (layer, len(blocks), li)
        first = where[plan.blocks[0].name] if plan.blocks else (0, 0, 0)
        return cls(tuple(
            tuple(UnitView(u.name, u.kind, u.tokens if u.partial else 0, *where[block.name]) for u in block.units)
            for block in plan.blocks), leads=first[0] == 0 and first[2] == 0)

    def to_json(self) -> list:
        return [[dataclasses.asdict(u) for u in units] for units in self.blocks]

    @classmethod
    def from_json(cls, data) -> "GraphView":
        return cls(tuple(tuple(UnitView(**u) for u in units) for units in data))

