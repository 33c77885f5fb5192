"""Public entry points: cache_backend(), CacheBackend, request(), stats(), reset(), step(), explain()."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import threading

import torch

from .analysis import DEFAULT_BLOCK_LISTS, GraphPlan, analyse
from .analysis.plan import FROM_MODEL_CALL
from .analysis.inputs import forward_parameters
from .backends import check_lowering
from .config import CacheConfig, config_path, load_config, make_config
from .errors import ConfigError, FxCacheWarning, UnknownOptionError, UnsupportedGraphError  # noqa: F401
from .methods import recipe_for
from .analysis.pieces import block_entry_of, module_block_lists, module_calls, prefix_module_stack
from .runtime import Runner, UncachedRunner, compiled_runner
from .runtime.pieces import RecentBlocks, piece_runner
from .runtime.attach import attach, backends_of, calling_module, code_label, traced_frame
from .runtime.calls import CallKeeper, timestep_parameter
from .runtime.outside import watch_calls
from .runtime.recompiles import watch
from .runtime.records import Record, records
from .runtime.requests import Request, RequestScope
from .runtime.signature import graph_signature, same_constants
from .step_plan import BlockKind, GraphView
from .variants import build_variants

log = logging.getLogger("fxcache")


class FailedRunner:
    """strict=True and a graph the analysis does not understand: every call raises the analysis error itself.

    Raised at call time, not inside Dynamo's compile, so the caller sees `UnsupportedGraphError` and not Dynamo's
    `BackendCompilerFailed` wrapper."""

    def __init__(self, *, backend, graph_id: int, error: UnsupportedGraphError):
        self.backend, self.graph_id, self.error, self.scope = backend, graph_id, error, backend.scope

    def reset(self) -> None:
        pass

    def cache_bytes(self) -> int:
        return 0

    def __call__(self, *args):
        self.scope.serve()
        raise self.error


def _check_bool(name: str, value, *, none: bool = False) -> None:
    if not (isinstance(value, bool) or (none and value is None)):
        accepted = "True, False or None" if none else "True or False"
        raise ConfigError(f"{name} must be {accepted}, got {value!r}")


def _check_timestep_input(value) -> None:
    if value is None or (isinstance(value, str) and value):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return
    raise ConfigError(f"timestep_input must be the name of the forward's timestep parameter (e.g. 'timestep', or a "
                      f"dotted path into a dict argument), its index among the forward's parameters (an int >= 0), "
                      f"or None to find it by data flow; got {value!r}")


class CacheBackend:
    """A `torch.compile` backend that rewrites each graph into cache-aware variants and runs one per step.

    Dynamo calls it once per traced graph (per input shape, batch size and grad mode); each call returns a
    `Runner`. The state of every call (caches, step positions) belongs to its request: see `fxcache.request`.
    Obtain one with `fxcache.cache_backend(...)`.
    """

    def __init__(self, config: CacheConfig, *, lowering: str = "inductor", strict: bool = False,
                 block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS, timestep_input: int | str | None = None,
                 max_records: int = 100_000, inplace: bool | None = None, max_branches: int = 3,
                 keep_caches: bool | None = None, time_direction: str = "auto", keep_example_inputs: bool = False):
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"CacheBackend takes a CacheConfig, got {type(config).__name__}")
        check_lowering(lowering)  # validate early: the name, and what it needs
        _check_bool("strict", strict)
        if not isinstance(block_lists, tuple) or not block_lists or not all(isinstance(b, str) and b
                                                                            for b in block_lists):
            raise ConfigError(f"block_lists must be a non-empty tuple of module-list names, got {block_lists!r}")
        _check_timestep_input(timestep_input)
        _check_bool("inplace", inplace, none=True)
        _check_bool("keep_caches", keep_caches, none=True)
        _check_bool("keep_example_inputs", keep_example_inputs)
        for name, value in (("max_branches", max_branches), ("max_records", max_records)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if time_direction not in ("auto", "falling", "rising"):
            raise ConfigError(f"time_direction must be 'auto', 'falling' or 'rising', got {time_direction!r}")
        self.config = config
        self.lowering = lowering
        self.strict = strict
        self.block_lists = block_lists
        self.timestep_input = timestep_input
        self.inplace = inplace
        # each graph's first call arguments stay on its runner (`example_args`), for fxcache.export to trace with;
        # off by default: they pin the caller's tensors
        self.keep_example_inputs = keep_example_inputs
        # in-place buffers have static addresses (CUDA graphs record them): keep them for the next request
        keep = bool(inplace) if keep_caches is None else keep_caches
        self.scope = RequestScope(max_branches=max_branches, max_records=max_records, keep_caches=keep,
                                  time_direction=time_direction)
        self.runners: list = []
        self._by_signature: dict[tuple, tuple] = {}  # graph signature -> (graph, runner): Dynamo's duplicates
        self.duplicate_graphs = 0  # graphs Dynamo traced again that equal one this backend already runs
        self.call_keeper = CallKeeper(self.scope)  # under it, a request keeps each model's call positions (pieces)
        self.recent_blocks = RecentBlocks()  # per thread and model: the token counts the latest call ran each block
        self.has_pieces = False  # a graph of a forward that graph-breaks was cached as a piece
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CacheBackend({self.config!r}, lowering={self.lowering!r})"

    # -- Dynamo entry --------------------------------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        module, code = traced_frame()
        return self.compile_traced(gm, example_inputs, module=module, code=code, mode=kwargs.get("mode"),
                                   options=kwargs.get("options"))

    def compile_traced(self, gm: torch.fx.GraphModule, example_inputs, *, module, code, mode=None, options=None):
        """The runner of a graph Dynamo traced from `module`'s `code` (what `__call__` does with the frame being
        traced). Called later, outside Dynamo, it gives a graph traced once a runner of this backend's own:
        `fxcache.calibrate` traces a model once and runs every setting it measures on that graph."""
        if module is not None:
            attach(module, self)
            watch_calls(module, self)  # a later call Dynamo runs in eager is seen (`runtime/outside.py`)
        if code is not None:
            watch(self, code_label(code))
        self.scope.limits.note()  # the limits this graph was compiled under reach every thread calling the model
        signature = graph_signature(gm, example_inputs, origin=(type(module), code), mode=mode, options=options)
        with self._lock:
            seen = self._by_signature.get(signature)
            if seen is not None and same_constants(seen[0], gm):
                self.duplicate_graphs += 1
                self.scope.limits.grow()
                log.info("fxcache: Dynamo traced graph %d again (an identical graph); its requests go on in it",
                         seen[1].graph_id)
                return seen[1]
            graph_id = len(self.runners)
            try:
                if torch.is_grad_enabled():
                    raise UnsupportedGraphError(
                        "the model was called with autograd enabled; caching is for inference: call it under "
                        "torch.no_grad() or torch.inference_mode() (diffusers pipelines do)"
                    )
                plan, block_root = analyse_traced(gm, module, code, block_lists=self.block_lists,
                                                  timestep_input=self.timestep_input)
                if plan.timestep_index is None and not recipe_for(self.config).per_piece:
                    raise UnsupportedGraphError(
                        f"the graph is a piece of a forward that graph-breaks (or a block compiled on its own), and "
                        f"{self.config.method} does not work per piece ({recipe_for(self.config).per_piece_why}): "
                        f"the model runs FULL; remove the graph break (see torch._dynamo.explain) to cache it")
                variants = build_variants(gm, plan, self.config)
            except UnsupportedGraphError as exc:
                if _is_glue(exc, module, code):
                    # glue of a forward Dynamo split (the timestep embedding, the head, a helper's own frame):
                    # nothing to cache here; the pieces with blocks are cached
                    log.info("fxcache: graph %d holds no blocks (a piece of a graph-broken forward): runs as it is",
                             graph_id)
                    runner = UncachedRunner(backend=self, graph_id=graph_id, gm=gm, lowering=self.lowering,
                                            mode=mode, options=options, reason=exc.reason)
                elif self.strict:
                    runner = FailedRunner(backend=self, graph_id=graph_id, error=exc)
                else:
                    self._warn_once(f"fxcache: running graph {graph_id} uncached: {exc.reason}")
                    runner = UncachedRunner(backend=self, graph_id=graph_id, gm=gm, lowering=self.lowering,
                                            mode=mode, options=options, reason=exc.reason)
            else:
                log.info("fxcache graph %d (%s):\n%s", graph_id, self.config.method, plan.summary())
                if plan.timestep_index is None:
                    self.has_pieces = True
                    runner = piece_runner(self, graph_id, gm, plan, variants, root_cls=type(module),
                                          block_root=block_root, mode=mode, options=options)
                else:
                    runner = compiled_runner(self, graph_id, gm, plan, variants, mode=mode, options=options)
            self.runners.append(runner)
            self._by_signature[signature] = (gm, runner)
        return runner

    def _new_model(self, parameter) -> None:
        """A model this backend had not run before calls one of its graphs: hear its pipeline's signals."""
        module = calling_module(parameter)
        if module is not None:
            attach(module, self)

    def _warn_once(self, message: str, key: str | None = None) -> None:
        self.scope.warn_once(message, key)

    # -- user controls --------------------------------------------------------------------------------------
    @property
    def records(self):
        return self.scope.records

    @property
    def plans(self) -> list[GraphPlan]:
        return [r.plan for r in self.runners if isinstance(r, Runner)]

    def reset(self) -> None:
        """Free the caches of every request (all threads); the next call of every graph starts over."""
        self.scope.reset()

    def request(self) -> Request:
        """A new request on this backend's models: `with backend.request(): ...` (see `fxcache.request`)."""
        return Request((self.scope,))

    def step(self, index: int, branch: int = 0):
        """Calls inside the block run as step `index`, CFG branch `branch` (step 0 starts that branch over).

        For schedulers whose timesteps repeat or do not fall in ways the step rule cannot follow.
        """
        _check_step(index, branch)
        return self.scope.step(index, branch)

    def stats(self) -> list[dict]:
        return records(self.scope.records)

    def cache_bytes(self) -> int:
        """Bytes of caches held now, over every request."""
        return self.scope.cache_bytes()


