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
    with pytest.raises(ExportError, match="manifest field artifacts\\[\\d+\\]" + message):
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
    refuses_another_config(str(tmp_path), dict(ratio=0.5), ".inputs\\[\\d+\\].shape is .*but its config recomputes")


@pytest.mark.parametrize("method,opts", [
    ("fora", dict(interval=3)),
    ("toca", dict(interval=3, fresh_ratio=0.3, score="knorm", staleness_weight=0.25)),
    ("taylorseer", dict(interval=3, order=2, warmup_steps=1)),
    ("clusca", dict(interval=3, clusters=4, warmup_steps=1, kmeans_iters=3)),
])
def test_every_method_loops_through_onnx(tmp_path, method, opts):
    export_and_compare(tmp_path, "dit", make_config(method, **opts))
    change, message = OTHER_CONFIG[method]
    refuses_another_config(str(tmp_path), change, message)


#: per method, an option that changes the artifacts, and the mismatch a folder with that option changed shows
OTHER_CONFIG = {
    "fora": (dict(interval=1), ".kind is reuse, which its config .* never runs"),
    "toca": (dict(score="random"), ".inputs are those of another token score"),
    "taylorseer": (dict(order=1), ".inputs\\[\\d+\\].shape is \\[\\d\\], but config.order=1 needs"),
    "clusca": (dict(clusters=2), ".inputs\\[\\d+\\].shape is \\[4\\], but config.clusters=2 needs \\[2\\]"),
}


def test_toca_step_dependent_token_tables_get_one_artifact_each(tmp_path):
    config = make_config("toca", interval=2, fresh_ratio=0.3, ratio_schedule="pixart", num_steps=STEPS,
                         step_buckets=2)
    manifest, _, _ = export_and_compare(tmp_path, "pixart", config)
    partial = [a for a in manifest.artifacts if a.kind == "partial"]
    assert len({a.schedule_key for a in partial}) == 2
    used = {s["schedule_key"] for s in manifest.schedule if s["kind"] == "partial"}
    assert used == {a.schedule_key for a in partial}


def test_manifest_round_trips_and_describes_the_export(tmp_path):
    model = make_model("pixart")
    inputs = loop_inputs("pixart", 1, batch=2)[0]
    manifest = fxcache.export(model, inputs, "duca", out_dir=str(tmp_path), num_steps=10)
    again = read_manifest(str(tmp_path))
    assert again == manifest
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest
    assert manifest.method == "duca" and manifest.config == make_config("duca").to_dict()
    assert [s["kind"] for s in manifest.schedule] == [make_config("duca").step_kind(i).value for i in range(10)]
    assert [t.name for t in manifest.user_inputs] == ["hidden_states", "timestep", "encoder_hidden_states"]
    assert manifest.user_inputs[manifest.timestep_input].name == "timestep"
    assert manifest.versions["torch"] == torch.__version__ and "fxcache" in manifest.versions
    assert manifest.model_class == "PixArtTransformer2DModel" and manifest.model_config["num_layers"] == 2
    partial = manifest.artifact("partial")
    caches_in = [t for t in partial.inputs if t.role.startswith("extra:cache:")]
    assert caches_in and all(t.dtype == "float32" and t.shape[0] == 2 for t in caches_in)
    idx = [t for t in partial.inputs if t.role.startswith("extra:idx:")]
    assert idx and all(t.dtype == "int64" for t in idx)
    assert partial.tokens == idx[0].shape[1] * 2 // 2 and all(a.max_abs_error < 1e-4 for a in manifest.artifacts)
