"""Rows of (B, N, ...) tensors picked per batch row along the token dimension (ClusCa: every row has its own
clusters)."""

from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (B, k) of `x` (B or 1, N, ...) along dim 1, per batch row -> (B, k, ...)."""
    b, k = idx.shape
    x = x.expand(b, *x.shape[1:])
    index = idx.reshape(b, k, *([1] * (x.dim() - 2))).expand(b, k, *x.shape[2:])
    return torch.gather(x, 1, index)


def scatter_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x` with rows `idx` (B, k) along dim 1 replaced by `rows` (B, k, ...), per batch row."""
    b, k = idx.shape
    index = idx.reshape(b, k, *([1] * (x.dim() - 2))).expand(b, k, *x.shape[2:])
    return torch.scatter(x, 1, index, rows)
