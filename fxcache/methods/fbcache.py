"""FirstBlockCache (diffusers `FirstBlockCacheConfig`): block 0 probes each call; the other blocks are skipped when
its residual changed little since the branch's last computed call.

Rules as diffusers 0.42 takes them (`hooks/first_block_cache.py`): a call computes when its branch has no residual
yet or when `mean|R_t - R_c| / mean|R_c| > threshold` (so it reuses at equality), where R is the main (image)
stream after block 0 minus before it, R_c that of the branch's last computed call; no warm-up, no limit on reused
calls. A reused call adds the stored residual of blocks 1..L-1 to block 0's output streams.
"""

from __future__ import annotations

import dataclasses

from typing import ClassVar

from ..config import register_method
from .adaptive import Decision, Rule, reduce_signal
from .dbcache import DBCacheRecipe, ResidualDiffConfig, check_threshold
from .recipe import register_recipe


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class FBCacheConfig(ResidualDiffConfig):
    """FirstBlockCache.

    Args:
        threshold: reuse when the relative change of block 0's residual is at most this (diffusers default 0.05;
            its docs suggest 0.05-0.2 for FLUX, higher is faster and further from the uncached image).
        reduce: "rows" reuses only when every batch row's change is within the threshold; "mean" decides on the
            whole batch, as diffusers does.
        cfg: "separate" (default): each CFG branch decides on its own signal; "shared": the later branches of a
            step take the signal of its first branch (cache-dit's `cfg_diff_compute_separate=False`), each through
            its own rule and state.
    """

    method = "fbcache"
    PRESETS: ClassVar[dict] = {"default": dict(threshold=0.05)}
    threshold: float = 0.05
    reduce: str = "rows"
    cfg: str = "separate"

    first_blocks: ClassVar[int] = 1
    last_blocks: ClassVar[int] = 0

    def _validate(self) -> None:
        check_threshold("FBCacheConfig", self.threshold, zero="0 reuses only an unchanged residual")

    @property
    def warmup(self) -> int:
        return 0


class FBCacheRule(Rule):
    def __init__(self, config: FBCacheConfig):
        self.config = config

    def decide(self, state, step, signal, can_reuse) -> Decision:
        if not can_reuse:
            return Decision(True)
        tau = self.config.threshold
        value, within = reduce_signal(signal, self.config.reduce, lambda v: not v > tau)
        return Decision(not within, value, value)


@register_recipe(FBCacheConfig)
class FBCacheRecipe(DBCacheRecipe):
    def rule(self) -> Rule:
        return FBCacheRule(self.config)

    def too_small(self, blocks: int) -> str:
        return (f"fbcache: a graph of {blocks} block has no block after block 0 (the probe) to cache: it needs at "
                f"least 2 blocks")
