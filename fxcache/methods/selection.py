"""How ToCa-style partial steps choose their tokens: scores, ratio schedules and the per-unit token count k.

Shared by ToCa and DuCa (whose conservative steps are ToCa steps in the authors' code: ALGORITHMS.md erratum 8).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import check_int
from ..errors import ConfigError

SCORES = ("random", "staleness", "knorm", "vnorm", "similarity", "attention", "cross_entropy")
ROWS = ("each", "shared")

MAX_SPATIAL_GRID = 64  # side of a spatial bonus cell in tokens (the references use 2-4)
MAX_STEP_BUCKETS = 64  # k tables per generation: each is one more compiled PARTIAL variant


@dataclasses.dataclass(frozen=True)
class RatioSchedule:
    """r_eff = clamp(r * f_layer * f_step * f_unit * f_stream, 0, 1) (ALGORITHMS.md 3.4), multiplied in the
    authors' order (their Python floats), then rounded to float32 as their `torch.tensor(r_eff)` is.

    f_step = 1 + w - 2 w i / T with the down-counting index i = T - 1 - s when `progress_offset` is 1 (the DiT
    references), else 1 - w + 2 w s / T (w = step_weight; needs num_steps);
    f_layer = 1 + layer_weight - 2 * layer_weight * l / D (l within its block list, D = its length - 1, or 27
    with `reference_depth`); f_unit = 1 - (1 - tau) * unit_weight for cross-attention, 1 + tau * unit_weight for
    feed-forward units; f_stream = stream_factors[0] for the first block list, [1] for a second one.
    """

    step_weight: float = 0.0
    layer_weight: float = 0.0
    tau: float = 0.0
    unit_weight: float = 0.0
    stream_factors: tuple[float, float] = (1.0, 1.0)
    progress_offset: int = 0
    reference_depth: bool = False

    def factor(self, *, step: int, num_steps: int | None, layer: int, layers: int, list_index: int,
               kind: str, ratio: float = 1.0) -> float:
        """`ratio` * the factors, multiplied in the authors' order (r * f_layer * f_step * f_unit)."""
        f = ratio
        if self.layer_weight:
            depth = 27 if self.reference_depth else max(layers - 1, 1)
            f *= 1.0 + self.layer_weight - 2.0 * self.layer_weight * layer / depth
        if self.step_weight:
            w = self.step_weight
            if self.progress_offset:
                i = num_steps - self.progress_offset - step
                f *= 1.0 + w - 2.0 * w * i / num_steps
            else:
                f *= 1.0 - w + 2.0 * w * step / num_steps
        if self.unit_weight:
            f *= 1.0 - (1.0 - self.tau) * self.unit_weight if kind == "xattn" else 1.0 + self.tau * self.unit_weight
        f *= self.stream_factors[min(list_index, 1)]
        return f


#: The reference code's ratio schedules (ALGORITHMS.md 3.4), by name.
RATIO_SCHEDULES = {
    "flat": RatioSchedule(),
    "flux": RatioSchedule(layer_weight=0.5, stream_factors=(0.4, 1.6), reference_depth=True),
    "dit-ddim50": RatioSchedule(step_weight=2.0, layer_weight=-0.2, tau=0.6, unit_weight=2.5, progress_offset=1,
                                reference_depth=True),
    "dit-ddpm250": RatioSchedule(step_weight=0.4, layer_weight=0.8, tau=0.6, unit_weight=2.5, progress_offset=1,
                                 reference_depth=True),
    "pixart": RatioSchedule(step_weight=-0.9, layer_weight=0.6, tau=0.6, unit_weight=1.0, reference_depth=True),
    "opensora": RatioSchedule(tau=0.33, unit_weight=1.5),
}


def fresh_count(r_eff: float, tokens: int) -> int:
    """k = int(float32(clamp(r_eff, 0, 1)) * tokens), in float32 as the authors' `int(tensor(r) * N)`."""
    r = torch.tensor(min(max(r_eff, 0.0), 1.0), dtype=torch.float32)
    return int(r * tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenSelection:
    """The fields of the configs whose partial steps choose tokens as ToCa does, with what they mean (ToCaConfig
    documents each); the config brings `num_steps`, `schedule`, `warmup_steps` and a `fresh_ratio`."""

    CHOICES: ClassVar[dict] = {"score": SCORES, "prefer": ("low", "high"), "rows": ROWS,
                               "ratio_schedule": RATIO_SCHEDULES}
    score: str = "random"
    prefer: str = "low"
    staleness_weight: float = 0.0
    spatial_grid: int = 0
    spatial_bonus: float = 0.0
    ratio_schedule: str = "flat"
    step_buckets: int | None = None
    rows: str = "shared"

    def _validate_selection(self, owner: str) -> None:
        """Ranges and combinations (score, prefer, rows and ratio_schedule are `CHOICES`, checked before)."""
        for name in ("staleness_weight", "spatial_bonus"):
            v = getattr(self, name)
            if v < 0:
                raise ConfigError(f"{owner}.{name} must be a number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v) + 0.0)
        check_int(owner, "spatial_grid", self.spatial_grid, minimum=0, maximum=MAX_SPATIAL_GRID,
                  why="the side of a bonus cell in tokens; the references use 2-4")
        if RATIO_SCHEDULES[self.ratio_schedule].step_weight and self.num_steps is None:
            raise ConfigError(f"{owner}.ratio_schedule={self.ratio_schedule!r} changes the ratio with the "
                              "sampling progress: pass num_steps (the sampler's step count)")
        if self.schedule in ("dit", "pixart") and self.warmup_steps != 1:
            raise ConfigError(f"{owner}.schedule={self.schedule!r} decides its first steps itself (the reference's "
                              f"first step is FULL): warmup_steps must be 1, got {self.warmup_steps!r}")
        if self.step_buckets is not None:
            check_int(owner, "step_buckets", self.step_buckets, minimum=1, maximum=MAX_STEP_BUCKETS,
                      why="each bucket is one more compiled PARTIAL variant; None: k follows every step")

    def schedule_step(self, step: int) -> int:
        """The step whose progress sets f_step: `step` itself (step_buckets=None), the middle of its bucket, or 0
        without a step weight."""
        if not RATIO_SCHEDULES[self.ratio_schedule].step_weight:
            return 0
        if self.step_buckets is None or self.step_buckets >= self.num_steps:
            return step  # a bucket per step (or more buckets than steps): k follows every step
        t = self.num_steps
        bucket = min(step * self.step_buckets // t, self.step_buckets - 1)
        lo, hi = bucket * t // self.step_buckets, (bucket + 1) * t // self.step_buckets
        return max(lo, (lo + hi - 1) // 2)

    def unit_tokens(self, *, step: int, tokens: int, layer: int, layers: int, list_index: int, kind: str) -> int:
        """k of one unit on a partial step `step`: int(float32(clamp(r_eff, 0, 1)) * tokens)."""
        r = RATIO_SCHEDULES[self.ratio_schedule].factor(
            step=self.schedule_step(step), num_steps=self.num_steps, layer=layer, layers=layers,
            list_index=list_index, kind=kind, ratio=self.fresh_ratio)
        return fresh_count(r, tokens)

    @property
    def planned_steps(self) -> int | None:
        """num_steps when the schedule or the ratio schedule counts the sampler's steps (k follows progress)."""
        if self.schedule != "counter" or RATIO_SCHEDULES[self.ratio_schedule].step_weight:
            return self.num_steps
        return None

    @property
    def selects_by_score(self) -> bool:
        """Whether partial steps choose their tokens in the graph (ToCa's machinery) rather than by a flat draw."""
        return True
