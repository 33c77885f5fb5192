"""The evaluation harness: a reference model, a sampler and cache configs, on the same seeds, side by side.

Rows: the uncached compiled model (the reference every paired metric compares with), each cache config, a noise
floor (uncached with other noise: how far two unrelated samples of the same classes are) and, per method, the
uncached sampler with fewer steps at the same compute, printed right under it. Columns: wall-clock of the whole
sampling run (methods interleaved; median and min-max of the repeats), its FLOPs, the speedups, the paired PSNR
(pooled over the images, with the per-image spread) / SSIM / relative L2 against the uncached images, and the
reference's own judge (`ref.judge`): the Frechet distance of its classifier's features to real images and prompt
adherence (digits: the classifier names the digit asked for; scenes: count, colour, shape and position all as the
prompt says).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from .. import cache_backend, stats
from ..config import CacheConfig
from ..passes.propagate_shapes import eager_flops
from ..runtime.records import flops_unit
from .files import save_figure
from .metrics import psnr_summary, rel_l2, ssim
from .peers import Peer, PeerModel
from .reference import ReferenceModel
from .sampling import sample


@dataclasses.dataclass
class Row:
    label: str
    kind: str  # "uncached" | "method" (fxcache) | "peer" (another library) | "noise floor" | "fewer steps"
    steps: int
    seconds: float | None = None  # median of the timed runs
    flops: float | None = None
    latency_speedup: float | None = None
    flops_speedup: float | None = None
    psnr: float | None = None  # pooled over the images: 10 log10(range^2 / mean per-image MSE); inf: identical
    ssim: float | None = None
    rel_l2: float | None = None
    fd: float | None = None
    accuracy: float | None = None
    graphs: int | None = None  # graphs Dynamo compiled for this row (warm-up run)
    graph_breaks: int | None = None
    equal_steps: int | None = None  # a cached row: the step count of the uncached sampler with the same FLOPs
    clip: float | None = None  # CLIP score (`fxcache eval` with a local CLIP model)
    psnr_images: tuple[float, ...] | None = None  # per-image PSNR, in the order of the images
    seconds_runs: list[float] | None = None  # every timed run, in order


#: pooled PSNR gaps within this many dB always count as a tie (more when the per-image differences are noisier)
TIE_DB = 0.25


def three_digits(v: float) -> str:
    """`v` with three significant digits and no exponent (87.3, 19.4, 3.05, 0.0512)."""
    if v == 0 or not math.isfinite(v):
        return format(v, "g")
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f}"


def db(v: float | None) -> str:
    """A PSNR in dB for a table: '-' when there is none, 'inf' for identical images."""
    return "-" if v is None else "inf" if math.isinf(v) else f"{v:.2f}"


def psnr_spread(r: Row) -> str:
    """The per-image PSNR range of a row, 'min-max' (dB)."""
    if not r.psnr_images:
        return "-"
    lo, hi = min(r.psnr_images), max(r.psnr_images)
    return db(lo) if lo == hi else f"{db(lo)}–{db(hi)}"


def latency(r: Row) -> str:
    """Median seconds per run and the min-max of the timed runs."""
    if r.seconds is None:
        return "-"
    runs = r.seconds_runs or []
    if len(runs) < 2:
        return f"{r.seconds:.3f}"
    return f"{r.seconds:.3f} ({min(runs):.3f}–{max(runs):.3f})"


def paired_fewer_steps(rows: list[Row], r: Row) -> Row | None:
    """The uncached fewer-steps row at a cached row's FLOPs (the step count closest to them), if there is one."""
    if r.equal_steps is None:
        return None
    return next((f for f in rows if f.kind == "fewer steps" and f.steps == r.equal_steps), None)


def paired_order(rows: list[Row]) -> list[tuple[Row, bool]]:
    """The rows in table order, each with whether it is a fewer-steps row shown under the cached row it is paired
    with: uncached and the noise floor first, then each method or peer followed by its equal-FLOPs fewer-steps row
    (repeated when two methods share one), then any fewer-steps row no method is paired with."""
    head = [r for r in rows if r.kind in ("uncached", "noise floor")]
    out, used = [(r, False) for r in head], set()
    for r in rows:
        if r.kind in ("method", "peer"):
            out.append((r, False))
            other = paired_fewer_steps(rows, r)
            if other is not None:
                out.append((other, True))
                used.add(id(other))
    out += [(r, False) for r in rows if r.kind == "fewer steps" and id(r) not in used]
    return out


