"""Blocks found by structure (issue #14, deliverable 2): when no module list has one of the usual names, the
lists whose entries (one class, two or more) each hold an attention and pass the stream on are the blocks."""

import torch
from torch import nn

import fxcache
from fxcache.analysis import analyse
from fxcache.analysis.blocks import structural_block_lists
from fxcache.testing.models import make_inputs, make_model
from helpers import SelfAttention


class Mixer(nn.Module):
    """A token-mixing block: attention and a feed-forward, gated by the conditioning."""

    def __init__(self, d):
        super().__init__()
        self.attn = SelfAttention(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.mod = nn.Linear(d, 2 * d)

    def forward(self, x, c):
        g1, g2 = self.mod(c).chunk(2, -1)
        x = x + g1[:, None] * self.attn(x)
        return x + g2[:, None] * self.ff(x)


class OddlyNamed(nn.Module):
    """Blocks in a list called `trunk`; a list of per-token MLPs (`adapters`, no attention) beside it."""

    def __init__(self, d=32, depth=3):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.t_proj = nn.Linear(1, d)
        self.adapters = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.trunk = nn.ModuleList(Mixer(d) for _ in range(depth))
        self.out = nn.Linear(d, 4)

    def forward(self, x, timestep):
        half = 16
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) / half)
        emb = torch.cat([torch.cos(timestep[:, None] * freqs), torch.sin(timestep[:, None] * freqs)], -1)
        c = self.t_proj(emb[:, :1]) + emb.sum(-1, keepdim=True)
        h = self.inp(x)
        for a in self.adapters:
            h = h + a(h)
        for b in self.trunk:
            h = b(h, c)
        return self.out(h)


def graph_of(model, *args):
    out = torch._dynamo.explain(model)(*args)
    return out.graphs[0]


def test_an_unusual_block_list_name_is_found_and_per_token_lists_are_not():
    model = OddlyNamed().eval()
    args = (torch.randn(2, 16, 4), torch.tensor([0.5, 0.5]))
    gm = graph_of(model, *args)
    assert structural_block_lists(gm) == ["trunk"]
    plan = analyse(gm)
    assert [b.name for b in plan.blocks] == ["trunk.0", "trunk.1", "trunk.2"]
    assert "by structure: trunk" in plan.summary()


def test_an_unusual_block_list_name_caches_and_full_equals_uncached():
    model = OddlyNamed().eval()
    compiled = torch.compile(model, backend=fxcache.cache_backend("fora", lowering="eager", strict=True,
                                                                  interval=2), dynamic=False)
    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), fxcache.request(compiled):
        outs = [compiled(x, torch.tensor([t, t])) for t in (0.9, 0.6, 0.3)]
        want = [model(x, torch.tensor([t, t])) for t in (0.9, 0.6, 0.3)]
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "full"]
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(outs[0], want[0]) < 1e-6 and rel(outs[2], want[2]) < 1e-6  # FULL steps equal the model
    assert rel(outs[1], want[1]) > 1e-4  # the reuse step did reuse


def test_the_usual_names_still_decide_first():
    """Diffusers models are found by name as before; structure is only asked when no usual name matches."""
    out = torch._dynamo.explain(make_model("flux"))(**make_inputs("flux"))
    plan = analyse(out.graphs[0])
    assert plan.blocks_found == "by name"
    assert structural_block_lists(out.graphs[0]) == ["transformer_blocks", "single_transformer_blocks"]


def test_a_usual_name_on_per_token_layers_gives_way_to_the_attention_blocks():
    """`layers` (a usual name) holds per-token MLPs; the attention blocks are in `trunk`: the blocks are trunk's."""

    class Named(OddlyNamed):
        def __init__(self):
            super().__init__()
            self.layers = self.adapters

        def forward(self, x, timestep):
            return super().forward(x, timestep)

    model = Named().eval()
    plan = analyse(graph_of(model, torch.randn(2, 16, 4), torch.tensor([0.5, 0.5])))
    assert [b.name.split(".")[0] for b in plan.blocks] == ["trunk"] * 3
