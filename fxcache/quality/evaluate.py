"""The evaluation harness: a reference model, a sampler and cache configs, on the same seeds, side by side.

Rows: the uncached compiled model (the reference every paired metric compares with), each cache config, a noise
floor (uncached with other noise: how far two unrelated samples of the same classes are) and, per method, the
uncached sampler with fewer steps at the same compute. Columns: wall-clock of the whole sampling run (methods
interleaved, median of repeats), its FLOPs, the speedups, paired PSNR / SSIM / relative L2 against the uncached
images, and the reference's own judge (`ref.judge`): the Frechet distance of its classifier's features to real
images and prompt adherence (digits: the classifier names the digit asked for; scenes: count, colour, shape and
position all as the prompt says).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from .. import cache_backend, stats
from ..config import CacheConfig
from ..passes.propagate_shapes import eager_flops
from .files import save_figure
from .metrics import psnr, rel_l2, ssim
from .peers import Peer, PeerModel
from .reference import ReferenceModel
from .sampling import sample


@dataclasses.dataclass
class Row:
    label: str
    kind: str  # "uncached" | "method" (fxcache) | "peer" (another library) | "noise floor" | "fewer steps"
    steps: int
    seconds: float | None = None
    flops: float | None = None
    latency_speedup: float | None = None
    flops_speedup: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    rel_l2: float | None = None
    fd: float | None = None
    accuracy: float | None = None
    graphs: int | None = None  # graphs Dynamo compiled for this row (warm-up run)
    graph_breaks: int | None = None
    equal_steps: int | None = None  # a cached row: the step count of the uncached sampler with the same FLOPs
    clip: float | None = None  # CLIP score (`fxcache eval` with a local CLIP model)


@dataclasses.dataclass
class Report:
    model: str
    images: int
    steps: int
    guidance: float
    rows: list[Row]
    samples: dict[str, torch.Tensor]

    def table(self) -> str:
        head = ("| method | steps | s per run | latency speedup | GFLOPs | FLOPs speedup | PSNR dB | SSIM | rel. L2 | "
                "FD | adherence | graphs / breaks |")
        lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        for r in self.rows:
            lines.append(f"| {r.label} | {r.steps} | {f(r.seconds, '.3f')} | {f(r.latency_speedup, '.2f')} | "
                         f"{f(r.flops and r.flops / 1e9, '.1f')} | {f(r.flops_speedup, '.2f')} | {f(r.psnr, '.2f')} | "
                         f"{f(r.ssim, '.4f')} | {f(r.rel_l2, '.4f')} | {f(r.fd, '.2f')} | {f(r.accuracy, '.3f')} | "
                         f"{'-' if r.graphs is None else f'{r.graphs} / {r.graph_breaks}'} |")
        return "\n".join(lines)


def _flops_of_call(ref: ReferenceModel, batch: int) -> int:
    x = torch.zeros(ref.latent_shape(batch))
    with torch.no_grad():
        cond = ref.conditioner(torch.zeros(batch, dtype=torch.long))
    return eager_flops(lambda: ref.call(ref.transformer, x, torch.ones(1), cond))


def _flops_of_generation(model: PeerModel, generate: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one whole generation of a hooked peer model, counted on its eager path."""
    compiled_run = model._run
    model.eager()
    try:
        return eager_flops(generate)
    finally:
        model._run = compiled_run


