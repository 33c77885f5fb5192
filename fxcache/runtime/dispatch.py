"""Which variant serves a call, and the per-step values it takes: one dispatcher for the compiled runner,
`fxcache.export` (the plans a schedule needs) and the export session.

A step's plan comes from the method's recipe; it runs only when the branch has every cache entry its variant
reads, else the FULL plan runs. The per-step inputs are made from the typed inputs of the variant: random draws
(pure functions of the seed, the step and the key's name, shared by the CFG branches of a step), Taylor scalars,
k-means starts. Cache entries come from the branch's store.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..config import CacheConfig, StepKind
from ..graph_io import GraphValue, Role, Slot
from ..methods import recipe_for
from ..step_plan import PROBE, GraphView, StepPlan
from .draws import draw_indices, draw_permutation, draw_uniform
from .foca import FoCaState
from .taylor import TaylorState

#: what the dispatcher supplies per role: 0 the store (cache entries), 1 a draw, 2 Taylor differences,
#: 3 Taylor coefficients, 4 a k-means start, 5 the k-means warm flag
_SUPPLY = {Role.CACHE: 0, Role.STATE: 0, Role.BUFFER: 0, Role.INDICES: 1, Role.UNIFORM: 1, Role.TAYLOR_DIFF: 2,
           Role.TAYLOR_COEF: 3, Role.PERMUTATION: 4, Role.WARM: 5, Role.CARRY: 6, Role.FOCA: 7}


class Prepared:
    """What a call needs of a variant's typed inputs, worked out once per variant (the call path is hot)."""

    __slots__ = ("reads", "supply", "drawn")

    def __init__(self, inputs: list[GraphValue]):
        self.reads = frozenset(v.key for v in inputs if v.role is Role.CACHE)
        self.supply = [_SUPPLY[v.role] for v in inputs]
        self.drawn = [v for v in inputs if v.role.drawn]


def prepared(variant) -> Prepared:
    p = variant.__dict__.get("_prepared")
    if p is None:
        p = variant.__dict__["_prepared"] = Prepared(variant.inputs)
    return p


class Dispatcher:
    def __init__(self, config: CacheConfig, view: GraphView, blocks: dict[str, str] | None = None,
                 row_offsets: dict[int, int] | None = None):
        """`blocks`: block name in the graph -> its name in the whole model, for a graph traced from one block's
        forward (a piece of a graph-broken forward): per-unit draws are seeded by the whole model's unit names."""
        self.config, self.view = config, view
        self._blocks = {k: v for k, v in (blocks or {}).items() if k != v}
        self.recipe = recipe_for(config)
        self.full = self.recipe.full_plan(view)
        # a method that decides each call from a signal: its probe, compute and cached plans, and its rule
        self.decided = getattr(self.recipe, "decides", False)
        self.decided_plans = self.recipe.plans(view) if self.decided else {}
        self.rule = self.recipe.rule() if self.decided else None
        self.seed = config.draw_seed
        self.taylor_order = config.taylor_order
        self.foca = getattr(config, "forecast", None) == "foca"  # a FoCa-forecast residual (DBCache)
        self._plans: dict[int, StepPlan] = {}
        # a graph holding later blocks only (a piece of a forward that graph-breaks) takes the rows of each step's
        # token draw that its units have in the whole model's draw: `row_offsets`, token count -> the units of that
        # stream in the model's blocks before its first
        self._row_offsets = dict(row_offsets or {})

    def scheduled(self, step: int) -> StepPlan:
        """The plan the schedule gives `step` (memoised: a step's plan never changes)."""
        plan = self._plans.get(step)
        if plan is None:
            plan = self._plans[step] = self.recipe.plan(step, self.view)
        return plan

    def choose(self, step: int, written, variant_of: Callable) -> StepPlan:
        """The plan that runs: the schedule's, or FULL while the branch lacks an entry its variant reads."""
        plan = self.scheduled(step)
        if plan.kind is StepKind.FULL or written >= prepared(variant_of(plan)).reads:
            return plan
        return self.full

    def schedule(self, num_steps: int) -> list[StepPlan]:
        """The plan of every step of a `num_steps` loop whose caches are all present (what an export writes); none
        for a method that decides each call at run time."""
        if self.decided:
            return []
        return [self.scheduled(s) for s in range(num_steps)]

    # -- per-step inputs ---------------------------------------------------------------------------------------
    def step_inputs(self, state, variant, plan: StepPlan, step: int, branch: int, device,
                    carried: dict | None = None) -> list:
        """The per-step values of the variant's inputs (None where the branch's store supplies a cache entry;
        `carried`: the values a probe passed to this tail, by key)."""
        taylor = None
        if self.taylor_order is not None:
            taylor = state.taylor.get(branch)
            if taylor is None:
                taylor = state.taylor[branch] = TaylorState(self.taylor_order, self.config.taylor_warmup)
        # a FULL step anchors the Taylor deltas even when the variant takes no `taylor_diff` (order 0)
        # (a probe is not a computed step: its tail says whether the call computes)
        full = plan.kind is StepKind.FULL and plan.part != PROBE
        diff = taylor.full_inputs(step, device) if full and taylor is not None else None
        foca = None
        if self.foca:
            foca = state.foca.get(branch)
            if foca is None:
                foca = state.foca[branch] = FoCaState()
            if full:
                foca.full(step)
        p = prepared(variant)
        draws = self._draws(state, step, p.drawn, device) if p.drawn else None
        out = []
        for supply, v in zip(p.supply, variant.inputs):
            if supply == 0:
                out.append(None)
            elif supply == 1:  # one draw per step, shared by the CFG branches
                out.append(draws[v.key])
            elif supply == 2:
                out.append(diff)
            elif supply == 3:
                out.append(taylor.forecast_inputs(step, device))
            elif supply == 6:
                out.append(carried[v.key])
            elif supply == 7:
                out.append(foca.forecast_inputs(step, device))
            elif supply == 4:
                out.append(draw_permutation(self.seed, step, v.key.name, v.key.tokens, v.shape[0], device))
            else:
                warm = any(k.slot is Slot.CENTROIDS for k in state.store.written(branch))
                out.append(torch.full(v.shape, 1.0 if warm else 0.0, dtype=v.dtype, device=device))
        return out

    def _seed_name(self, key) -> str:
        if not self._blocks or not key.unit:
            return key.name
        for graph_name, model_name in self._blocks.items():
            if key.unit == graph_name or key.unit.startswith(graph_name + "."):
                return dataclasses.replace(key, unit=model_name + key.unit[len(graph_name):]).name
        return key.name

    def _draws(self, state, step: int, values: list[GraphValue], device) -> dict:
        """The random inputs of `step`: pure functions of (seed, step, key name), computed once per step."""
        if state.draws_step != step:
            state.draws, state.draws_step = {}, step
        for v in values:
            if v.key in state.draws:
                continue
            if v.role is Role.INDICES:
                skip = self._row_offsets.get(v.key.tokens, 0)
                value = draw_indices(self.seed, step, v.key.name, skip + v.shape[0], v.key.tokens, v.shape[1],
                                     device)[skip:]
            else:
                value = draw_uniform(self.seed, step, self._seed_name(v.key), v.shape, device)
            state.draws[v.key] = value
        return state.draws
