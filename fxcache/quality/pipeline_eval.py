"""`fxcache eval`: the uncached pipeline and each fxcache method on a user's own diffusers pipeline, same prompts,
same seeds, side by side, each method beside the uncached sampler with fewer steps at its FLOPs.

Every setting runs on its own view of one loaded pipeline (a shallow copy: the same components and config, nothing
of the weights copied, so a 12B transformer is loaded once) whose transformer is compiled for it: with an fxcache
backend per method (which hears the pipeline's cond / uncond contexts, as with `fxcache.enable`; every pipeline
call is one request), with plain `torch.compile` for the uncached rows (under `lowering="eager"`: the
eager transformer in a wrapper of its own). Each setting is compiled on one call per distinct batch size; then
every setting, the fewer-steps rows included, runs every prompt x seed `repeats` times, interleaved call by call
(round-robin, each call starting one setting later), and the first round's images are the ones compared.

FLOPs: a method's from fxcache's per-call records; the uncached rows' counted on the pipeline's own eager
transformers once per distinct call signature (`CallFlops`) and multiplied by the calls of that signature. Quality:
the PSNR pooled over the images (`metrics.pooled_psnr`) with the per-image spread, and SSIM, against the uncached
images of the same prompt and seed; a noise floor (the uncached pipeline on other seeds: what a PSNR between two
unrelated images of the same prompts is); the CLIP score when a local CLIP model folder is given. Caching has to
beat taking fewer steps at the same FLOPs to be worth it: `evaluate.verdicts` says, per method, whether it does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import statistics
import time
import types
import typing
import warnings
from typing import Callable

import torch

from .evaluate import Row, _opt, common_columns, latency_note, markdown_table, paired_fewer_steps, verdicts
from .metrics import psnr_summary, ssim

NOISE_FLOOR = "uncached, other seeds (noise floor)"


@dataclasses.dataclass
class EvalReport:
    pipeline: str
    prompts: list[str]
    seeds: list[int]
    steps: int
    rows: list[Row]
    images: dict[str, torch.Tensor]  # label -> (N, 3, H, W) in [-1, 1]: seed-major, then prompt (then frame)
    frames: int = 1  # frames per video (1: images)
    compile_gap: float = 0.0  # max |compiled uncached - eager pipeline| on the first call's images
    flops_passes: int = 0  # FLOP-counter runs the uncached FLOPs took (one per distinct call signature)
    latency_note: str | None = None  # why the latencies may not be worth quoting (a loaded machine), if they may not

    def table(self) -> str:
        return markdown_table(self.rows, common_columns(self.rows) + [
            ("SSIM", lambda r: _opt(r.ssim, ".4f")), ("CLIP", lambda r: _opt(r.clip, ".2f"))])

    def verdict_lines(self) -> list[str]:
        return [v.line() for v in verdicts(self.rows)]

    def as_json(self) -> dict:
        fields = ("label", "kind", "steps", "seconds", "seconds_runs", "flops", "latency_speedup", "flops_speedup",
                  "psnr", "psnr_images", "ssim", "clip", "equal_steps")

        def row(r: Row) -> dict:
            out = {k: _finite_or_text(getattr(r, k)) for k in fields}
            paired = paired_fewer_steps(self.rows, r)
            out["paired_with"] = paired.label if paired is not None else None
            return out

        return dict(pipeline=self.pipeline, prompts=self.prompts, seeds=self.seeds, steps=self.steps,
                    frames=self.frames, compile_gap=self.compile_gap, flops_passes=self.flops_passes,
                    image_order="for each seed, for each prompt: pipe(prompt, generator=manual_seed(seed))",
                    psnr="pooled over the images: 10 log10(range^2 / mean per-image MSE), range 2 ([-1, 1]); "
                         "psnr_images per image; 'inf': identical images",
                    verdicts=self.verdict_lines(), latency_note=self.latency_note,
                    rows=[row(r) for r in self.rows])


def _finite_or_text(v):
    """JSON has no infinity: +-inf as the strings 'inf' / '-inf' (lists element by element)."""
    if isinstance(v, (list, tuple)):
        return [_finite_or_text(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path!r} holds no prompt (one per line; '#' starts a comment)")
    return prompts


def load_pipeline(name: str, dtype: torch.dtype | None = None, device: str | None = None):
    """A diffusers pipeline from a local folder or a model id already in the local cache; never a download."""
    from diffusers import DiffusionPipeline

    from .reference import _quiet_diffusers

    with _quiet_diffusers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers 0.42 renames torch_dtype; older ones need it
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = DiffusionPipeline.from_pretrained(name, local_files_only=True, **kwargs)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _accepts(pipe, name: str) -> bool:
    params = inspect.signature(type(pipe).__call__).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


#: call arguments `fxcache eval` sets itself (the options that set them)
RESERVED = {"prompt": "--prompts", "num_inference_steps": "--steps", "generator": "--seeds",
            "output_type": "images are compared as tensors", "num_images_per_prompt": "--seeds",
            "return_dict": "images are read from the pipeline's output object"}
#: call arguments that are sizes: an int >= 1 (pipelines take 0, as None, for their default size)
SIZES = {"height": "pixels", "width": "pixels", "num_frames": "frames"}
#: what a value of each simple annotated type must be, and how to say it
_SIMPLE = {
    int: ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    bool: ("True or False", lambda v: isinstance(v, bool)),
    str: ("a str", lambda v: isinstance(v, str)),
}


def check_call_args(pipe, call_args: dict) -> None:
    """Refuse, before any sampling, call arguments the harness sets itself, names `pipe.__call__` does not take,
    values its signature rules out (an int, float, bool or str parameter, or that or None) and sizes that are not
    ints >= 1; richer parameters (lists, tensors, images) are left to the pipeline."""
    taken = [k for k in call_args if k in RESERVED]
    if taken:
        raise ValueError("; ".join(f"{k} is set by fxcache eval: " + (f"use {RESERVED[k]}" if RESERVED[k][:2] == "--"
                                                                      else RESERVED[k]) for k in taken))
    unknown = [k for k in call_args if not _accepts(pipe, k)]
    if unknown:
        raise ValueError(f"{type(pipe).__name__}.__call__ takes no argument {', '.join(unknown)}")
    params = inspect.signature(type(pipe).__call__).parameters
    for name, value in call_args.items():
        if name in SIZES and not (value is None or (_SIMPLE[int][1](value) and value >= 1)):
            raise ValueError(f"call argument {name}={value!r}: a size in {SIZES[name]}, an int >= 1 (leave it out "
                             "for the pipeline's default)")
        simple = _simple_types(params[name].annotation) if name in params else None
        if simple is None:
            continue
        types, none = simple
        if (value is None and none) or any(_SIMPLE[t][1](value) for t in types):
            continue
        said = " or ".join([_SIMPLE[t][0] for t in types] + (["None"] if none else []))
        raise ValueError(f"call argument {name}={value!r}: {type(pipe).__name__} takes {said} (its signature: "
                         f"{_annotation_text(params[name].annotation)})")


def _simple_types(annotation) -> tuple[list[type], bool] | None:
    """([int, float, bool, str among them], whether None is allowed) for an annotation made of those and None
    only; None for anything richer or unannotated."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
    else:
        args = (annotation,)
    kinds = [a for a in args if a is not type(None)]
    if not kinds or any(a not in _SIMPLE for a in kinds):
        return None
    return kinds, type(None) in args


