"""fxcache on diffusers transformer classes beyond the four of `fxcache.testing` (DiT, PixArt, FLUX, SD3).

Tiny random-init configs (2 blocks, hidden 16-32, 16-54 tokens), eager lowering only. For the models cached in one
graph: the model-free invariant (a PARTIAL / REUSE / SKIP step on the input and t of the FULL step gives the FULL
output) at batch 1 and 2, and "step 0 equals the uncached model, later steps are cached". Lumina2, whose forward
graph-breaks, and every family's loop per method: tests/test_coverage.py. For QwenImage and
HunyuanDiT, whose blocks also hold modulation layers and a long-skip merge that must *not* be cached, REUSE steps are
compared with the hooked eager reference that caches only the attention / MLP outputs.
"""

from __future__ import annotations


import pytest
import torch

import fxcache
from fxcache.testing import HookedReference
from helpers import compile_cached, rel_err

from families import inputs, loop, make, off_size


#: analysis succeeds; the model-free invariant holds
CACHED = ["sana", "hunyuandit", "cogvideox", "wan", "qwenimage", "auraflow", "ltx", "hunyuanvideo", "cogview3plus",
          "chroma", "luminanext"]

# -- models fxcache caches --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CACHED)
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_steps_on_an_unchanged_input_reproduce_the_full_step(name, batch):
    """The model-free invariant of tests/test_end_to_end.py on each extra architecture (DuCa F P S at batch 1
    and 2, FORA F R R at batch 1; FORA at batch 2 was checked by hand, all exact). At batch 1 the DuCa graph
    then also runs a fresh generation with falling t (same graph, no retrace, to keep the file fast): step 0 equals
    the uncached model, the PARTIAL and SKIP steps do not (caching is active)."""
    model = make(name)
    kw = inputs(name, batch=batch, t=0.5)
    methods = [("duca", dict(interval=3, ratio=0.5), ["full", "partial", "skip"]),
               ("fora", dict(interval=3), ["full", "reuse", "reuse"])]
    if batch == 2:  # time budget: REUSE reads whole caches (no per-row gather), which batch 1 already covers
        methods = methods[:1]
    for method, opts, kinds in methods:
        compiled, backend = compile_cached(model, method, **opts)
        outs = []
        with torch.no_grad():
            for i in range(3):
                with fxcache.step(compiled, i):
                    outs.append(compiled(**kw)[0])
        assert [r["kind"] for r in fxcache.stats(compiled)] == kinds
        assert len(backend.runners) == 1 and backend.plans, "expected one cached graph"
        for o in outs[1:]:
            assert rel_err(o, outs[0]) <= 1e-5, (method, backend.plans[0].summary())
        if method == "duca" and batch == 1:
            _first_step_equals_uncached_and_later_steps_are_cached(name, model, compiled)
        torch._dynamo.reset()


def _first_step_equals_uncached_and_later_steps_are_cached(name, model, compiled):
    fxcache.reset(compiled)
    start = len(fxcache.stats(compiled))
    with torch.no_grad():
        pairs = [(compiled(**kw)[0], model(**kw)[0]) for kw in loop(name, [0.9, 0.8, 0.7])]
    assert [r["kind"] for r in fxcache.stats(compiled)[start:]] == ["full", "partial", "skip"]
    assert rel_err(*pairs[0]) <= 1e-6
    for s in (1, 2):
        assert rel_err(*pairs[s]) > 1e-4, f"step {s} equals the uncached model: caching is inactive"


# -- units are exactly the attention / MLP outputs: REUSE steps equal a reference caching only those ---------------------------------------------

def _spec_units(name: str, model) -> tuple[list[str], list[str], str]:
    """(attention-like units, token-wise units, last block) as the README defines units: attention and MLP outputs."""
    if name == "qwenimage":
        n, L = len(model.transformer_blocks), "transformer_blocks"
        return ([f"{L}.{i}.attn" for i in range(n)], [f"{L}.{i}.{c}" for i in range(n) for c in ("img_mlp", "txt_mlp")],
                f"{L}.{n - 1}")
    if name == "hunyuandit":
        n = len(model.blocks)
        return ([f"blocks.{i}.attn1" for i in range(n)], [f"blocks.{i}.{c}" for i in range(n) for c in ("attn2", "ff")],
                f"blocks.{n - 1}")
    raise ValueError(name)


# Regressions: QwenImage's img_mod / txt_mod (Sequential(SiLU, Linear) on temb: the modulation) were once taken
# for MLP units, so REUSE steps used the FULL step's gates (rel err 2.6e-2); HunyuanDiT's skip_linear (long-skip
# merge whose output *replaces* the residual stream) was once a partial MLP unit, so REUSE steps ignored the skip
# block's input (rel err 0.8). Units must now be (batch, tokens, ...) values added to the stream.
@pytest.mark.parametrize("name", ["qwenimage", "hunyuandit"])
def test_reuse_steps_equal_the_hooked_reference_caching_only_attention_and_mlp(name):
    """FORA F R R on fresh latents and falling t: each step equals the hooked eager reference that caches exactly
    the attention / MLP outputs (so gates and residual stream use the current input and timestep)."""
    model = make(name)
    compiled, backend = compile_cached(model, "fora", interval=3)
    kws = loop(name, [0.9, 0.8, 0.7], stride=100)
    with torch.no_grad():
        outs = [compiled(**kw)[0] for kw in kws]
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "reuse"]
    attention, token_wise, last = _spec_units(name, model)
    ref = HookedReference(make(name), backend.config, attention=attention, token_wise=token_wise, last_block=last)
    expected = [ref(s, 0, **kw)[0] for s, kw in enumerate(kws)]
    errs = [rel_err(o, e) for o, e in zip(outs, expected)]
    assert max(errs) <= 1e-5, f"rel errs per step {errs}; plan:\n{backend.plans[0].summary()}"


# -- FULL is the uncached model, at sizes other than the configs' -------------------------------------------------------

@pytest.mark.parametrize("name", CACHED)
def test_full_step_equals_the_uncached_model_at_another_size(name):
    """The FULL variant keeps every side effect and computation of the original graph (in-place writes too), so
    at a resolution other than the config's it is the uncached model (DuCa's FULL: unit and head caches exposed;
    TaylorSeer's FULL: Taylor factors updated in the graph)."""
    model = make(name)
    kw = off_size(name)
    with torch.no_grad():
        expected = model(**kw)[0]
    for method, opts in (("duca", dict(interval=3)), ("taylorseer", dict(interval=3, warmup_steps=1))):
        compiled, backend = compile_cached(model, method, **opts)
        with torch.no_grad():
            out = compiled(**kw)[0]
        assert [r["kind"] for r in fxcache.stats(compiled)] == ["full"] and backend.plans
        assert rel_err(out, expected) <= 1e-5, (method, name)
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["dit", "pixart", "flux", "sd3"])
def test_full_step_of_the_four_core_models_equals_the_uncached_model_at_another_size(name):
    from fxcache.testing import make_inputs, make_model

    model = make_model(name)
    kw = make_inputs(name, size=6)  # DiT / PixArt / SD3 configs are for 12x12 latents, FLUX for none
    with torch.no_grad():
        expected = model(**kw)[0]
    compiled, backend = compile_cached(model, "duca", interval=3)
    with torch.no_grad():
        out = compiled(**kw)[0]
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full"] and backend.plans
    assert rel_err(out, expected) <= 1e-5
