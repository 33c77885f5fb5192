"""The callable the backend hands back to Dynamo: picks a variant per call, keeps the caches of each request.

A runner is static (its dispatcher, and the variants and their lowerings or loaded artifacts, one per Dynamo graph
or export); the state of a call lives in the `GraphState` of its request (`requests.py`) and model (the parameters
the call passes: two modules of one class share a Dynamo graph, never their caches). The compiled model and the
export session run this same class: only their `VariantSource` differs.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Callable

import torch

from ..backends import get_lowering
from ..config import StepKind
from ..errors import ConfigError
from ..step_plan import StepPlan
from .attach import CONTEXT_NAME
from .dispatch import Dispatcher, prepared
from .fingerprint import latent_sample, summaries
from .state import GraphState
from .step_count import KEY as STEPS_KEY
from .store import nbytes

if TYPE_CHECKING:
    from .requests import Request

log = logging.getLogger("fxcache")
_CALLS = itertools.count()


class VariantSource:
    """Where a runner's variants come from: `variant(plan)` (inputs, outputs, output count, FLOPs, ...) and
    `callable(plan, variant, args)` (what runs it)."""

    def variant(self, plan: StepPlan):
        raise NotImplementedError

    def callable(self, plan: StepPlan, variant, args) -> Callable:
        raise NotImplementedError


class GraphVariants(VariantSource):
    """Variants built from a Dynamo graph on first use (the eagerly built ones given), lowered on first use."""

    def __init__(self, gm, graph, config, built: dict, *, lowering: str, mode=None, options=None,
                 inplace: bool = False):
        from ..methods import recipe_for
        from ..passes.inplace_caches import make_inplace

        self.gm, self.graph, self.config = gm, graph, config
        self.lowering, self.mode, self.options, self.inplace = lowering, mode, options, inplace
        self._make_inplace = make_inplace
        self._recipe = recipe_for(config)
        # (the method's view of the graph,): worked out when a plan not built eagerly is met (a layout may be None)
        self._layout = None
        self._variants = {p: make_inplace(v) if inplace else v for p, v in built.items()}
        self._fns: dict[StepPlan, Callable] = {}
        self._lock = threading.RLock()

    def variant(self, plan: StepPlan):
        v = self._variants.get(plan)
        if v is None:
            from ..variants import build_variant

            with self._lock:
                v = self._variants.get(plan)
                if v is None:
                    log.info("fxcache: building the %s variant", plan.label)
                    if self._layout is None:
                        self._layout = (self._recipe.layout(self.graph),)
                    v = build_variant(self.gm, self.graph, self.config, plan, self._layout[0])
                    v = self._variants[plan] = self._make_inplace(v) if self.inplace else v
        return v

    def callable(self, plan, variant, args) -> Callable:
        fn = self._fns.get(plan)
        if fn is None:
            with self._lock:
                fn = self._fns.get(plan)
                if fn is None:
                    log.info("fxcache: lowering the %s variant with %s", plan.label, self.lowering)
                    fn = self._fns[plan] = get_lowering(self.lowering)(variant.gm, args, mode=self.mode,
                                                                       options=self.options)
        return fn

    def built(self) -> dict:
        return dict(self._variants)


class Runner:
    """One per Dynamo graph (per input shape). Never traced by Dynamo, so nothing here recompiles.

    Per call: find its request and model state -> (step, branch) from the request boundary signals and the step
    rule -> step kind from the method (FULL while the branch lacks caches) -> lower that variant on first use ->
    run it with per-step inputs and caches appended -> keep the caches it wrote.

    `inplace`: caches live in persistent buffers per CFG branch that the variants update in place (and per-step
    inputs in persistent buffers too), as CUDA graphs need. `cudagraphs`: mark each call a new CUDA-graph step and
    clone the outputs (a later replay overwrites them).
    """

    def __init__(self, *, backend, graph_id: int, dispatcher: Dispatcher, source: VariantSource,
                 timestep_index: int, conditioning: list[int], param_indices: list[int], inplace: bool = False,
                 cudagraphs: bool = False, plan=None, keep_example_args: bool = False, latents: int | None = None):
        self.backend = backend
        self.scope = backend.scope
        self.graph_id = graph_id
        self.dispatcher = dispatcher
        self.config = dispatcher.config
        self.source = source
        self.plan = plan  # the analysis (GraphPlan) of a compiled graph; None for an export session
        self.timestep_index = timestep_index
        self.cudagraphs = cudagraphs
        self.inplace = inplace
        self._param_indices, self._conditioning = param_indices, conditioning
        self._latents = latents  # the latents input: calls of two trajectories at one t are told apart by it
        self._pool: dict[tuple, list[torch.Tensor]] = {}  # keep_caches: in-place buffers of ended requests
        self._models: dict[int, weakref.ref] = {}  # id -> model identity (first parameter) seen
        self.scope.runners.add(self)
        self._lock = threading.RLock()
        self.keep_example_args = keep_example_args  # export traces with it: the first call's arguments stay held
        self.example_args: tuple | None = None
        self._planned_steps = self.config.planned_steps  # the step count the schedule is written for, if any
        # the token counts of this graph's blocks, told to the pieces of a graph-broken model that run after it
        self._recent = getattr(backend, "recent_blocks", None) if plan is not None else None
        self._block_tokens = unit_tokens(plan) if self._recent is not None else {}

    # -- state -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget this graph's state in every request (the next call starts a generation)."""
        self.scope.reset()

    def cache_bytes(self) -> int:
        return self.scope.cache_bytes()

    def _identity(self, args) -> tuple[torch.Tensor | None, tuple | None]:
        """(the model's first parameter, the ids of all its parameters): two modules of one class share a Dynamo
        graph, and may share some parameters (a frozen embedding), never all of them."""
        idx = self._param_indices
        if not idx:
            return None, None
        return args[idx[0]], tuple(id(args[i]) for i in idx)

    def _state(self, args) -> tuple[GraphState, "Request", tuple | None]:
        model, key = self._identity(args)
        request = self.scope.current()
        if self.scope in request.gaps:
            self._after_gap(request)
        state = request.state(self, key, lambda: self._new_state(model, key, request))
        if not state.belongs_to(model):  # the model that had these ids is gone
            state.release()
            state.model_ref = weakref.ref(model)
        return state, request, key

    def _after_gap(self, request) -> None:
        """A call of this request ran outside fxcache (it was not seen): its caches may be a step behind, so every
        graph of this model starts over here (FULL), and the user hears why."""
        request.gaps.discard(self.scope)
        request.clear(self.scope)
        self.backend._warn_once(
            "fxcache: a model call ran outside fxcache (Dynamo ran it in eager: past its recompile limit, or under "
            "torch.compiler.disable or a forced eager stance), so the request it belongs to starts over at its "
            "next call (a FULL step; no cache from before the gap is read): its result differs from the same "
            "request run alone. If the limit was hit, raise torch._dynamo.config.recompile_limit and "
            "accumulated_recompile_limit before the first call, and warm up every input shape", key="ran-outside")

    def _new_state(self, model, key, request) -> GraphState:
        if model is not None:
            seen = self._models.get(id(model))
            if seen is None or seen() is not model:
                mid = id(model)
                self._models[mid] = weakref.ref(model, lambda ref: self._models.get(mid) is ref
                                                and self._models.pop(mid, None))
                hook = getattr(self.backend, "_new_model", None)
                if hook is not None:
                    hook(model)
        state = GraphState(self, None, request.id, explicit=not request.implicit)
        if model is not None:
            owner, slot = weakref.ref(request), (self, key)

            def model_gone(_ref):  # the model was garbage collected: its caches go with it
                r = owner()
                if r is not None:
                    r.discard(slot)

            state.model_ref = weakref.ref(model, model_gone)
        return state

    def take_buffer(self, key: tuple, shape, dtype, device) -> torch.Tensor:
        with self._lock:
            pool = self._pool.get(key) or []
            while pool:
                buf = pool.pop()
                if tuple(buf.shape) == tuple(shape) and buf.dtype == dtype and buf.device == torch.device(device):
                    return buf.zero_()
        buf = torch.zeros(shape, dtype=dtype, device=device)
        torch._dynamo.mark_static_address(buf)
        return buf

    def give_back_buffers(self, buffers: dict[tuple, torch.Tensor]) -> None:
        if not self.scope.keep_caches or self.scope.freeing:
            return
        with self._lock:
            for key, buf in buffers.items():
                pool = self._pool.setdefault(key, [])
                if len(pool) < self.scope.max_branches:
                    pool.append(buf)

    # -- what a call shows -------------------------------------------------------------------------------
    def _position(self, state: GraphState, args):
        latents = args[self._latents] if self._latents is not None else None
        t, fingerprint, sample = observe(args[self.timestep_index], [args[i] for i in self._conditioning], latents)
        try:
            return locate(self.scope, state.tracker, t, fingerprint, sample), t
        except ConfigError:
            state.release()
            raise

    # -- dispatch ----------------------------------------------------------------------------------------
    @property
    def variants(self) -> dict:
        """The variants built so far, by plan (compiled runners)."""
        return self.source.built() if hasattr(self.source, "built") else {}

    def variant_of(self, kind: StepKind):
        """The variant of the first plan of `kind` the schedule emits (what `explain` and tests look at)."""
        from ..variants import first_plans

        plan = next(p for p in first_plans(self.config, self.dispatcher.view) if p.kind is kind)
        return self.source.variant(plan)

    def pooled_bytes(self) -> int:
        """Bytes of in-place buffers kept for the next request (`keep_caches`)."""
        with self._lock:
            return sum(nbytes(b) for pool in self._pool.values() for b in pool)

    def free_pool(self) -> None:
        with self._lock:
            self._pool.clear()

    def _end_other_shapes(self, request, state: GraphState, t: float) -> None:
        """An unmarked request starts at t: the model's graphs of other input shapes whose branches all stopped
        below t belonged to the requests before it, so their caches go (one request's worth stays held). Graphs
        of one model may lift different buffers, so the model is told by its first parameter here."""
        model = state.model_ref() if state.model_ref is not None else None
        for key, other in list(request.states.items()):
            if key[0] is not self and key[0].scope is self.scope and other.model_ref is not None \
                    and other.model_ref() is model and other.tracker.ended_before(t):
                request.discard(key)

    def _locate(self, state: GraphState, request, args):
        """(position, t) of this call: the step rule over this graph's calls (a piece of a graph-broken forward
        reads its model call's instead: `PieceRunner`)."""
        pos, t = self._position(state, args)
        if pos.new and pos.step == 0 and request.implicit:
            self._end_other_shapes(request, state, t)
        for slot in pos.dropped:
            state.drop(slot)
        if pos.new:
            state.restart(pos.branch)
        return pos, t

    def _dispatcher_of(self, state: GraphState) -> Dispatcher:
        return self.dispatcher

    def _device(self, args):
        return args[self.timestep_index].device

    def _forget(self, state: GraphState, branch: int) -> None:
        state.tracker.forget(branch)

    def __call__(self, *args):
        self.scope.serve()
        if self.keep_example_args and self.example_args is None:
            self.example_args = args
        state, request, key = self._state(args)
        located = self._locate(state, request, args)
        if located is None:  # a call whose step cannot be known (`PieceRunner`): FULL, nothing kept
            return self._run_alone(args)
        pos, t = located
        if self._block_tokens and self.backend.has_pieces and type(self) is Runner:
            self._note_blocks(state)
        self._warn_about(pos, state, request)
        step, branch = pos.step, pos.branch
        return self._run(state, args, step, branch, t)

    def _note_blocks(self, state: GraphState) -> None:
        """Tell the pieces of this model that run after this graph the token counts its blocks ran with (the
        model's module, found on the stack once per model)."""
        module_ref = state.module_ref
        if module_ref is None:
            from .attach import calling_module

            param = state.model_ref() if state.model_ref is not None else None
            module = calling_module(param, depth=48) if param is not None else None
            if module is None:
                return
            module_ref = state.module_ref = weakref.ref(module)
        module = module_ref()
        if module is not None:
            self._recent.note(module, self._block_tokens)

    def _warn_about(self, pos, state: GraphState, request) -> None:
        if pos.crowded and not pos.unmatched:
            self.backend._warn_once(
                f"fxcache: graph {self.graph_id} is called for more CFG branches (or interleaved requests, or new "
                f"requests at the same timestep) than max_branches={self.scope.max_branches}; the least recently "
                f"used one was dropped and will run uncached when it calls again. Raise max_branches "
                f"(cache_backend(..., max_branches=N)), or run each request in `with fxcache.request(model):`")
        if pos.unmatched and not pos.returning:
            state.unmatched += 1
            if state.unmatched >= 3:
                self.backend._warn_once(
                    f"fxcache: calls of graph {self.graph_id} keep changing their conditioning inputs (all inputs "
                    f"but the latents and t) from one step to the next, so outside a request they cannot be told "
                    f"from other requests and run FULL (uncached). Run each request inside "
                    f"`with fxcache.request(model):` (or use fxcache.enable(pipe)) to cache them.")
        if pos.jumped and request.implicit:
            self.backend._warn_once(
                f"fxcache: graph {self.graph_id}: a call went on from the last step of a loop with the same "
                f"conditioning (t moved on), but its latents jumped far from that call's, further than a sampling "
                f"step moves them: it looks like a new request (an img2img or refine pass starting below the last "
                f"t), which the step rule cannot tell from a continuation and runs on the other's caches. Run each "
                f"request inside `with fxcache.request(model):` (or use fxcache.enable(pipe)).", key="jumped")
        if pos.flipped:
            log.info("fxcache: graph %d: t moves the other way during sampling; following it (%s; "
                     "time_direction='%s' saves the first step of every request)",
                     self.graph_id, state.tracker.direction.name, state.tracker.direction.name)
        if pos.revived:
            self.backend._warn_once(
                f"fxcache: graph {self.graph_id}: a request went on after another one, started in the same thread "
                f"without a request boundary, made the step rule take it for finished: it started over (FULL) "
                f"instead of reading its caches, which costs speed. Run interleaved requests each in their own "
                f"`with fxcache.request(model):` (or `req.resume()`).")

    def _run(self, state: GraphState, args, step: int, branch: int, t: float):
        state.steps_run = max(state.steps_run, step + 1)
        planned = self._planned_steps
        if planned is not None and step >= planned and not self.scope.has_warned(STEPS_KEY):
            self.backend._warn_once(
                f"fxcache: graph {self.graph_id}: step {step} is past num_steps={planned}, the step count the "
                f"config's schedule is written for (presets assume one): pass your "
                f"sampler's step count as num_steps, or the schedule does not end as the reference's does",
                key=f"planned-steps-{self.graph_id}")
        dispatcher = self._dispatcher_of(state)
        if dispatcher.decided:
            return self._run_decided(state, dispatcher, args, step, branch, t)
        plan = dispatcher.choose(step, state.written(branch), self.source.variant)
        variant, outs, _ = self._call(state, dispatcher, plan, args, step, branch, self._device(args))
        return self._finish(state, plan, variant, outs, step, branch, t, variant.flops)

    def _finish(self, state, plan, variant, outs: list, step: int, branch: int, t: float, flops, **decided):
        """Record the call and return the model's outputs as the graph would (`decided`: the signal and the
        accumulated value of a method that decides per call)."""
        self.scope.record(
            graph=self.graph_id, call=next(_CALLS), step=step, branch=branch, kind=plan.label, plan=plan,
            tokens=variant.tokens, flops=flops, t=t, cached=True, request=state.request_id,
            cache_bytes=state.held, **decided,
        )
        if self.cudagraphs:  # a later replay overwrites cudagraph outputs (the other CFG branch, the next step)
            outs = [o.clone() for o in outs]
        return outs[0] if variant.single_output else tuple(outs)

    def _call(self, state, dispatcher, plan, args, step: int, branch: int, device, carried=None):
        """Run `plan`'s variant on `args` and the branch's caches; keep what it writes. Returns (variant, model
        outputs, the outputs it passes on by key)."""
        variant = self.source.variant(plan)
        given = dispatcher.step_inputs(state, variant, plan, step, branch, device, carried)
        full_args = list(args) + state.store.inputs(branch, variant.inputs, given, device)
        fn = self.source.callable(plan, variant, full_args)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            result = fn(*full_args)
        except BaseException:  # a failed call leaves this branch's caches unknown: it starts over next time
            self._forget(state, branch)
            state.drop(branch)
            raise
        n = variant.num_outputs
        extra = list(result[n:])
        state.store.keep(branch, variant, extra, full=plan.kind is StepKind.FULL)
        passed = {v.key: value for v, value in zip(variant.outputs, extra) if v.role.passed}
        return variant, list(result[:n]), passed

    def _run_decided(self, state, dispatcher, args, step: int, branch: int, t: float):
        """A method that decides each call at run time: the probe, one host read of its signal, the rule, then
        the compute or the cached tail (`methods/adaptive.py`)."""
        from ..graph_io import Key

        plans = dispatcher.decided_plans
        device = self._device(args)
        reads = (prepared(self.source.variant(plans["cached"])).reads
                 | prepared(self.source.variant(plans["probe"])).reads)
        can_reuse = state.written(branch) >= reads
        probe, _, passed = self._call(state, dispatcher, plans["probe"], args, step, branch, device)
        signal = passed.pop(Key.signal(), None)
        shared = state.step_signal if getattr(self.config, "cfg", "separate") == "shared" else None
        if shared is not None and shared[0] == step and shared[1] != branch:
            values = shared[2]  # a later CFG branch of the step takes the first branch's signal
        else:
            values = signal.tolist() if signal is not None else None  # the call's second host read
            state.step_signal = (step, branch, values)
        rules = state.rules
        if branch not in rules:
            rules[branch] = dispatcher.rule.new_state()
        decision = dispatcher.rule.decide(rules[branch], step, values, can_reuse)
        plan = plans["compute"] if decision.compute else plans["cached"]
        variant, outs, _ = self._call(state, dispatcher, plan, args, step, branch, device, passed)
        return self._finish(state, plan, variant, outs, step, branch, t, probe.flops + variant.flops,
                            signal=decision.signal, accumulated=decision.accumulated)


