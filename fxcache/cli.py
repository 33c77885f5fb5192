"""Command line: `fxcache demo` (uncached vs. cached sampling on the embedded text-to-image reference: table, image
grid, Pareto plot), `fxcache eval` (the same on your own diffusers pipeline), `fxcache calibrate` (a method's
threshold or interval for a target PSNR on your pipeline, saved as a config file), `fxcache export` (a cached
transformer to ONNX / TensorRT artifacts and a manifest) and `fxcache check`."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (what was wrong, what is accepted) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int, text: str, why: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= {minimum}{why}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an int >= {minimum}{why}, got {value}")
    return value


def _positive(text: str) -> int:
    """argparse type: an int >= 1 (thread, step, image and batch counts)."""
    return _at_least(1, text)


def _images(text: str) -> int:
    """argparse type: the demo's image count (its Frechet distance needs two images or more)."""
    return _at_least(2, text, " (the Frechet distance compares sets of two images or more)")


def _finite(text: str) -> float:
    """argparse type: a finite float (a NaN or infinite guidance scale makes every image NaN)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _steps(text: str) -> int:
    """argparse type: a sampler step count, within what an export and its loader take."""
    from fxcache.config import MAX_STEPS

    value = _positive(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_STEPS} steps, got {value}")
    return value


def _file(text: str) -> str:
    """argparse type: an existing file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _model_folder(text: str) -> str:
    """argparse type: a folder written by diffusers' save_pretrained (it has config.json)."""
    return _saved_folder(text, "a diffusers model folder (write one with transformer.save_pretrained(folder))")


def _clip_folder(text: str) -> str:
    """argparse type: a local CLIP model folder (it has config.json)."""
    return _saved_folder(text, "a CLIP model folder (write one with CLIPModel.save_pretrained(folder) and "
                               "CLIPProcessor.save_pretrained(folder))")


def _saved_folder(text: str, what: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} has no config.json: not {what}")
    return text


def _device(text: str) -> str:
    """argparse type: a torch device this machine has (cpu, cuda, cuda:N, mps, ...)."""
    here = _devices_here()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; accepted here: {here}") from None
    if device.type == "cpu":
        return text
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    count = getattr(getattr(torch, device.type, None), "device_count", lambda: 1)
    if not (callable(available) and available() and (device.index is None or device.index < count())):
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; accepted here: {here}")
    return text


