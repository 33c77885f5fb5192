"""Tiny random-init configs of diffusers transformer families and their inputs, at the config's size and at another
one (`off_size`), for tests/test_more_models.py and tests/test_coverage.py."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import diffusers as D


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


def off_size(name: str, batch: int = 1, t: float = 0.9, seed: int = 0) -> dict:
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


# -- video -------------------------------------------------------------------------------------------------------------

def _latte():
    return D.LatteTransformer3DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=2, caption_channels=32, in_channels=4, out_channels=4,
                                     cross_attention_dim=16, attention_bias=True, activation_fn="gelu-approximate",
                                     num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                     norm_elementwise_affine=False, norm_eps=1e-6, video_length=2)


def _latte_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), enable_temporal_attentions=True,
                return_dict=False)


def _latte_off(batch, t, seed):
    # the temporal position table is a fixed buffer of `video_length` frames: only the resolution can change
    return _latte_in(batch, t, seed, frames=2, side=12)


def _allegro():
    return D.AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8,
                                       sample_frames=8, caption_channels=32)


def _allegro_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                return_dict=False)


def _allegro_off(batch, t, seed):
    return _allegro_in(batch, t, seed, frames=3, side=12)


def _mochi():
    return D.MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                     pooled_projection_dim=16, in_channels=4, qk_norm="rms_norm", text_embed_dim=32,
                                     time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)


def _mochi_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool), return_dict=False)


def _mochi_off(batch, t, seed):
    return _mochi_in(batch, t, seed, frames=3, side=12)


def _easyanimate():
    return D.EasyAnimateTransformer3DModel(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2,
                                           num_layers=2, out_channels=4, patch_size=2, sample_height=8,
                                           sample_width=8, text_embed_dim=32, time_embed_dim=16,
                                           time_position_encoding_type="3d_rope", timestep_activation_fn="silu")


def _easyanimate_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _easyanimate_off(batch, t, seed):
    return _easyanimate_in(batch, t, seed, frames=3, side=12)


def _skyreelsv2():
    return D.SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                          num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=32)


def _skyreelsv2_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _skyreelsv2_off(batch, t, seed):
    return _skyreelsv2_in(batch, t, seed, frames=3, side=12)


def _sanavideo():
    return D.SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=8,
                                         patch_size=(1, 2, 2), norm_elementwise_affine=False, norm_eps=1e-6,
                                         qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _sanavideo_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                return_dict=False)


def _sanavideo_off(batch, t, seed):
    return _sanavideo_in(batch, t, seed, frames=3, side=12)


def _cosmos():
    return D.CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                      num_layers=2, mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4,
                                      max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
                                      concat_padding_mask=False, extra_pos_embed_type="learnable")


def _cosmos_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                attention_mask=torch.ones(batch, 6), fps=30, return_dict=False)


def _cosmos_off(batch, t, seed):
    return _cosmos_in(batch, t, seed, frames=3, side=12)


def _consisid():
    # LFE_output_dim must be 2/3 of the inner dim (the perceiver cross-attention's kv dim)
    return D.ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=6, cross_attn_interval=1, is_kps=False, is_train_face=True,
                                        cross_attn_dim_head=8, cross_attn_num_heads=1, LFE_id_dim=2, LFE_vit_dim=2,
                                        LFE_depth=5, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=1,
                                        LFE_num_querie=1, LFE_output_dim=10, LFE_ff_mult=1, LFE_num_scale=1)


def _consisid_in(batch, t, seed, frames=3, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, frames, 4, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                timestep=_t(batch, int(1000 * t), torch.long), id_vit_hidden=[torch.randn(batch, 2, 2, generator=g)],
                id_cond=torch.randn(batch, 2, generator=g), return_dict=False)


def _consisid_off(batch, t, seed):
    return _consisid_in(batch, t, seed, frames=2, side=12)


def _wanvace():
    return D.WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                       out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                       rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8)


def _wanvace_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                control_hidden_states=torch.randn(batch, 8, frames, side, side, generator=g), return_dict=False)


def _wanvace_off(batch, t, seed):
    return _wanvace_in(batch, t, seed, frames=3, side=12)


def _chronoedit():
    return D.ChronoEditTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=64, rope_temporal_skip_len=8)


def _chronoedit_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _chronoedit_off(batch, t, seed):
    return _chronoedit_in(batch, t, seed, frames=3, side=12)


def _framepack():
    return D.HunyuanVideoFramepackTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                     attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                     num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                                     guidance_embeds=True, text_embed_dim=16,
                                                     pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
                                                     image_condition_type=None, has_image_proj=True,
                                                     image_proj_dim=16, has_clean_x_embedder=True)


def _framepack_in(batch, t, seed, frames=2, side=8):
    """FramePack's section inputs: the noisy section plus clean / 2x / 4x history latents with their frame indices."""
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                encoder_attention_mask=torch.ones(batch, 6), pooled_projections=torch.randn(batch, 8, generator=g),
                image_embeds=torch.randn(batch, 4, 16, generator=g), guidance=_t(batch, 6000.0),
                indices_latents=torch.arange(1, 1 + frames),
                latents_clean=torch.randn(batch, 4, 2, side, side, generator=g),
                indices_latents_clean=torch.tensor([0, 1 + frames]),
                latents_history_2x=torch.randn(batch, 4, 2, side, side, generator=g),
                indices_latents_history_2x=torch.tensor([2 + frames, 3 + frames]),
                latents_history_4x=torch.randn(batch, 4, 4, side, side, generator=g),
                indices_latents_history_4x=torch.arange(4 + frames, 8 + frames),
                return_dict=False)