def unit_tokens(plan) -> dict[str, list[int]]:
    """Block name in the graph -> the token counts of its recomputable units."""
    return {b.name: [u.tokens for u in b.units if u.partial] for b in plan.blocks}


def observe(ts, conditioning: list, latents=None) -> tuple[float, tuple, tuple | None]:
    """(t, conditioning fingerprint, latent sample) of a call, in one host read: its timestep `ts`, conditioning
    values and latents."""
    if not isinstance(ts, torch.Tensor):
        return float(ts), (), None
    # the largest t of the call: Wan 2.2's image-to-video passes t = 0 for the first frame's tokens
    parts = [ts.detach().reshape(-1).max().to(torch.float64).reshape(1)]
    parts += summaries(conditioning, ts.device)
    n = sum(p.numel() for p in parts)
    sample = latent_sample(latents)
    if sample is not None:
        parts.append(sample.to(ts.device))
    values = torch.cat(parts).tolist()
    return values[0], tuple(values[1:n]), tuple(values[n:]) if sample is not None else None


def locate(scope, tracker, t: float, fingerprint: tuple, sample: tuple | None = None):
    """The position of a call at `t`: the explicit `fxcache.step` around it, else the step rule's."""
    override = scope.override()
    if override is not None:
        return tracker.force(override[0], override[1], t)
    return tracker.locate(t, name=CONTEXT_NAME.get(), fingerprint=fingerprint, sample=sample)


