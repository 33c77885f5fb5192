"""fbcache and dbcache against the libraries they follow: diffusers' FirstBlockCache and cache-dit's DBCache.

Each test runs the same sampling loop (latents x <- x - v / steps; true CFG combines the two branches) on an fxcache
model and on a copy of the same transformer with the peer's hooks, and compares every call: the decision (fxcache's
`stats` kind against what the peer's own hook decided, observed by wrapping it) and the output. Thresholds are
chosen so that both decisions occur, and the test checks they are not borderline (a decision then does not hinge on
the last bit of a mean).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import fxcache
from helpers import make_inputs, make_model, rel_err

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

TOL = 1e-4  # relative, on every output
MARGIN = 1e-3  # every signal a decision read is at least this far from the threshold


def tiny_flux():
    """2 double + 3 single blocks: room for Fn / Bn settings."""
    return make_model("flux", num_layers=2, num_single_layers=3)


def compiled(model, method, **opts):
    backend = fxcache.cache_backend(method, lowering="eager", strict=True, **opts)
    return torch.compile(copy.deepcopy(model), backend=backend, dynamic=False)


def branch_inputs(batch: int = 1, branches: int = 1) -> list[dict]:
    """Per branch (cond, uncond): its own conditioning; the latents are the loop's."""
    return [make_inputs("flux", batch=batch, seed=b) for b in range(branches)]


def sample(call, kws: list[dict], steps: int, *, guidance: float = 3.0, x=None, stop: int | None = None):
    """The sampling loop: per step one call per branch at one t on the shared latents; returns the outputs, per
    call in call order. `call(branch, kwargs)` runs the model; `stop` ends the loop early (an interrupted request)."""
    x = kws[0]["hidden_states"].clone() if x is None else x.clone()
    outs = []
    with torch.no_grad():
        for s in range(steps if stop is None else stop):
            t = torch.full((x.shape[0],), 1.0 - s / steps)
            o = [call(b, dict(kw, hidden_states=x, timestep=t)) for b, kw in enumerate(kws)]
            outs.extend(o)
            v = o[0] if len(o) == 1 else o[1] + guidance * (o[0] - o[1])
            x = x - v / steps
    return outs


def fx_call(model):
    return lambda b, kw: model(**kw)[0]


def decisions_of(model) -> list[bool]:
    """fxcache's decision per call: True = computed."""
    return [r["kind"] == "full" for r in fxcache.stats(model)]


def signals_of(model) -> list[float | None]:
    return [r.get("signal") for r in fxcache.stats(model)]


# -- diffusers FirstBlockCache --------------------------------------------------------------------------------------

class DiffusersFBC:
    """A copy of the transformer with diffusers' FirstBlockCache, called as FluxPipeline calls it (one cache context
    per CFG branch); `computed` logs what its head-block hook decided on each call."""

    NAMES = ("cond", "uncond")

    def __init__(self, model, threshold: float):
        from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

        self.model = copy.deepcopy(model)
        self.model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        hook = HookRegistry.check_if_exists_or_initialize(self.model.transformer_blocks[0]).get_hook(
            "fbc_leader_block_hook")
        decide = hook._should_compute_remaining_blocks
        self.computed: list[bool] = []

        def spy(residual):
            result = decide(residual)
            self.computed.append(bool(result))
            return result

        hook._should_compute_remaining_blocks = spy

    def __call__(self, branch: int, kw: dict):
        with self.model.cache_context(self.NAMES[branch]):
            return self.model(**kw)[0]

    def reset(self):
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)


def assert_parity(fx_model, fx_outs, peer_computed, peer_outs, threshold, *, peer_signals=None, margin=MARGIN):
    """Same decision on every call, outputs within TOL, some calls reused and some computed after the first, and
    no decision read a signal within MARGIN of the threshold."""
    ours = decisions_of(fx_model)
    assert ours == peer_computed, (ours, peer_computed, signals_of(fx_model))
    assert len(fx_outs) == len(peer_outs) == len(ours)
    for i, (a, b) in enumerate(zip(fx_outs, peer_outs)):
        assert rel_err(a.float(), b.float()) <= TOL, (i, ours[i], rel_err(a.float(), b.float()))
    assert not all(ours[2:]) and any(ours[2:]), f"threshold {threshold} does not exercise both decisions: {ours}"
    signals = signals_of(fx_model)
    for i, s in enumerate(signals):
        if s is not None:
            assert abs(s - threshold) > margin, f"call {i}: signal {s} is borderline for threshold {threshold}"
    if peer_signals is not None:
        for i, (s, p) in enumerate(zip(signals, peer_signals)):
            assert (s is None) == (p is None), (i, s, p)
            if s is not None:
                assert abs(s - p) <= 1e-5 * max(abs(p), 1.0), (i, s, p)


