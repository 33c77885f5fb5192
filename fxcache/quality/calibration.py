"""`fxcache.calibrate`: the cheapest setting of a method that keeps a target PSNR against the uncached output on a
user's own pipeline (or model and sampling loop), beside what taking fewer steps gives at the same compute.

A method with a `threshold` (FBCache, DBCache and TeaCache decide per call, MagCache plans its steps from calibrated
ratios) is tuned by it, a method on a fixed schedule (FORA, ToCa, DuCa, TaylorSeer, ClusCa) by its `interval`.
Neither has a value that fits every model: a threshold is a relative change of some signal, and how far the signal
moves per step depends on the model, the sampler and the step count. So this measures: one uncached run of the
calibration prompts, then each value of a grid (thresholds ascending, geometric; intervals 2, 3, ...) on the same
prompts and seeds, its pooled PSNR against the uncached images (`metrics.psnr_summary`) and its compute share
(fxcache's per-call FLOPs over the uncached run's, counted the same way), stopping once the PSNR falls well below
the target, then bisecting between the cheapest threshold that reaches it and the next one that does not. Each
point stands beside the uncached sampler with `round(steps x share)` steps, the free way to spend the same compute:
a method is only worth it where it beats that (`evaluate.verdicts` says beats, ties or loses, as `fxcache eval`
does).

The uncached run also measures what two methods need fitted to a new model (`Recording`):
- MagCache's magnitude ratios, gamma_s = mean over tokens and batch of ||R_s|| / (||R_{s-1}|| + 1e-8), R the
  residual of all blocks on the main stream (norms over the last dim, float32; gamma_0 = 1), per CFG branch, as
  diffusers' `MagCacheConfig(calibrate=True)` computes them;
- TeaCache's rescale polynomial, `np.polyfit(x, y, 4)` of the relative L1 change of the model output (y) on that of
  its indicator (x, block 0's modulated attention input) between consecutive calls of a branch, as the authors fit
  theirs.

The model is traced by Dynamo once for the whole calibration: a switching backend (`_Switch`) hands the traced
graph to the setting being measured (the recording run, an fxcache backend per grid point via
`CacheBackend.compile_traced`, the plain graph for fewer steps), so a grid point costs its variants and its runs,
not a new trace. The streams and the indicator are read from that graph as fxcache's methods read them
(`analysis.cuts`), so the ratios and the polynomial describe the very values the methods compare.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from typing import Callable

import numpy as np
import torch
from torch import fx

from ..backends import check_lowering
from ..config import CacheConfig, get_method, make_config
from ..errors import ConfigError, UnsupportedGraphError
from .metrics import psnr_summary

#: default grids: thresholds (relative changes, accumulated or not) from 0.01 doubling to 1.28; intervals 2..10
THRESHOLDS = tuple(0.01 * 2 ** k for k in range(8))
MAX_INTERVAL = 10
#: a point this far below the target (dB) ends the scan: larger thresholds or intervals only lose more
MARGIN_DB = 3.0


# -- one Dynamo trace, many settings ---------------------------------------------------------------------------
@dataclasses.dataclass
class _Traced:
    """A graph Dynamo traced from the model, with what an fxcache backend needs to compile it later."""

    gm: fx.GraphModule
    example_inputs: list
    module: torch.nn.Module | None
    code: object
    plan: object = None  # GraphPlan
    error: str = ""  # why calibration cannot use this graph ("" when it can)


class _Switch:
    """A Dynamo backend that traces the model once and runs each graph with the setting measured now (`use`)."""

    def __init__(self):
        self.traced: list[_Traced] = []
        self.setting = None

    def __call__(self, gm: fx.GraphModule, example_inputs, **kwargs):
        from ..api import analyse_traced
        from ..runtime.attach import traced_frame

        module, code = traced_frame()
        traced = _Traced(gm, list(example_inputs), module, code)
        try:
            traced.plan, block_root = analyse_traced(gm, module, code)
            if traced.plan.timestep_index is None or block_root is not None:
                traced.error = ("the model's forward graph-breaks (or its blocks are compiled on their own): "
                                "calibration measures the residual of all blocks in one graph; remove the break "
                                "(`fxcache.explain(model, **inputs)` names it)")
        except UnsupportedGraphError as exc:
            traced.error = f"fxcache cannot cache the traced model: {exc.reason}"
        index = len(self.traced)
        self.traced.append(traced)

        def run(*args):
            if traced.error:
                raise UnsupportedGraphError(traced.error)
            return self.setting.run(index, traced, args)

        return run

    @contextlib.contextmanager
    def use(self, setting):
        self.setting = setting
        try:
            yield setting
        finally:
            self.setting = None


class _Plain:
    """The traced graph as it is: the uncached model (the fewer-steps runs)."""

    def run(self, index: int, traced: _Traced, args):
        return traced.gm(*args)

    def request(self):
        return contextlib.nullcontext()


class _Cached:
    """An fxcache backend's runner for each traced graph, built on first use."""

    def __init__(self, backend):
        self.backend = backend
        self.runners: dict[int, object] = {}

    def run(self, index: int, traced: _Traced, args):
        runner = self.runners.get(index)
        if runner is None:
            runner = self.runners[index] = self.backend.compile_traced(
                traced.gm, traced.example_inputs, module=traced.module, code=traced.code)
        return runner(*args)

    def request(self):
        return self.backend.request()


