"""make_inplace (CUDA graphs): caches become static buffer inputs updated with copy_, outputs the model's only."""

import torch

from fxcache import DuCaConfig
from fxcache.graph_io import Role
from fxcache.passes.inplace_caches import STATIC, make_inplace
from fxcache.variants import build_variants

from pass_helpers import capture


def test_written_entries_are_copied_into_buffers_at_the_end():
    gm, plan = capture("dit")
    variants = {p.kind.value: v for p, v in build_variants(gm, plan, DuCaConfig(interval=3)).items()}
    full = make_inplace(variants["full"])
    copies = [n for n in full.gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert len(copies) == len(full.writes) == len(variants["full"].outputs) and full.outputs == []
    assert [v.role for v in full.inputs] == [Role.BUFFER] * len(full.writes)  # FULL reads no cache: only writes
    nodes = list(full.gm.graph.nodes)
    assert nodes.index(copies[0]) > max(i for i, n in enumerate(nodes) if n.op == "call_function"
                                        and n.target is not torch.ops.aten.copy_.default)
    out = next(n for n in nodes if n.op == "output")
    assert len(out.args[0]) == full.num_outputs
    phs = [n for n in nodes if n.op == "placeholder"][-len(full.inputs):]
    assert all(ph.meta["tensor_dict"] == STATIC for ph in phs)
