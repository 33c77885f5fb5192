"""Host-side bookkeeping of a FoCa forecast (cache-dit's FoCa calibrator) for one CFG branch.

The tensors live in the graphs' caches: the last two computed residuals (F_full, F_full_prev) and the last two
values of the window (F_k, F_km1, forecasts included). A computed call shifts both pairs; a reused call forecasts

    P = F_full + g (F_full - F_full_prev + F_k - F_km1),   g = e / 2 for e <= 3 steps since the last computed call,
                                                            g = 4.5 / e beyond (the Heun step at e = 3 blended
                                                            toward F_full with weight 3 / e),

and shifts the window (F_km1 <- F_k, F_k <- P), except without two computed residuals or two window values, where it
reuses F_full and shifts nothing (g = 0, u = 0). Only (g, u) cross to the graph, so it never changes with the step.
"""

from __future__ import annotations

import dataclasses

import torch

HORIZON = 3.0  # cache-dit's max_horizon: beyond it the forecast is damped toward the last computed residual


@dataclasses.dataclass
class FoCaState:
    computed: int = 0  # computed calls so far (F_full, F_full_prev present from 1, 2)
    window: int = 0  # values in the window (F_k, F_km1)
    last: int | None = None  # step of the last computed call

    def full(self, step: int) -> None:
        self.computed += 1
        self.window = min(self.window + 1, 2)
        self.last = step

    def forecast_inputs(self, step: int, device) -> torch.Tensor:
        """(g, u) for a reused call at `step`; advances the window as the graph does."""
        if self.window < 2 or self.computed < 2 or self.last is None:
            g, u = 0.0, 0.0
        else:
            e = float(step - self.last)
            g = e / 2.0 if e <= HORIZON else (HORIZON / e) * (HORIZON / 2.0)
            u = 1.0
        return torch.tensor([g, u], dtype=torch.float32, device=device)
