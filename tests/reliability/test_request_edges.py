"""The edges of request boundaries: requests held by suspended generators, look-alike conditioning, requests the
step rule took for ended, the time direction one request learns, forced steps, ended requests, and the helper
functions on an enabled pipeline. Each compares with a fresh run or states what a user sees."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fxcache
from fxcache import ConfigError, FxCacheWarning
from fxcache.runtime import requests as request_state
from fxcache.testing import make_inputs, make_model

from pipelines import dit_generate, dit_pipeline, wan22_pipeline, wan_generate


def compiled_dit(method: str = "fora", **opts):
    backend = fxcache.cache_backend(method, lowering="eager", **opts)
    return torch.compile(make_model("dit"), backend=backend, dynamic=False), backend


def sampling(model, labels: list[int], steps: int, seed: int):
    """A DDIM loop over a batch of class labels (no CFG), one step per `next()`; yields the latents last."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    cls = torch.tensor(labels)
    for t in scheduler.timesteps:
        eps = model(latents, timestep=t.expand(len(labels)), class_labels=cls).sample[:, :4]
        latents = scheduler.step(eps, t, latents).prev_sample
        yield
    yield latents


def run_alone(labels, steps, seed, method="fora", **opts):
    model, _ = compiled_dit(method, **opts)
    with torch.no_grad(), fxcache.request(model):
        return list(sampling(model, labels, steps, seed))[-1]


def round_robin(loops: dict) -> dict:
    results = {}
    while len(results) < len(loops):
        for key, gen in loops.items():
            if key not in results:
                value = next(gen)
                if value is not None:
                    results[key] = value
    return results


# -- a request held by a generator across its yields ----------------------------------------------------------

def held_request(model, labels, steps, seed):
    with fxcache.request(model):
        yield from sampling(model, labels, steps, seed)


def test_generators_that_hold_requests_across_yields_equal_fresh_runs():
    """Both requests stay in the shared context while their generators are suspended; each call belongs to the
    request whose block it runs in, and the requests end in any order."""
    model, backend = compiled_dit("fora", interval=3)
    with torch.no_grad():
        got = round_robin({"A": held_request(model, [3], 7, 0), "B": held_request(model, [8], 5, 1)})
    assert request_state._ACTIVE.get() == ()  # both ended, out of order: nothing stays active
    assert backend.cache_bytes() == 0 and "reuse" in [r["kind"] for r in backend.stats()]
    assert len({r["request"] for r in backend.stats()}) == 2
    assert torch.allclose(got["A"], run_alone([3], 7, 0, interval=3), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got["B"], run_alone([8], 5, 1, interval=3), atol=1e-5, rtol=1e-5)


def test_a_call_between_a_suspended_generators_steps_is_not_its_request():
    model, backend = compiled_dit("fora", interval=3)
    with torch.no_grad():
        gen = held_request(model, [3], 5, 0)
        next(gen)
        model(**make_inputs("dit", batch=1))  # the consumer's own call, outside the generator's block
        list(gen)
    records = backend.stats()
    assert records[1]["request"] != records[0]["request"] == records[2]["request"]


# -- look-alike conditioning ----------------------------------------------------------------------------------

def test_class_labels_with_equal_sums_and_norms_are_other_requests():
    """[4, 3] and [0, 5] have one weighted row sum and one norm; unmarked and interleaved they still never
    share caches."""
    model, _ = compiled_dit("fora", interval=3)
    with torch.no_grad():
        got = round_robin({"A": sampling(model, [4, 3], 6, 0), "B": sampling(model, [0, 5], 6, 0)})
    assert torch.allclose(got["A"], run_alone([4, 3], 6, 0, interval=3), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got["B"], run_alone([0, 5], 6, 0, interval=3), atol=1e-5, rtol=1e-5)


def test_a_permuted_prompt_embedding_is_other_conditioning():
    from fxcache.runtime.fingerprint import summaries as _summaries

    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    variants = [x, x.flip(0), x.flip(1), x.transpose(1, 2).reshape(2, 6, 32), torch.tensor([4, 3]), torch.tensor([0, 5]),
                torch.tensor([3, 4])]
    summaries = [tuple(_summaries([v], "cpu")[0].tolist()) for v in variants]
    assert len(set(summaries)) == len(summaries)


# -- a request the step rule took for ended -------------------------------------------------------------------