# -- the recording run -----------------------------------------------------------------------------------------
def _with_outputs(gm: fx.GraphModule, extra: list[fx.Node]) -> tuple[fx.GraphModule, int, bool]:
    """A copy of `gm` that also returns the values of `extra` after its own outputs: (graph module, its own output
    count, whether it returned a tuple or list)."""
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(gm.graph, env)
    several = isinstance(out, (tuple, list))
    own = list(out) if several else [out]
    graph.output(tuple(own) + tuple(env[n] for n in extra))
    return fx.GraphModule(gm, graph), len(own), several


def _relative_rows(value: torch.Tensor, previous: torch.Tensor) -> list[float]:
    """Per batch row, mean|value - previous| / mean|previous| in the model's dtype (as fxcache's decided methods
    compute their signals), as floats."""
    change = (value - previous).abs().flatten(1).mean(1)
    size = previous.abs().flatten(1).mean(1)
    return [float(v) for v in (change / size).float()]


class _RecordingGraph:
    """One traced graph run uncached, returning besides its outputs the main stream before block 0 and after the
    last block (MagCache's residual) and TeaCache's indicator, found as the methods find them."""

    def __init__(self, traced: _Traced):
        from ..analysis.cuts import attention_input, signal_stream
        from ..passes.propagate_shapes import example_spec, propagate_shapes

        plan = traced.plan
        extra, self.why_no = [], {}
        try:
            last, first = signal_stream(plan, len(plan.blocks))
            extra += [first, last]
            self.streams = True
        except UnsupportedGraphError as exc:
            self.streams, self.why_no["streams"] = False, exc.reason
        try:
            extra.append(attention_input(plan))
            self.indicator = True
        except UnsupportedGraphError as exc:
            self.indicator, self.why_no["indicator"] = False, exc.reason
        self.gm, self.own, self.several = _with_outputs(traced.gm, extra)
        self.timestep_index = plan.timestep_index
        specs = [example_spec(n.meta["example_value"]) for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.flops = propagate_shapes(self.gm, specs)  # as fxcache counts each variant's: the same counter and ops
        values = [n.meta.get("example_value") for n in _output_nodes(traced.gm)]
        sizes = [v.numel() if isinstance(v, torch.Tensor) else -1 for v in values]
        self.sample = sizes.index(max(sizes))  # the model's output: its largest tensor output

    def __call__(self, args):
        out = self.gm(*args)
        own, extra = list(out[:self.own]), list(out[self.own:])
        first = last = indicator = None
        if self.streams:
            first, last = extra[0], extra[1]
            extra = extra[2:]
        if self.indicator:
            indicator = extra[0]
        t = float(args[self.timestep_index].detach().flatten()[0])
        result = tuple(own) if self.several else own[0]
        return result, dict(t=t, first=first, last=last, indicator=indicator, output=own[self.sample])


def _output_nodes(gm: fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    return list(value) if isinstance(value, (tuple, list)) else [value]


@dataclasses.dataclass
class _Branch:
    """What a branch of the current request last saw."""

    t: float
    calls: int = 0
    norms: torch.Tensor | None = None
    indicator: torch.Tensor | None = None
    output: torch.Tensor | None = None


class _Recorder:
    """The uncached run: every call's outputs as the model gives them, and per CFG branch of each request the
    magnitude ratios and the (indicator change, output change) pairs of consecutive calls.

    A request is one generation (`request()`); inside it, calls at the timestep of the call before are further CFG
    branches in call order (cond, then uncond, as diffusers pipelines call them), and a call at a new timestep is
    the first branch's next step. A batched CFG call is one branch of two rows, its ratios pooled over the rows (as
    diffusers' calibration pools over the batch)."""

    def __init__(self):
        self.graphs: dict[int, _RecordingGraph] = {}
        self.calls: dict[int, int] = {}  # graph index -> calls
        self.ratios: dict[int, list[list[float]]] = {}  # branch -> per request, gamma per step
        self.pairs: list[tuple[int, float, float]] = []  # (branch, x, y) per row of each call after a branch's first
        self.why_no: dict[str, str] = {}
        self.steps = 0  # the most calls the first branch of a request made: the sampler's step count
        self._branches: list[_Branch] = []
        self._last_t = None
        self._current = -1

    @contextlib.contextmanager
    def request(self):
        self._branches, self._last_t, self._current = [], None, -1
        yield
        self._branches, self._last_t, self._current = [], None, -1

    def run(self, index: int, traced: _Traced, args):
        graph = self.graphs.get(index)
        if graph is None:
            graph = self.graphs[index] = _RecordingGraph(traced)
            self.why_no.update(graph.why_no)
        self.calls[index] = self.calls.get(index, 0) + 1
        result, seen = graph(args)
        with torch.no_grad():
            self._note(seen)
        return result

    def _note(self, seen: dict) -> None:
        t = seen["t"]
        self._current = self._current + 1 if t == self._last_t else 0
        self._last_t = t
        b = self._current
        if b == len(self._branches):
            self._branches.append(_Branch(t))
        branch = self._branches[b]
        branch.calls += 1
        self.steps = max(self.steps, branch.calls)
        if b not in self.ratios:
            self.ratios[b] = []
        if seen["first"] is not None:
            norms = torch.linalg.norm((seen["last"] - seen["first"]).float(), dim=-1)
            if branch.norms is None:
                self.ratios[b].append([1.0])
            else:
                self.ratios[b][-1].append(float((norms / (branch.norms + 1e-8)).mean()))
            branch.norms = norms
        output = seen["output"]
        if seen["indicator"] is not None:
            if branch.indicator is not None:
                xs = _relative_rows(seen["indicator"], branch.indicator)
                ys = _relative_rows(output, branch.output)
                self.pairs += [(b, x, y) for x, y in zip(xs, ys)]
            branch.indicator = seen["indicator"]
        branch.output = output
        branch.t = t

    def flops(self) -> int:
        """FLOPs of every call recorded, uncached."""
        return sum(self.graphs[i].flops * n for i, n in self.calls.items())

    def recording(self) -> "Recording":
        x = [p[1] for p in self.pairs]
        y = [p[2] for p in self.pairs]
        return Recording(ratios={b: [list(r) for r in runs] for b, runs in self.ratios.items()},
                         x=x, y=y, pair_branches=[p[0] for p in self.pairs], why_no=dict(self.why_no))


@dataclasses.dataclass
class Recording:
    """What the uncached calibration run measured, per CFG branch (0: the first call at each timestep, "cond" in
    diffusers pipelines; 1: the second, "uncond").

    Attributes:
        ratios: branch -> one list per generation of MagCache's gamma_s, s = 0..steps-1 (gamma_0 = 1).
        x, y: TeaCache's fitting pairs, one per batch row of each call after a branch's first: the relative L1 change
            of the indicator (x) and of the model output (y) since the branch's previous call.
        pair_branches: the branch of each pair.
        why_no: what could not be measured on this model and why ("streams": the ratios, "indicator": the pairs).
    """

    ratios: dict[int, list[list[float]]]
    x: list[float]
    y: list[float]
    pair_branches: list[int] = dataclasses.field(default_factory=list)
    why_no: dict[str, str] = dataclasses.field(default_factory=dict)

    def mag_ratios(self, branch: int | None = None) -> list[float]:
        """gamma_s per step: the mean over the generations of `branch`, or (None) over every branch and generation
        (one list for a config, which applies it to every branch as diffusers does)."""
        if "streams" in self.why_no:
            raise ConfigError(f"MagCache ratios cannot be measured on this model: {self.why_no['streams']}")
        branches = sorted(self.ratios) if branch is None else [branch]
        missing = [b for b in branches if b not in self.ratios]
        if missing:
            raise ConfigError(f"no CFG branch {missing[0]} was recorded (branches: {sorted(self.ratios)})")
        runs = [r for b in branches for r in self.ratios[b]]
        if not runs:
            raise ConfigError("no generation was recorded: MagCache ratios need one uncached generation")
        lengths = sorted({len(r) for r in runs})
        if len(lengths) > 1:
            raise ConfigError(f"the recorded generations have different step counts ({lengths}): the ratios of one "
                              "step count are averaged; calibrate on generations of one step count")
        return [float(v) for v in np.mean(np.asarray(runs, dtype=np.float64), axis=0)]

    def teacache_coefficients(self, degree: int = 4) -> tuple[float, ...]:
        """The rescale polynomial, highest degree first: `np.polyfit(x, y, degree)` (the authors fit degree 4)."""
        if "indicator" in self.why_no:
            raise ConfigError(f"TeaCache's indicator cannot be read on this model: {self.why_no['indicator']}")
        if len(self.x) < degree + 1:
            raise ConfigError(f"a degree-{degree} polynomial needs {degree + 1} pairs of consecutive calls or more; "
                              f"the run gave {len(self.x)}: calibrate on more steps or prompts")
        return tuple(float(c) for c in np.polyfit(np.asarray(self.x), np.asarray(self.y), degree))


# -- running a target ------------------------------------------------------------------------------------------
class _PipelineTarget:
    """A diffusers pipeline sampled on the calibration prompts and seeds; the transformer traced once."""

    def __init__(self, pipe, prompts: list[str], seeds: list[int], call_args: dict, switch: _Switch):
        from ..pipelines import context_names

        self.pipe, self.prompts, self.seeds, self.call_args = pipe, prompts, seeds, call_args
        self.module = pipe.transformer
        self.view = copy.copy(pipe)  # the same components; its own transformer attribute
        self.view.set_progress_bar_config(disable=True)
        self.view.transformer = torch.compile(self.module, backend=switch, dynamic=False)
        self.branches = len(context_names(pipe)) or 3  # as fxcache.enable counts them

    @property
    def name(self) -> str:
        return type(self.pipe).__name__

    def generate(self, setting, steps: int) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1], seed-major then prompt, each pipeline call one request."""
        from .pipeline_eval import _as_images

        images = []
        for seed in self.seeds:
            for prompt in self.prompts:
                with setting.request():
                    result = self.view(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                                       output_type="pt", **self.call_args)
                images.append(_as_images(result))
        return torch.cat(images)


class _ModelTarget:
    """A bare model sampled by the user's own loop, `sample(model)`, once per seed (the global RNG seeded with it,
    so that noise drawn with torch's default generator is the same for every setting)."""

    def __init__(self, model: torch.nn.Module, sample: Callable, seeds: list[int], switch: _Switch):
        self.module, self.sample, self.seeds = model, sample, seeds
        self.compiled = torch.compile(model, backend=switch, dynamic=False)
        self.branches = 3

    @property
    def name(self) -> str:
        return type(self.module).__name__

    def generate(self, setting, steps: int | None) -> torch.Tensor:
        outs = []
        for seed in self.seeds:
            with torch.random.fork_rng(), torch.no_grad(), setting.request():
                torch.manual_seed(seed)
                out = self.sample(self.compiled)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"sample(model) must return a tensor (the generated images), got "
                                f"{type(out).__name__}")
            out = out.detach().float().cpu()
            outs.append(out.reshape(1, -1) if out.dim() < 2 else out)
        return torch.cat(outs)


