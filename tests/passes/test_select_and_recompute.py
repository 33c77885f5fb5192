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
                              "unsqueeze", "select_tokens", "getitem", "expand", "getitem", "gather_rows", "mul",
                              "add", "linear", "gelu", "dropout", "linear", "scatter_rows"]
    assert [v.role for v in b.inputs[1:]] == [Role.STATE, Role.UNIFORM, Role.CACHE]
    assert [(r, k.name) for r, k in b.written] == [(Role.CACHE, "transformer_blocks.0.ff:0"),
                                                   (Role.STATE, "tocastale:transformer_blocks.0.ff")]


def test_k_zero_units_age_and_full_blocks_of_a_mixed_step_restart_their_staleness(dit):
    """The authors' DiT code ages staleness on every partial call, also with k = 0, and a FULL block 0 of a mixed
    step restarts its own (docs/authors/dit-schedules.md section 3, finding 3)."""
    from fxcache.passes import age_unrefreshed, restart_staleness

    gm, plan = dit
    su = scored_units(plan, "random")[0]
    how = Selection("random", 0.25, 4, 0, 0.0)
    b = GraphBuilder(gm)
    age_unrefreshed(b, [su], how)
    assert "advance_staleness" in emitted(b)
    assert [(r, k.name) for r, k in b.written] == [(Role.STATE, "tocastale:transformer_blocks.0.ff")]
    b = GraphBuilder(gm)
    restart_staleness(b, [su], how)
    assert "fresh_staleness" in emitted(b)
    b = GraphBuilder(gm)
    age_unrefreshed(b, [su], Selection("random", 0.0, 4, 0, 0.0))  # staleness moves no choice: nothing kept
    assert b.written == []
