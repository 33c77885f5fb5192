"""Token choice for PARTIAL steps: a uniform random subset per unit, fixed size k, drawn on the device."""

from __future__ import annotations

import torch


def random_token_indices(units: int, tokens: int, k: int, generator: torch.Generator, device) -> torch.Tensor:
    """(units, k) int64: for each unit, k distinct token indices in [0, tokens), sorted ascending.

    Shared by every batch row, so both halves of a batched CFG call refresh the same tokens.
    """
    if k == 0:
        return torch.empty((units, 0), dtype=torch.int64, device=device)
    scores = torch.rand((units, tokens), generator=generator, device=device)
    return scores.topk(k, dim=1).indices.sort(dim=1).values