@pytest.mark.parametrize("branches,batch,threshold", [
    (1, 1, 0.45),  # one call per step
    (2, 1, 0.45),  # true CFG: cond and uncond calls, one cache context each
    (1, 2, 0.45),  # a batch of two, decided on the whole batch
])
def test_fbcache_equals_diffusers_first_block_cache(branches, batch, threshold):
    model = tiny_flux()
    opts = dict(threshold=threshold) if batch == 1 else dict(threshold=threshold, reduce="mean")
    ours = compiled(model, "fbcache", **opts)
    peer = DiffusersFBC(model, threshold)
    kws = branch_inputs(batch, branches)
    steps = 8
    fx_outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold)
    if branches == 2:  # the branches decided apart (one reference each), not in lockstep
        per_branch = [[r["kind"] == "full" for r in fxcache.stats(ours) if r["branch"] == b] for b in (0, 1)]
        assert per_branch[0] != per_branch[1], per_branch


def test_fbcache_batch_rules_rows_and_mean():
    """Row 1's latents jump between two calls, row 0's follow the sampler. diffusers (one decision on the whole
    batch) reuses; on each row alone it reuses row 0 and computes row 1. reduce="mean" takes diffusers' batch
    decision, reduce="rows" computes because one row's change is over the threshold."""
    threshold = 0.73
    model = tiny_flux()
    kw = make_inputs("flux", batch=2)
    x0 = kw["hidden_states"]
    x1 = x0.clone()
    x1[0] = 0.97 * x0[0]
    x1[1] = x0[1] + 2.0 * torch.randn(x0[1].shape, generator=torch.Generator().manual_seed(5))
    calls = [dict(kw, hidden_states=x0, timestep=torch.tensor([1.0, 1.0])),
             dict(kw, hidden_states=x1, timestep=torch.tensor([0.9, 0.9]))]

    def row(call, i):
        return {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else v) for k, v in call.items()}

    def run_peer(inputs):
        peer = DiffusersFBC(model, threshold)
        outs = [peer(0, c) for c in inputs]
        return peer.computed, outs

    with torch.no_grad():
        peer_batch, peer_outs = run_peer(calls)
        peer_rows = [run_peer([row(c, i) for c in calls])[0] for i in (0, 1)]
        assert peer_batch == [True, False] and peer_rows == [[True, False], [True, True]], (peer_batch, peer_rows)
        row_signals = []
        for i in (0, 1):
            alone = compiled(model, "fbcache", threshold=threshold)
            for c in calls:
                alone(**row(c, i))
            assert decisions_of(alone) == peer_rows[i]
            row_signals.append(signals_of(alone)[1])
        results = {}
        for reduce in ("mean", "rows"):
            ours = compiled(model, "fbcache", threshold=threshold, reduce=reduce)
            outs = [ours(**c)[0] for c in calls]
            results[reduce] = (decisions_of(ours), signals_of(ours)[1], outs)

    decided, signal, outs = results["mean"]
    assert decided == peer_batch and signal <= threshold
    assert all(rel_err(a, b) <= TOL for a, b in zip(outs, peer_outs))
    decided, signal, outs = results["rows"]
    # "rows" records its largest row's signal: row 1's, over the threshold, so the call computes
    assert signal == pytest.approx(max(row_signals), rel=1e-5) and signal > threshold
    assert decided == [True, True]
    assert rel_err(outs[1], peer_outs[1]) > 1e-3  # it computed what the batch rule reused


# -- cache-dit DBCache ----------------------------------------------------------------------------------------------

