"""The step/branch rule: derive (step, branch) of a call from its timestep value."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StepTracker:
    """t rises (or first call) -> new generation at step 0; t repeats -> next CFG branch; else next step.

    Diffusion samplers move t downwards; a rise means a new request. Schedulers that evaluate the model twice at
    one t for other reasons (Heun-type) need the explicit override (`fxcache.step`).
    """

    last_t: float | None = None
    step: int = -1
    branch: int = 0

    def advance(self, t: float) -> tuple[int, int, bool]:
        """Returns (step, branch, new_generation)."""
        new = self.last_t is None or t > self.last_t
        if new:
            self.step, self.branch = 0, 0
        elif t == self.last_t:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self.last_t = t
        return self.step, self.branch, new

    def force(self, step: int, branch: int, t: float | None) -> bool:
        """Apply an explicit (step, branch); step 0 branch 0 starts a new generation."""
        new = step == 0 and branch == 0
        self.step, self.branch = step, branch
        if t is not None:
            self.last_t = t
        return new

    def reset(self) -> None:
        self.last_t, self.step, self.branch = None, -1, 0
