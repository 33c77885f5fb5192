"""Children whose output cannot be cached safely are never units, and say why; the rest of the block still caches.

The truth here is the eager model with forward hooks that replay a FULL step's outputs of the children the
analysis did cache: a cached step must equal it, whatever the block does around those children.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

import fxcache


class _SelfAttention(nn.Module):
    """timm-style attention with a fused qkv projection; `residual=True` adds its input inside the module."""

    def __init__(self, dim: int, residual: bool = False):
        super().__init__()
        self.qkv, self.proj, self.residual = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), residual

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + out if self.residual else out


class _Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """`style`: "inplace-gate" gates the attention output in place (`a.mul_(g)`); "residual-attention" has the
    residual add inside the attention module (`x = attn(x)`)."""

    def __init__(self, dim: int, style: str):
        super().__init__()
        self.style = style
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = _SelfAttention(dim, residual=style == "residual-attention")
        self.mlp = _Mlp(dim)
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x, c):
        g1, g2 = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        if self.style == "residual-attention":
            x = self.attn(self.norm1(x))
        else:
            a = self.attn(self.norm1(x))
            a.mul_(g1)
            x = x + a
        return x + self.mlp(self.norm2(x)) * g2


class _Net(nn.Module):
    def __init__(self, style: str, dim: int = 32):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(4, dim), nn.Linear(dim, 4)
        self.time_proj, self.time_embed = Timesteps(32, True, 0), TimestepEmbedding(32, dim)
        self.transformer_blocks = nn.ModuleList([_Block(dim, style) for _ in range(2)])

    def forward(self, hidden_states, timestep):
        c = self.time_embed(self.time_proj(timestep))
        x = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            x = block(x, c)
        return self.proj_out(x)


def _replaying(model: _Net, children: list[str], full_inputs: dict, inputs: dict) -> torch.Tensor:
    """Eager output on `inputs` with the named children of every block returning their FULL-step outputs."""
    saved, handles = {}, []
    for i, block in enumerate(model.transformer_blocks):
        for name in children:
            handles.append(getattr(block, name).register_forward_hook(
                lambda m, a, out, key=(i, name): saved.__setitem__(key, out.clone())))
    model(**full_inputs)
    for h in handles:
        h.remove()
    handles = [getattr(block, name).register_forward_hook(lambda m, a, out, key=(i, name): saved[key])
               for i, block in enumerate(model.transformer_blocks) for name in children]
    try:
        return model(**inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("style", ["inplace-gate", "residual-attention"])
@pytest.mark.parametrize("method", ["fora", "taylorseer"])
def test_unsafe_attention_is_not_cached_and_cached_steps_equal_the_replayed_model(style, method):
    torch.manual_seed(0)
    model = _Net(style).eval()
    opts = dict(interval=3) if method == "fora" else dict(interval=3, warmup_steps=1, order=0)
    backend = fxcache.cache_backend(method, lowering="eager", **opts)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    t = torch.full((2,), 500.0)
    full = dict(hidden_states=torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1)), timestep=t)
    other = dict(hidden_states=torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(2)), timestep=t)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", fxcache.FxCacheWarning)  # the block still caches: no uncached fallback
        with fxcache.step(compiled, 0):
            compiled(**full)
        with fxcache.step(compiled, 1):
            cached = compiled(**other)
        expected = _replaying(model, ["mlp"], full, other)
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse" if method == "fora" else "forecast"]
    assert torch.allclose(cached, expected, atol=1e-6)
    summary = str(fxcache.explain(model, **full))
    assert "not cached: attn" in summary
    assert ("residual add inside" if style == "residual-attention" else "changed in place") in summary


def test_a_forward_whose_module_argument_is_not_called_self_is_analysed():
    class Renamed(_Net):
        def forward(s, hidden_states, timestep):  # noqa: N805 - the point of the test
            return _Net.forward(s, hidden_states, timestep)

    torch.manual_seed(0)
    model = Renamed("inplace-gate").eval()
    plan_text = str(fxcache.explain(model, hidden_states=torch.randn(1, 16, 4), timestep=torch.tensor([500.0])))
    assert "transformer_blocks.1" in plan_text and "mlp[mlp 16 tokens" in plan_text