class CacheDitDBCache:
    """A copy of the transformer with cache-dit's DBCache on it (transformer-only, as `cache_dit.enable_cache`
    installs it); `computed` / `signals` log what its `can_cache` decided on each call and the diff it recorded."""

    def __init__(self, model, *, separate_cfg: bool, taylorseer_order: int = 0, foca: bool = False, **config):
        import cache_dit
        from cache_dit import DBCacheConfig, FoCaCalibratorConfig, TaylorSeerCalibratorConfig

        self.model = copy.deepcopy(model)
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order) if taylorseer_order else None
        calibrator = FoCaCalibratorConfig() if foca else calibrator
        cache_dit.enable_cache(self.model, cache_config=DBCacheConfig(enable_separate_cfg=separate_cfg, **config),
                               calibrator_config=calibrator)
        manager = self.model._context_manager
        can_cache = manager.can_cache
        self.computed: list[bool] = []
        self.signals: list[float | None] = []

        def spy(*args, **kwargs):
            reuse = can_cache(*args, **kwargs)
            context = manager.get_context()
            diffs = context.get_cfg_residual_diffs() if context.is_separate_cfg_step() else context.get_residual_diffs()
            diff = diffs.get(str(context.get_current_step()))
            self.computed.append(not reuse)
            # cache-dit records -0.0 / -1.0 / -2.0 for "no signal read" (threshold <= 0, >= 1, shapes differ)
            self.signals.append(diff if diff is not None and math.copysign(1.0, diff) > 0 else None)
            return reuse

        manager.can_cache = spy

    def __call__(self, branch: int, kw: dict):
        return self.model(**kw)[0]

    def reset(self):
        import cache_dit

        cache_dit.refresh_context(self.model)


DBCACHE_CASES = [
    # (first_blocks, last_blocks, threshold, warmup_steps, max_cached_steps, max_continuous_cached_steps, batch)
    (1, 0, 0.42, 0, -1, -1, 1),  # F1B0: FirstBlockCache with cache-dit's rules (strict <)
    (1, 1, 0.5, 2, -1, 2, 1),  # F1B1, warm-up, at most two reused calls in a row
    (2, 1, 0.5, 1, 3, -1, 1),  # F2B1 (both double blocks probe), at most three reused calls
    (1, 1, 0.45, 1, -1, -1, 2),  # a batch of two, decided on the whole batch (reduce="mean")
]


@pytest.mark.parametrize("fn,bn,threshold,warmup,max_cached,max_row,batch", DBCACHE_CASES)
def test_dbcache_equals_cache_dit(fn, bn, threshold, warmup, max_cached, max_row, batch):
    model = tiny_flux()
    ours = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup,
                    max_cached_steps=max_cached, max_continuous_cached_steps=max_row,
                    reduce="rows" if batch == 1 else "mean")
    peer = CacheDitDBCache(model, separate_cfg=False, Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                           residual_diff_threshold=threshold, max_warmup_steps=warmup, max_cached_steps=max_cached,
                           max_continuous_cached_steps=max_row)
    kws = branch_inputs(batch)
    steps = 10
    fx_outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold, peer_signals=peer.signals)
    computed = decisions_of(ours)
    assert all(computed[:warmup])
    if max_cached >= 0:
        assert computed.count(False) == max_cached
    if max_row >= 0:
        assert f"{'0' * (max_row + 1)}" not in "".join("1" if c else "0" for c in computed)
        assert f"{'0' * max_row}" in "".join("1" if c else "0" for c in computed)
    blocks = [s.kind.value for s in next(r["plan"] for r in fxcache.stats(ours) if r["kind"] != "full").blocks]
    assert blocks == ["full"] * fn + ["residual"] * (5 - fn - bn) + ["full"] * bn, blocks


