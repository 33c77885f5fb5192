"""The step rule (which branch and step a call is, from t, conditioning and context name) and the explicit
`step` override: pure, no compilation."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError
from fxcache.runtime.step import StepTracker, TimeDirection

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


# -- StepTracker.locate ---------------------------------------------------------------------------------------------

COND = (1.0, 2.0)  # a conditioning fingerprint
UNCOND = (3.0, 4.0)


def locate_all(tracker, calls):
    """calls: [(t, fingerprint)] or [t] (one stable conditioning) -> [(step, branch, new)]."""
    out = []
    for c in calls:
        t, fp = c if isinstance(c, tuple) else (c, COND)
        p = tracker.locate(t, fingerprint=fp)
        out.append((p.step, p.branch, p.new))
    return out


@given(schedule=schedules)
def test_steps_and_branches_follow_timesteps_and_conditioning(schedule):
    """Each repeat of a t with other conditioning is another CFG branch; every branch counts its own steps."""
    calls, steps, branches = expand(schedule)
    fps = [(float(b), 0.0) for b in branches]  # branch b has conditioning (b, 0) at every step
    out = locate_all(StepTracker(), list(zip(calls, fps)))
    # every branch counts its own calls (one first seen later has no caches yet: it runs FULL first)
    counts, expected = {}, []
    for b in branches:
        expected.append(counts.get(b, 0))
        counts[b] = expected[-1] + 1
    assert [o[0] for o in out] == expected
    assert [o[1] for o in out] == branches
    assert [o[2] for o in out] == [e == 0 for e in expected]


def test_cfg_pairs():
    out = locate_all(StepTracker(), [(999.0, COND), (999.0, UNCOND), (800.0, COND), (800.0, UNCOND)])
    assert out == [(0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False)]


CHANGING = [(999.0, (1.0,)), (999.0, (2.0,)), (800.0, (3.0,)), (800.0, (4.0,)), (500.0, (5.0,)), (500.0, (6.0,))]


def test_conditioning_that_changes_every_step_continues_the_loop_inside_a_request():
    """Inside an explicit request (no other request can interleave), per-step conditioning still follows t."""
    assert locate_all(StepTracker(continue_unmatched=True), CHANGING) == [
        (0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False)]


def test_conditioning_that_changes_outside_a_request_reads_no_cache():
    """Outside a request such a call could be another request: it starts a branch of its own (FULL)."""
    out = locate_all(StepTracker(max_branches=8), CHANGING)
    assert all(o[0] == 0 and o[2] for o in out)


def test_a_lower_first_t_with_other_conditioning_never_continues_the_running_request():
    tracker = StepTracker()
    locate_all(tracker, [(1000.0, (1.0,))])
    p = tracker.locate(980.0, fingerprint=(2.0,))  # request B starts below A's last t
    assert p.new and p.step == 0 and p.branch == 1 and p.unmatched
    assert tracker.locate(930.0, fingerprint=(1.0,)).step == 1  # A goes on


@given(first=schedules, second=integer_schedules, gap=st.integers(min_value=1, max_value=1000))
@example(first=[(2.0, 2), (0.0, 1)], second=[(0, 2)], gap=1)  # branch 1 stopped early, above the new request's t
def test_a_rise_in_t_starts_a_new_request(first, second, gap):
    tracker = StepTracker()
    calls, _, branches = expand(first)
    locate_all(tracker, [(t, (float(b), 0.0)) for t, b in zip(calls, branches)])
    calls2, steps2, branches2 = expand([(calls[-1] + gap + t, r) for t, r in second])
    out = locate_all(tracker, [(t, (float(b), 0.0)) for t, b in zip(calls2, branches2)])
    counts, expected = {}, []
    for b in branches2:  # every branch of the new request counts its own calls from 0
        expected.append(counts.get(b, 0))
        counts[b] = expected[-1] + 1
    assert [o[0] for o in out] == expected
    assert [o[2] for o in out] == [e == 0 for e in expected]


def test_a_branch_that_cfg_truncation_stopped_early_is_not_continued_by_the_next_request():
    """Request 1 ran CFG down to t=500 and cond alone after; request 2 (img2img) starts at t=400, below 500."""
    tracker = StepTracker()
    locate_all(tracker, [(999.0, COND), (999.0, UNCOND), (500.0, COND), (500.0, UNCOND), (200.0, COND), (0.0, COND)])
    assert locate_all(tracker, [(400.0, COND), (400.0, UNCOND)]) == [(0, 0, True), (0, 1, True)]


def test_the_same_request_again_after_a_failure_at_step_0_starts_over():
    tracker = StepTracker()
    assert locate_all(tracker, [900.0, 900.0, 800.0]) == [(0, 0, True), (0, 0, True), (1, 0, False)]


def test_heun_repeats_t_within_one_branch():
    """Heun-type samplers evaluate twice at one t with the same conditioning: the next step, not a branch."""
    out = locate_all(StepTracker(), [999.0, 800.0, 800.0, 600.0, 600.0])
    assert out == [(0, 0, True), (1, 0, False), (2, 0, False), (3, 0, False), (4, 0, False)]


def test_cache_context_names_are_branches_even_with_equal_conditioning():
    tracker = StepTracker()
    out = [tracker.locate(t, name=n, fingerprint=COND) for t, n in
           [(999.0, "cond"), (999.0, "uncond"), (800.0, "cond"), (800.0, "uncond"), (800.0, "cond")]]
    assert [(p.step, p.branch) for p in out] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]


@given(a=st.integers(2, 12), b=st.integers(2, 12), order=st.lists(st.booleans(), min_size=30, max_size=30),
       offset=st.integers(0, 50))
def test_interleaved_requests_with_their_own_conditioning_never_mix(a, b, order, offset):
    """Two requests round-robin (in any order, both started before either moves on) with other schedules: each
    keeps its own branch and steps."""
    tracker = StepTracker()
    ts = {"A": [1000.0 - 70 * s for s in range(a)], "B": [1000.0 - offset - 60 * s for s in range(b)]}
    fp = {"A": (1.0, 0.0), "B": (2.0, 0.0)}
    pos, got = {"A": 0, "B": 0}, {"A": [], "B": []}
    for pick_a in [True, False] + order + [True] * a + [False] * b:
        r = "A" if pick_a else "B"
        if pos[r] >= len(ts[r]):
            continue
        p = tracker.locate(ts[r][pos[r]], fingerprint=fp[r])
        got[r].append((p.step, p.branch))
        pos[r] += 1
    assert [s for s, _ in got["A"]] == list(range(a)) and [s for s, _ in got["B"]] == list(range(b))
    assert len({br for _, br in got["A"]}) == 1 and len({br for _, br in got["B"]}) == 1
    assert got["A"][0][1] != got["B"][0][1]


def test_a_request_dropped_by_a_new_one_never_continues_it():
    tracker = StepTracker()
    locate_all(tracker, [(900.0, (1.0,)), (800.0, (1.0,))])  # request A
    p = tracker.locate(950.0, fingerprint=(2.0,))  # request C: t above every branch -> A's branch is dropped
    assert (p.step, p.new, p.dropped) == (0, True, (0,))
    q = tracker.locate(700.0, fingerprint=(1.0,))  # A again: never C's next step
    assert q.new and q.step == 0 and q.branch != p.branch


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_t_raises_and_the_next_call_starts_over(bad):
    tracker = StepTracker()
    locate_all(tracker, [900.0, 800.0])
    with pytest.raises(ConfigError, match="finite"):
        tracker.locate(bad, fingerprint=COND)
    assert locate_all(tracker, [700.0]) == [(0, 0, True)]


def test_a_rising_convention_is_learned_from_two_moves_back():
    tracker = StepTracker()
    out = locate_all(tracker, [0.0, 0.1, 0.2, 0.3])
    assert out == [(0, 0, True), (0, 0, True), (1, 0, False), (2, 0, False)]
    assert tracker.direction.name == "rising"
    assert locate_all(tracker, [0.0, 0.1]) == [(0, 0, True), (1, 0, False)]  # the next request, caching at once


def test_a_fixed_direction_is_never_flipped():
    tracker = StepTracker(TimeDirection.of("falling"))
    assert [o[2] for o in locate_all(tracker, [0.0, 0.1, 0.2])] == [True, True, True]
    assert locate_all(StepTracker(TimeDirection.of("rising")), [0.0, 0.1]) == [(0, 0, True), (1, 0, False)]


def test_branches_beyond_the_cap_drop_the_least_recently_used():
    tracker = StepTracker(max_branches=2)
    ps = [tracker.locate(500.0, fingerprint=(float(i),)) for i in range(3)]
    assert [p.branch for p in ps] == [0, 1, 0] and ps[2].dropped == (0,) and ps[2].crowded
    assert len(tracker.branches) == 2


@given(t=timestep_values, repeats=st.integers(1, 200))
def test_one_step_requests_at_one_t_keep_one_branch(t, repeats):
    """1-step sampling, fixed-t loops: the same conditioning at the same t is the same request again."""
    tracker = StepTracker()
    for _ in range(repeats):
        p = tracker.locate(t, fingerprint=COND)
        assert (p.step, p.branch, p.new) == (0, 0, True)
    assert len(tracker.branches) == 1


# -- StepTracker.force / reset -------------------------------------------------------------------------------------


@given(step=st.integers(0, 100), branch=st.integers(0, 3), t=timestep_values)
def test_force_starts_over_only_at_step_0(step, branch, t):
    tracker = StepTracker()
    tracker.force(0, branch, 900.0)
    p = tracker.force(step, branch, t)
    assert (p.step, p.branch, p.new) == (step, branch, step == 0)


@given(step=st.integers(min_value=0, max_value=50), t=timestep_values)
def test_a_forced_branch_never_takes_over_the_caches_of_a_branch_the_rule_made_in_its_slot(step, t):
    tracker = StepTracker()
    tracker.locate(500.0, fingerprint=COND)  # the rule's branch 0
    p = tracker.force(step, 0, t)
    assert (p.step, p.branch, p.new, p.dropped) == (step, 0, True, (0,))
    assert tracker.force(step + 1, 0, t).new is False  # from then on it is the forced branch's slot


@given(schedule=schedules, t=timestep_values)
def test_reset_makes_the_next_call_a_new_generation(schedule, t):
    tracker = StepTracker()
    calls, _, _ = expand(schedule)
    locate_all(tracker, calls)
    tracker.reset()
    assert locate_all(tracker, [t]) == [(0, 0, True)]  # even if t is lower than (or equal to) the last one


# -- CacheBackend.step ---------------------------------------------------------------------------------------------


class _Backend:
    """A backend with its scope's current override at hand."""

    def __init__(self, backend):
        self.backend = backend

    def step(self, *a):
        return self.backend.step(*a)

    def override(self):
        return self.backend.scope.override()


