"""ToCa token selection inside the PARTIAL graph: score, staleness, spatial bonus, top-k (static k).

All functions are called from the variant graphs, so selection happens on the device with no host round trip
and the chosen indices never leave the graph. Scores are per token (N,), shared by every batch row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def l2_normalise(s: torch.Tensor) -> torch.Tensor:
    return s / s.norm().clamp_min(1e-12)


def norm_score(proj: torch.Tensor, heads: int, prefer_low: bool) -> torch.Tensor:
    """k-/v-norm score from a key or value projection (B, N, D): sum over heads of per-head norms, low or high."""
    b, n, d = proj.shape
    norms = proj.float().reshape(b, n, heads, d // heads).norm(dim=-1)  # (B, N, H)
    s = (1.0 - norms).sum(-1) if prefer_low else norms.sum(-1)
    return l2_normalise(s.mean(0))


def _attention_probs(q: torch.Tensor, k: torch.Tensor, mask, scale) -> list[torch.Tensor]:
    """Softmax attention maps (B, Lq, Lk), one head at a time (peak memory one head's map, not all heads')."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    maps = []
    for h in range(q.shape[1]):
        logits = (q[:, h].float() @ k[:, h].float().transpose(-1, -2)) * s
        if mask is not None:
            m = mask if mask.dim() < 4 else mask[:, min(h, mask.shape[1] - 1)]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        maps.append(logits.softmax(-1))
    return maps


def attention_received_score(q, k, mask, scale, offset: int, length: int) -> torch.Tensor:
    """ToCa s1: attention each key token receives, head- and query-mean, on the unit's slice of the keys."""
    maps = _attention_probs(q, k, mask, scale)
    received = sum(m.mean(1) for m in maps) / len(maps)  # (B, Lk)
    return l2_normalise(received[:, offset:offset + length].mean(0))


def cross_entropy_score(q, k, mask, scale) -> torch.Tensor:
    """ToCa s2: 1 + entropy of each query token's head-mean cross-attention distribution."""
    c = (sum(_attention_probs(q, k, mask, scale)) / q.shape[1]).mean(0)  # (N, T), averaged over batch rows
    entropy = -(c * torch.log(c + 1e-7)).sum(-1)
    return l2_normalise(1.0 + entropy)


def similarity_score(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1 - cosine(current input row, its value at the last FULL step): the rows that moved most score highest."""
    cos = F.cosine_similarity(current.float(), reference.float(), dim=-1)  # (B, N)
    return l2_normalise((1.0 - cos).mean(0))


def spatial_bonus(s: torch.Tensor, cell: int, bonus: float) -> torch.Tensor:
    """On a square token grid cut into cells of `cell` x `cell` tokens, each cell's best token gets s += bonus * s
    (the authors' `local_selection_with_bonus(score, bonus, cell)`: DiT cells of 2 x 2 tokens)."""
    n = s.shape[0]
    per_side = math.isqrt(n) // cell
    cells = s.reshape(per_side, cell, per_side, cell).permute(0, 2, 1, 3).reshape(per_side * per_side, cell * cell)
    best = F.one_hot(cells.argmax(1), cell * cell).to(s.dtype)
    mask = best.reshape(per_side, per_side, cell, cell).permute(0, 2, 1, 3).reshape(n)
    return s + bonus * s * mask


def bonus_applies(tokens: int, cell: int) -> bool:
    """Square grids whose side the cell side divides."""
    side = math.isqrt(tokens)
    return cell > 0 and side * side == tokens and side % cell == 0


def select_tokens(base: torch.Tensor, stale: torch.Tensor, k: int, stale_weight: float, interval: int, grid: int,
                  bonus: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(k,) sorted indices of the top-k of base + stale_weight * stale / interval (+ spatial bonus), and the new
    staleness: +1 everywhere, 0 on the chosen tokens."""
    s = base
    if stale_weight:
        s = s + stale * (stale_weight / interval)
    if bonus and grid:
        s = spatial_bonus(s, grid, bonus)
    idx = s.topk(k).indices.sort().values
    return idx, (stale + 1.0).index_fill(0, idx, 0.0)
