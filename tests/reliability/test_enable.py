"""`fxcache.enable` as users call it: pipelines that share a transformer, bad arguments, torch.compile's options,
Dynamo's recompile limit, a step count the schedule was not written for, and what `stats` prints.

Each case checks what a user would see: whether the pipeline really caches (`fxcache.stats`), and its result
against a fresh run.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fxcache
from fxcache import ConfigError, FxCacheWarning
from fxcache.runtime.attach import backends_of
from fxcache.step_plan import StepPlan

from pipelines import flux_generate, flux_pipeline, flux_prompt


def img2img(pipe, image, *, steps: int = 6, strength: float = 0.5, seed: int = 1):
    return pipe(image=image, **flux_prompt(0), height=16, width=16, strength=strength, num_inference_steps=steps,
                output_type="np", generator=torch.Generator().manual_seed(seed)).images


def enabled(pipe, *args, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return fxcache.enable(pipe, *args, lowering="eager", **kwargs)


def close(a, b, tol: float = 1e-5) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


def kinds(records) -> list[str]:
    return [r["kind"] for r in records]


def fresh_img2img(image) -> tuple:
    """The img2img request alone, on a pipeline of its own: what a shared pipeline's request must give."""
    from diffusers import FluxImg2ImgPipeline

    fresh = FluxImg2ImgPipeline(**flux_pipeline().components)
    backend = enabled(fresh, "fora", interval=3)
    with torch.no_grad():
        return img2img(fresh, image), kinds(backend.stats())


# -- pipelines that share a transformer ------------------------------------------------------------------------

def test_a_pipeline_made_from_the_components_before_enable_caches_with_requests_of_its_own():
    """`q = FluxImg2ImgPipeline(**pipe.components)` made before `enable(pipe)` holds the plain transformer:
    `enable(q)` gives it the compiled one (one compile, one backend), each call a request of its own, and each
    pipeline's stats its own calls."""
    from diffusers import FluxImg2ImgPipeline

    pipe = flux_pipeline()
    q = FluxImg2ImgPipeline(**pipe.components)
    plain = q.transformer
    backend = enabled(pipe, "fora", interval=3)
    assert enabled(q) is backend
    assert q.transformer is pipe.transformer is not plain
    with torch.no_grad():
        image = flux_generate(pipe, steps=4)
        refined = img2img(q, image)
    expected, expected_kinds = fresh_img2img(image)
    assert close(refined, expected)
    assert kinds(fxcache.stats(q)) == expected_kinds and "reuse" in expected_kinds
    assert kinds(fxcache.stats(pipe)) == ["full", "reuse", "reuse", "full"]
    assert {r["request"] for r in fxcache.stats(q)}.isdisjoint({r["request"] for r in fxcache.stats(pipe)})
    assert len(fxcache.stats(pipe.transformer)) == len(fxcache.stats(pipe)) + len(fxcache.stats(q))

    fxcache.disable(q)
    assert q.transformer is plain  # what it held before
    with torch.no_grad():
        flux_generate(pipe, steps=4)
    assert kinds(fxcache.stats(pipe))[-4:] == ["full", "reuse", "reuse", "full"]  # still cached
    fxcache.disable(pipe)
    assert pipe.transformer is plain and backends_of(plain) == []


