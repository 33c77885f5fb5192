"""An export folder is data, never code: atomic exports, confined paths, validated manifests, no unpickling
without an explicit opt-in, and every malformed manifest an ExportError that names the field."""

from __future__ import annotations

import copy
import hashlib
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

from helpers import redigest

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
    from fxcache.backends import onnx as onnx_writer

    before = _files(folder)
    real = onnx_writer.OnnxFormat.write
    calls = []

    def fail_second(self, gm, inputs, in_specs, out_specs, stem, kind):
        calls.append(kind)
        if len(calls) == 2:
            raise ExportError("disk full")
        return real(self, gm, inputs, in_specs, out_specs, stem, kind)

    monkeypatch.setattr(onnx_writer.OnnxFormat, "write", fail_second)
    with pytest.raises(ExportError, match="disk full"):
        fxcache.export(make_model("dit", seed=1), _example(), "duca", out_dir=folder, num_steps=4)
    assert _files(folder) == before
    parent = os.path.dirname(folder)
    assert sorted(os.listdir(parent)) == ["copy"], "a staging folder was left behind"
    CachedSession(folder)  # still loads: the old manifest with the old artifacts


def test_an_export_removes_what_killed_exports_left_beside_its_folder(folder, tmp_path):
    """A killed export leaves its staging folder (and, killed while replacing the folder, the old one): the next
    export to that folder removes those of processes that are gone or a day old, and nothing else."""
    import subprocess
    import sys
    import time

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)

    def plant(name):
        path = tmp_path / name
        path.mkdir()
        (path / "full.onnx").write_bytes(b"partial")
        return name

    removed = [plant(f".copy.export-{dead}-0123abcd"), plant(f".copy.old-{dead}-k2_x9q0z"),
               plant(".copy.export-1-89abcdef")]  # pid 1 lives, but no export runs for a day: its pid was reused
    os.utime(tmp_path / removed[-1], (time.time() - 2 * 86400,) * 2)
    kept = [plant(f".copy.export-{os.getpid()}-00000000"),  # a live process: an export in another thread
            plant(f".other.export-{dead}-0123abcd"),  # another folder's
            plant(".copy.export-notes"), plant(f".copy.export-{dead}-0123abcd.bak"),
            plant(".copy.export-9999999999-0123abcd"), plant("target")]  # no pid is that large: kept
    os.symlink(str(tmp_path / "target"), str(tmp_path / f".copy.export-{dead}-fedcba98"))
    kept.append(f".copy.export-{dead}-fedcba98")
    fxcache.export(make_model("dit"), _example(), "fora", out_dir=folder, num_steps=4, interval=3)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["copy"])
    assert (tmp_path / "target" / "full.onnx").read_bytes() == b"partial"


