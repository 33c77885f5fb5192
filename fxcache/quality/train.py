"""Train a reference model on the MNIST digits: rectified flow, class dropout for guidance, EMA weights."""

from __future__ import annotations

import copy
import math
import time

import torch

from .data import load_digits
from .reference import NULL_CLASS, ReferenceModel, build


def train(family: str, *, steps: int, batch: int = 128, lr: float = 1e-3, warmup: int = 200, ema: float = 0.999,
          class_dropout: float = 0.1, seed: int = 0, log_every: int = 100, data=None, log=print) -> ReferenceModel:
    """Returns the EMA model. Velocity target v = noise - x0 at x_t = (1 - t) x0 + t noise, t ~ logit-normal."""
    images, labels = data if data is not None else load_digits()
    ref = build(family, seed=seed)
    params = list(ref.transformer.parameters()) + list(ref.conditioner.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema_ref = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    ref.transformer.train()
    t0, running = time.perf_counter(), 0.0
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch, generator=g) < class_dropout] = NULL_CLASS
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal: more weight mid-trajectory
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = ref.call(ref.transformer, xt, t, ref.conditioner(y))
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(ema, (1 + step) / (10 + step))  # EMA warm-up: short runs must not keep the initial weights
        with torch.no_grad():
            for e, p in zip(list(ema_ref.transformer.parameters()) + list(ema_ref.conditioner.parameters()), params):
                e.lerp_(p, 1 - decay)
        running += loss.item()
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}: loss {running / log_every:.4f}, {time.perf_counter() - t0:.0f} s")
            running = 0.0
    ema_ref.transformer.eval()
    ema_ref.meta.update(family=family, steps=steps, batch=batch, lr=lr, ema=ema, seed=seed,
                        train_seconds=round(time.perf_counter() - t0, 1), objective="rectified flow (v = noise - x0)")
    return ema_ref