def _framepack_off(batch, t, seed):
    return _framepack_in(batch, t, seed, frames=3, side=12)


def _hunyuanvideo15():
    return D.HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                              num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                              patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
                                              image_embed_dim=8, rope_axes_dim=(2, 2, 4), target_size=16,
                                              task_type="t2v")


def _hunyuanvideo15_in(batch, t, seed, frames=2, side=4):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                encoder_attention_mask=torch.ones(batch, 6),
                encoder_hidden_states_2=torch.randn(batch, 4, 8, generator=g),
                encoder_attention_mask_2=torch.ones(batch, 4), image_embeds=torch.zeros(batch, 3, 8),
                return_dict=False)


def _hunyuanvideo15_off(batch, t, seed):
    return _hunyuanvideo15_in(batch, t, seed, frames=3, side=6)


def _helios():
    return D.HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True,
                                      zero_history_timestep=True, is_amplify_history=False)


def _helios_in(batch, t, seed, frames=2, side=8):
    """The noisy chunk plus short / mid / long history latents with their frame indices."""
    g = _g(seed)
    idx = lambda a, b: torch.arange(a, b).float().expand(batch, -1)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                indices_hidden_states=idx(6, 6 + frames),
                indices_latents_history_short=idx(5, 6), indices_latents_history_mid=idx(4, 5),
                indices_latents_history_long=idx(0, 4),
                latents_history_short=torch.randn(batch, 4, 1, side, side, generator=g),
                latents_history_mid=torch.randn(batch, 4, 1, side, side, generator=g),
                latents_history_long=torch.randn(batch, 4, 4, side, side, generator=g), return_dict=False)


def _helios_off(batch, t, seed):
    return _helios_in(batch, t, seed, frames=3, side=12)


def _motifvideo():
    return D.MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                          num_layers=1, num_single_layers=1, num_decoder_layers=0, mlp_ratio=2.0,
                                          patch_size=2, patch_size_t=1, qk_norm="rms_norm", norm_type="layer_norm",
                                          text_embed_dim=32, image_embed_dim=None, rope_theta=256.0,
                                          rope_axes_dim=(4, 4, 4))


def _motifvideo_in(batch, t, seed, frames=2, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _motifvideo_off(batch, t, seed):
    return _motifvideo_in(batch, t, seed, frames=3, side=12)


def _ltx2():
    return D.LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                         num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                         audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                         audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                                         qk_norm="rms_norm_across_heads", caption_channels=16,
                                         rope_double_precision=False)