def test_export_replaces_an_earlier_export_and_never_writes_through_planted_links(folder, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    os.remove(os.path.join(folder, "full.onnx"))
    os.symlink(str(outside), os.path.join(folder, "full.onnx"))
    fxcache.export(make_model("dit"), _example(), "duca", out_dir=folder, num_steps=4)
    assert outside.read_text() == "precious"
    assert not os.path.islink(os.path.join(folder, "full.onnx"))
    assert read_manifest(folder).method == "duca"


def _plant_in_staging(monkeypatch, parent, plant):
    """While the export writes its first artifact, `plant(staging folder)`: someone writing into it meanwhile."""
    from fxcache.backends import onnx as onnx_writer

    real = onnx_writer.OnnxFormat.write

    def write(self, gm, inputs, in_specs, out_specs, stem, kind):
        if kind == "full":
            (staging,) = parent.glob(".copy.export-*")
            plant(str(staging))
        return real(self, gm, inputs, in_specs, out_specs, stem, kind)

    monkeypatch.setattr(onnx_writer.OnnxFormat, "write", write)


@pytest.mark.parametrize("names", [("full.onnx", "reuse.onnx"), ("manifest.json",)])
def test_export_never_writes_through_a_link_planted_in_its_staging_folder(folder, tmp_path, monkeypatch, names):
    """Links planted under the names the export writes, in its staging folder (by anyone who may write there): the
    file they link to is never written; nothing but plain files is published."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    before = _files(folder)

    def plant(staging):
        for name in names:
            os.symlink(str(outside), os.path.join(staging, name))

    def export():
        fxcache.export(make_model("dit", seed=1), _example(), "fora", out_dir=folder, num_steps=4, interval=3)

    _plant_in_staging(monkeypatch, tmp_path, plant)
    if names == ("manifest.json",):  # written as a new file only: refused
        with pytest.raises(ExportError, match="manifest.json"):
            export()
        assert _files(folder) == before
    else:  # an artifact is written in a folder of its own and renamed over the link
        export()
        assert not any(os.path.islink(os.path.join(folder, n)) for n in os.listdir(folder))
        CachedSession(folder)
    assert outside.read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["copy", "outside.txt"]


def test_export_publishes_only_the_files_it_wrote(folder, tmp_path, monkeypatch):
    before = _files(folder)
    _plant_in_staging(monkeypatch, tmp_path, lambda staging: open(os.path.join(staging, "notes.txt"), "w").close())
    with pytest.raises(ExportError, match="'notes.txt', which the export did not write"):
        fxcache.export(make_model("dit", seed=1), _example(), "fora", out_dir=folder, num_steps=4, interval=3)
    assert _files(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["copy"]


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


# -- each artifact is the file its export wrote ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_export(tmp_path_factory):
    """A second export of the same architecture, method and shapes, with other weights."""
    folder = str(tmp_path_factory.mktemp("dit_fora_other") / "export")
    fxcache.export(make_model("dit", seed=1), _example(), "fora", out_dir=folder, num_steps=4, interval=3)
    return folder


def test_the_manifest_holds_each_artifact_digest(exported):
    for a in read_manifest(exported).artifacts:
        assert a.sha256 == hashlib.sha256(open(os.path.join(exported, a.file), "rb").read()).hexdigest()
        assert a.data_sha256 is None  # no external weights file beside so small an artifact


def test_an_artifact_of_another_export_is_refused(folder, other_export):
    """full.onnx of another export of the same model passes every shape and dtype check: unchecked, the session
    would run one model's FULL steps and the other's cached steps."""
    shutil.copy(os.path.join(other_export, "full.onnx"), os.path.join(folder, "full.onnx"))
    with pytest.raises(ExportError, match="artifact 'full.onnx' does not match its digest \\(manifest field "
                                          "artifacts\\[0\\].sha256\\).*export again"):
        CachedSession(folder)


@pytest.mark.parametrize("edit,message", [
    (lambda a: a.update(sha256="0" * 64), "artifact 'full.onnx' does not match its digest \\(manifest field "
                                          "artifacts\\[0\\].sha256\\)"),
    (lambda a: a.update(sha256="not a digest"), "manifest field artifacts\\[0\\].sha256 must be a sha256 digest"),
    (lambda a: a.update(sha256=a["sha256"][:-1]), "manifest field artifacts\\[0\\].sha256 must be a sha256"),
    (lambda a: a.update(sha256=a["sha256"].upper()), "manifest field artifacts\\[0\\].sha256 must be a sha256"),
    (lambda a: a.update(sha256=None), "manifest field artifacts\\[0\\].sha256 must be a sha256 digest"),
    (lambda a: a.pop("sha256"), "manifest field artifacts\\[0\\] lacks sha256"),
    (lambda a: a.update(data_sha256="0" * 64), "'full.onnx.data' \\(manifest field artifacts\\[0\\].data_sha256\\) "
                                               "is missing"),
    (lambda a: a.update(data_sha256="x"), "manifest field artifacts\\[0\\].data_sha256 must be a sha256 digest"),
])
def test_a_tampered_digest_is_an_export_error_naming_the_field(folder, edit, message):
    _edit(folder, lambda d: edit(d["artifacts"][0]))
    with pytest.raises(ExportError, match=message):
        CachedSession(folder)


def test_external_weights_without_a_digest_are_refused(folder):
    """`<artifact>.data` holds the weights of an artifact over 2 GB: one in the folder is checked like the artifact,
    so its digest cannot be dropped from the manifest."""
    with open(os.path.join(folder, "full.onnx.data"), "wb") as f:
        f.write(bytes(64))
    with pytest.raises(ExportError, match="'full.onnx.data' is in the folder but manifest field "
                                          "artifacts\\[0\\].data_sha256 is null"):
        CachedSession(folder)


def test_a_folder_without_digests_is_refused_and_export_replaces_it(folder):
    """Format 2 manifests have no digests: such a folder does not load unchecked, and exporting again into it
    replaces it (it is an earlier export, not someone else's folder)."""
    def as_format_2(d):
        d["format_version"] = 2
        for a in d["artifacts"]:
            a.pop("sha256", None)
            a.pop("data_sha256", None)

    _edit(folder, as_format_2)
    with pytest.raises(ExportError, match="format_version 2 is not supported \\(this fxcache reads 3\\); export the "
                                          "model again"):
        CachedSession(folder)
    fxcache.export(make_model("dit"), _example(), "fora", out_dir=folder, num_steps=4, interval=3)
    assert CachedSession(folder).manifest.format_version == 3


# -- shapes and dtypes are checked against the artifacts before anything is allocated ------------------------------

def test_manifest_shapes_must_match_the_artifact(folder, monkeypatch):
    def huge(d):
        for a in d["artifacts"]:
            for t in a["inputs"]:
                if t["role"] == "cache":
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


# -- export replaces only an earlier export, never a folder of other files -----------------------------------------

def test_export_refuses_a_folder_whose_manifest_is_not_an_fxcache_manifest(tmp_path):
    """A web app folder has a manifest.json too: export must not take it for an earlier export and wipe it."""
    app = tmp_path / "webapp"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "My PWA", "start_url": "/"}))
    (app / "src" / "app.js").write_text("console.log('mine')")
    with pytest.raises(ExportError, match="folder of other files.*not an fxcache manifest"):
        fxcache.export(make_model("dit"), _example(), "fora", out_dir=str(app), num_steps=2)
    assert (app / "src" / "app.js").read_text() == "console.log('mine')"
    assert sorted(os.listdir(tmp_path)) == ["webapp"], "a staging folder was left behind"


