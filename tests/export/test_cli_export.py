"""`fxcache export` on a committed reference and on a saved diffusers transformer with an inputs file."""

from __future__ import annotations

import os

import pytest
import torch

from fxcache.cli import main
from fxcache.deploy import CachedSession
from fxcache.export import read_manifest

from helpers import loop_inputs, make_model, rel_err

pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (in the dev extra)")


def test_export_a_reference_then_run_it(tmp_path, capsys, monkeypatch):
    """The committed reference, even where the working directory holds a folder of its name (a reference someone
    trained, or anyone's files): a reference name is looked up in the package, never in the cwd."""
    from fxcache.quality.reference import CHECKPOINTS, build, load, save

    monkeypatch.chdir(tmp_path)
    save(build("dit", seed=1), "dit")  # a loadable reference of other weights
    out = str(tmp_path / "export")
    assert main(["export", "--reference", "dit", "--method", "fora", "-o", "interval=2", "--num-steps", "6",
                 "--out", out]) == 0
    text = capsys.readouterr().out
    assert "full.onnx" in text and "reuse.onnx" in text and "FRFRFR" in text
    manifest = read_manifest(out)
    assert manifest.method == "fora" and manifest.config["interval"] == 2
    committed, planted = load(os.path.join(CHECKPOINTS, "dit")), load(str(tmp_path / "dit"))
    kw = committed.example_inputs(1)
    with torch.no_grad():
        want = committed.transformer(**kw, return_dict=False)[0]
        other = planted.transformer(**kw, return_dict=False)[0]
    got = CachedSession(out)(**kw, return_dict=False)[0]
    assert got.shape == kw["hidden_states"].shape
    assert rel_err(got, want) < 1e-4 and rel_err(got, other) > 1e-2
    with torch.no_grad():  # the library's load too
        assert torch.equal(load("dit").transformer(**kw, return_dict=False)[0], want)


def test_export_a_saved_model_with_an_inputs_file(tmp_path):
    from safetensors.torch import save_file

    model = make_model("sd3")
    model.save_pretrained(str(tmp_path / "model"))
    kw = {k: v for k, v in loop_inputs("sd3", 1, batch=2)[0].items() if isinstance(v, torch.Tensor)}
    save_file(kw, str(tmp_path / "inputs.safetensors"))
    out = str(tmp_path / "export")
    assert main(["export", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "inputs.safetensors"),
                 "--num-steps", "4", "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["full.onnx", "manifest.json", "partial.onnx", "skip.onnx"]


def test_export_errors_are_reported_not_raised(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["export", "--format", "tensorrt", "--out", str(tmp_path)]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["export", "--model", str(tmp_path / "model")])  # --model without --inputs
    assert "--model needs --inputs" in capsys.readouterr().err
    assert main(["export", "--method", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown cache method 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--threads", "0"], "argument --threads: expected an int >= 1, got 0"),
    (["demo", "--steps", "x"], "argument --steps: expected an int >= 1, got 'x'"),
    (["export", "--batch", "0"], "argument --batch: expected an int >= 1, got 0"),
    (["export", "--batch", "-1"], "argument --batch: expected an int >= 1, got -1"),
    (["export", "--num-steps", "10001"], "argument --num-steps: expected at most 10000 steps"),
    (["export", "--model", "/nonexistent/model", "--inputs", "x"], "argument --model: no such folder"),
    (["export", "--model", "{tmp}", "--inputs", "x"], "has no config.json: not a diffusers model folder"),
    (["export", "--model", "{model}", "--inputs", "{tmp}/nope.safetensors"], "argument --inputs: no such file"),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, argv, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argv = [a.format(tmp=tmp_path, model=tmp_path / "model") for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_file_errors_are_one_line_and_exit_1(tmp_path, capsys):
    """Files that cannot be read or written: one line naming the file, exit status 1, no traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "bad.safetensors").write_text("not safetensors")
    cases = [
        (["demo", "--out", str(blocker / "out")], "fxcache demo: cannot create the output folder"),
        (["export", "--reference", "dit", "--out", str(blocker / "out")], "fxcache export: cannot write the export to"),
        (["export", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "bad.safetensors")],
         "fxcache export: --inputs '" + str(tmp_path / "bad.safetensors") + "' is not a readable safetensors file"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert blocker.read_text() == "x"
