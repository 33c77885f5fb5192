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
from .recipe import Recipe, partial_units, register_recipe, units_in
from .schedule import Cyclic, SeededDraws, check_schedule


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class DuCaConfig(Cyclic, SeededDraws, CacheConfig):
    """Dual caching (DuCa, arXiv 2412.18911).

    Steps count up from 0 in sampling order; j = position in the cycle (0 = FULL). j odd -> PARTIAL
    (token-wise units recomputed on a random `1 - ratio` fraction of tokens, attention from cache);
    j even >= 2 -> SKIP (no block runs; the head gets the cached last-block output and the current
    timestep). N=5: FULL PARTIAL SKIP PARTIAL SKIP.

    Args:
        interval: N, cycle length (paper default 5). 1 disables caching.
        ratio: fraction of tokens *cached* on a PARTIAL step (paper "R=90%" -> 0.9); 1 - ratio is recomputed.
        warmup_steps: W, leading FULL steps (1; the FLUX references use 3).
        seed: seed of the token choice; reseeded at the start of every generation, so runs repeat.
        schedule: "counter" (above), or the DiT / PixArt references' "dit" / "pixart" schedules, whose interval
            follows the sampling progress (need num_steps; see methods.schedule.progress_position).
            "countdown": a fixed interval counted down from the last step (needs num_steps).
    """

    method = "duca"
    #: DuCa v2 paper, FLUX.1-dev: N=5, R=90%, W=3 (2.93x latency, IR 0.9896); HunyuanVideo reference: N=5,
    #: R=90%, W=1 (random tokens, no staleness); DiT README: N=3, r=0.05 (the reference scores by attention,
    #: fxcache's DuCa always picks random tokens); PixArt README: N=3, r=0.75. DiT uses the modulo schedule of
    #: its reference (interval following the progress; num_steps assumed 50: pass yours). DuCa-PixArt keeps the
    #: interval constant (its force_scheduler's step weight is 0 in both branches; cal_type: FULL iff s % N == 0,
    #: odd positions conservative, even aggressive), which is the counter schedule with W=1.
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=5, ratio=0.9, warmup_steps=3),
        "video": dict(interval=5, ratio=0.9, warmup_steps=1),
        "dit": dict(interval=3, ratio=0.95, warmup_steps=1, schedule="dit", num_steps=50),
        "pixart": dict(interval=3, ratio=0.25, warmup_steps=1),
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

    @property
    def fresh_ratio(self) -> float:
        return 1.0 - float(self.ratio)

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
    token-wise unit on `k = tokens_for(tokens)` drawn tokens per stream; SKIP steps run no block and read the last
    block's output, which the other steps write."""

    block_kinds = frozenset({BlockKind.PARTIAL})

    def block_step(self, kind, step, units) -> BlockStep:
        return BlockStep(BlockKind.PARTIAL, tuple(self.config.tokens_for(u.tokens) for u in units if u.partial))

    def check_io(self, plan, view, inputs) -> str:
        ks = {u.tokens: k for units, block in zip(view.blocks, plan.blocks) if block.kind is BlockKind.PARTIAL
              for u, k in zip([u for u in units if u.partial], block.k)}
        for v in inputs:
            if v.role is Role.INDICES and ks.get(v.key.tokens) != v.shape[1]:
                return (f"{v.key.name} recomputes {v.shape[1]} tokens, but the config recomputes "
                        f"{ks.get(v.key.tokens, 0)} of {v.key.tokens}")
        return super().check_io(plan, view, inputs)

    def build(self, b, graph, plan, layout) -> None:
        if plan.kind is StepKind.SKIP:
            read_final(b, graph.last_outputs)
            return
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
        if StepKind.SKIP in self.config.kinds:
            expose_final(b, graph.last_outputs)