def _annotation_text(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def default_steps(pipe) -> int | None:
    """The `num_inference_steps` default of the pipeline's `__call__` (FLUX.1-dev 28, schnell 4, PixArt 20, ...)."""
    param = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = getattr(param, "default", None)
    return default if isinstance(default, int) and default > 0 else None


def evaluate_pipeline(pipe, prompts: list[str], methods: dict, *, steps: int = 50, seeds: list[int] = (0,),
                      call_args: dict | None = None, repeats: int = 3, lowering: str = "inductor",
                      fewer_steps: bool = True, noise_floor: bool = True, clip_model: str | None = None,
                      name: str = "pipeline", batch_size: int = 1, progress: Callable[[str], None] | None = None,
                      note: Callable[[str], None] | None = None) -> EvalReport:
    """Run the uncached pipeline and each config in `methods` ({label: CacheConfig}) on every prompt x seed.

    Image (prompt p, seed s) comes from `pipe(p, generator=torch.Generator().manual_seed(s))` -- a user's own call
    gives it back -- with `batch_size` prompts per pipeline call. A row's seconds are whole pipeline calls (text
    encoding, denoising loop, decoding) summed over one round of every prompt x seed: the median and every round
    are kept. Every transformer component (`transformer`, `transformer_2`) is cached. `progress(message)` is told
    as each stage starts; `note(line)` hears the time estimates and what the user should know about the run.
    """
    import fxcache

    from ..passes.propagate_shapes import CallFlops
    from ..pipelines import context_names, transformer_components
    from ..runtime.attach import attach, detach

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (the first round gives the images), got {repeats}")
    say = progress or (lambda m: None)
    tell = note or (lambda m: None)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before our own work adds to it
    call_args = dict(call_args or {})
    check_call_args(pipe, call_args)
    scorer = _clip_scorer(clip_model) if clip_model else None  # a folder that is not CLIP fails before sampling
    names = transformer_components(pipe)
    if not names:
        raise ValueError(f"{type(pipe).__name__} has no transformer component: fxcache caches diffusion transformers")
    modules = {n: getattr(pipe, n) for n in names}
    branches = len(context_names(pipe)) or 3  # as fxcache.enable counts them
    seeds = list(seeds)
    settings, backends = {}, {}
    for label, config in {"uncached": None, **methods}.items():
        view = copy.copy(pipe)  # the same components and config; its own attributes (the transformers we set)
        view.set_progress_bar_config(disable=True)
        for n, module in modules.items():
            if config is None:  # a wrapper of its own even when eager (Dynamo disabled): the FLOP counter hooks it
                compiled = (torch._dynamo.disable(module) if lowering == "eager"
                            else torch.compile(module, dynamic=False))
            else:
                backend = fxcache.cache_backend(config, lowering=lowering, max_branches=branches)
                backends.setdefault(label, []).append(backend)
                attach(module, backend)  # it hears the pipeline's cond / uncond contexts
                compiled = torch.compile(module, backend=backend, dynamic=False)
            setattr(view, n, compiled)
        settings[label] = view
    counter = CallFlops()
    for n in names:
        counter.watch(getattr(settings["uncached"], n), modules[n])
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    items = [(seed, chunk) for seed in seeds for chunk in chunks]  # the image order: seed-major, then prompt

    def call(label: str | None, n_steps: int, seed: int, chunk: list[str]) -> torch.Tensor:
        """The images of one pipeline call with setting `label` (None: the pipeline itself, eager, uncached)."""
        view = pipe if label is None else settings[label]
        cached = [getattr(view, n) for n in names] if label in backends else None
        gen = [torch.Generator().manual_seed(seed) for _ in chunk]
        with fxcache.request(*cached) if cached else contextlib.nullcontext():
            result = view(list(chunk), num_inference_steps=n_steps, generator=gen, output_type="pt", **call_args)
        return _as_images(result)

    def records(label: str) -> int:
        return sum(len(b.stats()) for b in backends.get(label, []))

    def method_flops(label: str, since: list[int]) -> float | None:
        recs = [r for b, k in zip(backends[label], since) for r in b.stats()[k:]]
        return sum(r["flops"] for r in recs) if recs and all(r["flops"] is not None for r in recs) else None

    # 1. compile: every setting on one call per distinct batch size (a new shape is a new graph)
    warm = list({len(chunk): (seeds[0], chunk) for chunk in reversed(chunks)}.values())[::-1]
    warm_flops = {}
    eager_first = None
    for label in settings:
        say(f"compile {label} (first call{'s' if len(warm) > 1 else ''})")
        counter.key = "warm-up"
        since = [len(b.stats()) for b in backends.get(label, [])]
        t0 = time.perf_counter()
        for seed, chunk in warm:
            call(label, steps, seed, chunk)
        if label == "uncached":
            t_compile = time.perf_counter() - t0
            warm_flops[label] = counter.flops("warm-up")
            say("the eager pipeline (first call, for the compile gap)")
            t0 = time.perf_counter()
            eager_first = call(None, steps, *items[0])
            t_call = time.perf_counter() - t0
            rest = len(methods) * t_compile + repeats * len(items) * t_call * (1 + 2 * len(methods)) \
                + (len(items) * t_call if noise_floor else 0)
            tell(f"estimate: up to about {_duration(rest)} more (each method's compile taken as long as uncached's "
                 f"{t_compile:.0f} s, every timed call as long as an eager uncached one, {t_call:.1f} s; a closer "
                 "estimate follows the compiles)")
        else:
            warm_flops[label] = method_flops(label, since)
    base_warm = warm_flops["uncached"]
    equal = {k: max(1, round(steps * f / base_warm)) for k, f in warm_flops.items()
             if k != "uncached" and f and base_warm}
    fewer = sorted({s for s in equal.values() if s < steps}) if fewer_steps else []

    # 2. every setting on every prompt x seed, `repeats` rounds, interleaved call by call
    runs = [(label, label, steps) for label in settings] + [(fewer_label(s), "uncached", s) for s in fewer]
    images = {row: [] for row, _, _ in runs}
    seconds = {row: [0.0] * repeats for row, _, _ in runs}
    since = {label: [len(b.stats()) for b in bs] for label, bs in backends.items()}
    t_rounds = time.perf_counter()
    for r in range(repeats):
        for i, (seed, chunk) in enumerate(items):
            k = (r * len(items) + i) % len(runs)  # each call starts one setting later than the one before
            for row, label, s in runs[k:] + runs[:k]:
                say(f"round {r + 1}/{repeats}, call {i + 1}/{len(items)}: {row}")
                counter.key = row
                t0 = time.perf_counter()
                out = call(label, s, seed, chunk)
                seconds[row][r] += time.perf_counter() - t0
                if r == 0:
                    images[row].append(out)
            if r == 0 and i == 0 and (repeats > 1 or len(items) > 1):
                per_item = time.perf_counter() - t_rounds
                left = per_item * (repeats * len(items) - 1) + (len(items) * seconds["uncached"][0]
                                                               if noise_floor else 0)
                tell(f"estimate: about {_duration(left)} more ({repeats} rounds of {len(items)} calls of "
                     f"{len(runs)} settings; the first took {per_item:.1f} s)")
        if r == 0:
            counter.close()  # every row's calls are tallied; later rounds run without the hook
            flops = {row: counter.flops(row) or None for row, label, _ in runs if label == "uncached"}
            flops.update({label: method_flops(label, since[label]) for label in backends})
    images = {row: torch.cat(v) for row, v in images.items()}

    # 3. the noise floor: the uncached pipeline on other seeds
    if noise_floor:
        say("noise floor: uncached, other seeds")
        offset = max(1000, max(seeds) + 1)
        images[NOISE_FLOOR] = torch.cat([call("uncached", steps, seed + offset, chunk) for seed, chunk in items])

    base_s = statistics.median(seconds["uncached"])
    captions = [p for _ in seeds for p in prompts]

    def judge(row: Row, imgs: torch.Tensor) -> Row:
        if row.kind != "uncached":
            summary = psnr_summary(imgs, images["uncached"])
            row.psnr, row.psnr_images = summary.pooled, summary.per_image
            row.ssim = float(ssim(imgs, images["uncached"]).mean())
        if scorer is not None:
            per = imgs.shape[0] // len(captions)  # frames per video (1 for images)
            row.clip = scorer(imgs, [c for c in captions for _ in range(per)])
        return row

    say("metrics")
    rows = []
    base_f = flops["uncached"]
    for row_name, label, s in runs:
        med = statistics.median(seconds[row_name])
        kind = "uncached" if row_name == "uncached" else "fewer steps" if label == "uncached" else "method"
        f = flops.get(row_name)
        row = Row(row_name, kind, s, med, f, base_s / med, base_f / f if f and base_f else None,
                  seconds_runs=list(seconds[row_name]))
        row.equal_steps = equal.get(row_name)
        rows.append(judge(row, images[row_name]))
    if noise_floor:
        rows.append(judge(Row(NOISE_FLOOR, "noise floor", steps), images[NOISE_FLOOR]))
    for label, bs in backends.items():
        for n, b in zip(names, bs):
            b.reset()
            detach(modules[n], b)
    frames = images["uncached"].shape[0] // len(captions)
    first = images["uncached"][:eager_first.shape[0]]
    return EvalReport(name, list(prompts), seeds, steps, rows, images, frames=frames,
                      compile_gap=float((first - eager_first).abs().max()), flops_passes=counter.passes,
                      latency_note=latency_note(rows, load, os.cpu_count()))


def fewer_label(steps: int) -> str:
    """The label of the uncached row with fewer steps."""
    return f"uncached, {steps} steps (equal compute)"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _as_images(result) -> torch.Tensor:
    """A pipeline's output (`images`, or a video pipeline's `frames`) as (N, C, H, W) in [-1, 1]; video frames are
    N = videos x frames, in order."""
    data = getattr(result, "images", None)
    if data is None:
        data = getattr(result, "frames", None)
    if data is None:
        raise TypeError(f"{type(result).__name__} has neither `images` nor `frames`")
    x = torch.as_tensor(data).float().cpu()
    if x.dim() == 5:  # (videos, frames, C, H, W)
        x = x.reshape(-1, *x.shape[-3:])
    return x * 2 - 1


def _clip_scorer(folder: str):
    """The CLIP score (Hessel et al. 2021: 100 x max(cos(image, text), 0), averaged) with a local CLIP model
    folder (`CLIPModel` + `CLIPProcessor`), offline. Computed from the model's projections directly: torchmetrics'
    `CLIPScore` (1.9) reads `get_image_features` as a tensor, which transformers 5 no longer returns."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # what transformers raises for a folder it cannot read
        text = str(exc).strip()
        raise ValueError(f"clip_model {folder!r} is not a CLIP model folder transformers can load offline (CLIPModel "
                         f"and CLIPProcessor, save_pretrained): {text.splitlines()[0] if text else type(exc).__name__}"
                         ) from None

    def score(imgs: torch.Tensor, captions: list[str]) -> float:
        pix = ((imgs.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        batch = processor(text=captions, images=list(pix), return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = model(**batch)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        return float((100 * cos.clamp_min(0)).mean())

    return score