def _ltx2_in(batch, t, seed, frames=2, side=4):
    """Joint audio-video: video tokens (frames * side * side, 4) and 9 audio frames; output 0 is the video."""
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, frames * side * side, 4, generator=g),
                audio_hidden_states=torch.randn(batch, 9, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
                audio_encoder_hidden_states=torch.randn(batch, 6, 16, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool), num_frames=frames, height=side,
                width=side, audio_num_frames=9, fps=25.0, return_dict=False)


def _ltx2_off(batch, t, seed):
    return _ltx2_in(batch, t, seed, frames=3, side=6)


def _kandinsky5():
    # its modulation layers are zero-initialised (adaLN-zero): at random init the output ignores the timestep, so
    # they get small random weights
    model = D.Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=16,
                                          out_visual_dim=4, patch_size=(1, 2, 2), model_dim=16, ff_dim=32,
                                          num_text_blocks=1, num_visual_blocks=2, axes_dims=(1, 1, 2),
                                          visual_cond=False, attention_type="regular")
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Kandinsky5Modulation":
                m.out_layer.weight.normal_(0.0, 0.2)
                m.out_layer.bias.normal_(0.0, 0.2)
    return model


def _kandinsky5_in(batch, t, seed, frames=2, side=8):
    """Channels-last latents (B, F, H, W, C); rope positions per axis of the patch grid, as the pipeline builds them.
    With return_dict=False Kandinsky5 returns the bare tensor (not a tuple), so `out[0]` would be sample 0: use
    return_dict=True, whose output's [0] is the sample."""
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, frames, side, side, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                pooled_projections=torch.randn(batch, 16, generator=g),
                visual_rope_pos=[torch.arange(frames), torch.arange(side // 2), torch.arange(side // 2)],
                text_rope_pos=torch.arange(6), scale_factor=(1.0, 1.0, 1.0), sparse_params=None, return_dict=True)


def _kandinsky5_off(batch, t, seed):
    return _kandinsky5_in(batch, t, seed, frames=3, side=12)


# -- image -------------------------------------------------------------------------------------------------------------

def _cogview4():
    return D.CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, out_channels=4, text_embed_dim=32, time_embed_dim=16,
                                        condition_dim=4, pos_embed_max_size=16, sample_size=8, rope_axes_dim=(16, 16))


def _cogview4_in(batch, t, seed, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, side, side, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                original_size=torch.tensor([[8.0 * side, 8.0 * side]] * batch),
                target_size=torch.tensor([[8.0 * side, 8.0 * side]] * batch),
                crop_coords=torch.tensor([[0.0, 0.0]] * batch), return_dict=False)


def _cogview4_off(batch, t, seed):
    return _cogview4_in(batch, t, seed, side=12)


def _flux2_ids(height, width, text):
    img = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text))
    return img, txt


def _flux2():
    return D.Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))


def _flux2_in(batch, t, seed, side=4):
    g = _g(seed)
    img_ids, txt_ids = _flux2_ids(side, side, 6)
    return dict(hidden_states=torch.randn(batch, side * side, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, t),
                img_ids=img_ids.expand(batch, -1, -1), txt_ids=txt_ids.expand(batch, -1, -1),
                guidance=_t(batch, 4.0), return_dict=False)


def _flux2_off(batch, t, seed):
    return _flux2_in(batch, t, seed, side=6)


def _zimage():
    return D.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                      n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
                                      rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32])


def _zimage_in(batch, t, seed, side=8):
    """Z-Image takes per-sample lists ((C, 1, H, W) latents, (L, D) captions; output: a list) and t = 1 - sigma."""
    g = _g(seed)
    return dict(x=[torch.randn(4, 1, side, side, generator=g) for _ in range(batch)],
                cap_feats=[torch.randn(6, 32, generator=g) for _ in range(batch)], t=_t(batch, 1.0 - t),
                return_dict=False)


def _zimage_off(batch, t, seed):
    return _zimage_in(batch, t, seed, side=12)


def _omnigen():
    return D.OmniGenTransformer2DModel(hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                                       intermediate_size=32, num_layers=2, pad_token_id=0, vocab_size=64,
                                       in_channels=4, time_step_dim=16, pos_embed_max_size=16,
                                       rope_scaling={"long_factor": list(range(1, 9)),
                                                     "short_factor": list(range(1, 9))})


