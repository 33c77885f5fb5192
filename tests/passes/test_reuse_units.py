"""reuse_units (cached blocks): a cache placeholder takes over every use of each unit output."""

from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, reuse_units

from pass_helpers import emitted


def test_a_cache_input_replaces_the_unit_output(dit):
    gm, plan = dit
    attn = plan.units[0]
    b = GraphBuilder(gm)
    reuse_units(b, [attn])
    assert emitted(b) == ["input cache_transformer_blocks_0_attn1_0"]
    assert [(v.role, v.key.name, v.shape) for v in b.inputs] == [(Role.CACHE, "transformer_blocks.0.attn1:0",
                                                                  (1, 16, 16))]
    assert not b.env[attn.outputs[0]].users and b.replaced[attn.outputs[0]] is b.added[0]
    new = b.finish()
    assert not any("scaled_dot_product" in str(n.target) for n in new.graph.nodes
                   if n.meta.get("nn_module_stack") and "transformer_blocks.0" in str(n.meta["nn_module_stack"]))
