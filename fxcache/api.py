"""Public entry points: cache_backend(), CacheBackend, stats(), reset(), step(), explain()."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import warnings

import torch

from .analysis import DEFAULT_BLOCK_LISTS, GraphPlan, analyse
from .config import CacheConfig, make_config
from .errors import ConfigError, UnsupportedGraphError
from .runtime import Runner, UncachedRunner, get_lowering
from .variants import build_variants

log = logging.getLogger("fxcache")


class FxCacheWarning(UserWarning):
    """fxcache runs a graph uncached (or otherwise falls back); the message says why."""


class CacheBackend:
    """A `torch.compile` backend that rewrites each graph into cache-aware variants and runs one per step.

    Dynamo calls it once per traced graph (per input shape, batch size and grad mode); each call returns a
    `Runner` with its own caches. Obtain one with `fxcache.cache_backend(...)`.
    """

    def __init__(self, config: CacheConfig, *, lowering: str = "inductor", strict: bool = False,
                 block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS, timestep_input: int | str | None = None,
                 max_records: int = 100_000, inplace: bool | None = None):
        check = getattr(get_lowering(lowering), "check", None)  # validate early: the name, and what it needs
        if check is not None:
            check()
        if not isinstance(block_lists, tuple) or not block_lists or not all(isinstance(b, str) for b in block_lists):
            raise ConfigError(f"block_lists must be a non-empty tuple of module-list names, got {block_lists!r}")
        self.config = config
        self.lowering = lowering
        self.strict = bool(strict)
        self.block_lists = block_lists
        self.timestep_input = timestep_input
        if inplace is not None and not isinstance(inplace, bool):
            raise ConfigError(f"inplace must be True, False or None (automatic), got {inplace!r}")
        self.inplace = inplace
        self.runners: list[Runner | UncachedRunner] = []
        self.records: collections.deque = collections.deque(maxlen=max_records)
        self.override: tuple[int, int] | None = None
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"CacheBackend({self.config!r}, lowering={self.lowering!r})"

    # -- Dynamo entry --------------------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        mode, options = kwargs.get("mode"), kwargs.get("options")
        graph_id = len(self.runners)
        try:
            if torch.is_grad_enabled():
                raise UnsupportedGraphError(
                    "the model was called with autograd enabled; caching is for inference: call it under "
                    "torch.no_grad() or torch.inference_mode() (diffusers pipelines do)"
                )
            plan = analyse(gm, block_lists=self.block_lists, timestep_input=self.timestep_input)
            variants = build_variants(gm, plan, self.config)
        except UnsupportedGraphError as exc:
            if self.strict:
                raise
            self._warn_once(f"fxcache: running graph {graph_id} uncached: {exc.reason}")
            runner = UncachedRunner(backend=self, graph_id=graph_id, gm=gm, lowering=self.lowering, mode=mode,
                                    options=options, reason=exc.reason)
        else:
            log.info("fxcache graph %d (%s):\n%s", graph_id, self.config.method, plan.summary())
            runner = Runner(backend=self, graph_id=graph_id, plan=plan, config=self.config, variants=variants,
                            lowering=self.lowering, mode=mode, options=options, gm=gm, inplace=self.inplace)
        self.runners.append(runner)
        return runner

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, FxCacheWarning, stacklevel=3)

    def _record(self, **record) -> None:
        self.records.append(record)

    # -- user controls --------------------------------------------------------------------------------------
    @property
    def plans(self) -> list[GraphPlan]:
        return [r.plan for r in self.runners if isinstance(r, Runner)]

    def reset(self) -> None:
        """Start a new generation on the next call of every graph and free the caches."""
        for r in self.runners:
            r.reset()

    @contextlib.contextmanager
    def step(self, index: int, branch: int = 0):
        """Calls inside the block run as step `index`, CFG branch `branch` (step 0 branch 0 starts a generation).

        For schedulers whose timesteps repeat or do not fall (Heun-type, img2img restarts).
        """
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(f"step index must be an int >= 0, got {index!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise ConfigError(f"branch must be an int >= 0, got {branch!r}")
        previous, self.override = self.override, (index, branch)
        try:
            yield self
        finally:
            self.override = previous

    def stats(self) -> list[dict]:
        return [dict(r) for r in self.records]

    def cache_bytes(self) -> int:
        return sum(r.cache_bytes() for r in self.runners)


def cache_backend(method_or_config: str | CacheConfig = "duca", *, lowering: str = "inductor", strict: bool = False,
                  block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS, timestep_input: int | str | None = None,
                  inplace: bool | None = None, **options) -> CacheBackend:
    """The backend for `torch.compile(model, backend=fxcache.cache_backend("duca"), dynamic=False)`.

    Args:
        method_or_config: a registered method name ("duca", "fora", ...) or a config instance.
        lowering: "inductor" (default; honours torch.compile's mode= and options=) or "eager".
        strict: raise UnsupportedGraphError for a graph the analysis does not understand, instead of warning
            once and running it uncached.
        block_lists: names of the module lists that hold the transformer blocks.
        timestep_input: the timestep input (index among user inputs, or name substring) when no diffusers
            `Timesteps` module reveals it.
        inplace: keep caches in persistent buffers the variants update in place (static addresses, as CUDA graphs
            need). None (default): on for `mode="reduce-overhead"`, off otherwise.
        **options: fields of the method's config (only with a method name).
    """
    if isinstance(method_or_config, CacheConfig):
        if options:
            raise TypeError(
                f"options {sorted(options)} given with a config instance; use "
                f"dataclasses.replace(config, ...) instead"
            )
        config = method_or_config
    elif isinstance(method_or_config, str):
        config = make_config(method_or_config, **options)
    else:
        raise ConfigError(
            f"cache_backend takes a method name or a CacheConfig, got {type(method_or_config).__name__}"
        )
    return CacheBackend(config, lowering=lowering, strict=strict, block_lists=block_lists,
                        timestep_input=timestep_input, inplace=inplace)


def _find_backend(model) -> CacheBackend:
    if isinstance(model, CacheBackend):
        return model
    todo, seen = [getattr(model, "dynamo_ctx", None)], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CacheBackend):
            return obj
        for attr in ("callback", "_torchdynamo_orig_backend", "compiler_fn", "__wrapped__", "_orig_backend"):
            todo.append(getattr(obj, attr, None))
    raise ConfigError(
        f"{type(model).__name__} was not compiled with an fxcache backend; pass the module returned by "
        "torch.compile(..., backend=fxcache.cache_backend(...)) or the backend itself"
    )


def stats(model) -> list[dict]:
    """One record per call of the compiled model: graph, step, branch, kind, tokens, flops, t."""
    return _find_backend(model).stats()


def reset(model) -> None:
    """Free the caches; the next call starts a new generation."""
    _find_backend(model).reset()


def step(model, index: int, branch: int = 0):
    """Context manager: calls inside run as step `index` of branch `branch` (overrides the timestep rule)."""
    return _find_backend(model).step(index, branch)


@dataclasses.dataclass
class Explanation:
    graph_count: int
    graph_break_count: int
    break_reasons: list[str]
    plans: list[GraphPlan | None]
    errors: list[str]

    def __str__(self) -> str:
        lines = [f"Graph count: {self.graph_count}", f"Graph break count: {self.graph_break_count}"]
        for r in self.break_reasons:
            lines.append(f"  break: {r}")
        for i, (plan, err) in enumerate(zip(self.plans, self.errors)):
            lines.append(f"Graph {i}:")
            lines.append("  " + (plan.summary().replace("\n", "\n  ") if plan else f"not cacheable: {err}"))
        return "\n".join(lines)


def explain(model, *args, block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS,
            timestep_input: int | str | None = None, **kwargs) -> Explanation:
    """Trace `model(*args, **kwargs)` with Dynamo, print and return what fxcache finds in each graph."""
    module = getattr(model, "_orig_mod", model)
    with torch.no_grad():
        out = torch._dynamo.explain(module)(*args, **kwargs)
    plans, errors = [], []
    for gm in out.graphs:
        try:
            plans.append(analyse(gm, block_lists=block_lists, timestep_input=timestep_input))
            errors.append("")
        except UnsupportedGraphError as exc:
            plans.append(None)
            errors.append(str(exc))
    reasons = [str(getattr(b, "reason", b)) for b in out.break_reasons]
    result = Explanation(out.graph_count, out.graph_break_count, reasons, plans, errors)
    print(result)
    return result
