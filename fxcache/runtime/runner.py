"""The callable the backend hands back to Dynamo: picks a variant per call, holds caches per CFG branch."""

from __future__ import annotations

import itertools
import logging
from typing import Callable

import torch

from ..config import CacheConfig, StepKind
from ..variants import Variant
from .lowering import get_lowering
from .step import StepTracker
from .tokens import random_token_indices

log = logging.getLogger("fxcache")
_CALLS = itertools.count()


class Runner:
    """One per Dynamo graph (per input shape). Never traced by Dynamo, so nothing here recompiles.

    Per call: read t -> (step, branch) -> step kind from the method (FULL while the branch lacks caches) ->
    lower that variant on first use -> run it with indices and caches appended -> keep the caches it wrote.
    """

    def __init__(self, *, backend, graph_id: int, plan, config: CacheConfig, variants: dict[StepKind, Variant],
                 lowering: str, mode=None, options=None):
        self.backend = backend
        self.graph_id = graph_id
        self.plan = plan
        self.config = config
        self.variants = variants
        self.lowering = lowering
        self.mode, self.options = mode, options
        self.tracker = StepTracker()
        self.caches: dict[int, dict[str, torch.Tensor]] = {}
        self._fns: dict[StepKind, Callable] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self._indices_step = -1
        self._generator: torch.Generator | None = None
        partial = variants.get(StepKind.PARTIAL)
        self._idx_specs = [e for e in partial.extra_inputs if e.kind == "idx"] if partial else []

    # -- state -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget caches, token choices and the step position (the next call starts a generation)."""
        self.tracker.reset()
        self.caches.clear()
        self._indices.clear()
        self._indices_step = -1

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.caches.values() for t in c.values())

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
        needed = [e.key for e in self.variants[kind].extra_inputs if e.kind == "cache"]
        have = self.caches.get(branch, {})
        return kind if all(k in have for k in needed) else StepKind.FULL

    def _token_indices(self, step: int, device) -> dict[str, torch.Tensor]:
        if self._indices_step != step:  # one draw per step, shared by every CFG branch of that step
            if self._generator is None or self._generator.device != torch.device(device):
                self._generator = torch.Generator(device=device)
                self._generator.manual_seed(getattr(self.config, "seed", 0))
            self._indices = {
                e.key: random_token_indices(e.shape[0], int(e.key.split(":")[1]), e.shape[1], self._generator, device)
                for e in self._idx_specs
            }
            self._indices_step = step
        return self._indices

    def _lowered(self, kind: StepKind, args) -> Callable:
        fn = self._fns.get(kind)
        if fn is None:
            log.info("fxcache: lowering %s variant of graph %d with %s", kind, self.graph_id, self.lowering)
            fn = get_lowering(self.lowering)(self.variants[kind].gm, args, mode=self.mode, options=self.options)
            self._fns[kind] = fn
        return fn

    def __call__(self, *args):
        step, branch, new, t = self._position(args)
        if new:
            self.caches.clear()
            self._indices_step = -1
            if self._generator is not None:
                self._generator.manual_seed(getattr(self.config, "seed", 0))
        kind = self._kind(step, branch)
        variant = self.variants[kind]
        state = self.caches.setdefault(branch, {})
        extra = []
        if variant.extra_inputs:
            device = args[self.plan.timestep_index].device
            indices = self._token_indices(step, device) if kind is StepKind.PARTIAL else {}
            extra = [indices[e.key] if e.kind == "idx" else state[e.key] for e in variant.extra_inputs]
        full_args = list(args) + extra
        result = self._lowered(kind, full_args)(*full_args)
        n = variant.num_outputs
        for key, value in zip(variant.extra_outputs, result[n:]):
            state[key] = value
        self.backend._record(
            graph=self.graph_id, call=next(_CALLS), step=step, branch=branch, kind=kind.value,
            tokens=variant.tokens, flops=variant.flops, t=t, cached=True,
        )
        outs = result[:n]
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
