"""The counter schedule shared by the methods: W warm-up FULL steps, then one FULL step every N."""

from __future__ import annotations

from ..config import MAX_STEPS, STEPS_WHY, check_int
from ..errors import ConfigError


def cycle_position(step: int, interval: int, warmup: int) -> int:
    """j(s): 0 on FULL steps, else steps since the last FULL step (ALGORITHMS.md 1.4)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return 0
    return (step - (warmup - 1)) % interval


SCHEDULES = ("counter", "countdown", "dit", "pixart")


def progress_position(schedule: str, step: int, interval: int, num_steps: int) -> int:
    """j(s) of the DiT / PixArt reference schedules, whose interval Nt follows the sampling progress.

    Walks the steps from 0 (Nt is recomputed at every FULL step, so the position depends on the history):
      dit:    i = T-1-s counts down; FULL iff i == T-1 or i mod Nt == 0; Nt = round(N / (1.4 - 0.8 i / T)),
              and Nt = 2 while 0.2 T <= i < 0.4 T (the "sensitive" range); j = i mod Nt.
      pixart: FULL iff s == 0 or s mod Nt == 0; Nt = round(N / (0.8 + 0.4 s / T)); j = s mod Nt.
    `round` is half-to-even, as torch.round. Decided once per step, never per block.
    """
    if schedule not in ("dit", "pixart"):
        raise ValueError(f"unknown progress schedule {schedule!r}")
    nt, j = 1, 0
    for s in range(step + 1):
        if schedule == "dit":
            i = num_steps - 1 - s
            eff = 2 if 0.2 * num_steps <= i < 0.4 * num_steps else nt
            full = s == 0 or i % eff == 0
            if full:
                nt = max(1, round(interval / (1.4 - 0.8 * i / num_steps)))
                eff = 2 if 0.2 * num_steps <= i < 0.4 * num_steps else nt
            j = 0 if full else i % eff
        else:
            full = s == 0 or s % nt == 0
            if full:
                nt = max(1, round(interval / (0.8 + 0.4 * s / num_steps)))
            j = 0 if full else s % nt
    return j


def check_schedule(owner: str, schedule, num_steps, allowed: tuple[str, ...] = SCHEDULES) -> None:
    if schedule not in allowed:
        raise ConfigError(f"{owner}.schedule must be one of {', '.join(allowed)}, got {schedule!r}")
    if num_steps is not None:
        check_int(owner, "num_steps", num_steps, minimum=1, maximum=MAX_STEPS, why=STEPS_WHY)
    if schedule != "counter" and num_steps is None:
        raise ConfigError(f"{owner}.schedule={schedule!r} counts the sampling steps: pass num_steps (the sampler's "
                          "step count)")


def countdown_position(step: int, interval: int, warmup: int, num_steps: int) -> int:
    """j(s) of the DiT references' fixed interval, counted on their down-counting index i = T-1-s: FULL when
    s < W or i mod N == 0, so the last step is always FULL (DiT-ToCa with fresh ratio 0, i.e. FORA; TaylorSeer-DiT;
    ClusCa-DiT: FULL at s = 0, 1, 4, 7, ..., 49 for N=3, T=50). j counts the steps since the last FULL one."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    last = step
    while last >= warmup and (num_steps - 1 - last) % interval:
        last -= 1
    return step - last


def schedule_position(schedule: str, step: int, interval: int, warmup: int, num_steps: int | None) -> int:
    """j(s) under `schedule`: the counter schedule, the references' countdown, or a progress-dependent one."""
    if schedule == "counter":
        return cycle_position(step, interval, warmup)
    if schedule == "countdown":
        return countdown_position(step, interval, warmup, num_steps)
    return progress_position(schedule, step, interval, num_steps)


def cycle_horizon(interval: int, warmup: int, num_steps: int | None = None) -> int:
    """Steps within which a cyclic schedule (warm-up, then a cycle of `interval`, possibly stretched over
    `num_steps` by the progress schedules) has shown every step kind it emits."""
    return min(MAX_STEPS, warmup + 2 * interval + (num_steps or 0))


class Cyclic:
    """Mixin of the configs with `interval`, `warmup_steps`, `schedule` and `num_steps`: where a step sits in its
    cycle, and how far the compile-time variant list looks."""

    def position(self, step: int) -> int:
        """j(s) under the config's schedule: 0 on FULL steps, else the position in the cycle."""
        return schedule_position(self.schedule, step, self.interval, self.warmup_steps, self.num_steps)

    @property
    def horizon(self) -> int:
        return cycle_horizon(self.interval, self.warmup_steps, self.num_steps)

    @property
    def planned_steps(self) -> int | None:
        return self.num_steps if self.schedule != "counter" else None


class SeededDraws:
    """Mixin of the configs with a `seed` field: the seed of their random draws."""

    @property
    def draw_seed(self) -> int:
        return self.seed
