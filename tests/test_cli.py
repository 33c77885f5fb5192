"""The command line on bad input: one line on stderr saying what was wrong and what is accepted, never a traceback.
Usage errors (a value of the wrong form, found while parsing) exit 2 as argparse's do; errors found later (a file,
a pipeline, a method list) exit 1."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fxcache.cli import main
from fxcache.quality import t2i
from fxcache.testing import make_inputs, make_model

SCENES = t2i.CHECKPOINT  # the committed text-to-image reference: a diffusers FluxPipeline folder
CALL = ["-a", "height=32", "-a", "width=32", "-a", "max_sequence_length=16"]


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A saved tiny DiT and its example inputs, as `fxcache check --model --inputs` takes them."""
    folder = tmp_path_factory.mktemp("dit")
    make_model("dit").save_pretrained(folder / "model")
    save_file({k: v for k, v in make_inputs("dit").items() if isinstance(v, torch.Tensor)},
              str(folder / "inputs.safetensors"))
    return ["--model", str(folder / "model"), "--inputs", str(folder / "inputs.safetensors")]


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a picture of two red circles on the left\n")
    return str(path)


def one_line(err: str) -> str:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def usage_error(argv, capsys) -> str:
    """The one stderr line of a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return one_line(capsys.readouterr().err)


@pytest.mark.parametrize("methods", ["", ",", " , "])
def test_check_refuses_an_empty_method_list(dit_folder, capsys, methods):
    """A check of no method would pass having checked no caching at all."""
    rc = main(["check", *dit_folder, "--methods", methods])
    err = one_line(capsys.readouterr().err)
    assert rc == 1 and "--methods names no method" in err and "fora" in err


def test_check_takes_the_timestep_input_by_index_and_refuses_an_empty_one(dit_folder, capsys):
    """`--timestep-input 1` is DiT's forward parameter #1 (`timestep`), as `timestep_input=1` is."""
    assert main(["check", *dit_folder, "--methods", "fora", "--steps", "3", "--timestep-input", "1"]) == 0
    assert "timestep_input=1" in capsys.readouterr().out
    err = usage_error(["check", *dit_folder, "--timestep-input", ""], capsys)
    assert "argument --timestep-input" in err and "name or index" in err


@pytest.mark.parametrize("device, says", [
    ("bogus", "'bogus' is not a torch device"),
    ("cuda:x", "'cuda:x' is not a torch device"),
    ("cuda", "'cuda' is not available on this machine"),
    ("cuda:0", "'cuda:0' is not available on this machine"),
    ("meta", "'meta' is not available on this machine"),
])
def test_eval_refuses_a_device_it_cannot_run_on(prompts, tmp_path, capsys, monkeypatch, device, says):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    err = usage_error(["eval", "--pipeline", SCENES, "--prompts", prompts, "--device", device,
                       "--out", str(tmp_path / "o")], capsys)
    assert err.startswith("fxcache eval: error: argument --device:") and says in err and "accepted here: cpu" in err
    assert not (tmp_path / "o").exists()  # refused before anything was done


def test_eval_refuses_a_missing_or_non_clip_model_folder(prompts, tmp_path, capsys):
    base = ["eval", "--pipeline", SCENES, "--prompts", prompts, "--out", str(tmp_path / "o")]
    err = usage_error(base + ["--clip-model", str(tmp_path / "nowhere")], capsys)
    assert "argument --clip-model: no such folder" in err
    (tmp_path / "empty").mkdir()
    err = usage_error(base + ["--clip-model", str(tmp_path / "empty")], capsys)
    assert "argument --clip-model" in err and "no config.json" in err and "CLIPModel" in err