def _omnigen_in(batch, t, seed, side=8):
    """Text-only conditioning (6 prompt tokens) + the time token + the image tokens, full attention.
    OmniGen's scheduler inverts sigmas: the timestep is 1 - t."""
    g = _g(seed)
    seq = 6 + 1 + (side // 2) ** 2
    return dict(hidden_states=torch.randn(batch, 4, side, side, generator=g), timestep=_t(batch, 1.0 - t),
                input_ids=torch.randint(1, 64, (batch, 6), generator=g), input_img_latents=[],
                input_image_sizes={}, attention_mask=torch.ones(batch, seq, seq),
                position_ids=torch.arange(seq).expand(batch, -1), return_dict=False)


def _omnigen_off(batch, t, seed):
    return _omnigen_in(batch, t, seed, side=12)


def _hidream():
    return D.HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                            num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                                            caption_channels=[32, 16], text_emb_dim=16, num_routed_experts=2,
                                            num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
                                            llama_layers=(0, 1, 0, 1), force_inference_output=True)


def _hidream_in(batch, t, seed, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, side, side, generator=g), timesteps=_t(batch, 1000.0 * t),
                encoder_hidden_states_t5=torch.randn(batch, 6, 32, generator=g),
                encoder_hidden_states_llama3=torch.randn(2, batch, 6, 16, generator=g),
                pooled_embeds=torch.randn(batch, 16, generator=g), return_dict=False)


def _hidream_off(batch, t, seed):
    return _hidream_in(batch, t, seed, side=12)


def _bria():
    return D.BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=None, axes_dims_rope=[0, 4, 4])


def _bria_in(batch, t, seed, side=4):
    from fxcache.testing.models import flux_ids

    g = _g(seed)
    img_ids, txt_ids = flux_ids(side, side, 6)
    return dict(hidden_states=torch.randn(batch, side * side, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, 1000.0 * t),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def _bria_off(batch, t, seed):
    return _bria_in(batch, t, seed, side=6)


def _longcat():
    return D.LongCatImageTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def _flux_like_in(batch, t, seed, side=4):
    """FLUX-style inputs: (B, side^2, 16) packed latents, 6 text tokens of 32 channels, t in [0, 1], 3-axis ids."""
    from fxcache.testing.models import flux_ids

    g = _g(seed)
    img_ids, txt_ids = flux_ids(side, side, 6)
    return dict(hidden_states=torch.randn(batch, side * side, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), timestep=_t(batch, t),
                img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def _flux_like_off(batch, t, seed):
    return _flux_like_in(batch, t, seed, side=6)


_longcat_in, _longcat_off = _flux_like_in, _flux_like_off


def _ovis():
    return D.OvisImageTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, axes_dims_rope=(4, 4, 8))


_ovis_in, _ovis_off = _flux_like_in, _flux_like_off


def _prx():
    model = D.PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=2.0,
                                    num_heads=2, depth=2, axes_dim=[8, 8], theta=10_000)
    # its modulation starts at zero (every gate 0: the blocks would not change the stream); small random weights
    # instead, as after training
    with torch.no_grad():
        for block in model.blocks:
            block.modulation.lin.weight.normal_(0.0, 0.2)
            block.modulation.lin.bias.normal_(0.0, 0.2)
    return model


def _prx_in(batch, t, seed, side=8):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, side, side, generator=g), timestep=_t(batch, t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g), return_dict=False)


def _prx_off(batch, t, seed):
    return _prx_in(batch, t, seed, side=12)


def _hunyuanimage():
    return D.HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                            num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
                                            guidance_embeds=False, text_embed_dim=32, text_embed_2_dim=32,
                                            rope_axes_dim=(4, 4))


def _hunyuanimage_in(batch, t, seed, side=6):
    g = _g(seed)
    return dict(hidden_states=torch.randn(batch, 4, side, side, generator=g), timestep=_t(batch, 1000.0 * t),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                encoder_attention_mask=torch.ones(batch, 6),
                encoder_hidden_states_2=torch.randn(batch, 4, 32, generator=g),
                encoder_attention_mask_2=torch.ones(batch, 4), return_dict=False)


