"""Command line: `fxcache demo` (uncached vs. cached sampling on the embedded trained digit model: table, image grid,
Pareto plot) and `fxcache export` (a cached transformer to ONNX / TensorRT artifacts and a manifest)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def _positive(text: str) -> int:
    """argparse type: an int >= 1 (thread, step, image and batch counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
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
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(f"{text!r} has no config.json: not a diffusers model folder (write one "
                                         "with transformer.save_pretrained(folder))")
    return text


class CommandError(Exception):
    """A user error found by a command (a file it cannot read or write): printed as one line, exit status 1."""


DEMO_METHODS = (("DuCa N=5 R=0.9", "duca", {}), ("TaylorSeer (FLUX preset)", "taylorseer", {"preset": "flux"}),
                ("FORA N=3", "fora", {}))


def demo(argv=None) -> int:
    """Uncached vs. DuCa, TaylorSeer and FORA on the embedded trained FLUX-style digit model."""
    import fxcache
    from fxcache.config import make_config
    from fxcache.quality.evaluate import evaluate, pareto_plot
    from fxcache.quality.reference import load
    from fxcache.quality.sampling import save_grid

    p = argparse.ArgumentParser(prog="fxcache demo", description=demo.__doc__)
    p.add_argument("--out", default="fxcache-demo", help="output folder (default ./fxcache-demo)")
    p.add_argument("--steps", type=_steps, default=50, help="Euler steps (default 50)")
    p.add_argument("--per-class", type=_positive, default=4, help="images per digit class (default 4: 40 images)")
    p.add_argument("--repeats", type=_positive, default=2, help="timed runs per method, interleaved (default 2)")
    p.add_argument("--lowering", default="inductor", choices=fxcache.lowering_names())
    p.add_argument("--threads", type=_positive, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    try:  # before the minutes of sampling: an output folder that cannot be made fails now
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create the output folder {args.out!r}: {exc.strerror or exc}") from None

    ref = load("flux")
    params = sum(q.numel() for q in ref.transformer.parameters())
    print(f"fxcache demo: the embedded FLUX-style digit model ({params / 1e6:.1f}M params, trained on MNIST by "
          f"benchmarks/train_reference.py), {10 * args.per_class} digits, {args.steps} flow-matching Euler steps, "
          f"guidance 2 (batched CFG), lowering={args.lowering}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.machine()}")
    methods = {label: make_config(name, **opts) for label, name, opts in DEMO_METHODS}
    total = (1 + args.repeats) * (1 + len(methods)) + 1 + len(methods)
    done = [0]

    def progress(message: str) -> None:
        done[0] = min(done[0] + 1, total)
        bar = "#" * (30 * done[0] // total)
        sys.stdout.write(f"\r[{bar:<30}] {done[0]:>2}/{total} {message:<60.60}")
        sys.stdout.flush()

    t0 = time.perf_counter()
    report = evaluate(ref, methods, per_class=args.per_class, steps=args.steps, repeats=args.repeats,
                      lowering=args.lowering, progress=progress)
    sys.stdout.write(f"\r[{'#' * 30}] done in {time.perf_counter() - t0:.0f} s{' ' * 60}\n")
    table = report.table()
    print()
    print(table)
    print("\nPSNR / SSIM / rel. L2: the same noise, against the uncached images. FD: Frechet distance of our digit "
          "classifier's logits to those of the 5000 real digits (lower is better). accuracy: the classifier "
          "agrees with "
          "the class asked for. The noise floor row is the uncached model on other noise: two unrelated digits of "
          "the same class.")
    names = ["uncached"] + list(methods) + ["noise floor"]
    grid = torch.cat([report.samples[n] for n in names])
    try:
        save_grid(grid, os.path.join(args.out, "grid.png"), nrow=report.images)
        pareto_plot(report, os.path.join(args.out, "pareto.png"))
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
    except OSError as exc:
        raise CommandError(f"cannot write the results to {args.out!r}: {exc.strerror or exc}") from None
    print(f"\nwrote {args.out}/grid.png (rows: {', '.join(names)}; same noise per column), "
          f"{args.out}/pareto.png and {args.out}/table.md")
    return 0


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

    p = argparse.ArgumentParser(prog="fxcache export", description=export_cmd.__doc__)
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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"--model {folder!r} cannot be loaded by diffusers: {first}") from None
    return transformer.eval(), inputs


def check_cmd(argv=None) -> int:
    """Check that fxcache caches a transformer as the maths says (for CI): analysis, graph breaks, FULL and an
    every-step-FULL loop against the uncached model, the variants against the hooked eager reference, no
    recompiles. Exits 1 when a check fails, with one line per check."""
    import fxcache
    from fxcache.testing.check import REFERENCE_METHODS, check_model

    p = argparse.ArgumentParser(prog="fxcache check", description=check_cmd.__doc__)
    p.add_argument("--model", type=_model_folder, required=True,
                   help="a diffusers transformer folder (from save_pretrained)")
    p.add_argument("--inputs", type=_file, required=True,
                   help="safetensors file of an example call's keyword tensors")
    p.add_argument("--methods", default=",".join(REFERENCE_METHODS),
                   help=f"comma-separated, of {', '.join(fxcache.method_names())} (default "
                        f"{','.join(REFERENCE_METHODS)})")
    p.add_argument("--steps", type=_positive, default=6, help="calls per loop (default 6)")
    p.add_argument("--timestep-input", help="the forward's timestep parameter, when fxcache does not find it")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in fxcache.method_names()]
    if unknown:
        raise CommandError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(fxcache.method_names())}")
    transformer, inputs = _load_model(args.model, args.inputs)
    report = check_model(transformer, inputs, methods, steps=args.steps, timestep_input=args.timestep_input)
    print(report)
    return 0 if report.ok else 1


COMMANDS = {"demo": demo, "export": export_cmd, "check": check_cmd}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fxcache demo [--out DIR] [--steps N] [--per-class N] [--repeats N] "
              "[--lowering inductor|eager] [--threads T]\n"
              "       fxcache export [--reference flux|dit|pixart | --model DIR --inputs FILE] [--method M] "
              "[-o NAME=VALUE] [--format onnx|tensorrt] [--num-steps N] [--out DIR]\n"
              "       fxcache check --model DIR --inputs FILE [--methods fora,duca,taylorseer] [--steps N]\n"
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


def fxcache_errors():
    from fxcache.errors import FxCacheError

    return FxCacheError


if __name__ == "__main__":
    raise SystemExit(main())