@pytest.fixture
def backend():
    return _Backend(fxcache.cache_backend("duca", lowering="eager"))


def test_step_sets_and_restores_override(backend):
    assert backend.override() is None
    with backend.step(3, 1):
        assert backend.override() == (3, 1)
    assert backend.override() is None


def test_step_default_branch_is_zero(backend):
    with backend.step(7):
        assert backend.override() == (7, 0)
    assert backend.override() is None


def test_step_nests(backend):
    with backend.step(2, 0):
        assert backend.override() == (2, 0)
        with backend.step(5, 1):
            assert backend.override() == (5, 1)
            with backend.step(0):
                assert backend.override() == (0, 0)
            assert backend.override() == (5, 1)
        assert backend.override() == (2, 0)
    assert backend.override() is None


def test_step_restores_override_on_exception(backend):
    with pytest.raises(RuntimeError, match="boom"):
        with backend.step(1):
            with backend.step(4, 1):
                raise RuntimeError("boom")
    assert backend.override() is None

    with backend.step(1):
        with pytest.raises(RuntimeError):
            with backend.step(4, 1):
                raise RuntimeError("boom")
        assert backend.override() == (1, 0)


def test_module_level_step_accepts_the_backend(backend):
    with fxcache.step(backend.backend, 6, 1):
        assert backend.override() == (6, 1)
    assert backend.override() is None


@pytest.mark.parametrize("index", [-1, True, False, 1.0, "1", None])
def test_step_rejects_bad_index(backend, index):
    with pytest.raises(ConfigError, match="step index"):
        with backend.step(index):
            pass
    assert backend.override() is None


@pytest.mark.parametrize("branch", [-1, True, False, 0.0, "0", None])
def test_step_rejects_bad_branch(backend, branch):
    with pytest.raises(ConfigError, match="branch"):
        with backend.step(0, branch):
            pass
    assert backend.override() is None


def test_rejected_nested_step_keeps_outer_override(backend):
    with backend.step(2, 1):
        with pytest.raises(ConfigError):
            with backend.step(-3):
                pass
        assert backend.override() == (2, 1)
    assert backend.override() is None


@given(index=st.integers(max_value=-1))
def test_step_rejects_any_negative_index(index):
    backend = _Backend(fxcache.cache_backend("fora", lowering="eager"))
    with pytest.raises(ConfigError):
        with backend.step(index):
            pass
    assert backend.override() is None
