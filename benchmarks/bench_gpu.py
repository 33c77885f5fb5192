"""GPU wall-clock of 50-step loops on full-size DiT architectures (random bf16 weights), side by side in one run.

    python benchmarks/bench_gpu.py --arch flux-dev                     # FLUX.1-dev size, 1024x1024, 50 steps
    python benchmarks/bench_gpu.py --arch sd3-medium --arch pixart-alpha --json gpu.json
    python benchmarks/bench_gpu.py --arch flux-dev --tiny --device cpu --rows eager,compile,duca   # smoke test

Rows (`--rows` picks a subset): uncached eager; uncached torch.compile (default, max-autotune); fxcache FORA, ToCa,
DuCa, ClusCa, TaylorSeer at their papers' FLUX settings (default Inductor mode, and DuCa also under
mode="reduce-overhead": CUDA graphs with in-place caches); cache-dit DBCache (F8B0, threshold 0.08, if installed;
applied last since it patches the model in place). Columns: latency per image (median of `--repeats` loops, CUDA
events, after a warm-up loop), speedup over compiled uncached, FLOPs speedup, efficiency (latency speedup / FLOPs
speedup), peak memory during the loop (weights + activations + caches) and fxcache's cache memory. Quality is not
measured here: speed does not depend on training (see eval_quality.py for quality).
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
    "pixart-alpha": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False), 64, 120, 2),
}
TINY = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2)

ROWS = {
    "eager": None, "compile": dict(mode=None), "compile-max-autotune": dict(mode="max-autotune"),
    "fora": dict(method="fora", interval=3),
    "toca": dict(method="toca", preset="flux"),
    "duca": dict(method="duca", interval=5, ratio=0.9),
    "duca-cudagraphs": dict(method="duca", interval=5, ratio=0.9, mode="reduce-overhead"),
    "clusca": dict(method="clusca", preset="flux"),
    "taylorseer": dict(method="taylorseer", preset="flux"),
    "cache-dit": dict(library="cache-dit"),
}


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
    g = torch.Generator(device="cpu").manual_seed(0)
    c = model.config

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = []
    for s in range(steps):
        t = 1.0 - s / steps
        if arch == "flux-dev":
            img_ids, txt_ids = flux_ids(side, side, text)
            kw = dict(hidden_states=rnd(rows, side * side, c.in_channels),
                      encoder_hidden_states=rnd(rows, text, c.joint_attention_dim),
                      pooled_projections=rnd(rows, c.pooled_projection_dim),
                      timestep=torch.full((rows,), t, device=device, dtype=dtype),
                      img_ids=img_ids.to(device, dtype), txt_ids=txt_ids.to(device, dtype))
            if c.guidance_embeds:
                kw["guidance"] = torch.full((rows,), 3.5, device=device, dtype=dtype)
        else:
            latent = side * c.patch_size
            kw = dict(hidden_states=rnd(rows, c.in_channels, latent, latent),
                      timestep=torch.full((rows,), 1000.0 * t, device=device, dtype=dtype))
            if arch == "sd3-medium":
                kw.update(encoder_hidden_states=rnd(rows, text, c.joint_attention_dim),
                          pooled_projections=rnd(rows, c.pooled_projection_dim))
            else:
                kw.update(encoder_hidden_states=rnd(rows, text, c.caption_channels),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        out.append(kw)
    return out


class Timer:
    def __init__(self, device):
        self.cuda = device == "cuda"

    def loop(self, model, inputs) -> float:
        import time

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def make_row(name: str, model):
    spec = ROWS[name]
    if spec is None:
        return model, None
    if "library" in spec:
        import cache_dit
        from cache_dit import DBCacheConfig

        cache_dit.enable_cache(model, cache_config=DBCacheConfig(Fn_compute_blocks=8, Bn_compute_blocks=0,
                                                                 residual_diff_threshold=0.08, max_warmup_steps=8))
        return torch.compile(model), None
    spec = dict(spec)
    mode = spec.pop("mode", None)
    if "method" not in spec:
        return torch.compile(model, dynamic=False, mode=mode), None
    backend = fxcache.cache_backend(make_config(spec.pop("method"), **spec))
    return torch.compile(model, backend=backend, dynamic=False, mode=mode), backend


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", choices=ARCHS, help="repeatable (default flux-dev)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="tiny configs (smoke test of the script)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark measures GPU wall-clock (use --device cpu --tiny for a smoke test)")
    torch._dynamo.config.cache_size_limit = 64
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    results = []
    for arch in args.arch or ["flux-dev"]:
        model, side, text, batch = build(arch, args.tiny, args.device, dtype)
        weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
        inputs = loop_inputs(model, arch, side, text, batch, args.steps, args.device, dtype)
        full_flops = eager_flops(lambda: model(**inputs[0], return_dict=False)) * args.steps
        timer = Timer(args.device)
        measured = {}
        # cache-dit patches the model in place: it goes last
        for name in sorted(rows, key=lambda r: r == "cache-dit"):
            torch._dynamo.reset()
            compiled, backend = make_row(name, model)
            timer.loop(compiled, inputs)  # warm-up: compile and first loop
            before = len(backend.stats()) if backend else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds = [timer.loop(compiled, inputs) for _ in range(args.repeats)]
            recs = backend.stats()[before:before + args.steps] if backend else []
            flops = sum(r["flops"] for r in recs) if recs and all(r["flops"] for r in recs) else None
            measured[name] = dict(
                seconds=statistics.median(seconds), flops=flops if backend else (full_flops if name != "cache-dit"
                                                                                 else None),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                cache_gib=backend.cache_bytes() / 2**30 if backend else 0.0)
            print(f"{arch} {name}: {measured[name]['seconds']:.3f} s per image", flush=True)
        base = measured.get("compile", measured[rows[0]])
        for name, m in measured.items():
            speedup = base["seconds"] / m["seconds"]
            fsp = full_flops / m["flops"] if m["flops"] else None
            results.append(dict(arch=arch, row=name, steps=args.steps, seconds=m["seconds"], speedup=speedup,
                                flops_speedup=fsp, efficiency=speedup / fsp if fsp else None,
                                peak_gib=m["peak_gib"], cache_gib=m["cache_gib"],
                                weight_gib=weight_bytes / 2**30))
        del model
    head = (f"device {torch.cuda.get_device_name() if cuda else args.device}, torch {torch.__version__}, "
            f"{args.dtype}, {args.steps} steps, {datetime.date.today().isoformat()}")
    print(head)
    print("| arch | row | s / image | speedup vs compile | FLOPs speedup | efficiency | peak GiB | cache GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in results:
        print(f"| {r['arch']} | {r['row']} | {r['seconds']:.3f} | {r['speedup']:.2f} | {f(r['flops_speedup'], '.2f')} "
              f"| {f(r['efficiency'], '.2f')} | {f(r['peak_gib'], '.1f')} | {r['cache_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=head, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
