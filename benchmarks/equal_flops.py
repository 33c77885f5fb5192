"""At equal FLOPs, which caching wins? Each fxcache method swept over its interval (and ToCa / DuCa over their token
ratio) on a reference model, next to the uncached sampler with fewer steps; PSNR against the uncached images
(pooled over the images: from the mean per-image MSE), interpolated at common FLOPs speedups.

    python benchmarks/equal_flops.py --family scenes --per-class 2 --guidance 4     # ~15 min on 2 CPU threads

Quality and FLOPs do not depend on the lowering, so the sweep runs eager (no compile); latency is left to
eval_quality.py. Writes <out>/equal_flops_<family>.md (every point, and PSNR per method at 2x, 3x, 4x and 5x fewer
FLOPs, interpolated linearly in log FLOPs between a method's own points, never extrapolated) and
<out>/equal_flops_<family>.png (PSNR vs FLOPs speedup, one line per method).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys

import torch

try:
    import fxcache  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fxcache.config import make_config
from fxcache.quality.evaluate import db, evaluate, psnr_spread
from fxcache.quality.reference import ALL_FAMILIES, load_family

#: method -> settings swept (label, options); each method's defaults are among them
SWEEP = {
    "FORA": [(f"FORA N={n}", ("fora", {"interval": n})) for n in (2, 3, 4, 5, 6)],
    "TaylorSeer": [(f"TaylorSeer N={n} O=2", ("taylorseer", {"interval": n, "order": 2})) for n in (3, 4, 5, 6, 8)],
    "ToCa": [(f"ToCa N={n} r={r}", ("toca", {"interval": n, "fresh_ratio": r})) for n, r in
             ((2, 0.1), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1), (4, 0.3))],
    "DuCa": [(f"DuCa N={n} R=0.9", ("duca", {"interval": n})) for n in (3, 4, 5, 6, 8)],
    "ClusCa": [(f"ClusCa N={n} K=16", ("clusca", {"interval": n})) for n in (3, 4, 5, 6, 8)],
}
TOKEN_WISE = ("ToCa", "DuCa", "ClusCa")
TARGETS = (2.0, 3.0, 4.0, 5.0)


def at(points: list[tuple[float, float]], x: float) -> float | None:
    """PSNR at FLOPs speedup x, linear in log(x) between the two nearest points; None outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return max(y0, y1)
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=ALL_FAMILIES, default="scenes")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    ref = load_family(args.family)
    configs = {label: make_config(name, **opts) for rows in SWEEP.values() for label, (name, opts) in rows}
    # the harness adds the uncached sampler with fewer steps at every setting's FLOPs: the fewer-steps curve
    report = evaluate(ref, configs, per_class=args.per_class, steps=args.steps, repeats=0, guidance=args.guidance,
                      lowering="eager", progress=lambda m: print(m, flush=True))
    rows = {r.label: r for r in report.rows}
    curves = {m: [(rows[label].flops_speedup, rows[label].psnr) for label, _ in sweep if rows[label].flops_speedup]
              for m, sweep in SWEEP.items()}
    curves["fewer steps"] = [(r.flops_speedup, r.psnr) for r in report.rows if r.kind == "fewer steps"]
    floor = next(r.psnr for r in report.rows if r.kind == "noise floor")
    head = (f"{args.family}: {report.images} images, {args.steps} steps, guidance {args.guidance} (batched CFG), "
            f"eager, {args.threads} threads, torch {torch.__version__}, {platform.machine()}, "
            f"{datetime.date.today().isoformat()}; noise floor {db(floor)} dB (pooled PSNR)")
    lines = [head, "",
             "Pooled PSNR (dB) against uncached at equal FLOPs (interpolated; '-' outside a method's range):", "",
             "| method | " + " | ".join(f"{x:g}x fewer FLOPs" for x in TARGETS) + " |",
             "|---|" + "---:|" * len(TARGETS)]
    for m, pts in curves.items():
        vals = [at(pts, x) for x in TARGETS]
        lines.append(f"| {m}{' (token-wise)' if m in TOKEN_WISE else ''} | "
                     + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    lines += ["", "Every point:", "",
              "| setting | FLOPs speedup | PSNR dB (pooled) | per-image PSNR min–max | SSIM | FD | adherence |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        if r.flops_speedup:
            ssim = "-" if r.ssim is None else f"{r.ssim:.4f}"  # none for uncached against itself
            lines.append(f"| {r.label} | {r.flops_speedup:.2f} | {db(r.psnr)} | {psnr_spread(r)} | {ssim} | "
                         f"{r.fd:.2f} | {r.accuracy:.3f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"equal_flops_{args.family}.md"), "w") as f:
        f.write(text + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=130)
    finite = [y for pts in curves.values() for _, y in pts if math.isfinite(y)] + [floor]
    top = max(finite) + 0.15 * max(max(finite) - min(finite), 1.0)  # where identical images (+inf) are drawn
    if any(math.isinf(y) for pts in curves.values() for _, y in pts):
        ax.axhline(top, ls=":", color="black", lw=0.8)
        ax.annotate("identical to uncached (PSNR = inf)", (0, top), xycoords=("axes fraction", "data"),
                    xytext=(4, 4), textcoords="offset points", fontsize=7)
    for m, pts in curves.items():
        pts = sorted(pts)
        style = dict(color="grey", ls="--", marker="s") if m == "fewer steps" else dict(
            marker="o", ls="-" if m in TOKEN_WISE else ":")
        ax.plot([x for x, _ in pts], [top if math.isinf(y) else y for _, y in pts], label=m, **style)
    ax.axhline(floor, color="black", lw=0.8, ls="-.", label="noise floor")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs speedup vs uncached (log)")
    ax.set_ylabel("PSNR vs uncached, pooled over the images (dB)")
    ax.set_title(f"{args.family}: equal-FLOPs comparison ({report.images} images, {args.steps} steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"equal_flops_{args.family}.png"))


if __name__ == "__main__":
    main()
