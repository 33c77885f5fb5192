"""Serving soak: several threads share one enabled diffusers pipeline, as a server does, and every request is
compared with the same request run alone.

Each thread makes its own pipeline with `from_pipe` (its own scheduler), every shape is warmed up first in the main
thread with Dynamo's recompile limits raised there (as the README asks); requests draw a shape, a prompt, a seed and
a step count, and some carry a fault: an exception raised from the step callback, or an interrupt (FLUX). Two
pipelines: FLUX (one graph per shape) and Lumina2 (whose forward graph-breaks: glue graphs and pieces). A request
"differs" when its output is not the output of the same request run alone on a fresh pipeline (rel > 1e-5); a
"crash" is any exception but the injected ones.

    python benchmarks/soak_serving.py --pipeline flux --runs 10            # 4 threads x 25 requests per run
    python benchmarks/soak_serving.py --pipeline lumina2 --runs 10
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class Fault(Exception):
    """The exception a faulty request raises from its step callback."""


@dataclasses.dataclass(frozen=True)
class Job:
    shape: int
    prompt: int
    seed: int
    steps: int
    fault: str | None  # None, "raise" or "interrupt"


@dataclasses.dataclass
class Result:
    requests: int = 0
    compared: int = 0
    differ: int = 0
    crashed: int = 0
    duplicate_graphs: int = 0
    outside_calls: int = 0
    worst: float = 0.0
    errors: list = dataclasses.field(default_factory=list)

    def add(self, other: "Result") -> None:
        for f in ("requests", "compared", "differ", "crashed", "duplicate_graphs", "outside_calls"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.worst = max(self.worst, other.worst)
        self.errors += other.errors


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from reliability.pipelines import flux_pipeline, flux_prompt

    def call(pipe, job: Job, callback):
        return pipe(**flux_prompt(job.prompt), height=job.shape, width=job.shape, num_inference_steps=job.steps,
                    output_type="latent", generator=torch.Generator().manual_seed(job.seed),
                    callback_on_step_end=callback).images

    def fork(pipe):
        return FluxPipeline.from_pipe(pipe, scheduler=FlowMatchEulerDiscreteScheduler())

    return flux_pipeline, call, fork, (16, 24, 32, 40), ("raise", "interrupt")


def _lumina2():
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    from families import make
    from reliability.pipelines import tiny_vae

    def build():
        return Lumina2Pipeline(transformer=make("lumina2"), scheduler=FlowMatchEulerDiscreteScheduler(),
                               vae=tiny_vae(), text_encoder=None, tokenizer=None)

    def call(pipe, job: Job, callback):
        g = torch.Generator().manual_seed(500 + job.prompt)
        emb, neg = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
        mask = torch.ones(1, 6, dtype=torch.bool)
        return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, prompt_attention_mask=mask,
                    negative_prompt_attention_mask=mask, height=job.shape, width=job.shape,
                    num_inference_steps=job.steps, guidance_scale=2.0, output_type="latent",
                    generator=torch.Generator().manual_seed(job.seed), callback_on_step_end=callback).images

    def fork(pipe):
        return Lumina2Pipeline.from_pipe(pipe, scheduler=FlowMatchEulerDiscreteScheduler())

    return build, call, fork, (32, 48, 64, 80), ("raise",)


PIPELINES = {"flux": _flux, "lumina2": _lumina2}


def _run(call, pipe, job: Job):
    def callback(p, i, t, kwargs):
        if i == 2 and job.fault == "raise":
            raise Fault()
        if i == 2 and job.fault == "interrupt":
            p._interrupt = True
        return kwargs

    with torch.no_grad():
        return call(pipe, job, callback)


def _enabled(build, method: str, lowering: str, options: dict):
    import fxcache

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    fxcache.enable(pipe, method, lowering=lowering, **options)
    return pipe


def soak(pipeline: str = "flux", *, threads: int = 4, requests: int = 25, shapes: int = 4, seed: int = 0,
         method: str = "duca", lowering: str = "eager", options: dict | None = None,
         references: dict | None = None) -> Result:
    """One run: `threads` x `requests` requests on one enabled pipeline, each compared with its solo run.
    `references` (job -> output) is reused across runs: a solo run's output does not depend on the run."""
    from fxcache.pipelines import backends

    options = dict(interval=3) if options is None else options
    build, call, fork, sizes, faults = PIPELINES[pipeline]()
    sizes = sizes[:shapes]
    torch._dynamo.reset()  # a fresh server: no graphs of earlier runs count against the recompile limits
    torch._dynamo.config.recompile_limit = 64  # in this thread only: fxcache takes them to the workers
    torch._dynamo.config.accumulated_recompile_limit = 512
    pipe = _enabled(build, method, lowering, options)
    for size in sizes:  # warm every shape up from one thread
        _run(call, pipe, Job(size, 0, 0, 3, None))
    rng = random.Random(seed)
    plan = [[Job(rng.choice(sizes), rng.randrange(5), rng.randrange(1000), rng.choice((5, 6, 7)),
                 rng.choice((None,) * 6 + faults)) for _ in range(requests)] for _ in range(threads)]
    outputs: dict = {}
    result = Result(requests=threads * requests)
    start = threading.Barrier(threads)

    def work(index: int) -> None:
        mine = fork(pipe)
        mine.set_progress_bar_config(disable=True)
        start.wait()
        for j, job in enumerate(plan[index]):
            try:
                outputs[index, j] = _run(call, mine, job)
            except Fault:
                pass
            except Exception as exc:  # noqa: BLE001 - a crash is what the soak counts
                result.crashed += 1
                result.errors.append(f"thread {index} request {j}: {type(exc).__name__}: {str(exc)[:300]}")

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    backend = backends(pipe)[0]
    result.duplicate_graphs = getattr(backend, "duplicate_graphs", 0)
    result.outside_calls = sum(1 for r in backend.stats() if r["graph"] == -1)
    references = {} if references is None else references
    solo = None
    for (index, j), out in sorted(outputs.items()):
        job = plan[index][j]
        if job not in references:
            solo = solo or _enabled(build, method, lowering, options)
            references[job] = _run(call, solo, job)
        expected = references[job]
        rel = ((out - expected).norm() / expected.norm()).item()
        result.compared += 1
        result.worst = max(result.worst, rel)
        if rel > 1e-5:
            result.differ += 1
            result.errors.append(f"thread {index} request {j} {job}: rel {rel:.3g} from its solo run")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", choices=sorted(PIPELINES), default="flux")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--shapes", type=int, default=4)
    parser.add_argument("--method", default="duca")
    parser.add_argument("--lowering", default="eager")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    total, references = Result(), {}
    began = time.time()
    for run in range(args.runs):
        r = soak(args.pipeline, threads=args.threads, requests=args.requests, shapes=args.shapes, seed=run,
                 method=args.method, lowering=args.lowering, references=references)
        total.add(r)
        print(f"run {run}: {r.requests} requests, {r.compared} compared, {r.differ} differ (worst rel "
              f"{r.worst:.2g}), {r.crashed} crashed, {r.duplicate_graphs} duplicate graphs, {r.outside_calls} "
              f"calls outside fxcache", flush=True)
        for e in r.errors[:5]:
            print("   ", e)
    print(f"torch {torch.__version__}, {args.pipeline}, {args.method}, lowering {args.lowering}: {args.runs} runs x "
          f"{args.threads} threads x {args.requests} requests ({args.shapes} shapes, faults injected): "
          f"{total.differ} of {total.compared} compared requests differ from their solo run (worst rel "
          f"{total.worst:.2g}), {total.crashed} of {total.requests} crashed; {total.duplicate_graphs} duplicate "
          f"graphs, {total.outside_calls} calls outside fxcache; {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