def test_dbcache_true_cfg_equals_cache_dit_separate_cfg():
    """True CFG, two calls per step: cache-dit with enable_separate_cfg=True keeps one state per branch (cond calls
    first), as fxcache keeps one per CFG branch."""
    fn, bn, threshold, warmup, max_cached, max_row = 1, 1, 0.45, 2, 3, 2
    model = tiny_flux()
    ours = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup,
                    max_cached_steps=max_cached, max_continuous_cached_steps=max_row)
    peer = CacheDitDBCache(model, separate_cfg=True, Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                           residual_diff_threshold=threshold, max_warmup_steps=warmup, max_cached_steps=max_cached,
                           max_continuous_cached_steps=max_row)
    kws = branch_inputs(branches=2)
    steps = 10
    fx_outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold, peer_signals=peer.signals)
    per_branch = [[r["kind"] == "full" for r in fxcache.stats(ours) if r["branch"] == b] for b in (0, 1)]
    assert all(per_branch[0][:warmup]) and all(per_branch[1][:warmup])  # warm-up counts steps, not calls
    assert per_branch[0] != per_branch[1], per_branch
    assert [b.count(False) for b in per_branch] == [max_cached, max_cached]  # the limit counts per branch


@pytest.mark.parametrize("threshold,reused", [(0.0, 0), (1.0, 4)])
def test_dbcache_threshold_ends_equal_cache_dit(threshold, reused):
    """threshold 0 never reuses; >= 1 reuses every call after the warm-up without reading a signal."""
    model = tiny_flux()
    ours = compiled(model, "dbcache", first_blocks=1, last_blocks=0, threshold=threshold, warmup_steps=2)
    peer = CacheDitDBCache(model, separate_cfg=False, Fn_compute_blocks=1, Bn_compute_blocks=0,
                           residual_diff_threshold=threshold, max_warmup_steps=2)
    kws = branch_inputs()
    fx_outs = sample(fx_call(ours), kws, 6)
    peer_outs = sample(peer, kws, 6)
    assert decisions_of(ours) == peer.computed and decisions_of(ours).count(False) == reused
    assert signals_of(ours) == peer.signals == [None] * 6
    assert all(rel_err(a, b) <= TOL for a, b in zip(fx_outs, peer_outs))



@pytest.mark.parametrize("method", ["fbcache", "dbcache"])
def test_bfloat16_signal_in_the_model_dtype_as_the_peers(method):
    """A bfloat16 model: the peers take the means and their ratio in the model's dtype; so does fxcache (every
    signal a bfloat16 value, cache-dit's recorded diffs exactly), and the decisions and outputs agree."""
    threshold = 0.43
    model = tiny_flux().to(torch.bfloat16)
    kws = [{k: v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
            for k, v in kw.items()} for kw in branch_inputs()]
    if method == "fbcache":
        ours = compiled(model, "fbcache", threshold=threshold)
        peer, peer_signals = DiffusersFBC(model, threshold), None
    else:
        ours = compiled(model, "dbcache", first_blocks=1, last_blocks=1, threshold=threshold, warmup_steps=0)
        peer = CacheDitDBCache(model, separate_cfg=False, Fn_compute_blocks=1, Bn_compute_blocks=1,
                               residual_diff_threshold=threshold, max_warmup_steps=0)
        peer_signals = peer.signals
    fx_outs = sample(fx_call(ours), kws, 8)
    peer_outs = sample(peer, kws, 8)
    assert fx_outs[0].dtype == torch.bfloat16
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold, peer_signals=peer_signals, margin=4e-3)
    signals = [s for s in signals_of(ours) if s is not None]
    assert signals and all(torch.tensor(s).to(torch.bfloat16).item() == s for s in signals), signals
    if peer_signals is not None:
        assert signals == [s for s in peer_signals if s is not None]


# -- through a pipeline, requests ------------------------------------------------------------------------------------

def spy_fbc(pipe) -> list[bool]:
    """Log what the FirstBlockCache head hook of `pipe.transformer` decides on each call (True = compute)."""
    from diffusers.hooks import HookRegistry

    hook = HookRegistry.check_if_exists_or_initialize(pipe.transformer.transformer_blocks[0]).get_hook(
        "fbc_leader_block_hook")
    decide, log = hook._should_compute_remaining_blocks, []

    def spy(residual):
        log.append(bool(decide(residual)))
        return log[-1]

    hook._should_compute_remaining_blocks = spy
    return log


