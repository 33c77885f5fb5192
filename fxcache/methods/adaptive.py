"""What the methods that decide at run time share: the seam between their graphs and their rule.

A call of such a method runs two static graphs with one host read between them. The *probe* computes the call up to
its signal (FBCache / DBCache: the first blocks; TeaCache: block 0's modulated input) and returns the signal and
every value the rest of the call reads; the runner reads the signal, the method's `Rule` decides, and one of two
*tail* graphs finishes the call from the carried values: *compute* (every remaining block; it writes the residual
of the blocks a cached call skips) or *cached* (those blocks replaced by that residual). Each graph stays static, so
each can be lowered, exported or captured as a CUDA graph on its own; the decision is host code between them, which
the compiled runner, the exporter and the export session share.

Why two graphs and not `torch.cond` in one: a decision also drives host-side bookkeeping that must be exact (skip
limits, accumulators, per-row rules, what `stats` records), which needs the value on the host anyway; CUDA graphs
capture a data-dependent branch only through conditional nodes, which Inductor does not emit; ONNX `If` and
TensorRT conditionals are not what deployments run. The cost is one device-to-host read of a (1 + batch,)-float
signal per call, after a fraction of the model (benchmarks/adaptive_seam.py measures it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from ..analysis import GraphPlan
from ..analysis.cuts import pair_streams, probe_of, run_escapes, streams_at
from ..config import StepKind
from ..errors import ConfigError, UnsupportedGraphError
from ..step_plan import PROBE, TAIL, BlockKind, BlockStep, GraphView, StepPlan
from .recipe import Recipe

#: how a batch decides: "rows", a call reuses only when every row's signal allows it (one prompt's change never
#: makes another prompt reuse stale features); "mean", on the signal of the whole batch, as the peers do
REDUCTIONS = ("rows", "mean")
#: how CFG branches decide: "separate", each on its own signal and state; "shared", the later branches of a step
#: take the signal of the step's first branch (cache-dit's `cfg_diff_compute_separate=False`) through their own
#: rule and state, so a step's branches reuse together unless a branch's own limits or caches say otherwise
CFG_MODES = ("separate", "shared")


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a rule decided for one call: `compute`, the signal it read (None when it read none) and the value it
    compared with the threshold (an accumulated one for TeaCache / MagCache)."""

    compute: bool
    signal: float | None = None
    accumulated: float | None = None


class Rule:
    """A method's run-time decision. One state per CFG branch and request (`new_state`), dropped when the branch
    starts over. `decide` sees the call's step, the signal the probe returned ([whole batch, row 0, row 1, ...],
    None for a method without a probe) and whether the branch holds what a cached call reads."""

    def new_state(self) -> Any:
        return None

    def decide(self, state: Any, step: int, signal: list[float] | None, can_reuse: bool) -> Decision:
        raise NotImplementedError


def reduce_signal(signal: list[float], how: str, compare) -> tuple[float, bool]:
    """(the signal recorded, whether the threshold test passes): `compare(value)` on the whole batch's signal
    ("mean"), or on every row's ("rows", recorded as the largest row's)."""
    if how == "mean" or len(signal) == 2:  # one row: the batch's signal is the row's
        value = signal[0]
        return value, compare(value)
    rows = signal[1:]
    value = max(rows, key=lambda v: v if math.isfinite(v) else math.inf)
    return value, all(compare(v) for v in rows)


