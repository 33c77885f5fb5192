"""Tiny random-init diffusers transformers (the four architectures fxcache is tested on) and their inputs.

Sizes are a parameter so tests can use two resolutions; `timestep` follows each model's convention
(FLUX takes t/1000, the others 0..1000).
"""

from __future__ import annotations

import torch

MODEL_NAMES = ("dit", "pixart", "flux", "sd3")


def make_model(name: str, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-init model in eval mode. `overrides` replace config fields (e.g. num_layers)."""
    from diffusers import (
        DiTTransformer2DModel,
        FluxTransformer2DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
    )

    torch.manual_seed(seed)
    if name == "flux":
        cfg = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                   axes_dims_rope=(4, 4, 8))
        cls = FluxTransformer2DModel
    elif name == "pixart":
        cfg = dict(sample_size=12, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
                   out_channels=8, cross_attention_dim=16, caption_channels=32, patch_size=2,
                   norm_type="ada_norm_single", use_additional_conditions=False)
        cls = PixArtTransformer2DModel
    elif name == "dit":
        cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=12, patch_size=2, num_embeds_ada_norm=1000)
        cls = DiTTransformer2DModel
    elif name == "sd3":
        cfg = dict(sample_size=12, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                   num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                   out_channels=4, pos_embed_max_size=16)
        cls = SD3Transformer2DModel
    else:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(MODEL_NAMES)}")
    cfg.update(overrides)
    return cls(**cfg).eval()


def flux_ids(height: int, width: int, text: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(height, width, 3)
    img[..., 1] = torch.arange(height)[:, None]
    img[..., 2] = torch.arange(width)[None, :]
    return img.reshape(height * width, 3), torch.zeros(text, 3)


def make_inputs(name: str, *, batch: int = 1, size: int = 8, t: float = 0.9, seed: int = 0,
                text: int | None = None) -> dict:
    """Keyword inputs for `make_model(name)`; `size` is the latent side (FLUX: tokens per side).

    `t` in (0, 1]: FLUX gets t, the others 1000 * t (their pipelines' conventions).
    """
    g = torch.Generator().manual_seed(seed)
    if name == "flux":
        text = text or 8
        img_ids, txt_ids = flux_ids(size, size, text)
        return dict(
            hidden_states=torch.randn(batch, size * size, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            pooled_projections=torch.randn(batch, 32, generator=g),
            timestep=torch.full((batch,), float(t)),
            img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
        )
    x = torch.randn(batch, 4, size, size, generator=g)
    if name == "pixart":
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, text or 6, 32, generator=g),
                    timestep=torch.full((batch,), 1000.0 * t), added_cond_kwargs={"resolution": None,
                    "aspect_ratio": None}, return_dict=False)
    if name == "dit":
        return dict(hidden_states=x, timestep=torch.full((batch,), int(1000 * t), dtype=torch.long),
                    class_labels=torch.arange(batch) % 10, return_dict=False)
    if name == "sd3":
        return dict(hidden_states=x, encoder_hidden_states=torch.randn(batch, text or 6, 32, generator=g),
                    pooled_projections=torch.randn(batch, 32, generator=g),
                    timestep=torch.full((batch,), 1000.0 * t), return_dict=False)
    raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(MODEL_NAMES)}")


def expected_units(name: str, model: torch.nn.Module) -> dict[str, list[str]]:
    """The units fxcache should find, written out by hand per architecture (the golden answer for analysis)."""
    n_double = len(model.transformer_blocks)
    attn, token = [], []
    if name == "dit":
        attn = [f"transformer_blocks.{i}.attn1" for i in range(n_double)]
        token = [f"transformer_blocks.{i}.ff" for i in range(n_double)]
    elif name == "pixart":
        attn = [f"transformer_blocks.{i}.attn1" for i in range(n_double)]
        token = [f"transformer_blocks.{i}.{c}" for i in range(n_double) for c in ("attn2", "ff")]
    elif name == "flux":
        n_single = len(model.single_transformer_blocks)
        attn = [f"transformer_blocks.{i}.attn" for i in range(n_double)]
        attn += [f"single_transformer_blocks.{i}.attn" for i in range(n_single)]
        token = [f"transformer_blocks.{i}.{c}" for i in range(n_double) for c in ("ff", "ff_context")]
        token += [f"single_transformer_blocks.{i}.proj_out" for i in range(n_single)]
    elif name == "sd3":
        attn = [f"transformer_blocks.{i}.attn" for i in range(n_double)]
        for i, blk in enumerate(model.transformer_blocks):
            token.append(f"transformer_blocks.{i}.ff")
            if getattr(blk, "ff_context", None) is not None:
                token.append(f"transformer_blocks.{i}.ff_context")
    else:
        raise ValueError(name)
    last = (f"single_transformer_blocks.{len(model.single_transformer_blocks) - 1}" if name == "flux"
            else f"transformer_blocks.{n_double - 1}")
    return {"attention": attn, "token_wise": token, "last_block": last}
