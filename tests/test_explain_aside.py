"""fxcache.explain leaves other compiled models alone: it used to call torch._dynamo.reset(), after which every
compiled model (an enabled pipeline's transformer too) recompiled and fxcache's caches were freed."""

import torch

import fxcache
from fxcache.testing import make_inputs, make_model


def test_explain_makes_no_other_compiled_model_recompile():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inputs = make_inputs("dit")
    compiled = torch.compile(make_model("dit"), backend=counting, dynamic=False)
    with torch.no_grad():
        before = compiled(**inputs)[0]
    assert len(graphs) == 1
    for _ in range(2):  # a model of the same class (the same code objects Dynamo caches on), twice: traced each time
        explained = fxcache.explain(make_model("dit", seed=1), **inputs)
        assert explained.graph_count == 1 and explained.plans[0] is not None
    with torch.no_grad():
        after = compiled(**inputs)[0]
    assert len(graphs) == 1, "explain made another compiled model recompile"
    assert torch.equal(before, after)


def test_a_cached_model_keeps_its_graph_and_caches_across_explain():
    """Step 1 after an explain call reuses the caches step 0 filled, in the graph compiled for step 0."""
    model, inputs = make_model("dit"), make_inputs("dit")
    compiled = torch.compile(model, backend=fxcache.cache_backend("fora", lowering="eager"), dynamic=False)
    with torch.no_grad(), fxcache.request(compiled):
        with fxcache.step(compiled, 0):
            compiled(**inputs)
        fxcache.explain(make_model("dit", seed=1), **inputs)
        with fxcache.step(compiled, 1):
            compiled(**inputs)
    records = fxcache.stats(compiled)
    assert [(r["graph"], r["kind"]) for r in records] == [(0, "full"), (0, "reuse")], records
