"""`fxcache eval`: the uncached pipeline and each fxcache method on a user's own diffusers pipeline, same prompts,
same seeds, side by side.

Every setting runs on its own view of one loaded pipeline (a shallow copy: the same components and config, nothing
of the weights copied, so a 12B transformer is loaded once) whose transformer is compiled for it: with an fxcache
backend per method (which hears the pipeline's cond / uncond contexts, as with `fxcache.enable`; every pipeline
call is one request), with plain `torch.compile` for the uncached row. Timed runs are interleaved over the
settings. FLOPs come from fxcache's per-call records (the uncached row: the FULL variant's FLOPs times its calls).
Paired PSNR / SSIM (torchmetrics) are against the uncached images of the same prompt and seed; the CLIP score
when a local CLIP model folder is given. Uncached with fewer steps at each method's FLOPs is a row too: caching has to
beat it to be worth it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import statistics
import time
import types
import typing
import warnings
from typing import Callable

import torch

from .evaluate import Row
from .metrics import psnr, ssim


@dataclasses.dataclass
class EvalReport:
    pipeline: str
    prompts: list[str]
    seeds: list[int]
    steps: int
    rows: list[Row]
    images: dict[str, torch.Tensor]  # label -> (N, 3, H, W) in [-1, 1]: seed-major, then prompt (then frame)
    frames: int = 1  # frames per video (1: images)
    compile_gap: float = 0.0  # max |compiled uncached - eager pipeline| over the images: the lowering's own noise

    def table(self) -> str:
        lines = ["| setting | steps | s per run | latency speedup | TFLOPs | FLOPs speedup | PSNR dB | SSIM | CLIP |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def f(v, spec):
            return "-" if v is None else format(v, spec)

        for r in self.rows:
            lines.append(f"| {r.label} | {r.steps} | {f(r.seconds, '.3f')} | {f(r.latency_speedup, '.2f')} | "
                         f"{f(r.flops and r.flops / 1e12, '.3f')} | {f(r.flops_speedup, '.2f')} | "
                         f"{f(r.psnr, '.2f')} | {f(r.ssim, '.4f')} | {f(r.clip, '.2f')} |")
        return "\n".join(lines)

    def as_json(self) -> dict:
        fields = ("label", "kind", "steps", "seconds", "flops", "latency_speedup", "flops_speedup", "psnr", "ssim",
                  "clip", "equal_steps")
        return dict(pipeline=self.pipeline, prompts=self.prompts, seeds=self.seeds, steps=self.steps,
                    frames=self.frames, compile_gap=self.compile_gap,
                    image_order="for each seed, for each prompt: pipe(prompt, generator=manual_seed(seed))",
                    rows=[{k: getattr(r, k) for k in fields} for r in self.rows])


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
                      call_args: dict | None = None, repeats: int = 2, lowering: str = "inductor",
                      fewer_steps: bool = True, clip_model: str | None = None, name: str = "pipeline",
                      batch_size: int = 1, progress: Callable[[str], None] | None = None) -> EvalReport:
    """Run the uncached pipeline and each config in `methods` ({label: CacheConfig}) on every prompt x seed.

    Image (prompt p, seed s) comes from `pipe(p, generator=torch.Generator().manual_seed(s))` -- a user's own call
    gives it back -- with `batch_size` prompts per pipeline call. A row's seconds are whole pipeline calls (text
    encoding, denoising loop, decoding), summed over the run. Every transformer component (`transformer`,
    `transformer_2`) is cached; the uncached FLOPs are counted on one eager run of the pipeline's own transformers.
    """
    import fxcache

    from ..passes.propagate_shapes import ensure_cpu_attention_flops, flop_counter
    from ..pipelines import context_names, transformer_components
    from ..runtime.attach import attach, detach

    say = progress or (lambda m: None)
    call_args = dict(call_args or {})
    check_call_args(pipe, call_args)
    scorer = _clip_scorer(clip_model) if clip_model else None  # a folder that is not CLIP fails before sampling
    names = transformer_components(pipe)
    if not names:
        raise ValueError(f"{type(pipe).__name__} has no transformer component: fxcache caches diffusion transformers")
    modules = {n: getattr(pipe, n) for n in names}
    branches = len(context_names(pipe)) or 3  # as fxcache.enable counts them
    settings, backends = {}, {}
    for label, config in {"uncached": None, **methods}.items():
        view = copy.copy(pipe)  # the same components and config; its own attributes (the transformers we set)
        view.set_progress_bar_config(disable=True)
        for n, module in modules.items():
            if config is None:
                compiled = torch.compile(module, dynamic=False) if lowering != "eager" else module
            else:
                backend = fxcache.cache_backend(config, lowering=lowering, max_branches=branches)
                backends.setdefault(label, []).append(backend)
                attach(module, backend)  # it hears the pipeline's cond / uncond contexts
                compiled = torch.compile(module, backend=backend, dynamic=False)
            setattr(view, n, compiled)
        settings[label] = view
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

    def generate(label: str | None, n_steps: int) -> torch.Tensor:
        """Every image of the run with setting `label` (None: the pipeline itself, eager and uncached)."""
        view = pipe if label is None else settings[label]
        cached = [getattr(view, n) for n in names] if label in backends else None
        out = []
        for seed in seeds:
            for chunk in chunks:
                gen = [torch.Generator().manual_seed(seed) for _ in chunk]
                with fxcache.request(*cached) if cached else contextlib.nullcontext():
                    result = view(list(chunk), num_inference_steps=n_steps, generator=gen, output_type="pt",
                                  **call_args)
                out.append(_as_images(result))
        return torch.cat(out)

    # the uncached FLOPs: the pipeline's own (eager) transformers, counted call by call on one run of every image
    ensure_cpu_attention_flops()
    counted = [0]

    def enter(module, args, kwargs):
        module.__dict__["_fxcache_flops"] = flop_counter()
        module.__dict__["_fxcache_flops"].__enter__()

    def leave(module, args, kwargs, output):
        counter = module.__dict__.pop("_fxcache_flops")
        counter.__exit__(None, None, None)
        counted[0] += counter.get_total_flops()

    say("uncached FLOPs (one eager run)")
    hooks = [h for m in modules.values() for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                                   m.register_forward_hook(leave, with_kwargs=True))]
    try:
        eager_images = generate(None, steps)
    finally:
        for h in hooks:
            h.remove()
    images, flops = {}, {"uncached": counted[0] or None}
    for label in settings:
        say(f"warm-up {label} (compile + first run)")
        before = [len(b.stats()) for b in backends.get(label, [])]
        images[label] = generate(label, steps)
        if label in backends:
            recs = [r for b, k in zip(backends[label], before) for r in b.stats()[k:]]
            flops[label] = sum(r["flops"] for r in recs) if recs and all(r["flops"] is not None for r in recs) \
                else None
    equal = {k: max(1, round(steps * f / flops["uncached"])) for k, f in flops.items()
             if k != "uncached" and f and flops["uncached"]}
    fewer = sorted({s for s in equal.values() if s < steps}) if fewer_steps else []
    for s in fewer:
        say(f"fewer steps: uncached with {s} steps")
        images[f"uncached, {s} steps (equal compute)"] = generate("uncached", s)
    runs = [(label, label, steps) for label in settings]
    runs += [(f"uncached, {s} steps (equal compute)", "uncached", s) for s in fewer]
    seconds = {row: [] for row, _, _ in runs}
    for r in range(repeats):
        for row, label, s in runs:
            say(f"timed run {r + 1}/{repeats}: {row}")
            t0 = time.perf_counter()
            generate(label, s)
            seconds[row].append(time.perf_counter() - t0)
    base_s = statistics.median(seconds["uncached"])
    captions = [p for _ in seeds for p in prompts]

    def judge(row: Row, imgs: torch.Tensor) -> Row:
        if row.kind != "uncached":
            base = images["uncached"]
            row.psnr = float(psnr(imgs, base).clamp_max(100).mean())
            row.ssim = float(ssim(imgs, base).mean())
        if scorer is not None:
            per = imgs.shape[0] // len(captions)  # frames per video (1 for images)
            row.clip = scorer(imgs, [c for c in captions for _ in range(per)])
        return row

    rows = []
    for row_name, label, s in runs:
        med = statistics.median(seconds[row_name])
        kind = "uncached" if row_name == "uncached" else "fewer steps" if label == "uncached" else "method"
        f = flops.get(row_name) if kind == "method" else (flops["uncached"] * s / steps if flops["uncached"]
                                                           else None)
        row = Row(row_name, kind, s, med, f, base_s / med, flops["uncached"] / f if f and flops["uncached"] else None)
        row.equal_steps = equal.get(row_name)
        rows.append(judge(row, images[row_name]))
    for label, bs in backends.items():
        for n, b in zip(names, bs):
            b.reset()
            detach(modules[n], b)
    frames = eager_images.shape[0] // len(captions)
    return EvalReport(name, list(prompts), list(seeds), steps, rows, images, frames=frames,
                      compile_gap=float((images["uncached"] - eager_images).abs().max()))


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