def test_fbcache_pipeline_equals_diffusers_enable_cache_with_true_cfg():
    """A user's two ways on a tiny FluxPipeline with true CFG (cond / uncond calls in their cache contexts):
    `fxcache.enable(pipe, "fbcache")` and `pipe.transformer.enable_cache(FirstBlockCacheConfig(...))`. Then an
    interrupted request (the pipeline's `interrupt` flag set from a step callback): the next request equals a fresh
    one, on both."""
    from diffusers.hooks import FirstBlockCacheConfig
    from reliability.pipelines import flux_generate, flux_pipeline

    threshold, steps = 0.38, 8
    ours = flux_pipeline()
    fxcache.enable(ours, "fbcache", threshold=threshold, lowering="eager")
    peer = flux_pipeline()
    peer.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    peer_computed = spy_fbc(peer)

    def stop_after(step):
        def callback(pipe, i, t, kwargs):
            if i + 1 == step:
                pipe._interrupt = True
            return {}
        return dict(callback_on_step_end=callback)

    with torch.no_grad():
        image = flux_generate(ours, steps=steps, true_cfg=True)
        first = [r["kind"] == "full" for r in fxcache.stats(ours)]
        signals = [r.get("signal") for r in fxcache.stats(ours)]
        expected = flux_generate(peer, steps=steps, true_cfg=True)
        uncached = flux_generate(flux_pipeline(), steps=steps, true_cfg=True)
        assert first == peer_computed, (first, peer_computed, signals)
        assert rel_err(torch.from_numpy(image), torch.from_numpy(expected)) <= TOL
        assert not all(first[2:]) and any(first[2:]), first
        assert all(abs(s - threshold) > MARGIN for s in signals if s is not None), signals
        assert rel_err(torch.from_numpy(image), torch.from_numpy(uncached)) > 1e-3  # the reuse shows in the image

        # the same request stopped after 3 steps: its branches keep step 0's residual as their reference, which
        # the next request's first calls would match exactly (and reuse) if it were not started afresh
        for pipe in (ours, peer):
            flux_generate(pipe, steps=steps, true_cfg=True, **stop_after(3))
        interrupted = fxcache.stats(ours)[len(first):]
        assert [r["kind"] == "full" for r in interrupted] == first[:6] == [True, True] + [False] * 4
        del peer_computed[:]
        again = flux_generate(ours, steps=steps, true_cfg=True)
        again_peer = flux_generate(peer, steps=steps, true_cfg=True)
    assert [r["kind"] == "full" for r in fxcache.stats(ours)[len(first) + 6:]] == first == peer_computed
    assert rel_err(torch.from_numpy(again), torch.from_numpy(image)) == 0.0
    assert rel_err(torch.from_numpy(again_peer), torch.from_numpy(expected)) == 0.0


def test_dbcache_interrupted_request_then_a_fresh_one():
    """A loop stopped midway (after it used up max_cached_steps), then a new request from the first t, without a
    request boundary (the step rule sees t start over): the new request equals a fresh model's run, and cache-dit's
    after its context is refreshed."""
    opts = dict(first_blocks=1, last_blocks=1, threshold=0.5, warmup_steps=1, max_cached_steps=2)
    peer_opts = dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.5, max_warmup_steps=1,
                     max_cached_steps=2)
    model = tiny_flux()
    kws, steps = branch_inputs(), 8
    ours = compiled(model, "dbcache", **opts)
    peer = CacheDitDBCache(model, separate_cfg=False, **peer_opts)
    other = torch.randn(kws[0]["hidden_states"].shape, generator=torch.Generator().manual_seed(9))
    sample(fx_call(ours), kws, steps, x=other, stop=5)
    sample(peer, kws, steps, x=other, stop=5)
    stopped = decisions_of(ours)
    assert stopped == peer.computed and stopped.count(False) == 2, stopped  # the limit was reached
    peer.reset()
    del peer.computed[:], peer.signals[:]
    outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    fresh = compiled(model, "dbcache", **opts)
    fresh_outs = sample(fx_call(fresh), kws, steps)
    records = fxcache.stats(ours)[5:]
    assert [r["kind"] == "full" for r in records] == decisions_of(fresh) == peer.computed
    assert [r["step"] for r in records] == list(range(steps))
    assert decisions_of(fresh).count(False) == 2
    assert all(rel_err(a, b) == 0.0 for a, b in zip(outs, fresh_outs))
    assert all(rel_err(a, b) <= TOL for a, b in zip(outs, peer_outs))