def analyse_traced(gm, module, code, *, block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS,
                   timestep_input: int | str | None = None) -> tuple[GraphPlan, str | None]:
    """The analysis of a graph Dynamo traced from `module`'s `code` (call it while Dynamo compiles: it reads the
    Python stack), and the block path the graph was read as when it was traced from a block's own forward (a
    graph break in the block loop, or regional compilation; None otherwise, and when `block_lists=` names the
    lists: the override keeps its meaning). A graph with blocks but no timestep input is a piece stepped by its
    model call (`plan.timestep_index` None)."""
    if module is not None:
        for lst in module_block_lists(module):
            entries = list(module.get_submodule(lst))
            if len({id(m) for m in entries}) < len(entries):
                raise UnsupportedGraphError(
                    f"the block list {lst} holds one module at several positions (weights shared across depth): "
                    f"a cache per position cannot be told apart in the graph, so it is not cached")
    block_root = None
    if module is not None and tuple(block_lists) == DEFAULT_BLOCK_LISTS:
        entry = block_entry_of(module)
        if entry is not None:
            prefix_module_stack(gm, entry[1], type(module))
            block_root = entry[1]
    if block_root is not None:
        # a block's own graph is always stepped by its model's call and placed in the model: a timestep it reads
        # itself (DiT's blocks embed the raw t) would step each block alone, and `timestep_input=` names the
        # model's argument, not the block's
        plan = analyse(gm, block_lists=(block_root.rsplit(".", 1)[0],), follow=True)
        if plan.timestep_index is not None:
            plan = dataclasses.replace(plan, timestep_index=None, timestep_name="")
        return dataclasses.replace(plan, timestep_found=FROM_MODEL_CALL, blocks_found=(
            f"as a block's own forward, {type(module).__name__}: the graph every block of that class runs, each "
            f"with caches of its own (the memory below is per block)")), block_root
    # without a timestep input of its own, a graph is stepped by its model call: a piece after a break, or a
    # forward that embeds t without a sinusoid (a learned path), whose module then takes a timestep argument
    follow = module is not None and (_resumed(code) or (
        timestep_input is None and timestep_parameter(module) is not None))
    plan = analyse(gm, block_lists=block_lists, timestep_input=timestep_input,
                   forward_params=forward_parameters(module) if module is not None else None, follow=follow)
    return plan, block_root


