"""The step/branch rule (ALGORITHMS.md 8.10) and the explicit `step` override: pure, no compilation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError
from fxcache.runtime.step import StepTracker

# strictly decreasing timesteps, each evaluated 1..3 times in a row (CFG branches)
timestep_values = st.one_of(
    st.floats(min_value=0.0, max_value=1000.0, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=1000).map(float),
)
schedules = st.lists(
    st.tuples(timestep_values, st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=60,
    unique_by=lambda pair: pair[0],
).map(lambda pairs: sorted(pairs, key=lambda pair: -pair[0]))


integer_schedules = st.lists(
    st.tuples(st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=60,
    unique_by=lambda pair: pair[0],
).map(lambda pairs: sorted(pairs, key=lambda pair: -pair[0]))


def expand(schedule):
    """[(t, repeats)] -> calls, expected steps, expected branches."""
    calls, steps, branches = [], [], []
    for step, (t, repeats) in enumerate(schedule):
        for branch in range(repeats):
            calls.append(t)
            steps.append(step)
            branches.append(branch)
    return calls, steps, branches


def run(tracker, calls):
    return [tracker.advance(t) for t in calls]


# -- StepTracker.advance -------------------------------------------------------------------------------------------


@given(schedule=schedules)
def test_steps_and_branches_follow_timesteps(schedule):
    calls, steps, branches = expand(schedule)
    out = run(StepTracker(), calls)
    assert [o[0] for o in out] == steps
    assert [o[1] for o in out] == branches
    assert [o[2] for o in out] == [True] + [False] * (len(calls) - 1)


def test_cfg_pairs():
    # (t0, t0, t1, t1, ...) -> steps (0, 0, 1, 1, ...), branches (0, 1, 0, 1, ...)
    out = run(StepTracker(), [999.0, 999.0, 800.0, 800.0, 500.0, 500.0])
    assert out == [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False)]


@given(first=schedules, second=integer_schedules, gap=st.integers(min_value=1, max_value=1000))
def test_a_rise_in_t_starts_a_new_generation(first, second, gap):
    tracker = StepTracker()
    calls, _, _ = expand(first)
    run(tracker, calls)
    # integer timesteps shifted above the last timestep of the first run: still distinct and decreasing
    calls2, steps2, branches2 = expand([(calls[-1] + gap + t, r) for t, r in second])
    assert calls2[0] > calls[-1]
    out = run(tracker, calls2)
    assert [o[0] for o in out] == steps2
    assert [o[1] for o in out] == branches2
    assert [o[2] for o in out] == [True] + [False] * (len(calls2) - 1)


@given(schedule=schedules.filter(lambda s: len(s) >= 2))
def test_jump_back_to_first_timestep_resets(schedule):
    calls, _, _ = expand(schedule)
    tracker = StepTracker()
    run(tracker, calls)
    assert tracker.advance(calls[0]) == (0, 0, True)
    assert tracker.advance(calls[0]) == (0, 1, False)


def test_first_call_is_a_new_generation_whatever_t():
    assert StepTracker().advance(0.0) == (0, 0, True)
    assert StepTracker().advance(-5.0) == (0, 0, True)


# -- StepTracker.force / reset -------------------------------------------------------------------------------------


@given(step=st.integers(0, 100), branch=st.integers(0, 3), t=st.one_of(st.none(), timestep_values))
def test_force_starts_a_generation_only_at_step_0_branch_0(step, branch, t):
    tracker = StepTracker()
    tracker.advance(500.0)
    new = tracker.force(step, branch, t)
    assert new is (step == 0 and branch == 0)
    assert (tracker.step, tracker.branch) == (step, branch)
    assert tracker.last_t == (500.0 if t is None else t)


def test_force_then_timestep_rule_continues_from_the_forced_step():
    tracker = StepTracker()
    run(tracker, [900.0, 800.0])
    assert tracker.force(5, 1, 400.0) is False
    assert tracker.advance(400.0) == (5, 2, False)  # same t: next branch
    assert tracker.advance(300.0) == (6, 0, False)  # lower t: next step
    assert tracker.advance(350.0) == (0, 0, True)  # higher t: new generation


def test_force_without_t_keeps_last_t():
    tracker = StepTracker()
    tracker.advance(700.0)
    assert tracker.force(3, 0, None) is False
    assert tracker.advance(700.0) == (3, 1, False)


@given(schedule=schedules, t=timestep_values)
def test_reset_makes_the_next_call_a_new_generation(schedule, t):
    tracker = StepTracker()
    calls, _, _ = expand(schedule)
    run(tracker, calls)
    tracker.reset()
    assert tracker.last_t is None
    assert tracker.advance(t) == (0, 0, True)  # even if t is lower than (or equal to) the last one
    assert tracker.advance(t) == (0, 1, False)


# -- CacheBackend.step ---------------------------------------------------------------------------------------------


@pytest.fixture
def backend():
    return fxcache.cache_backend("duca", lowering="eager")


def test_step_sets_and_restores_override(backend):
    assert backend.override is None
    with backend.step(3, 1) as b:
        assert b is backend
        assert backend.override == (3, 1)
    assert backend.override is None


def test_step_default_branch_is_zero(backend):
    with backend.step(7):
        assert backend.override == (7, 0)
    assert backend.override is None


def test_step_nests(backend):
    with backend.step(2, 0):
        assert backend.override == (2, 0)
        with backend.step(5, 1):
            assert backend.override == (5, 1)
            with backend.step(0):
                assert backend.override == (0, 0)
            assert backend.override == (5, 1)
        assert backend.override == (2, 0)
    assert backend.override is None


def test_step_restores_override_on_exception(backend):
    with pytest.raises(RuntimeError, match="boom"):
        with backend.step(1):
            with backend.step(4, 1):
                raise RuntimeError("boom")
    assert backend.override is None

    with backend.step(1):
        with pytest.raises(RuntimeError):
            with backend.step(4, 1):
                raise RuntimeError("boom")
        assert backend.override == (1, 0)


def test_module_level_step_accepts_the_backend(backend):
    with fxcache.step(backend, 6, 1):
        assert backend.override == (6, 1)
    assert backend.override is None


@pytest.mark.parametrize("index", [-1, True, False, 1.0, "1", None])
def test_step_rejects_bad_index(backend, index):
    with pytest.raises(ConfigError, match="step index"):
        with backend.step(index):
            pass
    assert backend.override is None


@pytest.mark.parametrize("branch", [-1, True, False, 0.0, "0", None])
def test_step_rejects_bad_branch(backend, branch):
    with pytest.raises(ConfigError, match="branch"):
        with backend.step(0, branch):
            pass
    assert backend.override is None


def test_rejected_nested_step_keeps_outer_override(backend):
    with backend.step(2, 1):
        with pytest.raises(ConfigError):
            with backend.step(-3):
                pass
        assert backend.override == (2, 1)
    assert backend.override is None


@given(index=st.integers(max_value=-1))
def test_step_rejects_any_negative_index(index):
    backend = fxcache.cache_backend("fora", lowering="eager")
    with pytest.raises(ConfigError):
        with backend.step(index):
            pass
    assert backend.override is None
