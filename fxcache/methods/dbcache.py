"""DBCache (cache-dit): the first Fn blocks probe each call, the last Bn always run, the middle is skipped when the
probe's residual changed little since the branch's last computed call.

Rules as cache-dit 1.5.3 takes them (`cache_contexts/cache_manager.py` `can_cache`, `similarity`;
`cache_blocks/pattern_base.py`), per CFG branch: the first `warmup_steps` calls compute; then a call computes
when the branch already cached `max_cached_steps` calls, or its last `max_continuous_cached_steps` calls in a
row (-1: no limit), or when `threshold <= 0`; `threshold >= 1` reuses whenever a residual exists; otherwise it
reuses when `mean|R_t - R_c| / mean|R_c| < threshold`, where R is the main (image) stream after block Fn minus
before block 0, R_c that of the branch's last computed call. A reused call adds the stored residual of the
middle blocks to the streams after block Fn and runs the last Bn blocks.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import MAX_STEPS, STEPS_WHY, CacheConfig, StepKind, check_int, register_method
from ..errors import ConfigError, UnsupportedGraphError
from ..graph_io import MAX_ORDER
from .adaptive import CFG_MODES, REDUCTIONS, DecidedRecipe, Decision, Rule, reduce_signal
from .recipe import register_recipe


def check_threshold(owner: str, value: float, zero: str = "0 never reuses") -> None:
    if value < 0:
        raise ConfigError(f"{owner}.threshold must be >= 0 ({zero}), got {value!r}")


def check_limit(name: str, value) -> None:
    """A limit on reused calls: a count >= 0, or -1 for none."""
    if isinstance(value, int) and not isinstance(value, bool) and value < -1:
        raise ConfigError(f"DBCacheConfig.{name} must be >= 0, or -1 for no limit, got {value}")
    check_int("DBCacheConfig", name, value, minimum=-1, maximum=MAX_STEPS, why=STEPS_WHY)


#: the forecasts of the stored residual (cache-dit's calibrators)
FORECASTS = ("taylorseer", "foca")


class ResidualDiffConfig(CacheConfig):
    """What FBCache and DBCache share: a threshold on the probe's relative residual change, and the batch rule."""

    CHOICES: ClassVar[dict] = {"reduce": REDUCTIONS, "cfg": CFG_MODES}

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.RESIDUAL})

    def step_kind(self, step: int) -> StepKind:
        raise ConfigError(f"{self.method} decides each call at run time from a signal: it has no fixed schedule")

    @property
    def horizon(self) -> int:
        return 1

    def every_call_computed(self) -> "ResidualDiffConfig":
        return dataclasses.replace(self, threshold=0.0)

    def every_call_reused(self) -> "ResidualDiffConfig":
        """A threshold no change reaches, and no warm-up beyond the first call."""
        more = {"warmup_steps": min(self.warmup_steps, 1)} if hasattr(self, "warmup_steps") else {}
        return dataclasses.replace(self, threshold=1e6, **more)


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class DBCacheConfig(ResidualDiffConfig):
    """DBCache (cache-dit `DBCacheConfig`): dual-block cache decided per call.

    Args:
        first_blocks: Fn, the leading blocks every call runs; the signal is the main stream's residual over them
            (cache-dit default 8; 1 is diffusers' FirstBlockCache with cache-dit's rules).
        last_blocks: Bn, the trailing blocks every call runs (default 0).
        threshold: reuse when the relative residual change is below it (default 0.08); <= 0 never reuses, >= 1
            always reuses once a residual exists.
        warmup_steps: leading calls of each branch that compute (default 8).
        max_cached_steps: at most this many reused calls per branch and request (-1: no limit).
        max_continuous_cached_steps: at most this many reused calls in a row (-1: no limit).
        forecast: None reuses the stored residual of the middle blocks as it is; "taylorseer" forecasts it from
            its Taylor factors, updated at every computed call (cache-dit's TaylorSeer calibrator: the first
            derivative from the fourth call on, as its calibrator steps lag the DBCache steps by one).
            "foca" forecasts it by cache-dit's FoCa calibrator: a Heun step from the last computed residual, by the
            mean of its slope since the computed residual before and the slope of the last two values, at most 3
            steps ahead, damped toward the last computed residual beyond (`fxcache/runtime/foca.py`).
        forecast_order: the Taylor order of "taylorseer" (cache-dit's `taylorseer_order`, default 1).
        reduce: "rows" reuses only when every batch row's change is below the threshold; "mean" decides on the
            whole batch, as cache-dit does (one prompt's change can then make another reuse stale features).
        cfg: "separate" (default): each CFG branch decides on its own signal; "shared": the later branches of a
            step take the signal of its first branch (cache-dit's `cfg_diff_compute_separate=False`), each through
            its own rule and state.
    """

    method = "dbcache"
    #: options whose value -1 means "no limit", as in cache-dit (every other negative is refused)
    OFF_VALUES: ClassVar[dict] = {"max_cached_steps": -1, "max_continuous_cached_steps": -1}
    CHOICES: ClassVar[dict] = {"forecast": FORECASTS}
    PRESETS: ClassVar[dict] = {
        # cache-dit's defaults (cache_config.py) and its FLUX example F1B0 / F8B0 settings
        "default": dict(first_blocks=8, last_blocks=0, threshold=0.08, warmup_steps=8),
        "f1b0": dict(first_blocks=1, last_blocks=0, threshold=0.08, warmup_steps=8),
    }
    first_blocks: int = 8
    last_blocks: int = 0
    threshold: float = 0.08
    warmup_steps: int = 8
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    reduce: str = "rows"
    cfg: str = "separate"
    forecast: str | None = None
    forecast_order: int = 1

    def _validate(self) -> None:
        check_threshold("DBCacheConfig", self.threshold)
        check_int("DBCacheConfig", "forecast_order", self.forecast_order, minimum=1, maximum=MAX_ORDER)
        check_int("DBCacheConfig", "first_blocks", self.first_blocks, minimum=1, maximum=100_000)
        check_int("DBCacheConfig", "last_blocks", self.last_blocks, minimum=0, maximum=100_000)
        check_int("DBCacheConfig", "warmup_steps", self.warmup_steps, minimum=0, maximum=MAX_STEPS, why=STEPS_WHY)
        check_limit("max_cached_steps", self.max_cached_steps)
        check_limit("max_continuous_cached_steps", self.max_continuous_cached_steps)

    @property
    def warmup(self) -> int:
        return self.warmup_steps

    @property
    def taylor_order(self) -> int | None:
        return self.forecast_order if self.forecast == "taylorseer" else None

    @property
    def taylor_warmup(self) -> int:
        """cache-dit's calibrator makes a derivative only when its step, one behind DBCache's, is above 1: from the
        computed call at DBCache step 3 on."""
        return 4


