"""What deciding at run time costs per call: the probe / host read / tail split against one whole graph, CPU.

A method that decides each call from a signal (FBCache, DBCache, TeaCache) runs two graphs with one host read of
the signal between them. On a call that computes everything, that is the whole model cut in two, plus the signal
(a relative change over one stream) and the read. Measured on a FLUX-style transformer with Inductor, one thread,
interleaved rounds, per-call medians:

    uncached     torch.compile(model) (one graph)
    fxcache FULL fxcache FBCache with threshold 0: every call runs probe + read + compute tail
    fxcache skip fxcache FBCache with a threshold that reuses every call after the first: probe + read + cached tail

    python benchmarks/adaptive_seam.py               # hidden 512, 2 + 4 blocks, 1024 image tokens
    python benchmarks/adaptive_seam.py --quick       # smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

try:
    import fxcache
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fxcache

MODEL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
             num_attention_heads=8, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
             axes_dims_rope=(8, 28, 28))
QUICK = dict(MODEL, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
             pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


def inputs(side: int, text: int, config: dict) -> dict:
    from fxcache.testing.models import flux_ids

    g = torch.Generator().manual_seed(0)
    img_ids, txt_ids = flux_ids(side, side, text)
    return dict(hidden_states=torch.randn(1, side * side, config["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
                timestep=torch.tensor([1.0]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel

    config = QUICK if args.quick else MODEL
    side = 8 if args.quick else 32
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    kw = inputs(side, 16 if args.quick else 64, config)
    variants = {
        "uncached": torch.compile(copy.deepcopy(model), dynamic=False),
        "fxcache FULL": torch.compile(copy.deepcopy(model), dynamic=False,
                                      backend=fxcache.cache_backend("fbcache", threshold=0.0)),
        "fxcache skip": torch.compile(copy.deepcopy(model), dynamic=False,
                                      backend=fxcache.cache_backend("fbcache", threshold=1e9)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    t = [1.0]

    def call(name: str) -> float:
        t[0] = t[0] * 0.999  # t moves on: every call is the next step of one request
        args_ = dict(kw, timestep=torch.tensor([t[0]]))
        start = time.perf_counter()
        variants[name](**args_)
        return time.perf_counter() - start

    with torch.no_grad():
        for name in variants:  # compile and warm up (the cached variant's tail needs a computed call first)
            for _ in range(3):
                call(name)
        for _ in range(args.rounds):
            for name in variants:
                times[name].append(call(name))
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    flops = {r["kind"]: r["flops"] for r in fxcache.stats(variants["fxcache skip"])}
    print(f"# adaptive_seam {datetime.date.today()} {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, "
          f"{side * side} image tokens")
    print("| call | median ms | vs uncached |")
    print("|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / med['uncached']:.3f}x |")
    print(f"FLOPs per call (fxcache skip run): {flops}")


if __name__ == "__main__":
    main()
