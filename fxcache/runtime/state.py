"""The state of one graph in one request for one model: step positions, the branches' cache store, Taylor
bookkeeping, the current step's draws."""

from __future__ import annotations

import weakref

from .step_count import KEY as STEPS_KEY
from .step import StepTracker, TimeDirection
from .store import CacheStore, FunctionalStore, InplaceStore
from .taylor import TaylorState


class GraphState:
    def __init__(self, runner, model=None, request_id: int = -1, explicit: bool = False):
        self.runner = runner
        self.request_id = request_id
        self.model_ref = weakref.ref(model) if model is not None else None
        self.module_ref = None  # the model's module, once a graph of a graph-broken model needed it (`Runner`)
        # each request learns the time direction itself, from the configured option: a request's result never
        # depends on the requests before it (the same request twice gives the same output)
        self.tracker = StepTracker(TimeDirection.of(runner.scope.time_direction), runner.scope.max_branches,
                                   continue_unmatched=explicit)
        self.store: CacheStore = InplaceStore(runner) if runner.inplace else FunctionalStore()
        self.taylor: dict[int, TaylorState] = {}
        self.rules: dict = {}  # per branch: the state of a run-time rule (methods that decide per call)
        self.foca: dict = {}  # per branch: the bookkeeping of a FoCa forecast
        self.step_signal: tuple | None = None  # (step, branch, signal) of the last signal read (cfg="shared")
        self.draws: dict = {}  # the current step's random inputs, shared by the branches
        self.draws_step = -1
        self.unmatched = 0  # calls that continued no branch
        self.steps_run = 0  # 1 + the highest step this request ran (a schedule written for num_steps checks it)

    @property
    def held(self) -> int:
        return self.store.held

    def belongs_to(self, model) -> bool:
        return self.model_ref is None or self.model_ref() is model

    def written(self, branch: int):
        """The cache keys this branch has written in its current generation."""
        return self.store.written(branch)

    def restart(self, branch: int) -> None:
        """The branch starts a new generation: nothing it wrote may be read again."""
        self.store.restart(branch)
        self.taylor.pop(branch, None)
        self.rules.pop(branch, None)
        self.foca.pop(branch, None)

    def drop(self, branch: int) -> None:
        """The branch is gone: free its caches too."""
        self.restart(branch)
        self.store.drop(branch)

    def release(self) -> None:
        """The request ended: free everything (in-place buffers go back to the runner's pool if it keeps them)."""
        self._check_length()
        self.store.release()
        self.taylor.clear()
        self.rules.clear()
        self.foca.clear()
        self.step_signal = None
        self.draws.clear()
        self.draws_step = -1
        self.tracker.reset()

    def _check_length(self) -> None:
        """A schedule written for num_steps (a preset's) that a request ended before reaching: its table was cut
        short (no final FULL step; partial steps meant for another progress), so say so once per graph."""
        planned = getattr(self.runner, "_planned_steps", None)
        ran, self.steps_run = self.steps_run, 0
        if planned is None or not 0 < ran < planned or self.runner.scope.has_warned(STEPS_KEY):
            return  # an enabled pipeline said so before the first step
        self.runner.backend._warn_once(
            f"fxcache: graph {self.runner.graph_id}: a request ended after {ran} steps, but the config's schedule "
            f"is written for num_steps={planned} (presets assume one): it ran the first {ran} steps of that "
            f"table. Pass your sampler's step count as num_steps (ignore this for an interrupted request)",
            key=f"short-{self.runner.graph_id}")

    def cache_bytes(self) -> int:
        return self.store.held
