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
    add_cluster_refresh,
    add_kmeans,
    cluster_members,
    factor_key,
    forecast_from_factors,
    propagate_shapes,
    read_units_from_cache,
    recompute_token_subset,
    safe_name,
    update_taylor_factors,
)
from .passes.toca import (
    ScoredUnit,
    add_score_outputs,
    add_selected_recompute,
    rand_key,
    score_key,
    score_spec,
    scored_units,
    stale_key,
)


@dataclasses.dataclass
class ExtraInput:
    """An input a variant takes after the original ones: token indices for a token count, or a cache entry."""

    # "idx" / "rand": drawn per step; "cache": written by an earlier step; "state": like cache, zeros when absent
    # and cleared by FULL steps; "coef" / "diff": Taylor scalars; "kinit" / "warm": k-means start.
    kind: str
    key: str
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
    writes: list[str] = dataclasses.field(default_factory=list)  # in-place variants: cache keys updated in buffers


@dataclasses.dataclass
class CacheLayout:
    """Cache entries of one graph: key -> (original node). Units first, then the head input."""

    unit_keys: list[tuple[str, fx.Node]]
    final_keys: list[tuple[str, fx.Node]]
    idx_groups: dict[int, list[Unit]]  # token count -> partial units, in graph order
    k: dict[int, int]  # token count -> rows recomputed
    taylor_order: int | None = None
    clusters: dict[int, "ClusterGroup"] = dataclasses.field(default_factory=dict)  # token count -> group
    kmeans_iters: int = 0
    gamma: float = 0.0
    scored: list[ScoredUnit] | None = None  # ToCa: units selected in the graph
    config: CacheConfig | None = None

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        if key.startswith("cluster"):  # "clusterlabels:<tokens>" / "clustercentroids:<tokens>"
            name, tokens = key.split(":")
            return self.clusters[int(tokens)].spec(name)
        if key.startswith("tocascore:"):
            name = key.split(":", 1)[1]
            return score_spec(next(su for su in self.scored if su.name == name), self.config)
        if key.startswith("taylor"):  # "taylor<i>:<unit key>": shaped like the unit output
            key = key.split(":", 1)[1]
        for k, n in self.unit_keys + self.final_keys:
            if k == key:
                v = n.meta["example_value"]
                return tuple(v.shape), v.dtype
        raise KeyError(key)


@dataclasses.dataclass
class ClusterGroup:
    """ClusCa: the units refreshed in one token stream, and the residual-stream value clustered at FULL steps."""

    tokens: int
    units: list[Unit]
    feature: fx.Node  # (B, tokens, D), output of the last block holding one of `units`
    clusters: int
    propagate: bool  # gamma propagation (the largest stream only)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        b, _, d = self.feature.meta["example_value"].shape
        if name == "clusterlabels":
            return (b, self.tokens), torch.int64
        return (b, self.clusters, d), torch.float32


def cluster_groups(plan: GraphPlan, config: CacheConfig) -> dict[int, ClusterGroup]:
    """Refreshed units: token-wise feed-forward units that run on a subset, in blocks of the first block list."""
    first_list = plan.blocks[0].name.rsplit(".", 1)[0]
    groups: dict[int, ClusterGroup] = {}
    for block in plan.blocks:
        if block.name.rsplit(".", 1)[0] != first_list:
            continue
        for unit in block.units:
            if unit.kind != "mlp" or not unit.partial:
                continue
            feature = next((o for o in block.outputs if _is_stream(o, plan.batch, unit.tokens)), None)
            if feature is None:
                raise UnsupportedGraphError(
                    f"ClusCa: block {block.name} has no (batch, {unit.tokens}, dim) output to cluster for {unit.name}",
                    block=block.name)
            g = groups.setdefault(unit.tokens, ClusterGroup(unit.tokens, [], feature, config.clusters, False))
            g.units.append(unit)
            g.feature = feature  # the last block wins
    if not groups:
        raise UnsupportedGraphError("ClusCa: no token-wise feed-forward unit can be recomputed on a token subset")
    for g in groups.values():
        g.clusters = min(g.clusters, g.tokens)  # a short stream (a few text tokens): every token its own cluster
    groups[max(groups)].propagate = True
    return groups


def _is_stream(node: fx.Node, batch: int, tokens: int) -> bool:
    v = node.meta.get("example_value")
    return isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[0] == batch and v.shape[1] == tokens


def unit_cache_keys(unit: Unit) -> list[tuple[str, fx.Node]]:
    return [(f"{unit.name}:{i}", o) for i, o in enumerate(unit.outputs)]


