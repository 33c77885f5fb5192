"""MagCache against the truth: diffusers' own MagCache hooks (`diffusers/hooks/mag_cache.py`) on the same tiny FLUX.

The ratios come from diffusers' calibration mode on that model; then diffusers' hooks and the compiled fxcache model
run the same smooth sampling loop (each step's latents move by the model's output), and must skip the same calls and
give the same outputs. The schedule alone is checked against diffusers' rule run on its own hook state, around a
stack of two trivial blocks, for generated ratios and settings.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from diffusers.hooks import MagCacheConfig as DiffusersMagCacheConfig
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, apply_mag_cache, nearest_interp
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcache
from fxcache.errors import ConfigError, UnsupportedGraphError
from fxcache.methods.magcache import interpolate_ratios, walk_schedule
from fxcache.testing import make_inputs, make_model
from helpers import SelfAttention

STEPS = 8
GUIDANCE = 3.0


# -- diffusers' rule without a model --------------------------------------------------------------------------------

class CountingBlock(torch.nn.Module):
    """A block that adds 1 and counts its runs: diffusers' head hook runs it exactly on the calls it computes."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def forward(self, hidden_states):
        self.runs += 1
        return hidden_states + 1.0


TransformerBlockRegistry.register(CountingBlock, TransformerBlockMetadata())


class TwoBlocks(torch.nn.Module):
    """The smallest model diffusers' MagCache hooks: a head and a tail block under `transformer_blocks`."""

    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([CountingBlock(), CountingBlock()])

    def forward(self, hidden_states):
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        return hidden_states


def diffusers_skips(ratios, threshold, max_skip_steps, retention_ratio, num_steps) -> list[bool]:
    """Whether diffusers' MagCache skips each of `num_steps` calls of one branch."""
    model = TwoBlocks()
    apply_mag_cache(model, DiffusersMagCacheConfig(
        mag_ratios=list(ratios), threshold=threshold, max_skip_steps=max_skip_steps,
        retention_ratio=retention_ratio, num_inference_steps=num_steps))
    head, skips = model.transformer_blocks[0], []
    for _ in range(num_steps):
        before = head.runs
        model(torch.zeros(1, 2, 4))
        skips.append(head.runs == before)
    return skips


ratio_lists = st.lists(st.floats(min_value=0.9, max_value=1.1), min_size=1, max_size=40)


@settings(max_examples=300)  # cheap examples; many draws compute every call, so take more of them
@given(ratios=ratio_lists, data=st.data())
def test_the_schedule_takes_the_decisions_of_diffusers_rule(ratios, data):
    """Generated ratios and settings; thresholds include the error one ratio makes on its own and the float just
    below it, where a float64 comparison would decide otherwise (ADAPTIVE.md section 11.2)."""
    num_steps = data.draw(st.integers(1, 40), label="num_steps")
    own_errors = [float(abs(np.float32(1.0) - np.float32(r))) for r in ratios]
    threshold = data.draw(st.one_of(
        st.floats(min_value=0.0, max_value=0.4),
        st.sampled_from(own_errors),
        st.sampled_from(own_errors).map(lambda e: float(np.nextafter(e, 0.0)))), label="threshold")
    max_skip_steps = data.draw(st.integers(0, 6), label="max_skip_steps")
    retention_ratio = data.draw(st.floats(min_value=0.0, max_value=0.5), label="retention_ratio")
    config = fxcache.MagCacheConfig(mag_ratios=ratios, threshold=threshold, max_skip_steps=max_skip_steps,
                                    retention_ratio=retention_ratio, num_steps=num_steps)
    expected = diffusers_skips(ratios, threshold, max_skip_steps, retention_ratio, num_steps)
    assert [config.step_kind(s) is fxcache.StepKind.RESIDUAL for s in range(num_steps)] == expected


