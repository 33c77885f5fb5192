"""GPU wall-clock of 50-step loops on full-size DiT architectures (random bf16 weights), side by side in one run.

    python benchmarks/bench_gpu.py --arch flux-dev                     # FLUX.1-dev size, 1024x1024, 50 steps
    python benchmarks/bench_gpu.py --arch flux-dev-slim --jsonl rows.jsonl   # FLUX.1-dev width, 4 + 8 blocks
    python benchmarks/bench_gpu.py --arch sd3-medium --arch pixart-alpha --json gpu.json
    python benchmarks/bench_gpu.py --tiny --device cpu --compiler eager --steps 12   # dry run of the script

Rows (`--rows` picks a subset, in order; the uncached `compile` row is the baseline and runs first, cache-dit rows
run last since cache-dit patches the model in place): uncached eager; uncached torch.compile (default Inductor mode,
and under mode="reduce-overhead"); fxcache FORA N=3, DuCa N=5 R=0.9, TaylorSeer N=6 O=2, ClusCa (FLUX preset),
ToCa (random score, flat 10%), ToCa's FLUX preset (attention score, ratio schedule), DuCa under
mode="reduce-overhead" (CUDA graphs with in-place caches); cache-dit DBCache F1B0 with a static 1-in-5 compute
mask and with its default threshold (0.08, 8 warm-up steps). Columns: latency per image (median of `--repeats`
loops, CUDA events, after a warm-up loop), speedup over compiled uncached, FLOPs speedup, efficiency (latency
speedup / FLOPs speedup), peak memory during the loop (weights + activations + caches), fxcache's cache memory and
the weights'. A second table gives the median ms per call of each step kind (from one more loop with an event pair
around every call), which says where a row's time goes. `--jsonl` appends one JSON line per finished row, so a run
that is killed keeps what it measured. Quality is not measured here: speed does not depend on training (see
eval_quality.py for quality).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

try:
    import fxcache
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fxcache

from fxcache.config import make_config
from fxcache.passes.propagate_shapes import eager_flops
from fxcache.testing.models import flux_ids

#: arch -> (diffusers class, config, image tokens per side, text tokens, CFG batch rows)
ARCHS = {
    # FLUX.1-dev: 19 double + 38 single blocks, 3072 hidden; 1024x1024 -> 64x64 = 4096 image + 512 text tokens;
    # guidance-distilled, so one row per call
    "flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), 64, 512, 1),
    # SD3-medium: 24 joint blocks, 1536 hidden; 1024x1024 -> 128x128 latent, patch 2 -> 4096 tokens; 333 text
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192), 64, 333, 2),
    # PixArt-alpha 1024: 28 blocks, 1152 hidden, cross-attention to 120 T5 tokens
    # FLUX.1-dev width with fewer blocks (4 double + 8 single): seconds per compile instead of minutes; per-step
    # fixed costs (embedders, final layer, the runner) weigh more than with 57 blocks, so speedups are conservative
    "flux-dev-slim": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), 64, 512, 1),
    "pixart-alpha": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False), 64, 120, 2),
}
TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2)

ROWS = {
    "eager": None, "compile": dict(mode=None), "compile-reduce-overhead": dict(mode="reduce-overhead"),
    "compile-max-autotune": dict(mode="max-autotune"),
    "fora": dict(method="fora", interval=3),
    "duca": dict(method="duca", interval=5, ratio=0.9),
    "taylorseer": dict(method="taylorseer", interval=6, order=2),
    "clusca": dict(method="clusca", preset="flux"),
    "toca": dict(method="toca", interval=4, fresh_ratio=0.1, score="random", warmup_steps=3),
    "toca-flux": dict(method="toca", preset="flux"),
    "duca-cudagraphs": dict(method="duca", interval=5, ratio=0.9, mode="reduce-overhead"),
    "cache-dit-static": dict(library="cache-dit", compute_every=5),
    "cache-dit": dict(library="cache-dit", threshold=0.08),
}
DEFAULT_ROWS = ("compile", "compile-reduce-overhead", "fora", "duca", "taylorseer", "clusca", "toca",
                "duca-cudagraphs", "cache-dit-static", "cache-dit")


def build(arch: str, tiny: bool, device: str, dtype: torch.dtype):
    import diffusers

    cls_name, cfg, side, text, rows = ARCHS[arch]
    cfg = dict(cfg)
    if tiny:
        for k, v in TINY.items():
            if k in cfg:
                cfg[k] = v
        if "axes_dims_rope" in cfg:
            cfg["axes_dims_rope"] = (4, 6, 6)
        if arch == "sd3-medium":
            cfg["caption_projection_dim"] = 32
        if arch == "pixart-alpha":
            cfg["cross_attention_dim"] = 32
        side, text = 16, 16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, cls_name)(**cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, side, text, rows


def loop_inputs(model, arch: str, side: int, text: int, rows: int, steps: int, device, dtype) -> list[dict]:
    """One request: fresh latents per step, one conditioning throughout (as a pipeline keeps its prompt; the step
    rule reads a conditioning that changes every step as other requests and runs them uncached)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    c = model.config

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if arch.startswith("flux"):
        img_ids, txt_ids = flux_ids(side, side, text)
        cond = dict(encoder_hidden_states=rnd(rows, text, c.joint_attention_dim),
                    pooled_projections=rnd(rows, c.pooled_projection_dim),
                    img_ids=img_ids.to(device, dtype), txt_ids=txt_ids.to(device, dtype))
        if c.guidance_embeds:
            cond["guidance"] = torch.full((rows,), 3.5, device=device, dtype=dtype)
    elif arch == "sd3-medium":
        cond = dict(encoder_hidden_states=rnd(rows, text, c.joint_attention_dim),
                    pooled_projections=rnd(rows, c.pooled_projection_dim))
    else:
        cond = dict(encoder_hidden_states=rnd(rows, text, c.caption_channels),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    out = []
    for s in range(steps):
        t = 1.0 - s / steps
        if arch.startswith("flux"):
            kw = dict(hidden_states=rnd(rows, side * side, c.in_channels),
                      timestep=torch.full((rows,), t, device=device, dtype=dtype))
        else:
            latent = side * c.patch_size
            kw = dict(hidden_states=rnd(rows, c.in_channels, latent, latent),
                      timestep=torch.full((rows,), 1000.0 * t, device=device, dtype=dtype))
        out.append(dict(kw, **cond))
    return out


class Timer:
    """Wall-clock of whole loops (CUDA events on a GPU) and of single calls, for the per-kind table."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def _events(self):
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def loop(self, model, inputs) -> float:
        import time

        if self.cuda:
            start, end = self._events()
            torch.cuda.synchronize()
            start.record()
        else:
            t0 = time.perf_counter()
        with torch.no_grad():
            for kw in inputs:
                model(**kw, return_dict=False)
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        return time.perf_counter() - t0

    def calls(self, model, inputs) -> list[float]:
        """Milliseconds of each call of one loop (an event pair around each; read once the loop is done)."""
        import time

        marks = []
        with torch.no_grad():
            for kw in inputs:
                if self.cuda:
                    start, end = self._events()
                    start.record()
                    model(**kw, return_dict=False)
                    end.record()
                    marks.append((start, end))
                else:
                    t0 = time.perf_counter()
                    model(**kw, return_dict=False)
                    marks.append(1000.0 * (time.perf_counter() - t0))
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in marks]
        return marks


class Row:
    """One row: the model to call, the fxcache backend (if any) and what the loop needs around it."""

    def __init__(self, name, model, backend=None, before_loop=None, teardown=None, kinds=None, flops=None):
        self.name, self.model, self.backend = name, model, backend
        self.before_loop = before_loop or (lambda: None)
        self.teardown = teardown or (lambda: None)
        self.kinds = kinds  # per-call kind labels when the backend does not record them (cache-dit's static mask)
        self.flops = flops  # () -> loop FLOPs, where no fxcache record gives them


def compile_uncached(model, compiler: str, mode):
    if compiler == "eager":  # the dry run: Dynamo without Inductor (modes are Inductor's)
        return torch.compile(model, backend="eager", dynamic=False)
    return torch.compile(model, dynamic=False, mode=mode)


def cachedit_row(name, spec, model, compiler, steps, loop_flops) -> Row:
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import cache_dit
    from cache_dit import DBCacheConfig

    every = spec.get("compute_every")
    if every:
        mask = [int(s % every == 0) for s in range(steps)]
        config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1,
                               steps_computation_mask=mask, steps_computation_policy="static",
                               num_inference_steps=steps, enable_separate_cfg=False)
        kinds = ["compute" if m else "cached (F1)" for m in mask]
    else:
        config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=spec["threshold"],
                               max_warmup_steps=8, num_inference_steps=steps, enable_separate_cfg=False)
        kinds = None
    cache_dit.enable_cache(model, cache_config=config)
    refresh = lambda: cache_dit.refresh_context(model)  # noqa: E731  (its own reset is off by one in 1.5.3)

    def flops():
        refresh()
        return loop_flops(model)

    return Row(name, compile_uncached(model, compiler, None), before_loop=refresh,
               teardown=lambda: cache_dit.disable_cache(model), kinds=kinds, flops=flops)


def make_row(name: str, model, compiler: str, steps: int, loop_flops) -> Row:
    spec = dict(ROWS[name]) if ROWS[name] is not None else None
    if spec is None:
        return Row(name, model)
    if spec.get("library") == "cache-dit":
        return cachedit_row(name, spec, model, compiler, steps, loop_flops)
    mode = spec.pop("mode", None)
    if "method" not in spec:
        return Row(name, compile_uncached(model, compiler, mode))
    backend = fxcache.cache_backend(make_config(spec.pop("method"), **spec),
                                    lowering="eager" if compiler == "eager" else "inductor")
    return Row(name, torch.compile(model, backend=backend, dynamic=False, mode=mode), backend=backend)


def order_rows(rows: list[str]) -> list[str]:
    """The baseline first (its speedups need it), cache-dit last (it patches the model in place)."""
    return sorted(rows, key=lambda r: (r != "compile", ROWS[r] is not None and "library" in ROWS[r]))


def per_kind_ms(kinds: list[str], ms: list[float]) -> dict:
    by_kind: dict[str, list[float]] = {}
    for k, v in zip(kinds, ms):
        by_kind.setdefault(k, []).append(v)
    return {k: dict(calls=len(v), ms=statistics.median(v)) for k, v in by_kind.items()}


def measure(row: Row, inputs, timer: Timer, repeats: int, steps: int, full_flops: int, cuda: bool) -> dict:
    row.before_loop()
    timer.loop(row.model, inputs)  # warm-up: compile and first loop
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    before = len(row.backend.stats()) if row.backend else 0
    for _ in range(repeats):
        row.before_loop()
        seconds.append(timer.loop(row.model, inputs))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    recs = row.backend.stats()[before:before + steps] if row.backend else []
    cache_gib = row.backend.cache_bytes() / 2**30 if row.backend else 0.0
    row.before_loop()
    mark = len(row.backend.stats()) if row.backend else 0
    ms = timer.calls(row.model, inputs)
    if row.backend:
        kinds = [r["kind"] for r in row.backend.stats()[mark:mark + steps]]
    else:
        kinds = row.kinds or ["full" if ROWS[row.name] is None or "library" not in ROWS[row.name] else "call"] * steps
    if row.backend:
        flops = sum(r["flops"] for r in recs) if recs and all(r["flops"] for r in recs) else None
    elif row.flops is not None:
        flops = row.flops()
    else:
        flops = full_flops
    return dict(seconds=statistics.median(seconds), seconds_all=seconds, flops=flops, peak_gib=peak,
                cache_gib=cache_gib, kinds=per_kind_ms(kinds, ms))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", choices=ARCHS, help="repeatable (default flux-dev)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                   help="eager: Dynamo with no Inductor for every row (a dry run of the script, not a benchmark)")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a dry run of the script)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no row after this many seconds (the rest are reported as skipped)")
    p.add_argument("--json")
    p.add_argument("--jsonl", help="append one JSON line per finished row")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark measures GPU wall-clock (use --device cpu --tiny for a smoke test)")
    import time

    began = time.monotonic()
    torch._dynamo.config.cache_size_limit = 64
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    head = (f"device {torch.cuda.get_device_name() if cuda else args.device}, torch {torch.__version__}, "
            f"{args.dtype}, {args.steps} steps, {args.repeats} timed loops after 1 warm-up, "
            f"{datetime.date.today().isoformat()}")
    results = []

    def emit(record):
        results.append(record)
        if args.jsonl:
            with open(args.jsonl, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    for arch in args.arch or ["flux-dev"]:
        model, side, text, batch = build(arch, args.tiny, args.device, dtype)
        weight_gib = sum(q.numel() * q.element_size() for q in model.parameters()) / 2**30
        inputs = loop_inputs(model, arch, side, text, batch, args.steps, args.device, dtype)

        def loop_flops(m):
            return eager_flops(lambda: [m(**kw, return_dict=False) for kw in inputs])

        full_flops = eager_flops(lambda: model(**inputs[0], return_dict=False)) * args.steps
        timer = Timer(args.device)
        base = None
        for name in order_rows(rows):
            record = dict(arch=arch, row=name, steps=args.steps, header=head, weight_gib=weight_gib)
            if args.budget_s is not None and time.monotonic() - began > args.budget_s:
                emit(dict(record, skipped=f"time budget of {args.budget_s:.0f} s spent"))
                print(f"{arch} {name}: skipped (time budget)", flush=True)
                continue
            torch._dynamo.reset()
            row = None
            try:
                row = make_row(name, model, args.compiler, args.steps, loop_flops)
                m = measure(row, inputs, timer, args.repeats, args.steps, full_flops, cuda)
            except Exception as e:  # one failed row must not cost the others
                emit(dict(record, error=f"{type(e).__name__}: {e}"[:2000]))
                print(f"{arch} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                if row is not None:
                    row.teardown()
            if name == "compile":
                base = m["seconds"]
            fsp = full_flops / m["flops"] if m["flops"] else None
            speedup = base / m["seconds"] if base else None
            emit(dict(record, **m, speedup=speedup, flops_speedup=fsp,
                      efficiency=speedup / fsp if speedup and fsp else None,
                      wall_s=round(time.monotonic() - began, 1)))
            print(f"{arch} {name}: {m['seconds']:.3f} s per image", flush=True)
        del model
    print_tables(head, results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=head, results=results), fh, indent=1)
    return results


def print_tables(head: str, results: list[dict]) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(head)
    print("| arch | row | s / image | speedup vs compile | FLOPs speedup | efficiency | peak GiB | cache GiB | "
          "weights GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "seconds" not in r:
            print(f"| {r['arch']} | {r['row']} | {r.get('error') or r.get('skipped')} | | | | | | |")
            continue
        print(f"| {r['arch']} | {r['row']} | {r['seconds']:.3f} | {f(r['speedup'], '.2f')} "
              f"| {f(r['flops_speedup'], '.2f')} | {f(r['efficiency'], '.2f')} | {f(r['peak_gib'], '.1f')} "
              f"| {r['cache_gib']:.2f} | {r['weight_gib']:.2f} |")
    print("\nms per call, by step kind (calls per loop in brackets)")
    print("| arch | row | per kind |")
    print("|---|---|---|")
    for r in results:
        if "kinds" in r:
            kinds = ", ".join(f"{k} {v['ms']:.2f} ({v['calls']})" for k, v in sorted(r["kinds"].items()))
            print(f"| {r['arch']} | {r['row']} | {kinds} |")


if __name__ == "__main__":
    main()
