"""The timestep input found by data flow (issue #14, deliverable 1): a diffusers `Timesteps` module, or any
per-sample scalar input whose values reach a sinusoidal embedding that an embedder's linear layer reads."""

import math
import os
import sys

import torch
from torch import nn

import fxcache
from fxcache.testing.models import make_inputs, make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "authors"))
from original_dit import make_original_dit  # noqa: E402


def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.mod = nn.Linear(d, 2 * d)

    def forward(self, x, c, rope=None):
        g1, g2 = self.mod(c).chunk(2, -1)
        h = x if rope is None else x * rope
        x = x + g1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        return x + g2[:, None] * self.ff(x)


class GuidedModel(nn.Module):
    """FLUX-dev style: guidance embedded exactly as the timestep, passed before it; rotary-style position codes
    (sin / cos of a 1-D position input multiplying the tokens) that must not be taken for the timestep."""

    def __init__(self, d=32, depth=2):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.t_mlp, self.g_mlp = nn.Linear(d, d), nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, 4)
        self.d = d

    def forward(self, x, positions, guidance, timestep):
        rope = torch.cos(positions[:, None] * 0.1) + torch.sin(positions[:, None] * 0.1)  # (N, 1): no linear
        c = self.t_mlp(sinusoid(timestep, self.d)) + self.g_mlp(sinusoid(guidance * 1000, self.d))
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, c, rope[None])
        return self.out(h)


def found(model, *args, **kwargs):
    result = fxcache.explain(model, *args, **kwargs)
    plan = result.plans[0]
    assert plan is not None, result.errors[0]
    return plan.input_paths.get(plan.timestep_index), plan.timestep_found


def test_a_diffusers_timesteps_module():
    model = make_model("pixart")
    path, how = found(model, **make_inputs("pixart"))
    assert path == "timestep" and "Timesteps" in how


def test_the_original_dit_codes_own_sinusoidal_embedder():
    model = make_original_dit(depth=2)
    path, how = found(model, torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0]), torch.tensor([1, 10]))
    assert path == "t" and "sinusoidal" in how


def test_a_guidance_and_timestep_pair_and_rotary_positions():
    model = GuidedModel().eval()
    args = (torch.randn(2, 16, 4), torch.arange(16.0), torch.tensor([3.5, 3.5]), torch.tensor([0.7, 0.7]))
    path, how = found(model, *args)
    assert path == "timestep" and "guidance" in how  # both embedded; the name decides; positions not a candidate


def test_the_data_flow_timestep_caches_and_equals_the_given_one():
    """The same DiT compiled with and without timestep_input= runs the same steps and the same outputs."""
    outs = []
    for kw in ({}, {"timestep_input": "t"}):
        torch._dynamo.reset()
        model = make_original_dit(depth=2)
        compiled = torch.compile(model, backend=fxcache.cache_backend("fora", lowering="eager", strict=True, **kw),
                                 dynamic=False)
        with torch.no_grad(), fxcache.request(compiled):
            y = torch.tensor([1, 10])
            x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
            res = [compiled(x, torch.tensor([t, t]), y) for t in (900.0, 700.0, 500.0, 300.0)]
        outs.append(res)
        assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "reuse", "full"]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


class Plain(nn.Module):
    """A learned timestep path: t goes through a linear layer, no sinusoid."""

    def __init__(self):
        super().__init__()
        self.t = nn.Linear(1, 32)
        self.inp = nn.Linear(4, 32)
        self.blocks = nn.ModuleList(Block(32) for _ in range(2))

    def forward(self, x, t):
        c = self.t(t[:, None])
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, c)
        return h


class PlainLevel(Plain):
    def forward(self, x, level):  # not named for time
        return super().forward(x, level)


def test_a_learned_timestep_path_is_stepped_by_the_forwards_time_argument():
    result = fxcache.explain(Plain().eval(), torch.randn(2, 8, 4), torch.tensor([0.5, 0.5]))
    assert result.plans[0] is not None and "model call" in result.plans[0].summary()


def test_no_sinusoid_and_no_time_argument_says_how_to_pass_one():
    result = fxcache.explain(PlainLevel().eval(), torch.randn(2, 8, 4), torch.tensor([0.5, 0.5]))
    assert result.plans[0] is None and "timestep_input=" in result.errors[0]
    assert "sinusoidal" in result.errors[0]


class TwoSinusoids(nn.Module):
    """Two per-sample inputs embedded sinusoidally (EDM-style `c_noise` and a guidance scale, guidance first), and
    per-token Fourier features of positions read by a linear layer (not per-sample: never the timestep)."""

    def __init__(self, d=32):
        super().__init__()
        self.inp, self.a_mlp, self.b_mlp, self.pos = nn.Linear(4, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.d = d

    def forward(self, x, positions, first, second):
        c = self.a_mlp(sinusoid(first, self.d)) + self.b_mlp(sinusoid(second, self.d))
        h = self.inp(x) + self.pos(sinusoid(positions, self.d))[None]
        for b in self.blocks:
            h = b(h, c)
        return h


def _args():
    return (torch.randn(2, 16, 4), torch.arange(16.0), torch.tensor([3.5, 3.5]), torch.tensor([0.7, 0.7]))


def test_a_guidance_input_is_never_taken_and_an_unnamed_pair_is_refused():
    class Guided(TwoSinusoids):
        def forward(self, x, positions, guidance, c_noise):
            return super().forward(x, positions, guidance, c_noise)

    path, how = found(Guided().eval(), *_args())
    assert path == "c_noise" and "guidance" in how
    result = fxcache.explain(TwoSinusoids().eval(), *_args())
    assert result.plans[0] is None
    assert "several inputs reach a sinusoidal embedding (first, second)" in result.errors[0]
