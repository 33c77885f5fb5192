"""Training of the text-to-image reference (`t2i`): the autoencoder first, then the transformer with both text
encoders (rectified flow, caption dropout for CFG, EMA weights). Resumable: the state is saved every
`save_every` steps to <out>/train_state.pt and a rerun with the same folder continues from it. A run can also
start from a saved pipeline folder (`init`: its autoencoder kept, the rest trained further), so the committed
reference is itself a checkpoint that a later run continues. Every `check_every` steps the EMA model draws the
benchmark's prompts through the pipeline and the exact prompt checks are logged: training is judged by what the
model draws, not by its loss."""

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


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _parameters(c: dict) -> list[torch.nn.Parameter]:
    return [p for k in ("transformer", "text_encoder", "text_encoder_2") for p in c[k].parameters()]


LAYOUT_RANGE = 0.2  # t in [0.8, 1]: the noise levels at which a shape is not yet visible in the noisy latents


def check_prompts(components: dict, n: int = 20, steps: int = 50) -> dict[str, float]:
    """The exact prompt checks (`scenes.adherence`) and the blank-image fraction of `n` benchmark prompts
    (`scene_eval.eval_labels`, seeds 0..n-1) drawn by a `FluxPipeline` of `components` at `t2i.CALL_ARGS`."""
    from .scene_eval import CAPTIONS, eval_labels

    pipe = t2i.make_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    labels = eval_labels(n)
    caps = [CAPTIONS[int(i)] for i in labels]
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    with torch.no_grad():
        images = pipe(caps, num_inference_steps=steps, generator=gens, output_type="pt", **t2i.CALL_ARGS).images
    images = images * 2 - 1
    picked = [scenes.parse(c) for c in caps]
    result = scenes.adherence(images, picked)
    result["blank"] = sum(scenes.detect(im)["count"] == 0 for im in images) / n
    result.update(word_effects(pipe))
    return result


