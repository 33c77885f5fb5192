"""The state of one graph in one request for one model: step positions, caches per CFG branch, Taylor bookkeeping.

Caches are kept one of two ways: as the tensors the variants return (functional), or in persistent buffers the
variants update in place (CUDA graphs need static addresses). Both give the same values; `written(branch)` is
what the current generation of a branch has written, so a step whose inputs are missing runs FULL.
"""

from __future__ import annotations

import weakref

import torch

from .step import StepTracker, TimeDirection
from .taylor import TaylorState


class GraphState:
    def __init__(self, runner, model=None, request_id: int = -1, explicit: bool = False):
        self.runner = runner
        self.request_id = request_id
        self.model_ref = weakref.ref(model) if model is not None else None
        # each request learns the time direction itself, from the configured option: a request's result never
        # depends on the requests before it (the same request twice gives the same output)
        self.tracker = StepTracker(TimeDirection.of(runner.scope.time_direction), runner.scope.max_branches,
                                   continue_unmatched=explicit)
        self.caches: dict[int, dict[str, torch.Tensor]] = {}  # functional: branch -> key -> tensor
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}  # in place: branch -> key -> persistent buffer
        self.valid: dict[int, set[str]] = {}  # in place: branch -> keys written in this generation
        self.taylor: dict[int, TaylorState] = {}
        self.step_buffers: dict[str, torch.Tensor] = {}  # in place: persistent per-step inputs
        self.draws: dict[str, torch.Tensor] = {}  # the current step's random inputs, shared by the branches
        self.draws_step = -1
        self.held = 0  # bytes of caches and buffers held
        self.unmatched = 0  # calls that continued no branch

    def put(self, branch: int, key: str, value: torch.Tensor) -> None:
        """Functional mode: keep a cache entry the variant returned."""
        store = self.caches.setdefault(branch, {})
        old = store.get(key)
        if old is None:
            self.held += _nbytes(value)
        store[key] = value

    def discard(self, branch: int, key: str) -> None:
        value = self.caches.get(branch, {}).pop(key, None)
        if value is not None:
            self.held -= _nbytes(value)

    def buffer(self, branch: int, key: str, shape, dtype, device) -> tuple[torch.Tensor, bool]:
        """In-place mode: the persistent buffer of a cache entry (made, zeroed, on first use); (buffer, is_new)."""
        store = self.buffers.setdefault(branch, {})
        buf = store.get(key)
        if buf is not None:
            return buf, False
        buf = self.runner.take_buffer(key, shape, dtype, device)
        store[key] = buf
        self.held += _nbytes(buf)
        return buf, True

    def belongs_to(self, model) -> bool:
        return self.model_ref is None or self.model_ref() is model

    def written(self, branch: int):
        """The cache keys this branch has written in its current generation."""
        if self.runner.inplace:
            return self.valid.get(branch, set())
        return self.caches.get(branch, {}).keys()

    def restart(self, branch: int) -> None:
        """The branch starts a new generation: nothing it wrote may be read again."""
        for value in self.caches.pop(branch, {}).values():
            self.held -= _nbytes(value)
        self.valid.pop(branch, None)
        self.taylor.pop(branch, None)

    def drop(self, branch: int) -> None:
        """The branch is gone: free its caches too."""
        self.restart(branch)
        buffers = self.buffers.pop(branch, None)
        if buffers:
            self.held -= sum(_nbytes(b) for b in buffers.values())
            self.runner.give_back_buffers(buffers)

    def release(self) -> None:
        """The request ended: free everything (in-place buffers go back to the runner's pool if it keeps them)."""
        for branch in list(self.buffers) + list(self.caches):
            self.drop(branch)
        self.caches.clear()
        self.valid.clear()
        self.taylor.clear()
        if self.step_buffers:
            self.runner.give_back_buffers({f"step:{k}": v for k, v in self.step_buffers.items()})
        self.step_buffers.clear()
        self.draws.clear()
        self.draws_step = -1
        self.tracker.reset()

    def cache_bytes(self) -> int:
        return self.held


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