def _is_glue(exc: UnsupportedGraphError, module, code) -> bool:
    """A graph without blocks to cache that is part of a forward Dynamo split: it runs as it is, quietly."""
    return exc.reason.startswith(("no transformer blocks found", "blocks found, but no attention")) \
        and _is_piece(module, code)


def _is_piece(module, code) -> bool:
    """Whether the graph Dynamo hands over now is part of a forward it split: it ends at a graph break, resumes a
    forward after one, or was traced from a frame running inside another module's call (a helper or a submodule
    compiled on its own because the forward around it broke)."""
    if _resumed(code):
        return True
    forward = getattr(getattr(type(module), "forward", None), "__code__", None) if module is not None else None
    if code is not None and forward is not None and code is not forward and code.co_name != "forward":
        return True  # a helper method compiled on its own (HiDream's `patchify`): the forward around it broke
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        reason = getattr(getattr(tx, "output", None), "compile_subgraph_reason", None)
        if reason is not None and getattr(reason, "graph_break", False):
            return True
    except Exception:  # another torch version's internals
        pass
    return any(outer is not module and not isinstance(outer, torch._dynamo.eval_frame.OptimizedModule)
               for outer, _ in module_calls(sys._getframe(2), depth=None))


def _resumed(code) -> bool:
    """A graph of the code Dynamo resumes a forward with after a graph break (a later piece of it)."""
    return code is not None and code.co_name.startswith("torch_dynamo_resume_in_")


