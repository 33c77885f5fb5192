"""The counter schedule shared by the methods: W warm-up FULL steps, then one FULL step every N."""

from __future__ import annotations


def cycle_position(step: int, interval: int, warmup: int) -> int:
    """j(s): 0 on FULL steps, else steps since the last FULL step (ALGORITHMS.md 1.4)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return 0
    return (step - (warmup - 1)) % interval