@pytest.mark.parametrize("extra", ["notes.txt", "subfolder/", "full.onnx.data/"])
def test_export_refuses_an_earlier_export_with_other_entries(folder, extra):
    path = os.path.join(folder, extra.rstrip("/"))
    if extra.endswith("/"):
        os.mkdir(path)
    else:
        open(path, "w").write("mine")
    before = sorted(os.listdir(folder))
    with pytest.raises(ExportError, match=f"folder of other files.*{extra.rstrip('/')}"):
        fxcache.export(make_model("dit"), _example(), "fora", out_dir=folder, num_steps=2)
    assert sorted(os.listdir(folder)) == before


def test_a_symlinked_out_dir_is_refused_with_or_without_a_trailing_slash(exported, tmp_path):
    """`link/` resolves through the link: the path is normalised before the check, and nothing is left beside it."""
    os.symlink(exported, str(tmp_path / "link"))
    for out_dir in (str(tmp_path / "link"), str(tmp_path / "link") + "/"):
        with pytest.raises(ExportError, match="symbolic link"):
            fxcache.export(make_model("dit"), _example(), "fora", out_dir=out_dir, num_steps=2)
    assert sorted(os.listdir(tmp_path)) == ["link"] and os.path.islink(str(tmp_path / "link"))


def test_export_folders_get_the_mode_the_umask_gives(exported, tmp_path):
    from fxcache.export.api import _staging_folder

    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(exported).st_mode & 0o777 == 0o777 & ~umask
    old = os.umask(0o027)
    try:
        staging = _staging_folder(str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert os.stat(staging).st_mode & 0o777 == 0o750


@pytest.mark.parametrize("kwargs,message", [
    *[(dict(tolerance=t), "tolerance must be a finite number >= 0") for t in ("x", float("nan"), float("inf"), -1,
                                                                               True, None)],
    (dict(check="no"), "check must be True or False"),
    (dict(timestep_input=1.5), "timestep_input must be"),
])
def test_export_arguments_are_checked_before_tracing(tmp_path, kwargs, message):
    with pytest.raises(fxcache.ConfigError, match=message):
        fxcache.export(make_model("dit"), _example(), "fora", out_dir=str(tmp_path / "out"), num_steps=2, **kwargs)
    assert not os.path.exists(tmp_path / "out")


def test_num_steps_has_one_bound_for_export_and_loader(exported, folder, tmp_path):
    """An export the loader would refuse is refused by export itself; the loader takes the largest export allows."""
    from fxcache.export.manifest import MAX_NUM_STEPS

    with pytest.raises(fxcache.ConfigError, match=f"num_steps must be an int from 1 to {MAX_NUM_STEPS}"):
        fxcache.export(make_model("dit"), _example(), "fora", out_dir=str(tmp_path / "out"),
                       num_steps=MAX_NUM_STEPS + 1)
    config = fxcache.config.make_config("fora", interval=3)

    def longest(d):
        d["num_steps"] = MAX_NUM_STEPS
        artifact = {a["plan"]["kind"]: i for i, a in enumerate(d["artifacts"])}
        d["schedule"] = [artifact[config.step_kind(s).value] for s in range(MAX_NUM_STEPS)]

    _edit(folder, longest)
    assert CachedSession(folder).manifest.num_steps == MAX_NUM_STEPS
    _edit(folder, lambda d: d.update(num_steps=MAX_NUM_STEPS + 1))
    with pytest.raises(ExportError, match="manifest field num_steps"):
        CachedSession(folder)


# -- exports in a row do not accumulate -----------------------------------------------------------------------------

def test_exports_in_a_row_leave_no_backend_cache_or_dynamo_entry(monkeypatch, tmp_path):
    """Each export traces through a forward code object of its own and frees its tracing backend: ten exports of
    one model neither hit Dynamo's recompile limit (8 by default) nor use up the one the user's own
    torch.compile of the class then needs, and keep no caches alive. The ONNX writer is stubbed (what piles up
    is the tracing's: ONNX export would only make the test slower)."""
    import gc

    from fxcache.api import CacheBackend
    from fxcache.backends.onnx import OnnxFormat as OnnxWriter

    def stub(self, gm, inputs, in_specs, out_specs, stem, kind):
        open(stem + self.suffix, "wb").close()
        return os.path.basename(stem + self.suffix)

    monkeypatch.setattr(OnnxWriter, "write", stub)
    model = make_model("dit")
    gc.collect()
    before = {id(b) for b in gc.get_objects() if type(b) is CacheBackend}
    with torch._dynamo.config.patch(recompile_limit=8):
        for _ in range(10):
            fxcache.export(model, _example(), "fora", out_dir=str(tmp_path / "out"), num_steps=2, check=False)
    gc.collect()
    left = [b for b in gc.get_objects() if type(b) is CacheBackend and id(b) not in before]
    assert left == [], f"{len(left)} tracing backends still alive, holding {sum(b.cache_bytes() for b in left)} bytes"
    assert torch._dynamo.eval_frame._debug_get_cache_entry_list(type(model).forward.__code__) == []
    backend = fxcache.cache_backend("fora", lowering="eager", interval=3)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):  # no entry of the exports in its way
        for t in (900, 800):
            compiled(**{**_example(), "timestep": torch.full((2,), t)})
    assert [r["kind"] for r in fxcache.stats(backend)] == ["full", "reuse"]


