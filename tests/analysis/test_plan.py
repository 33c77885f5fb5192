"""Golden checks of what the analysis finds in each tiny architecture."""

from __future__ import annotations

import pytest
import torch

import fxcache
from fxcache.analysis import ATTN, MLP, XATTN, analyse
from fxcache.analysis.module_stack import norm_path
from fxcache.testing import MODEL_NAMES, expected_units, make_inputs, make_model


def capture(name, batch=1, size=8):
    model = make_model(name)
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(**make_inputs(name, batch=batch, size=size))
    assert len(graphs) == 1
    return model, graphs[0]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_units_match_the_architecture(name):
    model, gm = capture(name)
    plan = analyse(gm)
    want = expected_units(name, model)
    assert [u.name for u in plan.units if u.kind == ATTN] == want["attention"]
    assert sorted(u.name for u in plan.units if u.kind in (MLP, XATTN)) == sorted(want["token_wise"])
    assert all(u.partial for u in plan.units if u.token_wise), [u.why_not for u in plan.units]
    assert plan.blocks[-1].name == want["last_block"]
    assert plan.timestep_name.endswith("timestep_")
    kinds = {u.name.rsplit(".", 1)[-1]: u.kind for u in plan.units}
    if name == "pixart":
        assert kinds["attn2"] == XATTN and kinds["attn1"] == ATTN


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unit_outputs_are_before_gate_and_residual(name):
    """Each cached value is a child module's output; its users are block-level nodes (gate multiply / residual)."""
    _, gm = capture(name)
    plan = analyse(gm)
    for unit in plan.units:
        for out in unit.outputs:
            stacks = [n.meta.get("nn_module_stack", {}) for n in out.users]
            paths = [norm_path(list(s.values())[-1][0]) for s in stacks if s]
            assert all(not p.startswith(unit.name) for p in paths), (unit.name, paths)


def test_flux_single_block_region_reads_cached_attention():
    _, gm = capture("flux")
    plan = analyse(gm)
    fused = [u for u in plan.units if u.name == "single_transformer_blocks.0.proj_out"][0]
    attn = [u for u in plan.units if u.name == "single_transformer_blocks.0.attn"][0]
    assert attn.outputs[0] in fused.gather  # rows of the attention output come from its cache
    assert fused.tokens == 64 + 8  # the joint text + image sequence
    targets = {getattr(n.target, "__name__", n.target) for n in fused.region}
    assert {"cat", "gelu", "linear"} <= targets
    assert not any("scaled_dot_product" in str(n.target) for n in fused.region)


def test_norm_path_handles_both_path_styles():
    assert norm_path("L['self'].__dict__['_modules']['transformer_blocks'].0.attn") == "transformer_blocks.0.attn"
    assert norm_path("L['self'].transformer_blocks[0].ff.net[2]") == "transformer_blocks.0.ff.net.2"


def test_summary_names_blocks_units_tokens_and_timestep():
    _, gm = capture("flux")
    text = analyse(gm).summary()
    assert "4 blocks" in text and "single_transformer_blocks.1" in text
    assert "proj_out[mlp 72 tokens partial]" in text and "timestep input `timestep` (graph input #" in text
    assert "Timesteps" in text  # how it was found


def test_explain_prints_what_was_found(capsys):
    result = fxcache.explain(make_model("sd3"), **make_inputs("sd3"))
    printed = capsys.readouterr().out
    assert result.graph_count == 1 and result.graph_break_count == 0
    assert "transformer_blocks.1" in printed and "ff[mlp 16 tokens partial]" in printed
    assert result.plans[0] is not None and len(result.plans[0].blocks) == 2


def test_explain_lists_what_each_variant_of_a_method_takes_and_writes():
    result = fxcache.explain(make_model("dit"), **make_inputs("dit"), method="duca", graphs=True)
    variants = result.variants[0]
    assert list(variants) == ["full", "partial", "skip"]
    text = str(result)
    assert "variant skip: " in text and "takes cache final:0; writes nothing" in text
    assert "variant partial: " in text and "idx idx:16" in text and "index_copy" in text  # graphs=True: the code


@pytest.mark.parametrize("method", ["fora", "taylorseer", "clusca"])
def test_explain_memory_with_a_method_is_what_a_generation_holds(method):
    """explain(method=) counts what the method's variants keep between steps (TaylorSeer: order + 1 tensors per
    unit), which is what the backend holds after a generation of one branch (batch 2 in one call)."""
    import re

    text = str(fxcache.explain(make_model("flux"), **make_inputs("flux", batch=2), method=method))
    said = float(re.search(rf"cache memory per branch with {method}: ([0-9.]+) MiB", text).group(1))
    backend = fxcache.cache_backend(method, lowering="eager")
    compiled = torch.compile(make_model("flux"), backend=backend, dynamic=False)
    with torch.no_grad(), fxcache.request(compiled):
        for s in range(8):
            compiled(**make_inputs("flux", batch=2, t=1 - s / 10))
            held = backend.cache_bytes() / 2**20
    assert said == pytest.approx(held, abs=0.006)


def test_explain_graphs_without_a_method_says_what_is_missing():
    with pytest.raises(fxcache.ConfigError, match="pass method="):
        fxcache.explain(make_model("dit"), **make_inputs("dit"), graphs=True)