def _check_step(index, branch) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ConfigError(f"step index must be an int >= 0, got {index!r}")
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise ConfigError(f"branch must be an int >= 0, got {branch!r}")


def cache_backend(method_or_config: str | CacheConfig = "duca", *, lowering: str = "inductor", strict: bool = False,
                  block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS, timestep_input: int | str | None = None,
                  inplace: bool | None = None, max_branches: int = 3, keep_caches: bool | None = None,
                  time_direction: str = "auto", **options) -> CacheBackend:
    """The backend for `torch.compile(model, backend=fxcache.cache_backend("duca"), dynamic=False)`.

    Args:
        method_or_config: a registered method name ("duca", "fora", ...), a config instance, or the path of a
            JSON config file (a str ending in ".json" or a path object): one `fxcache.calibrate(...).save(path)`
            wrote, or a config's `to_dict()` (`fxcache.load_config` reads it; options override its fields).
        lowering: "inductor" (default; honours torch.compile's mode= and options=), "eager", "onnx" (onnxruntime)
            or "tensorrt" (CUDA), or a name given to `fxcache.register_lowering`.
        strict: raise UnsupportedGraphError (at the first call) for a graph the analysis does not understand,
            instead of warning once and running it uncached.
        block_lists: names of the module lists that hold the transformer blocks.
        timestep_input: the forward's timestep parameter (name, dotted path into a dict argument, or index among
            the forward's parameters) when no diffusers `Timesteps` module reveals it.
        inplace: keep caches in persistent buffers the variants update in place (static addresses, as CUDA graphs
            need). None (default): on for `mode="reduce-overhead"`, off otherwise.
        max_branches: CFG branches (or interleaved unmarked requests) one request keeps caches for; beyond it
            the least recently used is dropped (and runs FULL when it calls again), with a warning.
        keep_caches: when a request ends, keep its cache buffers allocated for the next request of the same shape
            (None: only for in-place caches, whose addresses CUDA graphs record).
        time_direction: "auto" (falling, unless t is seen rising during sampling, as in Lumina), "falling" or
            "rising".
        **options: fields of the method's config (only with a method name or a config file).
    """
    path = config_path(method_or_config)
    if isinstance(method_or_config, CacheConfig):
        if options:
            raise UnknownOptionError(
                f"options {sorted(options)} given with a config instance; use "
                f"dataclasses.replace(config, ...) instead"
            )
        config = method_or_config
    elif isinstance(method_or_config, str) or path is not None:
        for key in ("mode", "options"):
            if key in options:
                raise UnknownOptionError(
                    f"{key}= is torch.compile's, not a cache option: torch.compile(model, backend="
                    f"fxcache.cache_backend({method_or_config!r}), dynamic=False, {key}=...) passes it to the "
                    f"lowering (fxcache.enable(pipe, ..., {key}=...) does so too)")
        config = load_config(path, **options) if path is not None else make_config(method_or_config, **options)
    else:
        raise ConfigError(
            f"cache_backend takes a method name, a CacheConfig or a config file path, got "
            f"{type(method_or_config).__name__}"
        )
    return CacheBackend(config, lowering=lowering, strict=strict, block_lists=block_lists,
                        timestep_input=timestep_input, inplace=inplace, max_branches=max_branches,
                        keep_caches=keep_caches, time_direction=time_direction)