# -- the result ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Point:
    """One measured setting.

    Attributes:
        value: the threshold or interval.
        config: the setting's config.
        share: its FLOPs over the uncached run's (1.0: no saving).
        calls, cached_calls: model calls, and those that did not run every block.
        psnr, psnr_images: PSNR against the uncached images, pooled over the images and per image (dB).
        fewer_steps, fewer_psnr, fewer_psnr_images: the uncached sampler with round(steps x share) steps and its
            PSNR (None for a bare model, or when that is every step: then it is the uncached run itself).
        versus: against those fewer steps: "beats", "ties", "loses" (`evaluate.verdicts`), or "saves less than a
            step", or None for a bare model.
    """

    value: float
    config: CacheConfig
    share: float
    calls: int
    cached_calls: int
    psnr: float
    psnr_images: tuple[float, ...]
    fewer_steps: int | None = None
    fewer_psnr: float | None = None
    fewer_psnr_images: tuple[float, ...] | None = None
    versus: str | None = None
    tie_db: float | None = None  # |PSNR gap| within which `versus` is a tie (the noise of these images)

    def as_json(self) -> dict:
        from .pipeline_eval import _finite_or_text

        return {k: _finite_or_text(v) for k, v in dict(
            value=self.value, share=self.share, calls=self.calls, cached_calls=self.cached_calls, psnr=self.psnr,
            psnr_images=list(self.psnr_images), fewer_steps=self.fewer_steps, fewer_psnr=self.fewer_psnr,
            versus=self.versus, tie_db=self.tie_db).items()}


