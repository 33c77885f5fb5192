"""An export folder is data, never code: atomic exports, confined paths, validated manifests, no unpickling
without an explicit opt-in, and every malformed manifest an ExportError that names the field."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxcache
from fxcache import ExportError
from fxcache.deploy import CachedSession
from fxcache.export.manifest import Manifest, read_manifest
from fxcache.testing import make_inputs, make_model

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (in the dev extra)")


def _example():
    kw = make_inputs("dit", batch=2)
    kw.pop("return_dict")
    return kw


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("dit_fora") / "export")
    fxcache.export(make_model("dit"), _example(), "fora", out_dir=folder, num_steps=4, interval=3)
    return folder


@pytest.fixture
def folder(exported, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(exported, dst)
    return dst


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _edit(folder, fn):
    path = os.path.join(folder, "manifest.json")
    data = json.load(open(path))
    fn(data)
    json.dump(data, open(path, "w"))


# -- export writes a new folder whole, or leaves the old one -----------------------------------------------------

def test_a_failed_export_leaves_the_old_folder_intact(folder, monkeypatch):
    from fxcache.export import onnx as onnx_writer

    before = _files(folder)
    real = onnx_writer.OnnxWriter.write
    calls = []

    def fail_second(self, gm, inputs, in_specs, out_specs, stem, kind):
        calls.append(kind)
        if len(calls) == 2:
            raise ExportError("disk full")
        return real(self, gm, inputs, in_specs, out_specs, stem, kind)

    monkeypatch.setattr(onnx_writer.OnnxWriter, "write", fail_second)
    with pytest.raises(ExportError, match="disk full"):
        fxcache.export(make_model("dit", seed=1), _example(), "duca", out_dir=folder, num_steps=4)
    assert _files(folder) == before
    parent = os.path.dirname(folder)
    assert sorted(os.listdir(parent)) == ["copy"], "a staging folder was left behind"
    CachedSession(folder)  # still loads: the old manifest with the old artifacts


def test_export_replaces_an_earlier_export_and_never_writes_through_planted_links(folder, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    os.remove(os.path.join(folder, "full.onnx"))
    os.symlink(str(outside), os.path.join(folder, "full.onnx"))
    fxcache.export(make_model("dit"), _example(), "duca", out_dir=folder, num_steps=4)
    assert outside.read_text() == "precious"
    assert not os.path.islink(os.path.join(folder, "full.onnx"))
    assert read_manifest(folder).method == "duca"


def test_export_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="folder of other files"):
        fxcache.export(make_model("dit"), _example(), "fora", out_dir=str(tmp_path), num_steps=2)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- artifact paths stay in the folder ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../full.onnx", "/etc/passwd", "sub/full.onnx", "..", ".hidden", ""])
def test_artifact_names_outside_the_folder_are_refused(folder, name):
    _edit(folder, lambda d: d["artifacts"][0].update(file=name))
    with pytest.raises(ExportError, match="artifacts\\[0\\].file"):
        CachedSession(folder)


def test_errors_do_not_reveal_whether_outside_paths_exist(folder, tmp_path):
    (tmp_path / "secret.onnx").write_text("x")
    messages = []
    for name in ("../secret.onnx", "../nothing_here.onnx"):
        _edit(folder, lambda d, n=name: d["artifacts"][0].update(file=n))
        with pytest.raises(ExportError) as info:
            CachedSession(folder)
        messages.append(str(info.value).replace(name, "NAME"))
    assert messages[0] == messages[1]


def test_a_symlink_out_of_the_folder_is_refused(folder, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    shutil.copy(os.path.join(folder, "full.onnx"), target)
    os.remove(os.path.join(folder, "full.onnx"))
    os.symlink(str(target), os.path.join(folder, "full.onnx"))
    with pytest.raises(ExportError, match="symbolic link"):
        CachedSession(folder)


# -- shapes and dtypes are checked against the artifacts before anything is allocated ------------------------------

def test_manifest_shapes_must_match_the_artifact(folder, monkeypatch):
    def huge(d):
        for a in d["artifacts"]:
            for t in a["inputs"]:
                if t["role"].startswith("extra:cache:"):
                    t["shape"] = [2, 65536, 65536]  # 32 GiB of float32

    _edit(folder, huge)
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a) or real_zeros(*a, **k))
    with pytest.raises(ExportError, match="the artifact declares"):
        CachedSession(folder)
    assert not allocated


def test_manifest_dtypes_must_match_the_artifact(folder):
    def retype(d):
        for entry in [d["user_inputs"][0]] + [a["inputs"][0] for a in d["artifacts"]]:
            entry["dtype"] = "float16"

    _edit(folder, retype)
    with pytest.raises(ExportError, match="dtype"):
        CachedSession(folder)


# -- TensorRT programs are unpickled: only with an explicit opt-in ------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('FXCACHE_PWNED', '/tmp/fxcache-pwned')}",))


def test_tensorrt_folders_need_trust_remote_code(folder, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FXCACHE_PWNED", str(marker))

    def as_tensorrt(d):
        d["format"] = "tensorrt"
        for a in d["artifacts"]:
            name = a["file"].replace(".onnx", ".ep")
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump(_Payload(), f)
            a["file"] = name

    _edit(folder, as_tensorrt)
    with pytest.raises(ExportError, match="trust_remote_code=True"):
        CachedSession(folder)
    assert not marker.exists()


# -- every malformed manifest is an ExportError that names the field ------------------------------------------------

def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8),
                  st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_manifests_raise_export_errors_only(exported, data):
    original = json.load(open(os.path.join(exported, "manifest.json")))
    manifest = copy.deepcopy(original)
    paths = [p for p in _paths(manifest) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, (dict, list)):
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(_JUNK)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Manifest.from_dict(manifest)
    except ExportError as exc:
        assert "manifest" in str(exc)


# -- a session's records are bounded like a backend's -------------------------------------------------------------

def test_session_records_keep_only_the_newest(exported):
    """`CachedSession.records` never grows past `max_records`: a long-lived server keeps the newest calls."""
    session = CachedSession(exported, max_records=3)
    example = _example()
    with torch.no_grad():
        for request in range(3):
            for step, t in enumerate([0.9, 0.6, 0.3, 0.1]):
                session(**{**example, "timestep": torch.full_like(example["timestep"], t * 1000)})
    records = session.stats()
    assert len(records) == 3
    assert [r["step"] for r in records] == [1, 2, 3]
    assert len({r["request"] for r in records}) == 1