def _find_backend(model):
    """The CacheBackend (or CachedSession) serving `model`: the backend itself, a module compiled with one
    (`torch.compile(...)` or in place with `module.compile(...)`), or a session."""
    if isinstance(model, CacheBackend) or hasattr(model, "scope") and isinstance(model.scope, RequestScope):
        return model
    todo, seen = [getattr(model, "dynamo_ctx", None)], set()
    for m in (model, getattr(model, "_orig_mod", None)):
        impl = getattr(m, "__dict__", {}).get("_compiled_call_impl")
        todo += [c.cell_contents for c in (getattr(impl, "__closure__", None) or ())]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CacheBackend):
            return obj
        for attr in ("callback", "_torchdynamo_orig_backend", "compiler_fn", "__wrapped__", "_orig_backend"):
            todo.append(getattr(obj, attr, None))
    for m in (model, getattr(model, "_orig_mod", None)):  # a module whose graph a backend serves
        if isinstance(m, torch.nn.Module) and backends_of(m):
            return backends_of(m)[-1]
    raise ConfigError(
        f"{type(model).__name__} was not compiled with an fxcache backend; pass the module compiled with "
        "torch.compile(..., backend=fxcache.cache_backend(...)) (or module.compile(backend=...)), a pipeline "
        "enabled with fxcache.enable(pipe), or the backend itself"
    )


def _served(model) -> list:
    """The backends behind `model`: every backend of a pipeline enabled with `fxcache.enable`, or of the
    fxcache-compiled transformers of any other pipeline (one made with `from_pipe`), else one."""
    state = getattr(model, "__dict__", {}).get("_fxcache")
    if isinstance(state, dict) and "backends" in state:
        return list(state["backends"])
    components = getattr(model, "components", None)
    if isinstance(components, dict) and not isinstance(model, torch.nn.Module):
        found = []
        for name, c in components.items():
            if name.startswith("transformer") and isinstance(c, torch.nn.Module):
                try:
                    found.append(_find_backend(c))
                except ConfigError:
                    continue
        if found:
            return found
    return [_find_backend(model)]


def stats(model) -> list[dict]:
    """One record per call of the compiled model: graph, request, step, branch, kind, plan (the `StepPlan` that
    ran: each block's kind and the tokens each partial unit recomputed; None uncached), tokens, flops, t,
    cache_bytes (held by that graph in that request after the call). For a pipeline with two transformers
    (Wan 2.2), the records of both, each with the `component` it came from. Of pipelines enabled on one shared
    transformer, each has the records of its own calls (and of `fxcache.request(pipe)` blocks); the transformer
    has them all."""
    state = getattr(model, "__dict__", {}).get("_fxcache")
    backends = _served(model)
    if len(backends) == 1:
        found = backends[0].stats()
    else:
        names = list(state["originals"])
        found = [Record(r, component=name) for name, b in zip(names, backends) for r in b.stats()]
    if isinstance(state, dict) and getattr(state.get("entry"), "shared", False):
        own = set(state["requests"])  # pipelines enabled on one transformer: each its own calls
        found = [r for r in found if r["request"] in own]
    return found


