"""Latency vs. FLOPs of fxcache's variants on a FLUX-style transformer, CPU, Inductor lowering.

One compiled model per method (all `dynamic=False`, Inductor; `--methods` picks a subset):
    uncached   torch.compile(model)
    duca       torch.compile(model, backend=fxcache.cache_backend("duca", interval=5, ratio=0.9))
    duca-flux  ... cache_backend("duca", preset="flux")         N=5, R=0.9, W=3 (the DuCa paper's FLUX run)
    fora       ... cache_backend("fora", interval=3)
    toca       ... cache_backend("toca", preset="flux")         N=4, W=3, r=0.1, attention score, FLUX ratios
    taylorseer ... cache_backend("taylorseer", preset="flux")   N=6, order 2, W=3
    clusca     ... cache_backend("clusca", preset="flux")       N=5, order 1, K=16, gamma=0.005, W=3
run a whole flow-matching Euler loop of S steps from the same noise. Reported, side by side from one run:
loop latency (median of R interleaved repeats), loop FLOPs (torch.utils.flop_counter), latency speedup,
FLOPs speedup, efficiency = latency speedup / FLOPs speedup, the relative L2 error of each final sample vs.
the uncached one, and per variant kind: calls per loop, median ms per call, GFLOPs per call.

    python benchmarks/bench_variants.py                 # full size: 32x32 = 1024 image tokens, 50 steps
    python benchmarks/bench_variants.py --quick         # smoke test (tiny model, 10 steps)
    python benchmarks/bench_variants.py --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

try:
    import fxcache
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fxcache

from fxcache.passes.propagate_shapes import eager_flops

#: Every method at the settings its paper reports for FLUX.1-dev (the presets), plus the core issue's DuCa (W=1).
ALL_METHODS = {
    "uncached": None,
    "duca": dict(method="duca", interval=5, ratio=0.9),
    "duca-flux": dict(method="duca", preset="flux"),
    "fora": dict(method="fora", interval=3),
    "toca": dict(method="toca", preset="flux"),
    "taylorseer": dict(method="taylorseer", preset="flux"),
    "clusca": dict(method="clusca", preset="flux"),
}
METHODS = dict(ALL_METHODS)

FULL_MODEL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
                  num_attention_heads=8, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
                  axes_dims_rope=(8, 28, 28))
QUICK_MODEL = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
                   axes_dims_rope=(4, 4, 8))


# -- arguments ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="sampling steps S per loop (default 50; quick 10)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats R of each loop (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--size", type=int, default=None, help="latent side; image tokens = size^2 (default 32; quick 8)")
    p.add_argument("--text", type=int, default=None, help="text tokens (default 64; quick 16)")
    p.add_argument("--double", type=int, default=None, help="double-stream blocks (default 2; quick 1)")
    p.add_argument("--single", type=int, default=None, help="single-stream blocks (default 4; quick 1)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads of 64 dims: hidden = 64 * heads (default 8; quick: 2 heads of 16)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke test: size 8, text 16, 1 double + 1 single, heads 2 x 16, steps 10, repeats 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, noise and conditioning")
    p.add_argument("--json", metavar="PATH", help="write every number as JSON to PATH")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated subset of {', '.join(ALL_METHODS)} (uncached is always run)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in ALL_METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    args.methods = ["uncached"] + [m for m in names if m != "uncached"]
    preset = (dict(steps=10, repeats=1, size=8, text=16, double=1, single=1) if args.quick
              else dict(steps=50, repeats=3, size=32, text=64, double=2, single=4))
    for k, v in preset.items():  # explicit options win over the preset
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "repeats", "threads", "size", "text"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    if args.heads is not None and args.heads < 1:
        p.error("--heads must be >= 1")
    if args.double < 0 or args.single < 0 or args.double + args.single < 1:
        p.error("--double and --single must be >= 0, with at least one block")
    return args


# -- FLOPs --------------------------------------------------------------------------------------------------
def register_cpu_attention_flops() -> bool:
    """fxcache registers a FLOP formula for CPU attention (torch's counter lacks one); the eager count uses it too."""
    from torch.utils.flop_counter import flop_registry

    from fxcache.passes.propagate_shapes import ensure_cpu_attention_flops

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    missing = op is not None and op not in flop_registry
    ensure_cpu_attention_flops()
    return missing


# -- model, inputs, loop ------------------------------------------------------------------------------------
def build_model(args) -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel

    cfg = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    cfg.update(num_layers=args.double, num_single_layers=args.single)
    if args.heads is not None:
        cfg.update(num_attention_heads=args.heads)
    torch.manual_seed(args.seed)
    model = FluxTransformer2DModel(**cfg).eval()  # random init, fp32
    return model, cfg


def build_inputs(args, cfg: dict) -> tuple[torch.Tensor, dict]:
    """Initial noise (1, N, in_channels) and the step-independent conditioning, FLUX layout."""
    from fxcache.testing.models import flux_ids

    g = torch.Generator().manual_seed(args.seed)
    n = args.size * args.size
    noise = torch.randn(1, n, cfg["in_channels"], generator=g)
    img_ids, txt_ids = flux_ids(args.size, args.size, args.text)
    cond = dict(
        encoder_hidden_states=torch.randn(1, args.text, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
    )
    return noise, cond


def timesteps(steps: int) -> list[float]:
    """t_s = 1 - s/S, s = 0..S: strictly decreasing, t_0 = 1; the model sees t_0..t_{S-1} (all in (0, 1])."""
    return [1.0 - s / steps for s in range(steps + 1)]


def sample(model, noise: torch.Tensor, cond: dict, ts: list[float], on_call=None) -> torch.Tensor:
    """Flow-matching Euler: x_{s+1} = x_s + (t_{s+1} - t_s) * v(x_s, t_s). `on_call(seconds)` after each call."""
    x = noise.clone()
    t_in = [torch.full((x.shape[0],), t, dtype=torch.float32) for t in ts[:-1]]
    for s in range(len(ts) - 1):
        if on_call is None:
            v = model(hidden_states=x, timestep=t_in[s], **cond)[0]
        else:
            t0 = time.perf_counter()
            v = model(hidden_states=x, timestep=t_in[s], **cond)[0]
            on_call(time.perf_counter() - t0)
        x = x + (ts[s + 1] - ts[s]) * v
    return x


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def compile_all(model) -> tuple[dict, dict]:
    compiled, backends = {}, {}
    for name, spec in METHODS.items():
        if spec is None:
            compiled[name] = torch.compile(model, dynamic=False)
        else:
            opts = dict(spec)
            backends[name] = fxcache.cache_backend(opts.pop("method"), **opts)
            compiled[name] = torch.compile(model, backend=backends[name], dynamic=False)
    return compiled, backends


def per_call_loop(name: str, cmodel, noise, cond, ts) -> dict:
    """One extra loop with every call timed; cached calls grouped by the kind of their stats record."""
    cached = METHODS[name] is not None
    n_before = len(fxcache.stats(cmodel)) if cached else 0
    calls: list[tuple[str, float, int | None]] = []  # (kind, seconds, flops)
    seen = [n_before]  # records observed so far

    def on_call(seconds: float) -> None:
        if not cached:
            calls.append(("full", seconds, None))
            return
        recs = fxcache.stats(cmodel)  # outside the timed window
        new, seen[0] = recs[seen[0]:], len(recs)
        # one record per call unless Dynamo broke the model into several graphs: the call is then filed under
        # the kind of its last record, with the FLOPs of all its records
        flops = None if not new or any(r["flops"] is None for r in new) else sum(r["flops"] for r in new)
        calls.append((new[-1]["kind"] if new else "?", seconds, flops))

    gc.collect()
    t0 = time.perf_counter()
    sample(cmodel, noise, cond, ts, on_call=on_call)
    loop_s = time.perf_counter() - t0
    kinds: dict[str, dict] = {}
    for kind, seconds, flops in calls:
        k = kinds.setdefault(kind, dict(calls=0, seconds=[], flops=set()))
        k["calls"] += 1
        k["seconds"].append(seconds)
        k["flops"].add(flops)
    out = {}
    for kind, k in kinds.items():
        flops = sorted(f for f in k["flops"] if f is not None)
        out[kind] = dict(calls_per_loop=k["calls"], ms_per_call=1e3 * statistics.median(k["seconds"]),
                         ms_per_call_all=[1e3 * s for s in k["seconds"]],
                         flops_per_call=flops[0] if len(flops) == 1 and None not in k["flops"] else None)
        if len(flops) > 1:
            out[kind]["flops_per_call_values"] = flops
    loop_records = fxcache.stats(cmodel)[n_before:] if cached else []
    return dict(kinds=out, loop_s_with_timers=loop_s, records=loop_records,
                records_per_call=(len(loop_records) / len(calls)) if cached else None)


# -- report -------------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    proc = platform.processor()
    model_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(processor=proc, cpu_model=model_name, machine=platform.machine(), cpu_count=os.cpu_count(),
                torch=torch.__version__, threads=threads, torch_threads=torch.get_num_threads(),
                python=platform.python_version(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main(argv=None) -> dict:
    global METHODS
    args = parse_args(argv)
    METHODS = {name: ALL_METHODS[name] for name in args.methods}
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    register_cpu_attention_flops()
    attn_flops = True

    model, cfg = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    noise, cond = build_inputs(args, cfg)
    ts = timesteps(args.steps)
    info = machine_info(args.threads)
    n_img, n_txt = args.size * args.size, args.text
    print(f"# fxcache variant benchmark ({'quick' if args.quick else 'full'})")
    print(f"machine: processor={info['processor'] or '?'!r} cpu={info['cpu_model'] or '?'!r} "
          f"cpus={info['cpu_count']} torch={info['torch']} threads={args.threads} date={info['date']}")
    print(f"model: FluxTransformer2DModel {params:,} params, {args.double} double + {args.single} single blocks, "
          f"hidden {cfg['num_attention_heads'] * cfg['attention_head_dim']} "
          f"({cfg['num_attention_heads']} x {cfg['attention_head_dim']}), "
          f"{n_img} image + {n_txt} text tokens, fp32")
    print(f"loop: {args.steps} Euler steps, {args.repeats} timed repeat(s) interleaved; "
          f"CPU attention FLOPs counted (fxcache registers a formula for the CPU kernel)")
    sys.stdout.flush()

    with torch.no_grad():
        # FLOPs of one uncached call: eager plain model
        flops_call = eager_flops(lambda: model(hidden_states=noise, timestep=torch.ones(1), **cond))
        t0 = time.perf_counter()
        sample(model, noise, cond, timesteps(1))
        eager_call_s = time.perf_counter() - t0

        compiled, backends = compile_all(model)
        warm_s, warm_out = {}, {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fxcache.FxCacheWarning)
            for name, cm in compiled.items():
                t0 = time.perf_counter()
                warm_out[name] = sample(cm, noise, cond, ts)
                warm_s[name] = time.perf_counter() - t0
                print(f"warm-up {name}: {warm_s[name]:.1f} s (compile + first loop)")
                sys.stdout.flush()
        fx_warnings = sorted({str(w.message) for w in caught if issubclass(w.category, fxcache.FxCacheWarning)})
        for w in fx_warnings:
            print(f"WARNING: {w}")
        for w in sorted({f"{w.category.__name__}: {w.message}" for w in caught
                         if not issubclass(w.category, fxcache.FxCacheWarning)}):
            print(f"(warning during compile) {w}")

        loop_s = {name: [] for name in compiled}
        final = {}
        for r in range(args.repeats):
            for name, cm in compiled.items():  # interleaved: uncached, duca, ..., uncached, duca, ...
                gc.collect()
                t0 = time.perf_counter()
                final[name] = sample(cm, noise, cond, ts)
                loop_s[name].append(time.perf_counter() - t0)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {loop_s[n][-1]:.3f} s" for n in compiled))
            sys.stdout.flush()

        per_call = {name: per_call_loop(name, cm, noise, cond, ts) for name, cm in compiled.items()}

    median_s = {name: statistics.median(v) for name, v in loop_s.items()}
    loop_flops = {}
    for name in compiled:
        if METHODS[name] is None:
            loop_flops[name] = args.steps * flops_call
        else:
            recs = per_call[name]["records"]
            loop_flops[name] = None if any(r["flops"] is None for r in recs) else sum(r["flops"] for r in recs)

    results = {}
    for name in compiled:
        lat = median_s["uncached"] / median_s[name]
        fl = (loop_flops["uncached"] / loop_flops[name]) if loop_flops[name] else None
        results[name] = dict(
            loop_s_median=median_s[name], loop_s_all=loop_s[name], warmup_s=warm_s[name],
            latency_speedup=lat, loop_flops=loop_flops[name], flops_speedup=fl,
            efficiency=(lat / fl) if fl else None,
            rel_l2_vs_uncached=rel_l2(final[name], final["uncached"]),
            rerun_rel_diff=rel_l2(final[name], warm_out[name]),
            per_kind={k: {kk: vv for kk, vv in v.items()} for k, v in per_call[name]["kinds"].items()},
            records_per_call=per_call[name]["records_per_call"],
            graphs=(len(backends[name].runners) if name in backends else None),
        )
    if METHODS["uncached"] is None:
        results["uncached"]["per_kind"]["full"]["flops_per_call"] = flops_call

    print()
    print("| method | loop s | latency speedup | FLOPs (G) | FLOPs speedup | efficiency | rel. L2 error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        label = name if METHODS[name] is None else (
            name + " " + " ".join(f"{k}={v}" for k, v in METHODS[name].items() if k != "method"))
        print(f"| {label} | {r['loop_s_median']:.3f} | {r['latency_speedup']:.2f}x | "
              f"{fmt(r['loop_flops'] and r['loop_flops'] / 1e9, '.4g')} | "
              f"{fmt(r['flops_speedup'], '.2f')}{'x' if r['flops_speedup'] else ''} | "
              f"{fmt(r['efficiency'], '.2f')} | {r['rel_l2_vs_uncached']:.2e} |")
    print()
    print("| method | kind | calls per loop | ms per call | GFLOPs per call |")
    print("|---|---|---:|---:|---:|")
    order = ["full", "partial", "reuse", "skip", "forecast", "cluster"]
    for name, r in results.items():
        for kind in sorted(r["per_kind"], key=lambda k: order.index(k) if k in order else len(order)):
            v = r["per_kind"][kind]
            print(f"| {name} | {kind} | {v['calls_per_loop']} | {v['ms_per_call']:.2f} | "
                  f"{fmt(v['flops_per_call'] and v['flops_per_call'] / 1e9, '.4g')} |")
    print()
    notes = [f"uncached FLOPs per call (FlopCounterMode, eager): {flops_call / 1e9:.3f} G; "
             f"one eager call {1e3 * eager_call_s:.1f} ms"]
    for name, r in results.items():
        notes.append(f"{name}: warm-up {r['warmup_s']:.1f} s; timed loops {', '.join(f'{s:.3f}' for s in r['loop_s_all'])} s; "
                     f"final sample vs its warm-up loop rel. diff {r['rerun_rel_diff']:.1e}"
                     + (f"; graphs {r['graphs']}, records per call {r['records_per_call']:.2f}"
                        if METHODS[name] else ""))
    for name, r in results.items():
        spread = max(r["loop_s_all"]) / min(r["loop_s_all"])
        r["loop_s_spread"] = spread
        if spread > 1.2:
            notes.append(f"WARNING: {name}'s timed loops differ by {spread:.2f}x (slowest / fastest): the machine "
                         f"was probably busy; the medians are unreliable")
    for n in notes:
        print("- " + n)

    report = dict(machine=info, args=vars(args), model=dict(config={k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in cfg.items()},
                                                             params=params, image_tokens=n_img, text_tokens=n_txt),
                  cpu_attention_flops_counted=attn_flops, uncached_flops_per_call=flops_call,
                  eager_call_s=eager_call_s, methods={k: v for k, v in METHODS.items()}, results=results,
                  fxcache_warnings=fx_warnings)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