def evaluate(ref: ReferenceModel, methods: dict[str, CacheConfig | str | Peer], *, per_class: int = 10, steps: int = 50,
             guidance: float = 2.0, seed: int = 0, lowering: str = "inductor", repeats: int = 3,
             cfg: str = "batched", progress: Callable[[str], None] | None = None,
             labels: torch.Tensor | None = None) -> Report:
    """Sample `ref.eval_labels(per_class)` (10 * per_class images; or `labels`) uncached and with each method, from
    the same noise.

    A `Peer` (another library's cache, `fxcache.quality.peers`) gets its own hooked copy of the transformer, compiled
    with plain `torch.compile` under `lowering="inductor"`; its FLOPs are counted on one eager run of the hooked copy
    (its caching decisions are the same ones: same model, same noise).
    """
    from torch._dynamo.utils import counters
    labels = ref.eval_labels(per_class) if labels is None else labels
    n = labels.shape[0]
    noise = torch.randn(ref.latent_shape(n), generator=torch.Generator().manual_seed(seed))
    other = torch.randn(ref.latent_shape(n), generator=torch.Generator().manual_seed(seed + 1000))
    say = progress or (lambda m: None)

    def compiled(config):
        if isinstance(config, Peer):
            model = config.make(ref, steps)
            return model.compile(dynamic=False) if lowering == "inductor" else model
        if config is None:
            return torch.compile(ref.transformer, dynamic=False) if lowering == "inductor" else ref.transformer
        backend = config if not isinstance(config, (str, CacheConfig)) else None
        if backend is None:
            backend = cache_backend(config, lowering=lowering)
        return torch.compile(ref.transformer, backend=backend, dynamic=False)

    models = {"uncached": compiled(None)}
    for name, config in methods.items():
        models[name] = compiled(config)

    def run(name, model, s=steps, z=noise):
        if isinstance(model, PeerModel):
            model.reset()  # what a pipeline does between generations
        return ref.decode(sample(ref, model, labels, steps=s, guidance=guidance, cfg=cfg, noise=z))

    outputs, flops = {}, {}
    rows_per_call = 2 * n if (guidance != 1.0 and cfg == "batched") else n
    calls_per_step = 1 if (guidance == 1.0 or cfg == "batched") else 2
    call_flops = _flops_of_call(ref, rows_per_call)
    dynamo = {}
    for name, model in models.items():
        say(f"warm-up {name} (compile + first run)")
        before = len(stats(model)) if name != "uncached" and not isinstance(model, PeerModel) else 0
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        outputs[name] = run(name, model)
        if lowering == "inductor":
            dynamo[name] = (counters["stats"]["unique_graphs"] - graphs, sum(counters["graph_break"].values()) - breaks)
        if name == "uncached":
            flops[name] = call_flops * steps * calls_per_step
        elif isinstance(model, PeerModel):
            flops[name] = _flops_of_generation(model, lambda: run(name, model))
        else:
            recs = stats(model)[before:]
            flops[name] = sum(r["flops"] for r in recs) if all(r["flops"] is not None for r in recs) else None
    # uncached with fewer steps at each method's FLOPs: sampled once for its images, then timed with the others
    equal = {name: max(1, round(steps * f / flops["uncached"])) for name, f in flops.items()
             if name != "uncached" and f}
    fewer = sorted({s for s in equal.values() if s < steps})
    for s in fewer:
        say(f"fewer steps: uncached with {s} steps")
        outputs[f"{s} steps"] = run("uncached", models["uncached"], s=s)
    timed_runs = [(name, model, steps) for name, model in models.items()]
    timed_runs += [(f"{s} steps", models["uncached"], s) for s in fewer]
    seconds = {name: [] for name, _, _ in timed_runs}
    for r in range(repeats):
        for name, model, s in timed_runs:
            say(f"timed run {r + 1}/{repeats}: {name}")
            t0 = time.perf_counter()
            run(name, model, s=s)
            seconds[name].append(time.perf_counter() - t0)

    def judge(row: Row, images: torch.Tensor) -> Row:
        base = outputs["uncached"]
        row.psnr = float(psnr(images, base).clamp_max(100).mean())
        row.ssim = float(ssim(images, base).mean())
        row.rel_l2 = float(rel_l2(images, base).mean())
        row.fd, row.accuracy = ref.judge(images, labels)
        return row

    timed = repeats > 0  # repeats=0: quality and FLOPs only (sweeps), no latency

    def latency(name):
        return statistics.median(seconds[name]) if timed else None

    base_s = latency("uncached")
    rows = []
    for name in models:
        med = latency(name)
        kind = "uncached" if name == "uncached" else "peer" if isinstance(models[name], PeerModel) else "method"
        row = Row(name, kind, steps, med, flops[name], base_s / med if timed else None,
                  (flops["uncached"] / flops[name]) if flops[name] else None)
        row.graphs, row.graph_breaks = dynamo.get(name, (None, None))
        row.equal_steps = equal.get(name)
        rows.append(judge(row, outputs[name]))
    say("noise floor: uncached, other noise")
    floor = run("uncached", models["uncached"], z=other)
    rows.append(judge(Row("uncached, other noise (noise floor)", "noise floor", steps), floor))
    samples = {name: outputs[name] for name in models}
    samples["noise floor"] = floor
    for s in fewer:
        med = latency(f"{s} steps")
        row = Row(f"uncached, {s} steps (equal compute)", "fewer steps", s, med, call_flops * s * calls_per_step,
                  base_s / med if timed else None, steps / s)
        rows.append(judge(row, outputs[f"{s} steps"]))
        samples[f"{s} steps"] = outputs[f"{s} steps"]
    return Report(getattr(ref, "family", "?"), n, steps, guidance, rows, samples)


def pareto_plot(report, path: str, metric: str = "psnr", title: str | None = None) -> None:
    """Latency speedup (x) vs a paired quality metric (y); the noise floor as a dashed line. `report`: a `Report`
    or anything with `rows` of the same fields (`fxcache eval`'s report, with a `title`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=130)
    for r in report.rows:
        value = getattr(r, metric)
        if r.kind == "noise floor":
            ax.axhline(value, ls="--", color="grey", label="noise floor (other seeds)")
            continue
        if r.latency_speedup is None or value is None:
            continue
        marker = {"uncached": "*", "method": "o", "peer": "^", "fewer steps": "s"}[r.kind]
        color = {"uncached": "black", "method": "tab:blue", "peer": "tab:orange", "fewer steps": "tab:grey"}[r.kind]
        shown = min(value, 60.0)
        ax.scatter([r.latency_speedup], [shown], marker=marker, color=color, s=40, zorder=3,
                   label={"method": "fxcache", "peer": "peers (diffusers hooks, cache-dit)",
                          "fewer steps": "uncached, fewer steps"}.get(r.kind))
        name = r.label.split(" (")[0].replace("uncached, ", "")
        ax.annotate(name, (r.latency_speedup, shown), textcoords="offset points", xytext=(4, 3), fontsize=5.5)
    ax.set_xlabel("latency speedup vs uncached torch.compile")
    ax.set_ylabel({"psnr": "PSNR vs uncached (dB, capped at 60)", "ssim": "SSIM vs uncached"}.get(metric, metric))
    ax.set_title(title or f"{report.model}: {report.images} images, {report.steps} steps, guidance {report.guidance}")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))  # one legend entry per kind
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