@dataclasses.dataclass
class Calibration:
    """What `fxcache.calibrate` measured and chose.

    Attributes:
        config: the chosen config (the least compute that reaches the target; when none does, the most accurate
            setting that caches anything): pass it, or the file `save` writes, to `cache_backend` / `enable`.
        reached: whether `config` reaches `target_psnr`.
        curve: every measured `Point`, by value.
        chosen: the point of `config`.
        fewer_steps: step count -> pooled PSNR of the uncached sampler with that many steps (pipelines).
        recording: the uncached run's measurements (`Recording`: MagCache ratios, TeaCache pairs).
        fitted: what was fitted for the method ("coefficients" for TeaCache, "mag_ratios" and per-branch ratios for
            MagCache), empty otherwise.
    """

    method: str
    knob: str  # "threshold" or "interval"
    target_psnr: float
    config: CacheConfig
    reached: bool
    chosen: Point
    curve: list[Point]
    fewer_steps: dict[int, float]
    recording: Recording
    fitted: dict
    steps: int | None
    target: str  # the pipeline's or model's class
    prompts: list[str] | None
    seeds: list[int]
    call_args: dict
    lowering: str
    seconds: float = 0.0

    @property
    def message(self) -> str:
        """One line: the choice and how it compares with fewer steps, or that no setting reached the target."""
        p = self.chosen
        said = f"{self.knob} {_value(p.value)}: {p.share:.1%} of the uncached compute ({_speedup(p.share)}), " \
               f"{_db(p.psnr)} dB"
        fewer = ""
        if p.fewer_steps is not None:
            versus = _VERSUS.get(p.versus, p.versus)
            if p.versus == "ties" and p.tie_db is not None:
                versus = f"a tie: within {p.tie_db:.2f} dB, the noise of {len(p.psnr_images)} images"
            fewer = (f"; the uncached sampler with {p.fewer_steps} steps at the same compute: {_db(p.fewer_psnr)} dB "
                     f"({versus})")
        elif p.versus == "saves less than a step":
            fewer = "; it saves less than one sampler step"
        if self.reached:
            more = ""
            if p is self.curve[-1]:
                more = (f"; it is the largest {self.knob} measured: larger ones may save more (grid=[...] "
                        f"measures them)")
            return f"{self.method} reaches {self.target_psnr:g} dB with {said}{fewer}{more}"
        if p.cached_calls == 0:
            return (f"no {self.knob} in the grid made {self.method} cache any call: extend the grid (grid=[...]) to "
                    f"larger values; returned {said}")
        return (f"no {self.knob} measured reaches {self.target_psnr:g} dB while caching: the most accurate one "
                f"that caches is {said}{fewer}; lower the target, or try another method or more steps")

    def table(self) -> str:
        """The curve as a markdown table, the chosen row marked."""
        head = [self.knob, "compute (FLOPs share)", "FLOPs speedup", "cached calls", "PSNR dB (pooled)",
                "per-image PSNR min–max", "fewer steps at equal compute", "their PSNR dB", "vs fewer steps"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines.append("| uncached | 100.0% | 1.00x | 0 | inf | - | - | - | - |")
        for p in self.curve:
            mark = " (chosen)" if p is self.chosen else ""
            spread = _db(min(p.psnr_images)) if min(p.psnr_images) == max(p.psnr_images) else \
                f"{_db(min(p.psnr_images))}–{_db(max(p.psnr_images))}"
            lines.append(f"| {_value(p.value)}{mark} | {p.share:.1%} | {1 / p.share:.2f}x | "
                         f"{p.cached_calls}/{p.calls} | {_db(p.psnr)} | {spread} | "
                         f"{'-' if p.fewer_steps is None else p.fewer_steps} | "
                         f"{'-' if p.fewer_psnr is None else _db(p.fewer_psnr)} | {p.versus or '-'} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        where = f"{len(self.prompts)} prompts x {len(self.seeds)} seeds" if self.prompts is not None else \
            f"{len(self.seeds)} seeds"
        return (f"fxcache calibrate: {self.method} on {self.target}, {where}, "
                f"{self.steps if self.steps is not None else '?'} steps, target {self.target_psnr:g} dB (pooled "
                f"PSNR against the uncached images), lowering={self.lowering}\n\n{self.table()}\n\n{self.message}")

    def as_json(self) -> dict:
        from .pipeline_eval import _finite_or_text

        return dict(
            fxcache="calibration", format=1, config=self.config.to_dict(), method=self.method, knob=self.knob,
            target_psnr=self.target_psnr, reached=self.reached, message=self.message,
            chosen=self.chosen.as_json(), curve=[p.as_json() for p in self.curve],
            fewer_steps={str(k): _finite_or_text(v) for k, v in sorted(self.fewer_steps.items())},
            fitted=self.fitted,
            settings=dict(target=self.target, prompts=self.prompts, seeds=self.seeds, steps=self.steps,
                          call_args=self.call_args, lowering=self.lowering),
            psnr="pooled over the images: 10 log10(range^2 / mean per-image MSE), range 2 ([-1, 1]); 'inf': "
                 "identical images", seconds=round(self.seconds, 1))

    def save(self, path: str) -> None:
        """Write the chosen config (its `to_dict()` under "config"), the curve and the settings as JSON, atomically;
        `fxcache.cache_backend(path)`, `fxcache.enable(pipe, path)` and `fxcache.load_config(path)` read it."""
        from .files import write_json

        write_json(os.fspath(path), self.as_json(), indent=2, default=str)


_VERSUS = {"beats": "caching beats it", "ties": "a tie", "loses": "fewer steps beat caching"}


def _db(v: float | None) -> str:
    from .evaluate import db

    return db(v)


def _value(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def _speedup(share: float) -> str:
    return f"{1 / share:.2f}x fewer FLOPs" if share > 0 else "no FLOPs"


# -- the search ------------------------------------------------------------------------------------------------
#: what calibrate fits on the uncached run for a method, unless the options (or a preset) give it
_FITTED = {"teacache": "coefficients", "magcache": "mag_ratios"}


def _knob(cls) -> str:
    names = {f.name for f in dataclasses.fields(cls)}
    if "threshold" in names:
        return "threshold"
    if "interval" in names:
        return "interval"
    from ..config import method_names

    usable = [m for m in method_names() if {"threshold", "interval"} & {f.name for f in
                                                                         dataclasses.fields(get_method(m))}]
    raise ConfigError(f"{cls.method} has neither a threshold nor an interval to calibrate; calibrate takes "
                      f"{', '.join(usable)}")


def _steps_from_sampler(cls) -> bool:
    """Whether the method's rule counts the sampler's steps (`num_steps` must be the step count sampled)."""
    if getattr(cls, "STEPS_FROM_SAMPLER", False):
        return True
    field = next((f for f in dataclasses.fields(cls) if f.name == "num_steps"), None)
    return field is not None and isinstance(field.default, int)


def _check_grid(grid, knob: str) -> list:
    values = list(grid)
    if not values:
        raise ConfigError("grid must hold one value or more")
    for v in values:
        if knob == "interval" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"grid: intervals are ints >= 1, got {v!r}")
        if knob == "threshold" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                    or v < 0):
            raise ConfigError(f"grid: thresholds are finite numbers >= 0, got {v!r}")
    return sorted(set(values))


def calibrate(target, method: str, *, target_psnr: float, prompts: list[str] | None = None,
              steps: int | None = None, seeds=(0,), call_args: dict | None = None, sample: Callable | None = None,
              grid=None, refine: int = 2, out=None, lowering: str = "eager", verbose: bool = True,
              **options) -> Calibration:
    """Find the setting of `method` with the least compute whose output stays within `target_psnr` of the uncached
    output, print the curve measured, and return it (`Calibration`; `.save(path)` writes the config as JSON).

    Args:
        target: a diffusers pipeline (with a `transformer`), sampled as `pipe(prompt, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed), output_type="pt", **call_args)` for every seed x prompt;
            or a bare model, with `sample`.
        method: a method with a `threshold` (fbcache, dbcache, teacache, magcache: searched over `grid`, by default
            0.01 doubling to 1.28, then bisected `refine` times at the target) or an `interval` (fora, toca, duca,
            taylorseer, clusca: 2, 3, ... up to 10 or the step count, whichever is fewer).
        target_psnr: dB, pooled over the images (the mean MSE), against the uncached images of the same prompts and
            seeds.
        prompts: the calibration prompts (pipelines): a few, like the ones the pipeline will serve.
        steps: the sampler's step count (default: the pipeline's own default; a bare model's is counted in its
            loop). Thresholds depend on it: calibrate at the step count you serve.
        seeds: one generation per seed (and prompt).
        call_args: further pipeline call arguments (sizes, guidance).
        sample: for a bare model, `sample(model) -> tensor`: the user's sampling loop calling the model it is given,
            returning the generated images in [-1, 1] (PSNR takes that range); called once per seed with torch's
            global RNG seeded with it, under `torch.no_grad()`, each call one request.
        grid: the thresholds or intervals to measure instead of the default.
        refine: bisections between the last threshold that reaches the target and the next one measured.
        out: a path to save the result to (`Calibration.save`).
        lowering: the lowering of the measured runs ("eager": no compile per point; the choice holds for any).
        verbose: print each point as it is measured, and the table.
        **options: the method's other options, fixed during the search (`preset=` too). TeaCache without
            `coefficients` (or a preset) gets a polynomial fitted on the uncached run first, MagCache without
            `mag_ratios` gets ratios measured on it; `num_steps` of a method whose rule counts the sampler's steps
            is `steps`.

    A point counts only when it caches some call; if none reaches the target, `reached` is False, the message says
    so, and `config` is the most accurate point that caches. Each point's compute is beside the uncached sampler
    with that many fewer steps (pipelines), to show whether caching beats simply sampling fewer steps.
    """
    t_start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    cls = get_method(method)
    knob = _knob(cls)
    if isinstance(target_psnr, bool) or not isinstance(target_psnr, (int, float)) or not math.isfinite(target_psnr):
        raise ConfigError(f"target_psnr must be a finite number of dB, got {target_psnr!r}")
    if knob in options:
        raise ConfigError(f"calibrate searches {cls.method}'s {knob}: leave it out of the options (grid=[...] "
                          f"names the values to measure)")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ConfigError(f"refine must be an int >= 0, got {refine!r}")
    seeds = _check_seeds(seeds)
    switch = _Switch()
    runner, prompts, steps, call_args = _target(target, switch, prompts=prompts, steps=steps, seeds=seeds,
                                                call_args=call_args, sample=sample)
    is_pipeline = isinstance(runner, _PipelineTarget)
    if grid is None and knob == "interval" and steps is not None and steps < 2:
        raise ConfigError(f"a {steps}-step sampler leaves nothing for an interval to cache")
    values = _check_grid(grid if grid is not None else THRESHOLDS if knob == "threshold" else
                         range(2, min(MAX_INTERVAL, steps or MAX_INTERVAL) + 1), knob)
    check_lowering(lowering)
    base = dict(options)
    if steps is not None and _steps_from_sampler(cls):
        base.setdefault("num_steps", steps)
    fits = _FITTED.get(cls.method) if not {_FITTED.get(cls.method), "preset"} & set(base) else None
    # an option or a preset the method refuses fails before any sampling (what is fitted stands in as a 1)
    make_config(method, **{**base, knob: values[0], **({fits: (1.0,)} if fits else {})})
    from ..runtime.attach import detach

    try:
        # 1. the uncached run: the reference images, the uncached FLOPs, the measurements
        say(f"fxcache calibrate: {cls.method} on {runner.name}: the uncached run", flush=True)
        recorder = _Recorder()
        with switch.use(recorder):
            reference = runner.generate(recorder, steps)
        recording = recorder.recording()
        uncached_flops = recorder.flops()
        if steps is None:  # a bare model: the calls a branch made in a generation
            steps = recorder.steps
            if _steps_from_sampler(cls):
                base.setdefault("num_steps", steps)
        fitted = {}
        if fits == "coefficients":
            fitted["coefficients"] = list(recording.teacache_coefficients())
            fitted["pairs"] = len(recording.x)
            base["coefficients"] = tuple(fitted["coefficients"])
            say(f"  TeaCache polynomial fitted on {len(recording.x)} pairs of consecutive calls: "
                f"{', '.join(f'{c:.6g}' for c in fitted['coefficients'])}", flush=True)
        if fits == "mag_ratios":
            fitted["mag_ratios"] = recording.mag_ratios()
            fitted["per_branch"] = {str(b): recording.mag_ratios(b) for b in sorted(recording.ratios)}
            base["mag_ratios"] = tuple(fitted["mag_ratios"])
            say(f"  MagCache ratios measured over {len(recording.ratios)} CFG branches (pooled)", flush=True)

        fewer: dict[int, tuple] = {}  # steps -> PsnrSummary of the uncached sampler with that many steps

        def fewer_steps(n: int):
            if n not in fewer:
                with switch.use(_Plain()):
                    fewer[n] = psnr_summary(runner.generate(_Plain(), n), reference)
            return fewer[n]

        points: dict = {}

        def measure(value) -> Point:
            from .. import api
            from .evaluate import Row, verdicts

            config = make_config(method, **{**base, knob: value})
            backend = api.CacheBackend(config, lowering=lowering, strict=True, max_branches=runner.branches)
            setting = _Cached(backend)
            try:
                with switch.use(setting):
                    images = runner.generate(setting, steps)
                records = backend.stats()
            finally:
                backend.reset()
                detach(runner.module, backend)
            if any(r["flops"] is None for r in records):
                raise UnsupportedGraphError(f"{cls.method} ran some calls uncached on this model: see its warnings")
            share = sum(r["flops"] for r in records) / uncached_flops
            summary = psnr_summary(images, reference)
            point = Point(value, config, share, len(records), sum(r["kind"] != "full" for r in records),
                          summary.pooled, summary.per_image)
            if is_pipeline:
                n = max(1, round(steps * share))
                if n < steps:
                    other = fewer_steps(n)
                    point.fewer_steps, point.fewer_psnr, point.fewer_psnr_images = n, other.pooled, other.per_image
                    row = Row("cached", "method", steps, psnr=point.psnr, psnr_images=point.psnr_images,
                              equal_steps=n)
                    rows = [row, Row("fewer", "fewer steps", n, psnr=other.pooled, psnr_images=other.per_image)]
                    verdict = verdicts(rows)[0]
                    point.versus, point.tie_db = verdict.outcome, verdict.tolerance
                else:
                    point.versus = "saves less than a step"
            points[value] = point
            fewer_said = f"; {point.fewer_steps} steps: {_db(point.fewer_psnr)} dB" if point.fewer_steps else ""
            say(f"  {knob} {_value(value)}: {share:.1%} compute, {point.cached_calls}/{point.calls} calls cached, "
                f"{_db(point.psnr)} dB{fewer_said}", flush=True)
            return point

        def reaches(p: Point) -> bool:
            return p.cached_calls > 0 and p.psnr >= target_psnr

        # 2. the scan, ascending: it stops once a point that caches is well below the target
        for value in values:
            p = measure(value)
            if p.cached_calls > 0 and p.psnr < target_psnr - MARGIN_DB:
                break
        # 3. bisection between the cheapest point that reaches the target and the next larger value measured
        for _ in range(refine if knob == "threshold" else 0):
            ok = [p for p in points.values() if reaches(p)]
            if not ok:
                break
            best = min(ok, key=lambda p: (p.share, -p.psnr))
            above = sorted(v for v, p in points.items() if v > best.value and not reaches(p))
            if not above:
                break
            lo, hi = best.value, above[0]
            mid = float(f"{math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2:.3g}")  # geometric, 3 digits
            if mid in points or not lo < mid < hi:
                break
            measure(mid)
        curve = [points[v] for v in sorted(points)]
        ok = [p for p in curve if reaches(p)]
        caching = [p for p in curve if p.cached_calls > 0]
        if ok:
            chosen, reached = min(ok, key=lambda p: (p.share, -p.psnr)), True
        elif caching:
            chosen, reached = max(caching, key=lambda p: (p.psnr, -p.share)), False
        else:
            chosen, reached = curve[-1], False
    finally:
        from ..api import _drop_entries

        _drop_entries(switch)  # the trace's Dynamo cache entries go (they hold the graphs)
    result = Calibration(
        method=cls.method, knob=knob, target_psnr=float(target_psnr), config=chosen.config, reached=reached,
        chosen=chosen, curve=curve, fewer_steps={n: s.pooled for n, s in fewer.items()}, recording=recording,
        fitted=fitted, steps=steps, target=runner.name, prompts=prompts, seeds=seeds, call_args=call_args or {},
        lowering=lowering, seconds=time.perf_counter() - t_start)
    say("\n" + result.table() + "\n\n" + result.message, flush=True)
    if out is not None:
        result.save(out)
        say(f"wrote {os.fspath(out)}", flush=True)
    return result


def magcache_ratios(target, *, branch: int | None = None, **run) -> list[float]:
    """MagCache's magnitude ratios of a model (a list, one per step): one uncached run of `target` (a pipeline with
    `prompts=`, `steps=`, or a bare model with `sample=`, as `calibrate` takes them) or an existing `Recording`,
    pooled over the CFG branches (`branch=None`: one list for a config, which every branch uses, as diffusers'
    MagCache does) or of one branch (0: the first call at each timestep, "cond" in diffusers pipelines)."""
    return (target if isinstance(target, Recording) else record(target, **run)).mag_ratios(branch)


def teacache_coefficients(target, *, degree: int = 4, **run) -> tuple[float, ...]:
    """TeaCache's rescale polynomial for a model (highest degree first): `np.polyfit` of the output's relative L1
    change on the indicator's between consecutive calls of each branch, over one uncached run of `target` (as
    `magcache_ratios` takes it) or an existing `Recording`."""
    return (target if isinstance(target, Recording) else record(target, **run)).teacache_coefficients(degree)


def record(target, *, prompts: list[str] | None = None, steps: int | None = None, seeds=(0,),
           call_args: dict | None = None, sample: Callable | None = None) -> Recording:
    """One uncached run of `target` on the calibration inputs (see `calibrate`), measured (`Recording`)."""
    switch = _Switch()
    runner, _, steps, _ = _target(target, switch, prompts=prompts, steps=steps, seeds=_check_seeds(seeds),
                                  call_args=call_args, sample=sample)
    recorder = _Recorder()
    try:
        with switch.use(recorder):
            runner.generate(recorder, steps)
    finally:
        from ..api import _drop_entries

        _drop_entries(switch)
    return recorder.recording()


def _target(target, switch: _Switch, *, prompts, steps, seeds: list[int], call_args, sample):
    """(what samples `target`, the prompts, the step count (None: a bare model's, counted in its loop), the call
    arguments), every argument checked before anything runs."""
    if isinstance(getattr(target, "components", None), dict) and not isinstance(target, torch.nn.Module):
        if sample is not None:
            raise ConfigError("sample= is for a bare model; a pipeline is sampled on prompts= by its own call")
        prompts = _check_prompts(prompts)
        call_args = _check_call_args(target, dict(call_args or {}))
        if steps is None:
            from .pipeline_eval import default_steps

            steps = default_steps(target) or 28
        _check_steps(steps)
        return _PipelineTarget(target, prompts, seeds, call_args, switch), prompts, steps, call_args
    if isinstance(target, torch.nn.Module):
        if sample is None or not callable(sample):
            raise ConfigError("a bare model is calibrated with sample=callable(model) -> images, the sampling loop "
                              "that calls it (or pass a diffusers pipeline)")
        if prompts is not None or call_args:
            raise ConfigError("prompts= and call_args= are for a pipeline; a bare model's loop (sample=) makes its "
                              "own inputs")
        if steps is not None:
            _check_steps(steps)
        if _compiled(target):
            raise ConfigError("calibrate compiles the plain model for every setting it measures: pass the module "
                              "itself, not a compiled one (model._orig_mod)")
        return _ModelTarget(target, sample, seeds, switch), None, steps, {}
    raise ConfigError(f"calibrate takes a diffusers pipeline or a torch module (with sample=), got "
                      f"{type(target).__name__}")


def _compiled(module) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or \
        getattr(module, "__dict__", {}).get("_compiled_call_impl") is not None


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds) if isinstance(seeds, (list, tuple, range)) else None
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError("seeds must be a non-empty list of ints >= 0 (one generation per seed)")
    return seeds


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a non-empty list of str: the calibration prompts, a few like the ones "
                          "the pipeline will serve")
    return list(prompts)


