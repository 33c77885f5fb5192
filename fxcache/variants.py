"""build_variants(): one static-shape graph per step kind, from the Dynamo graph and its plan."""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from .analysis import GraphPlan, Unit
from .config import CacheConfig, StepKind
from .errors import UnsupportedGraphError
from .passes import (
    GraphBuilder,
    example_spec,
    expose_unit_outputs,
    propagate_shapes,
    read_units_from_cache,
    recompute_token_subset,
)


@dataclasses.dataclass
class ExtraInput:
    """An input a variant takes after the original ones: token indices for a token count, or a cache entry."""

    kind: str  # "idx" | "cache"
    key: str  # cache key, or "idx:<tokens>"
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass
class Variant:
    kind: StepKind
    gm: fx.GraphModule
    extra_inputs: list[ExtraInput]
    extra_outputs: list[str]  # cache keys written, in output order
    num_outputs: int  # outputs of the original graph
    single_output: bool
    flops: int
    tokens: int  # rows of the largest token stream recomputed through token-wise units


@dataclasses.dataclass
class CacheLayout:
    """Cache entries of one graph: key -> (original node). Units first, then the head input."""

    unit_keys: list[tuple[str, fx.Node]]
    final_keys: list[tuple[str, fx.Node]]
    idx_groups: dict[int, list[Unit]]  # token count -> partial units, in graph order
    k: dict[int, int]  # token count -> rows recomputed

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        for k, n in self.unit_keys + self.final_keys:
            if k == key:
                v = n.meta["example_value"]
                return tuple(v.shape), v.dtype
        raise KeyError(key)


def unit_cache_keys(unit: Unit) -> list[tuple[str, fx.Node]]:
    return [(f"{unit.name}:{i}", o) for i, o in enumerate(unit.outputs)]


def cache_layout(plan: GraphPlan, config: CacheConfig) -> CacheLayout:
    unit_keys = [kv for u in plan.units for kv in unit_cache_keys(u)]
    final_keys = [(f"final:{i}", o) for i, o in enumerate(plan.last_outputs)] if StepKind.SKIP in config.kinds else []
    groups: dict[int, list[Unit]] = {}
    if StepKind.PARTIAL in config.kinds:
        for u in plan.partial_units:
            groups.setdefault(u.tokens, []).append(u)
    return CacheLayout(unit_keys, final_keys, groups, {t: config.tokens_for(t) for t in groups})


def _device(plan_gm: fx.GraphModule, plan: GraphPlan) -> torch.device:
    ph = [n for n in plan_gm.graph.nodes if n.op == "placeholder"][plan.timestep_index]
    return ph.meta["example_value"].device


def _build_full(gm, plan, layout, keys_needed: bool):
    b = GraphBuilder(gm)
    written = expose_unit_outputs(b, layout.unit_keys + layout.final_keys) if keys_needed else []
    return b, [], written


def _build_reuse(gm, plan, layout):
    b = GraphBuilder(gm)
    extras = [ExtraInput("cache", k, *layout.spec(k)) for k, _ in layout.unit_keys]
    read_units_from_cache(b, layout.unit_keys)
    written = expose_unit_outputs(b, layout.final_keys)
    return b, extras, written


def _build_partial(gm, plan, layout):
    b = GraphBuilder(gm)
    extras, idx_nodes = [], {}
    for tokens, units in layout.idx_groups.items():
        shape = (len(units), layout.k[tokens])
        ph = b.add_placeholder(f"cache_idx_{tokens}")
        idx_nodes[tokens] = ph
        extras.append(ExtraInput("idx", f"idx:{tokens}", shape, torch.int64))
    extras += [ExtraInput("cache", k, *layout.spec(k)) for k, _ in layout.unit_keys]
    cached = read_units_from_cache(b, layout.unit_keys)
    # read_units_from_cache replaced every unit output; token-wise partial units get their region back on k rows.
    written = []
    for tokens, units in layout.idx_groups.items():
        for pos, unit in enumerate(units):
            out = unit.outputs[0]
            cache_in = cached[out]
            # The region's copy must feed the users the cache placeholder took over: give them back first.
            users = list(cache_in.users)
            anchor = b.env[out]
            for u in users:
                u.replace_input_with(cache_in, anchor)
            with b.graph.inserting_before(anchor):
                idx_row = b.graph.call_function(torch.select, (idx_nodes[tokens], 0, pos))
            others = {n: p for n, p in cached.items() if n is not out}
            written_node = recompute_token_subset(b, unit, idx_row, cache_in, others)
            b.extra_outputs.append(written_node)
            written.append(unit_cache_keys(unit)[0][0])
    written += expose_unit_outputs(b, layout.final_keys)
    return b, extras, written


def _build_skip(gm, plan, layout):
    b = GraphBuilder(gm)
    extras = [ExtraInput("cache", k, *layout.spec(k)) for k, _ in layout.final_keys]
    read_units_from_cache(b, layout.final_keys)
    return b, extras, []


def build_variant(gm: fx.GraphModule, plan: GraphPlan, config: CacheConfig, kind: StepKind) -> Variant:
    layout = cache_layout(plan, config)
    if kind is StepKind.FULL:
        b, extras, written = _build_full(gm, plan, layout, keys_needed=len(config.kinds) > 1)
    elif kind is StepKind.REUSE:
        b, extras, written = _build_reuse(gm, plan, layout)
    elif kind is StepKind.PARTIAL:
        b, extras, written = _build_partial(gm, plan, layout)
    elif kind is StepKind.SKIP:
        b, extras, written = _build_skip(gm, plan, layout)
    else:  # pragma: no cover
        raise ValueError(kind)
    new = b.finish()
    device = _device(gm, plan)
    specs = [example_spec(n.meta["example_value"]) for n in gm.graph.nodes if n.op == "placeholder"]
    specs += [(e.shape, e.dtype, device) for e in extras]
    try:
        flops = propagate_shapes(new, specs)
    except Exception as exc:  # a region that does not run on k rows, or a pass bug: never run it
        raise UnsupportedGraphError(f"the {kind} variant does not propagate shapes: {exc}") from exc
    new.recompile()
    if kind is StepKind.FULL:
        tokens = max((u.tokens for u in plan.units if u.token_wise and u.tokens), default=0)
    elif kind is StepKind.PARTIAL:
        tokens = layout.k[max(layout.k)] if layout.k else 0
    else:
        tokens = 0
    return Variant(
        kind=kind,
        gm=new,
        extra_inputs=extras,
        extra_outputs=written,
        num_outputs=len(b.outputs),
        single_output=b.single_output,
        flops=flops,
        tokens=tokens,
    )


def build_variants(gm: fx.GraphModule, plan: GraphPlan, config: CacheConfig) -> dict[StepKind, Variant]:
    """Every variant the method's schedule can ask for, built eagerly so that errors surface at compile time."""
    return {kind: build_variant(gm, plan, config, kind) for kind in StepKind if kind in config.kinds}
