"""ClusCa maths: k-means at FULL steps, one member per cluster and the refresh of the forecast at CLUSTER steps.

Static shapes, fixed iteration counts, no host round trips (ALGORITHMS.md 5). Two flavours of each piece: ours
(`kmeans`, `cluster_members(..., empty="repeat")`, `clusca_refresh`) and the authors' (Cache4Diffusion @91a1949:
`kmeans_ref`, `cluster_members(..., empty="first")`, `clusca_refresh_ref`), selected by `ClusCaConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rows import gather_rows, scatter_rows

#: the authors' early stop: `torch.allclose(centroids, centroids_new, rtol=1e-4)` (default atol)
KMEANS_RTOL, KMEANS_ATOL = 1e-4, 1e-8


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


def init_rows(draw: torch.Tensor, tokens: int) -> torch.Tensor:
    """The authors' cold k-means start `torch.randint(0, N, (B, K))` (per row, with replacement) from uniform
    draws (B, K) in [0, 1): floor(u * N)."""
    return (draw * tokens).to(torch.int64).clamp(0, tokens - 1)


def kmeans_ref(x: torch.Tensor, prev: torch.Tensor, init_draw: torch.Tensor, warm: torch.Tensor,
               iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' `Kmeans.fit` (cluster_utils/Kmeans.py), in static shapes.

    x (B, N, D); prev (B, K, D) float32 centroids of the previous FULL step (used when warm (1,) > 0); init_draw
    (B, K) uniform draws for a cold start: per row K tokens drawn with replacement (`init_rows`), so two
    centroids can coincide. Each iteration: labels = argmin of the L1 distances (fp32); centroids = member sums /
    (counts + 1e-8), in x's dtype as their `type_as(X)` (an empty cluster gets a zero centroid); stop when
    `allclose(centroids, new, rtol=1e-4)` over the whole batch. Their loop breaks there; here the iterations go on
    frozen (a converged flag), so the graph keeps its shapes and the result is theirs: the labels of the last
    assignment (made from the centroids before the last update) and the centroids the loop ended with (at
    convergence, those labels' centroids; after `iters` iterations without it, the last update).
    Returns labels (B, N) int64 and centroids (B, K, D) float32. With iters = 0: the nearest start centroid.
    """
    n, k = x.shape[1], init_draw.shape[1]
    start = gather_rows(x, init_rows(init_draw, n)).float()
    c = torch.where(warm.reshape(1, 1, 1) > 0, prev, start)
    xf = x.float()
    labels = l1_distances(xf, c).argmin(-1)
    done = torch.zeros((), dtype=torch.bool, device=x.device)
    for _ in range(iters):
        assigned = l1_distances(xf, c).argmin(-1)
        onehot = F.one_hot(assigned, k).to(x.dtype)  # (B, N, K)
        counts = onehot.sum(1) + 1e-8  # (B, K)
        new = (torch.bmm(onehot.transpose(1, 2), x) / counts.unsqueeze(-1)).float()
        converged = ((c - new).abs() <= KMEANS_ATOL + KMEANS_RTOL * new.abs()).all()
        labels = torch.where(done, labels, assigned)
        done = done | converged
        c = torch.where(done, c, new)
    return labels, c


def cluster_members(labels: torch.Tensor, rand: torch.Tensor, k: int, empty: str = "repeat") -> torch.Tensor:
    """One member per cluster and batch row: the member with the largest `rand` value.

    labels (B, N); rand (..., B or 1, N): one draw shared by the rows and units (1, N), or one per row (B, N), or
    one per unit and row (U, B, N). Returns (..., B, k). A cluster without members: `empty="repeat"` repeats the
    pick of token 0's cluster (the same row recomputed twice from the same input writes the same value, so the
    update is as if that cluster did not exist); `empty="first"` picks token 0, as the authors'
    `select_one_fresh_index_per_cluster` (an argmax over a row of -inf).
    """
    member = F.one_hot(labels, k).bool()  # (B, N, K)
    score = torch.where(member, rand.unsqueeze(-1), torch.full_like(rand, -1.0).unsqueeze(-1))
    pick = score.argmax(-2)  # (..., B, K); the first maximum: token 0 for an empty cluster
    if empty == "first":
        return pick
    fallback = pick.gather(-1, labels[:, :1].expand(*pick.shape[:-1], 1))
    return torch.where(member.any(1), pick, fallback)


def _higher(coef: torch.Tensor, factors) -> torch.Tensor | None:
    higher = None
    for i in range(1, len(factors)):
        term = factors[i] * coef[i]
        higher = term if higher is None else higher + term
    return higher


def clusca_refresh(y: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, gamma: float,
                   *factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-anchored CLUSTER update of one unit (ALGORITHMS.md 5, `anchor="exact"`).

    y (B, K, D) exact values of rows idx (B, K); factors F_0..F_m (B, N, D). F_0 moves so that the forecast of
    the fresh rows is exactly y; with gamma > 0 every row then moves by gamma * (y of its cluster - forecast).
    Returns (this step's output, new F_0).
    """
    higher = _higher(coef, factors)
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


def clusca_refresh_ref(y: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, gamma: float,
                       *factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' CLUSTER update of one unit (`anchor="ref"`; cache_functions/update_cache.py).

    The exact values y (B, K, D) of rows idx (B, K) overwrite the Taylor base term: F_0[idx] = y. With gamma > 0
    (`propagation_update_cache`, one member per cluster) each cluster's value is the sum of the y of the picks
    that fall in it (their `k == 1` branch: no division, so a pick that appears twice counts twice) and
    F_0 = gamma * value[cluster] + (1 - gamma) * F_0, in float32. The output is the Taylor sum with that F_0, so a
    refreshed row outputs y + sum_{i>=1} F_i delta^i / i!. Returns (this step's output, new F_0), which the next
    FULL step's first difference subtracts.
    """
    f0 = scatter_rows(factors[0], idx, y.to(factors[0].dtype))
    if gamma > 0:
        b, k, d = y.shape
        index = labels.gather(1, idx).unsqueeze(-1).expand(b, k, d)  # each pick's cluster
        value = torch.zeros(b, k, d, dtype=torch.float32, device=y.device).scatter_add(1, index, y.float())
        f0 = (gather_rows(value, labels) * gamma + f0.float() * (1 - gamma)).to(factors[0].dtype)
    higher = _higher(coef, factors)
    out = f0 * coef[0] if higher is None else f0 * coef[0] + higher
    return out, f0