def test_the_threshold_is_compared_in_float32_as_diffusers_does():
    """err = |1 - float32(0.9)| = 0.100000024 in float32; a threshold just below it in float64 rounds to it in
    float32, so diffusers skips, where a float64 comparison would not."""
    error = float(abs(np.float32(1.0) - np.float32(0.9)))
    threshold = float(np.nextafter(error, 0.0))
    assert error > threshold and np.float32(threshold) == np.float32(error)
    ratios, steps = (1.0, 0.9), 2
    assert diffusers_skips(ratios, threshold, 3, 0.0, steps) == [False, True]
    assert walk_schedule(interpolate_ratios(ratios, steps), threshold, 3, 0) == (False, True)


@given(source=st.integers(1, 60), target=st.integers(1, 80))
def test_ratios_are_resampled_as_diffusers_resamples_them(source, target):
    ratios = tuple(1.0 + 0.001 * i for i in range(source))
    expected = nearest_interp(torch.tensor(ratios), target) if source != target else torch.tensor(ratios)
    assert interpolate_ratios(ratios, target) == tuple(float(v) for v in expected)


def test_28_ratios_at_55_steps_round_half_to_even():
    """(ADAPTIVE.md section 3) index round(j * 27 / 54) = round(j / 2) on the float32 grid: 0, 0, 1, 2, 2, 2, ..."""
    resampled = interpolate_ratios(tuple(range(1, 29)), 55)
    assert [int(v) - 1 for v in resampled[:6]] == [0, 0, 1, 2, 2, 2]
    assert interpolate_ratios((1.5, 2.5), 1) == (2.5,)  # one step takes the last ratio


# -- the compiled model against diffusers' hooks ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux():
    return make_model("flux", num_layers=2, num_single_layers=3).eval()


def sample(model, cond, steps, *, uncond=None, contexts=False) -> list[torch.Tensor]:
    """A smooth sampling loop; with `uncond`, true CFG (a cond then an uncond call per step, combined with
    GUIDANCE). `contexts`: wrap the calls in diffusers' cache contexts "cond" / "uncond". Returns every call's
    output in call order."""
    x, outs = cond["hidden_states"].clone(), []

    def call(kw, name, t):
        with model.cache_context(name) if contexts else contextlib.nullcontext():
            out = model(**dict(kw, hidden_states=x, timestep=torch.full((x.shape[0],), t)))[0]
        outs.append(out)
        return out

    with torch.no_grad():
        for s in range(steps):
            t = 1.0 - s / (steps + 1)
            velocity = call(cond, "cond", t)
            if uncond is not None:
                u = call(uncond, "uncond", t)
                velocity = u + GUIDANCE * (velocity - u)
            x = x - velocity / steps
    return outs


