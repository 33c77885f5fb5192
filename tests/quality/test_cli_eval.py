"""`fxcache eval` on a diffusers pipeline folder and `fxcache demo`, run as a user runs them (in-process, eager
lowering, few steps), checked against direct pipeline calls."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fxcache.cli import main
from fxcache.quality import t2i

ARGS = ["-a", "height=32", "-a", "width=32", "-a", "max_sequence_length=16", "-a", "true_cfg_scale=4.0",
        "-a", "negative_prompt=''"]


@pytest.fixture(scope="module")
def pipeline_folder():
    """The committed text-to-image reference: a full diffusers FluxPipeline folder."""
    return t2i.CHECKPOINT


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny local CLIP model (random weights) with the reference's tokenizer, as `--clip-model` takes."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = t2i._clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    folder = str(tmp_path_factory.mktemp("clip"))
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# scenes\na picture of two red circles on the left\n\na picture of one blue square at the top\n")
    return str(path)


def test_eval_writes_the_table_grid_plot_and_json(pipeline_folder, clip_folder, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--pipeline", pipeline_folder, "--prompts", prompts, "--methods", "duca,toca:flux",
               "--steps", "5", "--seeds", "2", "--batch-size", "2", "--repeats", "1", "--lowering", "eager",
               "--clip-model", clip_folder,
               "--out", str(out), *ARGS])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert sorted(os.listdir(out)) == ["grid.png", "pareto.png", "results.json", "table.md"]
    results = json.load(open(out / "results.json"))
    rows = {r["label"]: r for r in results["rows"]}
    assert list(rows)[:3] == ["uncached", "duca", "toca (flux preset)"]
    assert any(r["kind"] == "fewer steps" for r in rows.values())
    assert rows["uncached"]["psnr"] is None and rows["uncached"]["flops_speedup"] == 1.0
    for label in ("duca", "toca (flux preset)"):
        assert rows[label]["flops_speedup"] > 1.0 and rows[label]["psnr"] < 100.0
        assert 0.0 <= rows[label]["clip"] <= 100.0
    assert results["prompts"] == ["a picture of two red circles on the left", "a picture of one blue square at the top"]
    assert "| duca | 5 |" in open(out / "table.md").read()
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert grid.height > len(rows) * 160 and grid.width > 4 * 160  # a row per setting, a column per image


def test_eval_uncached_is_the_pipeline_itself_and_an_every_step_full_method_equals_it(pipeline_folder):
    """The harness's uncached images are what a user's own call gives (`generator=manual_seed(seed)` per image);
    FORA with interval 1 (every step FULL) gives the same images, and its FLOPs (fxcache's per-variant count)
    equal the uncached ones (counted on the eager transformer)."""
    from fxcache.config import make_config
    from fxcache.quality.pipeline_eval import default_steps, evaluate_pipeline, load_pipeline

    pipe = load_pipeline(pipeline_folder, torch.float32)
    assert default_steps(pipe) == 28  # FluxPipeline's own default, which --steps falls back to
    prompts = ["a picture of three green triangles at the bottom", "a picture of one cyan circle on the right"]
    call = dict(height=32, width=32, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="")
    report = evaluate_pipeline(pipe, prompts, {"full": make_config("fora", interval=1)}, steps=3, seeds=[7],
                               call_args=call, repeats=1, lowering="eager", fewer_steps=False, batch_size=1)
    direct = torch.cat([pipe(p, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="pt",
                             **call).images * 2 - 1 for p in prompts])  # a user's own calls, one prompt each
    assert (report.images["uncached"] - direct).abs().max() < 1e-6
    assert (report.images["full"] - direct).abs().max() < 1e-5
    rows = {r.label: r for r in report.rows}
    assert rows["full"].flops_speedup == pytest.approx(1.0, rel=1e-3)
    assert rows["uncached"].flops == pytest.approx(rows["full"].flops, rel=1e-3)
    assert pipe.transformer.__class__.__name__ == "FluxTransformer2DModel"  # the user's pipeline is left as it was


@pytest.mark.parametrize("argv, message", [
    (["--pipeline", "/nonexistent/pipe"], "cannot be loaded offline"),
    (["--methods", "duca,nosuch"], "unknown method 'nosuch'"),
    (["--methods", "toca:nosuch"], "preset"),
    (["-a", "no_such_arg=1"], "takes no argument no_such_arg"),
    (["-a", "num_inference_steps=3"], "set by fxcache eval: use --steps"),
])
def test_eval_bad_input_is_one_clear_line(pipeline_folder, prompts, tmp_path, capsys, argv, message):
    base = {"--pipeline": pipeline_folder, "--prompts": prompts}
    args = ["eval", "--steps", "2", "--repeats", "1", "--lowering", "eager", "--out", str(tmp_path / "o")]
    for k, v in base.items():
        if k not in argv:
            args += [k, v]
    rc = main(args + argv)
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err


def test_eval_refuses_an_empty_prompt_file(pipeline_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    rc = main(["eval", "--pipeline", pipeline_folder, "--prompts", str(empty), "--out", str(tmp_path / "o")])
    assert rc == 1 and "holds no prompt" in capsys.readouterr().err


def test_demo_labels_its_rows_and_says_what_the_picture_shows(pipeline_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--reference", pipeline_folder, "--steps", "4", "--images", "3", "--repeats", "1",
               "--lowering", "eager", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert sorted(os.listdir(out)) == ["grid.png", "pareto.png", "table.md"]
    line = next(ln for ln in printed.splitlines() if ln.startswith("In one line:"))
    assert "fewer steps" in line and "DuCa" in line and "FORA" in line
    wrote = next(ln for ln in printed.splitlines() if ln.startswith("wrote"))
    for row in ("uncached,", "DuCa", "TaylorSeer", "FORA", "steps", "|DuCa - uncached| x4", "noise floor"):
        assert row in wrote
    table = open(out / "table.md").read()
    assert "(equal compute)" in table and line[len("In one line: "):-1] in table


def _report(*rows):
    from fxcache.quality.evaluate import Report, Row

    return Report("x", 4, 50, 4.0, [Row(*r[:3], latency_speedup=r[3], psnr=r[4], equal_steps=r[5]) for r in rows], {})


def test_the_verdict_compares_each_method_with_the_fewer_steps_row_at_its_flops():
    from fxcache.cli import verdict

    report = _report(("uncached", "uncached", 50, 1.0, None, None),
                     ("A", "method", 50, 3.0, 30.0, 12), ("B", "method", 50, 2.0, 25.0, 20),
                     ("C", "method", 50, 2.5, 28.1, 17),
                     ("uncached, 12 steps (equal compute)", "fewer steps", 12, 3.9, 27.0, None),
                     ("uncached, 17 steps (equal compute)", "fewer steps", 17, 2.8, 28.0, None),
                     ("uncached, 20 steps (equal compute)", "fewer steps", 20, 2.4, 26.0, None))
    line = verdict(report)
    assert line.startswith("at equal FLOPs A beat fewer steps; fewer steps beat B; C tie with fewer steps")
    assert "A 30.0 dB vs 12 steps 27.0 dB, 3.0x vs 3.9x faster" in line
    assert "B 25.0 dB vs 20 steps 26.0 dB" in line
    everyone_loses = _report(("A", "method", 50, 3.0, 20.0, 12),
                             ("uncached, 12 steps (equal compute)", "fewer steps", 12, 3.9, 27.0, None))
    assert verdict(everyone_loses).startswith("at equal FLOPs simply taking fewer steps beats every method here")
    nothing_saved = _report(("A", "method", 50, 1.0, 60.0, 50))
    assert verdict(nothing_saved).startswith("no method saved a whole step's FLOPs")
