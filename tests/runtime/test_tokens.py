"""Token choice for PARTIAL steps (ALGORITHMS.md 1.6, 8.9): pure, no compilation."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from fxcache.runtime.tokens import random_token_indices


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


@st.composite
def shapes(draw, min_tokens=1, min_k=0, k_margin=0):
    units = draw(st.integers(min_value=1, max_value=6))
    tokens = draw(st.integers(min_value=min_tokens, max_value=300))
    k = draw(st.integers(min_value=min_k, max_value=tokens - k_margin))
    return units, tokens, k


@given(shape=shapes(), seed=st.integers(min_value=0, max_value=2**32))
def test_indices_are_unique_sorted_and_in_range(shape, seed):
    units, tokens, k = shape
    idx = random_token_indices(units, tokens, k, generator(seed), "cpu")
    assert isinstance(idx, torch.Tensor)
    assert idx.shape == (units, k)
    assert idx.dtype == torch.int64
    assert idx.device.type == "cpu"
    if k == 0:
        return
    assert int(idx.min()) >= 0
    assert int(idx.max()) < tokens
    for row in idx.tolist():
        assert len(set(row)) == k  # unique
        assert row == sorted(row)  # ascending (hence strictly, being unique)
    if k > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all())


@given(shape=shapes(), seed=st.integers(min_value=0, max_value=2**32))
def test_same_seed_same_indices(shape, seed):
    units, tokens, k = shape
    a = random_token_indices(units, tokens, k, generator(seed), "cpu")
    b = random_token_indices(units, tokens, k, generator(seed), "cpu")
    assert torch.equal(a, b)


@given(shape=shapes(min_tokens=20, min_k=2, k_margin=2), seed=st.integers(min_value=0, max_value=2**20))
def test_different_seeds_different_indices(shape, seed):
    units, tokens, k = shape
    draws = [random_token_indices(units, tokens, k, generator(seed + i), "cpu") for i in range(4)]
    # at least C(20, 2) = 190 possible subsets per row: four seeds all giving the same draw is (practically) impossible
    assert any(not torch.equal(a, b) for a, b in itertools.combinations(draws, 2))


@given(shape=shapes(min_tokens=20, min_k=2, k_margin=2), seed=st.integers(min_value=0, max_value=2**20))
def test_successive_draws_from_one_generator_differ(shape, seed):
    units, tokens, k = shape
    gen = generator(seed)
    draws = [random_token_indices(units, tokens, k, gen, "cpu") for _ in range(4)]
    assert any(not torch.equal(a, b) for a, b in itertools.combinations(draws, 2))


def test_full_selection_is_every_token():
    idx = random_token_indices(3, 17, 17, generator(0), "cpu")
    assert torch.equal(idx, torch.arange(17).expand(3, 17))


def test_units_draw_independently():
    idx = random_token_indices(6, 200, 20, generator(1), "cpu")
    assert len({tuple(row) for row in idx.tolist()}) > 1


def test_selection_is_roughly_uniform():
    # every token should be picked about units * draws * k / tokens times
    gen = generator(0)
    counts = torch.zeros(40, dtype=torch.int64)
    for _ in range(200):
        idx = random_token_indices(4, 40, 10, gen, "cpu")
        counts += torch.bincount(idx.flatten(), minlength=40)
    expected = 4 * 200 * 10 / 40  # 200
    assert int(counts.sum()) == 4 * 200 * 10
    assert int(counts.min()) > 0.7 * expected
    assert int(counts.max()) < 1.3 * expected
