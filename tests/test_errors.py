"""Graphs fxcache cannot cache: strict mode raises a clear error; the default warns once and runs uncached."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.models.embeddings import Timesteps

import fxcache
from helpers import compile_cached, make_inputs, make_model, rel_err


class NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.time_proj = Timesteps(8, True, 0)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x, timestep):
        return self.lin(x) + self.time_proj(timestep)[:, None]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.lin(x)


class BlocksNoTimesteps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x, timestep):
        for b in self.transformer_blocks:
            x = b(x)
        return x * timestep[:, None, None]


def test_no_blocks_strict_raises():
    model, x, t = NoBlocks(), torch.randn(1, 4, 8), torch.tensor([0.5])
    compiled, _ = compile_cached(model, strict=True)
    with pytest.raises(fxcache.UnsupportedGraphError, match="no transformer blocks found.*block_lists"):
        with torch.no_grad():
            compiled(x, t)


def test_no_blocks_default_warns_once_and_runs_uncached():
    model, x = NoBlocks(), torch.randn(1, 4, 8)
    compiled, backend = compile_cached(model, strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [compiled(x, torch.tensor([t])) for t in (0.9, 0.5, 0.1)]
            refs = [model(x, torch.tensor([t])) for t in (0.9, 0.5, 0.1)]
    ours = [w for w in caught if issubclass(w.category, fxcache.FxCacheWarning)]
    assert len(ours) == 1 and "no transformer blocks found" in str(ours[0].message)
    for o, r in zip(outs, refs):
        assert torch.equal(o, r)
    assert [r["cached"] for r in fxcache.stats(compiled)] == [False] * 3


class BlocksUnnamedTime(BlocksNoTimesteps):
    def forward(self, x, level):  # the time under a name that does not say so
        return super().forward(x, level)


def test_generic_blocks_without_a_sinusoid_follow_the_forwards_timestep_argument():
    """No sinusoidal embedding in the graph (t scales the output directly): the model call's argument named for
    time sets the steps; an argument not named so needs timestep_input=, and strict mode says so."""
    model, x = BlocksNoTimesteps(), torch.randn(1, 4, 8)
    compiled, backend = compile_cached(model, "duca", strict=True, interval=3)
    with torch.no_grad():
        for t in (0.9, 0.6, 0.3):
            compiled(x, torch.tensor([t]))
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "partial", "skip"]
    assert [u.name for u in backend.plans[0].units] == ["transformer_blocks.0.lin", "transformer_blocks.1.lin"]
    torch._dynamo.reset()
    compiled, _ = compile_cached(BlocksUnnamedTime(), strict=True)
    with pytest.raises(fxcache.UnsupportedGraphError, match="no timestep input found.*timestep_input="):
        with torch.no_grad():
            compiled(x, torch.tensor([0.5]))
    torch._dynamo.reset()
    compiled, backend = compile_cached(BlocksUnnamedTime(), "duca", strict=True, timestep_input="level", interval=3)
    with torch.no_grad():
        for t in (0.9, 0.6, 0.3):
            compiled(x, torch.tensor([t]))
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "partial", "skip"]


def test_missing_timestep_is_named_with_the_fix():
    from fxcache.analysis import analyse

    graphs = []
    model = make_model("dit")

    def capture(gm, ex, **kw):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(**make_inputs("dit"))
    with pytest.raises(fxcache.UnsupportedGraphError,
                       match="timestep_input='no_such_input'.*its tensor inputs are: class_labels, hidden_states, "
                             "timestep"):
        analyse(graphs[0], timestep_input="no_such_input")
    plan = analyse(graphs[0], timestep_input="timestep")
    assert plan.timestep_name.endswith("timestep_")


def test_dynamic_shapes_are_refused_with_the_fix():
    model = make_model("dit")
    backend = fxcache.cache_backend("duca", lowering="eager", strict=True)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with pytest.raises(fxcache.UnsupportedGraphError, match="dynamic=False"):
        with torch.no_grad():
            compiled(**make_inputs("dit"))


def test_grad_mode_runs_uncached_with_a_warning():
    model = make_model("dit")
    compiled, backend = compile_cached(model, strict=False)
    kw = make_inputs("dit")
    with pytest.warns(fxcache.FxCacheWarning, match="no_grad"):
        out = compiled(**kw)[0]
    assert rel_err(out.detach(), model(**kw)[0].detach()) == 0.0


def test_stats_of_a_module_not_compiled_with_fxcache():
    with pytest.raises(fxcache.ConfigError, match="not compiled with an fxcache backend"):
        fxcache.stats(torch.compile(torch.nn.Linear(2, 2)))


def test_reset_starts_a_new_generation():
    model = make_model("dit")
    compiled, backend = compile_cached(model, "fora", interval=3)
    with torch.no_grad():
        compiled(**make_inputs("dit", t=0.9))
        compiled(**make_inputs("dit", t=0.8))
        fxcache.reset(compiled)
        compiled(**make_inputs("dit", t=0.7))  # t fell, but reset() makes it step 0
    assert [(r["step"], r["kind"]) for r in fxcache.stats(compiled)] == [(0, "full"), (1, "reuse"), (0, "full")]


def test_step_override_for_repeated_timesteps():
    model = make_model("dit")
    compiled, backend = compile_cached(model, "fora", interval=2)
    kw = make_inputs("dit", t=0.5)
    with torch.no_grad():
        for i in range(4):  # a Heun-like scheduler calling twice at one t: without the override it reads as CFG
            with fxcache.step(compiled, i):
                compiled(**kw)
    assert [(r["step"], r["branch"], r["kind"]) for r in fxcache.stats(compiled)] == [
        (0, 0, "full"), (1, 0, "reuse"), (2, 0, "full"), (3, 0, "reuse")]


LATENTS_AS_TIME = ("timestep_input=0 names `hidden_states`, a 4-D tensor of shape (1, 4, 8, 8); the timestep is a "
                   "per-sample scalar (shape (B,) or ())")


def test_a_timestep_input_naming_the_latents_is_said_so_under_strict():
    """DiT's forward parameter 0 is the latents: read as t, its largest value would step the loop at random."""
    compiled, _ = compile_cached(make_model("dit"), "fora", timestep_input=0, strict=True)
    with pytest.raises(fxcache.UnsupportedGraphError) as info, torch.no_grad():
        compiled(**make_inputs("dit"))
    message = str(info.value)
    assert message.startswith(LATENTS_AS_TIME)
    assert "per-sample scalar inputs: `timestep` (1,), `class_labels` (1,)" in message
    assert "fxcache finds `timestep` itself: leave timestep_input unset" in message


