"""Units that only another unit of their block reads (FLUX single blocks: the attention output feeds nothing but
the fused projection) keep no cache and no Taylor factors under methods whose cached steps only reuse or forecast
(ALGORITHMS.md erratum 15); ToCa, which recomputes the fused unit on a few rows from the cached attention rows,
keeps them. The loops still equal the uncached-model-based references (tests/methods/test_*.py)."""

import pytest

from fxcache.testing.models import make_model
from helpers import compile_cached, loop_inputs, run


def variant_inputs(backend) -> dict[str, set[str]]:
    runner = backend.runners[0]
    return {plan.label: {v.key.name for v in variant.inputs} for plan, variant in runner.source._variants.items()}


@pytest.mark.parametrize("method,keeps", [("fora", False), ("taylorseer", False), ("clusca", False),
                                          ("toca", True)])
def test_single_block_attention_is_cached_only_where_a_step_reads_it(method, keeps):
    compiled, backend = compile_cached(make_model("flux"), method, **({"clusters": 4} if method == "clusca" else {}))
    run(compiled, loop_inputs("flux", 8))
    inputs = variant_inputs(backend)
    assert len(inputs) == 2  # FULL and the cached step
    names = set().union(*inputs.values())
    single_attn = {n for n in names if ".attn:" in n and "single_transformer_blocks" in n}
    fused = {n for n in names if "single_transformer_blocks" in n and "proj_out" in n}
    assert fused, "the fused unit is cached"
    assert bool(single_attn) is keeps, sorted(single_attn)