@pytest.mark.parametrize("arg, says", [
    ("height=-32", "height=-32: a size in pixels, an int >= 1"),
    ("height=0", "height=0: a size in pixels, an int >= 1"),
    ("width=32.5", "width=32.5: a size in pixels, an int >= 1"),
    ("height=abc", "height='abc': a size in pixels, an int >= 1"),
    ("true_cfg_scale=abc", "true_cfg_scale='abc': FluxPipeline takes a finite number"),
    ("true_cfg_scale=1e999", "true_cfg_scale=inf: FluxPipeline takes a finite number"),
    ("max_sequence_length=16.0", "max_sequence_length=16.0: FluxPipeline takes an int"),
    ("return_dict=False", "return_dict is set by fxcache eval"),  # its images are read from the output object
])
def test_eval_refuses_call_arguments_of_the_wrong_type_or_size(prompts, tmp_path, capsys, arg, says):
    """Checked against the pipeline's own signature before any sampling; a size of 0 is refused too (the pipeline
    would quietly take its default size instead)."""
    rc = main(["eval", "--pipeline", SCENES, "--prompts", prompts, "--steps", "2", "--repeats", "1",
               "--lowering", "eager", "--methods", "fora", "--no-fewer-steps", "--out", str(tmp_path / "o"),
               *CALL, "-a", arg])
    err = one_line(capsys.readouterr().err)
    assert rc == 1 and err.startswith("fxcache eval: ") and says in err, err


@pytest.mark.parametrize("argv, says", [
    (["--guidance", "nan"], "argument --guidance: expected a finite number, got 'nan'"),
    (["--guidance", "inf"], "argument --guidance: expected a finite number, got 'inf'"),
    (["--images", "1"], "argument --images: expected an int >= 2"),
    (["--lowering", "nope"], "argument --lowering: invalid choice: 'nope'"),
])
def test_demo_usage_errors_are_one_line(tmp_path, capsys, argv, says):
    err = usage_error(["demo", "--out", str(tmp_path / "o"), "--steps", "2", "--repeats", "1", "--lowering", "eager",
                       *argv], capsys)
    assert err.startswith("fxcache demo: error: ") and says in err