def reset(model) -> None:
    """Free the caches of every request; the next call starts a new generation."""
    for backend in _served(model):
        backend.reset()


def cache_bytes(model) -> int:
    """Bytes of caches the model's backend (a pipeline's backends) holds now, over every request."""
    return sum(backend.cache_bytes() for backend in _served(model))


def step(model, index: int, branch: int = 0):
    """Context manager: calls inside run as step `index` of branch `branch` (overrides the step rule)."""
    managers = [backend.step(index, branch) for backend in _served(model)]  # checks the arguments now
    if len(managers) == 1:
        return managers[0]
    stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def all_of():
        with stack:
            for m in managers:
                stack.enter_context(m)
            yield

    return all_of()


def request(*models) -> Request:
    """A request boundary: `with fxcache.request(model): ...` runs the calls inside with caches of their own,
    freed when the block ends (exceptions included). Without it, each thread has one implicit request, which a
    diffusers pipeline ends at the end of its call and the step rule otherwise follows from the timesteps.

    `models`: compiled models, backends, sessions or enabled pipelines (none: every fxcache model). For requests interleaved in one
    thread keep the object and enter `req.resume()` around each of its calls, then `req.end()`.
    """
    if not models:
        return Request(None)
    scopes = []
    for m in models:
        for backend in _served(m):
            if backend.scope not in scopes:
                scopes.append(backend.scope)
    request = Request(tuple(scopes))
    for m in models:  # an enabled pipeline's stats have the calls of requests opened on it
        state = getattr(m, "__dict__", {}).get("_fxcache")
        if isinstance(state, dict) and "requests" in state:
            state["requests"].append(request.id)
    return request


@dataclasses.dataclass
class Explanation:
    graph_count: int
    graph_break_count: int
    break_reasons: list[str]
    plans: list[GraphPlan | None]
    errors: list[str]
    variants: list[dict] = dataclasses.field(default_factory=list)  # per graph: plan label -> Variant (method=)
    graphs: bool = False  # print each variant's graph code
    method: str = ""  # the method whose variants were built (method=)
    schedules: list[str] = dataclasses.field(default_factory=list)  # per graph: the method's plans, summarised
    #: per break reason: "file:line in function" of the user's code that broke the graph ("" when unknown)
    break_locations: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"Graph count: {self.graph_count}", f"Graph break count: {self.graph_break_count}"]
        for i, r in enumerate(self.break_reasons):
            where = self.break_locations[i] if i < len(self.break_locations) else ""
            lines.append(f"  break{' at ' + where if where else ''}: {r}")
        for i, (plan, err) in enumerate(zip(self.plans, self.errors)):
            lines.append(f"Graph {i}:")
            lines.append("  " + (plan.summary().replace("\n", "\n  ") if plan else f"not cacheable: {err}"))
            for label, v in (self.variants[i] if i < len(self.variants) else {}).items():
                reads = ", ".join(f"{x.role.value} {x.key.name}" for x in v.inputs) or "nothing"
                writes = ", ".join(x.key.name for x in v.outputs) or "nothing"
                lines.append(f"  variant {label}: {v.flops / 1e6:.1f} MFLOPs, {v.tokens} tokens; takes {reads}; "
                             f"writes {writes}")
                if self.graphs:
                    lines.append("    " + v.gm.code.strip().replace("\n", "\n    "))
            if i < len(self.schedules) and self.schedules[i]:
                lines.append("  " + self.schedules[i])
            built = self.variants[i] if i < len(self.variants) else {}
            if built:
                held = {x.key: x for v in built.values() for x in v.outputs if x.role.persistent}
                size = sum(math.prod(x.shape) * x.dtype.itemsize for x in held.values())
                lines.append(f"  cache memory per branch with {self.method}: {size / 2**20:.2f} MiB (every value its "
                             f"variants keep between steps)")
        lines.append(REQUEST_BOUNDARIES)
        return "\n".join(lines)


