"""What cannot be exported, and broken or mismatched artifacts, give errors that say what and how to fix it."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import fxcache
from fxcache import ConfigError, ExportError, MissingDependencyError
from fxcache.deploy import CachedSession

from helpers import loop_inputs, make_model, redigest, rel_err

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (in the dev extra)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pixart_duca"))
    fxcache.export(make_model("pixart"), loop_inputs("pixart", 1, batch=2)[0], "duca", out_dir=folder, num_steps=6)
    return folder


@pytest.fixture
def copy(exported, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(exported, dst)
    return dst


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(ExportError, match="no export folder"):
        CachedSession(str(tmp_path / "nope"))
    with pytest.raises(ExportError, match="no manifest.json"):
        CachedSession(str(tmp_path))


def test_corrupt_manifest(copy):
    path = os.path.join(copy, "manifest.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        CachedSession(copy)


def test_manifest_from_another_format_version(copy):
    path = os.path.join(copy, "manifest.json")
    data = json.load(open(path))
    data["format_version"] = 99
    json.dump(data, open(path, "w"))
    with pytest.raises(ExportError, match="format_version 99 is not supported"):
        CachedSession(copy)


def test_missing_and_broken_artifacts(copy):
    os.rename(os.path.join(copy, "skip.onnx"), os.path.join(copy, "skip.moved"))
    with pytest.raises(ExportError, match="'skip.onnx' \\(skip variant\\).* is missing"):
        CachedSession(copy)
    with open(os.path.join(copy, "skip.onnx"), "wb") as f:
        f.write(b"definitely not an onnx model")
    with pytest.raises(ExportError, match="artifact 'skip.onnx' does not match its digest"):
        CachedSession(copy)
    redigest(copy)
    with pytest.raises(ExportError, match="onnxruntime could not load .*skip.onnx"):
        CachedSession(copy)


def test_inputs_that_do_not_match_the_export(exported):
    session = CachedSession(exported)
    kw = loop_inputs("pixart", 1, batch=1)[0]
    with pytest.raises(ConfigError, match="shape .*exported for .*shapes are static"):
        session(**kw)
    kw = loop_inputs("pixart", 1, batch=2)[0]
    del kw["encoder_hidden_states"]
    with pytest.raises(ConfigError, match="missing input 'encoder_hidden_states'"):
        session(**kw)


def test_bad_export_requests(tmp_path):
    model, kw = make_model("pixart"), loop_inputs("pixart", 1, batch=2)[0]
    with pytest.raises(ConfigError, match="format must be one of onnx, tensorrt"):
        fxcache.export(model, kw, "duca", format="engine", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="example_inputs must be a non-empty dict"):
        fxcache.export(model, [kw["hidden_states"]], "duca", out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown cache method .nope."):
        fxcache.export(model, kw, "nope", out_dir=str(tmp_path))


class Broken(torch.nn.Module):
    """A transformer whose forward breaks the Dynamo graph."""

    def __init__(self):
        super().__init__()
        self.inner = make_model("pixart")

    def forward(self, **kw):
        out = self.inner(**kw)
        torch._dynamo.graph_break()
        return out


def test_graph_breaks_and_uncacheable_models_are_refused(tmp_path):
    kw = loop_inputs("pixart", 1, batch=2)[0]
    with pytest.raises(ExportError, match="whole transformer in one graph"):
        fxcache.export(Broken(), kw, "duca", out_dir=str(tmp_path))
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp

        def forward(self, hidden_states, timestep, return_dict=False):
            return (self.mlp(hidden_states) * timestep[:, None],)

    with pytest.raises(ExportError, match="cannot be cached"):
        fxcache.export(NoBlocks(), dict(hidden_states=torch.randn(2, 4), timestep=torch.ones(2)), "duca",
                       out_dir=str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_tensorrt_without_cuda_says_what_to_install(tmp_path):
    with pytest.raises(MissingDependencyError, match="CUDA GPU.*pip install 'fxcache\\[tensorrt\\]'"):
        fxcache.export(make_model("pixart"), loop_inputs("pixart", 1, batch=2)[0], "duca", format="tensorrt",
                       out_dir=str(tmp_path))
    with pytest.raises(MissingDependencyError, match="lowering='tensorrt' needs a CUDA GPU"):
        fxcache.cache_backend("duca", lowering="tensorrt")


def test_an_op_without_onnx_translation_names_the_variant_and_the_op(tmp_path, monkeypatch):
    """ClusCa's k-means measures L1 distances with torch.cdist, which ONNX lacks; export normally swaps in a
    translatable form. Without that swap the error must say which variant and which op."""
    import fxcache.ops.kmeans as kmeans

    monkeypatch.setattr(kmeans.torch.compiler, "is_exporting", lambda: False)
    config = fxcache.ClusCaConfig(interval=3, clusters=4, warmup_steps=1, kmeans_iters=1)
    with pytest.raises(ExportError, match="the full variant could not be exported to ONNX.*aten._cdist_forward"):
        fxcache.export(make_model("dit"), loop_inputs("dit", 1, batch=2)[0], config, out_dir=str(tmp_path))


def test_an_onnx_conversion_error_is_plain_text_and_names_prims_ops(tmp_path):
    """The exporter colours its messages and names decomposed ops as prims.*: the ExportError keeps neither the
    colour codes out nor the op from the user (torch.special.bessel_j0 has no ONNX translation)."""

    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    from fxcache.backends.onnx import FORMAT

    class Spec:
        def __init__(self, name):
            self.name = name

    gm = torch.fx.symbolic_trace(Bessel())
    with pytest.raises(ExportError) as info:
        FORMAT.write(gm, [torch.randn(4)], [Spec("x")], [Spec("y")], str(tmp_path / "bessel"), "full")
    message = str(info.value)
    assert "the full variant could not be exported to ONNX" in message and "\x1b" not in message
    assert "bessel_j0" in message


def test_scalar_timesteps_are_broadcast_like_the_transformer_does(exported):
    session = CachedSession(exported)
    kw = loop_inputs("pixart", 1, batch=2)[0]
    expected = session(**kw)[0]
    session.reset()
    kw["timestep"] = float(kw["timestep"][0])
    assert torch.equal(session(**kw)[0], expected)


@pytest.mark.parametrize("change,message", [
    (dict(foo=torch.zeros(1)), "example_inputs has 'foo', which PixArtTransformer2DModel.forward does not take"),
    (dict(timestep=900.0), "example_inputs\\['timestep'\\] is the timestep.*must be a tensor.*got float 900.0"),
    (dict(timestep=None), "example_inputs\\['timestep'\\] is the timestep.*got NoneType"),
    (dict(hidden_states=None), None),
])
def test_example_inputs_are_checked_against_the_forward_before_tracing(tmp_path, change, message):
    kw = {**loop_inputs("pixart", 1, batch=2)[0], **change}
    if message is None:  # drop the input instead: a required parameter not given
        del kw["hidden_states"]
        message = "example_inputs lacks 'hidden_states', which PixArtTransformer2DModel.forward requires"
    with pytest.raises(ConfigError, match=message):
        fxcache.export(make_model("pixart"), kw, "duca", out_dir=str(tmp_path / "out"))
    kw = loop_inputs("pixart", 1, batch=2)[0]
    del kw["timestep"]
    with pytest.raises(ConfigError, match="example_inputs lacks the timestep 'timestep'"):
        fxcache.export(make_model("pixart"), kw, "duca", out_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


class Failing(torch.nn.Module):
    """A forward that fails on its inputs: Dynamo reports it as an 'Observed exception'."""

    def __init__(self):
        super().__init__()
        self.inner = make_model("pixart")

    def forward(self, hidden_states, timestep, return_dict=False, **kw):
        scale = timestep.resolution  # no such attribute
        return self.inner(hidden_states * scale, timestep, return_dict=return_dict, **kw)


def test_a_dynamo_failure_says_what_the_model_raised_and_where(tmp_path):
    with pytest.raises(ExportError, match="whole transformer in one graph") as info:
        fxcache.export(Failing(), loop_inputs("pixart", 1, batch=2)[0], "duca", out_dir=str(tmp_path / "out"))
    message = str(info.value)
    assert "AttributeError" in message and "resolution" in message
    assert "scale = timestep.resolution" in message


def test_an_argument_the_export_did_not_take_is_refused(exported):
    """PixArt's pipeline passes encoder_attention_mask: a session exported without it would ignore it and return
    the unmasked model's output. Any non-None argument the export did not take is refused, naming it."""
    session = CachedSession(exported)
    model = make_model("pixart")
    kw = loop_inputs("pixart", 1, batch=2)[0]
    mask = torch.ones(2, 6)
    mask[:, 3:] = 0
    with torch.no_grad():
        masked = model(**kw, encoder_attention_mask=mask)[0]
        unmasked = model(**kw)[0]
    got = session(**kw)[0]
    assert rel_err(got, unmasked) < 1e-4 and rel_err(got, masked) > 1e-2  # what ignoring the mask would give
    takes = "\\(it takes hidden_states, timestep, encoder_hidden_states\\)"
    with pytest.raises(ConfigError, match=f"the export has no input 'encoder_attention_mask' {takes}"):
        session(**kw, encoder_attention_mask=mask)
    with pytest.raises(ConfigError, match=f"the export has no input 'added_cond_kwargs.resolution' {takes}"):
        session(**{**kw, "added_cond_kwargs": {"resolution": torch.ones(2, 2), "aspect_ratio": None}})
    with pytest.raises(ConfigError, match="the export has no input 'attention_kwargs.scale'"):
        session(**kw, attention_kwargs={"scale": 0.5})
    with pytest.raises(ConfigError, match="keyword arguments"):
        session(kw.pop("hidden_states"), mask, **kw)


def test_arguments_that_carry_no_data_are_accepted(exported):
    """None, dicts of None and return_dict: what pipelines pass on every call without changing the output."""
    session = CachedSession(exported)
    kw = loop_inputs("pixart", 1, batch=2)[0]
    expected = session(**kw)[0]
    session.reset()
    assert kw["return_dict"] is False and kw["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    got = session(**kw, encoder_attention_mask=None, joint_attention_kwargs=None, attention_kwargs={})[0]
    assert torch.equal(got, expected)


def test_a_lossy_timestep_cast_is_refused(exported):
    """A float timestep into a float export is cast only where the value survives: float64 t that float32
    cannot hold is refused, one it holds is accepted."""
    session = CachedSession(exported)
    kw = loop_inputs("pixart", 1, batch=2)[0]
    expected = session(**kw)[0]
    session.reset()
    assert torch.equal(session(**{**kw, "timestep": kw["timestep"].double()})[0], expected)
    session.reset()
    with pytest.raises(ConfigError, match="'timestep'.*float64.*the export takes float32"):
        session(**{**kw, "timestep": torch.full((2,), 900.1, dtype=torch.float64)})
