"""Export to ONNX, then a whole sampling loop through `CachedSession` equals the in-torch cached run.

Same variants (the kinds per step), same token indices (the same seeded draws), outputs within float tolerance.
Inputs change every step (fresh latents), batch 2 as in batched CFG.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import fxcache
from fxcache import ExportError
from fxcache.config import make_config
from fxcache.deploy import CachedSession
from fxcache.export import Manifest, read_manifest

from helpers import compile_cached, loop_inputs, make_model, rel_err, run

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (in the dev extra)")

STEPS = 8


def session_loop(session, inputs):
    with torch.no_grad():
        return [session(**kw)[0] for kw in inputs]


def export_and_compare(tmp_path, name, config, steps=STEPS, **export_opts):
    model = make_model(name)
    inputs = loop_inputs(name, steps, batch=2)
    compiled, _ = compile_cached(model, config)
    expected = run(compiled, inputs)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    manifest = fxcache.export(model, inputs[0], config, out_dir=str(tmp_path), num_steps=steps, **export_opts)
    session = CachedSession(str(tmp_path))
    got = session_loop(session, inputs)
    assert [r["kind"] for r in session.stats()] == kinds
    assert len(set(kinds)) > 1, "the loop must exercise cached steps"
    for s, (g, e) in enumerate(zip(got, expected)):
        assert rel_err(g, e) < 1e-4, (s, kinds[s], rel_err(g, e))
    return manifest, session, kinds


def refuses_another_config(folder, change, message):
    """The export's manifest with its config's options changed no longer loads: an ExportError names the field."""
    path = os.path.join(folder, "manifest.json")
    data = json.load(open(path))
    data["config"].update(change)
    json.dump(data, open(path, "w"))
    with pytest.raises(ExportError, match="manifest field " + message):
        CachedSession(folder)


@pytest.mark.parametrize("name", ["dit", "pixart", "flux", "sd3"])
def test_duca_loop_through_onnx_equals_torch(tmp_path, name):
    manifest, session, kinds = export_and_compare(tmp_path, name, make_config("duca", interval=3))
    assert {"full", "partial", "skip"} <= set(kinds)
    assert sorted(a.kind for a in manifest.artifacts) == ["full", "partial", "skip"]
    # a second generation through the same session repeats the first (state resets by the timestep rule)
    inputs = loop_inputs(name, STEPS, batch=2)
    first, second = session_loop(session, inputs), session_loop(session, inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    refuses_another_config(str(tmp_path), dict(ratio=0.5),
                           "schedule\\[1\\] runs artifacts\\[\\d\\], a partial k=.* plan, but its config .* plans "
                           "partial k=")


@pytest.mark.parametrize("method,opts", [
    ("fora", dict(interval=3)),
    ("toca", dict(interval=3, fresh_ratio=0.3, score="knorm", staleness_weight=0.25)),
    ("taylorseer", dict(interval=3, order=2, warmup_steps=1)),
    ("clusca", dict(interval=3, clusters=4, warmup_steps=1, kmeans_iters=3)),
])
def test_every_method_loops_through_onnx(tmp_path, method, opts):
    _, session, _ = export_and_compare(tmp_path, "dit", make_config(method, **opts))
    if method == "fora":
        micro_batches_keep_their_caches(session)
    change, message = OTHER_CONFIG[method]
    refuses_another_config(str(tmp_path), change, message)


def micro_batches_keep_their_caches(session):
    """Two trajectories of one conditioning, one call each per step in one request (micro-batches): each equals
    itself run alone through the session."""
    base = loop_inputs("dit", STEPS, batch=2)

    def trajectory(seed):
        g = torch.Generator().manual_seed(seed)
        start, drift = torch.randn(base[0]["hidden_states"].shape, generator=g), torch.randn(
            base[0]["hidden_states"].shape, generator=g)
        return [dict(kw, hidden_states=start + 0.05 * s * drift) for s, kw in enumerate(base)]

    a, b = trajectory(1), trajectory(2)
    with torch.no_grad(), fxcache.request(session):
        together = [(session(**x)[0], session(**y)[0]) for x, y in zip(a, b)]
    for i, alone in enumerate((a, b)):
        with torch.no_grad(), fxcache.request(session):
            expected = [session(**kw)[0] for kw in alone]
        assert all(torch.equal(pair[i], e) for pair, e in zip(together, expected)), i


#: per method, an option that changes the artifacts, and the mismatch a folder with that option changed shows
OTHER_CONFIG = {
    "fora": (dict(interval=1), "schedule\\[1\\] runs artifacts\\[1\\], a reuse plan, but its config .* plans full"),
    "toca": (dict(score="random"), "artifacts\\[\\d\\].inputs: it reads recorded scores .* config's score is 'random'"),
    "taylorseer": (dict(order=1), "artifacts\\[\\d\\].inputs: taylor_diff has shape \\[2\\], but config order=1 needs "
                                  "\\[1\\]"),
    "clusca": (dict(clusters=2), "artifacts\\[\\d\\].inputs: kinit:16 starts k-means from 4 tokens, but config "
                                 "clusters=2 needs 2"),
}


def test_toca_step_dependent_token_tables_get_one_artifact_each(tmp_path):
    config = make_config("toca", interval=2, fresh_ratio=0.3, ratio_schedule="pixart", num_steps=STEPS,
                         step_buckets=2)
    manifest, _, _ = export_and_compare(tmp_path, "pixart", config)
    partial = [i for i, a in enumerate(manifest.artifacts) if a.kind == "partial"]
    assert len({manifest.artifacts[i].step_plan() for i in partial}) == 2
    assert {j for j in manifest.schedule if manifest.artifacts[j].kind == "partial"} == set(partial)


def test_manifest_round_trips_and_describes_the_export(tmp_path):
    model = make_model("pixart")
    inputs = loop_inputs("pixart", 1, batch=2)[0]
    manifest = fxcache.export(model, inputs, "duca", out_dir=str(tmp_path), num_steps=10)
    again = read_manifest(str(tmp_path))
    assert again == manifest
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert manifest.method == "duca" and manifest.config == make_config("duca").to_dict()
    assert [manifest.artifacts[j].kind for j in manifest.schedule] == [make_config("duca").step_kind(i).value
                                                                       for i in range(10)]
    assert [t.name for t in manifest.user_inputs] == ["hidden_states", "timestep", "encoder_hidden_states"]
    assert manifest.user_inputs[manifest.timestep_input].name == "timestep"
    assert manifest.versions["torch"] == torch.__version__ and "fxcache" in manifest.versions
    assert manifest.model_class == "PixArtTransformer2DModel" and manifest.model_config["num_layers"] == 2
    partial = next(a for a in manifest.artifacts if a.kind == "partial")
    caches_in = [t for t in partial.inputs if t.role == "cache"]
    assert caches_in and all(t.dtype == "float32" and t.shape[0] == 2 for t in caches_in)
    idx = [t for t in partial.inputs if t.role == "idx"]
    assert idx and all(t.dtype == "int64" for t in idx)
    assert partial.tokens == idx[0].shape[1] * 2 // 2 and all(a.max_abs_error < 1e-4 for a in manifest.artifacts)


def test_onnx_lowering_runs_every_variant_in_onnxruntime(monkeypatch):
    """lowering="onnx": each variant is exported on first use and runs in onnxruntime; a ToCa loop (FULL and
    PARTIAL with in-graph token choice) equals the eager lowering, and no temporary model file is left behind."""
    import tempfile

    from fxcache.backends import onnx as onnx_backend

    made = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        folder = real(*args, **kwargs)
        made.append(folder.name)
        return folder

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    calls = []
    real_executor = onnx_backend.OnnxExecutor.__call__
    monkeypatch.setattr(onnx_backend.OnnxExecutor, "__call__",
                        lambda self, *a: calls.append(1) or real_executor(self, *a))
    config = make_config("toca", interval=2, fresh_ratio=0.25, score="random", warmup_steps=1)
    inputs = loop_inputs("pixart", 5)
    compiled, _ = compile_cached(make_model("pixart"), config, lowering="onnx")
    outs = run(compiled, inputs)
    eager, _ = compile_cached(make_model("pixart"), config)
    expected = run(eager, inputs)
    kinds = [r["kind"] for r in fxcache.stats(compiled)]
    assert kinds == [r["kind"] for r in fxcache.stats(eager)] and {"full", "partial"} <= set(kinds)
    assert len(calls) == len(inputs)  # every step ran in onnxruntime, none fell back to torch
    for s, (o, e) in enumerate(zip(outs, expected)):
        assert rel_err(o, e) <= 1e-4, (s, kinds[s])
    assert made and not any(os.path.exists(f) for f in made)
