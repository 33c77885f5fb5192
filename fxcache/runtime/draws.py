"""Random draws of a step (token choice, ClusCa's member draw and k-means start), as pure functions of the step.

Every draw of step s for input `key` comes from a generator seeded with `step_seed(seed, s, key)`. So a request's
draws never depend on what other requests (interleaved, in other threads, earlier) drew, the CFG branches of a
step share their draws, and a request repeats bit for bit. `fxcache.testing.HookedReference` draws the same way.
"""

from __future__ import annotations

import zlib

import torch

from .tokens import random_token_indices

_MASK = (1 << 64) - 1


def step_seed(seed: int, step: int, key: str) -> int:
    """A 64-bit seed for the draw of `key` at `step` (splitmix64 of the three)."""
    x = (seed + 0x9E3779B97F4A7C15 * (step + 1) + 0xD1B54A32D192ED03 * (zlib.crc32(key.encode()) + 1)) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def generator(seed: int, step: int, key: str, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, key))
    return g


def draw_indices(seed: int, step: int, key: str, units: int, tokens: int, k: int, device) -> torch.Tensor:
    """(units, k) sorted token indices per unit (`random_token_indices`) for input `key` at `step`."""
    return random_token_indices(units, tokens, k, generator(seed, step, key, device), device)


def draw_uniform(seed: int, step: int, key: str, shape, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator(seed, step, key, device), device=device)


def draw_permutation(seed: int, step: int, key: str, tokens: int, count: int, device) -> torch.Tensor:
    """The first `count` of a random permutation of range(tokens) (ClusCa's k-means start)."""
    return torch.randperm(tokens, generator=generator(seed, step, key, device), device=device)[:count]
