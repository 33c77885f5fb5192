"""Calls of several trajectories with one conditioning and one t never share caches: micro-batches of one prompt
inside one request, lockstep loops outside any request. Each trajectory equals itself run alone."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import fxcache
from fxcache import FxCacheWarning
from fxcache.testing import make_model

METHODS = [("fora", dict(interval=3)), ("duca", dict(interval=3, ratio=0.5)),
           ("taylorseer", dict(interval=3, warmup_steps=1))]


def _start(seed, batch=2, near=None):
    """Start latents of seed `seed`; `near`: (seed, rel) start at relative distance `rel` from that seed's, as
    variations of one image at a low strength are."""
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    if near is None:
        return x
    base = _start(near[0], batch)
    return base + near[1] * base.norm() * x / x.norm()


def _trajectories(compiled, seeds, *, steps=6, label=3, request=True, batch=2, starts=None):
    """One DDIM loop that advances every trajectory (a latent batch of `batch` images per seed) one call each per
    step, all with the same class label and t."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    latents = list(starts) if starts is not None else [_start(s, batch) for s in seeds]
    labels = torch.full((batch,), label)
    with torch.no_grad(), (fxcache.request(compiled) if request else contextlib.nullcontext()):
        for t in scheduler.timesteps:
            for i, x in enumerate(latents):
                eps = compiled(x, timestep=t.expand(batch), class_labels=labels).sample[:, :4]
                latents[i] = scheduler.step(eps, t, x).prev_sample
    return latents


def _compiled(method, opts):
    backend = fxcache.cache_backend(method, lowering="eager", **opts)
    return torch.compile(make_model("dit"), backend=backend, dynamic=False), backend


@pytest.mark.parametrize("request_marked", [True, False])
@pytest.mark.parametrize("method,opts", METHODS)
def test_micro_batches_of_one_prompt_equal_each_run_alone(method, opts, request_marked):
    together, backend = _compiled(method, opts)
    outs = _trajectories(together, (1, 2), request=request_marked)
    kinds = [r["kind"] for r in backend.stats()]
    assert kinds.count("full") < len(kinds), "nothing was cached"
    for seed, out in zip((1, 2), outs):
        alone, _ = _compiled(method, opts)
        expected = _trajectories(alone, (seed,), request=request_marked)[0]
        assert torch.equal(out, expected), (seed, (out - expected).norm() / expected.norm())


@pytest.mark.parametrize("rel", [0.3, 0.1])
def test_micro_batches_that_start_close_equal_each_run_alone(rel):
    """Variations of one image (the same latents but for a little noise) are still two trajectories."""
    starts = [_start(1), _start(2, near=(1, rel))]
    together, _ = _compiled("fora", dict(interval=3))
    outs = _trajectories(together, (), starts=starts)
    for start, out in zip(starts, outs):
        alone, _ = _compiled("fora", dict(interval=3))
        assert torch.equal(out, _trajectories(alone, (), starts=[start])[0])


def test_three_micro_batches_keep_their_steps():
    compiled, backend = _compiled("fora", dict(interval=3))
    _trajectories(compiled, (1, 2, 3), steps=5)
    records = backend.stats()
    assert [r["step"] for r in records] == [s for s in range(5) for _ in range(3)]
    assert len({r["branch"] for r in records}) == 3


def test_a_refine_outside_any_request_that_jumps_the_latents_is_named_in_a_warning():
    """A new request with the same conditioning whose first t is below the last one seen (an img2img refine) looks
    like the next step to the step rule; its latents jump far from the last call's, and the user is told to mark
    requests."""
    compiled, _ = _compiled("fora", dict(interval=3))
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    labels = torch.full((1,), 3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for t in scheduler.timesteps[:5]:
            x = scheduler.step(compiled(x, timestep=t.expand(1), class_labels=labels).sample[:, :4], t, x).prev_sample
        quiet = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
        y = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 3
        for t in scheduler.timesteps[6:8]:  # another image, at a lower t
            y = scheduler.step(compiled(y, timestep=t.expand(1), class_labels=labels).sample[:, :4], t, y).prev_sample
    assert quiet == []
    said = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    assert len(said) == 1 and "fxcache.request" in said[0] and "latents" in said[0], said


def test_micro_batches_on_a_graph_broken_model_equal_each_run_alone():
    """A forward that graph-breaks is stepped by its model call's arguments: the latents there tell the
    trajectories apart too."""
    from test_graph_breaks import make

    def loop(compiled, seeds):
        xs = [torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(s)) for s in seeds]
        with torch.no_grad(), fxcache.request(compiled):
            for step in range(6):
                t = torch.full((2,), 1000.0 * (1 - step / 7))
                xs = [x - 0.1 * compiled(x, t) for x in xs]
        return xs

    backend = fxcache.cache_backend("fora", lowering="eager", interval=3)
    outs = loop(torch.compile(make("between"), backend=backend, dynamic=False), (1, 2))
    assert any(r["kind"] == "reuse" for r in backend.stats())
    for seed, out in zip((1, 2), outs):
        alone = torch.compile(make("between"), backend=fxcache.cache_backend("fora", lowering="eager", interval=3),
                              dynamic=False)
        assert torch.equal(out, loop(alone, (seed,))[0]), seed


def test_more_micro_batches_than_max_branches_warn_and_fit_when_raised():
    """Four micro-batches with max_branches=3: one is always dropped, runs FULL again and the user hears to raise
    max_branches; with max_branches=4 each equals itself run alone."""
    crowded, _ = _compiled("fora", dict(interval=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trajectories(crowded, (1, 2, 3, 4), steps=4)
    assert any("max_branches" in str(w.message) for w in caught if issubclass(w.category, FxCacheWarning))
    roomy, _ = _compiled("fora", dict(interval=3, max_branches=4))
    outs = _trajectories(roomy, (1, 2, 3, 4), steps=4)
    alone, _ = _compiled("fora", dict(interval=3))
    assert torch.equal(outs[3], _trajectories(alone, (4,), steps=4)[0])


def test_the_same_unmarked_loop_twice_in_a_row_gives_the_same_output():
    """Outside any request, a loop that starts again (t above every branch) is a new request: the latents of the
    one before (the same trajectory, here) never turn its steps into another trajectory's."""
    compiled, backend = _compiled("fora", dict(interval=3))
    first = _trajectories(compiled, (5,), request=False)[0]
    second = _trajectories(compiled, (5,), request=False)[0]
    assert torch.equal(first, second)
    kinds = [r["kind"] for r in backend.stats()]
    assert kinds[:6] == kinds[6:] and "reuse" in kinds
