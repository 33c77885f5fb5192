"""Training of the text-to-image reference (`t2i`): the autoencoder first, then the transformer with both text
encoders (rectified flow, caption dropout for CFG, EMA weights). Resumable: the state is saved every
`save_every` steps to <out>/train_state.pt and a rerun with the same folder continues from it."""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import scenes, t2i
from .files import replacing, write_json


def train_vae(vae, images: torch.Tensor, *, steps: int, batch: int = 32, lr: float = 3e-3, kl: float = 1e-6,
              seed: int = 0, log: Callable[[str], None] = print) -> list[tuple[int, float]]:
    """Reconstruction (MSE on the posterior mean's decoding) plus a small KL term; then sets the config's
    shift and scaling factors so the latents the transformer sees have zero mean and unit variance."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    vae.train()
    curve, running = [], 0.0
    for step in range(steps):
        x = images[torch.randint(0, images.shape[0], (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        loss = F.mse_loss(rec, x) + kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 100 == 0:
            curve.append((step + 1, running / 100))
            log(f"vae step {step + 1}/{steps}: loss {running / 100:.5f}")
            running = 0.0
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, min(4096, len(images)), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return curve


def _parameters(c: dict) -> list[torch.nn.Parameter]:
    return [p for k in ("transformer", "text_encoder", "text_encoder_2") for p in c[k].parameters()]


def train_scenes(out: str, *, steps: int, vae_steps: int = 1500, batch: int = 32, lr: float = 5e-4,
                 warmup: int = 200, ema: float = 0.999, caption_dropout: float = 0.1, data: int = 30000,
                 seed: int = 0, save_every: int = 100, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) the reference in `out`; returns the EMA components. The loss curve goes to
    <out>/curve.json ([step, loss] pairs, 100-step means)."""
    from diffusers import FluxPipeline

    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "train_state.pt")
    comps = t2i.build_components(seed)
    pipe = t2i.make_pipeline(comps)
    images, picked = scenes.dataset(data, seed)
    captions = [s.caption() for s in scenes.all_scenes()] + [""]  # the last one: the empty (CFG) prompt
    index = {c: i for i, c in enumerate(captions)}
    labels = torch.tensor([index[s.caption()] for s in picked])
    clip_ids, t5_ids = t2i.token_ids(pipe, captions)
    state = torch.load(state_path, weights_only=False) if os.path.exists(state_path) else None
    if state is None:
        log(f"training the autoencoder ({vae_steps} steps)")
        vae_curve = train_vae(comps["vae"], images, steps=vae_steps, seed=seed, log=log)
    else:
        comps["vae"].load_state_dict(state["vae"])
        comps["vae"].register_to_config(**state["vae_factors"])
        vae_curve = state["vae_curve"]
    vae = comps["vae"].eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([t2i.to_latents(pipe, images[i:i + 512]) for i in range(0, len(images), 512)])
    side = scenes.SIZE // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(None, side, side, "cpu", torch.float32)
    txt_ids = torch.zeros(t2i.TEXT_TOKENS, 3)
    params = _parameters(comps)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema_comps = {k: copy.deepcopy(comps[k]) for k in ("transformer", "text_encoder", "text_encoder_2")}
    g = torch.Generator().manual_seed(seed + 1)
    start, curve, elapsed = 0, [], 0.0
    if state is not None:
        for k in ema_comps:
            comps[k].load_state_dict(state["model"][k])
            ema_comps[k].load_state_dict(state["ema"][k])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        start, curve, elapsed = state["step"], state["curve"], state["seconds"]
        log(f"resumed at step {start}/{steps} ({elapsed:.0f} s of training so far)")
    for k in ema_comps:
        comps[k].train()
    t0, running = time.perf_counter() - elapsed, 0.0

    def save_state(step):
        with replacing(state_path) as f:
            torch.save(dict(step=step, curve=curve, seconds=time.perf_counter() - t0, rng=g.get_state(),
                            model={k: comps[k].state_dict() for k in ema_comps},
                            ema={k: ema_comps[k].state_dict() for k in ema_comps},
                            opt=opt.state_dict(), sched=sched.state_dict(), vae=vae.state_dict(),
                            vae_curve=vae_curve, vae_factors=dict(shift_factor=vae.config.shift_factor,
                                                                  scaling_factor=vae.config.scaling_factor)), f)

    for step in range(start, steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, y = latents[idx], labels[idx].clone()
        y[torch.rand(batch, generator=g) < caption_dropout] = len(captions) - 1
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal: more weight mid-trajectory
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        prompt_embeds, pooled = t2i.encode(pipe, clip_ids[y], t5_ids[y])
        v = comps["transformer"](hidden_states=xt, timestep=t, pooled_projections=pooled,
                                 encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                                 return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k in ema_comps:
                for e, p in zip(ema_comps[k].parameters(), comps[k].parameters()):
                    e.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % 100 == 0:
            curve.append((step + 1, running / 100))
            log(f"step {step + 1}/{steps}: loss {running / 100:.4f}, {time.perf_counter() - t0:.0f} s")
            running = 0.0
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_state(step + 1)
    write_json(os.path.join(out, "curve.json"),
               dict(vae=vae_curve, transformer=curve, seconds=round(time.perf_counter() - t0, 1)))
    result = dict(comps)
    for k, m in ema_comps.items():
        result[k] = m.eval()
    return result
