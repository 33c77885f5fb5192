"""Recipes: how a method's steps are planned and built. One recipe per config type, registered next to it.

A recipe answers two questions. *Plan*: which `StepPlan` a step runs (the config's schedule gives the step's
kind; the recipe says what each block does and how many tokens each partial unit recomputes). *Build*: which
passes make a plan's variant graph, block by block and around the blocks. Everything else (lowering, dispatch,
caches, export) works from plans and typed graph values, and knows no method by name.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..analysis import GraphPlan, Unit
from ..analysis.blocks import walk
from ..config import CacheConfig, StepKind
from ..errors import ConfigError, UnsupportedGraphError
from ..graph_io import Role
from ..passes import GraphBuilder
from ..step_plan import BlockKind, BlockStep, GraphView, StepPlan, UnitView

_RECIPES: dict[type, type["Recipe"]] = {}


def register_recipe(config_type: type[CacheConfig]):
    """Class decorator: the recipe of `config_type` (and of its subclasses without one of their own)."""

    def deco(cls: type["Recipe"]) -> type["Recipe"]:
        if config_type in _RECIPES and _RECIPES[config_type] is not cls:
            raise ConfigError(f"{config_type.__name__} already has the recipe {_RECIPES[config_type].__name__}")
        cls.config_type = config_type
        _RECIPES[config_type] = cls
        return cls

    return deco


def recipe_for(config: CacheConfig) -> "Recipe":
    for cls in type(config).__mro__:
        if cls in _RECIPES:
            return _RECIPES[cls](config)
    raise ConfigError(f"{type(config).__name__} has no recipe: register one with "
                      f"@fxcache.methods.register_recipe({type(config).__name__})")


class Recipe:
    """The base: uniform plans from `config.step_kind`; subclasses say what blocks and steps are made of."""

    config_type: ClassVar[type]
    #: the block kinds a cached step of this method may give its blocks (FULL is always allowed)
    block_kinds: ClassVar[frozenset[BlockKind]] = frozenset()
    #: whether the method works on a graph holding some of the blocks (a piece of a forward that graph-breaks):
    #: its per-block maths must not read other pieces' blocks
    per_piece: ClassVar[bool] = True
    per_piece_why: ClassVar[str] = ""

    def __init__(self, config: CacheConfig):
        self.config = config

    # -- plans ----------------------------------------------------------------------------------------------
    @property
    def caches(self) -> bool:
        """Whether any step reads caches (a schedule of FULL steps only writes none)."""
        return len(self.config.kinds) > 1

    def full_plan(self, view: GraphView) -> StepPlan:
        return StepPlan.uniform(StepKind.FULL, len(view.blocks))

    def plan(self, step: int, view: GraphView) -> StepPlan:
        """The plan of `step` when the branch has every cache it reads (else the runner runs `full_plan`)."""
        kind = self.config.step_kind(step)
        if kind is StepKind.FULL:
            return self.full_plan(view)
        if kind is StepKind.SKIP:
            blocks = [BlockStep(BlockKind.SKIPPED)] * len(view.blocks)
        else:
            blocks = [self.block_step(kind, step, units) for units in view.blocks]
        lead = getattr(self.config, "lead_position", None)
        if blocks and lead is not None and view.leads and lead(step) == 0:
            blocks[0] = BlockStep(BlockKind.FULL)  # a mixed step: block 0 FULL, the others not (DiT references)
        return StepPlan(kind, tuple(blocks))

    def block_step(self, kind: StepKind, step: int, units: tuple[UnitView, ...]) -> BlockStep:
        """What one block does on a cached step of `kind` (override to give partial blocks their k)."""
        return BlockStep(BlockKind(kind.value))

    # -- building -------------------------------------------------------------------------------------------
    def layout(self, graph: GraphPlan) -> Any:
        """What the method reads from the analysis, once per graph (ToCa's scored units, ClusCa's streams).
        Raises UnsupportedGraphError when the graph lacks what the method needs."""
        return None

    def build(self, b: GraphBuilder, graph: GraphPlan, plan: StepPlan, layout: Any) -> None:
        raise NotImplementedError

    def check_io(self, plan: StepPlan, view: GraphView, inputs: list) -> str:
        """'' when a variant's runtime-made inputs (`GraphValue`s, e.g. read from an export's manifest) are what
        this config gives `plan`, else what differs. The base checks the Taylor scalars; methods add their own."""
        order = self.config.taylor_order
        for v in inputs:
            if v.role in (Role.TAYLOR_DIFF, Role.TAYLOR_COEF):
                if order is None:
                    return f"it takes Taylor scalars ({v.key.name}), but the config keeps no Taylor factors"
                want = (order + 1,) if v.role is Role.TAYLOR_COEF else (order,)
                if tuple(v.shape) != want:
                    return f"{v.key.name} has shape {list(v.shape)}, but config order={order} needs {list(want)}"
        roles = {v.role for v in inputs}
        forecasts = plan.uses(BlockKind.FORECAST) or plan.uses(BlockKind.CLUSTER)
        if order is not None and forecasts and Role.TAYLOR_COEF not in roles:
            return f"it lacks the Taylor coefficients its {plan.label} step takes"
        if order and plan.kind is StepKind.FULL and self.caches and Role.TAYLOR_DIFF not in roles:
            return f"it lacks the Taylor step differences of config order={order}"
        return ""

    def check(self, graph: GraphPlan, plan: StepPlan) -> None:
        """Refuse a plan with block kinds this method cannot build, or of the wrong length."""
        if len(plan.blocks) != len(graph.blocks):
            raise UnsupportedGraphError(f"a {plan.label} plan of {len(plan.blocks)} blocks for a graph of "
                                        f"{len(graph.blocks)}")
        allowed = self.block_kinds | {BlockKind.FULL}
        if plan.kind is StepKind.SKIP:
            allowed = {BlockKind.SKIPPED, BlockKind.FULL}
        bad = {b.kind for b in plan.blocks} - allowed
        if bad:
            raise UnsupportedGraphError(f"{self.config.method} cannot build blocks of kind "
                                        f"{', '.join(sorted(k.value for k in bad))} ({plan.label})")


def units_in(graph: GraphPlan, plan: StepPlan, kind: BlockKind) -> list[Unit]:
    """The units of the blocks that `plan` gives `kind`, in graph order."""
    return [u for block, step in zip(graph.blocks, plan.blocks) if step.kind is kind for u in block.units]


def partial_units(graph: GraphPlan, plan: StepPlan) -> tuple[list[tuple[Unit, int]], list[Unit]]:
    """PARTIAL blocks: ([(unit, k)] of the units recomputed on k >= 1 tokens, [units read from cache])."""
    recomputed, reused = [], []
    for block, step in zip(graph.blocks, plan.blocks):
        if step.kind is not BlockKind.PARTIAL:
            continue
        ks = iter(step.k)
        for unit in block.units:
            k = next(ks) if unit.partial else 0
            (recomputed.append((unit, k)) if k > 0 else reused.append(unit))
    return recomputed, reused


def read_units(graph: GraphPlan, units: list[Unit]) -> list[Unit]:
    """`units` less those read only by another unit of their block (FLUX single blocks: the attention output
    feeds nothing but the fused projection). A step that reuses or forecasts the outer unit never reads them, so
    methods whose cached steps only reuse or forecast keep no cache and no Taylor factors for them
    (ALGORITHMS.md erratum 15)."""
    return [u for u in units if not _inner(graph, u)]


def _inner(graph: GraphPlan, unit: Unit) -> bool:
    """Whether everything `unit`'s outputs feed ends in another unit of its block: every path from them stays in
    that unit's region until it reaches that unit's outputs (an attention whose output also reaches the residual
    stream outside, as when a feed-forward's region starts at the attention's gated sum, is not inner)."""
    block = graph.blocks[unit.block]
    for other in block.units:
        if other is unit or not other.region:
            continue
        region, outputs = set(other.region), set(other.outputs)
        reached = walk((u for out in unit.outputs for u in out.users),
                       lambda n: n.users if n in region and n not in outputs else ())
        if all(n in region or n in outputs for n in reached):
            return True
    return False
