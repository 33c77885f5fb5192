"""Per-block step plans: a step whose blocks do different things (the authors' ToCa / DuCa DiT code runs block 0
full and the rest partial on some steps; block-level adaptive methods run the first blocks full and reuse the
rest). Each is built from the plan alone, through the runner, and compared with the eager model whose forward
hooks do the same block by block.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fxcache
from fxcache import DuCaConfig, FORAConfig, StepKind
from fxcache.methods.duca import DuCaRecipe
from fxcache.methods.fora import FORARecipe
from fxcache.methods.recipe import _RECIPES, register_recipe
from fxcache.runtime.draws import draw_indices
from fxcache.step_plan import BlockKind, BlockStep, StepPlan

from helpers import loop_inputs, make_model, rel_err

STEPS = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class FirstBlockFullFORA(FORAConfig):
    """FORA whose reuse steps still run the first block (and refresh its caches)."""


class FirstBlockFullFORARecipe(FORARecipe):
    def plan(self, step, view):
        plan = super().plan(step, view)
        if plan.kind is StepKind.REUSE:
            return dataclasses.replace(plan, blocks=(BlockStep(BlockKind.FULL),) + plan.blocks[1:])
        return plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class FirstBlockFullDuCa(DuCaConfig):
    """DuCa whose partial steps run block 0 full, as the authors' DiT code does at some steps."""


class FirstBlockFullDuCaRecipe(DuCaRecipe):
    def plan(self, step, view):
        plan = super().plan(step, view)
        if plan.kind is StepKind.PARTIAL:
            return dataclasses.replace(plan, blocks=(BlockStep(BlockKind.FULL),) + plan.blocks[1:])
        return plan


@pytest.fixture
def recipes():
    register_recipe(FirstBlockFullFORA)(FirstBlockFullFORARecipe)
    register_recipe(FirstBlockFullDuCa)(FirstBlockFullDuCaRecipe)
    yield
    _RECIPES.pop(FirstBlockFullFORA, None)
    _RECIPES.pop(FirstBlockFullDuCa, None)


def _blocks(model):
    return list(model.transformer_blocks)


def _reference(model, config, inputs, partial_rows) -> list[torch.Tensor]:
    """Eager, with hooks: FULL steps save every unit's output; on cached steps block 0 computes and saves, the
    other blocks' attention returns the saved output and their ff either does too (reuse) or recomputes the rows
    `partial_rows(step)` gives and scatters them into the saved output (partial); on SKIP steps the last block
    returns its output of the step before, and no cache changes."""
    saved, outs, now = {}, [], {}
    blocks = _blocks(model)
    handles = []
    for i, block in enumerate(blocks):
        for name in ("attn1", "ff"):
            def hook(module, args, out, key=(i, name)):
                kind, step = now["kind"], now["step"]
                if kind is StepKind.SKIP:
                    return out  # the blocks' work is thrown away below
                if kind is StepKind.FULL or key[0] == 0:
                    saved[key] = out
                    return out
                if key[1] == "ff" and kind is StepKind.PARTIAL:
                    idx = partial_rows(step)
                    saved[key] = saved[key].index_copy(1, idx, out.index_select(1, idx))
                return saved[key]
            handles.append(getattr(block, name).register_forward_hook(hook))

    def final(module, args, out):
        if now["kind"] is StepKind.SKIP:
            return saved["final"]
        saved["final"] = out
        return out

    handles.append(blocks[-1].register_forward_hook(final))
    try:
        with torch.no_grad():
            for s, kw in enumerate(inputs):
                now.update(kind=config.step_kind(s), step=s)
                outs.append(model(**kw)[0])
    finally:
        for h in handles:
            h.remove()
    return outs


def _run(model, config, inputs):
    backend = fxcache.cache_backend(config, lowering="eager", strict=True)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), fxcache.request(compiled):
        outs = [compiled(**kw)[0] for kw in inputs]
    return outs, fxcache.stats(compiled)


def test_reuse_steps_that_run_the_first_block(recipes):
    model, config = make_model("dit"), FirstBlockFullFORA(interval=3)
    inputs = loop_inputs("dit", STEPS)
    outs, records = _run(model, config, inputs)
    assert [r["kind"] for r in records] == ["full", "reuse[f r]", "reuse[f r]", "full", "reuse[f r]"]
    expected = _reference(model, config, inputs, None)
    assert all(rel_err(o, e) < 1e-5 for o, e in zip(outs, expected))
    plain, _ = _run(make_model("dit"), FORAConfig(interval=3), inputs)
    assert rel_err(outs[1], plain[1]) > 1e-4  # the first block really ran


def test_partial_steps_that_run_block_0_full(recipes):
    model, config = make_model("dit"), FirstBlockFullDuCa(interval=3, ratio=0.5)
    inputs = loop_inputs("dit", STEPS)
    outs, records = _run(model, config, inputs)
    assert [r["kind"] for r in records] == ["full", "partial[f p]", "skip", "full", "partial[f p]"]
    k = config.tokens_for(16)
    assert [r["tokens"] for r in records if r["kind"].startswith("partial")] == [k, k]
    # one unit of the 16-token stream recomputes (block 1's ff): one row of indices, as the runner draws it
    rows = lambda step: draw_indices(config.seed, step, "idx:16", 1, 16, k, "cpu")[0]  # noqa: E731
    expected = _reference(model, config, inputs, rows)
    assert all(rel_err(o, e) < 1e-5 for o, e in zip(outs, expected))
