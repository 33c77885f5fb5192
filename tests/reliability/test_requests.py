"""Request boundaries and per-request state, tried as users run diffusers pipelines (tiny random components).

Every case compares with a fresh run: a new pipeline with a new model and backend that runs only the request in
question. Both ways of enabling fxcache are tried where it matters: `fxcache.enable(pipe)` and
`pipe.transformer = torch.compile(transformer, backend=fxcache.cache_backend(...))`.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

import fxcache
from fxcache import ConfigError, FxCacheWarning

from pipelines import (cogvideox_generate, cogvideox_pipeline, dit_generate, dit_pipeline, flux_generate,
                       flux_img2img, flux_pipeline, flux_prompt, lumina_generate, lumina_pipeline, wan22_pipeline,
                       wan_generate)

MODES = ("enable", "compile")


def cached(pipe, method: str = "duca", mode: str = "enable", **opts):
    """fxcache on the pipeline's transformer, the one-call way or the torch.compile way."""
    pipe.set_progress_bar_config(disable=True)
    if mode == "enable":
        return fxcache.enable(pipe, method, lowering="eager", **opts)
    backend = fxcache.cache_backend(method, lowering="eager", **opts)
    pipe.transformer = torch.compile(pipe.transformer, backend=backend, dynamic=False)
    return backend


def kinds(backend, start: int = 0) -> list[str]:
    return [r["kind"] for r in backend.stats()[start:]]


def close(a, b, tol: float = 1e-5) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


METHODS = [("duca", dict(interval=3)), ("fora", dict(interval=3)), ("taylorseer", dict(interval=3, warmup_steps=1)),
           ("toca", dict(interval=3))]


# -- 1. a new request is never taken for the old one's continuation --------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_img2img_after_txt2img_equals_a_fresh_img2img(mode, method, opts):
    """An img2img refine starts at a t below the txt2img's last one: it must not continue the txt2img's caches."""
    pipe = flux_pipeline()
    backend = cached(pipe, method, mode, **opts)
    with torch.no_grad():
        image = flux_generate(pipe, steps=4)
        start = len(backend.stats())
        refined = flux_img2img(pipe, image, steps=20, strength=0.3)
    assert any(k != "full" for k in kinds(backend, start)), "the img2img request must cache too"

    fresh = flux_pipeline()
    fresh_backend = cached(fresh, method, mode, **opts)
    with torch.no_grad():
        expected = flux_img2img(fresh, image, steps=20, strength=0.3)
    assert kinds(fresh_backend) == kinds(backend, start)
    assert close(refined, expected)


