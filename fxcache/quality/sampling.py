"""Sampling loops for the reference models: diffusers' FlowMatchEulerDiscreteScheduler, classifier-free guidance
batched (one call with uncond + cond rows, in that order, as PixArt/SD3/DiT pipelines do) or sequential (two calls
per step)."""

from __future__ import annotations

from typing import Callable

import torch

from .files import save_image
from .reference import ReferenceModel


def _cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) if isinstance(a[k], torch.Tensor) else a[k] for k in a}


def sample(ref: ReferenceModel, model, labels: torch.Tensor, *, steps: int = 50, guidance: float = 2.0,
           seed: int = 0, cfg: str = "batched", noise: torch.Tensor | None = None,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """The sampler's output (B, *latent) -- images in about [-1, 1] for the digit references, latents for the
    text-to-image one (`ref.decode` makes images of them). `model` is the transformer or a compiled version."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if cfg not in ("batched", "sequential"):
        raise ValueError(f"cfg must be 'batched' or 'sequential', got {cfg!r}")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sigmas = ref.sigmas(steps)
    if sigmas is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(sigmas=sigmas)
    b = labels.shape[0]
    if noise is None:
        noise = torch.randn(ref.latent_shape(b), generator=torch.Generator().manual_seed(seed))
    x = noise.clone()
    with torch.no_grad():
        cond = ref.conditioner(labels)
        uncond = ref.conditioner(torch.full_like(labels, ref.null_label))
        both = _cat(uncond, cond)
        for i, t in enumerate(sched.timesteps):
            sigma = (t / 1000.0).reshape(1)
            if guidance == 1.0:
                v = ref.call(model, x, sigma, cond)
            elif cfg == "batched":
                v_u, v_c = ref.call(model, torch.cat([x, x]), sigma, both).chunk(2)
                v = v_u + guidance * (v_c - v_u)
            else:
                v_c = ref.call(model, x, sigma, cond)
                v_u = ref.call(model, x, sigma, uncond)
                v = v_u + guidance * (v_c - v_u)
            x = sched.step(v, t, x, return_dict=False)[0]
            if on_step is not None:
                on_step(i)
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, pad: int = 2) -> None:
    """Write (N, 1, H, W) images in [-1, 1] as one PNG grid."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 64, dtype=torch.uint8)
    pix = to_uint8(images)[:, 0]
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = pix[i]
    save_image(Image.fromarray(grid.numpy(), mode="L"), path)
