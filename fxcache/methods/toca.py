"""ToCa: token-wise caching. FULL, then partial steps that recompute the highest-scoring tokens of each
token-wise unit and reuse attention whole."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from ..analysis.scored import scored_units
from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_fraction, check_int, check_seed, register_method
from ..errors import ConfigError
from ..graph_io import Role, Slot
from ..passes import Selection, expose_units, record_scores, reuse_units, select_and_recompute
from ..step_plan import BlockKind, BlockStep
from .recipe import Recipe, partial_units, register_recipe, units_in
from .schedule import Cyclic, SeededDraws, check_schedule

SCORES = ("random", "staleness", "knorm", "vnorm", "similarity", "attention", "cross_entropy")


@dataclasses.dataclass(frozen=True)
class RatioSchedule:
    """r_eff = clamp(r * f_step * f_layer * f_unit * f_stream, 0, 1) (ALGORITHMS.md 3.4).

    f_step = 1 - step_weight + 2 * step_weight * p, p = (s + progress_offset) / T (needs num_steps);
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
               kind: str) -> float:
        f = 1.0
        if self.step_weight:
            p = (step + self.progress_offset) / num_steps
            f *= 1.0 - self.step_weight + 2.0 * self.step_weight * p
        if self.layer_weight:
            depth = 27 if self.reference_depth else max(layers - 1, 1)
            f *= 1.0 + self.layer_weight - 2.0 * self.layer_weight * layer / depth
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