def _devices_here() -> str:
    """The devices `--device` takes on this machine, for its error message."""
    names = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def _timestep_input(text: str) -> int | str:
    """argparse type: the forward's timestep parameter, a name (or dotted path) or an index (digits)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected the name or index of the forward's timestep parameter (e.g. "
                                         "timestep, or 1), got ''")
    return int(text) if text.isdigit() else text


class CommandError(Exception):
    """A user error found by a command (a file it cannot read or write): printed as one line, exit status 1."""


def _output_folder(path: str) -> None:
    """Create the results folder of `demo` / `eval` (refusing one that is a symbolic link), or say why not."""
    from fxcache.quality.files import LinkedFolderError, output_folder

    try:
        output_folder(path)
    except LinkedFolderError as exc:
        raise CommandError(f"--out {exc.strerror}") from None
    except OSError as exc:
        raise CommandError(f"cannot create the output folder {path!r}: {exc.strerror or exc}") from None


DEMO_METHODS = (("DuCa N=5 R=0.9", "duca", {}), ("TaylorSeer N=6 O=2", "taylorseer", {"preset": "flux"}),
                ("FORA N=3", "fora", {}))


def verdict(report) -> str:
    """One line: each method against the uncached sampler with fewer steps at the same FLOPs (the cheapest way to
    go faster, which caching has to beat): pooled PSNR against the full-step images and wall-clock speedup of both
    (`fxcache.quality.evaluate.verdicts`, where a tie is within the noise of the per-image differences)."""
    from fxcache.quality.evaluate import verdicts

    found = verdicts(report.rows)
    said = {k: [v.row.label for v in found if v.outcome == k] for k in ("beats", "loses", "ties")}
    parts = []
    for v in found:
        r, other = v.row, v.fewer
        if other is None:
            parts.append(f"{r.label} saves less than a step")
            continue
        if v.outcome == "no PSNR":
            continue
        speed = "" if r.latency_speedup is None or other.latency_speedup is None else (
            f", {r.latency_speedup:.1f}x vs {other.latency_speedup:.1f}x faster")
        parts.append(f"{r.label} {r.psnr:.1f} dB vs {other.steps} steps {other.psnr:.1f} dB{speed}")
    wins, losses, ties = said["beats"], said["loses"], said["ties"]
    if not wins and not losses and not ties:
        head = "no method saved a whole step's FLOPs"
    elif not losses and not ties:
        head = "at equal FLOPs every method beats simply taking fewer steps"
    elif not wins and not ties:
        head = "at equal FLOPs simply taking fewer steps beats every method here"
    else:
        said = [f"{', '.join(wins)} beat fewer steps" if wins else "",
                f"fewer steps beat {', '.join(losses)}" if losses else "",
                f"{', '.join(ties)} tie with fewer steps (within the noise)" if ties else ""]
        head = "at equal FLOPs " + "; ".join(x for x in said if x)
    return f"{head}: " + "; ".join(parts) + " (PSNR pooled over the images)"


def demo(argv=None) -> int:
    """Uncached vs. DuCa, TaylorSeer and FORA on the embedded text-to-image reference (a FLUX-style MMDiT with 256
    image tokens, trained on drawn scenes by benchmarks/train_reference.py), against fewer steps at equal FLOPs."""
    import fxcache
    from fxcache.config import make_config
    from fxcache.quality.evaluate import evaluate, latency_note, pareto_plot, verdicts
    from fxcache.quality.files import write_text
    from fxcache.quality.grids import save_labelled_grid
    from fxcache.quality.scene_eval import load_reference

    p = _Parser(prog="fxcache demo", description=demo.__doc__)
    p.add_argument("--out", default="fxcache-demo", help="output folder (default ./fxcache-demo)")
    p.add_argument("--steps", type=_steps, default=50, help="Euler steps (default 50)")
    p.add_argument("--images", type=_images, default=10, help="images, one prompt each (default 10, at least 2)")
    p.add_argument("--repeats", type=_positive, default=2, help="timed runs per method, interleaved (default 2)")
    p.add_argument("--guidance", type=_finite, default=4.0, help="CFG scale (default 4, batched CFG)")
    p.add_argument("--lowering", default="inductor", choices=fxcache.lowering_names())
    p.add_argument("--threads", type=_positive, default=2)
    p.add_argument("--reference", help="a reference pipeline folder written by benchmarks/train_reference.py scenes "
                                       "(default: the embedded one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    _output_folder(args.out)  # before the minutes of sampling: an output folder that cannot be made fails now
    _warn_if_busy()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on this machine, before ours

    try:
        ref = load_reference(args.reference)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # the kinds diffusers raises for a bad folder
        raise CommandError(f"--reference {args.reference!r} cannot be loaded by diffusers: "
                           f"{_first_line(exc)}") from None
    params = sum(q.numel() for q in ref.transformer.parameters())
    _, _, height, width = ref.latent_shape(1)
    print(f"fxcache demo: the text-to-image reference (FluxPipeline: {params / 1e6:.1f}M-parameter MMDiT, "
          f"{height * width // 4} image + {ref.txt_ids.shape[0]} text tokens, trained on drawn scenes by "
          f"benchmarks/train_reference.py), "
          f"{args.images} prompts, {args.steps} flow-matching Euler steps, guidance {args.guidance:g} (batched CFG), "
          f"lowering={args.lowering}, {args.threads} threads, torch {torch.__version__}, {platform.machine()}",
          flush=True)
    methods = {label: make_config(name, **opts) for label, name, opts in DEMO_METHODS}
    from fxcache.quality.scene_eval import eval_labels

    labels = eval_labels(args.images)
    from tqdm.auto import tqdm

    m = len(methods)
    total = (1 + m) + m + args.repeats * (1 + 2 * m) + 1  # warm-ups, fewer steps, timed runs, noise floor (at most)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stdout) as bar:
        def progress(message: str) -> None:
            bar.set_description(message[:48])
            bar.update(1)

        report = evaluate(ref, methods, labels=labels, steps=args.steps, repeats=args.repeats,
                          guidance=args.guidance, lowering=args.lowering, progress=progress)
        bar.update(bar.total - bar.n)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    table = report.table()
    print()
    print(table)
    print("\nPSNR dB (pooled): 10 log10(range^2 / the mean of the per-image MSEs), with the per-image PSNR range "
          "beside it; PSNR / SSIM / rel. L2: the same prompts and noise, against the uncached images. Each method's "
          "uncached fewer-steps row at its FLOPs is right under it (↳). FD: Frechet distance "
          "(torchmetrics) of a scene classifier's features to drawn scenes of the same prompts (lower is better). "
          "adherence: the images whose count, colour, shape and position all match the prompt (exact checks). "
          "The noise floor row is the uncached model on other noise: unrelated images of the same prompts.")
    summary = verdict(report)
    lines = [v.line() for v in verdicts(report.rows)]
    caution = latency_note(report.rows, load, os.cpu_count())
    rows = [("uncached", report.samples["uncached"])]
    for label in methods:
        rows.append((label, report.samples[label]))
    for r in report.rows:
        if r.kind == "fewer steps":
            rows.append((f"uncached, {r.steps} steps", report.samples[f"{r.steps} steps"]))
    head = next(iter(methods))
    diff = (report.samples[head] - report.samples["uncached"]).abs().mean(1, keepdim=True)
    rows.append((f"|{head.split()[0]} - uncached| x4", (diff * 4 - 1).clamp(-1, 1)))
    rows.append(("noise floor (other noise)", report.samples["noise floor"]))
    from fxcache.quality.scenes import PREFIX

    columns = [c.replace(PREFIX + " ", "") for c in ref.captions(labels)]
    try:
        save_labelled_grid(rows, os.path.join(args.out, "grid.png"), columns=columns, tile=96)
        pareto_plot(report, os.path.join(args.out, "pareto.png"))
        write_text(os.path.join(args.out, "table.md"), table + "\n\n" + summary + "\n\n"
                   + "".join(f"- {line}\n" for line in lines) + (f"\nNote: {caution}.\n" if caution else ""))
    except OSError as exc:
        raise CommandError(f"cannot write the results to {args.out!r}: {exc.strerror or exc}") from None
    print("\nAgainst fewer steps at equal FLOPs:")
    for line in lines:
        print("  " + line)
    if caution:
        print(f"\nNote: {caution}.")
    print(f"\nIn one line: {summary}.")
    print(f"\nwrote {args.out}/grid.png (rows: {', '.join(label for label, _ in rows)}; one prompt per column, "
          f"same noise), {args.out}/pareto.png and {args.out}/table.md")
    return 0


def _warn_if_busy() -> None:
    """Say so when other work already loads this machine and torch runs several threads: the threads then wait on
    each other and every run can be many times slower (a generation at 2 threads beside a busy process took more
    than 40x its 1-thread time on a 2-core machine)."""
    load, cpus, threads = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, os.cpu_count() or 1, \
        torch.get_num_threads()
    if threads > 1 and load >= 0.5 * cpus:
        print(f"note: this machine is busy (load average {load:.1f} on {cpus} CPUs): {threads} torch threads "
              "competing with that work can make every run many times slower; --threads 1 avoids it", flush=True)


def _option(text: str) -> tuple[str, object]:
    import ast

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"options are NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a bare string such as score=knorm


def export_cmd(argv=None) -> int:
    """Export a cached transformer: one artifact per variant (weights as constants) and manifest.json."""
    import fxcache

    p = _Parser(prog="fxcache export", description=export_cmd.__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--reference", default="flux", choices=("flux", "dit", "pixart"),
                     help="a committed trained digit model (default flux)")
    src.add_argument("--model", type=_model_folder,
                     help="a diffusers transformer folder (from save_pretrained); needs --inputs")
    p.add_argument("--inputs", type=_file, help="safetensors file of the example call's keyword tensors (with --model)")
    p.add_argument("--batch", type=_positive, default=1, help="images per call for --reference (default 1)")
    p.add_argument("--no-cfg", action="store_true", help="--reference: no batched CFG rows")
    p.add_argument("--method", default="duca", help=f"one of {', '.join(fxcache.method_names())} (default duca)")
    p.add_argument("--preset", help="the method's preset (flux, dit, pixart, video)")
    p.add_argument("--option", "-o", action="append", type=_option, default=[], metavar="NAME=VALUE",
                   help="a method option, e.g. -o interval=3 -o ratio=0.9 (repeatable)")
    p.add_argument("--format", default="onnx", choices=("onnx", "tensorrt"))
    p.add_argument("--num-steps", type=_steps, default=50, help="sampler steps the schedule covers (default 50)")
    p.add_argument("--out", default="fxcache-export", help="output folder (default ./fxcache-export)")
    args = p.parse_args(argv)
    if args.model:
        if not args.inputs:
            p.error("--model needs --inputs (a safetensors file of the example keyword tensors)")
        transformer, inputs = _load_model(args.model, args.inputs)
        what = args.model
    else:
        from fxcache.quality.reference import load

        ref = load(args.reference)
        transformer, inputs = ref.transformer, ref.example_inputs(args.batch, cfg=not args.no_cfg)
        what = f"the {args.reference} reference"
    options = dict(args.option)
    if args.preset:
        options["preset"] = args.preset
    config = fxcache.config.make_config(args.method, **options)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items() if isinstance(v, torch.Tensor))
    print(f"exporting {what} with {config!r} to {args.format} in {args.out}/ ({shapes})", flush=True)
    t0 = time.perf_counter()
    manifest = fxcache.export(transformer, inputs, config, format=args.format, out_dir=args.out,
                              num_steps=args.num_steps)
    print(f"done in {time.perf_counter() - t0:.1f} s")
    for a in manifest.artifacts:
        size = os.path.getsize(os.path.join(args.out, a.file)) / 1e6
        caches = sum(1 for t in a.inputs if t.role == "cache")
        print(f"  {a.file:<16} {a.kind:<9} {size:7.1f} MB  {a.flops / 1e9:7.2f} GFLOPs  {caches:3d} cache inputs  "
              f"max |runtime - torch| {a.max_abs_error:.1e}")
    letters = {"full": "F", "partial": "P", "skip": "S", "reuse": "R", "forecast": "T", "cluster": "C"}
    kinds = "".join(letters.get(manifest.artifacts[j].kind, "?") for j in manifest.schedule)
    print(f"schedule ({manifest.num_steps} steps; F full, P partial, S skip, R reuse, T Taylor forecast, C cluster): "
          f"{kinds}\nrun it: fxcache.deploy.CachedSession({args.out!r})")
    return 0


def _load_model(folder: str, inputs_file: str):
    """The transformer saved in `folder` and the example inputs in `inputs_file`; CommandError for files that are
    not what they should be."""
    from diffusers import AutoModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        inputs = load_file(inputs_file)
    except (SafetensorError, OSError) as exc:
        raise CommandError(f"--inputs {inputs_file!r} is not a readable safetensors file: {exc}") from None
    try:  # a local folder: never a download
        transformer = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # the kinds diffusers raises for a bad folder
        raise CommandError(f"--model {folder!r} cannot be loaded by diffusers: {_first_line(exc)}") from None
    return transformer.eval(), inputs


def check_cmd(argv=None) -> int:
    """Check that fxcache caches a transformer as the maths says (for CI): analysis, graph breaks, FULL and an
    every-step-FULL loop against the uncached model, the variants against the hooked eager reference, no
    recompiles. One PASS / WARN / SKIP / FAIL line per check and a verdict; exits 1 when a check fails (a WARN, e.g.
    a graph break in a model fxcache still caches, fails only with --strict), else 0."""
    import fxcache
    from fxcache.testing.check import REFERENCE_METHODS, check_model

    p = _Parser(prog="fxcache check", description=check_cmd.__doc__)
    p.add_argument("--model", type=_model_folder, required=True,
                   help="a diffusers transformer folder (from save_pretrained)")
    p.add_argument("--inputs", type=_file, required=True,
                   help="safetensors file of an example call's keyword tensors")
    p.add_argument("--methods", default=",".join(REFERENCE_METHODS),
                   help=f"comma-separated, of {', '.join(fxcache.method_names())} (default "
                        f"{','.join(REFERENCE_METHODS)})")
    p.add_argument("--steps", type=_positive, default=6, help="calls per loop (default 6)")
    p.add_argument("--timestep-input", type=_timestep_input,
                   help="the forward's timestep parameter (its name, or its index among the forward's parameters), "
                        "when fxcache does not find it")
    p.add_argument("--strict", action="store_true",
                   help="fail on warnings too (a graph break in a model fxcache still caches)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CommandError(f"--methods names no method: give one or more of {', '.join(fxcache.method_names())}, "
                           "comma-separated")
    unknown = [m for m in methods if m not in fxcache.method_names()]
    if unknown:
        raise CommandError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(fxcache.method_names())}")
    transformer, inputs = _load_model(args.model, args.inputs)
    report = check_model(transformer, inputs, methods, steps=args.steps, timestep_input=args.timestep_input,
                         strict=args.strict)
    rc = 0 if report.ok else 1
    print("\n".join(map(str, report.checks)))
    print(f"fxcache check: {report.summary()}; exit status {rc}")
    return rc


def _method_parts(text: str, flag: str = "--methods") -> tuple[str, str, dict]:
    """`NAME[:PRESET][@OPTION=VALUE...]` -> (name, preset or "", the options given after @), name and preset
    checked."""
    import fxcache

    head, *settings = text.strip().split("@")
    name, _, preset = head.partition(":")
    if name not in fxcache.method_names():
        raise CommandError(f"{flag}: unknown method {name!r}; known: {', '.join(fxcache.method_names())} "
                           "(optionally NAME:PRESET and @OPTION=VALUE, e.g. toca:flux, fbcache@threshold=0.1)")
    if preset:
        presets = fxcache.config.get_method(name).PRESETS
        if preset not in presets:
            raise CommandError(f"{flag} {text!r}: {name} has no preset {preset!r}; its presets: "
                               f"{', '.join(presets) or 'none'}")
    options = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        if not eq or not key:
            raise CommandError(f"{flag} {text!r}: {setting!r} is not OPTION=VALUE (e.g. threshold=0.1)")
        options[key.strip()] = _option_value(value.strip())
    return name, preset, options


def _method_spec(text: str, steps: int):
    """`NAME[:PRESET][@OPTION=VALUE...]` (e.g. `toca:flux`, `fbcache@threshold=0.1`,
    `dbcache@first_blocks=1@threshold=0.12`) -> (label, CacheConfig) for a `steps`-step sampler."""
    import fxcache

    name, preset, given = _method_parts(text)
    settings = text.strip().split("@")[1:]
    options = dict(fxcache.config.preset_options(name, preset, steps), preset=preset) if preset else {}
    if getattr(fxcache.config.get_method(name), "STEPS_FROM_SAMPLER", False):
        options.setdefault("num_steps", steps)  # its rule counts the sampler's steps (TeaCache's last step)
    options.update(given)
    try:
        config = fxcache.config.make_config(name, **options)
    except fxcache_errors() as exc:
        raise CommandError(f"--methods {text!r}: {exc}") from None
    label = f"{name} ({preset} preset)" if preset else name
    return label + "".join(f" {s}" for s in settings), config


def _option_value(text: str):
    """A method option's value from the command line: a JSON value (number, true/false, null, a list), else the
    text itself (a name)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def eval_cmd(argv=None) -> int:
    """Uncached vs. fxcache methods on your own diffusers pipeline (a local folder, or a model id already in the
    local cache; never a download): same prompts and seeds, interleaved timed runs; writes table.md,
    results.json, grid.png and pareto.png."""
    import fxcache
    from fxcache.quality.evaluate import TIE_DB, paired_order, pareto_plot
    from fxcache.quality.files import write_json, write_text
    from fxcache.quality.grids import save_labelled_grid
    from fxcache.quality.pipeline_eval import check_call_args, evaluate_pipeline, load_pipeline, read_prompts

    p = _Parser(prog="fxcache eval", description=eval_cmd.__doc__)
    p.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (model_index.json) or a cached id")
    p.add_argument("--prompts", type=_file, required=True, help="a text file, one prompt per line ('#' comments)")
    p.add_argument("--methods", default="duca,taylorseer,fora",
                   help="comma-separated fxcache methods, each NAME[:PRESET][@OPTION=VALUE...], e.g. toca:flux or "
                        "fbcache@threshold=0.1 (default duca,taylorseer,fora)")
    p.add_argument("--steps", type=_steps, help="inference steps (default: the pipeline's own default)")
    p.add_argument("--seeds", type=_positive, default=1, help="images per prompt, seeds 0..N-1 (default 1)")
    p.add_argument("--batch-size", type=_positive, default=1, help="prompts per pipeline call (default 1)")
    p.add_argument("--repeats", type=_positive, default=3,
                   help="rounds of every prompt x seed per setting, interleaved call by call; the first gives the "
                        "images, all are timed (default 3)")
    p.add_argument("--lowering", default="inductor", choices=fxcache.lowering_names())
    p.add_argument("--arg", "-a", action="append", type=_option, default=[], metavar="NAME=VALUE",
                   help="a pipeline call argument, e.g. -a guidance_scale=3.5 -a height=512 (repeatable)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="load the pipeline in this dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", type=_device, help="where to run it (default: cuda when available, else cpu)")
    p.add_argument("--clip-model", type=_clip_folder,
                   help="a local CLIP model folder (CLIPModel + CLIPProcessor) for the CLIP score")
    p.add_argument("--no-fewer-steps", action="store_true", help="leave out the uncached fewer-steps rows")
    p.add_argument("--threads", type=_positive, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default="fxcache-eval", help="output folder (default ./fxcache-eval)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        prompts = read_prompts(args.prompts)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"--prompts: {exc}") from None
    except OSError as exc:
        raise CommandError(f"--prompts {args.prompts!r} cannot be read: {exc.strerror or exc}") from None
    if not [m for m in args.methods.split(",") if m.strip()]:
        raise CommandError("--methods names no method")
    _output_folder(args.out)
    _warn_if_busy()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        pipe = load_pipeline(args.pipeline, getattr(torch, dtype), device)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"--pipeline {args.pipeline!r} cannot be loaded offline by diffusers: "
                           f"{_first_line(exc)}") from None
    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise CommandError(f"--pipeline {args.pipeline!r} is a {type(pipe).__name__} without a transformer "
                           "component: fxcache caches diffusion transformers")
    try:  # before any sampling
        check_call_args(pipe, dict(args.arg))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    from fxcache.quality.pipeline_eval import default_steps

    steps = args.steps or default_steps(pipe) or 50
    methods = dict(_method_spec(m, steps) for m in args.methods.split(",") if m.strip())
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * (len(methods) + 2))
    print(f"fxcache eval: {type(pipe).__name__} from {args.pipeline} on {device}, {len(prompts)} prompts x "
          f"{args.seeds} seeds, {steps} steps, methods {', '.join(methods)}, lowering={args.lowering}, "
          f"torch {torch.__version__}", flush=True)
    from tqdm.auto import tqdm

    m = 0 if args.no_fewer_steps else len(methods)
    calls = args.seeds * -(-len(prompts) // args.batch_size)
    total = (1 + len(methods)) + 1 + args.repeats * calls * (1 + len(methods) + m) + 2  # at most
    with tqdm(total=total, unit="call", dynamic_ncols=True, file=sys.stdout) as bar:  # stderr: errors only
        def progress(message: str) -> None:
            bar.set_description(message[:50])
            bar.update(1)

        try:
            report = evaluate_pipeline(pipe, prompts, methods, steps=steps, seeds=list(range(args.seeds)),
                                       batch_size=args.batch_size,
                                       call_args=dict(args.arg), repeats=args.repeats, lowering=args.lowering,
                                       fewer_steps=not args.no_fewer_steps, clip_model=args.clip_model,
                                       name=args.pipeline, progress=progress, note=bar.write)
            bar.update(bar.total - bar.n)
        except (ValueError, TypeError) as exc:
            raise CommandError(_first_line(exc)) from None
    table = report.table()
    lines = report.verdict_lines()
    notes = (f"PSNR dB (pooled): 10 log10(range^2 / the mean of the per-image MSEs) against the uncached images of "
             f"the same prompt and seed (inf: identical), with the per-image PSNR range beside it; the noise floor "
             f"row is the uncached pipeline on other seeds (unrelated images of the same prompts). Each method's "
             f"uncached fewer-steps row at its FLOPs is right under it (↳); a tie is a pooled PSNR gap within "
             f"{TIE_DB} dB or two standard errors over these images (more prompts or --seeds narrow it). s per run: whole pipeline calls "
             f"({len(prompts)} prompts x {args.seeds} seeds, {args.batch_size} per call), median and range of "
             f"{args.repeats} rounds interleaved call by call. Uncached FLOPs: counted on the eager transformer(s), "
             f"once per distinct call signature ({report.flops_passes} counted call"
             f"{'s' if report.flops_passes != 1 else ''}), times the calls; the compiled uncached images differ from "
             f"the eager pipeline's by at most {report.compile_gap:.1e} on the first call (the lowering's own "
             "rounding).")
    print("\n" + table + "\n")
    if lines:
        print("Against fewer steps at equal FLOPs:")
        for line in lines:
            print("  " + line)
    print("\n" + notes)
    if report.latency_note:
        print("\nNote: " + report.latency_note + ".")
    cols = [f"{p_} (seed {s})" for s in report.seeds for p_ in report.prompts]
    mid = report.frames // 2  # a video shows its middle frame
    order = list(dict.fromkeys(r.label for r, _ in paired_order(report.rows) if r.kind != "noise floor"))
    order += [r.label for r in report.rows if r.kind == "noise floor"]
    rows = [(label, report.images[label][mid::report.frames]) for label in order]
    md = table + "\n\n" + "".join(f"- {line}\n" for line in lines) + "\n" + notes + "\n"
    if report.latency_note:
        md += "\nNote: " + report.latency_note + ".\n"
    try:
        save_labelled_grid(rows, os.path.join(args.out, "grid.png"), columns=cols, tile=160)
        pareto_plot(report, os.path.join(args.out, "pareto.png"),
                    title=f"{args.pipeline}: {len(cols)} images, {steps} steps")
        write_text(os.path.join(args.out, "table.md"), md)
        write_json(os.path.join(args.out, "results.json"),
                   dict(report.as_json(), device=device, torch=torch.__version__, call_args=dict(args.arg)),
                   indent=2, default=str)
    except OSError as exc:
        raise CommandError(f"cannot write the results to {args.out!r}: {exc.strerror or exc}") from None
    print(f"\nwrote {args.out}/table.md, results.json, grid.png (rows: {', '.join(order)}) and pareto.png")
    return 0


def _grid(text: str) -> list:
    """argparse type: comma-separated thresholds or intervals (ints stay ints)."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(int(part) if part.isdigit() else float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def calibrate_cmd(argv=None) -> int:
    """Search a method's threshold (or interval) for the least compute that keeps a target PSNR against the uncached
    pipeline on your prompts; print the curve measured, each point beside the uncached sampler with fewer steps at
    the same compute, and save the chosen config as JSON (fxcache.enable(pipe, FILE) and
    fxcache.cache_backend(FILE) take it). TeaCache gets its polynomial and MagCache its ratios fitted first. Exits
    0 when a setting reaches the target, 1 when none does (the file then holds the most accurate one)."""
    import fxcache
    from fxcache.quality.calibration import calibrate
    from fxcache.quality.pipeline_eval import load_pipeline, read_prompts

    p = _Parser(prog="fxcache calibrate", description=calibrate_cmd.__doc__)
    p.add_argument("--pipeline", required=True, help="a diffusers pipeline folder (model_index.json) or a cached id")
    p.add_argument("--prompts", type=_file, required=True,
                   help="a text file, one calibration prompt per line ('#' comments): a few like those you serve")
    p.add_argument("--method", required=True,
                   help="NAME[:PRESET][@OPTION=VALUE...], e.g. fbcache, teacache@reduce=mean, "
                        "dbcache@first_blocks=1 (the threshold or interval is what is searched)")
    p.add_argument("--target", type=_finite, required=True, help="PSNR to keep, dB, pooled over the images")
    p.add_argument("--steps", type=_steps, help="inference steps (default: the pipeline's own default)")
    p.add_argument("--seeds", type=_positive, default=1, help="images per prompt, seeds 0..N-1 (default 1)")
    p.add_argument("--grid", type=_grid,
                   help="comma-separated values to measure (default: thresholds 0.01 doubling to 1.28, or intervals "
                        "2..10)")
    p.add_argument("--refine", type=lambda t: _at_least(0, t), default=2,
                   help="bisections of the threshold at the target (default 2)")
    p.add_argument("--lowering", default="eager", choices=fxcache.lowering_names(),
                   help="lowering of the measured runs (default eager: no compile per point)")
    p.add_argument("--arg", "-a", action="append", type=_option, default=[], metavar="NAME=VALUE",
                   help="a pipeline call argument, e.g. -a guidance_scale=3.5 -a height=512 (repeatable)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="load the pipeline in this dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", type=_device, help="where to run it (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=_positive, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="the JSON file to write (default ./METHOD-calibrated.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, preset, options = _method_parts(args.method, "--method")
    if preset:
        options["preset"] = preset
    out = args.out or f"{name}-calibrated.json"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):  # before the minutes of sampling
        raise CommandError(f"--out {out!r}: no such folder {folder!r}")
    try:
        prompts = read_prompts(args.prompts)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"--prompts: {exc}") from None
    except OSError as exc:
        raise CommandError(f"--prompts {args.prompts!r} cannot be read: {exc.strerror or exc}") from None
    _warn_if_busy()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        pipe = load_pipeline(args.pipeline, getattr(torch, dtype), device)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CommandError(f"--pipeline {args.pipeline!r} cannot be loaded offline by diffusers: "
                           f"{_first_line(exc)}") from None
    try:
        result = calibrate(pipe, name, target_psnr=args.target, prompts=prompts, steps=args.steps,
                           seeds=list(range(args.seeds)), call_args=dict(args.arg), grid=args.grid,
                           refine=args.refine, lowering=args.lowering, **options)
    except (ValueError, TypeError) as exc:  # ConfigError among them: bad options, call arguments, grid
        raise CommandError(_first_line(exc)) from None
    try:
        result.save(out)
    except OSError as exc:
        raise CommandError(f"cannot write {out!r}: {exc.strerror or exc}") from None
    print(f"\nwrote {out}: fxcache.enable(pipe, {out!r}) or fxcache.cache_backend({out!r}) runs the "
          f"{'chosen' if result.reached else 'most accurate'} config")
    return 0 if result.reached else 1


COMMANDS = {"demo": demo, "export": export_cmd, "check": check_cmd, "eval": eval_cmd, "calibrate": calibrate_cmd}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fxcache demo [--out DIR] [--steps N] [--images N] [--repeats N] "
              "[--lowering inductor|eager] [--threads T]\n"
              "       fxcache export [--reference flux|dit|pixart | --model DIR --inputs FILE] [--method M] "
              "[-o NAME=VALUE] [--format onnx|tensorrt] [--num-steps N] [--out DIR]\n"
              "       fxcache check --model DIR --inputs FILE [--methods fora,duca,taylorseer] [--steps N] "
              "[--timestep-input NAME_OR_INDEX] [--strict]\n"
              "       fxcache eval --pipeline DIR_OR_ID --prompts FILE [--methods duca,taylorseer,fora] [--steps N] "
              "[-a NAME=VALUE] [--clip-model DIR] [--out DIR]\n"
              "       fxcache calibrate --pipeline DIR_OR_ID --prompts FILE --method NAME --target DB [--steps N] "
              "[--grid V,V,...] [-a NAME=VALUE] [--out FILE.json]\n"
              "       fxcache COMMAND --help")
        return 0 if argv else 2
    if argv[0] in COMMANDS:
        try:
            return COMMANDS[argv[0]](argv[1:])
        except (CommandError, fxcache_errors()) as exc:
            print(f"fxcache {argv[0]}: {exc}", file=sys.stderr)
            return 1
    print(f"fxcache: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


def _first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing): errors are printed as one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fxcache_errors():
    from fxcache.errors import FxCacheError

    return FxCacheError


if __name__ == "__main__":
    raise SystemExit(main())
