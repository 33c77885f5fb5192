"""ClusCa maths: k-means at FULL steps, one member per cluster and the refresh of the forecast at CLUSTER steps.

Static shapes, fixed iteration counts, no host round trips (ALGORITHMS.md 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rows import gather_rows, scatter_rows


def l1_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(B, N, K) L1 distances of tokens x (B, N, D) to centroids c (B, K, D).

    `torch.cdist` has no ONNX translation; for export, one broadcast difference per centroid (K of them) computes
    the same values with (B, N, D) memory each instead of a (B, N, K, D) intermediate.
    """
    if torch.compiler.is_exporting():
        return torch.stack([(x - c[:, j:j + 1]).abs().sum(-1) for j in range(c.shape[1])], dim=-1)
    return torch.cdist(x, c, p=1)


def kmeans(x: torch.Tensor, prev: torch.Tensor, init_idx: torch.Tensor, warm: torch.Tensor,
           iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means per batch row, L1 assignment, mean centroids, fixed `iters` (ALGORITHMS.md 5).

    x (B, N, D); prev (B, K, D) float32 centroids of the previous FULL step; init_idx (K,) tokens that seed a
    cold start; warm (1,) > 0 to start from `prev`. A cluster that loses every member keeps its centroid.
    Returns labels (B, N) int64 (nearest final centroid) and centroids (B, K, D) float32.
    """
    x = x.float()
    k = init_idx.shape[0]
    c = torch.where(warm.reshape(1, 1, 1) > 0, prev, torch.index_select(x, 1, init_idx))
    for _ in range(iters):
        onehot = F.one_hot(l1_distances(x, c).argmin(-1), k).to(x.dtype)  # (B, N, K)
        counts = onehot.sum(1).unsqueeze(-1)  # (B, K, 1)
        sums = onehot.transpose(1, 2) @ x  # (B, K, D)
        c = torch.where(counts > 0, sums / counts.clamp_min(1.0), c)
    return l1_distances(x, c).argmin(-1), c


def cluster_members(labels: torch.Tensor, rand: torch.Tensor, k: int) -> torch.Tensor:
    """One member per cluster and batch row (B, k): the member with the largest `rand` (1, N) value.

    A cluster without members repeats the pick of token 0's cluster: the same row recomputed twice from the same
    input writes the same value, so the update is as if that cluster did not exist.
    """
    member = F.one_hot(labels, k).bool()  # (B, N, K)
    score = torch.where(member, rand.unsqueeze(-1), torch.full_like(rand, -1.0).unsqueeze(-1))
    pick = score.argmax(1)
    fallback = pick.gather(1, labels[:, :1])
    return torch.where(member.any(1), pick, fallback)


def clusca_refresh(y: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, gamma: float,
                   *factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-anchored CLUSTER update of one unit (ALGORITHMS.md 5, `anchor="reanchor"`).

    y (B, K, D) exact values of rows idx (B, K); factors F_0..F_m (B, N, D). F_0 moves so that the forecast of
    the fresh rows is exactly y; with gamma > 0 every row then moves by gamma * (y of its cluster - forecast).
    Returns (this step's output, new F_0).
    """
    higher = None
    for i in range(1, len(factors)):
        term = factors[i] * coef[i]
        higher = term if higher is None else higher + term
    f0 = factors[0]
    if higher is not None:
        f0 = scatter_rows(f0, idx, y - gather_rows(higher, idx))
        out = f0 * coef[0] + higher
    else:
        f0 = scatter_rows(f0, idx, y)
        out = f0 * coef[0]
    if gamma > 0:
        blend = gamma * (gather_rows(y, labels) - out)
        f0, out = f0 + blend, out + blend
    return out, f0