MAX_SPATIAL_GRID = 64  # cells per side of the spatial bonus grid (the references use 2-4)
MAX_STEP_BUCKETS = 64  # k tables per generation: each is one more compiled PARTIAL variant


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class ToCaConfig(Cyclic, SeededDraws, CacheConfig):
    """Token-wise caching (ToCa, arXiv 2410.05317).

    Counter schedule: W warm-up FULL steps, then FULL every N steps; the others are PARTIAL: attention units
    reuse their cache whole, each token-wise unit (feed-forward, cross-attention, FLUX's fused projection)
    recomputes its k highest-scoring tokens and scatters them into its cache. k = floor(r_eff * tokens) is fixed
    per unit within a compiled variant; selection runs inside the graph (top-k on device).

    Score S = base + staleness_weight * staleness / N, then the spatial bonus, then top-k:
      base: "random" (uniform), "staleness" (0: pure cache frequency), "knorm" / "vnorm" (per-token key / value
      norms of the block's attention at the last FULL step, summed over heads; `prefer="low"` picks the smallest),
      "similarity" (1 - cosine between the unit's current input and its input at the last FULL step),
      "attention" (s1: attention each token receives at the last FULL step, head- and query-mean; joint
      attention is sliced to the unit's stream), "cross_entropy" (s2: 1 + entropy of each token's head-mean
      cross-attention distribution, averaged over batch rows; blocks with cross-attention only).
      The two attention scores materialise the attention map of every block at FULL steps (one head at a time:
      B x L x L floats extra, and the QK^T FLOPs again); SDPA keeps running for the block itself. The others
      cost nearly nothing.
      Scores are averaged over batch rows, so every row (and both halves of a batched CFG call) refreshes the
      same tokens. staleness counts the partial steps since a token was last recomputed; FULL resets it.
      spatial bonus: square token grids only; the grid is cut into cells of `spatial_grid` x `spatial_grid` tokens
      and each cell's best token gets S += spatial_bonus * S.

    Args:
        interval: N (FLUX reference 4). fresh_ratio: r, the fraction recomputed (README "R=0.1").
        warmup_steps: W (FLUX 3). score, prefer, staleness_weight (lambda3; 0.25 in the ToCa repo),
        spatial_grid: the side of a bonus cell in tokens (0 = off; DiT 2, PixArt 4; at most 64), spatial_bonus
        (DiT 0.6, PixArt 0.4).
        ratio_schedule: a name of RATIO_SCHEDULES ("flat" default); schedules with a step weight need
        num_steps, and then use `step_buckets` distinct k tables per generation (one compiled variant each; at
        most 64).
        seed: seed of the random score.
        schedule: "counter" (above), or the DiT / PixArt references' "dit" / "pixart" schedules, whose interval
            follows the sampling progress (need num_steps).
            "countdown": a fixed interval counted down from the last step (needs num_steps).
    """

    method = "toca"
    #: ToCa README defaults (ALGORITHMS.md 3.5): FLUX.1-dev 50 steps N=4, W=3, r=0.1, attention score, lambda3
    #: 0.25, FLUX ratio schedule (2.94x FLOPs, IR 0.9798); DiT-XL/2 DDIM-50 N=3, r=0.07, attention score,
    #: lambda3 0.25, ddim50 schedule, spatial bonus 2x2 / 0.6; PixArt-alpha N=3, r=0.3, cross-attention entropy,
    #: lambda3 0.25, PixArt schedule (20 steps assumed: pass num_steps), bonus 4x4 / 0.4; OpenSora-like video
    #: N=3, W=3, r=0.1, cross-attention entropy, lambda3 0.25, OpenSora schedule. DiT and PixArt use their
    #: references' progress-dependent intervals (schedule="dit" / "pixart").
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=4, warmup_steps=3, fresh_ratio=0.1, score="attention", staleness_weight=0.25,
                     ratio_schedule="flux"),
        "dit": dict(interval=3, warmup_steps=1, fresh_ratio=0.07, score="attention", staleness_weight=0.25,
                    ratio_schedule="dit-ddim50", num_steps=50, spatial_grid=2, spatial_bonus=0.6, schedule="dit"),
        "pixart": dict(interval=3, warmup_steps=1, fresh_ratio=0.3, score="cross_entropy", staleness_weight=0.25,
                       ratio_schedule="pixart", num_steps=20, spatial_grid=4, spatial_bonus=0.4, schedule="pixart"),
        "video": dict(interval=3, warmup_steps=3, fresh_ratio=0.1, score="cross_entropy", staleness_weight=0.25,
                      ratio_schedule="opensora"),
    }
    interval: int = 4
    fresh_ratio: float = 0.1
    warmup_steps: int = 1
    score: str = "random"
    prefer: str = "low"
    staleness_weight: float = 0.0
    spatial_grid: int = 0
    spatial_bonus: float = 0.0
    ratio_schedule: str = "flat"
    num_steps: int | None = None
    step_buckets: int = 4
    seed: int = 0
    schedule: str = "counter"

    def _validate(self) -> None:
        check_int("ToCaConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_fraction("ToCaConfig", "fresh_ratio", self.fresh_ratio)
        object.__setattr__(self, "fresh_ratio", float(self.fresh_ratio) + 0.0)
        check_int("ToCaConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        if self.score not in SCORES:
            raise ConfigError(f"ToCaConfig.score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.prefer not in ("low", "high"):
            raise ConfigError(f"ToCaConfig.prefer must be 'low' or 'high', got {self.prefer!r}")
        for name in ("staleness_weight", "spatial_bonus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"ToCaConfig.{name} must be a number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v) + 0.0)
        check_int("ToCaConfig", "spatial_grid", self.spatial_grid, minimum=0, maximum=MAX_SPATIAL_GRID,
                  why="cells per side of the token grid; the references use 2-4")
        if self.ratio_schedule not in RATIO_SCHEDULES:
            raise ConfigError(f"ToCaConfig.ratio_schedule must be one of {', '.join(RATIO_SCHEDULES)}, "
                              f"got {self.ratio_schedule!r}")
        check_schedule("ToCaConfig", self.schedule, self.num_steps)
        if RATIO_SCHEDULES[self.ratio_schedule].step_weight and self.num_steps is None:
            raise ConfigError(f"ToCaConfig.ratio_schedule={self.ratio_schedule!r} changes the ratio with the "
                              "sampling progress: pass num_steps (the sampler's step count)")
        check_int("ToCaConfig", "step_buckets", self.step_buckets, minimum=1, maximum=MAX_STEP_BUCKETS,
                  why="each bucket is one more compiled PARTIAL variant")
        check_seed("ToCaConfig", self.seed)

    @property
    def kinds(self) -> frozenset[StepKind]:
        if self.interval > 1 or self.schedule != "counter":
            return frozenset({StepKind.FULL, StepKind.PARTIAL})
        return frozenset({StepKind.FULL})

    @property
    def selects_in_graph(self) -> bool:
        return True

    def step_kind(self, step: int) -> StepKind:
        j = self.position(step)
        return StepKind.FULL if j == 0 else StepKind.PARTIAL

    def schedule_step(self, step: int) -> int:
        """The step whose progress sets f_step: the middle of `step`'s bucket (0 without a step weight)."""
        if not RATIO_SCHEDULES[self.ratio_schedule].step_weight:
            return 0
        t = self.num_steps
        bucket = min(step * self.step_buckets // t, self.step_buckets - 1)
        lo, hi = bucket * t // self.step_buckets, (bucket + 1) * t // self.step_buckets
        return max(lo, (lo + hi - 1) // 2)

    def unit_tokens(self, *, step: int, tokens: int, layer: int, layers: int, list_index: int, kind: str) -> int:
        """k of one unit on PARTIAL step `step`: floor(clamp(r_eff, 0, 1) * tokens)."""
        f = RATIO_SCHEDULES[self.ratio_schedule].factor(
            step=self.schedule_step(step), num_steps=self.num_steps, layer=layer, layers=layers,
            list_index=list_index, kind=kind)
        r = min(max(self.fresh_ratio * f, 0.0), 1.0)
        return int(r * tokens + 1e-9)


@register_recipe(ToCaConfig)
class ToCaRecipe(Recipe):
    """FULL blocks write every unit output and each scored unit's score; PARTIAL blocks read attention from the
    cache and let each token-wise unit choose its k tokens in the graph (k from the ratio schedule, per unit)."""

    block_kinds = frozenset({BlockKind.PARTIAL})

    def block_step(self, kind, step, units) -> BlockStep:
        c = self.config
        return BlockStep(BlockKind.PARTIAL, tuple(
            c.unit_tokens(step=step, tokens=u.tokens, layer=u.layer, layers=u.layers, list_index=u.list_index,
                          kind=u.kind) for u in units if u.partial))

    def layout(self, graph):
        if not self.caches:
            return {}
        return {su.unit.name: su for su in scored_units(graph, self.config.score)}

    def check_io(self, plan, view, inputs) -> str:
        score = self.config.score
        for v in inputs:
            if v.key.slot is Slot.SCORE_DRAW and score != "random":
                return f"it draws random scores ({v.key.name}), but the config's score is {score!r}"
            if v.key.slot is Slot.SCORE and score in ("random", "staleness"):
                return f"it reads recorded scores ({v.key.name}), but the config's score is {score!r}"
            if v.role is Role.INDICES:
                return f"it takes drawn token indices ({v.key.name}), which ToCa chooses in the graph"
        return super().check_io(plan, view, inputs)

    def build(self, b, graph, plan, layout) -> None:
        c = self.config
        if self.caches:
            full = units_in(graph, plan, BlockKind.FULL)
            expose_units(b, full)
            record_scores(b, [layout[u.name] for u in full if u.name in layout], c.score, c.prefer == "low")
        recomputed, reused = partial_units(graph, plan)
        reuse_units(b, reused)
        how = Selection(c.score, c.staleness_weight, c.interval, c.spatial_grid, c.spatial_bonus)
        select_and_recompute(b, [(layout[u.name], k) for u, k in recomputed], how)