def schedule_summary(config: CacheConfig, plan: GraphPlan) -> str:
    """One line on the plans `config`'s schedule gives a graph: steps by kind, mixed steps, distinct plans (each
    is one variant, built and lowered on first use)."""
    recipe, view = recipe_for(config), GraphView.of(plan)
    if getattr(recipe, "decides", False):
        return decided_summary(recipe, view, plan)
    steps = config.planned_steps or min(config.horizon, 50)
    plans = [recipe.plan(s, view) for s in range(steps)]
    kinds: dict[str, int] = {}
    for p in plans:
        kinds[p.kind.value] = kinds.get(p.kind.value, 0) + 1
    mixed = [s for s, p in enumerate(plans) if len({b.kind for b in p.blocks}) > 1]
    line = (f"schedule over {steps} steps: " + ", ".join(f"{n} {k}" for k, n in kinds.items())
            + f"; {len(set(plans))} distinct plans (one variant each, built and lowered on first use)")
    if mixed:
        line += f"; mixed steps (blocks of different kinds) at s = {', '.join(map(str, mixed))}"
    return line


def decided_summary(recipe, view: GraphView, graph: GraphPlan) -> str:
    """What each call of a method that decides at run time runs: the probe's blocks, then the blocks a cached call
    replaces by their residual (the compute tail runs every block the probe did not)."""
    plans = recipe.plans(view)
    names = [b.name for b in graph.blocks]
    probe = [n for n, b in zip(names, plans["probe"].blocks) if b.kind is BlockKind.FULL]
    reused = [n for n, b in zip(names, plans["cached"].blocks) if b.kind is BlockKind.RESIDUAL]
    after = [n for n, b, p in zip(names, plans["cached"].blocks, plans["probe"].blocks)
             if b.kind is BlockKind.FULL and p.kind is not BlockKind.FULL]
    span = (lambda ns: f"{ns[0]}..{ns[-1]}" if len(ns) > 1 else ns[0] if ns else "none")
    where = span(probe) if probe else "up to its signal (no whole block)"
    return (f"decided per call: a probe runs {where} and returns "
            f"its signal (one host read), then a compute tail runs the rest, or a cached tail adds the residual of "
            f"{span(reused)} from the branch's last computed call" + (f" and runs {span(after)}" if after else ""))


REQUEST_BOUNDARIES = (
    "Request boundaries: calls inside `with fxcache.request(model):` (or a pipeline enabled with "
    "fxcache.enable(pipe)) are one request. Otherwise each diffusers pipeline call is a request (its end-of-call "
    "reset, or the pipeline's next call, ends it), and outside any pipeline the step rule guesses from the "
    "timesteps, conditioning inputs and latents: a request whose first t is below the last one seen, with the "
    "same conditioning, cannot be told from a continuation (a warning says so when its latents jump), and a "
    "request that starts at a higher t while another is unfinished makes the rule take the other for ended. "
    "Mark requests in custom loops, generators and servers."
)


def break_location(reason) -> str:
    """`file:line in function` of a Dynamo graph-break reason's innermost frame outside torch (the model's own
    code, or a hook of the user's: where to look), else its innermost frame; "" when it carries no stack."""
    import os

    stack = list(getattr(reason, "user_stack", None) or [])
    if not stack:
        return ""
    inside = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
    frame = next((f for f in reversed(stack) if not os.path.abspath(f.filename).startswith(inside)), stack[-1])
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _trace_aside(module, backend, args, kwargs) -> None:
    """Run `module(*args, **kwargs)` once under Dynamo with `backend`, leaving other compiled models alone: no
    `torch._dynamo.reset()` (it would make every compiled model recompile and free fxcache's caches), the
    trace's cache entries kept apart from theirs (`isolate_recompiles`, where torch has it: they count against
    no one's recompile limit) and emptied afterwards (the traced graphs are not kept alive). The entries Dynamo
    keeps count towards its per-function limit of `accumulated_recompile_limit` compiles (256), as any compile's
    do."""
    import inspect

    options = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(
        torch.compile).parameters else {}
    try:
        with torch.no_grad():
            torch.compile(module, backend=backend, dynamic=False, **options)(*args, **kwargs)
    finally:
        _drop_entries(backend)


