"""The peers of the quality harness: other libraries' caches, driven as their pipelines drive them.

On the committed trained DiT digit model (eager, 20 steps, 4 digits). Each peer must really cache (its output
moves away from the uncached one, but stays close), start every generation afresh (two generations in a row are
identical), and leave the reference's own transformer untouched.
"""

from __future__ import annotations

import pytest
import torch

from fxcache.config import make_config
from fxcache.quality import peers as P
from fxcache.quality.evaluate import evaluate
from fxcache.quality.metrics import psnr
from fxcache.quality.reference import load
from fxcache.quality.sampling import sample

STEPS = 20


@pytest.fixture(scope="module")
def setup():
    ref = load("dit")
    labels = torch.tensor([0, 3, 7, 9])
    base = sample(ref, ref.transformer, labels, steps=STEPS, seed=0)
    return ref, labels, base


def peer_cases():
    ratios = [1.0] + [0.98] * (STEPS - 1)  # a flat magnitude decay: MagCache skips once the error builds up
    cases = [P.first_block_cache(0.2), P.diffusers_taylorseer(3, 1, warmup=2), P.pyramid_attention_broadcast(2),
             P.faster_cache(2), P.mag_cache(0.12, ratios)]
    return cases + [P.cachedit_dbcache(0.2, warmup=4), P.cachedit_dbcache(0.2, warmup=4, taylorseer_order=1)]


@pytest.mark.parametrize("peer", peer_cases(), ids=lambda p: p.label)
def test_peer_caches_and_resets_between_generations(setup, peer):
    ref, labels, base = setup
    before = {k: v.clone() for k, v in ref.transformer.state_dict().items()}
    model = peer.make(ref, STEPS)
    outs = []
    for _ in range(2):
        model.reset()
        outs.append(sample(ref, model, labels, steps=STEPS, seed=0))
    assert torch.equal(outs[0], outs[1]), "state leaked from one generation into the next"
    quality = psnr(outs[0], base).mean().item()
    assert 20.0 < quality < 90.0, f"{peer.label}: PSNR {quality:.1f} dB vs uncached (90+ means nothing was cached)"
    after = ref.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(sample(ref, ref.transformer, labels, steps=STEPS, seed=0), base), "hooks leaked into ref"


def test_diffusers_taylorseer_reaches_dit_attention(setup):
    """diffusers' default patterns (`...attn`) miss DiT's `attn1`; ours name them, so the hook lands on each."""
    ref, _, _ = setup
    model = P.diffusers_taylorseer(5).make(ref, STEPS)
    from diffusers.hooks import HookRegistry

    hooked = [n for n, m in model.inner.named_modules() if getattr(m, "_diffusers_hook", None) is not None
              and isinstance(m._diffusers_hook, HookRegistry) and m._diffusers_hook.hooks]
    assert sorted(hooked) == sorted(f"transformer_blocks.{i}.attn1" for i in range(len(ref.transformer.transformer_blocks)))


def test_mag_cache_calibration_gives_one_ratio_per_step(setup):
    ref, _, _ = setup
    ratios = P.calibrate_mag_ratios(ref, 10)
    assert len(ratios) == 10 and ratios[0] == 1.0 and all(0.5 < r < 2.0 for r in ratios)


def test_peer_rows_in_the_harness(setup):
    ref, _, _ = setup
    report = evaluate(ref, {"DuCa": make_config("duca"), "FBCache": P.first_block_cache(0.2)}, per_class=1, steps=STEPS,
                      repeats=1, lowering="eager")
    rows = {r.label: r for r in report.rows}
    assert rows["FBCache"].kind == "peer" and rows["DuCa"].kind == "method"
    assert 1.0 < rows["FBCache"].flops_speedup < 10.0  # counted on its hooked eager run: fewer FLOPs than uncached
    assert rows["FBCache"].psnr < 90.0
    assert "FBCache" in report.table()
    # each fxcache method has an uncached fewer-steps row within half a step's compute of its own FLOPs
    per_step = rows["uncached"].flops / STEPS
    fewer = [r for r in report.rows if r.kind == "fewer steps"]
    assert fewer and all(r.steps < STEPS for r in fewer)
    assert any(abs(r.flops - rows["DuCa"].flops) <= per_step / 2 for r in fewer), \
        ([r.flops for r in fewer], rows["DuCa"].flops, per_step)


def _graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_a_compiled_peer_leaves_other_compiled_models_alone(setup):
    """Compiling a hooked copy once made the fxcache model of the same class drop to eager at its top frame (its
    blocks then compiled one by one; with `_own_forward` patched out this test fails on torch 2.13): each peer
    copy gets a forward code object of its own."""
    import fxcache

    ref, labels, _ = setup
    fora = torch.compile(ref.transformer, backend=fxcache.cache_backend("fora", lowering="eager"), dynamic=False)
    sample(ref, fora, labels, steps=4, seed=0)
    peer = P.first_block_cache(0.2).make(ref, 4).compile(backend="eager", dynamic=False)
    peer.reset()
    sample(ref, peer, labels, steps=4, seed=0)
    before = _graphs()
    sample(ref, fora, labels, steps=4, seed=0)
    assert _graphs() == before, "the fxcache model was traced again after the peer ran"
