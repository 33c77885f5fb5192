"""A new method is one module: its config (registered by name), its schedule and its recipe (registered by config
type). This test is the worked example of docs/adding-a-method.md: attention-only reuse (the attention outputs
are reused between full steps, every token-wise unit runs), written without touching any fxcache module.

The truth is the eager model with forward hooks: each attention module returns its output of the last full step.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import fxcache
from fxcache import StepKind
from fxcache.analysis import ATTN
from fxcache.config import CacheConfig, check_int, register_method
from fxcache.methods import Recipe, cycle_position, register_recipe
from fxcache.methods.recipe import units_in
from fxcache.passes import expose_units, reuse_units
from fxcache.step_plan import BlockKind

from helpers import loop_inputs, make_model, rel_err


# -- the whole method --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionReuseConfig(CacheConfig):
    """Reuse attention outputs between full steps; recompute every token-wise unit."""

    method: ClassVar[str] = "attention-reuse"
    interval: int = 3
    warmup_steps: int = 1

    def _validate(self) -> None:
        check_int("AttentionReuseConfig", "interval", self.interval, minimum=1)
        check_int("AttentionReuseConfig", "warmup_steps", self.warmup_steps, minimum=1)

    @property
    def kinds(self) -> frozenset[StepKind]:
        return frozenset({StepKind.FULL, StepKind.REUSE}) if self.interval > 1 else frozenset({StepKind.FULL})

    def step_kind(self, step: int) -> StepKind:
        return StepKind.FULL if cycle_position(step, self.interval, self.warmup_steps) == 0 else StepKind.REUSE


class AttentionReuseRecipe(Recipe):
    """FULL blocks write their attention outputs; REUSE blocks read them."""

    block_kinds = frozenset({BlockKind.REUSE})

    def build(self, b, graph, plan, layout) -> None:
        if self.caches:
            expose_units(b, [u for u in units_in(graph, plan, BlockKind.FULL) if u.kind == ATTN])
        reuse_units(b, [u for u in units_in(graph, plan, BlockKind.REUSE) if u.kind == ATTN])


# -- registering it for the test only ------------------------------------------------------------------------------

@pytest.fixture
def registered():
    from fxcache.config import _METHODS
    from fxcache.methods.recipe import _RECIPES

    register_method(AttentionReuseConfig)
    register_recipe(AttentionReuseConfig)(AttentionReuseRecipe)
    yield
    _METHODS.pop("attention-reuse", None)
    _RECIPES.pop(AttentionReuseConfig, None)


def _replaying_attention(model, names: list[str], inputs: list[dict], config) -> list[torch.Tensor]:
    """The model with hooks: attention modules return their output of the last FULL step on REUSE steps."""
    modules = dict(model.named_modules())
    saved, kind, outs = {}, [StepKind.FULL], []

    def hook(name):
        def run(module, args, out):
            if kind[0] is StepKind.FULL:
                saved[name] = out
                return out
            return saved[name]
        return run

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for s, kw in enumerate(inputs):
                kind[0] = config.step_kind(s)
                outs.append(model(**kw)[0])
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_a_method_defined_outside_fxcache_caches_by_its_recipe(registered, name):
    model = make_model(name)
    config = fxcache.cache_backend("attention-reuse", interval=3).config
    assert isinstance(config, AttentionReuseConfig)
    backend = fxcache.cache_backend(config, lowering="eager", strict=True)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    inputs = loop_inputs(name, 6)
    with torch.no_grad(), fxcache.request(compiled):
        outs = [compiled(**kw)[0] for kw in inputs]
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "reuse", "full", "reuse", "reuse"]
    attention = [u.name for u in backend.runners[0].plan.units if u.kind == ATTN]
    expected = _replaying_attention(model, attention, inputs, config)
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) < 1e-5, s
    uncached = _replaying_attention(model, [], inputs, config)
    assert rel_err(outs[1], uncached[1]) > 1e-4  # the reuse steps really reuse
