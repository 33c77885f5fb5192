"""What a call shows of its conditioning: a few numbers per input that change when the values or their order change,
so the step rule tells CFG branches and requests apart by them (read with t in one host sync)."""

from __future__ import annotations

import collections

import torch


def parameter_inputs(gm) -> list[int]:
    """Indices of the inputs Dynamo lifted from parameters and buffers: together, the model's identity."""
    from ..analysis.module_stack import is_param_placeholder

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(phs) if is_param_placeholder(n)]


def conditioning_inputs(timestep_index: int, input_paths: dict[int, str], forward_params=None) -> list[int]:
    """Indices of the conditioning inputs: every user input but the timestep and the per-step ones (latents,
    ControlNet residuals)."""
    from ..analysis.inputs import is_per_step_input

    return [i for i, p in sorted(input_paths.items())
            if i != timestep_index and not is_per_step_input(p, forward_params)]


def latent_input(timestep_index: int, input_paths: dict[int, str], forward_params=None) -> int | None:
    """Index of the latents input (by its usual names, else the forward's first parameter), or None: calls of
    one trajectory move them a step at a time, calls of two trajectories hold unrelated ones."""
    from ..analysis.inputs import latent_name

    names = {i: p for i, p in input_paths.items() if i != timestep_index and "." not in p}
    chosen = latent_name(list(names.values()), forward_params)
    return next((i for i, p in names.items() if p == chosen), None)


_SAMPLES = 256  # latent values sampled per call
_POSITIONS: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()  # (numel, device) -> indices


def latent_sample(x) -> torch.Tensor | None:
    """A few hundred values of the latents at fixed, spread positions (float64, on their device): enough to tell
    the latents of one trajectory a step later (near) from another trajectory's (far), read with t."""
    if not isinstance(x, torch.Tensor) or x.is_complex() or x.numel() == 0:
        return None
    flat = x.detach().reshape(-1)
    n, key = flat.numel(), (flat.numel(), str(flat.device))
    idx = _POSITIONS.get(key)
    if idx is None:
        k = torch.arange(1, min(_SAMPLES, n) + 1, dtype=torch.float64)
        idx = _POSITIONS[key] = ((k * _IRRATIONALS[0]) % 1.0 * n).long().clamp_(max=n - 1).to(flat.device)
        while len(_POSITIONS) > _MAX_ROW_TABLES:
            _POSITIONS.popitem(last=False)
    return flat.index_select(0, idx).to(torch.float64)


_PERIOD = 4099  # a prime: positions are weighted as (column of a PERIOD-wide matrix, row)
_IRRATIONALS = ((5 ** 0.5 - 1) / 2, 2 ** 0.5 - 1, 3 ** 0.5 - 1, (7 ** 0.5) % 1.0)
_WEIGHTS: dict[str, torch.Tensor] = {}  # device -> (2, PERIOD) column weights, 64 KiB each
_ROWS: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()  # (rows, device) -> (rows, 2)
_MAX_ROW_TABLES = 32


def _irrational_weights(n: int, a: float, b: float, device) -> torch.Tensor:
    """(2, n) float64 weights in (0.25, 1.25): irrational multiples of the position, modulo 1."""
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return torch.stack([(k * a) % 1.0, (k * b) % 1.0]) + 0.25


def position_weighted_sums(flat: torch.Tensor) -> torch.Tensor:
    """Two sums of `flat` (float64), each element weighted by a product of irrational column and row weights: two
    tensors that differ anywhere (a permutation included) get different sums, short of a measure-zero coincidence.
    The tables kept are a 2 x PERIOD column table per device and a few small row tables (rows = numel / PERIOD)."""
    device = str(flat.device)
    cols = _WEIGHTS.get(device)
    if cols is None:
        cols = _WEIGHTS[device] = _irrational_weights(_PERIOD, *_IRRATIONALS[:2], flat.device)
    n = flat.numel()
    if n <= _PERIOD:  # one row: its row weight is a constant factor
        return cols[:, :n] @ flat
    rows = -(-n // _PERIOD)
    if rows * _PERIOD != n:
        flat = torch.cat([flat, flat.new_zeros(rows * _PERIOD - n)])
    row_weights = _ROWS.get((rows, device))
    if row_weights is None:
        row_weights = _ROWS[(rows, device)] = _irrational_weights(rows, *_IRRATIONALS[2:], flat.device).T
        while len(_ROWS) > _MAX_ROW_TABLES:
            _ROWS.popitem(last=False)
    return ((flat.view(rows, _PERIOD) @ cols.T) * row_weights).sum(0)


def summaries(values: list, device) -> list[torch.Tensor]:
    """Three float64 numbers per input (two position-weighted sums and the norm) that change when its values or
    their order change: DiT class labels [4, 3] and [0, 5], or a prompt's embeddings, shuffled."""
    out = []
    for x in values:
        if not isinstance(x, torch.Tensor):
            out.append(torch.tensor([float(x), 0.0, 0.0], dtype=torch.float64, device=device))
            continue
        x = x.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        flat = x.reshape(-1).to(torch.float64)
        if flat.numel() == 0:
            out.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        sums = position_weighted_sums(flat)
        norm = torch.linalg.vector_norm(flat).reshape(1)
        out.append(torch.cat([sums, norm]).to(device))
    return out