def _hunyuanimage_off(batch, t, seed):
    return _hunyuanimage_in(batch, t, seed, side=8)


# -- every family, in one registry -------------------------------------------------------------------------------------

NEW = {
    "latte": (_latte, _latte_in, _latte_off),
    "allegro": (_allegro, _allegro_in, _allegro_off),
    "mochi": (_mochi, _mochi_in, _mochi_off),
    "easyanimate": (_easyanimate, _easyanimate_in, _easyanimate_off),
    "skyreelsv2": (_skyreelsv2, _skyreelsv2_in, _skyreelsv2_off),
    "sanavideo": (_sanavideo, _sanavideo_in, _sanavideo_off),
    "cosmos": (_cosmos, _cosmos_in, _cosmos_off),
    "consisid": (_consisid, _consisid_in, _consisid_off),
    "cogview4": (_cogview4, _cogview4_in, _cogview4_off),
    "flux2": (_flux2, _flux2_in, _flux2_off),
    "wanvace": (_wanvace, _wanvace_in, _wanvace_off),
    "chronoedit": (_chronoedit, _chronoedit_in, _chronoedit_off),
    "framepack": (_framepack, _framepack_in, _framepack_off),
    "zimage": (_zimage, _zimage_in, _zimage_off),
    "omnigen": (_omnigen, _omnigen_in, _omnigen_off),
    "hidream": (_hidream, _hidream_in, _hidream_off),
    "bria": (_bria, _bria_in, _bria_off),
    "longcat": (_longcat, _longcat_in, _longcat_off),
    "ovis": (_ovis, _ovis_in, _ovis_off),
    "prx": (_prx, _prx_in, _prx_off),
    "hunyuanvideo15": (_hunyuanvideo15, _hunyuanvideo15_in, _hunyuanvideo15_off),
    "helios": (_helios, _helios_in, _helios_off),
    "motifvideo": (_motifvideo, _motifvideo_in, _motifvideo_off),
    "ltx2": (_ltx2, _ltx2_in, _ltx2_off),
    "kandinsky5": (_kandinsky5, _kandinsky5_in, _kandinsky5_off),
    "hunyuanimage": (_hunyuanimage, _hunyuanimage_in, _hunyuanimage_off),
}

VIDEO = {"cogvideox", "wan", "ltx", "hunyuanvideo", "latte", "allegro", "mochi", "easyanimate", "skyreelsv2",
         "sanavideo", "cosmos", "consisid", "wanvace", "chronoedit", "framepack", "hunyuanvideo15", "helios",
         "motifvideo", "ltx2", "kandinsky5"}


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model of one diffusers transformer class: `inputs(batch, t, seed)` at the config's size, `off(...)` at
    another one; `latent`: the argument a sampler updates every step."""

    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[int, float, int], dict]
    off: Callable[[int, float, int], dict]
    latent: str = "hidden_states"

    @property
    def kind(self) -> str:
        return "video" if self.name in VIDEO else "image"

    def model(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.make().eval()


def _core(name: str) -> Family:
    from fxcache.testing import make_inputs, make_model

    return Family(name, lambda: make_model(name), lambda b, t, s: make_inputs(name, batch=b, t=t, seed=s),
                  lambda b, t, s: make_inputs(name, batch=b, t=t, seed=s, size=6))


FAMILIES: dict[str, Family] = {name: _core(name) for name in ("dit", "pixart", "flux", "sd3")}
FAMILIES.update({name: Family(name, f, i, lambda b, t, s, name=name: off_size(name, b, t, s))
                 for name, (f, i) in FACTORIES.items()})
FAMILIES.update({name: Family(name, f, i, o, latent="x" if name == "zimage" else "hidden_states")
                 for name, (f, i, o) in NEW.items()})


def sample(out) -> torch.Tensor:
    """The model's sample from its output: the first output, batched (Z-Image returns a list per sample)."""
    first = out[0]
    if isinstance(first, (list, tuple)):
        return torch.stack(list(first))
    return first
