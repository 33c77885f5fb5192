"""expose_final / read_final (DuCa's SKIP): the last block's output is written, then read instead of the blocks."""

from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, expose_final, read_final

from pass_helpers import emitted


def test_the_head_input_is_written_and_read_back(dit):
    gm, plan = dit
    b = GraphBuilder(gm)
    expose_final(b, plan.last_outputs)
    assert emitted(b) == [] and [(r, k.name) for r, k in b.written] == [(Role.CACHE, "final:0")]
    b = GraphBuilder(gm)
    read_final(b, plan.last_outputs)
    assert emitted(b) == ["input cache_final_0"]
    skip = b.finish()
    assert not any(n.op == "call_function" and "scaled_dot_product" in str(n.target) for n in skip.graph.nodes)