@pytest.mark.inductor
def test_fbcache_inductor_two_requests_no_recompile_no_graph_break():
    """Through Inductor: two requests in a row, the second without a recompile; the whole model one graph; both
    requests decide as diffusers does and give its outputs."""
    from torch._dynamo.utils import counters

    threshold, steps = 0.45, 8
    model = tiny_flux()
    counters.clear()
    backend = fxcache.cache_backend("fbcache", lowering="inductor", strict=True, threshold=threshold)
    ours = torch.compile(copy.deepcopy(model), backend=backend, dynamic=False, fullgraph=True)
    peer = DiffusersFBC(model, threshold)
    kws = branch_inputs()
    first = sample(fx_call(ours), kws, steps)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = sample(fx_call(ours), kws, steps)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(backend.runners) == 1
    expected = sample(peer, kws, steps)
    peer.reset()
    expected += sample(peer, kws, steps)
    assert_parity(ours, first + second, peer.computed, expected, threshold)
    assert [r["step"] for r in fxcache.stats(ours)] == list(range(steps)) * 2


# -- options -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,opts,says", [
    ("fbcache", dict(threshold=-1), ["FBCacheConfig.threshold", ">= 0", "-1"]),
    ("dbcache", dict(threshold=-0.5), ["DBCacheConfig.threshold", ">= 0", "-0.5"]),
    ("dbcache", dict(first_blocks=0), ["DBCacheConfig.first_blocks", ">= 1", "got 0"]),
    ("dbcache", dict(last_blocks=-1), ["DBCacheConfig.last_blocks", ">= 0", "got -1"]),
    ("dbcache", dict(max_cached_steps=-2), ["DBCacheConfig.max_cached_steps", "-1", "no limit", "got -2"]),
    ("dbcache", dict(max_continuous_cached_steps=-3),
     ["DBCacheConfig.max_continuous_cached_steps", "-1", "no limit", "got -3"]),
    ("fbcache", dict(reduce="max"), ["FBCacheConfig.reduce", "rows", "mean", "'max'"]),
])
def test_bad_options_say_which_and_what_is_accepted(method, opts, says):
    with pytest.raises(fxcache.ConfigError) as info:
        fxcache.cache_backend(method, **opts)
    for part in says:
        assert part in str(info.value), (part, str(info.value))


@pytest.mark.parametrize("method,blocks,opts,says", [
    ("dbcache", (2, 3), dict(first_blocks=3, last_blocks=2), ["first_blocks=3", "last_blocks=2", "5 blocks",
                                                                "at most 4"]),
    ("dbcache", (2, 3), dict(first_blocks=6, last_blocks=0), ["first_blocks=6", "5 blocks", "at most 4"]),
    ("fbcache", (1, 0), {}, ["fbcache", "1 block", "at least 2"]),
])
def test_a_graph_too_small_for_the_settings_says_what_fits(method, blocks, opts, says):
    model = make_model("flux", num_layers=blocks[0], num_single_layers=blocks[1])
    model = compiled(model, method, **opts)
    with pytest.raises(fxcache.UnsupportedGraphError) as info, torch.no_grad():
        model(**make_inputs("flux"))
    for part in says:
        assert part in str(info.value), (part, str(info.value))


def test_dbcache_shared_cfg_signal_equals_cache_dit_cfg_diff_not_separate():
    """cfg="shared": the uncond call of a step takes the cond call's signal, as cache-dit does with
    enable_separate_cfg=True and cfg_diff_compute_separate=False; each branch keeps its own residuals."""
    fn, bn, threshold, warmup = 1, 0, 0.45, 1
    model = tiny_flux()
    ours = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup,
                    cfg="shared")
    peer = CacheDitDBCache(model, separate_cfg=True, Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                           residual_diff_threshold=threshold, max_warmup_steps=warmup,
                           cfg_diff_compute_separate=False)
    kws = branch_inputs(branches=2)
    steps = 10
    fx_outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold, peer_signals=peer.signals)
    records = fxcache.stats(ours)
    cond = {r["step"]: r["signal"] for r in records if r["branch"] == 0}
    uncond = {r["step"]: r["signal"] for r in records if r["branch"] == 1}
    assert all(uncond[s] == cond[s] for s in uncond if s >= warmup)
    separate = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup)
    sample(fx_call(separate), kws, steps)
    own = {r["step"]: r["signal"] for r in fxcache.stats(separate) if r["branch"] == 1}
    assert any(own[s] != cond[s] for s in own if s >= warmup)  # the branches' own signals differ