@pytest.mark.parametrize("mode", MODES)
def test_a_request_after_an_interrupted_one_equals_a_fresh_run(mode):
    pipe = flux_pipeline()
    backend = cached(pipe, "duca", mode, interval=4)

    def interrupt(p, step, t, kwargs):
        if step == 2:
            p._interrupt = True
        return {}

    with torch.no_grad():
        flux_generate(pipe, steps=8, seed=3, callback_on_step_end=interrupt)
        start = len(backend.stats())
        second = flux_generate(pipe, steps=8, seed=4, prompt=1)
    fresh = flux_pipeline()
    cached(fresh, "duca", mode, interval=4)
    with torch.no_grad():
        expected = flux_generate(fresh, steps=8, seed=4, prompt=1)
    assert kinds(backend, start) == [fxcache.DuCaConfig(interval=4).step_kind(s).value for s in range(8)]
    assert close(second, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("true_cfg", [False, True], ids=["cfg-distilled", "true-cfg"])
def test_the_same_request_again_after_an_exception_at_step_0_equals_a_fresh_run(mode, true_cfg):
    pipe = flux_pipeline()
    backend = cached(pipe, "fora", mode, interval=3)

    def fail(p, step, t, kwargs):
        raise RuntimeError("callback failed")

    with torch.no_grad():
        with pytest.raises(RuntimeError, match="callback failed"):
            flux_generate(pipe, steps=6, true_cfg=true_cfg, callback_on_step_end=fail)
        retry = flux_generate(pipe, steps=6, true_cfg=true_cfg)
    fresh = flux_pipeline()
    cached(fresh, "fora", mode, interval=3)
    with torch.no_grad():
        expected = flux_generate(fresh, steps=6, true_cfg=true_cfg)
    assert close(retry, expected)
    assert "reuse" in kinds(backend)


@pytest.mark.parametrize("mode", MODES)
def test_a_refine_after_a_call_that_failed_midway_equals_a_fresh_refine(mode):
    """A pipeline call that raises after some steps (a callback, Ctrl-C, the VAE) never reaches its end-of-call
    reset; the next call of the same prompt starts below its last t. It must not continue the dead call's caches:
    each pipeline call is told by its own frame, also in a pipeline made with `from_pipe` from an enabled one."""
    from diffusers import FluxImg2ImgPipeline

    pipe = flux_pipeline()
    backend = cached(pipe, "duca", mode, interval=3)
    i2i = FluxImg2ImgPipeline.from_pipe(pipe)

    def fail(p, step, t, kwargs):
        if step == 4:
            raise KeyboardInterrupt
        return {}

    with torch.no_grad():
        image = flux_generate(pipe, steps=6)
        with pytest.raises(KeyboardInterrupt):
            i2i(image=image, **flux_prompt(0), height=16, width=16, strength=0.9, num_inference_steps=8,
                output_type="np", callback_on_step_end=fail)
        start = len(backend.stats())
        refined = flux_img2img(pipe, image, steps=10, strength=0.5)
    fresh = flux_pipeline()
    fresh_backend = cached(fresh, "duca", "compile", interval=3)
    with torch.no_grad():
        expected = flux_img2img(fresh, image, steps=10, strength=0.5)
    assert kinds(backend, start) == kinds(fresh_backend) and close(refined, expected)
    assert len({r["request"] for r in backend.stats()[start:]}) == 1
    assert [r["step"] for r in backend.stats()[start:]] == list(range(len(kinds(fresh_backend))))


def test_another_prompt_under_the_same_cache_context_name_is_another_request():
    """Flux names its branch "cond" in every call: after an aborted call, a call with another prompt that starts
    below the aborted one's t (an SDEdit-style start) must not read its caches, even without a pipeline frame."""
    pipe = flux_pipeline()
    backend = cached(pipe, "fora", "compile", interval=3)
    transformer = pipe.transformer
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(5))
    ids = dict(img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))

    def call(prompt: int, t: float):
        with transformer.cache_context("cond"):
            p = flux_prompt(prompt)
            return transformer(hidden_states=x, encoder_hidden_states=p["prompt_embeds"],
                               pooled_projections=p["pooled_prompt_embeds"], timestep=torch.tensor([t]),
                               return_dict=False, **ids)[0]

    with torch.no_grad():
        for t in (1.0, 0.9, 0.8, 0.7):
            call(0, t)
        start = len(backend.stats())
        call(1, 0.4)
    assert kinds(backend, start) == ["full"]


def test_an_exception_inside_the_model_call_makes_the_next_call_start_over():
    pipe = flux_pipeline()
    backend = cached(pipe, "fora", "compile", interval=3)
    with torch.no_grad():
        flux_generate(pipe, steps=3)
        source = backend.runners[0].source
        real = source.callable

        def broken(*a, **k):
            raise RuntimeError("device lost")

        source.callable = lambda *a, **k: broken
        with pytest.raises(RuntimeError, match="device lost"):
            flux_generate(pipe, steps=6)
        source.callable = real
        start = len(backend.stats())
        again = flux_generate(pipe, steps=6)
    fresh = flux_pipeline()
    cached(fresh, "fora", "compile", interval=3)
    with torch.no_grad():
        expected = flux_generate(fresh, steps=6)
    assert kinds(backend, start)[0] == "full" and close(again, expected)


