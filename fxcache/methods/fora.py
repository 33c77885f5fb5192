"""FORA: recompute every unit once every N steps, reuse the pre-gate outputs in between."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_int, register_method
from ..passes import expose_units, reuse_units
from ..step_plan import BlockKind
from .recipe import Recipe, register_recipe, units_in
from .schedule import cycle_horizon, cycle_position


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class FORAConfig(CacheConfig):
    """Fixed-interval reuse (FORA, arXiv 2407.01425).

    Steps count up from 0 in sampling order. FULL when `step < warmup_steps` or
    `(step - warmup_steps + 1) % interval == 0`; every other step is REUSE: attention and MLP outputs come
    from the cache, norms, modulation, gates and residuals run with the current timestep.

    Args:
        interval: N, one FULL step every N steps (FORA's FLUX headline uses 3). 1 disables caching.
        warmup_steps: W, leading FULL steps (FORA: 1).
    """

    method = "fora"
    #: FORA paper / ToCa README: FLUX.1-dev N=3 (2.82x FLOPs); DiT-XL/2 DDIM-50 N=3 (FID 3.55);
    #: HunyuanVideo N=5 (5.00x, from the TaylorSeer tables). W=1 everywhere.
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=3, warmup_steps=1),
        "dit": dict(interval=3, warmup_steps=1),
        "video": dict(interval=5, warmup_steps=1),
    }
    interval: int = 3
    warmup_steps: int = 1

    def _validate(self) -> None:
        check_int("FORAConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_int("FORAConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)

    @property
    def horizon(self) -> int:
        return cycle_horizon(self.interval, self.warmup_steps)

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.REUSE}) if self.interval > 1 else frozenset({StepKind.FULL})

    def step_kind(self, step: int) -> StepKind:
        return StepKind.FULL if cycle_position(step, self.interval, self.warmup_steps) == 0 else StepKind.REUSE


@register_recipe(FORAConfig)
class FORARecipe(Recipe):
    """FULL blocks write every unit output; REUSE blocks read them."""

    block_kinds = frozenset({BlockKind.REUSE})

    def build(self, b, graph, plan, layout) -> None:
        if self.caches:
            expose_units(b, units_in(graph, plan, BlockKind.FULL))
        reuse_units(b, units_in(graph, plan, BlockKind.REUSE))
