"""Exported engines: a cached sampling loop through `CachedSession` against the same loop uncached, side by side.

    python benchmarks/bench_export.py                                   # CPU, onnxruntime, small FLUX-style model
    python benchmarks/bench_export.py --size flux-dev --dtype float16 --providers CUDAExecutionProvider  # GPU, ORT
    python benchmarks/bench_export.py --size flux-dev --format tensorrt   # GPU, torch-tensorrt engines

The uncached engine is the plain transformer exported the same way (ONNX via torch.onnx.export, or a TensorRT
engine of the plain exported program); the cached one is fxcache.export of the same model with the method. Both run
the same 50-step loop (FLUX-style inputs, timestep falling, fresh latents each step) after a warm-up loop; the
median of `--repeats` loops is reported with the cached loop's FLOPs speedup and efficiency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

try:
    import fxcache
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fxcache

from fxcache.config import make_config
from fxcache.deploy import CachedSession
from fxcache.testing.models import flux_ids

SIZES = {
    # (double blocks, single blocks, heads, head dim, image tokens per side, text tokens)
    "small": (2, 4, 8, 64, 32, 64),
    "flux-dev": (19, 38, 24, 128, 64, 512),
}


def flux_model(size: str, dtype: torch.dtype, device: str):
    from diffusers import FluxTransformer2DModel

    double, single, heads, dim, _, _ = SIZES[size]
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                   attention_head_dim=dim, num_attention_heads=heads, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=False,
                                   axes_dims_rope=(dim // 8, dim * 7 // 16, dim * 7 // 16))
    return model.to(device=device, dtype=dtype).eval()


def flux_inputs(size: str, dtype, device, t: float, seed: int) -> dict:
    _, _, _, _, side, text = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    img_ids, txt_ids = flux_ids(side, side, text)
    return dict(hidden_states=torch.randn(1, side * side, 64, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, text, 4096, generator=g).to(device, dtype),
                pooled_projections=torch.randn(1, 768, generator=g).to(device, dtype),
                timestep=torch.full((1,), t).to(device, dtype),
                img_ids=img_ids.to(device, dtype), txt_ids=txt_ids.to(device, dtype))


def uncached_engine(model, example: dict, fmt: str, folder: str, providers):
    """The plain transformer as one engine; returns a callable taking the same keyword inputs."""
    names = list(example)
    args = tuple(example[n] for n in names)

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *xs):
            return self.model(**dict(zip(names, xs)), return_dict=False)[0]

    wrapper = Positional().eval()
    if fmt == "tensorrt":
        from fxcache.backends.tensorrt import compile_engine

        engine = compile_engine(wrapper, list(args))
        return lambda **kw: engine(*[kw[n] for n in names])
    import onnxruntime as ort

    path = os.path.join(folder, "uncached.onnx")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.onnx.export(wrapper, args, path, dynamo=True, optimize=True, input_names=names, output_names=["out"],
                      external_data=weight_bytes > 1_800_000_000)
    session = ort.InferenceSession(path, providers=providers)
    feed_names = {i.name for i in session.get_inputs()}
    return lambda **kw: session.run(None, {n: kw[n].detach().cpu().numpy() for n in names if n in feed_names})[0]


def timed_loop(fn, inputs, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for kw in inputs:
        fn(**kw)
    sync()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="small")
    p.add_argument("--method", default="duca")
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    p.add_argument("--providers", nargs="*", default=None, help="onnxruntime providers (default CPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if args.format == "tensorrt" or (args.providers and "CUDAExecutionProvider" in args.providers) \
        else "cpu"
    dtype = getattr(torch, args.dtype)
    providers = args.providers or ["CPUExecutionProvider"]
    model = flux_model(args.size, dtype, device)
    inputs = [flux_inputs(args.size, dtype, device, 1.0 - s / (args.steps + 1), seed=s) for s in range(args.steps)]
    config = make_config(args.method)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        manifest = fxcache.export(model, inputs[0], config, format=args.format, out_dir=os.path.join(folder, "c"),
                                  num_steps=args.steps)
        export_s = time.perf_counter() - t0
        cached = CachedSession(os.path.join(folder, "c"), providers=providers)
        with torch.no_grad():
            plain = uncached_engine(model, inputs[0], args.format, folder, providers)
        loops = {"uncached engine": plain, f"fxcache {args.method} engine": cached}
        for fn in loops.values():  # warm-up
            timed_loop(fn, inputs, sync)
        seconds = {name: [] for name in loops}
        for _ in range(args.repeats):
            for name, fn in loops.items():
                seconds[name].append(timed_loop(fn, inputs, sync))
    flops = {a.kind: a.flops for a in manifest.artifacts}
    cached_flops = sum(flops[s["kind"]] for s in manifest.schedule)
    full_flops = flops["full"] * args.steps
    med = {k: statistics.median(v) for k, v in seconds.items()}
    base = med["uncached engine"]
    cached_s = med[f"fxcache {args.method} engine"]
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                  date=datetime.date.today().isoformat(), torch=torch.__version__, size=args.size,
                  format=args.format, providers=providers, dtype=args.dtype, steps=args.steps,
                  method=repr(config), export_seconds=round(export_s, 1), seconds=med,
                  latency_speedup=base / cached_s, flops_speedup=full_flops / cached_flops,
                  efficiency=(base / cached_s) / (full_flops / cached_flops))
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
