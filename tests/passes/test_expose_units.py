"""expose_units (FULL blocks): each unit output becomes a written cache entry; nothing is added to the graph."""

from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, expose_units

from pass_helpers import emitted


def test_unit_outputs_are_written_as_they_are(dit):
    gm, plan = dit
    b = GraphBuilder(gm)
    expose_units(b, plan.units[:2])
    assert emitted(b) == [] and b.inputs == []
    assert [(r, k.name) for r, k in b.written] == [(Role.CACHE, "transformer_blocks.0.attn1:0"),
                                                   (Role.CACHE, "transformer_blocks.0.ff:0")]
    assert b.extra_outputs == [b.env[u.outputs[0]] for u in plan.units[:2]]
