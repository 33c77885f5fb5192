"""Real diffusers pipelines with tiny random components (no hub): text encoders are replaced by fixed prompt
embeddings, VAEs are tiny or skipped with output_type="latent"."""

from __future__ import annotations

import torch

from fxcache.testing import make_model


def tiny_vae(latent_channels: int = 4, sample_size: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=sample_size, shift_factor=0.0,
                         scaling_factor=1.0).eval()


def dit_pipeline(scheduler=None):
    from diffusers import DDIMScheduler, DiTPipeline

    return DiTPipeline(transformer=make_model("dit"), vae=tiny_vae(sample_size=12),
                       scheduler=scheduler or DDIMScheduler())


def dit_generate(pipe, labels=(1, 7), steps: int = 6, seed: int = 0, guidance: float = 4.0):
    return pipe(class_labels=list(labels), num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=make_model("flux"))


def flux_prompt(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    return dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))


def flux_negative(seed: int = 0) -> dict:
    p = flux_prompt(seed + 500)
    return dict(negative_prompt_embeds=p["prompt_embeds"], negative_pooled_prompt_embeds=p["pooled_prompt_embeds"])


def flux_generate(pipe, *, steps: int = 6, seed: int = 0, prompt: int = 0, true_cfg: bool = False, **kw):
    args = dict(flux_prompt(prompt), height=16, width=16, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(seed))
    if true_cfg:
        args.update(flux_negative(prompt), true_cfg_scale=3.0)
    args.update(kw)
    return pipe(**args).images


def flux_img2img(pipe, image, *, steps: int = 6, strength: float = 0.2, seed: int = 1, prompt: int = 0):
    from diffusers import FluxImg2ImgPipeline

    i2i = FluxImg2ImgPipeline.from_pipe(pipe)
    return i2i(image=image, **flux_prompt(prompt), height=16, width=16, strength=strength, num_inference_steps=steps,
               output_type="np", generator=torch.Generator().manual_seed(seed)).images


def lumina_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    torch.manual_seed(0)
    transformer = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
                                       num_attention_heads=2, num_kv_heads=2, multiple_of=16, cross_attention_dim=32,
                                       learn_sigma=True, scaling_factor=1.0).eval()
    return LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
                          text_encoder=None, tokenizer=None)


def lumina_generate(pipe, *, steps: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(7)
    emb, neg = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    mask = torch.ones(1, 6, dtype=torch.long)
    return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, prompt_attention_mask=mask,
                negative_prompt_attention_mask=mask, height=16, width=16, num_inference_steps=steps,
                guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def wan_transformer(seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32).eval()


def wan22_pipeline():
    """Wan 2.2's two experts: `transformer` above the boundary timestep, `transformer_2` below it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=wan_transformer(0), transformer_2=wan_transformer(1), boundary_ratio=0.5)


def wan_generate(pipe, *, steps: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(11)
    return pipe(prompt_embeds=torch.randn(1, 6, 32, generator=g), negative_prompt_embeds=torch.randn(1, 6, 32, generator=g),
                height=16, width=16, num_frames=5, num_inference_steps=steps, guidance_scale=3.0,
                guidance_scale_2=2.0, output_type="latent", generator=torch.Generator().manual_seed(seed)).frames


def cogvideox_pipeline():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=2,
                                              sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=6).eval()
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def cogvideox_generate(pipe, *, steps: int = 5, seed: int = 0, height: int = 96, width: int = 96, frames: int = 9):
    g = torch.Generator().manual_seed(13)
    return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=3.0,
                output_type="latent", generator=torch.Generator().manual_seed(seed)).frames