@pytest.mark.parametrize("made", ["from_pipe", "components"])
@pytest.mark.parametrize("first_disabled", ["owner", "sharer"])
def test_a_pipeline_made_after_enable_shares_it_until_the_last_is_disabled(made, first_disabled):
    from diffusers import FluxImg2ImgPipeline

    pipe = flux_pipeline()
    plain = pipe.transformer
    backend = enabled(pipe, "fora", interval=3)
    q = FluxImg2ImgPipeline.from_pipe(pipe) if made == "from_pipe" else FluxImg2ImgPipeline(**pipe.components)
    compiled = q.transformer
    assert enabled(q, "fora", interval=3) is backend and q.transformer is pipe.transformer
    with torch.no_grad():
        image = flux_generate(pipe, steps=4)
    first, second = (pipe, q) if first_disabled == "owner" else (q, pipe)
    fxcache.disable(first)
    with torch.no_grad():
        refined = img2img(q, image) if second is q else flux_generate(pipe, steps=4)
    assert "reuse" in kinds(fxcache.stats(second)[-3:]), "the pipeline still enabled still caches"
    if second is q:
        assert close(refined, fresh_img2img(image)[0])
    fxcache.disable(second)
    assert compiled is not plain
    assert pipe.transformer is plain and q.transformer is plain and backends_of(plain) == []
    calls = len(fxcache.stats(compiled))
    with torch.no_grad():
        img2img(q, image)
    assert len(fxcache.stats(compiled)) == calls, "a disabled pipeline runs the plain module: nothing cached"


@pytest.mark.parametrize("made", ["before", "after"])
def test_other_settings_on_a_shared_transformer_are_refused_saying_how_it_is_shared(made):
    from diffusers import FluxImg2ImgPipeline

    pipe = flux_pipeline()
    q = FluxImg2ImgPipeline(**pipe.components) if made == "before" else None
    backend = enabled(pipe, "fora", interval=3)
    q = q or FluxImg2ImgPipeline.from_pipe(pipe)
    how = "made from that pipeline's components before that call" if made == "before" else "made with from_pipe"
    for args, kwargs, wanted in ((("duca",), {}, "'duca'"), (("fora",), {"interval": 5}, "interval=5"),
                                 ((), {"max_branches": 7}, "max_branches=7")):
        with pytest.raises(ConfigError) as caught:
            fxcache.enable(q, *args, **kwargs)
        message = str(caught.value)
        assert how in message and "FluxPipeline" in message and wanted in message and "interval=3" in message
        assert "_fxcache" not in q.__dict__
    assert fxcache.enable(q, "fora", interval=3) is backend  # the settings it was compiled with: shared


# -- bad arguments and torch.compile's options -------------------------------------------------------------------

@pytest.mark.parametrize("bad,said", [(None, "got None"), ("FluxPipeline", "got a str"),
                                      (torch.nn.Linear(2, 2), "torch.compile(model, backend=fxcache.cache_backend")])
def test_enable_says_what_it_takes(bad, said):
    with pytest.raises(ConfigError, match="takes a diffusers pipeline") as caught:
        fxcache.enable(bad)
    assert said in str(caught.value)
    with pytest.raises(ConfigError, match="not enabled"):
        fxcache.disable(bad)


_SEEN_OPTIONS: list = []


@fxcache.register_lowering("test-enable-options")
def _recording_lowering(gm, example_inputs, *, mode=None, options=None):
    _SEEN_OPTIONS.append(options)
    return gm.forward


def test_enable_passes_torch_compiles_options_to_the_lowering():
    pipe = flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    _SEEN_OPTIONS.clear()
    backend = fxcache.enable(pipe, "fora", lowering="test-enable-options", options={"answer": 42}, interval=3)
    with torch.no_grad():
        flux_generate(pipe, steps=3)
    assert _SEEN_OPTIONS and all(o == {"answer": 42} for o in _SEEN_OPTIONS)  # one per variant lowered
    assert kinds(backend.stats()) == ["full", "reuse", "reuse"]


@pytest.mark.parametrize("kwargs,said", [
    (dict(options={"max_autotun": True}), "did you mean 'max_autotune'"),
    (dict(options=["max_autotune"]), "options must be a dict"),
    (dict(options={"max_autotune": True}, mode="max-autotune"), "either mode= or options="),
])
def test_bad_compile_options_are_refused_before_anything_is_compiled(kwargs, said):
    pipe = flux_pipeline()
    plain = pipe.transformer
    with pytest.raises(ConfigError, match=said):
        fxcache.enable(pipe, "duca", **kwargs)
    assert pipe.transformer is plain and "_fxcache" not in pipe.__dict__


