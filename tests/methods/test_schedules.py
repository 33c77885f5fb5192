"""Schedules of the cache methods (ALGORITHMS.md 1.4, 4.1, 8.10): pure, no compilation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fxcache import StepKind
from fxcache.methods import ClusCaConfig, DuCaConfig, FORAConfig, TaylorSeerConfig, ToCaConfig, cycle_position

F, P, S, R = StepKind.FULL, StepKind.PARTIAL, StepKind.SKIP, StepKind.REUSE

intervals = st.integers(min_value=1, max_value=16)
warmups = st.integers(min_value=1, max_value=12)
ALL_METHODS = [FORAConfig, DuCaConfig, ToCaConfig, TaylorSeerConfig, ClusCaConfig]
method_classes = st.sampled_from(ALL_METHODS)


def spec_full(step: int, interval: int, warmup: int) -> bool:
    """ALGORITHMS.md 1.4, written out independently of the package."""
    return step < warmup or (step - (warmup - 1)) % interval == 0


def spec_positions(steps: int, interval: int, warmup: int) -> list[int]:
    """j(s) = s - last_full(s), computed by walking the steps."""
    out, last = [], None
    for s in range(steps):
        if spec_full(s, interval, warmup):
            last = s
        out.append(s - last)
    return out


# -- shared counter schedule ------------------------------------------------------------------------------------


@given(cls=method_classes, interval=intervals, warmup=warmups)
def test_warmup_steps_are_full(cls, interval, warmup):
    config = cls(interval=interval, warmup_steps=warmup)
    assert [config.step_kind(s) for s in range(warmup)] == [F] * warmup


@given(cls=method_classes, interval=intervals, warmup=warmups, start=st.integers(0, 200))
def test_exactly_one_full_per_window_of_interval_steps_after_warmup(cls, interval, warmup, start):
    config = cls(interval=interval, warmup_steps=warmup)
    first = warmup - 1 + start  # any window that starts at or after the last warm-up step
    window = [config.step_kind(s) for s in range(first, first + interval)]
    assert window.count(F) == 1


@given(cls=method_classes, interval=intervals, warmup=warmups, cycle=st.integers(0, 30))
def test_each_cycle_after_warmup_starts_with_its_only_full(cls, interval, warmup, cycle):
    config = cls(interval=interval, warmup_steps=warmup)
    first = warmup - 1 + cycle * interval
    kinds = [config.step_kind(s) for s in range(first, first + interval)]
    assert kinds[0] == F
    assert F not in kinds[1:]


@given(cls=method_classes, interval=intervals, warmup=warmups)
def test_full_steps_match_the_counter_formula(cls, interval, warmup):
    config = cls(interval=interval, warmup_steps=warmup)
    for s in range(150):
        assert (config.step_kind(s) == F) == spec_full(s, interval, warmup), s


@given(cls=method_classes, interval=intervals, warmup=warmups, total=st.integers(0, 150))
def test_number_of_full_steps(cls, interval, warmup, total):
    config = cls(interval=interval, warmup_steps=warmup)
    fulls = sum(config.step_kind(s) == F for s in range(warmup + total))
    assert fulls == warmup + total // interval  # #FULL = W + floor((T - W) / N)


@given(interval=intervals, warmup=warmups)
def test_cycle_position_is_steps_since_last_full(interval, warmup):
    expected = spec_positions(150, interval, warmup)
    assert [cycle_position(s, interval, warmup) for s in range(150)] == expected
    assert all(0 <= j < interval for j in expected)


def test_cycle_position_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        cycle_position(-1, 5, 1)


@pytest.mark.parametrize("cls", ALL_METHODS)
def test_counter_schedule_reference_case(cls):
    # ALGORITHMS.md 1.4 / 8.10: T=50, W=3, N=6 -> FULL at 0,1,2,8,14,...,44 (10 FULL steps).
    expected = {0, 1, 2, 8, 14, 20, 26, 32, 38, 44}
    assert {s for s in range(50) if cycle_position(s, 6, 3) == 0} == expected
    config = cls(interval=6, warmup_steps=3)
    assert {s for s in range(50) if config.step_kind(s) == F} == expected
    assert len(expected) == 3 + (50 - 3) // 6


@given(cls=method_classes, warmup=warmups)
def test_interval_one_is_always_full(cls, warmup):
    config = cls(interval=1, warmup_steps=warmup)
    assert {config.step_kind(s) for s in range(200)} == {F}
    assert config.kinds == frozenset({F})


# -- FORA --------------------------------------------------------------------------------------------------------


@given(interval=intervals, warmup=warmups)
def test_fora_non_full_steps_are_reuse(interval, warmup):
    config = FORAConfig(interval=interval, warmup_steps=warmup)
    for s in range(150):
        expected = F if spec_full(s, interval, warmup) else R
        assert config.step_kind(s) == expected, s


def test_fora_default_schedule():
    config = FORAConfig()  # N=3, W=1
    assert [config.step_kind(s) for s in range(7)] == [F, R, R, F, R, R, F]


# -- DuCa --------------------------------------------------------------------------------------------------------


@given(interval=intervals, warmup=warmups)
def test_duca_kind_follows_cycle_position_parity(interval, warmup):
    config = DuCaConfig(interval=interval, warmup_steps=warmup)
    for s, j in enumerate(spec_positions(150, interval, warmup)):
        kind = config.step_kind(s)
        if j == 0:
            assert kind == F, s
        elif j % 2 == 1:
            assert kind == P, s
        else:
            assert kind == S, s


@pytest.mark.parametrize(
    "interval, cycle",
    [
        (2, [F, P]),
        (3, [F, P, S]),
        (4, [F, P, S, P]),
        (5, [F, P, S, P, S]),
        (6, [F, P, S, P, S, P]),
    ],
)
def test_duca_cycles(interval, cycle):
    config = DuCaConfig(interval=interval, warmup_steps=1)
    assert [config.step_kind(s) for s in range(3 * interval)] == cycle * 3


def test_duca_cycle_after_longer_warmup():
    config = DuCaConfig(interval=5, warmup_steps=3)
    assert [config.step_kind(s) for s in range(12)] == [F, F, F, P, S, P, S, F, P, S, P, S]


# -- kinds ---------------------------------------------------------------------------------------------------------


@given(cls=method_classes, interval=st.integers(1, 40), warmup=st.integers(1, 40))
def test_kinds_is_exactly_what_step_kind_emits(cls, interval, warmup):
    config = cls(interval=interval, warmup_steps=warmup)
    emitted = {config.step_kind(s) for s in range(201)}
    assert config.kinds == frozenset(emitted)


@pytest.mark.parametrize(
    "config, kinds",
    [
        (FORAConfig(interval=1), {F}),
        (FORAConfig(interval=2), {F, R}),
        (DuCaConfig(interval=1), {F}),
        (DuCaConfig(interval=2), {F, P}),
        (DuCaConfig(interval=3), {F, P, S}),
    ],
)
def test_kinds_examples(config, kinds):
    assert config.kinds == frozenset(kinds)


# -- progress-dependent reference schedules (DiT / PixArt) ---------------------------------------------------------


def test_dit_schedule_golden_ten_steps():
    """Worked by hand from the authors' DiT rules (docs/authors/dit-schedules.md 1.1; T=10, N=3, i = 9 - s): Nt = 4
    at i=9 and 8; at i=4 block 0 is FULL (4 % 4) and sets Nt = round(3 / 1.08) = 3, so blocks 1.. are at 4 % 3 = 1
    (a mixed step); at i=3 block 0 is FULL (3 % 3) and, i in the sensitive range {2, 3}, sets Nt = 2: blocks 1.. at
    3 % 2 = 1, mixed again (erratum 12: the range counts at the FULL step that sets Nt); i=2 FULL, i=1 at 1, i=0
    FULL."""
    from fxcache.methods.schedule import progress_position, reference_positions

    assert [progress_position("dit", s, 3, 10) for s in range(10)] == [0, 0, 3, 2, 1, 1, 1, 0, 1, 0]
    assert [reference_positions("dit", s, 3, 10)[0] for s in range(10)] == [0, 0, 3, 2, 1, 0, 0, 0, 1, 0]
    duca = DuCaConfig(interval=3, schedule="dit", num_steps=10)
    assert [duca.step_kind(s) for s in range(10)] == [F, F, P, S, P, P, P, F, P, F]
    assert [duca.lead_position(s) == 0 for s in (5, 6)] == [True, True]


def test_pixart_schedule_golden_ten_steps():
    """T=10, N=3: Nt = round(3 / 0.8) = 4 at s=0; at s=4 block 0 is FULL (4 % 4) and sets round(3 / 0.96) = 3, so
    blocks 1.. are at 4 % 3 = 1 (mixed, as the authors' PixArt code: golden table pixart_toca, s=4); 3 at s=6."""
    from fxcache.methods.schedule import progress_position, reference_positions

    assert [progress_position("pixart", s, 3, 10) for s in range(10)] == [0, 1, 2, 3, 1, 2, 0, 1, 2, 0]
    assert [reference_positions("pixart", s, 3, 10)[0] for s in range(10)] == [0, 1, 2, 3, 0, 2, 0, 1, 2, 0]


@given(schedule=st.sampled_from(["dit", "pixart"]), interval=st.integers(1, 8), steps=st.integers(2, 80))
def test_progress_schedules_start_full_and_count_up_to_the_next_full(schedule, interval, steps):
    """Both start FULL and never wait longer than their largest interval: Nt = N / (1.4 - 0.8 i/T) with i <= T-1
    (DiT; 2 in the sensitive range) or N / (0.8 + 0.4 s/T) (PixArt) is at most round(N / 0.6) or round(N / 0.8).
    PixArt's position s mod Nt counts up by one between FULL steps."""
    from fxcache.methods.schedule import progress_position, reference_positions

    positions = [reference_positions(schedule, s, interval, steps) for s in range(steps)]
    lead = [a for a, _ in positions]
    pos = [b for _, b in positions]
    assert pos == [progress_position(schedule, s, interval, steps) for s in range(steps)]
    longest = max(2 if schedule == "dit" else 1, round(interval / (0.6 if schedule == "dit" else 0.8)))
    assert pos[0] == 0 and lead[0] == 0
    assert all(0 <= p < longest for p in pos + lead), (pos, lead, longest)
    assert all(a == 0 for a, b in positions if b == 0)  # the blocks after block 0 are FULL only with it
    fulls = [s for s in range(steps) if lead[s] == 0] + [steps]  # block 0 FULL: the interval is set again
    assert all(b - a <= longest for a, b in zip(fulls, fulls[1:])), (fulls, longest)
    if schedule == "pixart":
        # block 0's j = s mod Nt: up by one between its FULL steps
        assert all(lead[s] == lead[s - 1] + 1 for s in range(1, steps) if lead[s] and lead[s - 1]), lead
    if interval == 1 and schedule == "pixart":
        assert pos == [0] * steps  # N=1: every step FULL


def test_progress_schedules_need_num_steps():
    from fxcache import ConfigError

    with pytest.raises(ConfigError, match="pass num_steps"):
        DuCaConfig(schedule="dit")
    with pytest.raises(ConfigError, match="schedule must be one of"):
        DuCaConfig(schedule="cosine", num_steps=10)


# -- the DiT references' countdown (FORA through DiT-ToCa, TaylorSeer-DiT, ClusCa-DiT) ------------------------------


def _full_steps(config, steps):
    return [s for s in range(steps) if config.step_kind(s) is F]


def test_dit_presets_refresh_where_the_authors_code_does():
    """docs/authors/dit-schedules.md sections 2, 4 and 5: 50 DDIM steps, FULL at s = 0, 1, 4, ..., 49 (FORA, 18
    FULL: the paper's 2.77x) and at s = 0, 1, 5, ..., 49 (TaylorSeer and ClusCa, 14 FULL)."""
    fora = FORAConfig(**FORAConfig.PRESETS["dit"])
    assert _full_steps(fora, 50) == [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40, 43, 46, 49]
    for cls in (TaylorSeerConfig, ClusCaConfig):
        config = cls(**cls.PRESETS["dit"])
        assert _full_steps(config, 50) == [0, 1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49], cls


def test_countdown_golden_twenty_one_steps():
    """Worked by hand, T=21, N=3: i = 20 - s is a multiple of 3 at s = 2, 5, ..., 20; s = 0 is the warm-up step.
    The counter schedule would refresh at s = 0, 3, 6, ... instead."""
    fora = FORAConfig(interval=3, schedule="countdown", num_steps=21)
    assert _full_steps(fora, 21) == [0, 2, 5, 8, 11, 14, 17, 20]
    ts = TaylorSeerConfig(interval=3, order=1, warmup_steps=1, schedule="countdown", num_steps=21)
    assert [ts.step_kind(s) for s in range(6)] == [F, StepKind.FORECAST, F, StepKind.FORECAST, StepKind.FORECAST, F]


@given(interval=st.integers(1, 7), warmup=st.integers(1, 4), steps=st.integers(1, 60))
def test_countdown_ends_full_and_refreshes_every_interval(interval, warmup, steps):
    from fxcache.methods.schedule import schedule_position

    pos = [schedule_position("countdown", s, interval, warmup, steps) for s in range(steps)]
    full = [s for s in range(steps) if pos[s] == 0]
    assert full[-1] == steps - 1  # the last step is always FULL
    assert all(s in full for s in range(min(warmup, steps)))
    later = [s for s in full if s >= warmup]
    assert all(b - a == interval for a, b in zip(later, later[1:]))
    assert all(pos[s] == pos[s - 1] + 1 for s in range(1, steps) if pos[s])  # steps since the last FULL one


@pytest.mark.parametrize("cls", [FORAConfig, TaylorSeerConfig, ClusCaConfig])
def test_fixed_interval_methods_take_the_counter_or_the_countdown_only(cls):
    from fxcache import ConfigError

    with pytest.raises(ConfigError, match="schedule must be one of counter, countdown"):
        cls(schedule="dit", num_steps=50)
    with pytest.raises(ConfigError, match="pass num_steps"):
        cls(schedule="countdown")


def test_duca_pixart_preset_keeps_the_authors_constant_interval():
    """DuCa @0a7151b, DuCa-PixArt-alpha/diffusion/model/cache_functions: force_scheduler.py L3-10 sets the step
    weight to 0 in both branches, so the threshold stays N=3; cal_type.py L14-21: FULL iff s % 3 == 0 (or s == 0),
    odd positions conservative (ToCa), even ones aggressive. Whatever the step count: F C A F C A ..."""
    duca = DuCaConfig(**DuCaConfig.PRESETS["pixart"])
    assert [duca.step_kind(s) for s in range(12)] == [F, P, S] * 4
