"""Example values of a variant's extra inputs, for tracing it into an artifact."""

from __future__ import annotations

import torch

from ..graph_io import GraphValue, Role


def example_extra(v: GraphValue, device) -> torch.Tensor:
    """A valid value of an extra input, for tracing (the exported graph does not depend on the values)."""
    if v.role is Role.INDICES:  # (units, k): the first k tokens
        units, k = v.shape
        return torch.arange(k, device=device).expand(units, k).contiguous()
    if v.role is Role.PERMUTATION:
        return torch.arange(v.shape[0], device=device)
    if v.role is Role.UNIFORM:
        return torch.rand(v.shape, device=device)
    if v.role in (Role.TAYLOR_COEF, Role.TAYLOR_DIFF):
        return torch.ones(v.shape, dtype=v.dtype, device=device)
    if v.dtype.is_floating_point and v.role.persistent:
        # distinct values: scores that tie would let the runtime and torch pick different (equal) top-k tokens
        return torch.rand(v.shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=v.dtype)
    return torch.zeros(v.shape, dtype=v.dtype, device=device)

