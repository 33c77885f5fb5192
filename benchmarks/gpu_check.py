"""The GPU check in one process tree: the environment, the GPU tests, then the benchmark, results as they finish.

Run through `benchmarks/gpu_check.sh` (which installs the carried wheels first). Writes under `--out` (default
`$OUT`, else `gpu_results/`):
    env.json        versions (python, torch, CUDA, GPU, diffusers, cache-dit) and the arguments
    pytest.log      `pytest -m gpu tests/gpu` (CUDA graphs, Inductor on CUDA), with its exit status in check.jsonl
    rows.jsonl      one JSON line per finished benchmark row (bench_gpu.py), so a killed run keeps what it measured
    check.jsonl     one JSON line per finished stage
    imports-*.txt   the top-level modules each stage imported (the test suite checks the wheel list covers them)
The benchmark is FLUX.1-dev width with 4 double + 8 single blocks (`--tiny`: a tiny FLUX for the dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write_imports(path: str) -> None:
    """Top-level names of every module loaded now (the wheel-coverage test maps them to distributions)."""
    names = sorted({name.split(".")[0] for name, module in list(sys.modules.items())
                    if not name.startswith("_") and getattr(module, "__file__", None)})  # no builtins
    with open(path, "w") as fh:
        fh.write("\n".join(names) + "\n")


def log_stage(out: str, record: dict) -> None:
    with open(os.path.join(out, "check.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"gpu_check: {json.dumps(record)}", flush=True)


def environment(args) -> dict:
    import importlib.metadata as md

    import torch

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                diffusers=version("diffusers"), cache_dit=version("cache-dit"), argv=sys.argv[1:],
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def run_tests(args) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
           os.path.join(ROOT, "tests", "gpu")]
    env = dict(os.environ, FXCACHE_IMPORT_LOG=os.path.join(args.out, "imports-tests.txt"))
    began = time.monotonic()
    with open(os.path.join(args.out, "pytest.log"), "w") as log:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=args.test_timeout)
            output, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            output, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        log.write(output)
    print(output[-4000:], flush=True)
    lines = [line for line in output.splitlines() if line.strip()]
    log_stage(args.out, dict(stage="pytest", rc=rc, seconds=round(time.monotonic() - began, 1),
                             summary=lines[-1] if lines else ""))


def run_bench(args) -> None:
    sys.path.insert(0, HERE)
    import bench_gpu

    argv = ["--arch", "flux-dev-slim", "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--device", args.device, "--compiler", args.compiler,
            "--jsonl", os.path.join(args.out, "rows.jsonl"), "--json", os.path.join(args.out, "bench.json"),
            "--rows", args.rows]
    if args.tiny:
        argv += ["--tiny", "--dtype", "float32"]
    if args.bench_budget_s is not None:
        argv += ["--budget-s", str(args.bench_budget_s)]
    began = time.monotonic()
    results = bench_gpu.main(argv)
    failed = [r["row"] for r in results if "error" in r]
    log_stage(args.out, dict(stage="bench", rows=len(results), failed=failed,
                             skipped=[r["row"] for r in results if "skipped" in r],
                             seconds=round(time.monotonic() - began, 1)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model and a short loop: the dry run")
    p.add_argument("--compiler", choices=("inductor", "eager"), default=None,
                   help="default: inductor on CUDA, eager (Dynamo only) for a CPU dry run")
    p.add_argument("--steps", type=int, default=None, help="default 50 (12 with --tiny)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", default=None, help="bench_gpu.py rows (default: its DEFAULT_ROWS)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--test-timeout", type=float, default=170.0)
    p.add_argument("--bench-budget-s", type=float, default=230.0,
                   help="start no benchmark row after this many seconds of the benchmark")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device (the dry run is --device cpu --tiny)")
    args.compiler = args.compiler or ("inductor" if args.device == "cuda" else "eager")
    args.steps = args.steps or (12 if args.tiny else 50)
    if args.rows is None:
        sys.path.insert(0, HERE)
        import bench_gpu

        args.rows = ",".join(bench_gpu.DEFAULT_ROWS)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "env.json"), "w") as fh:
        json.dump(environment(args), fh, indent=1)
    if not args.skip_tests:
        run_tests(args)
    try:
        run_bench(args)
    finally:
        write_imports(os.path.join(args.out, "imports-bench.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