def test_compile_options_given_to_cache_backend_point_to_torch_compile():
    with pytest.raises(fxcache.UnknownOptionError, match="torch.compile's, not a cache option"):
        fxcache.cache_backend("duca", options={"max_autotune": True})


# -- Dynamo's recompile limit --------------------------------------------------------------------------------------

def test_a_pipeline_caches_past_dynamos_default_recompile_limit():
    """Every resolution is a graph; Dynamo's default limit (8) would run the 9th in plain eager: enable raises
    it, in the threads that call the pipeline."""
    sizes = list(range(8, 26, 2))  # 9 resolutions
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        pipe = flux_pipeline()
        backend = enabled(pipe, "fora", interval=2)
        assert torch._dynamo.config.recompile_limit == fxcache.pipelines.DEFAULT_MAX_SHAPES
        with torch.no_grad():
            for size in sizes:
                flux_generate(pipe, steps=2, height=size, width=size, output_type="latent")
    assert len(backend.runners) == len(sizes)
    records = backend.stats()
    assert all(r["cached"] and r["graph"] >= 0 for r in records)
    assert kinds(records[-2:]) == ["full", "reuse"] and records[-1]["graph"] == len(sizes) - 1


def test_max_shapes_sets_the_limit_and_is_checked():
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        enabled(flux_pipeline(), "fora", max_shapes=20)
        assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit) == (20, 256)
    for bad in (0, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="max_shapes must be an int >= 1"):
            fxcache.enable(flux_pipeline(), "fora", max_shapes=bad)


# -- a schedule written for another step count ---------------------------------------------------------------------

def test_a_schedule_for_another_step_count_warns_before_the_first_step():
    pipe = flux_pipeline()
    backend = enabled(pipe, "fora", interval=3, schedule="countdown", num_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxCacheWarning)
        with torch.no_grad(), pytest.raises(FxCacheWarning, match="runs 4 sampling steps.*num_steps=8"):
            flux_generate(pipe, steps=4)
    assert backend.stats() == []  # said before any model call
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            flux_generate(pipe, steps=4)
            flux_generate(pipe, steps=8)
    assert not [w for w in caught if issubclass(w.category, FxCacheWarning)], "said once, not again at the end"


def test_a_matching_step_count_is_quiet():
    pipe = flux_pipeline()
    enabled(pipe, "fora", interval=3, schedule="countdown", num_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxCacheWarning)
        with torch.no_grad():
            flux_generate(pipe, steps=4)


# -- stats records -------------------------------------------------------------------------------------------------

def test_stats_records_print_short_and_keep_their_fields():
    pipe = flux_pipeline()
    backend = enabled(pipe, "fora", interval=3)
    with torch.no_grad():
        flux_generate(pipe, steps=4)
    last = fxcache.stats(pipe.transformer)[-3:]
    text = repr(last)
    assert len(text) < 400, text
    assert f"request {last[0]['request']} step 1 branch 0" in text and "reuse" in text and "t=0.5" in text
    assert set(last[0]) == {"graph", "call", "step", "branch", "kind", "plan", "tokens", "flops", "t", "cached",
                            "request", "cache_bytes"}
    assert isinstance(last[0], dict) and isinstance(last[0]["plan"], StepPlan) and last == backend.stats()[-3:]
    assert "StepPlan" not in text and "StepPlan" in repr(dict(last[0]))


def test_a_record_prints_flops_and_bytes_in_units_that_fit():
    from fxcache.runtime.records import Record

    big = repr(Record(request=1, step=2, branch=0, graph=0, kind="partial", tokens=1, flops=2.3e13, t=0.5,
                      cache_bytes=3 * 2**20))
    small = repr(Record(request=1, step=2, branch=0, graph=0, kind="reuse", tokens=0, flops=2.3e5, t=0.5,
                        cache_bytes=3000))
    assert "1 token," in big and "23 TFLOPs" in big and "3.0 MiB cached" in big, big
    assert "0 tokens" in small and "230 kFLOPs" in small and "2.9 KiB cached" in small, small
