"""Models whose forward graph-breaks (issue #14, deliverable 3): Dynamo splits one forward into several graphs, and
fxcache caches the pieces that hold blocks, one step per model call shared by the pieces.

Three breaks, each a data-dependent `.item()` branch: between blocks (inside the block loop, which leaves the
forward eager and compiles each block's forward on its own), before the first block (a piece with the timestep
embedding and no block, then one with every block and no timestep), and inside one block (that block's forward in
two pieces). The truth is the hooked eager reference (which knows nothing of graphs) and the same weights without
the break, compiled whole.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxcache
from fxcache import FxCacheWarning, UnsupportedGraphError
from fxcache.testing import HookedReference
from helpers import SelfAttention, compile_cached, rel_err
from helpers import run as run_kw  # keyword inputs


def _check(x: torch.Tensor) -> torch.Tensor:
    """A data-dependent branch on a host value: Dynamo breaks the graph at `.item()`."""
    if x.abs().max().item() > 1e30:
        x = x / 2
    return x


class Block(nn.Module):
    def __init__(self, d, breaks=False):
        super().__init__()
        self.attn = SelfAttention(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.mod = nn.Linear(d, 2 * d)
        self.breaks = breaks

    def forward(self, x, c):
        g1, g2 = self.mod(c).chunk(2, -1)
        x = x + g1[:, None] * self.attn(x)
        if self.breaks:
            x = _check(x)
        return x + g2[:, None] * self.ff(x)


class Model(nn.Module):
    """A DiT of our own: hand-written sinusoidal timestep embedding, 4 blocks; `where` the forward graph-breaks."""

    def __init__(self, where: str, d: int = 32, depth: int = 4):
        super().__init__()
        self.where = where
        self.inp, self.t1, self.t2 = nn.Linear(4, d), nn.Linear(32, d), nn.Linear(d, d)
        self.label = nn.Embedding(3, d)  # class conditioning (optional)
        blocks = [Block(d, breaks=where == "inside" and i == 1) for i in range(depth)]
        if where.startswith("lists"):  # double-stream-like and single-stream-like lists, as FLUX has
            self.transformer_blocks = nn.ModuleList(blocks[:2])
            self.single_transformer_blocks = nn.ModuleList(blocks[2:])
        else:
            self.transformer_blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(d, 4)

    def forward(self, x, timestep, y=None):
        freqs = torch.exp(-torch.arange(16, dtype=torch.float32) / 16)
        a = timestep[:, None] * freqs
        c = self.t2(nn.functional.silu(self.t1(torch.cat([torch.cos(a), torch.sin(a)], -1))))
        if y is not None:
            c = c + self.label(y)
        h = self.inp(x)
        if self.where == "before":
            h = _check(h)
        for i, block in enumerate(self.transformer_blocks):
            if self.where == "between" and i == 2:
                h = _check(h)
            h = block(h, c)
        if self.where == "lists":
            h = _check(h)  # outside the loops: the forward goes on in a resumed graph
        for block in getattr(self, "single_transformer_blocks", ()):
            h = block(h, c)
        return self.out(h)


BREAKS = ["between", "before", "inside", "lists"]


def whole(where: str) -> str:
    """The same weights and block lists without the break."""
    return "lists-whole" if where == "lists" else "none"


def make(where: str) -> Model:
    torch.manual_seed(0)
    return Model(where).eval()


def calls(steps: int, *, batch: int = 2, tokens: int = 16, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    ts = [1000.0 * (1 - s / (steps + 1)) for s in range(steps)]
    return [(torch.randn(batch, tokens, 4, generator=g), torch.full((batch,), t)) for t in ts]


def run(model, args) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(*a) for a in args]


def reference(model, config) -> HookedReference:
    blocks = [f"{name}.{i}" for name in ("transformer_blocks", "single_transformer_blocks")
              for i in range(len(getattr(model, name, ())))]
    return HookedReference(model, config, attention=[f"{b}.attn" for b in blocks],
                           token_wise=[f"{b}.ff" for b in blocks], last_block=blocks[-1])


@pytest.mark.parametrize("where", BREAKS)
def test_the_forward_really_breaks(where):
    explained = torch._dynamo.explain(make(where))(*calls(1)[0])
    assert explained.graph_break_count >= 1


@pytest.mark.parametrize("method,opts", [("fora", dict(interval=3)), ("duca", dict(interval=3, ratio=0.5)),
                                         ("taylorseer", dict(interval=3, warmup_steps=1))])
@pytest.mark.parametrize("where", BREAKS)
def test_pieces_are_cached_and_the_loop_equals_the_hooked_reference(where, method, opts):
    model = make(where)
    compiled, backend = compile_cached(model, method, **opts)
    args = calls(7)
    outs = run(compiled, args)
    pieces = [r for r in backend.runners if isinstance(r, fxcache.runtime.pieces.PieceRunner)]
    assert pieces, "no graph was cached as a piece"
    records = fxcache.stats(compiled)
    want = [backend.config.step_kind(s).value for s in range(7)]
    for graph in {r["graph"] for r in records if r["cached"]}:
        assert [r["kind"] for r in records if r["graph"] == graph and r["step"] < 7][:7] == want or \
            len({r["kind"] for r in records if r["graph"] == graph}) > 1
    ref = reference(make(where), backend.config)
    expected = [ref(s, 0, *a) for s, a in enumerate(args)]
    uncached = run(model, args)
    for s, (o, e, u) in enumerate(zip(outs, expected, uncached)):
        assert rel_err(o, e) <= 1e-5, (where, method, s, want[s])
        if want[s] != "full":
            assert rel_err(o, u) > 1e-4, f"step {s} ({want[s]}) equals the uncached model: caching is inactive"


@pytest.mark.parametrize("method,opts", [
    ("toca", dict(interval=3, fresh_ratio=0.5)),
    ("toca", dict(interval=3, fresh_ratio=0.5, ratio_schedule="flux")),  # k per layer: pieces must know their layers
    ("duca", dict(interval=4, ratio=0.25, score="attention")),
    ("toca", dict(preset="dit")),  # per-block reference schedule: block 0 FULL on mixed steps
])
@pytest.mark.parametrize("where", BREAKS)
def test_pieces_equal_the_same_model_without_the_break(where, method, opts):
    """Schedules that depend on the layer, per-unit random draws and per-block reference schedules plan the same
    steps for pieces as for the whole graph. A break inside a block that leaves a feed-forward without the
    attention that scores it (attention scores): that piece cannot be scored, runs uncached, and says so."""
    steps = 50 if "preset" in opts else 7
    args = calls(steps)
    unbroken, _ = compile_cached(make(whole(where)), method, **opts)
    expected = run(unbroken, args)
    kinds = [r["kind"] for r in fxcache.stats(unbroken)]
    assert len(set(kinds)) > 1
    scored = opts.get("score") == "attention" or "preset" in opts
    broken, backend = compile_cached(make(where), method, strict=not (scored and where == "inside"), **opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = run(broken, args)
    if scored and where == "inside":
        assert any("no self/joint attention" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert rel_err(outs[0], expected[0]) <= 1e-6 and all(torch.isfinite(o).all() for o in outs)
        return
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 1e-5, (where, method, opts, s, kinds[s])


@pytest.mark.parametrize("where", BREAKS)
def test_full_step_of_every_piece_equals_the_uncached_model_at_another_size(where):
    model = make(where)
    args = calls(1, batch=3, tokens=24)
    compiled, backend = compile_cached(model, "duca", interval=3)
    out = run(compiled, args)[0]
    assert rel_err(out, run(model, args)[0]) <= 1e-6
    assert all(r["kind"] == "full" for r in fxcache.stats(compiled))


@pytest.mark.parametrize("where", BREAKS)
def test_two_requests_in_a_row_equal_and_do_not_recompile(where):
    model = make(where)
    compiled, backend = compile_cached(model, "fora", interval=2)
    args = calls(5)
    first = run(compiled, args)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run(compiled, args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    steps = [(r["graph"], r["step"]) for r in fxcache.stats(compiled) if r["cached"]]
    assert max(s for _, s in steps) == 4 and min(s for _, s in steps) == 0


def test_clusca_runs_a_broken_model_uncached_with_one_warning():
    model = make("inside")
    compiled, backend = compile_cached(model, "clusca", strict=False, interval=3)
    args = calls(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = run(compiled, args)
    messages = {str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)}
    assert messages and all("does not work per piece" in m for m in messages), messages
    for o, e in zip(outs, run(model, args)):
        assert torch.equal(o, e)


class NoTimeName(Model):
    def forward(self, x, noise):  # the timestep under a name that does not say time
        return super().forward(x, noise, None)


def test_a_piece_without_a_timestep_argument_runs_uncached_and_strict_mode_says_why():
    torch.manual_seed(0)
    model = NoTimeName("between").eval()
    compiled, backend = compile_cached(model, "fora", strict=False, interval=2)
    args = calls(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = run(compiled, args)
    assert any("timestep_input=" in str(w.message) for w in caught if issubclass(w.category, FxCacheWarning))
    for o, e in zip(outs, run(model, args)):
        assert torch.equal(o, e)
    torch._dynamo.reset()
    strict, _ = compile_cached(model, "fora", strict=True, interval=2)
    with pytest.raises(UnsupportedGraphError, match="no timestep input found"):
        run(strict, args)
    torch._dynamo.reset()
    named, backend = compile_cached(model, "fora", interval=2, timestep_input="noise")
    outs = run(named, args)
    assert "reuse" in [r["kind"] for r in fxcache.stats(named)]


@pytest.mark.parametrize("where", BREAKS)
def test_sequential_cfg_branches_of_the_pieces_follow_the_model_calls(where):
    """Two calls per step at one t (a conditional and an unconditional half, as true CFG runs them): every piece
    keeps the two branches apart, as the hooked reference does with explicit branches."""
    model = make(where)
    compiled, backend = compile_cached(model, "fora", interval=3)
    labels = [torch.tensor([1, 2]), torch.tensor([0, 0])]  # the prompt, and the null class of the other half
    pairs = [(x, t, labels[half]) for x, t in calls(5) for half in (0, 1)]
    outs = run(compiled, pairs)
    ref = reference(make(where), backend.config)
    expected = [ref(i // 2, i % 2, *a) for i, a in enumerate(pairs)]
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 1e-5, (where, i)
    cached = [r for r in fxcache.stats(compiled) if r["cached"]]
    assert {r["branch"] for r in cached} == {0, 1}
    assert {r["kind"] for r in cached} == {"full", "reuse"}


def test_a_failed_call_starts_the_branch_over_in_every_piece():
    """A call that raises inside a piece: the next request starts over (FULL) and equals a fresh run."""
    model = make("between")
    compiled, backend = compile_cached(model, "fora", interval=3)
    args = calls(4)
    run(compiled, args[:2])
    bad = (args[2][0][:, :, :3], args[2][1])  # wrong channel count: the first linear layer raises
    with pytest.raises(Exception):
        run(compiled, [bad])
    fxcache.reset(compiled)
    again = run(compiled, args)
    fresh, _ = compile_cached(make("between"), "fora", interval=3)
    for a, b in zip(again, run(fresh, args)):
        assert torch.equal(a, b)


@pytest.mark.inductor
def test_pieces_lowered_by_inductor_equal_the_hooked_reference_and_do_not_recompile():
    """The block graphs of a forward that breaks in its block loop, through Inductor (two variants: FULL, REUSE)."""
    model = make("between")
    compiled, backend = compile_cached(model, "fora", lowering="inductor", interval=3)
    args = calls(5)
    outs = run(compiled, args)
    ref = reference(make("between"), backend.config)
    expected = [ref(s, 0, *a) for s, a in enumerate(args)]
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 2e-5, s
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(compiled, args)
    for a, b in zip(outs, again):
        assert torch.equal(a, b)
    assert {r["kind"] for r in fxcache.stats(compiled) if r["cached"]} == {"full", "reuse"}


@pytest.mark.parametrize("name,method,opts", [
    ("flux", "fora", dict(interval=3)), ("flux", "duca", dict(interval=3, ratio=0.5)),
    ("flux", "toca", dict(interval=3, fresh_ratio=0.3, ratio_schedule="flux")),
    ("flux", "taylorseer", dict(interval=3, warmup_steps=1)),
    # DiT's blocks embed the raw timestep themselves: still stepped by the model call and placed in the model
    ("dit", "duca", dict(interval=3, ratio=0.5)), ("dit", "toca", dict(interval=3, ratio_schedule="flux"))])
def test_regional_compilation_equals_the_whole_model_compiled(name, method, opts):
    """Each block compiled on its own (`block.compile(backend=...)`, diffusers' regional compilation): the same
    caching as the whole model compiled at once, blocks placed by their lists (FLUX: double and single)."""
    from fxcache.testing import make_inputs, make_model

    kws = [make_inputs(name, t=1 - 0.1 * s) for s in range(6)]
    whole, _ = compile_cached(make_model(name), method, **opts)
    expected = run_kw(whole, kws)
    torch._dynamo.reset()
    model = make_model(name)
    backend = fxcache.cache_backend(method, lowering="eager", strict=True, **opts)
    for block in list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", [])):
        block.compile(backend=backend, dynamic=False)
    outs = run_kw(model, kws)
    assert {r["kind"] for r in backend.stats()} == {backend.config.step_kind(s).value for s in range(6)}
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 1e-5, s



def test_timestep_input_by_index_counts_the_models_parameters_not_the_blocks():
    torch.manual_seed(0)
    model = NoTimeName("between").eval()
    args = calls(7)
    torch.manual_seed(0)
    whole, _ = compile_cached(NoTimeName("none").eval(), "fora", interval=3, timestep_input=1)
    broken, backend = compile_cached(model, "fora", interval=3, timestep_input=1)
    for s, (o, e) in enumerate(zip(run(broken, args), run(whole, args))):
        assert rel_err(o, e) <= 1e-5, s


class SharedBlocks(Model):
    """One block module at every position of the list (weights shared across depth)."""

    def __init__(self, where: str):
        super().__init__(where)
        self.transformer_blocks = nn.ModuleList([self.transformer_blocks[0]] * 4)


@pytest.mark.parametrize("where,says", [("between", "more than once per model call"), ("none", "several positions")])
def test_blocks_that_share_one_module_run_uncached_with_a_warning(where, says):
    """With a break in the loop, a block graph runs twice per model call; without one, the whole graph cannot tell
    the positions' caches apart (strict mode says why). Either way: uncached, one warning, the uncached output."""
    torch.manual_seed(0)
    model = SharedBlocks(where).eval()
    compiled, backend = compile_cached(model, "fora", strict=False, interval=3)
    args = calls(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = run(compiled, args)
    assert any(says in str(w.message) for w in caught)
    for o, e in zip(outs, run(model, args)):
        assert torch.equal(o, e)
    if where == "none":
        torch._dynamo.reset()
        strict, _ = compile_cached(model, "fora", interval=3)
        with pytest.raises(UnsupportedGraphError, match=says):
            run(strict, args)


class Stage(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(d) for _ in range(2))

    def forward(self, h, timestep, c):
        for i, block in enumerate(self.transformer_blocks):
            if i == 1:
                h = _check(h)
            h = block(h, c)
        return h


class Staged(Model):
    """Blocks in two stages whose forwards take the timestep too (each breaks in its loop)."""

    def __init__(self):
        super().__init__("none")
        self.stages = nn.ModuleList([Stage(), Stage()])
        del self.transformer_blocks

    def forward(self, x, timestep):
        freqs = torch.exp(-torch.arange(16, dtype=torch.float32) / 16)
        a = timestep[:, None] * freqs
        c = self.t2(nn.functional.silu(self.t1(torch.cat([torch.cos(a), torch.sin(a)], -1))))
        h = self.inp(x)
        for stage in self.stages:
            h = stage(h, timestep, c)
        return self.out(h)


def test_blocks_in_stages_that_take_the_timestep_are_stepped_by_the_whole_model():
    """The model is the module holding every block list: outside a request too, the stages' t-dependent inputs
    do not make each step a new request, and per-layer plans match the whole model's."""
    args = calls(7)
    torch.manual_seed(0)
    model = Staged().eval()
    compiled, backend = compile_cached(model, "duca", interval=3, ratio=0.5)
    outs = run(compiled, args)
    kinds = [r["kind"] for r in fxcache.stats(compiled) if r["cached"]]
    assert {"partial", "skip"} <= set(kinds)
    ref = HookedReference(model, backend.config,
                          attention=[f"stages.{s}.transformer_blocks.{i}.attn" for s in (0, 1) for i in (0, 1)],
                          token_wise=[f"stages.{s}.transformer_blocks.{i}.ff" for s in (0, 1) for i in (0, 1)],
                          last_block="stages.1.transformer_blocks.1")
    for s, (o, a) in enumerate(zip(outs, args)):
        assert rel_err(o, ref(s, 0, *a)) <= 1e-5, s


def test_explain_says_which_graphs_are_pieces_and_which_are_glue(capsys):
    result = fxcache.explain(make("inside"), *calls(1)[0], method="fora")
    assert result.graph_count == 4 and result.graph_break_count >= 1
    cached = [p for p in result.plans if p is not None]
    assert len(cached) == 3 and all(p.timestep_index is None for p in cached)
    assert "a block's own forward" in cached[0].summary()
    assert any(e.startswith("runs as it is: a piece") for e in result.errors)
    assert "model call" in capsys.readouterr().out


@pytest.mark.parametrize("where", BREAKS)
def test_pieces_draw_the_tokens_of_the_current_size_after_another_size_ran(where):
    """DuCa's per-step token draw of a piece starts after the rows of the model's earlier blocks at the size of the
    call in hand, whatever size the process compiled first: equal to the unbroken model."""
    opts = dict(interval=3, ratio=0.5)
    args = calls(7)
    unbroken, _ = compile_cached(make(whole(where)), "duca", **opts)
    expected = run(unbroken, args)
    broken, _ = compile_cached(make(where), "duca", **opts)
    run(broken, calls(4, tokens=24, seed=3))  # another resolution first
    outs = run(broken, args)
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 1e-5, (where, s)