def compiled_runner(backend, graph_id: int, gm, graph, variants: dict, *, mode=None, options=None) -> Runner:
    """The runner of a Dynamo graph the analysis understood: its variants (those built at compile time, the rest
    on first use) lowered with the backend's lowering and torch.compile's mode and options."""
    from ..step_plan import GraphView
    from .fingerprint import conditioning_inputs, latent_input, parameter_inputs

    cudagraphs = mode == "reduce-overhead" or bool((options or {}).get("triton.cudagraphs"))
    inplace = cudagraphs if backend.inplace is None else bool(backend.inplace)
    source = GraphVariants(gm, graph, backend.config, variants, lowering=backend.lowering, mode=mode,
                           options=options, inplace=inplace)
    return Runner(backend=backend, graph_id=graph_id, dispatcher=Dispatcher(backend.config, GraphView.of(graph)),
                  source=source, timestep_index=graph.timestep_index,
                  conditioning=conditioning_inputs(graph.timestep_index, graph.input_paths, graph.forward_params),
                  param_indices=parameter_inputs(gm), inplace=inplace, cudagraphs=cudagraphs, plan=graph,
                  keep_example_args=backend.keep_example_inputs,
                  latents=latent_input(graph.timestep_index, graph.input_paths, graph.forward_params))


class UncachedRunner:
    """A graph fxcache does not cache: lowered as it is, on first call."""

    def __init__(self, *, backend, graph_id: int, gm, lowering: str, mode=None, options=None, reason: str = ""):
        self.backend, self.graph_id, self.gm = backend, graph_id, gm
        self.scope = backend.scope
        self.lowering, self.mode, self.options, self.reason = lowering, mode, options, reason
        self._fn = None
        self._lock = threading.Lock()

    def reset(self) -> None:
        pass

    def cache_bytes(self) -> int:
        return 0

    def __call__(self, *args):
        self.scope.serve()
        if self._fn is None:
            with self._lock:
                if self._fn is None:
                    self._fn = get_lowering(self.lowering)(self.gm, list(args), mode=self.mode, options=self.options)
        result = self._fn(*args)
        self.scope.record(graph=self.graph_id, call=next(_CALLS), step=-1, branch=0, kind=StepKind.FULL.value,
                          plan=None, tokens=None, flops=None, t=None, cached=False, request=self.scope.current().id,
                          cache_bytes=0)
        return tuple(result) if isinstance(result, list) else result
