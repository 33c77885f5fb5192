"""Where a branch's cache entries live between steps: one interface, two strategies.

`FunctionalStore` keeps the tensors the variants return. `InplaceStore` keeps persistent buffers that the variants
update in place (CUDA graphs record addresses, so caches and per-step inputs must stay where they are). Both give
a variant the same values: an entry the branch has not written in its current generation reads as zeros (a FULL
step's missing old Taylor factors, fresh staleness), and `written(branch)` is what the branch has written, so a
step whose inputs are missing runs FULL.
"""

from __future__ import annotations

import torch

from ..graph_io import GraphValue, Key, Role


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CacheStore:
    """The cache entries of one (request, graph, model), per CFG branch."""

    def __init__(self):
        self.held = 0  # bytes of caches and buffers held
        self.state_keys: set[Key] = set()  # entries written as Role.STATE: a FULL step restarts them

    def written(self, branch: int):
        raise NotImplementedError

    def inputs(self, branch: int, values: list[GraphValue], given: list, device) -> list:
        """The call's extra inputs: `given` holds the per-step values, None for the cache entries (persistent
        roles) the store supplies."""
        raise NotImplementedError

    def keep(self, branch: int, variant, results: list, full: bool) -> None:
        """After a call: what the variant wrote (`results`: its outputs after the model's). A FULL step restarts
        the branch's STATE entries (ToCa staleness), which it does not write."""
        raise NotImplementedError

    def restart(self, branch: int) -> None:
        """The branch starts a new generation: nothing it wrote may be read again."""
        raise NotImplementedError

    def drop(self, branch: int) -> None:
        """The branch is gone: free what it holds."""
        raise NotImplementedError

    def release(self) -> None:
        """The request ended: free everything."""
        raise NotImplementedError


class FunctionalStore(CacheStore):
    def __init__(self):
        super().__init__()
        self.caches: dict[int, dict[Key, torch.Tensor]] = {}

    def written(self, branch: int):
        return self.caches.get(branch, {}).keys()

    def inputs(self, branch, values, given, device) -> list:
        store = self.caches.get(branch, {})
        out = []
        for v, value in zip(values, given):
            if value is None:  # a cache entry
                value = store.get(v.key)
                if value is None:
                    value = torch.zeros(v.shape, dtype=v.dtype, device=device)
            out.append(value)
        return out

    def keep(self, branch, variant, results, full) -> None:
        store = self.caches.setdefault(branch, {})
        if full:
            for key in self.state_keys:
                old = store.pop(key, None)
                if old is not None:
                    self.held -= nbytes(old)
        for v, value in zip(variant.outputs, results):
            if v.role.passed:  # a probe's carried values and signal live for one call
                continue
            if v.role is Role.STATE:
                self.state_keys.add(v.key)
            if store.get(v.key) is None:
                self.held += nbytes(value)
            store[v.key] = value

    def restart(self, branch) -> None:
        for value in self.caches.pop(branch, {}).values():
            self.held -= nbytes(value)

    def drop(self, branch) -> None:
        self.restart(branch)

    def release(self) -> None:
        for branch in list(self.caches):
            self.drop(branch)


class InplaceStore(CacheStore):
    """Persistent buffers per branch and key, and per-step inputs copied into persistent buffers of their own.
    Buffers come from and go back to the runner's pool (`take_buffer` / `give_back_buffers`)."""

    def __init__(self, runner):
        super().__init__()
        self.runner = runner
        self.buffers: dict[int, dict[Key, torch.Tensor]] = {}
        self.valid: dict[int, set[Key]] = {}  # keys written in the branch's current generation
        self.step_buffers: dict[Key, torch.Tensor] = {}

    def written(self, branch: int):
        return self.valid.get(branch, set())

    def _buffer(self, branch: int, v: GraphValue, device) -> torch.Tensor:
        store = self.buffers.setdefault(branch, {})
        buf = store.get(v.key)
        if buf is None:
            buf = store[v.key] = self.runner.take_buffer(("cache", v.key), v.shape, v.dtype, device)
            self.held += nbytes(buf)
        elif v.role is not Role.BUFFER and v.key not in self.valid.get(branch, ()):
            buf.zero_()  # this generation has not written it: "zeros when absent" (BUFFERs are only written)
        return buf

    def inputs(self, branch, values, given, device) -> list:
        out = []
        for v, value in zip(values, given):
            if value is None:  # a cache entry
                out.append(self._buffer(branch, v, device))
                continue
            buf = self.step_buffers.get(v.key)
            if buf is None or buf.shape != value.shape:
                buf = self.step_buffers[v.key] = self.runner.take_buffer(("step", v.key), value.shape, value.dtype,
                                                                         value.device)
            buf.copy_(value)
            out.append(buf)
        return out

    def keep(self, branch, variant, results, full) -> None:
        valid = self.valid.setdefault(branch, set())
        valid.update(v.key for v in variant.writes)
        self.state_keys.update(v.key for v in variant.writes if v.role is Role.STATE)
        if full:
            valid.difference_update(self.state_keys)

    def restart(self, branch) -> None:
        self.valid.pop(branch, None)

    def drop(self, branch) -> None:
        self.restart(branch)
        buffers = self.buffers.pop(branch, None)
        if buffers:
            self.held -= sum(nbytes(b) for b in buffers.values())
            self.runner.give_back_buffers({("cache", k): b for k, b in buffers.items()})

    def release(self) -> None:
        for branch in list(self.buffers) + list(self.valid):
            self.drop(branch)
        if self.step_buffers:
            self.runner.give_back_buffers({("step", k): v for k, v in self.step_buffers.items()})
        self.step_buffers.clear()