def cache_layout(plan: GraphPlan, config: CacheConfig) -> CacheLayout:
    unit_keys = [kv for u in plan.units for kv in unit_cache_keys(u)]
    final_keys = [(f"final:{i}", o) for i, o in enumerate(plan.last_outputs)] if StepKind.SKIP in config.kinds else []
    groups: dict[int, list[Unit]] = {}
    if StepKind.PARTIAL in config.kinds:
        for u in plan.partial_units:
            groups.setdefault(u.tokens, []).append(u)
    clusters = cluster_groups(plan, config) if StepKind.CLUSTER in config.kinds else {}
    scored = None
    if getattr(config, "selects_in_graph", False) and StepKind.PARTIAL in config.kinds:
        scored, groups = scored_units(plan, config), {}
    return CacheLayout(unit_keys, final_keys, groups, {t: config.tokens_for(t) for t in groups}, config.taylor_order,
                       clusters, getattr(config, "kmeans_iters", 0), getattr(config, "gamma", 0.0), scored, config)


def _device(plan_gm: fx.GraphModule, plan: GraphPlan) -> torch.device:
    ph = [n for n in plan_gm.graph.nodes if n.op == "placeholder"][plan.timestep_index]
    return ph.meta["example_value"].device


def _build_full(gm, plan, layout, keys_needed: bool):
    b = GraphBuilder(gm)
    if layout.taylor_order is not None and keys_needed:
        m = layout.taylor_order
        extras = [ExtraInput("diff", "taylor_diff", (m,), torch.float32)] if m > 0 else []
        inputs, written = update_taylor_factors(b, layout.unit_keys, m)
        extras += [ExtraInput("cache", k, *layout.spec(k)) for k in inputs]
        if layout.clusters:
            warm = b.add_placeholder("cluster_warm")
            extras.append(ExtraInput("warm", "cluster_warm", (1,), torch.float32))
            for tokens, group in layout.clusters.items():
                _, _, labels, centroids = add_kmeans(b, group.feature, tokens, group.clusters,
                                                     layout.kmeans_iters, warm)
                extras.append(ExtraInput("cache", f"clustercentroids:{tokens}", *group.spec("clustercentroids")))
                extras.append(ExtraInput("kinit", f"kinit:{tokens}", (group.clusters,), torch.int64))
                b.extra_outputs += [labels, centroids]
                written += [f"clusterlabels:{tokens}", f"clustercentroids:{tokens}"]
        return b, extras, written
    written = expose_unit_outputs(b, layout.unit_keys + layout.final_keys) if keys_needed else []
    if layout.scored and keys_needed:
        written += add_score_outputs(b, layout.scored, layout.config)
    return b, [], written


def _forecast_all(gm, layout):
    """Every unit output replaced by its Taylor forecast; returns (builder, extra inputs, {unit node: forecast})."""
    b = GraphBuilder(gm)
    m = layout.taylor_order
    inputs, forecasts = forecast_from_factors(b, layout.unit_keys, m)
    extras = [ExtraInput("coef", "taylor_coef", (m + 1,), torch.float32)]
    extras += [ExtraInput("cache", k, *layout.spec(k)) for k in inputs]
    return b, extras, forecasts


def _build_forecast(gm, plan, layout):
    b, extras, _ = _forecast_all(gm, layout)
    return b, extras, []


def _build_reuse(gm, plan, layout):
    b = GraphBuilder(gm)
    extras = [ExtraInput("cache", k, *layout.spec(k)) for k, _ in layout.unit_keys]
    read_units_from_cache(b, layout.unit_keys)
    written = expose_unit_outputs(b, layout.final_keys)
    return b, extras, written


def _build_cluster(gm, plan, layout):
    b, extras, forecasts = _forecast_all(gm, layout)
    written = []
    for tokens, group in layout.clusters.items():
        labels = b.add_placeholder(f"cluster_labels_{tokens}")
        rand = b.add_placeholder(f"cluster_rand_{tokens}")
        extras.append(ExtraInput("cache", f"clusterlabels:{tokens}", *group.spec("clusterlabels")))
        extras.append(ExtraInput("rand", f"rand:{tokens}", (1, tokens), torch.float32))
        with b.inserting_after_placeholders():
            members = b.graph.call_function(cluster_members, (labels, rand, group.clusters))
        gamma = layout.gamma if group.propagate else 0.0
        for unit in group.units:
            b.extra_outputs.append(add_cluster_refresh(b, unit, members, labels, gamma, forecasts))
            written.append(factor_key(0, unit_cache_keys(unit)[0][0]))
    return b, extras, written


