"""TaylorSeer: forecast every unit from finite-difference Taylor factors instead of reusing it."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_int, register_method
from ..passes import forecast_units, update_factors
from ..step_plan import BlockKind
from .recipe import Recipe, read_units, register_recipe, units_in
from .schedule import FIXED_SCHEDULES, Cyclic, check_schedule


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class TaylorSeerConfig(Cyclic, CacheConfig):
    """TaylorSeer (arXiv 2503.06923).

    By default FULL when `step < warmup_steps` or `(step - warmup_steps + 1) % interval == 0`. A FULL step at s_k keeps,
    per unit output Y (before gate and residual), the factors F_0 = Y and F_{i+1} = (F_i - F_i_old) / d
    (d = steps since the previous FULL step), up to `order`; derivatives start from FULL steps s >= W - 1 and
    gain one order per FULL step. Every other step is FORECAST: Y = sum_i F_i * delta^i / i!, delta = steps since
    s_k, with the current timestep's gates and modulation. Order 0 is FORA.

    Args:
        interval: N, one FULL step every N steps (FLUX paper headline 6; 1 disables caching).
        order: m, the highest derivative kept (FLUX paper headline 2; the FLUX code default 1).
        warmup_steps: W, leading FULL steps (FLUX 3).
        schedule: "counter" (W warm-up steps, then one FULL step every N), or "countdown": the DiT references'
            fixed interval counted down from the last step, FULL when step < W or (num_steps - 1 - step) % N == 0
            (the last step is always FULL). num_steps: the sampler's step count, needed by "countdown".
    Memory: (order + 1) cached tensors per unit output, per CFG branch.
    """

    method = "taylorseer"
    CHOICES: ClassVar[dict] = {"schedule": FIXED_SCHEDULES}
    #: TaylorSeer paper: FLUX.1-dev N=6, O=2, W=3 (4.99x FLOPs, IR 1.0039); DiT-XL/2 DDIM-50 N=4, O=4 (3.57x), FULL
    #: at s = 0, 1, 5, ..., 49 as the authors' countdown gives it (docs/authors/dit-schedules.md section 4);
    #: HunyuanVideo / Wan2.1 N=5, O=1, W=1 (5.00x, VBench 79.93).
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=6, order=2, warmup_steps=3),
        "dit": dict(interval=4, order=4, warmup_steps=1, schedule="countdown", num_steps=50),
        "video": dict(interval=5, order=1, warmup_steps=1),
    }
    interval: int = 6
    order: int = 2
    warmup_steps: int = 3

    schedule: str = "counter"
    num_steps: int | None = None

    def _validate(self) -> None:
        check_int("TaylorSeerConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_int("TaylorSeerConfig", "order", self.order, minimum=0, maximum=8, why="the papers use 1-4")
        check_int("TaylorSeerConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_schedule("TaylorSeerConfig", self.schedule, self.num_steps)

    @property
    def taylor_order(self) -> int:
        return self.order

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.FORECAST}) if self.interval > 1 else frozenset({StepKind.FULL})

    def step_kind(self, step: int) -> StepKind:
        j = self.position(step)
        return StepKind.FULL if j == 0 else StepKind.FORECAST


@register_recipe(TaylorSeerConfig)
class TaylorSeerRecipe(Recipe):
    """FULL blocks update the Taylor factors of every unit output; FORECAST blocks read the Taylor sum."""

    block_kinds = frozenset({BlockKind.FORECAST})

    def build(self, b, graph, plan, layout) -> None:
        if self.caches:
            update_factors(b, read_units(graph, units_in(graph, plan, BlockKind.FULL)), self.config.order)
        forecast_units(b, read_units(graph, units_in(graph, plan, BlockKind.FORECAST)), self.config.order)