def _drop_entries(backend) -> None:
    """Invalidate the Dynamo cache entries compiled by `backend` (torch internals: best effort, a torch without
    them keeps the entries, which only hold the traced graphs)."""
    try:
        from torch._dynamo import convert_frame, eval_frame
        from torch._dynamo.guards import DeletedGuardManagerWrapper

        eval_frame.cached_backends.pop(id(backend), None)
        for ref in list(convert_frame.input_codes.seen):
            code = ref()
            if code is None:
                continue
            for entry in eval_frame._debug_get_cache_entry_list(code):
                if getattr(entry.backend, "compiler_fn", entry.backend) is backend:
                    manager = entry.guard_manager
                    manager.extra_state.invalidate(entry, DeletedGuardManagerWrapper("fxcache.explain is done"))
    except Exception as exc:  # another torch version's internals
        log.debug("fxcache.explain: its Dynamo cache entries are kept (%s)", exc)


def explain(model, *args, block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS,
            timestep_input: int | str | None = None, method: str | CacheConfig | None = None,
            preset: str | None = None, graphs: bool = False, **kwargs) -> Explanation:
    """Trace `model(*args, **kwargs)` with Dynamo, print and return what fxcache finds in each graph.

    `method` (a name or a config; `preset=` as in `cache_backend`): also build the variants its schedule starts
    with and list, for each, what it takes and writes, and summarise the plans of its schedule (distinct plans,
    mixed steps); `graphs=True` prints their graph code too."""
    _check_timestep_input(timestep_input)
    _check_bool("graphs", graphs)
    if graphs and method is None:
        raise ConfigError("graphs=True prints the variant graphs a method builds: pass method= too (a method name "
                          "or a config), e.g. explain(model, **inputs, method='fora', graphs=True)")
    config = None
    if preset is not None and (method is None or isinstance(method, CacheConfig)):
        raise ConfigError("preset= picks the published settings of a method: pass the method by name too, e.g. "
                          "explain(model, **inputs, method='toca', preset='dit')")
    if method is not None:
        config = method if isinstance(method, CacheConfig) else make_config(method, preset=preset)
    module = getattr(model, "_orig_mod", model)
    plans, errors, traced, reasons = [], [], [], []

    def capture(gm, example_inputs, **kw):  # the analysis the backend makes, where it makes it (pieces too)
        frame_module, code = traced_frame()
        why = getattr(gm, "compile_subgraph_reason", None)
        if why is not None and getattr(why, "graph_break", False):
            reasons.append(why)
        try:
            plan, _ = analyse_traced(gm, frame_module, code, block_lists=block_lists, timestep_input=timestep_input)
            traced.append((gm, plan, ""))
        except UnsupportedGraphError as exc:
            traced.append((gm, None, "runs as it is: a piece of a graph-broken forward with no block to cache"
                           if _is_glue(exc, frame_module, code) else str(exc)))
        return gm.forward

    _trace_aside(module, capture, args, kwargs)
    graphs_seen = [gm for gm, _, _ in traced]
    for gm, plan, error in traced:
        plans.append(plan)
        errors.append(error)
    variants, schedules = [], []
    if config is not None:
        for gm, plan in zip(graphs_seen, plans):
            built = {}
            if plan is not None:
                try:
                    built = {p.label: v for p, v in build_variants(gm, plan, config).items()}
                except UnsupportedGraphError as exc:
                    errors[len(variants)] = f"{config.method} cannot cache it: {exc}"
            variants.append(built)
            schedules.append(schedule_summary(config, plan) if built else "")
    result = Explanation(len(graphs_seen), max(0, len(graphs_seen) - 1),
                         [str(getattr(r, "reason", r)) for r in reasons], plans, errors, variants, graphs,
                         config.method if config is not None else "", schedules, [break_location(r) for r in reasons])
    print(result)
    return result