def ktable(layout: CacheLayout, sched_step: int) -> dict[str, int]:
    """ToCa: k of every scored unit for the ratio schedule evaluated at `sched_step`."""
    c = layout.config
    return {su.name: c.unit_tokens(step=sched_step, tokens=su.unit.tokens, layer=su.layer, layers=su.layers,
                                   list_index=su.list_index, kind=su.unit.kind) for su in layout.scored}


def _reclaim_unit_output(b: GraphBuilder, unit: Unit, cached: dict) -> tuple[fx.Node, dict]:
    """Before recomputing `unit` on a subset: the users its cache placeholder took over go back to the unit's
    output node (which the recompute then replaces). Returns (the unit's cache placeholder, the other caches)."""
    out = unit.outputs[0]
    cache_in = cached[out]
    for u in list(cache_in.users):
        u.replace_input_with(cache_in, b.env[out])
    return cache_in, {n: p for n, p in cached.items() if n is not out}


def _build_partial_selected(gm, plan, layout, sched_step):
    b = GraphBuilder(gm)
    config, ks = layout.config, ktable(layout, sched_step)
    active = [su for su in layout.scored if ks[su.name] > 0]
    extras = [ExtraInput("cache", k, *layout.spec(k)) for k, _ in layout.unit_keys]
    cached = read_units_from_cache(b, layout.unit_keys)
    inputs = {}
    for su in active:
        keys = [(stale_key(su.name), "state", (su.unit.tokens,), torch.float32)]
        if config.score == "random":
            keys.append((rand_key(su.name), "rand", (su.unit.tokens,), torch.float32))
        elif config.score != "staleness":
            keys.append((score_key(su.name), "cache", *score_spec(su, config)))
        for key, kind, shape, dtype in keys:
            inputs[key] = b.add_placeholder(safe_name(key))
            extras.append(ExtraInput(kind, key, shape, dtype))
    written = []
    for su in active:
        cache_in, others = _reclaim_unit_output(b, su.unit, cached)
        new_cache, new_stale = add_selected_recompute(b, su, ks[su.name], config, cache_in, others, inputs)
        b.extra_outputs += [new_cache, new_stale]
        written += [unit_cache_keys(su.unit)[0][0], stale_key(su.name)]
    return b, extras, written, max(ks.values(), default=0)


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
            cache_in, others = _reclaim_unit_output(b, unit, cached)
            with b.graph.inserting_before(b.env[unit.outputs[0]]):
                idx_row = b.graph.call_function(torch.select, (idx_nodes[tokens], 0, pos))
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


def build_variant(gm: fx.GraphModule, plan: GraphPlan, config: CacheConfig, kind: StepKind,
                  sched_step: int = 0, layout: CacheLayout | None = None) -> Variant:
    """One variant. `sched_step`: the step whose ratio schedule sets ToCa's k table (PARTIAL only); `layout`:
    `cache_layout(plan, config)` when the caller already has it."""
    layout = layout or cache_layout(plan, config)
    selected_k = None
    if kind is StepKind.PARTIAL and layout.scored is not None:
        b, extras, written, selected_k = _build_partial_selected(gm, plan, layout, sched_step)
    elif kind is StepKind.FULL:
        b, extras, written = _build_full(gm, plan, layout, keys_needed=len(config.kinds) > 1)
    elif kind is StepKind.REUSE:
        b, extras, written = _build_reuse(gm, plan, layout)
    elif kind is StepKind.PARTIAL:
        b, extras, written = _build_partial(gm, plan, layout)
    elif kind is StepKind.SKIP:
        b, extras, written = _build_skip(gm, plan, layout)
    elif kind is StepKind.FORECAST:
        b, extras, written = _build_forecast(gm, plan, layout)
    elif kind is StepKind.CLUSTER:
        b, extras, written = _build_cluster(gm, plan, layout)
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
        tokens = selected_k if selected_k is not None else (layout.k[max(layout.k)] if layout.k else 0)
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
    """Every variant the method's schedule can ask for, built eagerly so that errors surface at compile time.

    Methods whose k changes with the step (ToCa ratio schedules with a step weight) get further PARTIAL variants
    from the runner, built on first use."""
    first, layout = schedule_key(config, config.warmup), cache_layout(plan, config)
    return {kind: build_variant(gm, plan, config, kind, first, layout) for kind in StepKind if kind in config.kinds}


def schedule_key(config: CacheConfig, step: int) -> int:
    """The step whose ratio schedule a PARTIAL variant at `step` uses (0 for methods with one k table)."""
    fn = getattr(config, "schedule_step", None)
    return fn(step) if fn else 0