def _check_steps(steps) -> None:
    from ..config import MAX_STEPS

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps must be an int in [1, {MAX_STEPS}], got {steps!r}")


#: pipeline call arguments calibrate sets itself
_SET_HERE = {"prompt": "prompts=", "num_inference_steps": "steps=", "generator": "seeds=",
             "output_type": "images are compared as tensors", "num_images_per_prompt": "seeds=",
             "return_dict": "images are read from the pipeline's output"}


def _check_call_args(pipe, call_args: dict) -> dict:
    from .pipeline_eval import check_call_args

    taken = [k for k in call_args if k in _SET_HERE]
    if taken:
        raise ConfigError("call_args: " + "; ".join(f"{k} is set by calibrate ({_SET_HERE[k]})" for k in taken))
    try:
        check_call_args(pipe, call_args)
    except ValueError as exc:
        raise ConfigError(f"call_args: {exc}") from None
    if "_fxcache" in pipe.__dict__ or _compiled(getattr(pipe, "transformer", None)):
        raise ConfigError(f"the {type(pipe).__name__}'s transformer is compiled (fxcache.enable, or torch.compile): "
                          f"calibrate compiles the plain one for every setting it measures; call "
                          f"fxcache.disable(pipe) (or give the pipeline the plain module) first")
    if "transformer_2" in getattr(pipe, "components", {}):
        raise ConfigError(f"{type(pipe).__name__} has two transformers; calibrate measures one (`transformer`)")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ConfigError(f"{type(pipe).__name__} has no transformer component: fxcache caches diffusion "
                          "transformers")
    if not isinstance(transformer, torch.nn.Module):
        raise ConfigError(f"{type(pipe).__name__}.transformer is a {type(transformer).__name__}, not a torch module: "
                          f"calibrate compiles the pipeline's transformer module for every setting it measures")
    return call_args


__all__ = ["Calibration", "Point", "Recording", "calibrate", "magcache_ratios", "record", "teacache_coefficients"]