# -- the manifest against the artifacts: every input present, static, with the runtime's key format -----------------

def _add_input(folder, kind, role, key, shape, dtype="float32", name="bogus"):
    def add(d):
        artifact = next(a for a in d["artifacts"] if a["plan"]["kind"] == kind)
        artifact["inputs"].append({"name": name, "role": role, "key": key, "shape": shape, "dtype": dtype})

    _edit(folder, add)


@pytest.mark.parametrize("role,key,shape,dtype,message", [
    ("idx", {"slot": "bogus"}, [2, 1], "int64", ".key.slot must be one of"),
    ("idx", {"slot": "indices", "tokens": "abc"}, [2, 1], "int64", ".key.tokens must be an int from 1"),
    ("idx", {"slot": "indices", "tokens": 0}, [2, 1], "int64", ".key.tokens must be an int from 1"),
    ("idx", {"slot": "indices"}, [2, 1], "int64", ".key must have exactly the fields slot, tokens"),
    ("idx", {"slot": "labels", "tokens": 16}, [2, 1], "int64", ".key.slot must be one of indices for role idx"),
    ("idx", {"slot": "indices", "tokens": 16}, [], "int64", ": shape must be \\(units, k\\) with k <= tokens=16"),
    ("idx", {"slot": "indices", "tokens": 16}, [2, 17], "int64", ": shape must be \\(units, k\\) with k <= tokens=16"),
    ("idx", {"slot": "indices", "tokens": 16}, [2, 4], "float32", ": dtype must be int64"),
    ("kinit", {"slot": "kmeans_init", "tokens": 99999999999}, [4], "int64", ".key.tokens must be an int from 1"),
    ("coef", {"slot": "taylor_coef"}, [2, 2], "float32", ": shape must be \\(n,\\)"),
    ("warm", {"slot": "warm"}, [2], "float32", ": shape must be \\[1\\]"),
    ("cache", None, [2], "float32", " lacks key"),
])
def test_runtime_made_inputs_are_checked_at_load(folder, role, key, shape, dtype, message):
    _add_input(folder, "reuse", role, key, shape, dtype)
    if key is None:
        _edit(folder, lambda d: d["artifacts"][1]["inputs"][-1].pop("key"))
    with pytest.raises(ExportError, match="manifest field artifacts\\[1\\].inputs\\[\\d+\\]" + message):
        CachedSession(folder)


