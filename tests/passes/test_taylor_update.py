"""update_factors (Taylor FULL steps): F_0..F_m by divided differences, with 1/d scalars as an input."""

from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, update_factors

from pass_helpers import emitted


def test_factors_by_differences(dit):
    gm, plan = dit
    b = GraphBuilder(gm)
    update_factors(b, [plan.units[1]], 2)
    assert emitted(b) == ["input cache_taylor_diff", "input cache_taylor0_transformer_blocks_0_ff_0",
                          "input cache_taylor1_transformer_blocks_0_ff_0", "select", "sub", "mul", "select", "sub",
                          "mul"]
    assert [(v.role, v.shape) for v in b.inputs][0] == (Role.TAYLOR_DIFF, (2,))
    assert [k.name for _, k in b.written] == [f"taylor{i}:transformer_blocks.0.ff:0" for i in range(3)]


def test_no_units_declare_nothing(dit):
    gm, _ = dit
    b = GraphBuilder(gm)
    update_factors(b, [], 2)
    assert b.inputs == [] and b.written == []
