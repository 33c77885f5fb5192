"""The callable the backend hands back to Dynamo: picks a variant per call, holds caches per CFG branch."""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch

from ..config import CacheConfig, StepKind
from ..passes.inplace_caches import CACHE_KINDS, make_inplace
from ..variants import Variant, build_variant, schedule_key
from .lowering import get_lowering
from .step import StepTracker
from .taylor import TaylorState
from .tokens import random_token_indices

log = logging.getLogger("fxcache")
_CALLS = itertools.count()


class Runner:
    """One per Dynamo graph (per input shape). Never traced by Dynamo, so nothing here recompiles.

    Per call: read t -> (step, branch) -> step kind from the method (FULL while the branch lacks caches) ->
    lower that variant on first use -> run it with indices and caches appended -> keep the caches it wrote.

    `inplace`: caches live in persistent buffers per CFG branch that the variants update in place (and per-step
    inputs in persistent buffers too), as CUDA graphs need; None: on exactly when CUDA graphs are
    (`mode="reduce-overhead"` or `triton.cudagraphs`).
    """

    def __init__(self, *, backend, graph_id: int, plan, config: CacheConfig, variants: dict[StepKind, Variant],
                 lowering: str, mode=None, options=None, gm=None, inplace: bool | None = None):
        self.backend = backend
        self.graph_id = graph_id
        self.plan = plan
        self.config = config
        self.variants = variants
        self.lowering = lowering
        self.mode, self.options = mode, options
        self.tracker = StepTracker()
        self.caches: dict[int, dict[str, torch.Tensor]] = {}
        self.taylor: dict[int, TaylorState] = {}
        self.gm = gm  # the Dynamo graph, for variants built on first use (ToCa k tables that change per step)
        self.cudagraphs = mode == "reduce-overhead" or bool((options or {}).get("triton.cudagraphs"))
        self.inplace = self.cudagraphs if inplace is None else bool(inplace)
        if self.inplace:
            variants = {kind: make_inplace(v) for kind, v in variants.items()}
            self.variants = variants
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}  # in-place: branch -> key -> persistent cache buffer
        self.valid: dict[int, set[str]] = {}  # in-place: branch -> keys written in this generation
        self.step_buffers: dict[str, torch.Tensor] = {}  # in-place: persistent per-step inputs (indices, scalars)
        self._first_key = schedule_key(config, config.warmup)
        self._more: dict[tuple[StepKind, int], Variant] = {}
        self._fns: dict[tuple[StepKind, int], Callable] = {}
        self._state_keys = {e.key for v in variants.values() for e in v.extra_inputs if e.kind == "state"}
        self._indices: dict[str, torch.Tensor] = {}
        self._indices_step = -1
        self._generator: torch.Generator | None = None
        self.example_args: tuple | None = None  # the first call's arguments, kept only for export

    # -- state -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget caches, token choices and the step position (the next call starts a generation)."""
        self.tracker.reset()
        self.caches.clear()
        self.buffers.clear()
        self.valid.clear()
        self.step_buffers.clear()
        self.taylor.clear()
        self._indices.clear()
        self._indices_step = -1

    def cache_bytes(self) -> int:
        held = list(self.caches.values()) + list(self.buffers.values())
        return sum(t.numel() * t.element_size() for c in held for t in c.values())

    # -- dispatch ----------------------------------------------------------------------------------------
    def _position(self, args) -> tuple[int, int, bool, float]:
        t = float(args[self.plan.timestep_index].reshape(-1)[0])
        override = self.backend.override
        if override is not None:
            new = self.tracker.force(override[0], override[1], t)
            return override[0], override[1], new, t
        step, branch, new = self.tracker.advance(t)
        return step, branch, new, t

    def _kind(self, step: int, branch: int) -> StepKind:
        kind = self.config.step_kind(step)
        if kind is StepKind.FULL:
            return kind
        needed = [e.key for e in self.variants[kind].extra_inputs if e.kind == "cache"]
        have = self._written(branch)
        return kind if all(k in have for k in needed) else StepKind.FULL

    def _written(self, branch: int):
        """The cache keys this branch has written in the current generation."""
        return self.valid.get(branch, set()) if self.inplace else self.caches.get(branch, {}).keys()

    def _extra_inputs(self, variant: Variant, kind: StepKind, step: int, branch: int, device) -> list:
        state = self.caches.setdefault(branch, {})
        taylor = None
        if self.config.taylor_order is not None:
            taylor = self.taylor.setdefault(branch, TaylorState(self.config.taylor_order, self.config.warmup))
        per_step = [e for e in variant.extra_inputs if e.kind in ("idx", "rand")]
        indices = self._token_indices(step, per_step, device) if per_step else {}
        # a FULL step anchors the Taylor deltas even when the variant takes no `taylor_diff` (order 0)
        diff = taylor.full_inputs(step, device) if kind is StepKind.FULL and taylor is not None else None
        extra = []
        for e in variant.extra_inputs:
            if e.kind in ("idx", "rand"):  # one draw per step, shared by the CFG branches
                extra.append(indices[e.key])
            elif e.kind == "buffer" or (self.inplace and e.kind in CACHE_KINDS):  # _into_buffers supplies these
                extra.append(None)
            elif e.kind in ("cache", "state"):
                value = state.get(e.key)
                if value is None:  # FULL without caches (old Taylor factors, scaled by 0) or fresh staleness
                    value = torch.zeros(e.shape, dtype=e.dtype, device=device)
                extra.append(value)
            elif e.kind == "diff":
                extra.append(diff)
            elif e.kind == "coef":
                extra.append(taylor.forecast_inputs(step, device))
            elif e.kind == "kinit":
                tokens = int(e.key.split(":")[1])
                perm = torch.randperm(tokens, generator=self._rng(device), device=device)
                extra.append(perm[: e.shape[0]])
            elif e.kind == "warm":
                warm = any(k.startswith("clustercentroids:") for k in self._written(branch))
                extra.append(torch.full(e.shape, 1.0 if warm else 0.0, dtype=e.dtype, device=device))
            else:  # pragma: no cover - build_variants only emits the kinds above
                raise AssertionError(e.kind)
        return self._into_buffers(variant, extra, branch, device) if self.inplace else extra

    def _into_buffers(self, variant, values: list, branch: int, device) -> list:
        """In-place mode: caches are the branch's persistent buffers (zeroed where this generation has not written
        them: the 'zeros when absent' rule), per-step values are copied into persistent buffers of their own."""
        buffers = self.buffers.setdefault(branch, {})
        valid = self.valid.setdefault(branch, set())
        out = []
        for e, value in zip(variant.extra_inputs, values):
            if e.kind in CACHE_KINDS or e.kind == "buffer":
                buf = buffers.get(e.key)
                if buf is None:
                    buf = buffers[e.key] = torch.zeros(e.shape, dtype=e.dtype, device=device)
                    torch._dynamo.mark_static_address(buf)
                elif e.key not in valid and e.kind != "buffer":
                    buf.zero_()
            else:
                buf = self.step_buffers.get(e.key)
                if buf is None or buf.shape != value.shape:
                    buf = self.step_buffers[e.key] = torch.empty_like(value)
                    torch._dynamo.mark_static_address(buf)
                buf.copy_(value)
            out.append(buf)
        return out

    def _rng(self, device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(getattr(self.config, "seed", 0))
        return self._generator

    def _token_indices(self, step: int, specs, device) -> dict[str, torch.Tensor]:
        """Per-step random inputs, drawn once per step in `specs` order and shared by every CFG branch."""
        if self._indices_step != step:
            g = self._rng(device)
            self._indices = {}
            for e in specs:
                if e.kind == "idx":
                    value = random_token_indices(e.shape[0], int(e.key.split(":")[1]), e.shape[1], g, device)
                else:
                    value = torch.rand(e.shape, generator=g, device=device)
                self._indices[e.key] = value
            self._indices_step = step
        return self._indices

    def _variant(self, kind: StepKind, step: int) -> tuple[Variant, int]:
        key = schedule_key(self.config, step) if kind is StepKind.PARTIAL else 0
        if kind is not StepKind.PARTIAL or key == self._first_key:
            return self.variants[kind], key
        variant = self._more.get((kind, key))
        if variant is None:
            log.info("fxcache: building %s variant of graph %d for schedule step %d", kind, self.graph_id, key)
            variant = build_variant(self.gm, self.plan, self.config, kind, key)
            if self.inplace:
                variant = make_inplace(variant)
            self._more[(kind, key)] = variant
            self._state_keys |= {e.key for e in variant.extra_inputs if e.kind == "state"}
        return variant, key

    def _lowered(self, kind: StepKind, key: int, variant: Variant, args) -> Callable:
        fn = self._fns.get((kind, key))
        if fn is None:
            log.info("fxcache: lowering %s variant of graph %d with %s", kind, self.graph_id, self.lowering)
            fn = get_lowering(self.lowering)(variant.gm, args, mode=self.mode, options=self.options)
            self._fns[(kind, key)] = fn
        return fn

    def __call__(self, *args):
        if self.example_args is None and getattr(self.backend, "capture_args", False):
            self.example_args = args
        step, branch, new, t = self._position(args)
        if new:
            self.caches.clear()
            self.valid.clear()
            self.taylor.clear()
            self._indices_step = -1
            if self._generator is not None:
                self._generator.manual_seed(getattr(self.config, "seed", 0))
        kind = self._kind(step, branch)
        variant, key = self._variant(kind, step)
        state = self.caches.setdefault(branch, {})
        extra = self._extra_inputs(variant, kind, step, branch, args[self.plan.timestep_index].device)
        full_args = list(args) + extra
        fn = self._lowered(kind, key, variant, full_args)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        result = fn(*full_args)
        n = variant.num_outputs
        if self.inplace:
            valid = self.valid.setdefault(branch, set())
            valid.update(variant.writes)
            if kind is StepKind.FULL:  # "state" inputs (ToCa staleness) restart with every FULL step
                valid.difference_update(self._state_keys)
        else:
            if kind is StepKind.FULL:  # "state" inputs (ToCa staleness) restart with every FULL step
                for k in self._state_keys & state.keys():
                    del state[k]
            for key, value in zip(variant.extra_outputs, result[n:]):
                state[key] = value
        self.backend._record(
            graph=self.graph_id, call=next(_CALLS), step=step, branch=branch, kind=kind.value,
            tokens=variant.tokens, flops=variant.flops, t=t, cached=True,
        )
        outs = result[:n]
        if self.cudagraphs:  # a later replay overwrites cudagraph outputs (the other CFG branch, the next step)
            outs = [o.clone() for o in outs]
        return outs[0] if variant.single_output else tuple(outs)


class UncachedRunner:
    """A graph fxcache does not cache: lowered as it is, on first call."""

    def __init__(self, *, backend, graph_id: int, gm, lowering: str, mode=None, options=None, reason: str = ""):
        self.backend, self.graph_id, self.gm = backend, graph_id, gm
        self.lowering, self.mode, self.options, self.reason = lowering, mode, options, reason
        self._fn = None

    def reset(self) -> None:
        pass

    def cache_bytes(self) -> int:
        return 0

    def __call__(self, *args):
        if self._fn is None:
            self._fn = get_lowering(self.lowering)(self.gm, list(args), mode=self.mode, options=self.options)
        result = self._fn(*args)
        self.backend._record(graph=self.graph_id, call=next(_CALLS), step=-1, branch=0, kind=StepKind.FULL.value,
                             tokens=None, flops=None, t=None, cached=False)
        return tuple(result) if isinstance(result, list) else result
