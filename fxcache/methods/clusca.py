"""ClusCa: TaylorSeer plus a cheap spatial refresh: one recomputed token per k-means cluster, propagated."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..analysis.clusters import cluster_groups
from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_fraction, check_int, check_seed, register_method
from ..errors import UnsupportedGraphError
from ..graph_io import Role, Slot
from ..passes import cluster_tokens, forecast_units, refresh_clusters, update_factors
from ..step_plan import BlockKind
from .recipe import Recipe, read_units, register_recipe, units_in
from .schedule import FIXED_SCHEDULES, Cyclic, SeededDraws, check_schedule

#: Lloyd iterations run at every FULL step and are unrolled when lowered or exported (the papers use 10-100)
MAX_KMEANS_ITERS = 1000
#: the values of the options that choose between our formulation and the authors' code ("ref")
OPTION_VALUES = {"anchor": ("exact", "ref"), "draws": ("shared", "per_unit"), "kmeans": ("fixed", "ref")}


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusCaConfig(Cyclic, SeededDraws, CacheConfig):
    """Cluster-driven caching (ClusCa, arXiv 2509.10312), on TaylorSeer forecasting.

    FULL steps follow the schedule (below; by default W warm-up steps, then one every N) and update the Taylor
    factors as TaylorSeer does. They also run k-means (L1 distance, mean centroids, warm-started from the previous
    centroids) per batch row on the residual stream after the last block that holds a refreshed unit, once per
    token stream (image, text). Every other step is CLUSTER: every unit is forecast; each refreshed unit (the
    token-wise feed-forward units of the first block list: FLUX double blocks, DiT/PixArt/SD3 blocks) is
    recomputed exactly on one random member per cluster and batch row, its Taylor base F_0 takes those values
    (`anchor`) and in the largest token stream every token moves towards its cluster's value by `gamma`.

    Args:
        interval: N (FLUX 5). order: Taylor order m (FLUX 1). clusters: K per batch row and stream (16); a
            stream with fewer tokens than K gets one cluster per token.
        gamma: propagation weight (FLUX 0.005). warmup_steps: W (FLUX 3). kmeans_iters: Lloyd iterations (10; with
            kmeans="ref" the most, as the authors' max_iters; at most 1000: lowered and exported graphs unroll
            them).
        anchor: how the exact values of the refreshed rows enter the Taylor factors.
            "exact" (default, ours): F_0 moves so that the forecast of those rows equals the exact value
            (F_0[I] = y - sum_{i>=1} F_i d^i/i!), and propagation moves the forecast by gamma * (cluster value -
            forecast). "ref" (the authors' cache_functions/update_cache.py): the exact values overwrite F_0 in
            place (F_0[I] = y), so a refreshed row outputs y + sum_{i>=1} F_i d^i/i!; propagation blends F_0 only
            (F_0 = gamma * cluster value + (1 - gamma) * F_0, a cluster's value being the sum of its picks), and
            the next FULL step's first difference subtracts that overwritten F_0. The two agree at order 0.
        draws: who shares the random member choice of a CLUSTER step. "shared" (default, ours): one draw per
            stream serves every batch row and refreshed unit (K tokens per row and step; an empty cluster
            repeats a real pick). "per_unit" (the authors' select_fresh_tokens.py, a `torch.rand(B, N)` per
            block call): every refreshed unit and batch row draws its own members (about L x K distinct tokens
            per step), and an empty cluster picks token 0.
        kmeans: "fixed" (default, ours): exactly `kmeans_iters` iterations, a cluster that loses its members
            keeps its centroid, labels from the final centroids, a cold start from K distinct tokens shared by
            the rows. "ref" (the authors' cluster_utils/Kmeans.py): centroid = sums / (counts + 1e-8) in the
            feature's dtype (an empty cluster gets a zero centroid), stop once allclose(old, new, rtol=1e-4) over
            the batch (frozen in the graph, shapes stay static), labels of the last assignment, and a cold start
            from K tokens per row drawn with replacement (their `torch.randint(0, N, (B, K))`).
        seed: seed of the k-means starts and of the member choice; every draw is a pure function of (seed, step,
            stream), shared by the CFG branches of a step.
        schedule: "counter" (W warm-up steps, then one FULL step every N), or "countdown": the DiT references'
            fixed interval counted down from the last step, FULL when step < W or (num_steps - 1 - step) % N == 0
            (the last step is always FULL). num_steps: the sampler's step count, needed by "countdown".
    Defaults are the paper's FLUX.1-dev setting with our anchor, draws and k-means; the presets say which code
    they reproduce (PRESETS).
    """

    method = "clusca"
    CHOICES: ClassVar[dict] = {"schedule": FIXED_SCHEDULES, **OPTION_VALUES}
    #: Which code each preset reproduces (Cache4Diffusion @91a1949; docs/authors/dit-schedules.md section 5):
    #: - "flux": flux/clusca-flux (sample.py defaults): N=5, O=1, K=16, gamma=0.005 (image stream only), W=3, 10
    #:   k-means iterations, with the authors' anchor, per-unit draws and k-means. 12 FULL steps of 50: at most
    #:   50/12 = 4.17x FLOPs (the refreshes, 16 of 4096 image and of 512 text tokens in the double blocks' MLPs,
    #:   cost about 0.1% of a FULL step); the paper's 4.96x headline needs about 10 FULL steps, another setting
    #:   (ALGORITHMS.md erratum 11). Not reproduced: their bf16 propagation sums (float32 here) and the KeyError
    #:   of that snapshot (clustering writes `topk`, selection and propagation read `k`).
    #: - "dit": dit/clusca-dit (sample.py defaults), DiT-XL/2 DDIM-50: N=4, O=4, K=16, gamma=0, 100 k-means
    #:   iterations, FULL at s = 0, 1, 5, ..., 49 (their countdown: 14 FULL steps, 36 CLUSTER), the authors'
    #:   anchor, per-unit draws and k-means. At most 50/14 = 3.57x FLOPs; the 16-of-256-token MLP refreshes of
    #:   the 36 CLUSTER steps cost about 4% of a FULL step each, so about 3.2x.
    #: - "video": the published HunyuanVideo settings only, N=5, O=1, K=32, gamma=0.01, W=1, 10 iterations (LinCa:
    #:   4.99x FLOPs, VBench 79.99), with our anchor, draws and k-means: it does not reproduce the authors' video
    #:   code, and nothing checks it against that code.
    PRESETS: ClassVar[dict] = {
        "flux": dict(interval=5, order=1, clusters=16, gamma=0.005, warmup_steps=3, kmeans_iters=10,
                     anchor="ref", draws="per_unit", kmeans="ref"),
        "dit": dict(interval=4, order=4, clusters=16, gamma=0.0, warmup_steps=1, kmeans_iters=100,
                    schedule="countdown", num_steps=50, anchor="ref", draws="per_unit", kmeans="ref"),
        "video": dict(interval=5, order=1, clusters=32, gamma=0.01, warmup_steps=1, kmeans_iters=10),
    }
    interval: int = 5
    order: int = 1
    clusters: int = 16
    gamma: float = 0.005
    warmup_steps: int = 3
    kmeans_iters: int = 10
    anchor: str = "exact"
    draws: str = "shared"
    kmeans: str = "fixed"
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
        check_schedule("ClusCaConfig", self.schedule, self.num_steps)
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
    per_piece = False
    per_piece_why = "it clusters a stream's tokens once per step and every block reads those clusters"

    def layout(self, graph):
        return cluster_groups(graph, self.config.clusters) if self.caches else {}

    def check_io(self, plan, view, inputs) -> str:
        c = self.config
        for v in inputs:
            if v.key.slot is Slot.KMEANS_INIT:
                drawn = "ref" if v.role is Role.UNIFORM else "fixed"  # "ref": (B, K) uniforms; "fixed": (K,)
                if drawn != c.kmeans:
                    return f"{v.key.name} starts the kmeans={drawn!r} k-means, but config kmeans={c.kmeans!r}"
                if v.shape[-1] != min(c.clusters, v.key.tokens):
                    return (f"{v.key.name} starts k-means from {v.shape[-1]} tokens, but config clusters="
                            f"{c.clusters} needs {min(c.clusters, v.key.tokens)}")
            if v.key.slot is Slot.MEMBER_DRAW and (len(v.shape) == 3) != (c.draws == "per_unit"):
                return (f"{v.key.name} draws members {'per unit' if len(v.shape) == 3 else 'once per stream'}, "
                        f"but config draws={c.draws!r}")
        return super().check_io(plan, view, inputs)

    @staticmethod
    def _kept(graph, layout, units):
        """The units whose Taylor factors a CLUSTER step reads: all but those only another unit of their block
        reads (FLUX single-block attention), unless that block holds a refreshed unit, which recomputes its
        outer unit on the members from them."""
        refreshed = {u.block for group in layout.values() for u in group.units}
        read = {u.name for u in read_units(graph, units)}
        return [u for u in units if u.name in read or u.block in refreshed]

    def build(self, b, graph, plan, layout) -> None:
        c = self.config
        if plan.kind is StepKind.FULL:
            if self.caches:
                update_factors(b, self._kept(graph, layout, units_in(graph, plan, BlockKind.FULL)), c.order)
                cluster_tokens(b, layout, c.kmeans_iters, c.kmeans)
            return
        if plan.count(BlockKind.CLUSTER) != len(plan.blocks):
            raise UnsupportedGraphError(f"ClusCa builds uniform CLUSTER steps only, not {plan.label}")
        forecast_units(b, self._kept(graph, layout, units_in(graph, plan, BlockKind.CLUSTER)), c.order)
        refresh_clusters(b, layout, c.gamma, c.anchor, c.draws)
