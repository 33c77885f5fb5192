"""ToCa: token-wise caching. FULL, then partial steps that recompute the highest-scoring tokens of each
token-wise unit and reuse attention whole."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..analysis.scored import scored_units
from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_fraction, check_int, check_seed, register_method
from ..graph_io import Key, Role, Slot
from ..passes import (Selection, age_unrefreshed, expose_units, record_scores, restart_staleness, reuse_units,
                      select_and_recompute)
from ..step_plan import BlockKind, BlockStep
from .recipe import Recipe, partial_units, register_recipe, units_in
from .schedule import SCHEDULES, Cyclic, SeededDraws, check_schedule
from .selection import MAX_SPATIAL_GRID, MAX_STEP_BUCKETS, RATIO_SCHEDULES, SCORES, RatioSchedule, TokenSelection

__all__ = ["MAX_SPATIAL_GRID", "MAX_STEP_BUCKETS", "RATIO_SCHEDULES", "SCORES", "RatioSchedule", "ToCaConfig",
           "ToCaRecipe"]


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class ToCaConfig(TokenSelection, Cyclic, SeededDraws, CacheConfig):
    """Token-wise caching (ToCa, arXiv 2410.05317).

    Counter schedule: W warm-up FULL steps, then FULL every N steps; the others are PARTIAL: attention units
    reuse their cache whole, each token-wise unit (feed-forward, cross-attention, FLUX's fused projection)
    recomputes its k highest-scoring tokens and scatters them into its cache. k = int(float32(r_eff) * tokens)
    follows the step, the layer and the unit (ratio schedule); each distinct k table is one more PARTIAL variant,
    built on first use (no recompile); selection runs inside the graph (top-k on device).

    Score S = base + staleness_weight * staleness / N, then the spatial bonus, then top-k:
      base: "random" (uniform, the same for every batch row), "staleness" (0: pure cache frequency), "knorm" /
      "vnorm" (per-token key / value norms of the block's attention at the last FULL step, summed over heads;
      `prefer="low"` picks the smallest), "similarity" (1 - cosine between the unit's current input and its input
      at the last FULL step), "attention" (s1: attention each token receives at the last FULL step, head- and
      query-mean; joint attention is sliced to the unit's stream; any projection layout, fused qkv included;
      an attention written out as softmax(q k^T) is read from its softmax),
      "cross_entropy" (s2: 1 + entropy of each token's head-mean cross-attention distribution; with rows="each"
      the two halves of an even batch, a CFG call's [uncond; cond] of one prompt, share theirs as the authors'
      PixArt code averages them; blocks with cross-attention only).
      The two attention scores materialise the attention map of every block at FULL steps (one head at a time:
      B x L x L floats extra, and the QK^T FLOPs again); SDPA keeps running for the block itself. The others
      cost nearly nothing.
      rows: "shared" (default: scores averaged over the batch rows, every row refreshes the same tokens; measured
      at least as good as "each" on the three trained references, BENCHMARKS.md, but a prompt's tokens then depend
      on the other prompts batched with it) or "each" (the authors' code and every preset: each batch row scores and
      picks its own tokens, with its own staleness; a row's result does not depend on the rest of its batch).
      staleness counts the partial steps since a token was last recomputed, on every partial call of a unit,
      also those with k = 0 (as the authors' code); FULL resets it.
      spatial bonus: square token grids only; the grid is cut into cells of `spatial_grid` x `spatial_grid` tokens
      and each cell's best token gets S += spatial_bonus * S.

    Args:
        interval: N (FLUX reference 4). fresh_ratio: r, the fraction recomputed (README "R=0.1").
        warmup_steps: W (FLUX 3). score, prefer, rows, staleness_weight (lambda3; 0.25 in the ToCa repo; the
        divisor is N, also under the "dit" schedule), spatial_grid: the side of a bonus cell in tokens (0 = off;
        DiT 2, PixArt 4; at most 64), spatial_bonus (DiT 0.6, PixArt 0.4).
        ratio_schedule: a name of RATIO_SCHEDULES ("flat" default); schedules with a step weight need
        num_steps. step_buckets: None (k follows every step, as the authors), or at most 64 buckets of steps
        sharing one k table (fewer compiled variants).
        seed: seed of the random score.
        schedule: "counter" (above); "dit": the DiT references' per-block schedule (i = T-1-s counts down; each
            block is FULL iff i mod Nt == 0; a FULL block 0 recomputes Nt = round(N / (1.4 - 0.8 i / T)), or 2 in
            the sensitive range, for the blocks after it, so some steps run block 0 FULL and the rest PARTIAL;
            with fresh_ratio 0, Nt = N throughout); "pixart": the PixArt reference's progress-dependent interval;
            "countdown": a fixed interval counted down from the last step. All but "counter" need num_steps.
    """

    method = "toca"
    CHOICES: ClassVar[dict] = {"schedule": SCHEDULES}
    #: ToCa README defaults (ALGORITHMS.md 3.5): FLUX.1-dev 50 steps N=4, W=3, r=0.1, attention score, lambda3
    #: 0.25, FLUX ratio schedule (2.94x FLOPs, IR 0.9798); DiT-XL/2 DDIM-50 N=3, r=0.07, attention score,
    #: lambda3 0.25, ddim50 schedule, spatial bonus 2x2 / 0.6; PixArt-alpha N=3, r=0.3, cross-attention entropy,
    #: lambda3 0.25, PixArt schedule (20 steps assumed: pass num_steps), bonus 4x4 / 0.4; OpenSora-like video
    #: N=3, W=3, r=0.1, cross-attention entropy, lambda3 0.25, OpenSora schedule. DiT and PixArt use their
    #: references' per-block, progress-dependent intervals (schedule="dit" / "pixart"): DiT 18 FULL steps, mixed
    #: steps (block 0 FULL, the rest PARTIAL) at s=4 and 17, k = 0 on every PARTIAL step s <= 11 and up to 156 of
    #: 256 tokens at s=48; PixArt (20 steps) FULL at s = 0, 6, 9, 12, 15, 18, mixed at s=4. The flux, dit and
    #: pixart presets reproduce their authors' code (plans checked against tables read from it, tests/authors/):
    #: scores and top-k per batch row, k per step, layer and unit (no buckets; each k table is one more compiled
    #: variant, about 30 on the DiT preset: pass step_buckets to bound them). The video preset carries the
    #: published OpenSora settings only: its plans are not checked against the authors' video code.
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=4, warmup_steps=3, fresh_ratio=0.1, score="attention", staleness_weight=0.25,
                     ratio_schedule="flux", rows="each"),
        "dit": dict(interval=3, warmup_steps=1, fresh_ratio=0.07, score="attention", staleness_weight=0.25,
                    ratio_schedule="dit-ddim50", num_steps=50, spatial_grid=2, spatial_bonus=0.6, schedule="dit",
                    rows="each"),
        "pixart": dict(interval=3, warmup_steps=1, fresh_ratio=0.3, score="cross_entropy", staleness_weight=0.25,
                       ratio_schedule="pixart", num_steps=20, spatial_grid=4, spatial_bonus=0.4, schedule="pixart",
                       rows="each"),
        "video": dict(interval=3, warmup_steps=3, fresh_ratio=0.1, score="cross_entropy", staleness_weight=0.25,
                      ratio_schedule="opensora", rows="each"),
    }
    interval: int = 4
    fresh_ratio: float = 0.1
    warmup_steps: int = 1
    num_steps: int | None = None
    seed: int = 0
    schedule: str = "counter"

    def _validate(self) -> None:
        check_int("ToCaConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_fraction("ToCaConfig", "fresh_ratio", self.fresh_ratio)
        object.__setattr__(self, "fresh_ratio", float(self.fresh_ratio) + 0.0)
        check_int("ToCaConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_schedule("ToCaConfig", self.schedule, self.num_steps)
        self._validate_selection("ToCaConfig")
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

    @property
    def fixed_interval(self) -> bool:
        return self.fresh_ratio == 0.0


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
        build_selection(b, graph, plan, layout, self.config, self.caches)


def selection_of(config) -> Selection:
    return Selection(config.score, config.staleness_weight, config.interval, config.spatial_grid,
                     config.spatial_bonus, config.rows == "each")


def build_selection(b, graph, plan, layout, config, caches: bool) -> None:
    """What ToCa's steps (and DuCa's conservative steps that choose tokens by score) build: FULL blocks write
    their unit outputs and scores (and, in a mixed step, restart their staleness); PARTIAL blocks reuse attention
    and recompute each scored unit's top-k tokens (units with k = 0 reuse their cache and age)."""
    how = selection_of(config)
    if caches:
        full = units_in(graph, plan, BlockKind.FULL)
        expose_units(b, full)
        scored = [layout[u.name] for u in full if u.name in layout]
        record_scores(b, scored, config.score, config.prefer == "low", how.each)
        if plan.kind is not StepKind.FULL:
            restart_staleness(b, scored, how)
    recomputed, reused = partial_units(graph, plan)
    reuse_units(b, reused)
    refreshed = select_and_recompute(b, [(layout[u.name], k) for u, k in recomputed], how)
    idle = [layout[u.name] for u in reused if u.name in layout]
    age_unrefreshed(b, idle, how)
    for su in idle:  # the block's refreshed s2 score is the score of its units that recompute nothing too
        if su.unit.block in refreshed:
            b.give(Role.CACHE, Key.score(su.name), refreshed[su.unit.block])
