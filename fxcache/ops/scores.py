"""ToCa token selection inside the PARTIAL graph: score, staleness, spatial bonus, top-k (static k).

All functions are called from the variant graphs, so selection happens on the device with no host round trip
and the chosen indices never leave the graph. Scores are (R, N): R = B when every batch row chooses its own
tokens (the authors' code), R = 1 when the rows share one choice (scores averaged over the rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def l2_normalise(s: torch.Tensor) -> torch.Tensor:
    """Each row of (R, N) to unit L2 norm (F.normalize, as the authors' scores)."""
    return s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def per_rows(s: torch.Tensor, each: bool) -> torch.Tensor:
    """(B, N) raw scores -> (B, N) normalised per row, or (1, N): the mean over rows, normalised."""
    return l2_normalise(s if each else s.mean(0, keepdim=True))


def norm_score(proj: torch.Tensor, heads: int, prefer_low: bool, each: bool) -> torch.Tensor:
    """k-/v-norm score from a key or value projection (B, N, D): sum over heads of per-head norms, low or high."""
    b, n, d = proj.shape
    norms = proj.float().reshape(b, n, heads, d // heads).norm(dim=-1)  # (B, N, H)
    s = (1.0 - norms).sum(-1) if prefer_low else norms.sum(-1)
    return per_rows(s, each)


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


def attention_received_score(q, k, mask, scale, offset: int, length: int, each: bool = True) -> torch.Tensor:
    """ToCa s1: attention each key token receives, head- and query-mean, on the unit's slice of the keys."""
    maps = _attention_probs(q, k, mask, scale)
    received = sum(m.mean(1) for m in maps) / len(maps)  # (B, Lk)
    return per_rows(received[:, offset:offset + length], each)


def cross_entropy_score(q, k, mask, scale, each: bool = True) -> torch.Tensor:
    """ToCa s2: 1 + entropy of each query row's head-mean cross-attention distribution, (B or 1, Lq). With
    `each`, the halves of an even batch (a CFG call's rows of one prompt) share the mean of their maps, as the
    authors' PixArt `attn_score` does; otherwise the maps are averaged over all rows. Unnormalised: each row is
    normalised when tokens are chosen, so that partial steps can refresh the rows they recompute
    (`refresh_entropy`)."""
    c = sum(_attention_probs(q, k, mask, scale)) / q.shape[1]  # (B, Lq, T)
    b = c.shape[0]
    if not each:
        c = c.mean(0, keepdim=True)
    elif b % 2 == 0:
        half = (c[: b // 2] + c[b // 2:]) / 2
        c = torch.cat([half, half])
    return 1.0 - (c * torch.log(c + 1e-7)).sum(-1)


def received_from_map(probs: torch.Tensor, offset: int, length: int, each: bool = True) -> torch.Tensor:
    """ToCa s1 from an attention map the model computes itself (B, heads, Lq, Lk): head- and query-mean."""
    received = probs.float().mean(1).mean(1)  # (B, Lk)
    return per_rows(received[:, offset:offset + length], each)


def refresh_entropy(raw: torch.Tensor, idx: torch.Tensor, q_rows, k, mask, scale, each: bool) -> torch.Tensor:
    """The s2 score with the rows a partial step recomputed replaced by their fresh cross-attention entropies
    (the authors' PixArt code scatters the fresh map rows back: ALGORITHMS.md erratum 14). `idx` (B, k)."""
    fresh = cross_entropy_score(q_rows, k, mask, scale, each)  # (B or 1, k)
    rows = raw.shape[0]
    return raw.scatter(1, idx[:rows], fresh[:rows].expand(rows, -1))


def similarity_score(current: torch.Tensor, reference: torch.Tensor, each: bool = True) -> torch.Tensor:
    """1 - cosine(current input row, its value at the last FULL step): the rows that moved most score highest."""
    cos = F.cosine_similarity(current.float(), reference.float(), dim=-1)  # (B, N)
    return per_rows(1.0 - cos, each)


def spatial_bonus(s: torch.Tensor, cell: int, bonus: float) -> torch.Tensor:
    """On a square token grid cut into cells of `cell` x `cell` tokens, each cell's best token gets s += bonus * s
    (the authors' `local_selection_with_bonus(score, bonus, cell)`: DiT cells of 2 x 2 tokens), per row of (R, N)."""
    r, n = s.shape
    per_side = math.isqrt(n) // cell
    cells = s.reshape(r, per_side, cell, per_side, cell).permute(0, 1, 3, 2, 4).reshape(r, per_side * per_side,
                                                                                       cell * cell)
    best = F.one_hot(cells.argmax(-1), cell * cell).to(s.dtype)
    mask = best.reshape(r, per_side, per_side, cell, cell).permute(0, 1, 3, 2, 4).reshape(r, n)
    return s + bonus * s * mask


def bonus_applies(tokens: int, cell: int) -> bool:
    """Square grids whose side the cell side divides."""
    side = math.isqrt(tokens)
    return cell > 0 and side * side == tokens and side % cell == 0


def select_tokens(base: torch.Tensor, stale: torch.Tensor, k: int, stale_weight: float, interval: int, grid: int,
                  bonus: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, k) sorted indices of each row's top-k of base + stale_weight * stale / interval (+ spatial bonus), and
    the new staleness: +1 everywhere, 0 on the chosen tokens. `base` (1 or R, N), `stale` (R, N)."""
    s = base.expand_as(stale)
    if stale_weight:
        s = s + stale * (stale_weight / interval)
    if bonus and grid:
        s = spatial_bonus(s, grid, bonus)
    idx = s.topk(k, dim=-1).indices.sort(-1).values
    return idx, (stale + 1.0).scatter(1, idx, 0.0)


def advance_staleness(stale: torch.Tensor) -> torch.Tensor:
    """A partial call that recomputes no token (k = 0) still ages every token, as the authors' code does."""
    return stale + 1.0


def fresh_staleness(out: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero staleness (rows, N) for a unit output (B, N, D) just computed on every token."""
    return torch.zeros(rows, out.shape[1], dtype=torch.float32, device=out.device)