# -- 2. per-request state -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_two_threads_never_share_caches(mode):
    """Two threads generate at once through one compiled transformer (each with its own pipeline object, as the
    scheduler is per pipeline); each result equals a fresh single-threaded run."""
    pipe = dit_pipeline()
    cached(pipe, "duca", mode, interval=3)
    from diffusers import DiTPipeline

    other = DiTPipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    with torch.no_grad():  # Dynamo compiles from one thread at a time: trace the graph before the threads start
        dit_generate(pipe, (0, 0), steps=7, seed=9)
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(p, labels, seed):
        try:
            barrier.wait()
            with torch.no_grad():
                results[labels] = [dit_generate(p, labels, steps=7, seed=seed) for _ in range(2)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(pipe, (1, 7), 0)),
               threading.Thread(target=work, args=(other, (3, 5), 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for labels, seed in (((1, 7), 0), ((3, 5), 1)):
        fresh = dit_pipeline()
        cached(fresh, "duca", mode, interval=3)
        with torch.no_grad():
            expected = dit_generate(fresh, labels, steps=7, seed=seed)
        assert all(close(r, expected) for r in results[labels]), labels


def _dit_loop(model, labels, steps, seed):
    """A custom sampling loop, one step at a time (a generator): DDIM on the DiT transformer, batched CFG."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(seed))
    cls = torch.tensor([labels, 1000])
    for t in scheduler.timesteps:
        x = torch.cat([latents, latents])
        out = model(x, timestep=t.expand(2), class_labels=cls).sample
        eps = out[:, :4]
        eps = eps[1:] + 4.0 * (eps[:1] - eps[1:])
        latents = scheduler.step(eps, t, latents).prev_sample
        yield
    yield latents


def _drive(loops: dict) -> dict:
    """Round-robin the loops (each a (generator, request or None)) in one thread until all are done."""
    results = {}
    while len(results) < len(loops):
        for key, (gen, req) in loops.items():
            if key in results:
                continue
            with req.resume() if req is not None else _nothing():
                value = next(gen)
            if value is not None:
                results[key] = value
    return results


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("marked", [True, False], ids=["request-contexts", "unmarked"])
def test_round_robin_requests_in_one_thread_equal_fresh_runs(marked):
    """Two requests with other class labels and step counts, interleaved step by step in one thread. With request
    contexts they are separated by construction; unmarked, their conditioning keeps them apart."""
    from fxcache.testing import make_model

    model = make_model("dit")
    backend = fxcache.cache_backend("duca", lowering="eager", interval=3)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    reqs = {k: fxcache.request(compiled) if marked else None for k in "AB"}
    with torch.no_grad():
        got = _drive({"A": (_dit_loop(compiled, 3, 9, 0), reqs["A"]), "B": (_dit_loop(compiled, 8, 6, 1), reqs["B"])})
    for req in reqs.values():
        if req is not None:
            req.end()
    assert any(r["kind"] != "full" for r in backend.stats())
    for key, (label, steps, seed) in {"A": (3, 9, 0), "B": (8, 6, 1)}.items():
        torch._dynamo.reset()
        fresh = torch.compile(make_model("dit"), backend=fxcache.cache_backend("duca", lowering="eager", interval=3),
                              dynamic=False)
        with torch.no_grad():
            expected = list(_dit_loop(fresh, label, steps, seed))[-1]
        assert torch.allclose(got[key], expected, atol=1e-5, rtol=1e-5), key


def test_the_other_requests_labels_do_not_move_a_request():
    """The interleaving finding itself: request A's output must not depend on request B's class label."""
    from fxcache.testing import make_model

    outs = []
    for b_label in (8, 2):
        torch._dynamo.reset()
        compiled = torch.compile(make_model("dit"), backend=fxcache.cache_backend("fora", lowering="eager"),
                                 dynamic=False)
        with torch.no_grad():
            got = _drive({"A": (_dit_loop(compiled, 3, 7, 0), None), "B": (_dit_loop(compiled, b_label, 5, 1), None)})
        outs.append(got["A"])
    assert torch.equal(outs[0], outs[1])


def test_two_experts_compiled_with_one_backend_keep_their_own_state():
    """Wan 2.2: both experts compiled with one backend share Dynamo's graph, never their caches."""
    pipe = wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = fxcache.cache_backend("fora", lowering="eager", interval=2)
    pipe.transformer = torch.compile(pipe.transformer, backend=backend, dynamic=False)
    pipe.transformer_2 = torch.compile(pipe.transformer_2, backend=backend, dynamic=False)
    with torch.no_grad():
        shared = wan_generate(pipe, steps=8)
    assert "reuse" in kinds(backend)
    fresh = wan22_pipeline()
    backends = cached(fresh, "fora", "enable", interval=2)
    assert isinstance(backends, tuple) and len(backends) == 2 and backends[0] is not backends[1]
    with torch.no_grad():
        expected = wan_generate(fresh, steps=8)
    assert torch.allclose(shared, expected, atol=1e-5, rtol=1e-5)
    assert all("reuse" in kinds(b) for b in backends)


# -- 3. non-finite t, repeated t, Heun, rising t -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_timestep_raises_and_the_next_request_is_fresh(bad):
    from fxcache.testing import make_inputs, make_model

    model = make_model("pixart")
    backend = fxcache.cache_backend("fora", lowering="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(**make_inputs("pixart", t=0.9))
        with pytest.raises(ConfigError, match="finite"):
            compiled(**make_inputs("pixart", t=0.5) | {"timestep": torch.tensor([bad])})
        out = compiled(**make_inputs("pixart", t=0.4))
        assert backend.stats()[-1]["kind"] == "full"
        assert torch.equal(out[0], model(**make_inputs("pixart", t=0.4))[0])


@pytest.mark.parametrize("mode", MODES)
def test_one_step_sampling_keeps_memory_flat(mode):
    """1-step requests repeat the same t: each is a new request, never a new CFG branch with caches of its own."""
    pipe = flux_pipeline()
    backend = cached(pipe, "duca", mode, keep_caches=False)
    held = []
    with torch.no_grad():
        for i in range(30):
            flux_generate(pipe, steps=1, seed=i)
            held.append(backend.cache_bytes())
    assert max(held) == held[0] and (mode == "compile" or held[0] == 0)
    assert {r["branch"] for r in backend.stats()} == {0} and set(kinds(backend)) == {"full"}


def test_a_fixed_t_loop_keeps_memory_bounded_and_quiet():
    """Calls at one t and conditioning with unrelated latents may be micro-batches of one prompt, so each gets a
    branch of its own; a loop of them replaces the oldest, within max_branches, without a warning."""
    from fxcache.testing import make_inputs, make_model

    model = make_model("flux")
    backend = fxcache.cache_backend("duca", lowering="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for i in range(20):
            compiled(**make_inputs("flux", t=0.5) | {"hidden_states": torch.randn(1, 64, 16)})
    first = backend.stats()[0]["cache_bytes"]
    assert all(r["cache_bytes"] <= backend.scope.max_branches * first and r["step"] == 0 for r in backend.stats())
    assert backend.stats()[-1]["cache_bytes"] == backend.scope.max_branches * first
    assert not [w for w in caught if issubclass(w.category, FxCacheWarning)]


def test_heun_repeated_timesteps_are_steps_not_branches():
    from diffusers import HeunDiscreteScheduler

    pipe = dit_pipeline(HeunDiscreteScheduler())
    backend = cached(pipe, "fora", "enable", interval=2)
    with torch.no_grad():
        out = dit_generate(pipe, steps=4)
    records = backend.stats()
    assert {r["branch"] for r in records} == {0}
    assert [r["step"] for r in records] == list(range(len(records))) and "reuse" in kinds(backend)
    fresh = dit_pipeline(HeunDiscreteScheduler())
    cached(fresh, "fora", "enable", interval=2)
    with torch.no_grad():
        assert close(out, dit_generate(fresh, steps=4))


def test_a_rising_time_convention_is_cached():
    """Lumina-Next passes t rising from 0 to 1: every request learns it (one extra FULL step) and caches, so the
    same request twice gives a fresh run's output; time_direction="rising" saves the learning step."""
    pipe = lumina_pipeline()
    backend = cached(pipe, "fora", "enable", interval=3)
    with torch.no_grad():
        first = lumina_generate(pipe, steps=8)
        n = len(backend.stats())
        second = lumina_generate(pipe, steps=8)
    assert "reuse" in kinds(backend)[:n] and kinds(backend)[:n] == kinds(backend, n)
    fresh = lumina_pipeline()
    cached(fresh, "fora", "enable", interval=3)
    told = lumina_pipeline()
    told_backend = cached(told, "fora", "enable", interval=3, time_direction="rising")
    with torch.no_grad():
        expected = lumina_generate(fresh, steps=8)
        lumina_generate(told, steps=8)
    assert torch.allclose(first, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(second, expected, atol=1e-5, rtol=1e-5)
    assert kinds(told_backend) == [fxcache.FORAConfig(interval=3).step_kind(s).value for s in range(8)]


# -- 4. side effects: CogVideoX at another size ------------------------------------------------------------------

def test_cogvideox_at_another_size_equals_the_uncached_pipeline_at_interval_1():
    """CogVideoX fills its positional table in place at sizes other than its config's: every variant keeps it."""
    pipe = cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = cogvideox_generate(pipe, height=96, width=96, frames=13)
    cached(pipe, "fora", "enable", interval=1)
    with torch.no_grad():
        got = cogvideox_generate(pipe, height=96, width=96, frames=13)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


# -- 5. memory ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_memory_is_flat_over_100_requests_of_mixed_shapes(mode):
    """100 DiT requests with 1-3 labels (three graphs), 2-4 steps: caches are freed at the end of each request
    (the pipeline's own end-of-call reset in compile mode, the request in enable mode), records stay bounded."""
    pipe = dit_pipeline()
    backend = cached(pipe, "duca", mode, interval=2)
    backend.scope.records = type(backend.scope.records)(maxlen=50)
    peak, after = 0, []
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i in range(100):
            labels = tuple(int(x) for x in rng.integers(0, 10, size=int(rng.integers(1, 4))))
            dit_generate(pipe, labels, steps=int(rng.integers(2, 5)), seed=i)
            peak = max(peak, max(r["cache_bytes"] for r in list(backend.stats())[-2:]))
            after.append(backend.cache_bytes())
    assert len(backend.runners) == 3
    assert after == [0] * 100, "caches outlived their request"
    assert peak > 0 and len(backend.stats()) == 50
    print(f"\ncache bytes held after each of 100 requests: max {max(after)}; peak during a request: {peak}")


def test_recompile_limit_is_reported_with_the_fix():
    from fxcache.testing import make_inputs, make_model

    model = make_model("dit")

    class FreshCode(type(model)):
        """A forward code object of its own: the limit counts graphs per code object, and earlier tests in this
        process compiled DiT's forward many times over."""

        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model.__class__ = FreshCode
    backend = fxcache.cache_backend("fora", lowering="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2, accumulated_recompile_limit=2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                for batch in (1, 2, 3, 4):
                    compiled(**make_inputs("dit", batch=batch))
    ours = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    assert len(ours) == 1 and "recompile_limit" in ours[0] and "plain eager" in ours[0]
    assert len(backend.runners) == 2



def test_the_recompile_limit_warns_only_the_backend_that_hit_it():
    """Two models of one class share a forward code object; the backend compiling when Dynamo gives up warns."""
    from fxcache.testing import make_inputs, make_model

    first_model, second_model = make_model("dit"), make_model("dit")

    class SharedCode(type(first_model)):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    first_model.__class__ = second_model.__class__ = SharedCode
    first, second = (fxcache.cache_backend("fora", lowering="eager") for _ in range(2))
    with torch._dynamo.config.patch(recompile_limit=2, accumulated_recompile_limit=2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                torch.compile(first_model, backend=first, dynamic=False)(**make_inputs("dit", batch=1))
                compiled = torch.compile(second_model, backend=second, dynamic=False)
                for batch in (1, 2, 3):
                    compiled(**make_inputs("dit", batch=batch))
    assert len([w for w in caught if issubclass(w.category, FxCacheWarning)]) == 1
    assert "recompile_limit" not in first.scope._warned and "recompile_limit" in second.scope._warned

# -- 6. one call for pipelines --------------------------------------------------------------------------------------

def test_enable_and_disable():
    pipe = dit_pipeline()
    with torch.no_grad():
        uncached = dit_generate(pipe)
    original = pipe.transformer
    backend = fxcache.enable(pipe, "fora", lowering="eager", interval=3)
    assert isinstance(backend, fxcache.CacheBackend) and backend.scope.max_branches == 3  # DiT names no contexts
    with pytest.raises(ConfigError, match="already enabled"):
        fxcache.enable(pipe)
    with torch.no_grad():
        first, second = dit_generate(pipe), dit_generate(pipe)
    assert close(first, second) and not close(first, uncached, 1e-6)
    assert fxcache.stats(pipe.transformer) == backend.stats()
    from diffusers import DiTPipeline

    assert type(pipe).__name__ == "DiTPipeline" and isinstance(pipe, DiTPipeline)
    fxcache.disable(pipe)
    assert pipe.transformer is original and type(pipe).__name__ == "DiTPipeline"
    with torch.no_grad():
        assert close(dit_generate(pipe), uncached)
    with pytest.raises(ConfigError, match="not enabled"):
        fxcache.disable(pipe)


def test_enable_takes_the_branch_count_from_the_pipelines_cache_contexts():
    pipe = flux_pipeline()
    backend = fxcache.enable(pipe, "duca", lowering="eager")
    assert backend.scope.max_branches == 2  # "cond" and "uncond"
    with pytest.raises(ConfigError, match="unknown option"):
        fxcache.enable(flux_pipeline(), "duca", intervall=3)


@pytest.mark.parametrize("mode", MODES)
def test_each_pipeline_call_is_a_request_of_its_own_in_stats(mode):
    pipe = dit_pipeline()
    backend = cached(pipe, "fora", mode, interval=3)
    with torch.no_grad():
        for seed in range(3):
            dit_generate(pipe, steps=3, seed=seed)
    records = backend.stats()
    assert [r["step"] for r in records] == [0, 1, 2] * 3
    ids = [r["request"] for r in records]
    assert ids[0] == ids[1] == ids[2] != ids[3] == ids[4] == ids[5] != ids[6]


def test_a_pipeline_made_from_an_enabled_one_can_be_enabled_and_marked():
    from diffusers import FluxImg2ImgPipeline

    pipe = flux_pipeline()
    backend = cached(pipe, "fora", "enable", interval=3)
    i2i = FluxImg2ImgPipeline.from_pipe(pipe)
    with pytest.raises(ConfigError, match="made with from_pipe"):
        fxcache.enable(i2i, "duca")
    assert fxcache.enable(i2i, "fora") is backend  # shares the compiled transformer: adds request boundaries
    with fxcache.request(i2i) as req:
        assert req.serves(backend.scope)
    fxcache.disable(i2i)  # i2i gets the plain transformer back; pipe, still enabled, keeps the compiled one
    assert fxcache.stats(pipe) == [] and pipe.transformer._orig_mod is i2i.transformer
    assert fxcache.pipelines.backends(pipe) == (backend,)


def test_in_place_compile_has_stats_and_reset():
    """`pipe.transformer.compile(backend=...)`, as diffusers' docs compile: stats, reset and request work."""
    pipe = dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    backend = fxcache.cache_backend("fora", lowering="eager", interval=3)
    pipe.transformer.compile(backend=backend, dynamic=False)
    with torch.no_grad():
        dit_generate(pipe, steps=4)
    assert fxcache.stats(pipe.transformer) == backend.stats() and "reuse" in kinds(backend)
    fxcache.reset(pipe.transformer)
    with fxcache.request(pipe.transformer):
        pass