@pytest.mark.parametrize("kind,role,key", [("reuse", "rand", {"slot": "score_draw", "unit": "x"}),
                                          ("full", "cache", {"slot": "unit", "unit": "zz", "output": 0}),
                                          ("reuse", "state", {"slot": "stale", "unit": "s"})])
def test_manifest_inputs_missing_from_the_artifact_are_refused_before_allocation(folder, monkeypatch, kind, role,
                                                                                 key):
    _add_input(folder, kind, role, key, [2**31 - 1, 2**31 - 1])
    allocated = []
    for name in ("zeros", "rand", "randperm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: allocated.append(a) or _real(*a, **k))
    with pytest.raises(ExportError, match="lists input 'bogus'.*which the artifact does not have"):
        CachedSession(folder)
    assert not allocated


def test_symbolic_dimensions_in_an_artifact_are_refused(folder):
    import onnx

    path = os.path.join(folder, "reuse.onnx")
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, path)
    redigest(folder)
    with pytest.raises(ExportError, match="symbolic shape \\['batch'"):
        CachedSession(folder)


# -- the config against the artifacts ----------------------------------------------------------------------------

def _drop_reuse(d):
    d["artifacts"] = [a for a in d["artifacts"] if a["plan"]["kind"] != "reuse"]
    d["schedule"] = [0 for _ in d["schedule"]]


def _as_duca(d):
    d["method"] = "duca"
    d["config"] = fxcache.config.make_config("duca").to_dict()


def _as_taylorseer_order_0(d):  # a FORECAST artifact whose Taylor coefficients are those of another order
    d["method"] = "taylorseer"
    d["config"] = fxcache.config.make_config("taylorseer", interval=3, order=0, warmup_steps=1).to_dict()
    plan = d["artifacts"][1]["plan"]
    plan["kind"] = "forecast"
    for block in plan["blocks"]:
        block["kind"] = "forecast"
    d["artifacts"][1]["inputs"].append({"name": "taylor_coef", "role": "coef", "key": {"slot": "taylor_coef"},
                                        "shape": [3], "dtype": "float32"})


@pytest.mark.parametrize("edit,message", [
    (_drop_reuse, "schedule\\[1\\] runs artifacts\\[0\\], a full plan, but its config FORAConfig.* plans reuse"),
    (lambda d: d["config"].update(method="duca"), "config.method is 'duca' but method is 'fora'"),
    (_as_duca, "schedule\\[1\\] runs artifacts\\[1\\], a reuse plan, but its config DuCaConfig.* plans partial"),
    (lambda d: d["schedule"].__setitem__(1, 0), "schedule\\[1\\] runs artifacts\\[0\\], a full plan"),
    (lambda d: d["artifacts"][1]["plan"]["blocks"].pop(), "artifacts\\[1\\].plan.blocks must be one entry per block"),
    (_as_taylorseer_order_0, "artifacts\\[1\\].inputs: taylor_coef has shape \\[3\\], but config order=0 needs "
                             "\\[1\\]"),
])
def test_the_config_must_match_the_artifacts(folder, edit, message):
    """Checked at load: otherwise a missing variant is a KeyError at the first cached step, a Taylor order that
    differs an onnxruntime error mid-generation."""
    _edit(folder, edit)
    with pytest.raises(ExportError, match="manifest field " + message):
        CachedSession(folder)


# -- load-time errors are ExportErrors, keyword arguments ConfigErrors -------------------------------------------