def test_demo_reports_a_reference_folder_diffusers_cannot_load(tmp_path, capsys):
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "model_index.json").write_text("{}")
    rc = main(["demo", "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "o")])
    err = one_line(capsys.readouterr().err)
    assert rc == 1 and f"--reference {str(tmp_path / 'ref')!r} cannot be loaded" in err


# -- results: written atomically, never through a link ---------------------------------------------------------------


def plant_links(out, names, tmp_path) -> dict:
    """A symbolic link at each result name in `out`, to a file outside it that must be left as it was."""
    out.mkdir(parents=True, exist_ok=True)
    victims = {}
    for name in names:
        victim = tmp_path / f"victim-{name}"
        victim.write_text(f"not yours: {name}")
        (out / name).symlink_to(victim)
        victims[name] = victim
    return victims


def assert_replaced(out, victims):
    """Every planted link became a regular file of its own; what the links pointed to is untouched; no temporary
    file is left behind."""
    for name, victim in victims.items():
        assert victim.read_text() == f"not yours: {name}"
        assert not (out / name).is_symlink() and (out / name).is_file() and (out / name).stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(victims)


def test_the_writers_replace_a_planted_link_and_leave_no_half_file(tmp_path):
    from fxcache.quality.evaluate import Row, pareto_plot
    from fxcache.quality.files import write_json, write_text
    from fxcache.quality.grids import save_labelled_grid
    from fxcache.quality.sampling import save_grid

    out = tmp_path / "out"
    victims = plant_links(out, ["t.md", "r.json", "grid.png", "digits.png", "plot.png"], tmp_path)
    write_text(str(out / "t.md"), "| table |\n")
    write_json(str(out / "r.json"), {"rows": [1, 2]})
    save_labelled_grid([("row", torch.zeros(2, 3, 8, 8))], str(out / "grid.png"), tile=8)
    save_grid(torch.zeros(4, 1, 8, 8), str(out / "digits.png"), nrow=2)

    class Report:
        model, images, steps, guidance = "m", 1, 2, 1.0
        rows = [Row("uncached", "uncached", 2, 1.0, None, 1.0, 1.0)]

    pareto_plot(Report(), str(out / "plot.png"))
    assert_replaced(out, victims)
    assert (out / "t.md").read_text() == "| table |\n" and (out / "r.json").read_text() == '{"rows": [1, 2]}'
    from PIL import Image

    for name in ("grid.png", "digits.png", "plot.png"):
        assert Image.open(out / name).format == "PNG"
    # a writer that fails half-way leaves the previous file as it was, and no temporary file
    with pytest.raises(TypeError):
        write_json(str(out / "r.json"), {"rows": object()})
    assert (out / "r.json").read_text() == '{"rows": [1, 2]}'
    assert sorted(p.name for p in out.iterdir()) == sorted(victims)


def test_a_linked_results_folder_is_refused(tmp_path):
    from fxcache.quality.files import LinkedFolderError, output_folder, write_text

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for path in (str(tmp_path / "link"), str(tmp_path / "link") + "/"):
        with pytest.raises(LinkedFolderError, match="is a symbolic link"):
            output_folder(path)
    with pytest.raises(LinkedFolderError, match="is a symbolic link"):
        write_text(str(tmp_path / "link" / "table.md"), "x")
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_a_linked_out_folder_is_refused_before_any_work(prompts, tmp_path, capsys, command):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    args = (["eval", "--pipeline", SCENES, "--prompts", prompts, "--methods", "fora", *CALL] if command == "eval"
            else ["demo", "--images", "2", "--threads", "1"])
    rc = main(args + ["--steps", "2", "--repeats", "1", "--lowering", "eager", "--out", str(tmp_path / "link")])
    printed = capsys.readouterr()
    err = one_line(printed.err)
    assert rc == 1 and err.startswith(f"fxcache {command}: --out {str(tmp_path / 'link')!r} is a symbolic link (to ")
    assert "pass the folder it points to, or another" in err and printed.out == ""  # refused before it began
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_eval_replaces_links_planted_in_its_out_folder(prompts, tmp_path, capsys):
    out = tmp_path / "out"
    victims = plant_links(out, ["table.md", "results.json", "grid.png", "pareto.png"], tmp_path)
    rc = main(["eval", "--pipeline", SCENES, "--prompts", prompts, "--steps", "2", "--repeats", "1", "--lowering",
               "eager", "--methods", "fora", "--no-fewer-steps", "--out", str(out), *CALL])
    assert rc == 0, capsys.readouterr().err
    assert_replaced(out, victims)
    assert "| fora | 2 |" in (out / "table.md").read_text()


def test_demo_replaces_links_planted_in_its_out_folder(tmp_path, capsys):
    out = tmp_path / "out"
    victims = plant_links(out, ["table.md", "grid.png", "pareto.png"], tmp_path)
    rc = main(["demo", "--steps", "2", "--images", "2", "--repeats", "1", "--lowering", "eager", "--threads", "1",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert_replaced(out, victims)
    assert "(equal compute)" in (out / "table.md").read_text()


def test_eval_method_specs_take_options_and_give_the_sampler_steps_to_step_counting_rules():
    from fxcache.cli import CommandError, _method_spec

    label, config = _method_spec("dbcache@first_blocks=1@threshold=0.12", 20)
    assert (config.first_blocks, config.threshold, config.warmup_steps) == (1, 0.12, 8)
    assert label == "dbcache first_blocks=1 threshold=0.12"
    assert _method_spec("teacache:flux@threshold=0.4", 20)[1].num_steps == 20  # TeaCache's last step is the 20th
    assert _method_spec("toca:flux", 20)[1].method == "toca"
    with pytest.raises(CommandError, match="did you mean 'threshold'"):
        _method_spec("fbcache@thresold=0.1", 20)
    with pytest.raises(CommandError, match="is not OPTION=VALUE"):
        _method_spec("fbcache@0.1", 20)