@dataclasses.dataclass
class Streak:
    cached: int = 0  # calls reused so far in this request
    row: int = 0  # calls reused in a row up to now


class DBCacheRule(Rule):
    def __init__(self, config: DBCacheConfig):
        self.config = config

    def new_state(self) -> Streak:
        return Streak()

    def decide(self, state: Streak, step, signal, can_reuse) -> Decision:
        c = self.config
        value, reuse = None, False
        if step < c.warmup_steps:
            reuse = False
        elif 0 <= c.max_cached_steps <= state.cached:
            reuse = False
        elif 0 <= c.max_continuous_cached_steps <= state.row:
            reuse = False
        elif c.threshold <= 0.0:
            reuse = False
        elif not can_reuse:  # nothing to reuse, nor a reference to compare with: no signal is read
            reuse = False
        elif c.threshold >= 1.0:
            reuse = True
        else:
            value, reuse = reduce_signal(signal, c.reduce, lambda v: v < c.threshold)
        if reuse:
            state.cached += 1
            state.row += 1
        else:
            state.row = 0
        return Decision(not reuse, value, value)


@register_recipe(DBCacheConfig)
class DBCacheRecipe(DecidedRecipe):
    """Probe: blocks [0, Fn) and the residual signal; cached tail: blocks [Fn, L - Bn) replaced by their residual."""

    def probe_blocks(self, blocks: int) -> int:
        return self.config.first_blocks

    def run(self, blocks: int) -> tuple[int, int]:
        return self.config.first_blocks, blocks - self.config.last_blocks

    def check_blocks(self, blocks: int) -> None:
        c = self.config
        if c.first_blocks + c.last_blocks >= blocks:
            raise UnsupportedGraphError(self.too_small(blocks))

    def too_small(self, blocks: int) -> str:
        c = self.config
        return (f"dbcache: first_blocks={c.first_blocks} + last_blocks={c.last_blocks} leave no block to cache in a "
                f"graph of {blocks} blocks: first_blocks + last_blocks must be at most {blocks - 1} here "
                f"(first_blocks >= 1)")

    def rule(self) -> Rule:
        return DBCacheRule(self.config)

    def layout(self, graph):
        from ..analysis.cuts import signal_stream

        layout = super().layout(graph)
        layout["signal"] = signal_stream(graph, self.probe_blocks(len(graph.blocks)))
        return layout

    def probe_targets(self, graph) -> list:
        from ..analysis.cuts import signal_stream

        return list(signal_stream(graph, self.probe_blocks(len(graph.blocks))))

    def probe_signal(self, b, graph, layout) -> None:
        from ..passes import residual_signal

        residual_signal(b, *layout["signal"])

    def compute_extras(self, b, graph, layout) -> None:
        from ..passes import keep_reference

        keep_reference(b, layout["signal"][0])
