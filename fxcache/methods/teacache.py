"""TeaCache (arXiv 2411.19108, `ali-vilab/TeaCache`): skip every block while the accumulated, rescaled change of
the timestep-modulated input stays below a threshold.

Rule as the authors' FLUX script takes it (`TeaCache4FLUX/teacache_flux.py` L105-124, at @7c10efc), per CFG
branch: calls count 0..T-1 (and wrap); the first and the last compute and clear the accumulator; every other call
adds `p(rel(m_t, m_{t-1}))` to it, `p` the family's rescale polynomial (numpy `poly1d`, highest degree first, in
float64) and `rel(a, b) = mean|a - b| / mean|b|` in the model's dtype; the call reuses while the sum stays below the
threshold, else computes and clears it. `m` is the main stream as block 0's first attention reads it (normalised
and modulated: `blocks[0].norm1(H_0, temb)[0]` in FLUX) and `m_{t-1}` is the previous call's, on every call. A
reused call adds the residual of all blocks (`H_L - H_0` of the last computed call) to the stream before block 0.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from ..config import MAX_STEPS, STEPS_WHY, check_int, register_method
from .adaptive import DecidedRecipe, Decision, Rule
from .dbcache import ResidualDiffConfig, check_threshold
from .recipe import register_recipe

#: the authors' rescale polynomials for the families whose indicator is block 0's modulated input, highest degree
#: first (ADAPTIVE.md section 8, with the file and line of each), and the threshold of their README's first
#: speed-up row (FLUX 0.25: 1.5x; HunyuanVideo 0.1: 1.6x; LTX-Video 0.03: 1.6x; Mochi 0.06: 1.5x; Lumina 0.2: 1.5x)
PRESETS = {
    "flux": dict(coefficients=(4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01),
                 threshold=0.25),
    "hunyuanvideo": dict(coefficients=(7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00,
                                       9.61237896e-02), threshold=0.1),
    "ltx": dict(coefficients=(2.14700694e+01, -1.28016453e+01, 2.31279151e+00, 7.92487521e-01, 9.69274326e-03),
                threshold=0.03),
    "mochi": dict(coefficients=(-3.51241319e+03, 8.11675948e+02, -6.09400215e+01, 2.42429681e+00,
                                3.05291719e-03), threshold=0.06),
    "lumina": dict(coefficients=(393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
                   threshold=0.2),
}


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class TeaCacheConfig(ResidualDiffConfig):
    """TeaCache.

    Args:
        threshold: reuse while the accumulated rescaled change stays below it.
        coefficients: the rescale polynomial, highest degree first (the authors fit degree 4; any degree is
            accepted). A family's with `preset=` (flux, hunyuanvideo, ltx, mochi, lumina); None accumulates the
            relative change itself (no rescaling), until one is fitted for the model. The authors' Wan,
            CogVideoX and HiDream polynomials rescale a time-embedding indicator, not this one, and do not apply.
        num_steps: T, the sampler's steps (calls per branch): the first and the last compute.
        warmup_steps: leading calls of each branch that compute (the authors: 1; their HiDream script: 10%).
        final_steps: trailing calls of each branch that compute (the authors: 1).
        reduce: "rows" keeps one accumulator per batch row and reuses only when every row's is below the
            threshold; "mean" accumulates the whole batch's change, as the authors do.
        cfg: "separate" (default): each CFG branch decides on its own signal; "shared": the later branches of a
            step take the signal of its first branch (cache-dit's `cfg_diff_compute_separate=False`), each through
            its own rule and state.
    """

    method = "teacache"
    #: `fxcache eval` gives `num_steps` the sampler's step count
    STEPS_FROM_SAMPLER: ClassVar[bool] = True
    PRESETS: ClassVar[dict] = PRESETS
    threshold: float = 0.25
    coefficients: tuple[float, ...] | None = None
    num_steps: int = 28
    warmup_steps: int = 1
    final_steps: int = 1
    reduce: str = "rows"
    cfg: str = "separate"

    def _validate(self) -> None:
        check_threshold("TeaCacheConfig", self.threshold)
        check_int("TeaCacheConfig", "num_steps", self.num_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
        check_int("TeaCacheConfig", "warmup_steps", self.warmup_steps, minimum=0, maximum=MAX_STEPS,
                  why=STEPS_WHY)
        check_int("TeaCacheConfig", "final_steps", self.final_steps, minimum=0, maximum=MAX_STEPS, why=STEPS_WHY)

    @property
    def warmup(self) -> int:
        return self.warmup_steps

    @property
    def planned_steps(self) -> int | None:
        return self.num_steps


@dataclasses.dataclass
class Accumulated:
    total: list[float] | None = None  # per batch row ("rows") or one value ("mean")


class TeaCacheRule(Rule):
    def __init__(self, config: TeaCacheConfig):
        self.config = config
        self.rescale = np.poly1d(np.asarray(config.coefficients or (1.0, 0.0), dtype=np.float64))

    def new_state(self) -> Accumulated:
        return Accumulated()

    def decide(self, state: Accumulated, step, signal, can_reuse) -> Decision:
        c = self.config
        position = step % c.num_steps  # the authors' call counter wraps after T calls
        values = signal[:1] if c.reduce == "mean" or len(signal) == 2 else signal[1:]
        forced = position < c.warmup_steps or position >= c.num_steps - c.final_steps
        if forced or state.total is None or len(state.total) != len(values):
            state.total = [0.0] * len(values)
            return Decision(True, signal[0], 0.0)
        state.total = [float(t + self.rescale(v)) for t, v in zip(state.total, values)]
        top = max(state.total)
        if all(t < c.threshold for t in state.total) and can_reuse:
            return Decision(False, signal[0], top)
        state.total = [0.0] * len(values)
        return Decision(True, signal[0], top)


@register_recipe(TeaCacheConfig)
class TeaCacheRecipe(DecidedRecipe):
    """Probe: what precedes block 0's attention and the indicator; cached tail: every block by its residual."""

    def probe_blocks(self, blocks: int) -> int:
        return 0

    def run(self, blocks: int) -> tuple[int, int]:
        return 0, blocks

    def rule(self) -> Rule:
        return TeaCacheRule(self.config)

    def probe_targets(self, graph) -> list:
        from ..analysis.cuts import attention_input

        return [attention_input(graph)]

    def layout(self, graph):
        from ..analysis.cuts import attention_input

        layout = super().layout(graph)
        layout["indicator"] = attention_input(graph)
        return layout

    def probe_signal(self, b, graph, layout) -> None:
        from ..passes import indicator_signal

        indicator_signal(b, layout["indicator"])
