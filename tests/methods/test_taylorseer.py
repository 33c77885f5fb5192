"""TaylorSeer: schedule, factor bookkeeping, and the equivalences of ALGORITHMS.md 8 on the four tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError, StepKind, TaylorSeerConfig
from fxcache.runtime.taylor import TaylorState
from fxcache.testing import MODEL_NAMES
from helpers import (
    all_pairs, cfg_calls, compile_cached, loop_inputs, make_model, reference_for, rel_err, run, run_reference,
    run_twice_without_recompiles,
)

STEPS = 10


def test_flux_schedule_has_ten_full_steps_in_fifty():
    config = TaylorSeerConfig(interval=6, order=2, warmup_steps=3)
    full = [s for s in range(50) if config.step_kind(s) is StepKind.FULL]
    assert full == [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]
    assert {config.step_kind(s) for s in range(50)} == {StepKind.FULL, StepKind.FORECAST}


@pytest.mark.parametrize("bad", [dict(order=-1), dict(order=9), dict(interval=0), dict(warmup_steps=0),
                                 dict(order=1.5), dict(interval=True)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match="TaylorSeerConfig"):
        TaylorSeerConfig(**bad)


def spec_orders(full_steps: list[int], order: int, warmup: int) -> list[int]:
    """m' after each FULL step, from ALGORITHMS.md 1.5 written out."""
    out, last, avail = [], None, -1
    for s in full_steps:
        if last is None or s < warmup - 1:
            avail = 0
        else:
            avail = min(order, avail + 1)
        last = s
        out.append(avail)
    return out


@given(order=st.integers(0, 5), warmup=st.integers(1, 6), interval=st.integers(2, 7))
def test_orders_grow_by_one_per_full_step_after_warmup(order, warmup, interval):
    config = TaylorSeerConfig(order=order, warmup_steps=warmup, interval=interval)
    full = [s for s in range(40) if config.step_kind(s) is StepKind.FULL]
    state, seen = TaylorState(order, warmup), []
    for s in full:
        diff = state.full_inputs(s, "cpu")
        assert diff.shape == (order,)
        seen.append(state.available)
        nonzero = int((diff != 0).sum())
        assert nonzero == state.available  # one finite difference per order gained
        if nonzero:
            assert torch.allclose(diff[:nonzero], torch.full((nonzero,), 1.0 / (s - prev)))
        prev = s
    assert seen == spec_orders(full, order, warmup)


@given(order=st.integers(0, 5), delta=st.integers(1, 10))
def test_forecast_coefficients_are_delta_powers_over_factorials(order, delta):
    state = TaylorState(order, 1)
    for s in range(order + 1):  # order + 1 FULL steps, one apart: every order present
        state.full_inputs(s, "cpu")
    coef = state.forecast_inputs(order + delta, "cpu")
    expected = torch.tensor([delta ** i / math.factorial(i) for i in range(order + 1)])
    assert torch.allclose(coef, expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_order_zero_equals_fora(name):
    model = make_model(name)
    inputs = loop_inputs(name, STEPS)
    taylor, _ = compile_cached(model, "taylorseer", order=0, interval=3, warmup_steps=1)
    outs = run(taylor, inputs)
    torch._dynamo.reset()
    fora, _ = compile_cached(model, "fora", interval=3, warmup_steps=1)
    expected = run(fora, inputs)
    kinds = [r["kind"] for r in fxcache.stats(taylor)]
    assert kinds.count("forecast") == 6
    for o, e in zip(outs, expected):
        assert torch.equal(o, e)



@pytest.mark.parametrize("name,opts,batch", all_pairs(
    MODEL_NAMES, [dict(interval=3, order=2, warmup_steps=1), dict(interval=4, order=1, warmup_steps=3)], [1, 2]))
def test_loop_equals_hooked_reference(name, opts, batch):
    model = make_model(name)
    compiled, backend = compile_cached(model, "taylorseer", **opts)
    inputs = loop_inputs(name, STEPS, batch=batch)
    outs = run(compiled, inputs)
    expected = run_reference(reference_for(name, make_model(name), backend.config), inputs)
    torch._dynamo.reset()
    fora_outs = run(compile_cached(make_model(name), "fora", interval=opts["interval"],
                                   warmup_steps=opts["warmup_steps"])[0], inputs)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert kinds == [backend.config.step_kind(s).value for s in range(STEPS)]
    second_order_seen = False
    for s, (o, e, f) in enumerate(zip(outs, expected, fora_outs)):
        assert rel_err(o, e) <= 1e-5, (s, kinds[s])
        if kinds[s] == "forecast" and s > opts["warmup_steps"] + opts["interval"]:
            second_order_seen = True
            assert rel_err(o, f) > 1e-5, f"step {s}: the forecast equals plain reuse"
    assert second_order_seen


@pytest.mark.parametrize("name", ["flux", "pixart"])
def test_sequential_cfg_keeps_factors_per_branch(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "taylorseer", interval=3, order=1, warmup_steps=1)
    calls = cfg_calls(name, STEPS)
    outs = run(compiled, calls)
    expected = run_reference(reference_for(name, make_model(name), backend.config), calls, branches=2)
    assert [r["branch"] for r in fxcache.stats(compiled)] == [0, 1] * STEPS
    for o, e in zip(outs, expected):
        assert rel_err(o, e) <= 1e-5


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_two_generations_without_recompiles(name):
    model = make_model(name)
    compiled, backend = compile_cached(model, "taylorseer", interval=3, order=2, warmup_steps=1, fullgraph=True)
    first, second = run_twice_without_recompiles(compiled, loop_inputs(name, STEPS))
    assert len(backend.runners) == 1
    for a, b in zip(first, second):
        assert torch.equal(a, b)
