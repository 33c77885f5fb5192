"""select_and_recompute (ToCa's partial blocks): top-k chosen in the graph, the region recomputed on those rows."""

from fxcache.analysis.scored import scored_units
from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, Selection, reuse_units, select_and_recompute

from pass_helpers import emitted


def test_tokens_are_chosen_in_the_graph(dit):
    gm, plan = dit
    su = scored_units(plan, "random")[0]
    b = GraphBuilder(gm)
    reuse_units(b, [plan.units[0]])
    select_and_recompute(b, [(su, 3)], Selection("random", 0.25, 4, 0, 0.0))
    assert emitted(b)[1:] == ["input cache_tocastale_transformer_blocks_0_ff",
                              "input cache_tocarand_transformer_blocks_0_ff", "input cache_transformer_blocks_0_ff_0",
                              "select_tokens", "getitem", "getitem", "index_select", "mul", "add", "linear", "gelu",
                              "dropout", "linear", "index_copy"]
    assert [v.role for v in b.inputs[1:]] == [Role.STATE, Role.UNIFORM, Role.CACHE]
    assert [(r, k.name) for r, k in b.written] == [(Role.CACHE, "transformer_blocks.0.ff:0"),
                                                   (Role.STATE, "tocastale:transformer_blocks.0.ff")]