def markdown_table(rows: list[Row], columns: list[tuple[str, Callable[[Row], str]]]) -> str:
    """A markdown table of `rows` in `paired_order`, a fewer-steps row under its method marked with an arrow."""
    lines = ["| setting | " + " | ".join(h for h, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for r, paired in paired_order(rows):
        label = f"↳ {r.label}" if paired else r.label
        lines.append(f"| {label} | " + " | ".join(fn(r) for _, fn in columns) + " |")
    return "\n".join(lines)


def _opt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def common_columns(rows: list[Row]) -> list[tuple[str, Callable[[Row], str]]]:
    """Steps, latency, FLOPs (in a unit that fits them) and pooled PSNR with its per-image spread."""
    scale, unit = flops_unit(r.flops for r in rows)
    return [("steps", lambda r: str(r.steps)),
            ("s per run, median (min–max)", latency),
            ("latency speedup", lambda r: _opt(r.latency_speedup, ".2f")),
            (unit, lambda r: "-" if r.flops is None else three_digits(r.flops / scale)),
            ("FLOPs speedup", lambda r: _opt(r.flops_speedup, ".2f")),
            ("PSNR dB (pooled)", lambda r: db(r.psnr)),
            ("per-image PSNR min–max", psnr_spread)]


#: timed runs of one setting that differ by more than this fraction of their median: the machine looks busy
SPREAD = 0.10


def latency_note(rows: list[Row], load: float | None = None, cpus: int | None = None) -> str | None:
    """Why the rows' latencies should not be quoted, or None: a load average of half the CPUs or more before the
    run (`load`, `cpus`), timed runs of a setting spread over more than `SPREAD` of their median, or a single timed
    run per setting (no spread to judge by)."""
    timed = [r for r in rows if r.seconds and r.seconds_runs]
    if not timed:
        return None
    parts = []
    if load is not None and cpus and load >= 0.5 * cpus:
        parts.append(f"the load average was {load:.1f} on {cpus} CPUs before the run")
    spread = [(max(r.seconds_runs) - min(r.seconds_runs)) / r.seconds for r in timed if len(r.seconds_runs) > 1]
    if not spread:
        parts.append("each setting was timed once (no spread to judge by)")
    elif max(spread) > SPREAD:
        parts.append(f"the timed runs of a setting differ by up to {max(spread):.0%} of their median")
    if not parts:
        return None
    return ("latencies are uncertain: " + "; ".join(parts) + ". FLOPs and quality do not depend on it; time again "
            "on an otherwise idle machine (more --repeats) before quoting speedups")


@dataclasses.dataclass
class Verdict:
    """A cached row against the uncached sampler with fewer steps at its FLOPs."""

    row: Row
    fewer: Row | None
    outcome: str  # "beats" | "ties" | "loses" | "saves less than a step" | "no PSNR"
    gap: float | None = None  # pooled PSNR of the row minus the fewer-steps row's, dB
    tolerance: float | None = None  # |gap| up to this is a tie, dB

    def line(self) -> str:
        r, f = self.row, self.fewer
        if f is None:
            return f"{r.label}: saves less than half a step's FLOPs, no fewer-steps row to compare with"
        if self.outcome == "no PSNR":
            return f"{r.label}: no PSNR to compare with {f.steps} steps"
        said = {"beats": "beats", "ties": "ties with", "loses": "loses to"}[self.outcome]
        speed = ""
        if r.latency_speedup is not None and f.latency_speedup is not None:
            speed = f"; latency {r.latency_speedup:.2f}x vs {f.latency_speedup:.2f}x faster"
        flops = ""
        if r.flops_speedup is not None and f.flops_speedup is not None:
            flops = f", {r.flops_speedup:.2f}x vs {f.flops_speedup:.2f}x fewer FLOPs"
        return (f"{r.label}: {said} fewer steps at equal FLOPs: PSNR {db(r.psnr)} dB vs {db(f.psnr)} dB with "
                f"{f.steps} steps (pooled; a tie is within {self.tolerance:.2f} dB){speed}{flops}")


def tie_tolerance(a: Row, b: Row) -> float:
    """|pooled PSNR gap| up to which two rows tie: `TIE_DB`, or twice the standard error of the gap when that is
    larger. The gap is 10 log10(mean MSE_b / mean MSE_a) over the same images; its standard error is the
    delta-method one of paired images, (10 / ln 10) * stdev(MSE_b,i / mean MSE_b - MSE_a,i / mean MSE_a) / sqrt(n),
    which stays bounded when one image is near-identical (a per-image PSNR difference would then swing by tens of
    dB). `TIE_DB` alone without per-image PSNRs, for fewer than two images, or when a row is identical throughout."""
    if not a.psnr_images or not b.psnr_images or len(a.psnr_images) != len(b.psnr_images) or len(a.psnr_images) < 2:
        return TIE_DB
    mse_a = [10 ** (-p / 10) for p in a.psnr_images]  # in units of range^2; +inf dB -> 0
    mse_b = [10 ** (-p / 10) for p in b.psnr_images]
    mean_a, mean_b = statistics.fmean(mse_a), statistics.fmean(mse_b)
    if mean_a == 0 or mean_b == 0:
        return TIE_DB
    u = [y / mean_b - x / mean_a for x, y in zip(mse_a, mse_b)]
    return max(TIE_DB, 2 * 10 / math.log(10) * statistics.stdev(u) / math.sqrt(len(u)))


def verdicts(rows: list[Row]) -> list[Verdict]:
    """Each method or peer against its paired fewer-steps row (`paired_fewer_steps`): it beats it when its pooled
    PSNR is higher by more than `tie_tolerance`, loses when lower by more, and ties otherwise."""
    out = []
    for r in rows:
        if r.kind not in ("method", "peer"):
            continue
        f = paired_fewer_steps(rows, r)
        if f is None:
            out.append(Verdict(r, None, "saves less than a step"))
            continue
        if r.psnr is None or f.psnr is None:
            out.append(Verdict(r, f, "no PSNR"))
            continue
        gap = math.inf if r.psnr > f.psnr else -math.inf if r.psnr < f.psnr else 0.0
        if math.isfinite(r.psnr) and math.isfinite(f.psnr):
            gap = r.psnr - f.psnr
        tol = tie_tolerance(r, f)
        out.append(Verdict(r, f, "ties" if abs(gap) <= tol else "beats" if gap > 0 else "loses", gap, tol))
    return out


@dataclasses.dataclass
class Report:
    model: str
    images: int
    steps: int
    guidance: float
    rows: list[Row]
    samples: dict[str, torch.Tensor]

    def table(self) -> str:
        columns = common_columns(self.rows) + [
            ("SSIM", lambda r: _opt(r.ssim, ".4f")), ("rel. L2", lambda r: _opt(r.rel_l2, ".4f")),
            ("FD", lambda r: _opt(r.fd, ".2f")), ("adherence", lambda r: _opt(r.accuracy, ".3f")),
            ("graphs / breaks", lambda r: "-" if r.graphs is None else f"{r.graphs} / {r.graph_breaks}")]
        return markdown_table(self.rows, columns)


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
        if row.kind != "uncached":  # the paired metrics of the reference against itself say nothing
            summary = psnr_summary(images, base)
            row.psnr, row.psnr_images = summary.pooled, summary.per_image
            row.ssim = float(ssim(images, base).mean())
            row.rel_l2 = float(rel_l2(images, base).mean())
        row.fd, row.accuracy = ref.judge(images, labels)
        return row

    timed = repeats > 0  # repeats=0: quality and FLOPs only (sweeps), no latency

    def median(name):
        return statistics.median(seconds[name]) if timed else None

    base_s = median("uncached")
    rows = []
    for name in models:
        med = median(name)
        kind = "uncached" if name == "uncached" else "peer" if isinstance(models[name], PeerModel) else "method"
        row = Row(name, kind, steps, med, flops[name], base_s / med if timed else None,
                  (flops["uncached"] / flops[name]) if flops[name] else None, seconds_runs=seconds[name] or None)
        row.graphs, row.graph_breaks = dynamo.get(name, (None, None))
        row.equal_steps = equal.get(name)
        rows.append(judge(row, outputs[name]))
    say("noise floor: uncached, other noise")
    floor = run("uncached", models["uncached"], z=other)
    rows.append(judge(Row("uncached, other noise (noise floor)", "noise floor", steps), floor))
    samples = {name: outputs[name] for name in models}
    samples["noise floor"] = floor
    for s in fewer:
        med = median(f"{s} steps")
        row = Row(f"uncached, {s} steps (equal compute)", "fewer steps", s, med, call_flops * s * calls_per_step,
                  base_s / med if timed else None, steps / s, seconds_runs=seconds[f"{s} steps"] or None)
        rows.append(judge(row, outputs[f"{s} steps"]))
        samples[f"{s} steps"] = outputs[f"{s} steps"]
    return Report(getattr(ref, "family", "?"), n, steps, guidance, rows, samples)


def pareto_plot(report, path: str, metric: str = "psnr", title: str | None = None) -> None:
    """`pareto_figure` saved to `path`."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(report, metric, title)
    save_figure(fig, path)
    plt.close(fig)


def pareto_figure(report, metric: str = "psnr", title: str | None = None):
    """Speedup (x: latency, or FLOPs when no row was timed) vs a paired quality metric (y) of every cached row, each
    in a colour of its own named in the legend and joined by a dotted line to its equal-FLOPs fewer-steps point;
    the fewer-steps rows as one grey dashed curve; the noise floor as a dashed line. Identical images (PSNR +inf) are
    drawn on a line of their own above the finite values, labelled so; no value is capped. `report`: a `Report` or
    anything with `rows` of the same fields (`fxcache eval`'s report, with a `title`). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    timed = any(r.latency_speedup is not None for r in rows if r.kind != "uncached")
    xname = "latency_speedup" if timed else "flops_speedup"

    def point(r: Row):
        x, y = getattr(r, xname), getattr(r, metric)
        return None if x is None or y is None else (x, y)

    shown = [r for r in rows if r.kind in ("method", "peer", "fewer steps") and point(r)]
    floor = next((getattr(r, metric) for r in rows if r.kind == "noise floor" and getattr(r, metric) is not None), None)
    finite = [point(r)[1] for r in shown if math.isfinite(point(r)[1])] + ([floor] if floor is not None else [])
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = max(hi - lo, 1.0)
    top = hi + 0.15 * span  # where identical images (+inf) are drawn

    def y_of(v: float) -> float:
        return top if math.isinf(v) and v > 0 else v

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=130, layout="constrained")
    if floor is not None:
        ax.axhline(floor, ls="--", color="grey", lw=1, label="noise floor (uncached on other noise)")
    if any(math.isinf(point(r)[1]) for r in shown):
        ax.axhline(top, ls=":", color="black", lw=0.8)
        ax.annotate("identical to uncached (PSNR = inf)", (0, top), xycoords=("axes fraction", "data"),
                    xytext=(4, 4), textcoords="offset points", fontsize=7)
    fewer = sorted((r for r in shown if r.kind == "fewer steps"), key=lambda r: point(r)[0])
    if fewer:
        ax.plot([point(r)[0] for r in fewer], [y_of(point(r)[1]) for r in fewer], ls="--", marker="s", ms=5,
                color="dimgrey", zorder=2,
                label="uncached, fewer steps (" + ", ".join(str(r.steps) for r in fewer) + " steps)")
    cached = [r for r in shown if r.kind != "fewer steps"]
    colours = plt.get_cmap("tab10" if len(cached) <= 10 else "tab20")
    for i, r in enumerate(cached):
        x, y = point(r)
        colour = colours(i % colours.N)
        ax.scatter([x], [y_of(y)], marker="^" if math.isinf(y) else "o" if r.kind == "method" else "D", s=45,
                   color=colour, edgecolor="black", linewidth=0.4, zorder=4,
                   label=r.label + (" (peer)" if r.kind == "peer" else ""))
        other = paired_fewer_steps(rows, r)
        if other is not None and point(other):
            ax.plot([x, point(other)[0]], [y_of(y), y_of(point(other)[1])], ls=":", lw=1, color=colour, zorder=3)
    ax.set_xlabel("latency speedup vs uncached" if timed else "FLOPs speedup vs uncached")
    ax.set_ylabel({"psnr": "PSNR vs uncached, pooled over the images (dB)",
                   "ssim": "SSIM vs uncached"}.get(metric, metric))
    ax.set_ylim(lo - 0.08 * span, top + 0.08 * span)
    ax.set_title(title or f"{report.model}: {report.images} images, {report.steps} steps, guidance {report.guidance}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper", fontsize=7,
                   title="dotted: a method to its equal-FLOPs fewer-steps run", title_fontsize=6)
    return fig
