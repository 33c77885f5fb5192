"""`fxcache demo`: uncached vs. cached sampling on the embedded trained digit model: table, image grid, Pareto plot."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


DEMO_METHODS = (("DuCa N=5 R=0.9", "duca", {}), ("TaylorSeer (FLUX preset)", "taylorseer", {"preset": "flux"}),
                ("FORA N=3", "fora", {}))


def demo(argv=None) -> int:
    """Uncached vs. DuCa, TaylorSeer and FORA on the embedded trained FLUX-style digit model."""
    import os

    import fxcache
    from fxcache.config import make_config
    from fxcache.quality.evaluate import evaluate, pareto_plot
    from fxcache.quality.reference import load
    from fxcache.quality.sampling import save_grid

    p = argparse.ArgumentParser(prog="fxcache demo", description=demo.__doc__)
    p.add_argument("--out", default="fxcache-demo", help="output folder (default ./fxcache-demo)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    p.add_argument("--per-class", type=int, default=4, help="images per digit class (default 4: 40 images)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method, interleaved (default 2)")
    p.add_argument("--lowering", default="inductor", choices=fxcache.lowering_names())
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.steps < 1 or args.per_class < 1 or args.repeats < 1:
        p.error("--steps, --per-class and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    os.makedirs(args.out, exist_ok=True)

    ref = load("flux")
    params = sum(q.numel() for q in ref.transformer.parameters())
    print(f"fxcache demo: the embedded FLUX-style digit model ({params / 1e6:.1f}M params, trained on MNIST by "
          f"benchmarks/train_reference.py), {10 * args.per_class} digits, {args.steps} flow-matching Euler steps, "
          f"guidance 2 (batched CFG), lowering={args.lowering}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.machine()}")
    methods = {label: make_config(name, **opts) for label, name, opts in DEMO_METHODS}
    total = (1 + args.repeats) * (1 + len(methods)) + 1 + len(methods)
    done = [0]

    def progress(message: str) -> None:
        done[0] = min(done[0] + 1, total)
        bar = "#" * (30 * done[0] // total)
        sys.stdout.write(f"\r[{bar:<30}] {done[0]:>2}/{total} {message:<60.60}")
        sys.stdout.flush()

    t0 = time.perf_counter()
    report = evaluate(ref, methods, per_class=args.per_class, steps=args.steps, repeats=args.repeats,
                      lowering=args.lowering, progress=progress)
    sys.stdout.write(f"\r[{'#' * 30}] done in {time.perf_counter() - t0:.0f} s{' ' * 60}\n")
    table = report.table()
    print()
    print(table)
    print("\nPSNR / SSIM / rel. L2: the same noise, against the uncached images. FD: Frechet distance of our digit "
          "classifier's logits to those of the 5000 real digits (lower is better). accuracy: the classifier "
          "agrees with "
          "the class asked for. The noise floor row is the uncached model on other noise: two unrelated digits of "
          "the same class.")
    names = ["uncached"] + list(methods) + ["noise floor"]
    grid = torch.cat([report.samples[n] for n in names])
    save_grid(grid, os.path.join(args.out, "grid.png"), nrow=report.images)
    pareto_plot(report, os.path.join(args.out, "pareto.png"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {args.out}/grid.png (rows: {', '.join(names)}; same noise per column), "
          f"{args.out}/pareto.png and {args.out}/table.md")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fxcache demo [--out DIR] [--steps N] [--per-class N] [--repeats N] "
              "[--lowering inductor|eager] [--threads T]")
        return 0 if argv else 2
    if argv[0] == "demo":
        return demo(argv[1:])
    print(f"fxcache: unknown command {argv[0]!r}; commands: demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