def calibrate(model, kw, steps) -> list[float]:
    """The ratios diffusers' calibration mode prints after one `steps`-step generation of `model`."""
    calibrating = copy.deepcopy(model)
    calibrating.enable_cache(DiffusersMagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        sample(calibrating, kw, steps)
    lines = printed.getvalue().split("MagCacheConfig(mag_ratios=...):")[1].strip().splitlines()
    return ast.literal_eval(lines[0])


@pytest.fixture(scope="module")
def ratios(flux):
    return calibrate(flux, make_inputs("flux"), STEPS)


def compiled(model, config, lowering="eager"):
    backend = fxcache.cache_backend(config, lowering=lowering, strict=True)
    return torch.compile(copy.deepcopy(model), backend=backend, dynamic=False)


def diffusers_model(model, config: fxcache.MagCacheConfig):
    peer = copy.deepcopy(model)
    peer.enable_cache(DiffusersMagCacheConfig(
        mag_ratios=list(config.mag_ratios), threshold=config.threshold, max_skip_steps=config.max_skip_steps,
        retention_ratio=config.retention_ratio, num_inference_steps=config.num_steps))
    return peer


def record_decisions(peer) -> list[bool]:
    """The list diffusers' head hook fills with its own decision (its state's `should_compute`) on each call."""
    hook = peer.transformer_blocks[0]._diffusers_hook.get_hook("mag_cache_leader_block_hook")
    decisions, after = [], hook.fn_ref.post_forward

    def recorded(module, output):
        decisions.append(hook.state_manager.get_state().should_compute)
        return after(module, output)

    hook.fn_ref.post_forward = recorded
    return decisions


def run_both(flux, config, cond, steps, *, uncond=None):
    """(compiled model, its outputs, diffusers' outputs, diffusers' decisions) of one loop on each."""
    peer = diffusers_model(flux, config)
    decisions = record_decisions(peer)
    expected = sample(peer, cond, steps, uncond=uncond, contexts=uncond is not None)
    model = compiled(flux, config)
    got = sample(model, cond, steps, uncond=uncond)
    return model, got, expected, decisions


def assert_same_run(model, got, expected, decisions, tol=1e-5) -> list[str]:
    """fxcache skipped the calls diffusers skipped (some, not all), with the same outputs. Returns the kinds."""
    kinds = [r["kind"] for r in fxcache.stats(model)]
    assert [kind == "full" for kind in kinds] == decisions
    assert set(kinds) == {"full", "residual"}, f"the loop must skip some calls and compute others: {kinds}"
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert float((a - b).abs().max()) <= tol * float(b.abs().max()), (i, kinds[i])
    return kinds


def test_skips_the_calls_diffusers_skips_with_its_outputs(flux, ratios):
    config = fxcache.MagCacheConfig(mag_ratios=ratios, threshold=0.06, num_steps=STEPS)
    model, got, expected, decisions = run_both(flux, config, make_inputs("flux"), STEPS)
    kinds = assert_same_run(model, got, expected, decisions)
    assert kinds == [config.step_kind(s).value for s in range(STEPS)]


def test_true_cfg_skips_per_branch_as_diffusers_cache_contexts_do(flux, ratios):
    """Two calls per step; diffusers keeps one state per cache context, fxcache tells the branches apart by their
    conditioning. Both branches follow the schedule, step by step."""
    config = fxcache.MagCacheConfig(mag_ratios=ratios, threshold=0.06, num_steps=STEPS)
    cond, uncond = make_inputs("flux"), make_inputs("flux", seed=7)
    model, got, expected, decisions = run_both(flux, config, cond, STEPS, uncond=uncond)
    kinds = assert_same_run(model, got, expected, decisions)
    assert kinds == [config.step_kind(s).value for s in range(STEPS) for _ in range(2)]
    assert {r["branch"] for r in fxcache.stats(model)} == {0, 1}


def test_a_batch_of_two_skips_as_one_call(flux, ratios):
    config = fxcache.MagCacheConfig(mag_ratios=ratios, threshold=0.06, num_steps=STEPS)
    model, got, expected, decisions = run_both(flux, config, make_inputs("flux", batch=2), STEPS)
    assert_same_run(model, got, expected, decisions)
    assert got[0].shape[0] == 2


def test_ratios_of_28_steps_at_10_steps_are_resampled_as_diffusers_does(flux):
    ratios28 = calibrate(flux, make_inputs("flux"), 28)
    config = fxcache.MagCacheConfig(mag_ratios=ratios28, threshold=0.02, retention_ratio=0.1, num_steps=10)
    assert len(config.mag_ratios) == 28 and len(config.ratios) == 10
    model, got, expected, decisions = run_both(flux, config, make_inputs("flux"), 10)
    assert_same_run(model, got, expected, decisions)


def test_a_request_past_num_steps_starts_the_schedule_over_as_diffusers_does(flux, ratios):
    """diffusers resets its state after num_inference_steps calls of a branch (`mag_cache.py` L380-395): call
    num_steps computes again, and the schedule repeats. fxcache warns that the request ran past num_steps."""
    config = fxcache.MagCacheConfig(mag_ratios=ratios, threshold=0.06, num_steps=STEPS)
    peer = diffusers_model(flux, config)
    decisions = record_decisions(peer)
    expected = sample(peer, make_inputs("flux"), 2 * STEPS)
    model = compiled(flux, config)
    with pytest.warns(fxcache.FxCacheWarning, match=f"past num_steps={STEPS}"), fxcache.request(model):
        got = sample(model, make_inputs("flux"), 2 * STEPS)
    kinds = assert_same_run(model, got, expected, decisions)
    assert kinds[:STEPS] == kinds[STEPS:] and kinds[STEPS] == "full"


class Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn, self.ff, self.mod = SelfAttention(d), torch.nn.Linear(d, d), torch.nn.Linear(d, 2 * d)

    def forward(self, x, c):
        g1, g2 = self.mod(c).chunk(2, -1)
        x = x + g1[:, None] * self.attn(x)
        return x + g2[:, None] * self.ff(x)


class HeadReadsBlockZero(torch.nn.Module):
    """A small DiT whose head reads block 0's output besides the last block's: a long skip around the others."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.t1, self.out = torch.nn.Linear(4, d), torch.nn.Linear(16, d), torch.nn.Linear(d, 4)
        self.transformer_blocks = torch.nn.ModuleList([Block(d), Block(d), Block(d)])

    def forward(self, x, timestep):
        angles = timestep[:, None] * torch.exp(-torch.arange(8, dtype=torch.float32) / 8)
        c = self.t1(torch.cat([torch.cos(angles), torch.sin(angles)], -1))
        h = first = self.transformer_blocks[0](self.inp(x), c)
        for block in self.transformer_blocks[1:]:
            h = block(h, c)
        return self.out(h + first)


def test_blocks_whose_values_are_read_after_the_last_block_are_refused():
    config = fxcache.MagCacheConfig(mag_ratios=[1.0] * STEPS, num_steps=STEPS)
    model = torch.compile(HeadReadsBlockZero().eval(), dynamic=False,
                          backend=fxcache.cache_backend(config, lowering="eager", strict=True))
    with pytest.raises(UnsupportedGraphError, match="read after the last block"), torch.no_grad():
        model(torch.randn(1, 8, 4), torch.tensor([0.5]))


def nodes_in_blocks(backend, kind: fxcache.StepKind) -> int:
    """How many computing nodes (not parameter placeholders) of `kind`'s variant belong to a transformer block."""
    from fxcache.analysis.module_stack import stack_entries

    runner = backend.runners[0]
    names = [block.name for block in runner.plan.blocks]
    return sum(1 for n in runner.variant_of(kind).gm.graph.nodes if n.op != "placeholder"
               and any(p == name or p.startswith(name + ".") for p, _ in stack_entries(n) for name in names))


def test_a_u_shaped_stack_is_cached_whole():
    """HunyuanDiT's long skips join blocks inside the stack: nothing but the last block's output is read after
    it, so the residual of all blocks stands for them, and cached calls run no block."""
    import families

    config = fxcache.MagCacheConfig(mag_ratios=[1.0] * 4, num_steps=4, retention_ratio=0.0)
    backend = fxcache.cache_backend(config, lowering="eager", strict=True)
    model = torch.compile(families.make("hunyuandit"), dynamic=False, backend=backend)
    with torch.no_grad():
        outs = [model(**families.inputs("hunyuandit", t=1.0 - s / 5))[0] for s in range(4)]
    assert [r["kind"] for r in fxcache.stats(model)] == ["full", "residual", "residual", "residual"]
    assert all(torch.isfinite(o).all() for o in outs)
    assert nodes_in_blocks(backend, fxcache.StepKind.RESIDUAL) == 0 < nodes_in_blocks(backend, fxcache.StepKind.FULL)


def test_inductor_runs_two_requests_without_recompiling(flux, ratios):
    config = fxcache.MagCacheConfig(mag_ratios=ratios, threshold=0.06, num_steps=STEPS)
    peer = diffusers_model(flux, config)
    expected = sample(peer, make_inputs("flux"), STEPS)
    model = compiled(flux, config, lowering="inductor")
    first = sample(model, make_inputs("flux"), STEPS)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = sample(model, make_inputs("flux"), STEPS)
    kinds = [r["kind"] for r in fxcache.stats(model)]
    assert kinds == [config.step_kind(s).value for s in range(STEPS)] * 2 and "residual" in kinds
    for a, b, e in zip(first, second, expected):
        assert torch.equal(a, b)
        assert float((a - e).abs().max()) <= 1e-4 * float(e.abs().max())


# -- options ----------------------------------------------------------------------------------------------------------

def test_the_flux_preset_is_diffusers_ratios_with_the_authors_settings():
    config = fxcache.cache_backend("magcache", preset="flux").config
    assert torch.equal(torch.tensor(config.ratios), FLUX_MAG_RATIOS)
    assert (config.threshold, config.max_skip_steps, config.retention_ratio, config.num_steps) == (0.24, 5, 0.1, 28)
    skips = diffusers_skips(FLUX_MAG_RATIOS.tolist(), 0.24, 5, 0.1, 28)
    assert [config.step_kind(s) is fxcache.StepKind.RESIDUAL for s in range(28)] == skips
    assert config.kinds == {fxcache.StepKind.FULL, fxcache.StepKind.RESIDUAL}


def test_defaults_are_diffusers_and_a_list_is_stored_as_a_tuple():
    config = fxcache.MagCacheConfig(mag_ratios=[1, 1.5])
    defaults = DiffusersMagCacheConfig(mag_ratios=[1.0] * 28)
    assert (config.threshold, config.max_skip_steps, config.retention_ratio, config.num_steps) == \
        (defaults.threshold, defaults.max_skip_steps, defaults.retention_ratio, defaults.num_inference_steps)
    assert config.mag_ratios == (1, 1.5) and config.planned_steps == 28 and config.horizon == 28
    assert fxcache.MagCacheConfig.from_dict(config.to_dict()) == config


def test_a_schedule_that_never_skips_builds_no_cache():
    config = fxcache.MagCacheConfig(mag_ratios=[2.0] * 4, num_steps=4)
    assert config.kinds == {fxcache.StepKind.FULL}
    assert fxcache.MagCacheConfig(mag_ratios=[1.0] * 4, num_steps=4, max_skip_steps=0).kinds == {
        fxcache.StepKind.FULL}


@pytest.mark.parametrize("options, says", [
    ({}, r"MagCacheConfig\.mag_ratios is required .*calibrate=True.*preset='flux'"),
    ({"mag_ratios": [1.0, 0.0]}, r"MagCacheConfig\.mag_ratios must be positive numbers .*got 0\.0 at index 1"),
    ({"mag_ratios": [1.0, -2]}, r"MagCacheConfig\.mag_ratios must be positive numbers .*got -2 at index 1"),
    ({"mag_ratios": [1.0, float("nan")]}, r"MagCacheConfig\.mag_ratios must be None or a non-empty list of finite "
                                          r"numbers, got \[1\.0, nan\]"),
    ({"mag_ratios": []}, r"MagCacheConfig\.mag_ratios must be None or a non-empty list of finite numbers, got \[\]"),
    ({"mag_ratios": [1.0], "threshold": -0.1}, r"MagCacheConfig\.threshold must be >= 0 .*got -0\.1"),
    ({"mag_ratios": [1.0], "retention_ratio": 1.5}, r"MagCacheConfig\.retention_ratio must be a number in \[0, 1\], "
                                                    r"got 1\.5"),
    ({"mag_ratios": [1.0], "max_skip_steps": -1}, r"MagCacheConfig\.max_skip_steps must be >= 0, got -1"),
    ({"mag_ratios": [1.0], "num_steps": 0}, r"MagCacheConfig\.num_steps must be >= 1, got 0"),
    ({"mag_ratios": [1.0], "num_steps": 28.0}, r"MagCacheConfig\.num_steps must be an int, got 28\.0"),
])
def test_bad_options_are_config_errors_naming_the_field_and_value(options, says):
    with pytest.raises(ConfigError, match=says):
        fxcache.MagCacheConfig(**options)
