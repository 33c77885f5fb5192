"""What the variant passes emit: ops present and absent, placeholder order, outputs, Dynamo meta."""

from __future__ import annotations

import pytest
import torch

from fxcache import DuCaConfig, FORAConfig, StepKind
from fxcache.analysis import analyse
from fxcache.graph_io import Role
from fxcache.testing import MODEL_NAMES, make_inputs, make_model
from fxcache.variants import build_variants as build_plans
from pass_helpers import capture as capture_graph


def build_variants(gm, plan, config):
    """The variants a graph builds at compile time, by step kind (each kind's first plan)."""
    return {p.kind: v for p, v in build_plans(gm, plan, config).items()}


def capture(name):
    return capture_graph(name)[0]


def count(gm, fragment):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and fragment in getattr(n.target, "__name__", ""))


def placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_variant_ops(name):
    gm = capture(name)
    plan = analyse(gm)
    duca = build_variants(gm, plan, DuCaConfig(interval=5, ratio=0.5))
    fora = build_variants(gm, plan, FORAConfig(interval=3))
    assert set(duca) == {StepKind.FULL, StepKind.PARTIAL, StepKind.SKIP}
    assert set(fora) == {StepKind.FULL, StepKind.REUSE}
    sdpa_full = count(gm, "scaled_dot_product_attention")
    assert count(duca[StepKind.FULL].gm, "scaled_dot_product_attention") == sdpa_full
    xattn = sum(1 for u in plan.units if u.kind == "xattn")
    assert count(duca[StepKind.PARTIAL].gm, "scaled_dot_product_attention") == xattn  # only cross-attention
    assert count(duca[StepKind.PARTIAL].gm, "index_select") >= len(plan.partial_units)
    assert count(duca[StepKind.PARTIAL].gm, "index_copy") == len(plan.partial_units)
    assert count(fora[StepKind.REUSE].gm, "scaled_dot_product_attention") == 0
    assert count(fora[StepKind.REUSE].gm, "index_copy") == 0
    assert count(duca[StepKind.SKIP].gm, "scaled_dot_product_attention") == 0
    flops = {k: v.flops for k, v in duca.items()}
    assert flops[StepKind.FULL] > flops[StepKind.PARTIAL] > flops[StepKind.SKIP] > 0


@pytest.mark.parametrize("kind", [StepKind.FULL, StepKind.PARTIAL, StepKind.SKIP])
def test_placeholders_outputs_and_dynamo_meta(kind):
    gm = capture("flux")
    plan = analyse(gm)
    variant = build_variants(gm, plan, DuCaConfig(interval=5, ratio=0.5))[kind]
    old, new = placeholders(gm), placeholders(variant.gm)
    assert [n.name for n in new[: len(old)]] == [n.name for n in old]  # originals first, same order
    assert len(new) == len(old) + len(variant.inputs)
    assert [n.name for n in new[len(old):]] == [v.key.placeholder for v in variant.inputs]  # declared = placeholders
    for o, n in zip(old, new):
        assert n._dynamo_source is o._dynamo_source
    for n in new[len(old):]:
        assert n._dynamo_source is None
    assert variant.gm.meta.get("dynamo_compile_id") == gm.meta.get("dynamo_compile_id")
    assert variant.gm._param_name_to_source is gm._param_name_to_source
    outputs = variant.gm.graph.find_nodes(op="output")[0].args[0]
    assert len(outputs) == variant.num_outputs + len(variant.outputs)
    for v, node in zip(variant.outputs, outputs[variant.num_outputs:]):  # declared = what the graph returns
        assert tuple(node.meta["example_value"].shape) == v.shape and node.meta["example_value"].dtype == v.dtype
    for n in variant.gm.graph.nodes:  # shapes were re-propagated after the rewrite
        if n.op not in ("output",) and n.meta.get("example_value") is None and n.op != "placeholder":
            pytest.fail(f"{n.name} has no example_value")


def test_full_variant_without_other_kinds_is_the_untouched_graph():
    """interval=1: nothing to cache, so the FULL variant is the Dynamo graph op for op, and computes the same."""
    captured = []

    def backend(gm, example_inputs, **kwargs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(make_model("dit"), backend=backend, dynamic=False)(**make_inputs("dit"))
    gm, example = captured[0]
    variant = build_variants(gm, analyse(gm), FORAConfig(interval=1))[StepKind.FULL]
    assert variant.inputs == [] and variant.outputs == []
    ops = [(n.op, n.target, len(n.args)) for n in gm.graph.nodes]
    assert [(n.op, n.target, len(n.args)) for n in variant.gm.graph.nodes] == ops
    with torch.no_grad():
        assert torch.equal(variant.gm(*example)[0], gm(*example)[0])


def test_partial_index_shape_follows_the_ratio():
    gm = capture("flux")
    plan = analyse(gm)
    variant = build_variants(gm, plan, DuCaConfig(interval=5, ratio=0.75))[StepKind.PARTIAL]
    idx = {v.key.name: v.shape for v in variant.inputs if v.role is Role.INDICES}
    # FLUX tiny: image stream 64 tokens (2 ff), text 8 (2 ff_context), joint 72 (2 single-block proj_out)
    assert idx == {"idx:64": (2, 16), "idx:8": (2, 2), "idx:72": (2, 18)}
    assert variant.tokens == 18


@pytest.mark.parametrize("name", ["flux", "pixart"])
def test_full_variant_flops_equal_the_eager_model(name):
    from torch.utils.flop_counter import FlopCounterMode

    gm = capture(name)
    variant = build_variants(gm, analyse(gm), DuCaConfig())[StepKind.FULL]  # registers the CPU attention formula
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        make_model(name)(**make_inputs(name))
    assert variant.flops == counter.get_total_flops() > 0
    per_op = counter.get_flop_counts()["Global"]
    assert sum(v for op, v in per_op.items() if "scaled_dot_product" in str(op)) > 0  # attention is counted


def test_ratio_one_recomputes_no_token():
    gm = capture("dit")
    plan = analyse(gm)
    variant = build_variants(gm, plan, DuCaConfig(ratio=1.0))[StepKind.PARTIAL]
    assert not any(v.role is Role.INDICES for v in variant.inputs) and count(variant.gm, "index_copy") == 0
    assert {v.key for v in variant.inputs if v.role is Role.CACHE} >= {k for u in plan.units for k in u.cache_keys}
    assert variant.tokens == 0
