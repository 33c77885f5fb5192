"""MagCache (arXiv 2506.09045, `Zehong-Ma/MagCache`): skip every block while the error a skip is modelled to make,
accumulated from calibrated magnitude ratios, stays within a threshold; a skipped call adds the residual of all
blocks from the last computed call to the stream before block 0.

Rules as diffusers 0.42.1 takes them (`diffusers/hooks/mag_cache.py`, cited below as `mag_cache.py` with its line
numbers; the design notes restate them in ADAPTIVE.md section 3):

- Ratios: `mag_ratios[s]` (gamma_s, one per step, calibrated on one sample) are float32 values (`torch.tensor` of
  the list, L130-131); a list of another length is resampled to `num_inference_steps` by nearest neighbour on a
  float32 grid with `torch.round` (half to even), and a single step takes the last value (`nearest_interp`, L69-80,
  applied in `__post_init__`, L133-137).
- Decision, once per call of a branch at step s (the head block hook, L202-224): no call before
  `S = int(retention_ratio * num_inference_steps + 0.5)` is skipped and the accumulators stay untouched; from S on,
  `ratio *= gamma_s`, `n += 1`, `err += |1 - ratio|`, and the call is skipped when a residual exists, `err <=
  threshold` and `n <= max_skip_steps`; a computed call resets `ratio, n, err = 1, 0, 0` (so its own gamma_s is
  discarded). `ratio` and `err` are float32 tensors there (a float times a float32 tensor element), so each
  product, difference and sum rounds to float32 and `err <= threshold` compares in float32 (the threshold rounded to
  float32: `float32(0.1) <= 0.1` holds there).
- A residual exists from step 1 on: step 0 of every request computes (the state starts empty, L140-168) and every
  computed call stores `H_L - H_0` (the tail hook, L330-360). So the decisions depend on the step alone, and MagCache
  is a static schedule here: `step_kind` walks the rule from step 0.
- Skipped call (L228-275, L306-326): no block runs; the image stream leaves the last block as `H_0 + R`, R the
  residual of all blocks of the last computed call. Here each output of the last block that is read after it is
  rebuilt from its stream before block 0 plus its own residual: in FLUX that is the image stream alone, as in
  diffusers. A model that also read a text stream after the last block would get that stream's own residual added,
  where diffusers passes the text input of block 0 through unchanged (L263-273).
- Requests: the step counter wraps at `num_inference_steps`, where the state resets (L380-395); a step past
  `num_steps` here is that step modulo `num_steps` (fxcache warns when a request runs past it).
- CFG: one state per `cache_context` name (`hooks.py` L79-83), so each branch walks the same schedule.

The original scripts differ in ways diffusers does not follow (ADAPTIVE.md section 3): FLUX's never skips the step
at 28-step index 11 (`MagCache4FLUX/magcache_flux.py`), and accumulates in float64 NumPy. fxcache follows diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np
import torch

from ..analysis.cuts import pair_streams, run_escapes
from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_fraction, check_int, register_method
from ..errors import ConfigError, UnsupportedGraphError
from ..step_plan import BlockKind
from .recipe import Recipe, register_recipe

#: FLUX.1-dev's ratios for 28 steps, as diffusers ships them (`FLUX_MAG_RATIOS`, `mag_cache.py` L35-66), from the
#: authors' FLUX script (`MagCache4FLUX/magcache_flux.py` L459 at @df81cb1; ADAPTIVE.md section 3)
FLUX_MAG_RATIOS = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047, 1.01562,
    1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359,
    0.89062,
)

#: the authors' FLUX settings (`MagCache4FLUX/magcache_flux.py` L466-468 at @df81cb1: K = 5, threshold 0.24,
#: retention ratio 0.1) with the ratios above, calibrated for 28 steps (resampled to another `num_steps`)
PRESETS = {
    "flux": dict(mag_ratios=FLUX_MAG_RATIOS, threshold=0.24, max_skip_steps=5, retention_ratio=0.1, num_steps=28),
}


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class MagCacheConfig(CacheConfig):
    """MagCache, with diffusers' `MagCacheConfig` options and defaults (`mag_cache.py` L110-114).

    Args:
        threshold: skip while the accumulated modelled error is at most this (diffusers' default 0.06; higher
            skips more).
        max_skip_steps: K, at most this many skipped calls in a row (default 3; 0 never skips).
        retention_ratio: the leading fraction of the steps that always compute: the first
            `int(retention_ratio * num_steps + 0.5)` (default 0.2: 6 of 28).
        num_steps: the sampler's step count (diffusers' `num_inference_steps`, default 28): the ratios are resampled
            to it, and a branch's steps start over after it.
        mag_ratios: gamma_s, the calibrated magnitude ratio of each step's residual to the previous step's (a list of
            positive numbers, resampled when its length is not `num_steps`). Required unless a preset gives them
            (`preset="flux"`); get them for a model from diffusers' calibration mode,
            `MagCacheConfig(calibrate=True, num_inference_steps=...)`, which prints them after one generation.
    """

    method = "magcache"
    #: `fxcache eval` gives `num_steps` the sampler's step count
    STEPS_FROM_SAMPLER: ClassVar[bool] = True
    PRESETS: ClassVar[dict] = PRESETS
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_steps: int = 28
    mag_ratios: tuple[float, ...] | None = None

    def _validate(self) -> None:
        if self.threshold < 0:
            raise ConfigError(f"MagCacheConfig.threshold must be >= 0 (0 skips only where the ratios stay exactly "
                              f"1), got {self.threshold!r}")
        check_int("MagCacheConfig", "max_skip_steps", self.max_skip_steps, minimum=0, maximum=MAX_STEPS,
                  why=STEPS_WHY)
        check_fraction("MagCacheConfig", "retention_ratio", self.retention_ratio)
        check_int("MagCacheConfig", "num_steps", self.num_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_ratios(self.mag_ratios)

    @property
    def retention_steps(self) -> int:
        """The leading steps that always compute (`mag_cache.py` L208)."""
        return int(self.retention_ratio * self.num_steps + 0.5)

    @property
    def ratios(self) -> tuple[float, ...]:
        """The float32 ratio of each of the `num_steps` steps."""
        return interpolate_ratios(self.mag_ratios, self.num_steps)

    def skips(self) -> tuple[bool, ...]:
        """Whether each of the `num_steps` steps of a branch is skipped."""
        return walk_schedule(self.ratios, self.threshold, self.max_skip_steps, self.retention_steps)

    def step_kind(self, step: int) -> StepKind:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return StepKind.RESIDUAL if self.skips()[step % self.num_steps] else StepKind.FULL

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.RESIDUAL}) if any(self.skips()) else frozenset({StepKind.FULL})

    @property
    def horizon(self) -> int:
        return self.num_steps

    @property
    def planned_steps(self) -> int | None:
        return self.num_steps

    @property
    def warmup(self) -> int:
        return max(1, self.retention_steps)


def check_ratios(ratios) -> None:
    """Ratios are required (the field's type check has made them a non-empty tuple of finite numbers) and positive
    (each is a quotient of two norms)."""
    if ratios is None:
        raise ConfigError(
            "MagCacheConfig.mag_ratios is required (they are calibrated per model and sampler): 1. run one "
            "generation with diffusers' MagCacheConfig(calibrate=True, num_inference_steps=N) on the model, 2. pass "
            "the printed list as mag_ratios=[...], or use preset='flux' for FLUX.1-dev's")
    bad = [(i, v) for i, v in enumerate(ratios) if not v > 0]
    if bad:
        i, v = bad[0]
        raise ConfigError(f"MagCacheConfig.mag_ratios must be positive numbers (ratios of residual norms), got "
                          f"{v!r} at index {i} of {len(ratios)}")


@functools.lru_cache(maxsize=64)
def interpolate_ratios(ratios: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """`ratios` as float32 values, resampled to `steps` when their count differs (`mag_cache.py` L69-80, L129-137):
    index `round(j * (S - 1) / (T - 1))` of the float32 grid j = 0..T-1, rounded half to even by `torch.round`
    (S = 28 to T = 55 gives 0, 0, 1, 2, 2, 2, ...); one step takes the last ratio."""
    values = torch.tensor(ratios, dtype=torch.float32)
    if len(ratios) != steps:
        if steps == 1:
            values = values[-1:]
        else:
            grid = torch.arange(steps, dtype=torch.float32) * ((len(ratios) - 1) / (steps - 1))
            values = values[torch.round(grid).long()]
    return tuple(float(v) for v in values)


@functools.lru_cache(maxsize=64)
def walk_schedule(ratios: tuple[float, ...], threshold: float, max_skip_steps: int,
                  retention_steps: int) -> tuple[bool, ...]:
    """Whether each step is skipped under diffusers' rule (`mag_cache.py` L202-224), in float32 as there; a
    residual exists from step 1 on (step 0 computes and stores one)."""
    one, limit = np.float32(1.0), np.float32(threshold)
    ratio, err, run = one, np.float32(0.0), 0
    skips = []
    for step, gamma in enumerate(ratios):
        if step < retention_steps:
            skips.append(False)
            continue
        ratio = np.float32(ratio * np.float32(gamma))
        err = np.float32(err + np.float32(abs(one - ratio)))
        run += 1
        skip = step >= 1 and err <= limit and run <= max_skip_steps
        if not skip:
            ratio, err, run = one, np.float32(0.0), 0
        skips.append(bool(skip))
    return tuple(skips)


@register_recipe(MagCacheConfig)
class MagCacheRecipe(Recipe):
    """FULL: every block runs and the step writes, per stream after the last block, that stream minus its stream
    before block 0. RESIDUAL: no block runs; each stream after the last block is its stream before block 0 plus
    that residual."""

    block_kinds = frozenset({BlockKind.RESIDUAL})
    per_piece = False
    per_piece_why = "a skipped call replaces every block by the residual of all of them, which must lie in one graph"

    def layout(self, graph) -> list:
        """The (stream after the last block, its stream before block 0) pairs. Refuses blocks whose values are
        read after them other than through those streams (long skip connections)."""
        blocks = len(graph.blocks)
        escapes = run_escapes(graph, 0, blocks)
        if escapes:
            raise UnsupportedGraphError(
                f"magcache: the blocks compute {escapes[0].name}, which is read after the last block (a long skip "
                f"connection), so they cannot be replaced by the residual of all of them",
                block=graph.blocks[0].name)
        return pair_streams(graph, 0, blocks)

    def build(self, b, graph, plan, layout) -> None:
        from ..passes import expose_residual, read_residual

        blocks = len(graph.blocks)
        if plan.kind is StepKind.FULL:
            if self.caches:
                expose_residual(b, layout, 0, blocks)
        else:
            read_residual(b, layout, 0, blocks)


__all__ = ["FLUX_MAG_RATIOS", "MagCacheConfig", "interpolate_ratios", "walk_schedule"]