def test_a_timestep_input_naming_the_latents_warns_and_runs_uncached():
    model = make_model("dit")
    compiled, _ = compile_cached(model, "fora", timestep_input=0, strict=False, interval=2)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [compiled(**make_inputs("dit", t=t))[0] for t in (0.9, 0.6)]
        refs = [model(**make_inputs("dit", t=t))[0] for t in (0.9, 0.6)]
    ours = [str(w.message) for w in caught if issubclass(w.category, fxcache.FxCacheWarning)]
    assert len(ours) == 1 and LATENTS_AS_TIME in ours[0]
    assert [r["cached"] for r in fxcache.stats(compiled)] == [False, False]
    for o, r in zip(outs, refs):
        assert torch.equal(o, r)


def test_explain_says_a_timestep_input_names_the_latents():
    result = fxcache.explain(make_model("dit"), **make_inputs("dit"), timestep_input="hidden_states")
    assert result.plans == [None]
    assert result.errors[0].startswith("timestep_input='hidden_states' names `hidden_states`, a 4-D tensor of shape "
                                       "(1, 4, 8, 8)")
    plan = fxcache.explain(make_model("dit"), **make_inputs("dit"), timestep_input=2).plans[0]
    assert plan is not None and plan.timestep_name.endswith("class_labels_")  # (B,): a per-sample scalar


def test_a_timestep_input_naming_the_latents_of_blocks_compiled_on_their_own_is_said_so():
    """Blocks compiled one by one take their step from the model call around them: there too, a timestep_input that
    names the latents is named as such, not as a missing timestep."""
    model = make_model("dit")
    backend = fxcache.cache_backend("fora", lowering="eager", strict=True, timestep_input=0)
    for block in model.transformer_blocks:
        block.compile(backend=backend, dynamic=False)
    with pytest.raises(fxcache.UnsupportedGraphError) as info, torch.no_grad():
        model(**make_inputs("dit"))
    assert LATENTS_AS_TIME in str(info.value) and "`timestep` (1,)" in str(info.value)