def word_effects(pipe, samples: int = 8) -> dict[str, float]:
    """How much the transformer's prediction from pure noise (t = 1, where the prompt alone decides the layout)
    changes when one prompt word changes, relative to its size: "left" vs "right" (position) and "red" vs "blue"
    (colour). A position effect far below the colour effect means the model ignores where it is asked to draw,
    long before the prompt checks can show it."""
    from diffusers import FluxPipeline

    caps = [f"{scenes.PREFIX} one red square on the left", f"{scenes.PREFIX} one red square on the right",
            f"{scenes.PREFIX} one blue square on the left"]
    side = scenes.SIZE // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(None, side, side, "cpu", torch.float32)
    noise = torch.randn(samples, side * side, 4 * t2i.LATENT_CHANNELS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seq, pooled = t2i.encode(pipe, *t2i.token_ids(pipe, caps))
        out = [pipe.transformer(hidden_states=noise, timestep=torch.ones(samples), img_ids=img_ids,
                                txt_ids=torch.zeros(t2i.TEXT_TOKENS, 3), return_dict=False,
                                encoder_hidden_states=seq[i:i + 1].expand(samples, -1, -1),
                                pooled_projections=pooled[i:i + 1].expand(samples, -1))[0] for i in range(3)]
    size = float(out[0].norm())
    return {"position effect": float((out[0] - out[1]).norm()) / size,
            "colour effect": float((out[0] - out[2]).norm()) / size}


def train_scenes(out: str, *, steps: int, vae_steps: int = 1500, batch: int = 32, lr: float = 5e-4,
                 warmup: int = 200, ema: float = 0.999, caption_dropout: float = 0.1, data: int = 30000,
                 seed: int = 0, save_every: int = 100, schedule: str = "cosine", t_mean: float = 0.0,
                 t_layout: float = 0.0, init: str | None = None, check_every: int = 0, architecture: str = "h32",
                 log: Callable[[str], None] = print) -> dict:
    """Train (or resume) the reference in `out`; returns the EMA components. The loss curve goes to
    <out>/curve.json ([step, loss] pairs, 100-step means), the prompt checks to its "checks" list.

    `schedule`: "cosine" (warmup, then down to 0 at `steps`) or "constant" (warmup, then `lr`: a run that may be
    stopped and continued at any step, the EMA weights its result). `t_mean`: location of the logit-normal
    timestep density (positive: more weight on noisy steps). `t_layout`: the fraction of samples whose t is drawn
    uniformly from the top LAYOUT_RANGE of noise levels, the only ones where the prompt alone decides the layout
    (count and position): at t below about 0.9 the noisy image already shows where the shapes are, so the
    logit-normal density alone gives the position words almost no gradient. `init`: a pipeline
    folder to start from instead of fresh weights (its autoencoder is kept; ignored when resuming).
    `architecture`: a key of `t2i.ARCHITECTURES` (fresh runs; from an `init` of another architecture only its
    autoencoder and text encoders are taken)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule={schedule!r}: expected 'cosine' or 'constant'")
    from diffusers import FluxPipeline

    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "train_state.pt")
    state = torch.load(state_path, weights_only=False) if os.path.exists(state_path) else None
    if state is not None:
        architecture = state.get("architecture", "h32")
    comps = t2i.build_components(seed, architecture)
    pipe = t2i.make_pipeline(comps)
    images, picked = scenes.dataset(data, seed)
    captions = [s.caption() for s in scenes.all_scenes()] + [""]  # the last one: the empty (CFG) prompt
    index = {c: i for i, c in enumerate(captions)}
    labels = torch.tensor([index[s.caption()] for s in picked])
    clip_ids, t5_ids = t2i.token_ids(pipe, captions)
    if state is None and init is not None:
        start_from = t2i.load_pipeline(init)
        mine, theirs = comps["transformer"].config, start_from.transformer.config
        same = all(_plain(theirs.get(k)) == _plain(mine[k]) for k in t2i.TRANSFORMER)
        taken = ("transformer", "text_encoder", "text_encoder_2", "vae") if same else ("text_encoder", "text_encoder_2",
                                                                                      "vae")
        for k in taken:
            comps[k].load_state_dict(getattr(start_from, k).float().state_dict())
        factors = start_from.vae.config
        comps["vae"].register_to_config(shift_factor=factors.shift_factor, scaling_factor=factors.scaling_factor)
        vae_curve = []
        log(f"starting from the pipeline in {init}: its {', '.join(taken)}")
    elif state is None:
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
    def factor(s: int) -> float:
        decay = 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        return min(1.0, (s + 1) / warmup) * decay

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema_comps = {k: copy.deepcopy(comps[k]) for k in ("transformer", "text_encoder", "text_encoder_2")}
    g = torch.Generator().manual_seed(seed + 1)
    start, curve, checks, elapsed = 0, [], [], 0.0
    if state is not None:
        for k in ema_comps:
            comps[k].load_state_dict(state["model"][k])
            ema_comps[k].load_state_dict(state["ema"][k])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        g.set_state(state["rng"])
        start, curve, elapsed = state["step"], state["curve"], state["seconds"]
        checks = state.get("checks", [])
        log(f"resumed at step {start}/{steps} ({elapsed:.0f} s of training so far)")
    for k in ema_comps:
        comps[k].train()
    t0, running = time.perf_counter() - elapsed, 0.0

    def save_state(step):
        with replacing(state_path) as f:
            torch.save(dict(step=step, architecture=architecture, curve=curve, checks=checks,
                            seconds=time.perf_counter() - t0, rng=g.get_state(),
                            model={k: comps[k].state_dict() for k in ema_comps},
                            ema={k: ema_comps[k].state_dict() for k in ema_comps},
                            opt=opt.state_dict(), sched=sched.state_dict(), vae=vae.state_dict(),
                            vae_curve=vae_curve, vae_factors=dict(shift_factor=vae.config.shift_factor,
                                                                  scaling_factor=vae.config.scaling_factor)), f)

    for step in range(start, steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, y = latents[idx], labels[idx].clone()
        y[torch.rand(batch, generator=g) < caption_dropout] = len(captions) - 1
        t = torch.sigmoid(torch.randn(batch, generator=g) + t_mean)  # logit-normal: more weight mid-trajectory
        if t_layout:  # the prompt decides where shapes go only near pure noise: the noisy image shows it later
            layout = torch.rand(batch, generator=g) < t_layout
            t = torch.where(layout, 1.0 - LAYOUT_RANGE * torch.rand(batch, generator=g), t)
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
        if check_every and ((step + 1) % check_every == 0 or step + 1 == steps):
            for k in ema_comps:
                ema_comps[k].eval()
            result = check_prompts({**comps, **ema_comps})
            checks.append((step + 1, result))
            log(f"step {step + 1}: prompt checks (EMA, 20 prompts) " +
                ", ".join(f"{k} {v:.2f}" if "effect" not in k else f"{k} {v:.4f}" for k, v in result.items()))
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_state(step + 1)
    write_json(os.path.join(out, "curve.json"),
               dict(vae=vae_curve, transformer=curve, checks=checks, seconds=round(time.perf_counter() - t0, 1)))
    result = dict(comps)
    for k, m in ema_comps.items():
        result[k] = m.eval()
    return result
