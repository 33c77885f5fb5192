"""build_variant(): one static-shape graph per step plan, from the Dynamo graph, its analysis and the method's
recipe. This module knows no method by name: the recipe registered for the config's type says which passes make
each plan."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from .analysis import GraphPlan
from .config import CacheConfig, StepKind
from .errors import UnsupportedGraphError
from .graph_io import GraphValue, Role
from .methods import recipe_for
from .passes import GraphBuilder, example_spec, propagate_shapes
from .step_plan import BlockKind, GraphView, StepPlan

_NO_LAYOUT = object()


@dataclasses.dataclass
class Variant:
    """A variant graph: the model's inputs then `inputs`; the model's outputs then the values of `outputs`."""

    plan: StepPlan
    gm: fx.GraphModule
    inputs: list[GraphValue]  # extra inputs, in placeholder order after the model's
    outputs: list[GraphValue]  # cache entries written, in output order after the model's outputs
    num_outputs: int  # outputs of the original graph
    single_output: bool
    flops: int
    tokens: int  # rows of the largest token stream recomputed through token-wise units
    writes: list[GraphValue] = dataclasses.field(default_factory=list)  # in-place variants: entries updated

    @property
    def kind(self) -> StepKind:
        return self.plan.kind

    def reads(self) -> set:
        """Keys of the cache entries the variant reads (a step runs it only when the branch has all of them)."""
        return {v.key for v in self.inputs if v.role is Role.CACHE}


def _device(gm: fx.GraphModule, plan: GraphPlan):
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ph = phs[plan.timestep_index] if plan.timestep_index is not None else phs[0]
    return ph.meta["example_value"].device


def build_variant(gm: fx.GraphModule, graph: GraphPlan, config: CacheConfig, plan: StepPlan,
                  layout: Any = _NO_LAYOUT) -> Variant:
    """The variant of `plan`. `layout`: `recipe_for(config).layout(graph)` when the caller already has it."""
    recipe = recipe_for(config)
    recipe.check(graph, plan)
    if layout is _NO_LAYOUT:
        layout = recipe.layout(graph)
    b = GraphBuilder(gm)
    recipe.build(b, graph, plan, layout)
    new = b.finish()
    device = _device(gm, graph)
    specs = [example_spec(n.meta["example_value"]) for n in gm.graph.nodes if n.op == "placeholder"]
    specs += [(v.shape, v.dtype, device) for v in b.inputs]
    try:
        flops = propagate_shapes(new, specs)
    except Exception as exc:  # a region that does not run on k rows, or a pass bug: never run it
        raise UnsupportedGraphError(f"the {plan.label} variant does not propagate shapes: {exc}") from exc
    new.recompile()
    out = next(n for n in new.graph.nodes if n.op == "output")
    values = out.args[0][len(b.outputs):]
    outputs = [GraphValue(role, key, tuple(v.meta["example_value"].shape), v.meta["example_value"].dtype)
               for (role, key), v in zip(b.written, values)]
    if plan.kind is StepKind.FULL:
        tokens = max((u.tokens for u in graph.units if u.token_wise and u.tokens), default=0)
    else:
        tokens = max((k for block in plan.blocks if block.kind is BlockKind.PARTIAL for k in block.k), default=0)
    return Variant(plan=plan, gm=new, inputs=list(b.inputs), outputs=outputs, num_outputs=len(b.outputs),
                   single_output=b.single_output, flops=flops, tokens=tokens)


def first_plans(config: CacheConfig, view: GraphView) -> list[StepPlan]:
    """The FULL plan, then the first plan of each other step kind the schedule emits: what a graph builds at
    compile time, so that a graph the method cannot handle fails there and not in the middle of a generation."""
    recipe = recipe_for(config)
    if getattr(recipe, "decides", False):  # decided per call: its probe, compute and cached plans
        return list(recipe.plans(view).values())
    plans = {StepKind.FULL: recipe.full_plan(view)}
    for step in range(config.horizon):
        if len(plans) == len(config.kinds):
            break
        kind = config.step_kind(step)
        if kind not in plans:
            plans[kind] = recipe.plan(step, view)
    return list(plans.values())


def build_variants(gm: fx.GraphModule, graph: GraphPlan, config: CacheConfig) -> dict[StepPlan, Variant]:
    """The variants of `first_plans`, built eagerly; plans met later (ToCa k tables that follow the step) are built
    by the runner on first use."""
    layout = recipe_for(config).layout(graph)
    view = GraphView.of(graph)
    return {p: build_variant(gm, graph, config, p, layout) for p in first_plans(config, view)}
