"""Speed vs. quality of every fxcache method and its peers on a trained reference digit model, side by side in one run.

    python benchmarks/eval_quality.py --family flux                 # 100 digits, 50 steps, Inductor, with peers
    python benchmarks/eval_quality.py --family dit --per-class 4 --repeats 1 --lowering eager --no-peers  # quick
    python benchmarks/eval_quality.py --family dit --faithful    # each preset as the authors' code vs. cleaned up
    python benchmarks/eval_quality.py --family scenes --all --per-class 2 --repeats 2 --guidance 4
        # the text-to-image reference (256 image tokens): default rows, faithful presets and peers in one run

Peers: diffusers' cache hooks (FirstBlockCache, TaylorSeer, PAB, FasterCache, MagCache) and cache-dit (DBCache,
its TaylorSeer calibrator) at two to four settings each, each on its own copy of the same model, same sampler and
same noise (`fxcache.quality.peers`); compiled with plain torch.compile, as their users would.

Writes <out>/quality_<family>.md (the table: pooled PSNR with the per-image range, each method followed by the
uncached sampler with fewer steps at its FLOPs; and a verdict per method against that row) and
<out>/quality_<family>.png (latency speedup vs. PSNR, with the noise floor and the fewer-steps curve), and prints
both.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

try:
    import fxcache
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fxcache

from fxcache.config import make_config
from fxcache.quality.evaluate import evaluate, latency_note, pareto_plot, verdicts
from fxcache.quality.peers import all_peers, cachedit_available
from fxcache.quality.reference import ALL_FAMILIES, load_family

#: label -> (method, options); presets where the method's paper has one for the family (else its defaults).
METHODS = {
    "FORA N=3": ("fora", {"interval": 3}),
    "DuCa N=5 R=0.9": ("duca", {}),
    "ToCa N=4 r=0.1 vnorm": ("toca", {"interval": 4, "fresh_ratio": 0.1, "score": "vnorm", "staleness_weight": 0.25}),
    "TaylorSeer N=6 O=2 W=3": ("taylorseer", {}),
    "ClusCa N=5 K=16": ("clusca", {}),
}


#: the cleaned-up variant of each faithful preset: the options that differ from the authors' code
CLEANED = {
    "toca": ("rows shared", {"rows": "shared"}),
    "duca": ("random tokens", {"score": "random", "staleness_weight": 0.0, "spatial_grid": 0, "spatial_bonus": 0.0}),
    "clusca": ("exact anchor, shared draws, fixed k-means", {"anchor": "exact", "draws": "shared", "kmeans": "fixed"}),
}


def faithful_methods(family: str, steps: int) -> dict:
    """Each method's preset for `family` (the authors' behaviour) next to its cleaned-up variant (`CLEANED`),
    at the same step and block schedule; presets written for another step count are given `num_steps=steps`.
    The text-to-image reference is a FLUX model: its presets are the FLUX ones."""
    from fxcache.config import get_method, preset_options

    family = "flux" if family == "scenes" else family
    out = {}
    for name in ("fora", "toca", "duca", "taylorseer", "clusca"):
        if family not in get_method(name).PRESETS:
            continue
        base = preset_options(name, family, steps)
        out[f"{name} preset={family} (authors)"] = make_config(name, preset=family, **base)
        if name in CLEANED:
            what, opts = CLEANED[name]
            cleaned = make_config(name, preset=family, **dict(base, **opts))
            if cleaned != out[f"{name} preset={family} (authors)"]:  # e.g. DuCa's FLUX preset already draws
                out[f"{name} preset={family} ({what})"] = cleaned
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=ALL_FAMILIES, default="flux")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--lowering", default="inductor", choices=fxcache.lowering_names())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peers", action="store_true", help="fxcache methods only")
    p.add_argument("--faithful", action="store_true",
                   help="each method's preset for the family (the authors' code) next to its cleaned-up variant, "
                        "instead of the default rows (implies --no-peers)")
    p.add_argument("--all", action="store_true",
                   help="the default rows, the faithful presets (authors' and cleaned up) and the peers in one run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on this machine, before ours
    # twenty compiled copies of one model class in one process: room for all their graphs
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    ref = load_family(args.family)
    if args.faithful:
        methods = faithful_methods(args.family, args.steps)
    else:
        methods = {label: make_config(name, **opts) for label, (name, opts) in METHODS.items()}
    if args.all:
        methods.update(faithful_methods(args.family, args.steps))
    if not args.no_peers and not args.faithful:
        if not cachedit_available():
            print("cache-dit is not installed (pip install cache-dit): its rows are left out", flush=True)
        methods.update({peer.label: peer for peer in all_peers(ref, args.steps, args.guidance)})
    report = evaluate(ref, methods, per_class=args.per_class, steps=args.steps, repeats=args.repeats,
                      guidance=args.guidance, lowering=args.lowering,
                      progress=lambda m: print(m, flush=True))
    head = (f"{args.family}: {report.images} images, {args.steps} steps, guidance {args.guidance}, "
            f"lowering {args.lowering}, {args.threads} threads, torch {torch.__version__}, {platform.machine()}, "
            f"{datetime.date.today().isoformat()}")
    text = report.table() + "\n\nAgainst fewer steps at equal FLOPs (pooled PSNR):\n\n" + "".join(
        f"- {v.line()}\n" for v in verdicts(report.rows))
    caution = latency_note(report.rows, load, os.cpu_count())
    if caution:
        text += f"\nNote: {caution}.\n"
    print(head)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = f"quality_{args.family}" + ("_faithful" if args.faithful else "_all" if args.all else "")
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(head + "\n\n" + text)
    pareto_plot(report, os.path.join(args.out, stem + ".png"))


if __name__ == "__main__":
    main()
