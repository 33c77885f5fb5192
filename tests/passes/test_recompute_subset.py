"""recompute_subset (DuCa's partial blocks): a unit's region copied onto drawn rows, scattered into its cache."""

from fxcache.graph_io import Role
from fxcache.passes import GraphBuilder, recompute_subset, reuse_units

from pass_helpers import emitted

REGION = ["mul", "add", "linear", "gelu", "dropout", "linear"]  # DiT's ff with its modulated input, row by row


def test_the_region_runs_on_the_indexed_rows(dit):
    gm, plan = dit
    attn, ff = plan.units[0], plan.units[1]
    b = GraphBuilder(gm)
    reuse_units(b, [attn])
    recompute_subset(b, {16: [ff]}, {16: 4})
    assert emitted(b) == ["input cache_transformer_blocks_0_attn1_0", "input cache_idx_16",
                          "input cache_transformer_blocks_0_ff_0", "select", "index_select", *REGION, "index_copy"]
    assert [(v.role, v.key.name, v.shape) for v in b.inputs][1:] == [
        (Role.INDICES, "idx:16", (1, 4)), (Role.CACHE, "transformer_blocks.0.ff:0", (1, 16, 16))]
    assert [(r, k.name) for r, k in b.written] == [(Role.CACHE, "transformer_blocks.0.ff:0")]
