"""FORA: recompute every unit once every N steps, reuse the pre-gate outputs in between."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_int, register_method
from ..passes import expose_units, reuse_units
from ..step_plan import BlockKind
from .recipe import Recipe, read_units, register_recipe, units_in
from .schedule import FIXED_SCHEDULES, Cyclic, check_schedule


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class FORAConfig(Cyclic, CacheConfig):
    """Fixed-interval reuse (FORA, arXiv 2407.01425).

    Steps count up from 0 in sampling order. By default FULL when `step < warmup_steps` or
    `(step - warmup_steps + 1) % interval == 0`; every other step is REUSE: attention and MLP outputs come
    from the cache, norms, modulation, gates and residuals run with the current timestep.

    Args:
        interval: N, one FULL step every N steps (FORA's FLUX headline uses 3). 1 disables caching.
        warmup_steps: W, leading FULL steps (FORA: 1).
        schedule: "counter" (W warm-up steps, then one FULL step every N), or "countdown": the DiT references'
            fixed interval counted down from the last step, FULL when step < W or (num_steps - 1 - step) % N == 0
            (the last step is always FULL). num_steps: the sampler's step count, needed by "countdown".
    """

    method = "fora"
    CHOICES: ClassVar[dict] = {"schedule": FIXED_SCHEDULES}
    #: FORA paper / ToCa README: FLUX.1-dev N=3 (2.82x FLOPs); DiT-XL/2 DDIM-50 N=3 (2.77x, FID 3.55), run by the
    #: authors as DiT-ToCa with fresh ratio 0: FULL at s = 0, 1, 4, ..., 49, 18 of 50 (docs/authors/dit-schedules.md
    #: section 2; pass num_steps for another step count); HunyuanVideo N=5 (5.00x, from the TaylorSeer tables).
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=3, warmup_steps=1),
        "dit": dict(interval=3, warmup_steps=1, schedule="countdown", num_steps=50),
        "video": dict(interval=5, warmup_steps=1),
    }
    interval: int = 3
    warmup_steps: int = 1

    schedule: str = "counter"
    num_steps: int | None = None

    def _validate(self) -> None:
        check_int("FORAConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_int("FORAConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_schedule("FORAConfig", self.schedule, self.num_steps)

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.REUSE}) if self.interval > 1 else frozenset({StepKind.FULL})

    def step_kind(self, step: int) -> StepKind:
        j = self.position(step)
        return StepKind.FULL if j == 0 else StepKind.REUSE


@register_recipe(FORAConfig)
class FORARecipe(Recipe):
    """FULL blocks write every unit output; REUSE blocks read them."""

    block_kinds = frozenset({BlockKind.REUSE})

    def build(self, b, graph, plan, layout) -> None:
        if self.caches:
            expose_units(b, read_units(graph, units_in(graph, plan, BlockKind.FULL)))
        reuse_units(b, read_units(graph, units_in(graph, plan, BlockKind.REUSE)))