@pytest.mark.parametrize("order,branches", [(1, 1), (2, 2)])
def test_dbcache_taylorseer_forecast_equals_cache_dit_calibrator(order, branches):
    """forecast="taylorseer": a reused call adds the Taylor forecast of the middle blocks' residual, its factors
    updated at every computed call, as cache-dit's TaylorSeer calibrator (one per CFG branch)."""
    fn, bn, threshold, warmup = 1, 1, 0.5, 2
    model = tiny_flux()
    ours = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup,
                    forecast="taylorseer", forecast_order=order)
    peer = CacheDitDBCache(model, separate_cfg=branches == 2, taylorseer_order=order, Fn_compute_blocks=fn,
                           Bn_compute_blocks=bn, residual_diff_threshold=threshold, max_warmup_steps=warmup)
    kws = branch_inputs(branches=branches)
    steps = 12
    fx_outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold, peer_signals=peer.signals)
    plain = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup)
    plain_outs = sample(fx_call(plain), kws, steps)
    reused = [i for i, c in enumerate(decisions_of(ours)) if not c and i >= 4 * branches]
    assert reused and any(not torch.equal(fx_outs[i], plain_outs[i]) for i in reused)  # the forecast moved them


@pytest.mark.parametrize("branches,max_row,warmup", [(1, -1, 2), (2, 5, 2), (1, -1, 1)])
def test_dbcache_foca_forecast_equals_cache_dit_foca_calibrator(branches, max_row, warmup):
    """forecast="foca": a reused call adds cache-dit's FoCa forecast of the middle blocks' residual (a Heun step
    from the last computed residual, damped beyond 3 steps), one state per CFG branch; the loops reuse up to 9
    calls in a row (the damped horizon), and with one warm-up call the first reused call has one computed
    residual only (FoCa then reuses it as it is)."""
    fn, bn, threshold = 1, 1, 0.55
    model = tiny_flux()
    ours = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup,
                    max_continuous_cached_steps=max_row, forecast="foca")
    peer = CacheDitDBCache(model, separate_cfg=branches == 2, foca=True, Fn_compute_blocks=fn, Bn_compute_blocks=bn,
                           residual_diff_threshold=threshold, max_warmup_steps=warmup,
                           max_continuous_cached_steps=max_row)
    kws = branch_inputs(branches=branches)
    steps = 14
    fx_outs = sample(fx_call(ours), kws, steps)
    peer_outs = sample(peer, kws, steps)
    assert_parity(ours, fx_outs, peer.computed, peer_outs, threshold, peer_signals=peer.signals)
    plain = compiled(model, "dbcache", first_blocks=fn, last_blocks=bn, threshold=threshold, warmup_steps=warmup,
                     max_continuous_cached_steps=max_row)
    plain_outs = sample(fx_call(plain), kws, steps)
    reused = [i for i, c in enumerate(decisions_of(ours)) if not c]
    assert any(not torch.equal(fx_outs[i], plain_outs[i]) for i in reused)  # the forecast moved them


def test_a_transformer_that_ran_diffusers_cache_hooks_is_cached_as_a_fresh_one():
    """diffusers' `disable_cache()` leaves the hooked blocks' `forward` as an instance attribute, so Dynamo records
    their children under `transformer_blocks.0.forward.__self__.norm1`: fxcache reads that as the block's child and
    caches the model as it caches an untouched copy."""
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny_flux()
    used = copy.deepcopy(model)
    used.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    used.disable_cache()
    assert any("forward" in m.__dict__ for m in used.modules())
    kws = branch_inputs()
    outs = {}
    for name, m in (("fresh", model), ("used", used)):
        ours = compiled(m, "fbcache", threshold=0.45)
        outs[name] = (sample(fx_call(ours), kws, 8), decisions_of(ours))
    assert outs["used"][1] == outs["fresh"][1] and not all(outs["used"][1])
    assert all(torch.equal(a, b) for a, b in zip(outs["used"][0], outs["fresh"][0]))
