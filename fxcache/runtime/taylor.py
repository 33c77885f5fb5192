"""Host-side bookkeeping of the Taylor factors of one CFG branch: which orders exist, and the step scalars.

The factors themselves live in the graph's caches; this only decides the small `taylor_diff` / `taylor_coef`
tensors a variant takes (ALGORITHMS.md 1.5), so the graphs never change with the step.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class TaylorState:
    order: int  # m: the highest order kept
    warmup: int  # W: derivatives only from FULL steps s >= W - 1
    last_full: int | None = None  # s_k
    available: int = -1  # m': highest order present in the caches (-1: none)

    def full_inputs(self, step: int, device) -> torch.Tensor:
        """`taylor_diff` (m,) for a FULL step at `step`; records the step. diff[i] = 1/d where old_i exists."""
        valid = 0
        if self.last_full is not None and step > self.last_full and step >= self.warmup - 1:
            valid = min(self.order, self.available + 1)
        d = step - self.last_full if valid else 1
        diff = torch.tensor([1.0 / d if i < valid else 0.0 for i in range(self.order)], dtype=torch.float32)
        self.last_full, self.available = step, valid
        return diff.to(device)

    def forecast_inputs(self, step: int, device) -> torch.Tensor:
        """`taylor_coef` (m+1,): delta^i / i! for the orders present, 0 above them."""
        if self.last_full is None:
            raise RuntimeError("a forecast step before any FULL step")
        delta = step - self.last_full
        coef = [delta ** i / math.factorial(i) if i <= self.available else 0.0 for i in range(self.order + 1)]
        return torch.tensor(coef, dtype=torch.float32).to(device)
