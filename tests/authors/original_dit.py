"""A small DiT in the style of facebookresearch/DiT ``models.py`` (our own code, written to the same structure), and the
DiT repository's DDIM sampler (``diffusion/gaussian_diffusion.py`` + ``diffusion/respace.py``).

This is the model the authors' caching code (``authors_dit.py``) is re-stated on. It keeps the original's module
names and tensor layouts (``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks[i].attn.qkv``
(one fused linear), ``blocks[i].mlp.fc1/fc2``, ``blocks[i].adaLN_modulation``, ``final_layer``), so code written against
the original reads the same here.

Differences from the original, all deliberate:
- weights are random but *not* adaLN-Zero: the original zero-inits every ``adaLN_modulation`` and the final layer, which
  makes every block the identity and caching a no-op. Here all weights are drawn from a private generator seeded by
  ``seed`` (the caller's global RNG is left alone), with the adaLN gates O(0.1-1);
- ``pos_embed`` is a buffer (the original: a frozen ``nn.Parameter``);
- ``forward_with_cfg`` guides the first ``in_channels`` channels (the original guides ``model_out[:, :3]``, DiT
  ``models.py`` L262, "for exact reproducibility reasons"; with ``in_channels = 4`` that leaves the 4th eps channel
  unguided). The DDIM sampler reads eps from the first ``in_channels`` channels, as the original's
  ``p_mean_variance`` does (``th.split(model_output, C, dim=1)``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------------
# embeddings
# ----------------------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """timm-style patch embedding: a strided conv, then (B, C, h, w) -> (B, h*w, C)."""

    def __init__(self, img_size=32, patch_size=2, in_chans=4, embed_dim=64, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of the (original, 0..999) timestep, then a two-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half
        freqs = torch.exp(exponent).to(device=t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index ``num_classes``) for the null class of classifier-free guidance.
    Label dropout only in training mode, as the original (never in eval)."""

    def __init__(self, num_classes, hidden_size, dropout_prob=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train=False, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """timm's ViT attention: one fused qkv projection, SDPA (or, with `fused_attn=False`, timm's explicit
    q @ k^T softmax path), output projection."""

    fused_attn = True

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """timm's Mlp with the tanh-approximate GELU DiT uses."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN(-Zero) DiT block."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.depth = depth

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size[0]
        pos = get_2d_sincos_pos_embed(hidden_size, grid)
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        """(B, T, p*p*C) -> (B, C, H, W)"""
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Batched classifier-free guidance, as the original (rows [cond; uncond]); eps = first ``in_channels``."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        return cfg_combine(model_out, self.in_channels, cfg_scale)


def cfg_combine(model_out, in_channels, cfg_scale):
    """The tail of ``forward_with_cfg``: guide the eps channels, keep the learned-sigma channels of each row."""
    eps, rest = model_out[:, :in_channels], model_out[:, in_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# fixed 2D sin-cos positional embedding (MAE)
# ----------------------------------------------------------------------------------------------------------------------

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid_size, grid_size)  # w first
    assert embed_dim % 2 == 0
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# constructor with non-degenerate random weights
# ----------------------------------------------------------------------------------------------------------------------

def make_original_dit(depth=4, hidden=64, heads=4, patch=2, input_size=16, in_channels=4, num_classes=10, seed=0):
    """A DiT in eval mode, every weight random (deterministic from ``seed``; the global RNG is left untouched).

    Linear/conv weights ~ N(0, 1/fan_in) (unit-gain), biases ~ N(0, 0.02^2), label table ~ N(0, 0.5^2) (so classes, and
    CFG, matter), each block's adaLN Linear scaled so shift/scale/gate are O(0.1-1), the final layer random too.
    input_size 16 / patch 2 -> 64 tokens (8x8 grid); input_size 32 -> 256 tokens (16x16)."""
    with torch.random.fork_rng(devices=[]):
        model = DiT(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
                    num_heads=heads, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed)

    def normal_(tensor, std):
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * std)

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            normal_(mod.weight, 1.0 / math.sqrt(fan_in))
            if mod.bias is not None:
                normal_(mod.bias, 0.02)
    normal_(model.y_embedder.embedding_table.weight, 0.5)
    for mod in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]:
        fan_in = mod.weight.shape[1]
        normal_(mod.weight, 1.5 / math.sqrt(fan_in))
        normal_(mod.bias, 0.1)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# DDIM (eta = 0) of the DiT repository
# ----------------------------------------------------------------------------------------------------------------------

def linear_betas(num_diffusion_timesteps=1000):
    """``gaussian_diffusion.get_named_beta_schedule("linear", 1000)``: linspace(1e-4, 0.02) in float64."""
    scale = 1000 / num_diffusion_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """``respace.space_timesteps``: "ddimN" = the fixed integer stride; "N" or "a,b,c" = evenly spaced sections with
    a fractional stride, each index rounded (Python's round on the accumulated float)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for n, count in enumerate(section_counts):
        size = size_per + (1 if n < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += frac_stride
        start += size
    return set(steps)


class SpacedSchedule:
    """The respaced process of ``respace.SpacedDiffusion``: new betas from the kept alphas_cumprod, ``timestep_map``
    (respaced index -> original timestep, what ``_WrappedModel`` hands the model), and the float64 tables DDIM reads."""

    def __init__(self, respacing="50", num_diffusion_timesteps=1000):
        base = np.cumprod(1.0 - linear_betas(num_diffusion_timesteps), axis=0)
        use = space_timesteps(num_diffusion_timesteps, respacing)
        last, betas, self.timestep_map = 1.0, [], []
        for n, ac in enumerate(base):
            if n in use:
                betas.append(1 - ac / last)
                last = ac
                self.timestep_map.append(n)
        betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

    @staticmethod
    def extract(arr, t, shape):
        """``_extract_into_tensor``: float64 table -> indexed -> float32, broadcast."""
        res = torch.from_numpy(arr).to(device=t.device)[t].float()
        while res.dim() < len(shape):
            res = res[..., None]
        return res + torch.zeros(shape, device=t.device)


def cfg_step_fn(model_fn, y_cfg, cfg_scale):
    """A ``(x, t, i)`` callable for ``ddim_sample``: a DiT (``forward_with_cfg(x, t, y, cfg)``), an oracle of
    ``authors_dit`` (``forward_with_cfg(x, t, y, cfg, i)``), or a plain callable already of the form ``(x, t, i)``."""
    fwc = getattr(model_fn, "forward_with_cfg", None)
    if fwc is None:
        return model_fn
    if isinstance(model_fn, nn.Module):
        return lambda x, t, i: fwc(x, t, y_cfg, cfg_scale)
    return lambda x, t, i: fwc(x, t, y_cfg, cfg_scale, i)


@torch.no_grad()
def ddim_sample(model_fn, shape, y, steps=50, cfg_scale=4.0, seed=0, *, respacing=None, num_classes=None,
                noise=None, draw_eta_noise=True):
    """DDIM (eta = 0) of the DiT repository with classifier-free guidance, as the authors' ``sample.py`` runs it.

    ``shape`` is the latent shape of the *conditional half* (n, C, H, W), n = len(y). z ~ N(0, 1) from
    ``torch.Generator().manual_seed(seed)`` (or ``noise``), the CFG batch is x = [z; z], labels [y; null] with
    null = ``num_classes`` (read from the model when not given). Loop: i = steps-1 .. 0 (the authors'
    ``current['step']``); the model gets t = timestep_map[i] (``respace._WrappedModel``), called as
    ``model_fn(x, t_tensor, i)`` (DiT / oracle objects are wrapped by ``cfg_step_fn``).

    ``respacing``: None = ``str(steps)`` -- what every authors' script passes (``create_diffusion(str(args.
    num_sampling_steps))``, e.g. DiT-ToCa ``sample.py`` L46), evenly spaced with stride 999/(steps-1): 0, 20, 41, ...,
    999. ``"ddim50"`` gives the integer stride 0, 20, ..., 980 instead (not what the authors ran).

    ``draw_eta_noise``: the DiT ``ddim_sample`` draws ``th.randn_like(x)`` every step even with eta = 0
    (``gaussian_diffusion.py`` L572; DiT-ToCa L573), from the global RNG, after the model call; kept so that RNG-using
    oracles (ClusCa) see the global RNG in the authors' order.

    Returns (sample, xs): sample = the final latents of the conditional half (``samples.chunk(2)[0]`` in
    ``sample.py``), xs = the CFG batch before every step and after the last (``xs[0]`` = [z; z], len steps + 1)."""
    sched = SpacedSchedule(respacing if respacing is not None else str(steps))
    assert sched.num_timesteps == steps
    if num_classes is None:
        num_classes = getattr(model_fn, "num_classes", None)
        if num_classes is None:
            num_classes = getattr(getattr(model_fn, "model", None), "num_classes", None)
    y = torch.as_tensor(y, dtype=torch.long)
    if num_classes is None:
        raise ValueError("num_classes is needed for the null label")
    n = shape[0]
    assert len(y) == n
    if noise is None:
        z = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    else:
        z = noise
    x = torch.cat([z, z], dim=0)
    y_cfg = torch.cat([y, torch.full((n,), num_classes, dtype=torch.long)], dim=0)
    fn = cfg_step_fn(model_fn, y_cfg, cfg_scale)
    tmap = torch.tensor(sched.timestep_map, dtype=torch.long)
    xs = [x]
    C = x.shape[1]
    for i in range(steps)[::-1]:
        t = torch.tensor([i] * x.shape[0])
        model_out = fn(x, tmap[t], i)
        eps_model = model_out[:, :C]  # p_mean_variance: th.split(model_output, C, dim=1)
        pred_x0 = (SpacedSchedule.extract(sched.sqrt_recip_alphas_cumprod, t, x.shape) * x
                   - SpacedSchedule.extract(sched.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps_model)
        # clip_denoised=False in sample.py; ddim_sample re-derives eps from pred_xstart
        eps = ((SpacedSchedule.extract(sched.sqrt_recip_alphas_cumprod, t, x.shape) * x - pred_x0)
               / SpacedSchedule.extract(sched.sqrt_recipm1_alphas_cumprod, t, x.shape))
        alpha_bar_prev = SpacedSchedule.extract(sched.alphas_cumprod_prev, t, x.shape)
        sigma = 0.0
        if draw_eta_noise:
            torch.randn_like(x)  # the authors draw it and multiply it by sigma = 0
        x = pred_x0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        xs.append(x)
    return x[:n], xs
