"""record_scores (ToCa's FULL blocks): each scored unit's score at this step is written."""

import pytest

from fxcache.analysis.scored import scored_units
from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, record_scores

from pass_helpers import emitted


@pytest.mark.parametrize("score,ops", [("attention", ["attention_received_score"]), ("knorm", ["norm_score"]),
                                       ("similarity", [])])
def test_the_score_or_its_source_is_written(dit, score, ops):
    gm, plan = dit
    scored = scored_units(plan, score)
    b = GraphBuilder(gm)
    record_scores(b, scored[:1], score, True, True)
    assert emitted(b) == ops
    assert [(r, k.name) for r, k in b.written] == [(Role.CACHE, "tocascore:transformer_blocks.0.ff")]
