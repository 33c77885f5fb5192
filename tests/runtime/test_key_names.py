"""Cache keys are typed values, never parsed from names: a block list called like a key prefix ("taylor_blocks",
"clusters", "idx") caches exactly as the same model with its list called "transformer_blocks" does."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

import fxcache
from helpers import rel_err


class _Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).reshape(b, n, 2, c // 2).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn, self.ada = _Attention(dim), nn.Linear(dim, 2 * dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, c):
        g1, g2 = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        x = x + self.attn(self.norm1(x)) * g1
        return x + self.ff(self.norm2(x)) * g2


class _Net(nn.Module):
    """A small DiT whose block list has the attribute name `blocks_name`."""

    def __init__(self, blocks_name: str, dim: int = 32):
        super().__init__()
        self.blocks_name = blocks_name
        self.proj_in, self.proj_out = nn.Linear(4, dim), nn.Linear(dim, 4)
        self.time_proj, self.time_embed = Timesteps(32, True, 0), TimestepEmbedding(32, dim)
        setattr(self, blocks_name, nn.ModuleList([_Block(dim) for _ in range(3)]))

    def forward(self, hidden_states, timestep):
        c = self.time_embed(self.time_proj(timestep))
        x = self.proj_in(hidden_states)
        for block in getattr(self, self.blocks_name):
            x = block(x, c)
        return self.proj_out(x)


def _net(blocks_name: str) -> _Net:
    torch.manual_seed(0)
    net = _Net("transformer_blocks").eval()
    renamed = _Net(blocks_name).eval()
    renamed.load_state_dict({k.replace("transformer_blocks", blocks_name, 1): v for k, v in net.state_dict().items()})
    return renamed


def _loop(model, method: str, opts: dict, blocks_name: str) -> tuple[list[torch.Tensor], list[str]]:
    backend = fxcache.cache_backend(method, lowering="eager", strict=True, block_lists=(blocks_name,), **opts)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    outs = []
    with torch.no_grad(), fxcache.request(compiled):
        for s in range(7):
            x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(s))
            outs.append(compiled(hidden_states=x, timestep=torch.full((2,), 900.0 - 100 * s)))
    return outs, [r["kind"] for r in fxcache.stats(compiled)]


@pytest.mark.parametrize("method,opts", [
    ("fora", dict(interval=3)),
    ("taylorseer", dict(interval=3, order=2, warmup_steps=1)),
    ("clusca", dict(interval=3, order=1, clusters=4, warmup_steps=1, kmeans_iters=3, gamma=0.1)),
    ("toca", dict(interval=3, fresh_ratio=0.25, score="knorm", staleness_weight=0.25, warmup_steps=1)),
])
@pytest.mark.parametrize("blocks_name", ["taylor_blocks", "clusters", "idx"])
def test_a_block_list_named_like_a_cache_key_caches_as_any_other(method, opts, blocks_name):
    expected, kinds = _loop(_net("transformer_blocks"), method, opts, "transformer_blocks")
    outs, renamed_kinds = _loop(_net(blocks_name), method, opts, blocks_name)
    assert renamed_kinds == kinds and len(set(kinds)) == 2  # FULL and the method's cached kind both ran
    with torch.no_grad():
        uncached = [_net(blocks_name)(hidden_states=torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(s)),
                                      timestep=torch.full((2,), 900.0 - 100 * s)) for s in range(7)]
    for s, (o, e, u) in enumerate(zip(outs, expected, uncached)):
        assert torch.equal(o, e), (s, kinds[s])
        if kinds[s] != "full":
            assert rel_err(o, u) > 1e-4, (s, kinds[s])  # the step really was cached