def test_an_integer_literal_too_long_to_convert_is_an_export_error(folder):
    path = os.path.join(folder, "manifest.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"num_steps": 4', '"num_steps": ' + "9" * 5000, 1))
    with pytest.raises(ExportError, match="not valid JSON"):
        CachedSession(folder)


@pytest.mark.parametrize("key", ["__class__", "__dict__", "items", "pop", "_private", ""])
def test_model_config_keys_that_would_break_the_config_object_are_refused(folder, key):
    _edit(folder, lambda d: d["model_config"].__setitem__(key, 1))
    with pytest.raises(ExportError, match="manifest field model_config key"):
        CachedSession(folder)


def test_model_config_values_must_be_json(exported):
    data = json.load(open(os.path.join(exported, "manifest.json")))
    data["model_config"]["sample_size"] = [{"nested": {1, 2}}]
    with pytest.raises(ExportError, match="manifest field model_config\\['sample_size'\\] must be JSON"):
        Manifest.from_dict(data)


@pytest.mark.parametrize("value", ["False", "no", "true", "", 1, 0, None, []])
def test_only_a_bool_is_trust_remote_code(exported, value, monkeypatch):
    loaded = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: loaded.append(a))
    with pytest.raises(fxcache.ConfigError, match="trust_remote_code must be True or False"):
        CachedSession(exported, trust_remote_code=value)
    assert not loaded


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_branches=0), "max_branches must be an int >= 1"),
    (dict(max_branches=-1), "max_branches must be an int >= 1"),
    (dict(max_branches="3"), "max_branches must be an int >= 1"),
    (dict(max_records=-1), "max_records must be an int >= 1"),
    (dict(max_records=1.5), "max_records must be an int >= 1"),
    (dict(providers="CPUExecutionProvider"), "providers must be a non-empty list of onnxruntime"),
    (dict(providers=[1]), "providers must be .* got the entry 1"),
    (dict(providers=["NopeProvider"]), "unknown onnxruntime provider 'NopeProvider'"),
])
def test_session_keyword_arguments_are_checked(exported, kwargs, message):
    with pytest.raises(fxcache.ConfigError, match=message):
        CachedSession(exported, **kwargs)


@pytest.fixture(scope="module")
def session(exported):
    return CachedSession(exported)


@pytest.mark.parametrize("name,value,message", [
    ("timestep", None, "input 'timestep' must be a tensor or a number, got NoneType"),
    ("timestep", "900", "input 'timestep' must be a tensor or a number, got str"),
    ("timestep", 2**70, "input 'timestep' must be a tensor or a number, got int, which torch cannot convert"),
    ("timestep", float("nan"), "input 'timestep' \\(the timestep\\) must be a finite number"),
    ("class_labels", None, "input 'class_labels' must be a tensor, got NoneType"),
    ("hidden_states", {"a": 1}, "input 'hidden_states' must be a tensor, got dict"),
])
def test_bad_call_inputs_name_the_input(session, name, value, message):
    with pytest.raises(fxcache.ConfigError, match=message):
        session(**{**_example(), name: value})
    session.reset()


def test_a_fractional_timestep_into_an_integer_export_is_refused(session):
    """DiT exported with int64 timesteps: t=900.5 would run as 900 (the model at 900.5 differs), so it is
    refused; a float that is an integer value runs as that integer."""
    example = _example()
    model = make_model("dit")
    with torch.no_grad():
        at = {t: model(**{**example, "timestep": torch.full((2,), t)})[0] for t in (900.0, 900.5)}
    assert (at[900.5] - at[900.0]).abs().max() > 1e-3
    session.reset()
    got = session(**{**example, "timestep": torch.full((2,), 900)})[0]
    session.reset()
    assert torch.equal(session(**{**example, "timestep": 900.0})[0], got)
    assert (got - at[900.0]).abs().max() < 1e-4
    session.reset()
    for t in (900.5, torch.full((2,), 900.5)):
        with pytest.raises(fxcache.ConfigError, match="'timestep' \\(the timestep\\).*900.5.*the export takes int64"):
            session(**{**example, "timestep": t})
    session.reset()


def test_a_tensorrt_program_must_match_its_manifest(folder, monkeypatch):
    """Once trusted, a saved program's inputs and outputs are still checked against the manifest before use."""
    import importlib

    trt = importlib.import_module("fxcache.backends.tensorrt")
    monkeypatch.setattr(trt, "require_tensorrt", lambda why: None)

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    program = torch.export.export(Double(), (torch.ones(2, 4, 8, 8),))

    def as_tensorrt(d):
        d["format"] = "tensorrt"
        for a in d["artifacts"]:
            a["file"] = a["file"].replace(".onnx", ".ep")
            torch.export.save(program, os.path.join(folder, a["file"]))

    _edit(folder, as_tensorrt)
    redigest(folder)
    with pytest.raises(ExportError, match="the manifest lists 3 inputs of full.ep, the program has 1"):
        CachedSession(folder, trust_remote_code=True)
