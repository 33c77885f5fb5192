"""Paired PSNR differences between each faithful preset and its cleaned-up variant, on the trained references.

    python benchmarks/compare_faithful.py dit pixart flux

Same noise and labels (40 digits, 50 steps, guidance 2, batched CFG) for both variants of a pair; prints each
variant's mean PSNR against the uncached model and the mean per-image difference with its standard error, so a
default can be picked on more than two means (BENCHMARKS.md, "Faithful presets against the cleaned-up variants").
Eager lowering: PSNR does not depend on it.
"""

import sys

import torch

from fxcache import cache_backend
from fxcache.config import get_method, make_config, preset_options
from fxcache.quality.metrics import psnr
from fxcache.quality.reference import load
from fxcache.quality.sampling import sample


def run(family, pairs, per_class=4, steps=50):
    """Print A, B and the paired B - A PSNR (dB) for each (A, B) config pair on `family`'s reference."""
    ref = load(family)
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(ref.latent_shape(len(labels)), generator=torch.Generator().manual_seed(0))
    base = sample(ref, ref.transformer, labels, steps=steps, guidance=2.0, cfg="batched", noise=noise)
    for name, (a, b) in pairs.items():
        outs = []
        for cfg in (a, b):
            torch._dynamo.reset()
            m = torch.compile(ref.transformer, backend=cache_backend(cfg, lowering="eager"), dynamic=False)
            images = sample(ref, m, labels, steps=steps, guidance=2.0, cfg="batched", noise=noise)
            outs.append(psnr(images, base).clamp_max(100))
        d = outs[1] - outs[0]
        print(f"{family} {name}: A {outs[0].mean():.2f} B {outs[1].mean():.2f}  B-A {d.mean():+.3f} "
              f"+- {d.std() / len(d) ** 0.5:.3f} (se, n={len(d)})", flush=True)


def pairs_for(fam: str) -> dict:
    """The preset of each method for `fam` (the authors' code) next to its cleaned-up variant."""
    base = preset_options("toca", fam, 50)
    pairs = {"toca each->shared": (make_config("toca", **base), make_config("toca", **dict(base, rows="shared")))}
    if fam in get_method("clusca").PRESETS:
        C = preset_options("clusca", fam, 50)
        cleaned = dict(C, anchor="exact", draws="shared", kmeans="fixed")
        pairs["clusca ref->exact"] = (make_config("clusca", **C), make_config("clusca", **cleaned))
    if fam in ("dit", "pixart"):
        D = dict(get_method("duca").PRESETS[fam], num_steps=50)
        cleaned = dict(D, score="random", staleness_weight=0.0, spatial_grid=0, spatial_bonus=0.0)
        pairs["duca scored->random"] = (make_config("duca", **D), make_config("duca", **cleaned))
    return pairs


if __name__ == "__main__":
    torch.set_num_threads(2)
    for family in sys.argv[1:] or ["dit", "pixart", "flux"]:
        run(family, pairs_for(family))
