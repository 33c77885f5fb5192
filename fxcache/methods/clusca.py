"""ClusCa: TaylorSeer plus a cheap spatial refresh: one recomputed token per k-means cluster, propagated."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..analysis.clusters import cluster_groups
from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_fraction, check_int, check_seed, register_method
from ..errors import UnsupportedGraphError
from ..graph_io import Role
from ..passes import cluster_tokens, forecast_units, refresh_clusters, update_factors
from ..step_plan import BlockKind
from .recipe import Recipe, register_recipe, units_in
from .schedule import Cyclic, SeededDraws, check_schedule

#: Lloyd iterations run at every FULL step and are unrolled when lowered or exported (the papers use 10-100)
MAX_KMEANS_ITERS = 1000


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusCaConfig(Cyclic, SeededDraws, CacheConfig):
    """Cluster-driven caching (ClusCa, arXiv 2509.10312), on TaylorSeer forecasting.

    FULL steps follow the schedule (below; by default W warm-up steps, then one every N) and update the Taylor
    factors as TaylorSeer does. They also run k-means (L1 distance, mean centroids, `kmeans_iters` Lloyd iterations,
    warm-started from the previous centroids) per batch row on the residual stream after the last block that
    holds a refreshed unit, once per token stream (image, text). Every other step is CLUSTER: every unit is
    forecast; each refreshed unit (the token-wise feed-forward units of the first block list: FLUX double
    blocks, DiT/PixArt/SD3 blocks) is recomputed exactly on one random member per cluster, its Taylor anchor F_0
    moves so the forecast of those rows equals the exact value, and in the largest token stream every token
    moves by `gamma * (value of its cluster's member - its forecast)`.

    Args:
        interval: N (FLUX 5). order: Taylor order m (FLUX 1). clusters: K per batch row and stream (16); a
            stream with fewer tokens than K gets one cluster per token.
        gamma: propagation weight (FLUX 0.005). warmup_steps: W (FLUX 3). kmeans_iters: Lloyd iterations (10, at
            most 1000: lowered and exported graphs unroll them).
        seed: seed of the k-means initialisation and of the member choice, reseeded every generation.
        schedule: "counter" (W warm-up steps, then one FULL step every N), or "countdown": the DiT references'
            fixed interval counted down from the last step, FULL when step < W or (num_steps - 1 - step) % N == 0
            (the last step is always FULL). num_steps: the sampler's step count, needed by "countdown".
    Defaults are the paper's FLUX.1-dev setting.
    """

    method = "clusca"
    #: ClusCa paper / Cache4Diffusion defaults: FLUX.1-dev N=5, O=1, K=16, gamma=0.005, W=3, 10 k-means
    #: iterations: 12 FULL steps of 50, at most about 4.17x FLOPs (the paper's 4.96x headline needs about 10 FULL
    #: steps, another setting: ALGORITHMS.md erratum 11); DiT-XL/2 DDIM-50 N=4, O=4, K=16, gamma=0 (sample.py),
    #: 100 iterations, FULL at s = 0, 1, 5, ..., 49 (the authors' countdown, docs/authors/dit-schedules.md
    #: section 5); HunyuanVideo N=5, O=1, K=32, gamma=0.01, W=1, 10 iterations (LinCa: 4.99x FLOPs, VBench 79.99).
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=5, order=1, clusters=16, gamma=0.005, warmup_steps=3, kmeans_iters=10),
        "dit": dict(interval=4, order=4, clusters=16, gamma=0.0, warmup_steps=1, kmeans_iters=100,
                    schedule="countdown", num_steps=50),
        "video": dict(interval=5, order=1, clusters=32, gamma=0.01, warmup_steps=1, kmeans_iters=10),
    }
    interval: int = 5
    order: int = 1
    clusters: int = 16
    gamma: float = 0.005
    warmup_steps: int = 3
    kmeans_iters: int = 10
    seed: int = 0

    schedule: str = "counter"
    num_steps: int | None = None

    def _validate(self) -> None:
        check_int("ClusCaConfig", "interval", self.interval, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_int("ClusCaConfig", "order", self.order, minimum=0, maximum=8, why="the papers use 1-4")
        check_int("ClusCaConfig", "clusters", self.clusters, minimum=1)
        check_fraction("ClusCaConfig", "gamma", self.gamma)
        object.__setattr__(self, "gamma", float(self.gamma) + 0.0)
        check_int("ClusCaConfig", "warmup_steps", self.warmup_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_schedule("ClusCaConfig", self.schedule, self.num_steps, allowed=("counter", "countdown"))
        check_int("ClusCaConfig", "kmeans_iters", self.kmeans_iters, minimum=0, maximum=MAX_KMEANS_ITERS,
                  why="the papers use 10-100; lowered or exported graphs unroll them")
        check_seed("ClusCaConfig", self.seed)

    @property
    def taylor_order(self) -> int:
        return self.order

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.CLUSTER}) if self.interval > 1 else frozenset({StepKind.FULL})

    def step_kind(self, step: int) -> StepKind:
        j = self.position(step)
        return StepKind.FULL if j == 0 else StepKind.CLUSTER


@register_recipe(ClusCaConfig)
class ClusCaRecipe(Recipe):
    """FULL steps update the Taylor factors and cluster each refreshed stream (k-means); CLUSTER steps forecast
    every unit and refresh the refreshed units from one recomputed member per cluster. Steps are uniform: the
    clustering belongs to the whole step."""

    block_kinds = frozenset({BlockKind.CLUSTER})

    def layout(self, graph):
        return cluster_groups(graph, self.config.clusters) if self.caches else {}

    def check_io(self, plan, view, inputs) -> str:
        for v in inputs:
            if v.role is Role.PERMUTATION and v.shape[0] != min(self.config.clusters, v.key.tokens):
                return (f"{v.key.name} starts k-means from {v.shape[0]} tokens, but config clusters="
                        f"{self.config.clusters} needs {min(self.config.clusters, v.key.tokens)}")
        return super().check_io(plan, view, inputs)

    def build(self, b, graph, plan, layout) -> None:
        c = self.config
        if plan.kind is StepKind.FULL:
            if self.caches:
                update_factors(b, units_in(graph, plan, BlockKind.FULL), c.order)
                cluster_tokens(b, layout, c.kmeans_iters)
            return
        if plan.count(BlockKind.CLUSTER) != len(plan.blocks):
            raise UnsupportedGraphError(f"ClusCa builds uniform CLUSTER steps only, not {plan.label}")
        forecast_units(b, units_in(graph, plan, BlockKind.CLUSTER), c.order)
        refresh_clusters(b, layout, c.gamma)