def test_a_request_started_over_by_another_unmarked_one_says_so():
    """A runs; B starts in the same thread at a higher t without a boundary, so the rule takes A for ended. When
    A goes on, it starts over (FULL, never B's caches) and the user is told why."""
    model, backend = compiled_dit("fora", interval=3)
    a = sampling(model, [3], 8, 0)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            next(a)
        b = sampling(model, [8], 8, 1)
        next(b)
        next(a)
    ours = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    assert len(ours) == 1 and "fxcache.request" in ours[0]
    assert "started over" in ours[0]
    last = backend.stats()[-1]
    assert (last["step"], last["kind"]) == (0, "full")


# -- the time direction is learned per request ----------------------------------------------------------------

def test_a_rising_request_does_not_change_how_unmarked_calls_are_read():
    model, backend = compiled_dit("fora", interval=3)

    def call(t):
        model(**dict(make_inputs("dit", batch=1), timestep=torch.tensor([t])))

    with torch.no_grad():
        with fxcache.request(model):
            for t in (100, 300, 500, 700):  # t rises: this request learns the rising convention
                call(t)
        assert [r["step"] for r in backend.stats()][-2:] == [1, 2]
        n = len(backend.stats())
        for t in (999, 800, 600):  # an unmarked falling request afterwards
            call(t)
    assert [r["step"] for r in backend.stats()[n:]] == [0, 1, 2]


# -- fxcache.step and the rule's branches ---------------------------------------------------------------------

def test_a_forced_step_never_reads_the_caches_of_the_rules_branch_in_its_slot():
    model, backend = compiled_dit("fora", interval=3)
    with torch.no_grad():
        model(**make_inputs("dit", batch=1))  # the rule's branch 0, step 0: caches written
        other = dict(make_inputs("dit", batch=1, seed=5), class_labels=torch.tensor([7]))
        with fxcache.step(model, 1, 0):  # FORA's step 1 reuses, but not another request's caches
            model(**other)
        with fxcache.step(model, 2, 0):
            model(**other)
    assert [r["kind"] for r in backend.stats()] == ["full", "full", "reuse"]


# -- warnings that name the right cause -----------------------------------------------------------------------

def test_conditioning_that_changes_every_step_outside_a_request_warns_about_that_only():
    model, _ = compiled_dit("fora", interval=3)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, t in enumerate((999, 900, 800, 700, 600, 500)):
            model(**dict(make_inputs("dit", batch=1, seed=step), timestep=torch.tensor([t]),
                         class_labels=torch.tensor([step])))
    ours = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    assert len(ours) == 1 and "keep changing their conditioning" in ours[0]


# -- an ended request is not reopened -------------------------------------------------------------------------

def test_an_ended_request_cannot_be_resumed_or_re_entered():
    model, _ = compiled_dit()
    req = fxcache.request(model)
    with req.resume():
        pass
    req.end()
    with pytest.raises(ConfigError, match="has ended"):
        with req.resume():
            pass
    with pytest.raises(ConfigError, match="has ended"):
        with req:
            pass
    with fxcache.request(model) as used:
        pass
    with pytest.raises(ConfigError, match="open a new one"):
        with used:
            pass


# -- the helper functions take an enabled pipeline -------------------------------------------------------------

def test_the_helpers_take_an_enabled_pipeline():
    pipe = dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = fxcache.enable(pipe, "fora", lowering="eager", interval=3)
    with torch.no_grad():
        first = dit_generate(pipe)
    assert fxcache.stats(pipe) == backend.stats() and fxcache.cache_bytes(pipe) == 0
    with torch.no_grad(), fxcache.request(pipe) as req:
        second = dit_generate(pipe)
        assert fxcache.cache_bytes(pipe) == 0  # the pipeline call's own request ended inside ours
    assert np.allclose(first, second, atol=1e-5, rtol=1e-5) and req.ended
    fxcache.reset(pipe)
    with fxcache.step(pipe, 0, 0):
        pass
    with pytest.raises(ConfigError, match="step index"):
        fxcache.step(pipe, -1, 0)


def test_the_helpers_take_a_two_transformer_pipeline():
    pipe = wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    first, second = fxcache.enable(pipe, "fora", lowering="eager", interval=2)
    with torch.no_grad():
        wan_generate(pipe, steps=6)
    records = fxcache.stats(pipe)
    assert len(records) == len(first.stats()) + len(second.stats()) > 0
    assert {r["component"] for r in records} == {"transformer", "transformer_2"}
    assert fxcache.cache_bytes(pipe) == 0
