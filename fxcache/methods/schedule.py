"""The counter schedule shared by the methods: W warm-up FULL steps, then one FULL step every N."""

from __future__ import annotations

import functools

import numpy as np

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
#: the schedules of the methods without the references' per-block schedules
FIXED_SCHEDULES = ("counter", "countdown")


def _reference_interval(schedule: str, interval: int, s: int, num_steps: int, fixed: bool) -> int:
    """The references' `force_scheduler` at a FULL block of step s: Nt = round(N / float32(f)), half-to-even as
    torch.round. DiT (i = T-1-s): f = 1 + w - 2 w i / T, w = 0.4, and Nt = 2 when i lies in range(int(0.2 T),
    int(0.4 T)), the "sensitive" range, decided at the FULL step that sets Nt (erratum 12). PixArt: f = 1 - w +
    2 w s / T, w = 0.2. `fixed` (the authors' fresh ratio 0, their FORA): w = 0 and no sensitive range."""
    if schedule == "dit":
        i = num_steps - 1 - s
        w = 0.0 if fixed else 0.4
        factor = np.float32(1.0 + w - 2.0 * w * i / num_steps)
    else:
        w = 0.0 if fixed else 0.2
        factor = np.float32(1.0 - w + 2.0 * w * s / num_steps)
    nt = int(np.round(np.float32(interval) / factor))
    if schedule == "dit" and not fixed and num_steps - 1 - s in range(int(0.2 * num_steps), int(0.4 * num_steps)):
        nt = 2
    return max(1, nt)


@functools.lru_cache(maxsize=256)
def _reference_walk(schedule: str, interval: int, num_steps: int, fixed: bool,
                    steps: int) -> tuple[tuple[int, int], ...]:
    """(position of block 0, position of the other blocks) for steps 0..steps-1 of the DiT / PixArt references,
    whose every block decides its own type (`cal_type`: FULL iff first step or n mod Nt == 0, n = i = T-1-s for
    DiT, s for PixArt) and whose FULL block 0 recomputes Nt for the blocks after it (`force_init` /
    `force_scheduler`). Block 0 decides with the Nt of the previous FULL step and the others with the new one:
    mixed steps (erratum 2; PixArt too: golden table pixart_toca, s=4)."""
    out, nt = [], interval
    for s in range(steps):
        n = num_steps - 1 - s if schedule == "dit" else s
        first = s == 0
        lead = 0 if first or n % nt == 0 else n % nt
        if lead == 0:
            nt = _reference_interval(schedule, interval, s, num_steps, fixed)
        rest = 0 if first or n % nt == 0 else n % nt
        out.append((lead, rest))
    return tuple(out)


def reference_positions(schedule: str, step: int, interval: int, num_steps: int,
                        fixed: bool = False) -> tuple[int, int]:
    """(j of block 0, j of the other blocks) at `step` under the DiT / PixArt references' per-block schedule."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule not in ("dit", "pixart"):
        raise ValueError(f"unknown progress schedule {schedule!r}")
    return _reference_walk(schedule, interval, num_steps, fixed, max(num_steps, step + 1))[step]


def progress_position(schedule: str, step: int, interval: int, num_steps: int, fixed: bool = False) -> int:
    """j(s) of the DiT / PixArt reference schedules, whose interval Nt follows the sampling progress: the position
    of blocks 1..L-1, which read the Nt that a FULL block 0 recomputed in the same step (`reference_positions`).

      dit:    i = T-1-s counts down; FULL iff s == 0 or i mod Nt == 0; Nt = round(N / (1.4 - 0.8 i / T)), and 2
              when set in the sensitive range 0.2 T <= i < 0.4 T; j = i mod Nt.
      pixart: FULL iff s == 0 or s mod Nt == 0; Nt = round(N / (0.8 + 0.4 s / T)); j = s mod Nt.
    """
    return reference_positions(schedule, step, interval, num_steps, fixed)[1]


def check_schedule(owner: str, schedule: str, num_steps) -> None:
    """num_steps within bounds, and given where the schedule counts the steps (the schedule's name is one of the
    config's `CHOICES`, checked before)."""
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


def schedule_position(schedule: str, step: int, interval: int, warmup: int, num_steps: int | None,
                      fixed: bool = False) -> int:
    """j(s) under `schedule`: the counter schedule, the references' countdown, or a progress-dependent one (where
    `fixed` keeps the interval at N, as the references do with fresh ratio 0)."""
    if schedule == "counter":
        return cycle_position(step, interval, warmup)
    if schedule == "countdown":
        return countdown_position(step, interval, warmup, num_steps)
    return progress_position(schedule, step, interval, num_steps, fixed)


def cycle_horizon(interval: int, warmup: int, num_steps: int | None = None) -> int:
    """Steps within which a cyclic schedule (warm-up, then a cycle of `interval`, possibly stretched over
    `num_steps` by the progress schedules) has shown every step kind it emits."""
    return min(MAX_STEPS, warmup + 2 * interval + (num_steps or 0))


class Cyclic:
    """Mixin of the configs with `interval`, `warmup_steps`, `schedule` and `num_steps`: where a step sits in its
    cycle, and how far the compile-time variant list looks."""

    def position(self, step: int) -> int:
        """j(s) under the config's schedule: 0 on FULL steps, else the position in the cycle (under "dit" /
        "pixart", the position of every block but the first)."""
        return schedule_position(self.schedule, step, self.interval, self.warmup_steps, self.num_steps,
                                 self.fixed_interval)

    def lead_position(self, step: int) -> int:
        """j(s) of the first block: differs from `position` only under "dit" / "pixart", where block 0 decides
        with the interval of the previous FULL step (mixed steps: block 0 FULL, the others not)."""
        if self.schedule in ("dit", "pixart"):
            return reference_positions(self.schedule, step, self.interval, self.num_steps, self.fixed_interval)[0]
        return self.position(step)

    @property
    def fixed_interval(self) -> bool:
        """Under "dit" / "pixart": the authors' FORA (fresh ratio 0) keeps Nt = N (no step weight, no sensitive
        range)."""
        return False

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
