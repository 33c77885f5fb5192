"""fxcache on diffusers transformer classes beyond the four of `fxcache.testing` (DiT, PixArt, FLUX, SD3).

Tiny random-init configs (2 blocks, hidden 16-32, 16-54 tokens), eager lowering only. For the models the analysis
accepts: the model-free invariant (a PARTIAL / REUSE / SKIP step on the input and t of the FULL step gives the FULL
output) at batch 1 and 2, and "step 0 equals the uncached model, later steps are cached". For the models it does
not accept: a clean fallback (one FxCacheWarning per graph, output exactly the uncached model's). For QwenImage and
HunyuanDiT, whose blocks also hold modulation layers and a long-skip merge that must *not* be cached, REUSE steps are
compared with the hooked eager reference that caches only the attention / MLP outputs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxcache
from fxcache import UnsupportedGraphError
from fxcache import FxCacheWarning
from fxcache.testing import HookedReference
from helpers import compile_cached, rel_err

D = pytest.importorskip("diffusers")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(batch: int, value: float, dtype=torch.float32) -> torch.Tensor:
    return torch.full((batch,), value, dtype=dtype)


# -- tiny configs: (model factory, input factory(batch, t in (0, 1], seed)) ------------------------------------------

def _sana():
    return D.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                    num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                    cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=1)


def _sana_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                return_dict=False)


def _hunyuandit():
    # 4 layers so that block 3 has the long skip (skip_norm + skip_linear) of HunyuanDiT's U-shaped stack
    return D.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                               sample_size=8, hidden_size=16, num_layers=4, cross_attention_dim=32,
                               cross_attention_dim_t5=32, pooled_projection_dim=16, text_len=6, text_len_t5=6)


def _hunyuandit_in(batch, t, seed):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                text_embedding_mask=torch.ones(batch, 6, dtype=torch.long),
                encoder_hidden_states_t5=torch.randn(batch, 6, 32, generator=g),
                text_embedding_mask_t5=torch.ones(batch, 6, dtype=torch.long),
                image_meta_size=torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]] * batch),
                style=torch.zeros(batch, dtype=torch.long),
                image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4)), return_dict=False)


def _cogvideox():
    return D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                         time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                         sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                         max_text_seq_length=6)


def _cogvideox_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 3, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                timestep=_t(batch, int(1000 * t), torch.long), return_dict=False)


def _wan():
    return D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                   out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                   rope_max_seq_len=32)


def _wan_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _qwenimage():
    return D.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         axes_dims_rope=(4, 6, 6))


def _qwenimage_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                encoder_hidden_states_mask=torch.ones(batch, 6, dtype=torch.long), timestep=_t(batch, t),
                img_shapes=[(1, 4, 4)] * batch, return_dict=False)


def _auraflow():
    return D.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                        num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
                                        pos_embed_max_size=64)


def _auraflow_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                return_dict=False)


def _ltx():
    return D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                        num_layers=2, caption_channels=32)


def _ltx_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 2 * 4 * 4, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.long), num_frames=2, height=4, width=4,
                return_dict=False)


def _hunyuanvideo():
    return D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                            patch_size_t=1, guidance_embeds=False, text_embed_dim=16,
                                            pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def _hunyuanvideo_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 1, 4, 4, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.long),
                pooled_projections=torch.randn(batch, 8, generator=g), return_dict=False)


def _cogview3plus():
    return D.CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                            num_attention_heads=2, out_channels=4, text_embed_dim=16,
                                            time_embed_dim=16, condition_dim=4, pos_embed_max_size=8, sample_size=8)


def _cogview3plus_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g), timestep=_t(batch, 1000.0 * t),
                original_size=torch.tensor([[64.0, 64.0]] * batch), target_size=torch.tensor([[64.0, 64.0]] * batch),
                crop_coords=torch.tensor([[0.0, 0.0]] * batch), return_dict=False)


def _chroma():
    return D.ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
                                      approximator_hidden_dim=32, approximator_layers=1)


def _chroma_in(batch, t, seed):
    from fxcache.testing.models import flux_ids

    g = _g(seed)
    img_ids, txt_ids = flux_ids(4, 4, 6)
    return dict(hidden_states=torch.randn(batch, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, t),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def _lumina2():
    return D.Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
                                       num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16,
                                       axes_dim_rope=(4, 2, 2), axes_lens=(32, 32, 32), cap_feat_dim=32)


def _lumina2_in(batch, t, seed):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=_t(batch, t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool), return_dict=False)


def _luminanext():
    return D.LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
                                  num_attention_heads=2, num_kv_heads=2, multiple_of=16, cross_attention_dim=32,
                                  learn_sigma=False)


def _luminanext_in(batch, t, seed):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=_t(batch, t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                encoder_mask=torch.ones(batch, 6, dtype=torch.long),
                image_rotary_emb=get_2d_rotary_pos_embed_lumina(8, 16, 16), cross_attention_kwargs={},
                return_dict=False)


FACTORIES = {
    "sana": (_sana, _sana_in),
    "hunyuandit": (_hunyuandit, _hunyuandit_in),
    "cogvideox": (_cogvideox, _cogvideox_in),
    "wan": (_wan, _wan_in),
    "qwenimage": (_qwenimage, _qwenimage_in),
    "auraflow": (_auraflow, _auraflow_in),
    "ltx": (_ltx, _ltx_in),
    "hunyuanvideo": (_hunyuanvideo, _hunyuanvideo_in),
    "cogview3plus": (_cogview3plus, _cogview3plus_in),
    "chroma": (_chroma, _chroma_in),
    "lumina2": (_lumina2, _lumina2_in),
    "luminanext": (_luminanext, _luminanext_in),
}

#: analysis succeeds; the model-free invariant holds
CACHED = ["sana", "hunyuandit", "cogvideox", "wan", "qwenimage", "auraflow", "ltx", "hunyuanvideo", "cogview3plus",
          "chroma", "luminanext"]

#: fxcache refuses the graph(s) and runs uncached; the reason fxcache gives, as a substring of its warning
FALLBACK = {
    # Lumina2's forward calls .item()/.tolist() on the attention mask (per-sample caption lengths): Dynamo breaks
    # the graph 3 times; the 3 graphs holding `layers.*` do not see the raw timestep (it only reaches the first,
    # where the time embedding runs), and the refiner graphs hold no block list at all.
    "lumina2": ("no transformer blocks found", "no timestep input found"),
}


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FACTORIES[name][0]().eval()


def inputs(name: str, *, batch: int = 1, t: float = 0.9, seed: int = 0) -> dict:
    return FACTORIES[name][1](batch, t, seed)


def loop(name: str, ts: list[float], stride: int = 1) -> list[dict]:
    """One request: the conditioning of seed 0 throughout, fresh latents at every step."""
    out = []
    for s, t in enumerate(ts):
        kw = inputs(name, t=t)
        kw["hidden_states"] = inputs(name, t=t, seed=stride * s)["hidden_states"]
        out.append(kw)
    return out


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


# -- models fxcache refuses: clean fallback ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_unsupported_model_falls_back_cleanly(name):
    model = make(name)
    compiled, backend = compile_cached(model, "duca", strict=False, interval=3, ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            pairs = [(compiled(**kw)[0], model(**kw)[0])
                     for kw in (inputs(name, t=t, seed=s) for s, t in enumerate([0.9, 0.8, 0.7]))]
    messages = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    assert messages, "no FxCacheWarning"
    assert len(messages) == len(set(messages)) == len(backend.runners), messages  # once per graph, not per call
    assert all(any(reason in m for reason in FALLBACK[name]) for m in messages), messages
    assert not backend.plans  # every graph runs uncached
    for out, ref in pairs:
        assert torch.equal(out, ref)

    torch._dynamo.reset()
    strict, _ = compile_cached(make(name), "duca", strict=True, interval=3, ratio=0.5)
    with pytest.raises(UnsupportedGraphError, match="|".join(FALLBACK[name])), torch.no_grad():
        strict(**inputs(name))


# -- FULL is the uncached model, at sizes other than the configs' -------------------------------------------------------

def _off_size(name: str, batch: int = 1, t: float = 0.9, seed: int = 0) -> dict:
    """Inputs of another resolution (and frame count) than the config's sample size: positional tables built for
    the sample size are then recomputed in the graph (CogVideoX fills one in place)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed, get_2d_rotary_pos_embed_lumina

    from fxcache.testing.models import flux_ids

    g = _g(seed)
    kw = inputs(name, batch=batch, t=t, seed=seed)
    if name in ("sana", "auraflow", "cogview3plus", "luminanext"):
        side = 6 if name == "sana" else 12
        kw["hidden_states"] = torch.randn(batch, 4, side, side, generator=g)
    elif name == "hunyuandit":
        kw["hidden_states"] = torch.randn(batch, 4, 12, 12, generator=g)
        kw["image_rotary_emb"] = get_2d_rotary_pos_embed(8, ((0, 0), (6, 6)), (6, 6))
    elif name == "cogvideox":
        kw["hidden_states"] = torch.randn(batch, 2, 4, 12, 12, generator=g)
    elif name == "wan":
        kw["hidden_states"] = torch.randn(batch, 4, 3, 12, 12, generator=g)
    elif name == "qwenimage":
        kw["hidden_states"] = torch.randn(batch, 36, 16, generator=g)
        kw["img_shapes"] = [(1, 6, 6)] * batch
    elif name == "ltx":
        kw.update(hidden_states=torch.randn(batch, 3 * 6 * 6, 8, generator=g), num_frames=3, height=6, width=6)
    elif name == "hunyuanvideo":
        kw["hidden_states"] = torch.randn(batch, 4, 2, 6, 6, generator=g)
    elif name == "chroma":
        kw["hidden_states"] = torch.randn(batch, 36, 16, generator=g)
        kw["img_ids"], kw["txt_ids"] = flux_ids(6, 6, 6)
    if name == "luminanext":
        kw["image_rotary_emb"] = get_2d_rotary_pos_embed_lumina(8, 16, 16)
    return kw


@pytest.mark.parametrize("name", CACHED)
def test_full_step_equals_the_uncached_model_at_another_size(name):
    """The FULL variant keeps every side effect and computation of the original graph (in-place writes too), so
    at a resolution other than the config's it is the uncached model (DuCa's FULL: unit and head caches exposed;
    TaylorSeer's FULL: Taylor factors updated in the graph)."""
    model = make(name)
    kw = _off_size(name)
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
