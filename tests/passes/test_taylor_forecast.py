"""forecast_units (forecast blocks): every use of a unit output reads sum_i coef[i] * F_i."""

from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, forecast_units

from pass_helpers import emitted


def test_the_taylor_sum_replaces_the_output(dit):
    gm, plan = dit
    ff = plan.units[1]
    b = GraphBuilder(gm)
    forecast_units(b, [ff], 1)
    assert emitted(b) == ["input cache_taylor_coef", "input cache_taylor0_transformer_blocks_0_ff_0",
                          "input cache_taylor1_transformer_blocks_0_ff_0", "select", "mul", "select", "mul", "add"]
    assert b.inputs[0].role is Role.TAYLOR_COEF and b.inputs[0].shape == (2,) and b.written == []
    assert not b.env[ff.outputs[0]].users and b.replaced[ff.outputs[0]].target.__name__ == "add"
