"""An independent eager reference of the caching maths, built from forward hooks on the real modules.

It shares no code with the graph passes: attention modules return their cached output, token-wise modules run on
all tokens and keep only the chosen rows (`cache.index_copy(1, idx, out.index_select(1, idx))`), and on SKIP steps
the last block returns its cached output. Token indices are drawn exactly as the runner documents it: one
generator per generation seeded with `config.seed`, one `random_token_indices` draw per token count (in order of
first execution) on each PARTIAL step, shared by the CFG branches of a step.
"""

from __future__ import annotations

import torch

from ..config import CacheConfig, StepKind
from ..runtime.tokens import random_token_indices


class HookedReference:
    """Run `model` with caching done by hooks. `attention` / `token_wise` / `last_block`: module paths."""

    def __init__(self, model: torch.nn.Module, config: CacheConfig, *, attention: list[str],
                 token_wise: list[str], last_block: str):
        self.model, self.config = model, config
        mods = dict(model.named_modules())
        self.attention, self.token_wise, self.last_block = attention, token_wise, last_block
        self.kind: StepKind = StepKind.FULL
        self.branch = 0
        self.caches: dict[int, dict[str, object]] = {}
        self.order: list[str] = []  # token-wise units in order of first execution
        self.tokens: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(config.seed if hasattr(config, "seed") else 0)
        self.block_calls = 0
        self._handles = []
        for name in attention:
            self._handles.append(mods[name].register_forward_hook(self._attention_hook(name)))
        for name in token_wise:
            self._handles.append(mods[name].register_forward_hook(self._token_hook(name)))
        self._handles.append(mods[last_block].register_forward_hook(self._last_hook))
        for name, m in mods.items():
            parts = name.split(".")
            if len(parts) == 2 and parts[1].isdigit() and "blocks" in parts[0]:
                self._handles.append(m.register_forward_pre_hook(self._count_block))

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _count_block(self, module, args):
        self.block_calls += 1

    def _state(self) -> dict:
        return self.caches.setdefault(self.branch, {})

    def _attention_hook(self, name):
        def hook(module, args, out):
            state = self._state()
            if self.kind is StepKind.FULL:
                state[name] = out
                return out
            return state[name]
        return hook

    def _token_hook(self, name):
        def hook(module, args, out):
            state = self._state()
            if self.kind is StepKind.FULL:
                if name not in self.order:
                    self.order.append(name)
                    self.tokens[name] = out.shape[1]
                state[name] = out
                return out
            if self.kind is StepKind.PARTIAL:
                idx = self.indices[name]
                new = state[name].index_copy(1, idx, out.index_select(1, idx))
                state[name] = new
                return new
            return state[name]
        return hook

    def _last_hook(self, module, args, out):
        state = self._state()
        if self.kind is StepKind.SKIP:
            return state["final"]
        state["final"] = out
        return out

    def new_generation(self) -> None:
        self.caches.clear()
        self.generator.manual_seed(self.config.seed if hasattr(self.config, "seed") else 0)

    def draw(self) -> None:
        """Token indices of one PARTIAL step: one (units, k) draw per token count, in first-execution order."""
        groups: dict[int, list[str]] = {}
        for name in self.order:
            groups.setdefault(self.tokens[name], []).append(name)
        self.indices = {}
        for tokens, names in groups.items():
            rows = random_token_indices(len(names), tokens, self.config.tokens_for(tokens), self.generator, "cpu")
            for i, name in enumerate(names):
                self.indices[name] = rows[i]

    def __call__(self, step: int, branch: int, *args, **kwargs):
        """One model call at (step, branch); FULL while the branch has no cache, as the runner does."""
        if step == 0 and branch == 0:
            self.new_generation()
        self.branch = branch
        kind = self.config.step_kind(step)
        if branch not in self.caches or not self.caches[branch]:
            kind = StepKind.FULL
        if kind is StepKind.PARTIAL and branch == 0:
            self.draw()
        self.kind = kind
        with torch.no_grad():
            return self.model(*args, **kwargs)
