"""The callable the backend hands back to Dynamo: picks a variant per call, keeps the caches of each request.

A runner is static (the variants and their lowerings, one per Dynamo graph); the state of a call lives in the
`GraphState` of its request (`requests.py`) and model (the first parameter the call passes: two modules of one
class share a Dynamo graph, never their caches).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Callable

import torch

from ..config import CacheConfig, StepKind
from ..errors import ConfigError
from ..passes.inplace_caches import CACHE_KINDS, make_inplace
from ..variants import Variant, build_variant, schedule_key
from .draws import draw_indices, draw_permutation, draw_uniform
from .lowering import get_lowering
from .requests import CONTEXT_NAME
from .state import GraphState
from .taylor import TaylorState

if TYPE_CHECKING:
    from .requests import Request

log = logging.getLogger("fxcache")
_CALLS = itertools.count()


def _observed_inputs(plan, gm) -> tuple[list[int], list[int]]:
    """(indices of the parameter inputs: together the model's identity, indices of the conditioning inputs)."""
    from ..analysis.inputs import is_per_step_input
    from ..analysis.module_stack import is_param_placeholder

    param_indices = []
    if gm is not None:
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        param_indices = [i for i, n in enumerate(phs) if is_param_placeholder(n)]
    paths = getattr(plan, "input_paths", None) or {}
    forward = getattr(plan, "forward_params", None)
    conditioning = [i for i, p in sorted(paths.items())
                    if i != plan.timestep_index and not is_per_step_input(p, forward)]
    return param_indices, conditioning


_PERIOD = 4099  # a prime: positions are weighted as (column of a PERIOD-wide matrix, row)
_WEIGHTS: dict[str, torch.Tensor] = {}  # device -> (2, PERIOD) column weights, 64 KiB each
_IRRATIONALS = ((5 ** 0.5 - 1) / 2, 2 ** 0.5 - 1, 3 ** 0.5 - 1, (7 ** 0.5) % 1.0)


def _irrational_weights(n: int, a: float, b: float, device) -> torch.Tensor:
    """(2, n) float64 weights in (0.25, 1.25): irrational multiples of the position, modulo 1."""
    k = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return torch.stack([(k * a) % 1.0, (k * b) % 1.0]) + 0.25


def _position_weighted_sums(flat: torch.Tensor) -> torch.Tensor:
    """Two sums of `flat` (float64), each element weighted by a product of irrational column and row weights: two
    tensors that differ anywhere (a permutation included) get different sums, short of a measure-zero coincidence.
    The weights kept are a fixed 2 x PERIOD table per device, whatever the input sizes."""
    key = str(flat.device)
    cols = _WEIGHTS.get(key)
    if cols is None:
        cols = _WEIGHTS[key] = _irrational_weights(_PERIOD, *_IRRATIONALS[:2], flat.device)
    n = flat.numel()
    rows = -(-n // _PERIOD)
    if rows * _PERIOD != n:
        flat = torch.cat([flat, flat.new_zeros(rows * _PERIOD - n)])
    per_row = flat.view(rows, _PERIOD) @ cols.T  # (rows, 2)
    return (per_row * _irrational_weights(rows, *_IRRATIONALS[2:], flat.device).T).sum(0)


def _summaries(values: list, device) -> list[torch.Tensor]:
    """Three float64 numbers per input (two position-weighted sums and the norm) that change when its values or
    their order change: DiT class labels [4, 3] and [0, 5], or a prompt's embeddings, shuffled."""
    out = []
    for x in values:
        if not isinstance(x, torch.Tensor):
            out.append(torch.tensor([float(x), 0.0, 0.0], dtype=torch.float64, device=device))
            continue
        x = x.detach()
        if x.is_complex():
            x = torch.view_as_real(x)
        flat = x.reshape(-1).to(torch.float64)
        if flat.numel() == 0:
            out.append(torch.zeros(3, dtype=torch.float64, device=device))
            continue
        sums = _position_weighted_sums(flat)
        norm = torch.linalg.vector_norm(flat).reshape(1)
        out.append(torch.cat([sums, norm]).to(device))
    return out


class Runner:
    """One per Dynamo graph (per input shape). Never traced by Dynamo, so nothing here recompiles.

    Per call: find its request and model state -> (step, branch) from the request boundary signals and the step
    rule -> step kind from the method (FULL while the branch lacks caches) -> lower that variant on first use ->
    run it with per-step inputs and caches appended -> keep the caches it wrote.

    `inplace`: caches live in persistent buffers per CFG branch that the variants update in place (and per-step
    inputs in persistent buffers too), as CUDA graphs need; None: on exactly when CUDA graphs are
    (`mode="reduce-overhead"` or `triton.cudagraphs`).
    """

    def __init__(self, *, backend, graph_id: int, plan, config: CacheConfig, variants: dict[StepKind, Variant],
                 lowering: str, mode=None, options=None, gm=None, inplace: bool | None = None):
        self.backend = backend
        self.scope = backend.scope
        self.graph_id = graph_id
        self.plan = plan
        self.config = config
        self.variants = variants
        self.lowering = lowering
        self.mode, self.options = mode, options
        self.gm = gm  # the Dynamo graph, for variants built on first use (ToCa k tables that change per step)
        self.cudagraphs = mode == "reduce-overhead" or bool((options or {}).get("triton.cudagraphs"))
        self.inplace = self.cudagraphs if inplace is None else bool(inplace)
        if self.inplace:
            self.variants = variants = {kind: make_inplace(v) for kind, v in variants.items()}
        self.seed = int(getattr(config, "seed", 0))
        self._param_indices, self._conditioning = _observed_inputs(plan, gm)
        self._first_key = schedule_key(config, config.warmup)
        self._more: dict[tuple[StepKind, int], Variant] = {}
        self._fns: dict[tuple[StepKind, int], Callable] = {}
        self._state_keys = {e.key for v in variants.values() for e in v.extra_inputs if e.kind == "state"}
        self._pool: dict[str, list[torch.Tensor]] = {}  # keep_caches: in-place buffers of ended requests
        self._models: dict[int, weakref.ref] = {}  # id -> model identity (first parameter) seen
        self.scope.runners.add(self)
        self._lock = threading.RLock()
        self.example_args: tuple | None = None  # the first call's arguments, kept only for export

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
        state = request.state(self, key, lambda: self._new_state(model, key, request))
        if not state.belongs_to(model):  # the model that had these ids is gone
            state.release()
            state.model_ref = weakref.ref(model)
        return state, request, key

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

    def take_buffer(self, key: str, shape, dtype, device) -> torch.Tensor:
        with self._lock:
            pool = self._pool.get(key) or []
            while pool:
                buf = pool.pop()
                if tuple(buf.shape) == tuple(shape) and buf.dtype == dtype and buf.device == torch.device(device):
                    return buf.zero_()
        buf = torch.zeros(shape, dtype=dtype, device=device)
        torch._dynamo.mark_static_address(buf)
        return buf

    def give_back_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        if not self.scope.keep_caches or self.scope.freeing:
            return
        with self._lock:
            for key, buf in buffers.items():
                pool = self._pool.setdefault(key, [])
                if len(pool) < self.scope.max_branches:
                    pool.append(buf)

    # -- what a call shows -------------------------------------------------------------------------------
    def _observe(self, args) -> tuple[float, tuple]:
        """(t, conditioning fingerprint) of a call, in one host read."""
        ts = args[self.plan.timestep_index]
        if not isinstance(ts, torch.Tensor):
            return float(ts), ()
        device = ts.device
        # the largest t of the call: Wan 2.2's image-to-video passes t = 0 for the first frame's tokens
        parts = [ts.detach().reshape(-1).max().to(torch.float64).reshape(1)]
        parts += _summaries([args[i] for i in self._conditioning], device)
        values = torch.cat(parts).tolist()
        return values[0], tuple(values[1:])

    def _position(self, state: GraphState, args):
        t, fingerprint = self._observe(args)
        override = self.scope.override()
        try:
            if override is not None:
                return state.tracker.force(override[0], override[1], t), t
            return state.tracker.locate(t, name=CONTEXT_NAME.get(), fingerprint=fingerprint), t
        except ConfigError:
            state.release()
            raise

    # -- dispatch ----------------------------------------------------------------------------------------
    def _kind(self, state: GraphState, step: int, branch: int) -> StepKind:
        kind = self.config.step_kind(step)
        if kind is StepKind.FULL:
            return kind
        needed = [e.key for e in self.variants[kind].extra_inputs if e.kind == "cache"]
        have = state.written(branch)
        return kind if all(k in have for k in needed) else StepKind.FULL

    def _extra_inputs(self, state: GraphState, variant: Variant, kind: StepKind, step: int, branch: int,
                      device) -> list:
        store = state.caches.get(branch, {})
        taylor = None
        if self.config.taylor_order is not None:
            taylor = state.taylor.get(branch)
            if taylor is None:
                taylor = state.taylor[branch] = TaylorState(self.config.taylor_order, self.config.warmup)
        per_step = [e for e in variant.extra_inputs if e.kind in ("idx", "rand")]
        draws = self._draws(state, step, per_step, device) if per_step else {}
        # a FULL step anchors the Taylor deltas even when the variant takes no `taylor_diff` (order 0)
        diff = taylor.full_inputs(step, device) if kind is StepKind.FULL and taylor is not None else None
        extra = []
        for e in variant.extra_inputs:
            if e.kind in ("idx", "rand"):  # one draw per step, shared by the CFG branches
                extra.append(draws[e.key])
            elif e.kind == "buffer" or (self.inplace and e.kind in CACHE_KINDS):  # _into_buffers supplies these
                extra.append(None)
            elif e.kind in ("cache", "state"):
                value = store.get(e.key)
                if value is None:  # FULL without caches (old Taylor factors, scaled by 0) or fresh staleness
                    value = torch.zeros(e.shape, dtype=e.dtype, device=device)
                extra.append(value)
            elif e.kind == "diff":
                extra.append(diff)
            elif e.kind == "coef":
                extra.append(taylor.forecast_inputs(step, device))
            elif e.kind == "kinit":
                tokens = int(e.key.split(":")[1])
                extra.append(draw_permutation(self.seed, step, e.key, tokens, e.shape[0], device))
            elif e.kind == "warm":
                warm = any(k.startswith("clustercentroids:") for k in state.written(branch))
                extra.append(torch.full(e.shape, 1.0 if warm else 0.0, dtype=e.dtype, device=device))
            else:  # pragma: no cover - build_variants only emits the kinds above
                raise AssertionError(e.kind)
        return self._into_buffers(state, variant, extra, branch, device) if self.inplace else extra

    def _into_buffers(self, state: GraphState, variant, values: list, branch: int, device) -> list:
        """In-place mode: caches are the branch's persistent buffers (zeroed where this generation has not written
        them: the 'zeros when absent' rule), per-step values are copied into persistent buffers of their own."""
        valid = state.valid.setdefault(branch, set())
        out = []
        for e, value in zip(variant.extra_inputs, values):
            if e.kind in CACHE_KINDS or e.kind == "buffer":
                buf, new = state.buffer(branch, e.key, e.shape, e.dtype, device)
                if not new and e.key not in valid and e.kind != "buffer":
                    buf.zero_()
            else:
                buf = state.step_buffers.get(e.key)
                if buf is None or buf.shape != value.shape:
                    buf = state.step_buffers[e.key] = self.take_buffer(f"step:{e.key}", value.shape, value.dtype,
                                                                       value.device)
                buf.copy_(value)
            out.append(buf)
        return out

    def _draws(self, state: GraphState, step: int, specs, device) -> dict[str, torch.Tensor]:
        """The random inputs of `step`: pure functions of (seed, step, key), computed once per step."""
        if state.draws_step != step or any(e.key not in state.draws for e in specs):
            if state.draws_step != step:
                state.draws = {}
            for e in specs:
                if e.key in state.draws:
                    continue
                if e.kind == "idx":
                    value = draw_indices(self.seed, step, e.key, e.shape[0], int(e.key.split(":")[1]), e.shape[1],
                                         device)
                else:
                    value = draw_uniform(self.seed, step, e.key, e.shape, device)
                state.draws[e.key] = value
            state.draws_step = step
        return state.draws

    def _variant(self, kind: StepKind, step: int) -> tuple[Variant, int]:
        key = schedule_key(self.config, step) if kind is StepKind.PARTIAL else 0
        if kind is not StepKind.PARTIAL or key == self._first_key:
            return self.variants[kind], key
        variant = self._more.get((kind, key))
        if variant is None:
            with self._lock:
                variant = self._more.get((kind, key))
                if variant is None:
                    log.info("fxcache: building %s variant of graph %d for schedule step %d", kind, self.graph_id,
                             key)
                    variant = build_variant(self.gm, self.plan, self.config, kind, key)
                    if self.inplace:
                        variant = make_inplace(variant)
                    self._state_keys |= {e.key for e in variant.extra_inputs if e.kind == "state"}
                    self._more[(kind, key)] = variant
        return variant, key

    def _lowered(self, kind: StepKind, key: int, variant: Variant, args) -> Callable:
        fn = self._fns.get((kind, key))
        if fn is None:
            with self._lock:
                fn = self._fns.get((kind, key))
                if fn is None:
                    log.info("fxcache: lowering %s variant of graph %d with %s", kind, self.graph_id, self.lowering)
                    fn = get_lowering(self.lowering)(variant.gm, args, mode=self.mode, options=self.options)
                    self._fns[(kind, key)] = fn
        return fn

    def pooled_bytes(self) -> int:
        """Bytes of in-place buffers kept for the next request (`keep_caches`)."""
        with self._lock:
            return sum(b.numel() * b.element_size() for pool in self._pool.values() for b in pool)

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

    def __call__(self, *args):
        if self.example_args is None and getattr(self.backend, "capture_args", False):
            self.example_args = args
        state, request, key = self._state(args)
        pos, t = self._position(state, args)
        if pos.new and pos.step == 0 and request.implicit:
            self._end_other_shapes(request, state, t)
        for slot in pos.dropped:
            state.drop(slot)
        if pos.new:
            state.restart(pos.branch)
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
        step, branch = pos.step, pos.branch
        kind = self._kind(state, step, branch)
        variant, key = self._variant(kind, step)
        device = args[self.plan.timestep_index].device
        extra = self._extra_inputs(state, variant, kind, step, branch, device)
        full_args = list(args) + extra
        fn = self._lowered(kind, key, variant, full_args)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            result = fn(*full_args)
        except BaseException:  # a failed call leaves this branch's caches unknown: it starts over next time
            state.tracker.forget(branch)
            state.drop(branch)
            raise
        n = variant.num_outputs
        if self.inplace:
            valid = state.valid.setdefault(branch, set())
            valid.update(variant.writes)
            if kind is StepKind.FULL:  # "state" inputs (ToCa staleness) restart with every FULL step
                valid.difference_update(self._state_keys)
        else:
            if kind is StepKind.FULL:  # "state" inputs (ToCa staleness) restart with every FULL step
                for k in self._state_keys:
                    state.discard(branch, k)
            for k, value in zip(variant.extra_outputs, result[n:]):
                state.put(branch, k, value)
        self.scope.record(
            graph=self.graph_id, call=next(_CALLS), step=step, branch=branch, kind=kind.value,
            tokens=variant.tokens, flops=variant.flops, t=t, cached=True, request=state.request_id,
            cache_bytes=state.held,
        )
        outs = result[:n]
        if self.cudagraphs:  # a later replay overwrites cudagraph outputs (the other CFG branch, the next step)
            outs = [o.clone() for o in outs]
        return outs[0] if variant.single_output else tuple(outs)


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
        if self._fn is None:
            with self._lock:
                if self._fn is None:
                    self._fn = get_lowering(self.lowering)(self.gm, list(args), mode=self.mode, options=self.options)
        result = self._fn(*args)
        self.scope.record(graph=self.graph_id, call=next(_CALLS), step=-1, branch=0, kind=StepKind.FULL.value,
                          tokens=None, flops=None, t=None, cached=False, request=self.scope.current().id,
                          cache_bytes=0)
        return tuple(result) if isinstance(result, list) else result
