"""`fxcache demo`: uncached vs. cached sampling on the embedded default model, with a speed/quality table."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def _demo_model():
    from .testing.models import make_model

    # The embedded default: a FLUX-style MMDiT (double + single blocks), random init, built from a config.
    return make_model("flux", num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                      joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))


def _inputs(size: int, text: int, seed: int):
    from .testing.models import flux_ids

    g = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = flux_ids(size, size, text)
    return dict(hidden_states=torch.randn(1, size * size, 16, generator=g),
                encoder_hidden_states=torch.randn(1, text, 64, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), img_ids=img_ids, txt_ids=txt_ids)


def _sample(model, cond, steps: int, progress) -> torch.Tensor:
    x = cond["hidden_states"]
    ts = [1.0 - s / steps for s in range(steps + 1)]
    with torch.no_grad():
        for s in range(steps):
            kw = dict(cond, hidden_states=x, timestep=torch.tensor([ts[s]]), return_dict=False)
            x = x + (ts[s + 1] - ts[s]) * model(**kw)[0]
            progress()
    return x


def demo(argv=None) -> int:
    import fxcache

    p = argparse.ArgumentParser(prog="fxcache demo", description=__doc__)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=16, help="latent side: size*size image tokens")
    p.add_argument("--lowering", default="inductor", choices=fxcache.lowering_names())
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64

    model = _demo_model()
    cond = _inputs(args.size, 16, seed=0)
    methods = [("uncached", None), ("DuCa N=5 R=0.9", fxcache.DuCaConfig(interval=5, ratio=0.9)),
               ("FORA N=3", fxcache.FORAConfig(interval=3))]
    params = sum(p.numel() for p in model.parameters())
    print(f"fxcache demo: FLUX-style model ({params / 1e6:.1f}M params, random init), {args.size * args.size} image "
          f"tokens, {args.steps} Euler steps, lowering={args.lowering}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.machine()}")
    rows, results = [], {}
    for label, config in methods:
        if config is None:
            compiled = model if args.lowering == "eager" else torch.compile(model, dynamic=False)
        else:
            compiled = torch.compile(model, backend=fxcache.cache_backend(config, lowering=args.lowering),
                                     dynamic=False)
        done = [0]
        total = args.steps * 2

        def progress():
            done[0] += 1
            bar = "#" * (30 * done[0] // total)
            sys.stdout.write(f"\r  {label:<16} [{bar:<30}] {done[0]}/{total}")
            sys.stdout.flush()

        t0 = time.perf_counter()
        _sample(compiled, cond, args.steps, progress)  # warm-up: compiles every variant it needs
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = _sample(compiled, cond, args.steps, progress)
        seconds = time.perf_counter() - t0
        print()
        kinds, flops = "", None
        if config is not None:
            recs = fxcache.stats(compiled)[-args.steps:]
            kinds = "".join(r["kind"][0].upper() for r in recs)
            flops = sum(r["flops"] for r in recs)
        results[label] = (x, seconds, flops, warm, kinds)
    base_x, base_s, _, _, _ = results["uncached"]
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(**dict(cond, timestep=torch.tensor([1.0]), return_dict=False))
    step_flops = fc.get_total_flops()
    print()
    print("| method | loop s | latency speedup | FLOPs speedup | rel. L2 vs uncached | steps (F/P/S/R) |")
    print("|---|---|---|---|---|---|")
    for label, (x, seconds, flops, warm, kinds) in results.items():
        err = ((x - base_x).norm() / base_x.norm()).item()
        fs = step_flops * args.steps / flops if flops else 1.0
        print(f"| {label} | {seconds:.2f} | {base_s / seconds:.2f}x | {fs:.2f}x | {err:.2e} | {kinds or '-'} |")
    print("\nF = full, P = partial (10% of tokens through the MLPs), S = skip (no block), R = reuse (FORA).")
    print("Random weights: errors here show the caching is active, not image quality.")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fxcache demo [--steps N] [--size S] [--lowering inductor|eager] [--threads T]")
        return 0 if argv else 2
    if argv[0] == "demo":
        return demo(argv[1:])
    print(f"fxcache: unknown command {argv[0]!r}; commands: demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
