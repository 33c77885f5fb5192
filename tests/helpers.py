"""Shared helpers for the integration tests: compile, run a sampling loop, compare with the hooked reference."""

from __future__ import annotations

import torch
from torch import nn

import fxcache
from fxcache.testing import HookedReference, expected_units, make_inputs, make_model


def compile_cached(model, method="duca", *, lowering="eager", strict=True, fullgraph=False, **opts):
    backend = fxcache.cache_backend(method, lowering=lowering, strict=strict, **opts)
    return torch.compile(model, backend=backend, dynamic=False, fullgraph=fullgraph), backend


def timesteps(steps: int) -> list[float]:
    return [1.0 - s / (steps + 1) for s in range(steps)]


def loop_inputs(name: str, steps: int, *, batch: int = 1, size: int = 8, seed: int = 0) -> list[dict]:
    """Per-step inputs of one request: decreasing t, fresh latents each step (a harsh test of the caching maths),
    the conditioning of `seed` throughout (as a sampling loop keeps its prompt)."""
    out = []
    for s, t in enumerate(timesteps(steps)):
        kw = make_inputs(name, batch=batch, size=size, t=t, seed=seed)
        kw["hidden_states"] = make_inputs(name, batch=batch, size=size, t=t, seed=seed + 100 * s)["hidden_states"]
        out.append(kw)
    return out


def cfg_calls(name: str, steps: int, *, batch: int = 1, seed: int = 0, uncond_seed: int = 7) -> list[dict]:
    """True CFG: per step a cond call then an uncond call at the same t, each branch with its own conditioning
    (DiT's uncond branch takes the null class 1000, as its pipeline does)."""
    cond = loop_inputs(name, steps, batch=batch, seed=seed)
    uncond = loop_inputs(name, steps, batch=batch, seed=uncond_seed)
    if name == "dit":
        for kw in uncond:
            kw["class_labels"] = torch.full_like(kw["class_labels"], 1000)
    return [kw for pair in zip(cond, uncond) for kw in pair]


def run(model, inputs: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**kw)[0] for kw in inputs]


def run_twice_without_recompiles(model, inputs: list[dict]) -> tuple[list, list]:
    """Two whole generations; the second may not recompile (Dynamo raises if it would)."""
    first = run(model, inputs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run(model, inputs)
    return first, second


def reference_for(name: str, model, config) -> HookedReference:
    return HookedReference(model, config, **expected_units(name, model))


def run_reference(ref: HookedReference, inputs: list[dict], branches: int = 1) -> list[torch.Tensor]:
    outs = []
    for s, kw in enumerate(inputs):
        outs.append(ref(s // branches, s % branches, **kw)[0])
    return outs


def assert_loop_matches(compiled, config, outs, expected, uncached=None, tol: float = 1e-5) -> list[str]:
    """The run followed the method's schedule, equals `expected` within `tol`, and (given the uncached outputs)
    every cached step differs from the uncached model, so the caching was really active. Returns the kinds."""
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert kinds == [config.step_kind(s).value for s in range(len(outs))]
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= tol, (s, kinds[s])
        if uncached is not None and kinds[s] != "full":
            assert rel_err(o, uncached[s]) > 1e-4, \
                f"step {s} ({kinds[s]}) equals the uncached model: caching is inactive"
    return kinds


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def all_pairs(*factors) -> list[tuple]:
    """A covering design of strength 2: rows in which every pair of values of any two factors appears at least
    once (4 models x 7 scores x 2 batch sizes: 28 rows instead of 56). Greedy and deterministic; a factor's values
    may be tuples (unpacked by the parametrize names)."""
    import itertools

    def pairs(row):
        return {(i, j, row[i], row[j]) for i, j in itertools.combinations(range(len(row)), 2)}

    index = [list(range(len(f))) for f in factors]
    todo = set().union(*(pairs(r) for r in itertools.product(*index)))
    rows = []
    while todo:
        best = max(itertools.product(*index), key=lambda r: len(pairs(r) & todo))
        todo -= pairs(best)
        rows.append(best)
    out = []
    for r in sorted(rows):
        row = []
        for f, i in zip(factors, r):
            row.extend(f[i] if isinstance(f[i], tuple) else (f[i],))
        out.append(tuple(row))
    return out


def redigest(folder: str) -> None:
    """Write the digests of the folder's artifact files into its manifest: a crafted artifact then passes the
    digest check, so a test reaches the checks behind it."""
    import hashlib
    import json
    import os

    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        data = json.load(f)
    for a in data["artifacts"]:
        with open(os.path.join(folder, a["file"]), "rb") as f:
            a["sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(path, "w") as f:
        json.dump(data, f)


__all__ = [
    "all_pairs", "assert_loop_matches", "cfg_calls", "compile_cached", "loop_inputs", "make_inputs", "make_model",
    "redigest", "reference_for", "rel_err", "run", "run_reference", "run_twice_without_recompiles", "timesteps",
]


class SelfAttention(nn.Module):
    """Fused-qkv self-attention through SDPA (nn.MultiheadAttention's eager fast path rounds differently from
    its traced graph, which would blur the FULL-equals-uncached check)."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