class DecidedRecipe(Recipe):
    """A recipe whose calls run a probe, a decision, then a compute or a cached tail. Subclasses say where the
    probe ends and which blocks a cached call replaces by their residual (`run`)."""

    per_piece = False
    per_piece_why = ("it decides from a signal computed before its skipped blocks and replaces a run of blocks by "
                     "their residual, which must lie in one graph")
    block_kinds = frozenset({BlockKind.RESIDUAL, BlockKind.SKIPPED})
    decides: ClassVar[bool] = True

    # -- what subclasses say ----------------------------------------------------------------------------------
    def probe_blocks(self, blocks: int) -> int:
        """How many leading blocks the probe runs."""
        raise NotImplementedError

    def run(self, blocks: int) -> tuple[int, int]:
        """[start, end): the blocks a cached call replaces by their residual."""
        raise NotImplementedError

    def rule(self) -> Rule:
        raise NotImplementedError

    def probe_targets(self, graph: GraphPlan) -> list:
        """The nodes the probe computes beyond the streams at its cut (the signal's inputs)."""
        return []

    def probe_signal(self, b, graph: GraphPlan, layout) -> None:
        """Add the signal (and what the probe writes or carries for it) to the probe graph."""
        raise NotImplementedError

    def compute_extras(self, b, graph: GraphPlan, layout) -> None:
        """What a compute tail writes beyond the run's residual (FBCache: the next call's reference)."""

    # -- plans ------------------------------------------------------------------------------------------------
    def check_blocks(self, blocks: int) -> None:
        start, end = self.run(blocks)
        if not 0 <= start < end <= blocks:
            raise UnsupportedGraphError(
                f"{self.config.method}: {self.describe_run()} leaves no block to cache in a graph of {blocks} "
                f"blocks")

    def describe_run(self) -> str:
        return "its settings"

    def plans(self, view: GraphView) -> dict[str, StepPlan]:
        """The three plans of a graph: "probe", "compute", "cached"."""
        n = len(view.blocks)
        self.check_blocks(n)
        probe = self.probe_blocks(n)
        start, end = self.run(n)
        full = BlockStep(BlockKind.FULL)
        return {
            "probe": StepPlan(StepKind.FULL, tuple(full if i < probe else BlockStep(BlockKind.SKIPPED)
                                                   for i in range(n)), part=PROBE),
            "compute": StepPlan(StepKind.FULL, (full,) * n, part=TAIL),
            "cached": StepPlan(StepKind.RESIDUAL, tuple(BlockStep(BlockKind.RESIDUAL) if start <= i < end else full
                                                        for i in range(n)), part=TAIL),
        }

    def full_plan(self, view: GraphView) -> StepPlan:
        return self.plans(view)["compute"]

    def plan(self, step: int, view: GraphView) -> StepPlan:
        raise ConfigError(f"{self.config.method} decides each call at run time: it has no plan per step")

    @property
    def caches(self) -> bool:
        return True

    # -- building ---------------------------------------------------------------------------------------------
    def layout(self, graph: GraphPlan) -> Any:
        n = len(graph.blocks)
        self.check_blocks(n)
        start, end = self.run(n)
        escapes = run_escapes(graph, start, end)
        if escapes:
            raise UnsupportedGraphError(
                f"{self.config.method}: blocks {start}..{end - 1} compute {escapes[0].name}, which is read after "
                f"them (a long skip connection), so they cannot be replaced by their residual",
                block=graph.blocks[start].name)
        pairs = pair_streams(graph, start, end)
        cut = self.probe_blocks(n)
        targets = (streams_at(graph, cut) if cut else []) + self.probe_targets(graph)
        probe = probe_of(graph.blocks[0].nodes[0].graph.owning_module, targets)
        return {"pairs": pairs, "probe": probe, "start": start, "end": end, "cut": cut}

    def build(self, b, graph, plan, layout) -> None:
        from ..passes import expose_residual, probe_outputs, read_residual, take_carried
        from ..passes.residuals import expose_foca, read_foca

        if plan.part == PROBE:
            probe_outputs(b, layout["probe"].carried)
            self.probe_signal(b, graph, layout)
            return
        take_carried(b, layout["probe"].carried)
        order = self.config.taylor_order  # a forecast residual: its Taylor factors
        foca = getattr(self.config, "forecast", None) == "foca"
        run = (b, layout["pairs"], layout["start"], layout["end"])
        if plan.kind is StepKind.FULL:
            self.compute_extras(b, graph, layout)
            expose_foca(*run) if foca else expose_residual(*run, order)
        else:
            read_foca(*run) if foca else read_residual(*run, order)

    def check(self, graph: GraphPlan, plan: StepPlan) -> None:
        if len(plan.blocks) != len(graph.blocks):
            raise UnsupportedGraphError(f"a {plan.label} plan of {len(plan.blocks)} blocks for a graph of "
                                        f"{len(graph.blocks)}")

    def check_io(self, plan, view, inputs) -> str:
        return ""
