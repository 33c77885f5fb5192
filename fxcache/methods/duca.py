"""DuCa: within each cycle, conservative steps (random-token partial recompute) alternate with aggressive ones
(no block runs; the head reads the cached last-block output)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_fraction, check_int, check_seed, register_method
from ..errors import UnsupportedGraphError
from ..graph_io import Role
from ..passes import expose_final, expose_units, read_final, recompute_subset, reuse_units
from ..step_plan import BlockKind, BlockStep
from ..analysis.scored import scored_units
from .recipe import Recipe, partial_units, register_recipe, units_in
from .schedule import SCHEDULES, Cyclic, SeededDraws, check_schedule
from .selection import TokenSelection
from .toca import build_selection


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class DuCaConfig(TokenSelection, Cyclic, SeededDraws, CacheConfig):
    """Dual caching (DuCa, arXiv 2412.18911).

    Steps count up from 0 in sampling order; j = position in the cycle (0 = FULL). j odd -> PARTIAL
    (conservative: attention from cache, token-wise units recomputed on 1 - ratio of their tokens);
    j even >= 2 -> SKIP (aggressive: no block runs; the head gets the cached last-block output and the current
    timestep). N=5: FULL PARTIAL SKIP PARTIAL SKIP.

    Token choice: by default a random `1 - ratio` fraction per token stream (the same draw for every unit of a
    stream). The authors' DiT and PixArt code makes conservative steps ToCa steps (ALGORITHMS.md erratum 8): set
    `score` (any of ToCa's), `staleness_weight`, `spatial_grid` / `spatial_bonus`, `ratio_schedule` (k per step,
    layer and unit: `fresh_ratio` = 1 - ratio scaled by it) and `rows`, with ToCa's meaning (see ToCaConfig);
    any of them set, the tokens are chosen in the graph per unit as ToCa does.

    Args:
        interval: N, cycle length (paper default 5). 1 disables caching.
        ratio: fraction of tokens *cached* on a PARTIAL step (paper "R=90%" -> 0.9); 1 - ratio is recomputed.
        warmup_steps: W, leading FULL steps (1; the FLUX references use 3).
        seed: seed of the token choice; reseeded at the start of every generation, so runs repeat.
        schedule: "counter" (above); "dit": the DiT reference's per-block schedule (see ToCaConfig; a FULL block 0
            may precede aggressive blocks: that step runs block 0 for its caches, then the head on the cached
            output); "pixart": the PixArt reference's; "countdown": a fixed interval counted down from the last
            step. All but "counter" need num_steps.
    """

    method = "duca"
    CHOICES: ClassVar[dict] = {"schedule": SCHEDULES}
    #: DuCa v2 paper, FLUX.1-dev: N=5, R=90%, W=3 (2.93x latency, IR 0.9896; FULL 12 of 50, with the ToCa FLUX
    #: ratio schedule its FLOPs row fits: erratum 8); HunyuanVideo reference (Cache4Diffusion): N=5, R=90%, W=1,
    #: random tokens with the FLUX layer / stream factors. DiT (DuCa-DiT README: N=3, r=0.05, attention score,
    #: lambda3 0.25, bonus 2x2 / 0.8, the ToCa DDIM-50 ratio schedule, the per-block modulo schedule: FULL 18,
    #: mixed 2, conservative 22, aggressive 8 of 50 steps: docs/authors/dit-schedules.md section 3).
    #: PixArt (DuCa-PixArt README: N=3, r=0.75, cross-attention entropy, lambda3 0.25, bonus 4x4 / 0.4, the
    #: PixArt ratio schedule for 20 steps; its interval is constant: FULL iff s % 3 == 0, conservative at s % 3 == 1,
    #: aggressive at s % 3 == 2, the counter schedule with W=1). The dit and pixart presets' plans are checked
    #: against tables read from the authors' code (tests/authors/); flux and video carry the published settings,
    #: and nothing checks them against the authors' FLUX or video code.
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=5, ratio=0.9, warmup_steps=3, ratio_schedule="flux"),
        "video": dict(interval=5, ratio=0.9, warmup_steps=1, ratio_schedule="flux"),
        "dit": dict(interval=3, ratio=0.95, warmup_steps=1, schedule="dit", num_steps=50, score="attention",
                    staleness_weight=0.25, spatial_grid=2, spatial_bonus=0.8, ratio_schedule="dit-ddim50",
                    rows="each"),
        "pixart": dict(interval=3, ratio=0.25, warmup_steps=1, score="cross_entropy", staleness_weight=0.25,
                       spatial_grid=4, spatial_bonus=0.4, ratio_schedule="pixart", num_steps=20, rows="each"),
    }
    interval: int = 5
    ratio: float = 0.9
    warmup_steps: int = 1
    seed: int = 0
    schedule: str = "counter"
    num_steps: int | None = None

    def _validate(self) -> None:
        check_int("DuCaConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_schedule("DuCaConfig", self.schedule, self.num_steps)
        check_fraction("DuCaConfig", "ratio", self.ratio)
        object.__setattr__(self, "ratio", float(self.ratio) + 0.0)  # 1 == 1.0, -0.0 == 0.0: one cache_key
        check_int("DuCaConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_seed("DuCaConfig", self.seed)
        self._validate_selection("DuCaConfig")

    @property
    def fresh_ratio(self) -> float:
        return round(1.0 - float(self.ratio), 12)  # 1 - 0.95 is 0.05, as the authors' r = 0.05

    @property
    def selects_by_score(self) -> bool:
        """Whether conservative steps choose tokens as ToCa does (any selection option set), else a flat draw."""
        return (self.score != "random" or self.staleness_weight > 0 or self.spatial_bonus > 0
                or self.ratio_schedule != "flat")

    @property
    def kinds(self) -> frozenset[StepKind]:
        if self.schedule != "counter":
            return frozenset({StepKind.FULL, StepKind.PARTIAL, StepKind.SKIP})
        kinds = {StepKind.FULL}
        if self.interval >= 2:
            kinds.add(StepKind.PARTIAL)
        if self.interval >= 3:
            kinds.add(StepKind.SKIP)
        return frozenset(kinds)

    def step_kind(self, step: int) -> StepKind:
        j = self.position(step)
        if j == 0:
            return StepKind.FULL
        return StepKind.PARTIAL if j % 2 == 1 else StepKind.SKIP


@register_recipe(DuCaConfig)
class DuCaRecipe(Recipe):
    """FULL blocks write every unit output; PARTIAL blocks read attention from the cache and recompute each
    token-wise unit on k tokens: a flat random draw per stream (`tokens_for`), or, with selection options, ToCa's
    in-graph choice per unit; SKIP steps run no block (except a FULL block 0 of a mixed step, for its caches) and
    read the last block's output, which the other steps write."""

    block_kinds = frozenset({BlockKind.PARTIAL})

    def block_step(self, kind, step, units) -> BlockStep:
        c = self.config
        if c.selects_by_score:
            return BlockStep(BlockKind.PARTIAL, tuple(
                c.unit_tokens(step=step, tokens=u.tokens, layer=u.layer, layers=u.layers, list_index=u.list_index,
                              kind=u.kind) for u in units if u.partial))
        return BlockStep(BlockKind.PARTIAL, tuple(c.tokens_for(u.tokens) for u in units if u.partial))

    def layout(self, graph):
        if not self.caches or not self.config.selects_by_score:
            return {}
        return {su.unit.name: su for su in scored_units(graph, self.config.score)}

    def check_io(self, plan, view, inputs) -> str:
        if self.config.selects_by_score:
            for v in inputs:
                if v.role is Role.INDICES:
                    return f"it takes drawn token indices ({v.key.name}), but the config chooses tokens by score"
            return super().check_io(plan, view, inputs)
        ks = {u.tokens: k for units, block in zip(view.blocks, plan.blocks) if block.kind is BlockKind.PARTIAL
              for u, k in zip([u for u in units if u.partial], block.k)}
        for v in inputs:
            if v.role is Role.INDICES and ks.get(v.key.tokens) != v.shape[1]:
                return (f"{v.key.name} recomputes {v.shape[1]} tokens, but the config recomputes "
                        f"{ks.get(v.key.tokens, 0)} of {v.key.tokens}")
        return super().check_io(plan, view, inputs)

    def build(self, b, graph, plan, layout) -> None:
        c = self.config
        if plan.kind is StepKind.SKIP:
            if plan.uses(BlockKind.FULL) and self.caches:  # a mixed step: block 0 refreshes its caches
                if c.selects_by_score:
                    build_selection(b, graph, plan, layout, c, True)
                else:
                    expose_units(b, units_in(graph, plan, BlockKind.FULL))
            read_final(b, graph.last_outputs)
            return
        if c.selects_by_score:
            build_selection(b, graph, plan, layout, c, self.caches)
        else:
            self._build_drawn(b, graph, plan)
        if StepKind.SKIP in c.kinds:
            expose_final(b, graph.last_outputs)

    def _build_drawn(self, b, graph, plan) -> None:
        if self.caches:
            expose_units(b, units_in(graph, plan, BlockKind.FULL))
        recomputed, reused = partial_units(graph, plan)
        reuse_units(b, reused)
        streams: dict[int, list] = {}
        ks: dict[int, int] = {}
        for unit, k in recomputed:
            if ks.setdefault(unit.tokens, k) != k:
                raise UnsupportedGraphError(f"DuCa recomputes one k per token stream; {unit.name} has k={k}, "
                                            f"its stream k={ks[unit.tokens]}")
            streams.setdefault(unit.tokens, []).append(unit)
        recompute_subset(b, streams, ks)
