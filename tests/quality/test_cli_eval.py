"""`fxcache eval` on a diffusers pipeline folder and `fxcache demo`, run as a user runs them (in-process, eager
lowering, few steps), checked against direct pipeline calls."""

from __future__ import annotations

import json
import math
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
    for label in ("duca", "toca (flux preset)"):  # pooled: from the mean of the per-image MSEs
        per = rows[label]["psnr_images"]
        assert len(per) == 4 and rows[label]["psnr"] == pytest.approx(
            10 * math.log10(4 / (sum(4 / 10 ** (v / 10) for v in per) / 4)), abs=1e-6)
        assert min(per) <= rows[label]["psnr"] <= max(per)
        assert len(rows[label]["seconds_runs"]) == 1 and rows[label]["paired_with"].startswith("uncached, ")
    assert rows["uncached, other seeds (noise floor)"]["psnr"] < rows["duca"]["psnr"]
    table = open(out / "table.md").read()
    lines = table.splitlines()
    assert "| GFLOPs |" in lines[0] and "| PSNR dB (pooled) | per-image PSNR min–max |" in lines[0]
    duca = next(i for i, ln in enumerate(lines) if ln.startswith("| duca | 5 |"))
    assert lines[duca + 1].startswith(f"| ↳ {rows['duca']['paired_with']} |")
    assert lines[3].startswith("| uncached, other seeds (noise floor) | 5 |")
    for line in results["verdicts"]:  # one per method, in the table file and printed
        assert f"- {line}" in table and f"  {line}" in printed
    assert [v.split(":")[0] for v in results["verdicts"]] == ["duca", "toca (flux preset)"]
    assert printed.index("estimate: up to about") < printed.index("estimate: about") < printed.index("| setting |")
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


@pytest.mark.parametrize("threads, warned", [("2", True), ("1", False)])
def test_eval_warns_of_torch_threads_on_a_busy_machine(prompts, tmp_path, capsys, monkeypatch, threads, warned):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        rc = main(["eval", "--pipeline", "/nonexistent/pipe", "--prompts", prompts, "--threads", threads,
                   "--out", str(tmp_path / "o")])
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr()
    assert rc == 1 and "cannot be loaded offline" in printed.err  # the note comes before the pipeline loads
    assert ("load average 1.5 on 2 CPUs" in printed.out and "--threads 1" in printed.out) is warned


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
    assert "fewer steps" in line and "DuCa" in line and "FORA" in line and "PSNR pooled" in line
    for method in ("DuCa", "TaylorSeer", "FORA"):  # a verdict line each, against its fewer-steps row
        assert any(ln.startswith(f"  {method} ") and " fewer steps at equal FLOPs: PSNR " in ln
                   for ln in printed.splitlines())
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


def _every_call_flops(modules, run) -> tuple[int, int]:
    """(FLOPs, calls) of `run()` counted call by call on `modules` (a FlopCounterMode around every forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fxcache.passes.propagate_shapes import ensure_cpu_attention_flops

    ensure_cpu_attention_flops()
    total, calls, hooks = [0], [0], []

    def enter(module, args, kwargs):
        module.__dict__["_counting"] = FlopCounterMode(display=False)
        module.__dict__["_counting"].__enter__()

    def leave(module, args, kwargs, output):
        counter = module.__dict__.pop("_counting")
        counter.__exit__(None, None, None)
        total[0] += counter.get_total_flops()
        calls[0] += 1

    for m in modules:
        hooks += [m.register_forward_pre_hook(enter, with_kwargs=True),
                  m.register_forward_hook(leave, with_kwargs=True)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return total[0], calls[0]


@pytest.fixture()
def counted_passes(monkeypatch):
    """How many FLOP counters fxcache starts (each is one counted transformer call)."""
    import importlib

    propagate_shapes = importlib.import_module("fxcache.passes.propagate_shapes")
    made = [0]
    real = propagate_shapes.flop_counter

    def counting():
        made[0] += 1
        return real()

    monkeypatch.setattr(propagate_shapes, "flop_counter", counting)
    return made


def test_uncached_flops_are_counted_once_per_call_shape_and_equal_a_count_of_every_call(pipeline_folder,
                                                                                       counted_passes):
    """Three prompts two per call with true CFG: the batch-2 call's cond and uncond branches differ in shape (a
    single negative prompt is not repeated) and the batch-1 call has one shape of its own, so 3 distinct shapes over
    12 transformer calls."""
    from fxcache.quality.pipeline_eval import evaluate_pipeline, load_pipeline

    pipe = load_pipeline(pipeline_folder, torch.float32)
    prompts = ["a picture of two red circles on the left", "a picture of one blue square at the top",
               "a picture of three cyan circles at the top"]
    call = dict(height=32, width=32, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="")
    report = evaluate_pipeline(pipe, prompts, {}, steps=3, call_args=call, repeats=1, lowering="eager",
                               batch_size=2, noise_floor=False)
    assert counted_passes[0] == report.flops_passes == 3

    def generate():
        for chunk in (prompts[:2], prompts[2:]):
            pipe(chunk, num_inference_steps=3, generator=[torch.Generator().manual_seed(0) for _ in chunk],
                 output_type="pt", **call)

    full, calls = _every_call_flops([pipe.transformer], generate)
    assert calls == 12 and report.rows[0].label == "uncached" and report.rows[0].flops == full


def test_two_transformers_are_each_counted_once_per_call_shape(counted_passes):
    """Wan 2.2's two experts (one above the boundary timestep, one below), CFG as two calls: two shapes in all."""
    from reliability.pipelines import wan22_pipeline, wan_generate

    from fxcache.passes.propagate_shapes import CallFlops

    pipe = wan22_pipeline()
    full, calls = _every_call_flops([pipe.transformer, pipe.transformer_2], lambda: wan_generate(pipe, steps=4))
    counter = CallFlops()
    for module in (pipe.transformer, pipe.transformer_2):
        counter.watch(module)
    wan_generate(pipe, steps=4)
    counter.close()
    assert calls == 8 and counted_passes[0] == counter.passes == 2
    assert counter.flops() == full > 0
    assert sum(counter.calls[None].values()) == 8
    wan_generate(pipe, steps=4)  # closed: no longer counted
    assert sum(counter.calls[None].values()) == 8


def test_eval_interleaves_every_setting_call_by_call_and_keeps_every_round(pipeline_folder):
    """Round r, call i runs every setting once, starting from a rotated position; every round is timed; the
    images come from the first round and the noise floor from other seeds."""
    from fxcache.config import make_config
    from fxcache.quality.pipeline_eval import NOISE_FLOOR, evaluate_pipeline, load_pipeline

    pipe = load_pipeline(pipeline_folder, torch.float32)
    prompts = ["a picture of two red circles on the left", "a picture of one blue square at the top"]
    said, notes = [], []
    report = evaluate_pipeline(pipe, prompts, {"fora": make_config("fora", interval=2)}, steps=4, repeats=2,
                               call_args=dict(height=32, width=32, max_sequence_length=16), lowering="eager",
                               progress=said.append, note=notes.append)
    rounds = [m for m in said if m.startswith("round ")]
    settings = ["uncached", "fora", "uncached, 2 steps (equal compute)"]
    assert len(rounds) == 2 * 2 * 3
    for k in range(4):
        block = [m.split(": ", 1)[1] for m in rounds[3 * k:3 * k + 3]]
        assert sorted(block) == sorted(settings) and block[0] == settings[k % 3]
    assert said.index("noise floor: uncached, other seeds") > said.index(rounds[-1])
    assert [n.split(":")[0] for n in notes] == ["estimate", "estimate"]  # after the uncached compile, first round
    for r in report.rows:
        if r.kind != "noise floor":
            assert len(r.seconds_runs) == 2 and r.seconds == pytest.approx(sum(r.seconds_runs) / 2)
    floor = next(r for r in report.rows if r.kind == "noise floor")
    assert floor.psnr < 25 and report.images[NOISE_FLOOR].shape == report.images["uncached"].shape
    # the fewer-steps row's FLOPs are counted on its own calls: those of two 2-step generations
    fewer = next(r for r in report.rows if r.kind == "fewer steps")
    two_steps = _every_call_flops([pipe.transformer], lambda: [
        pipe(p, num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="pt") for p in prompts])
    assert fewer.flops == two_steps[0] and two_steps[1] == 4
    rows = {r.label: r for r in report.rows}
    assert rows["fora"].equal_steps == 2 and rows["fora"].flops_speedup == pytest.approx(2.0, rel=0.05)


def _row(label, kind, steps, *, psnr=None, per=None, lat=None, flops=None, equal=None, runs=None, base=100.0):
    from fxcache.quality.evaluate import Row

    if psnr is None and per is not None:  # pooled from the per-image values (range^2 = 1 unit)
        psnr = 10 * math.log10(len(per) / sum(10 ** (-p / 10) for p in per))
    return Row(label, kind, steps, seconds=None if runs is None else sorted(runs)[len(runs) // 2], flops=flops,
               latency_speedup=lat, flops_speedup=None if flops is None else base / flops, psnr=psnr,
               psnr_images=per, equal_steps=equal, seconds_runs=runs)


def test_the_table_puts_each_fewer_steps_row_under_its_method_in_a_unit_that_fits():
    from fxcache.quality.evaluate import common_columns, flops_unit, markdown_table, three_digits

    rows = [_row("uncached", "uncached", 50, flops=100e6, base=100e6, lat=1.0, runs=[2.0, 2.1, 2.4]),
            _row("A", "method", 50, psnr=30.0, per=(28.0, 35.0), flops=20e6, base=100e6, equal=10, lat=4.0,
                 runs=[0.5, 0.5, 0.6]),
            _row("B", "method", 50, psnr=math.inf, per=(math.inf, math.inf), flops=90e6, base=100e6, equal=45),
            _row("C", "method", 50, psnr=25.0, per=(25.0, 25.0), flops=21e6, base=100e6, equal=10),
            _row("uncached, 10 steps (equal compute)", "fewer steps", 10, psnr=29.0, per=(27.0, 33.0), flops=20e6),
            _row("uncached, 45 steps (equal compute)", "fewer steps", 45, psnr=40.0, per=(39.0, 41.0), flops=90e6),
            _row("noise floor", "noise floor", 50, psnr=11.0, per=(10.0, 12.5))]
    lines = markdown_table(rows, common_columns(rows)).splitlines()
    assert "| MFLOPs |" in lines[0] and "| PSNR dB (pooled) | per-image PSNR min–max |" in lines[0]
    labels = [ln.split(" | ")[0][2:] for ln in lines[2:]]
    assert labels == ["uncached", "noise floor", "A", "↳ uncached, 10 steps (equal compute)", "B",
                      "↳ uncached, 45 steps (equal compute)", "C", "↳ uncached, 10 steps (equal compute)"]
    assert "| 50 | 2.100 (2.000–2.400) | 1.00 | 100 |" in lines[2]
    assert "| 20.0 | 5.00 | 30.00 | 28.00–35.00 |" in lines[4] and "| inf | inf |" in lines[6]
    assert flops_unit([3e9, 5e11, None]) == (1e9, "GFLOPs") and flops_unit([2e13])[1] == "TFLOPs"
    assert flops_unit([87e9])[1] == "GFLOPs" and flops_unit([0.9e6])[1] == "kFLOPs"
    assert [three_digits(v) for v in (87.31, 19.44, 3.051, 0.05123)] == ["87.3", "19.4", "3.05", "0.0512"]


def test_each_method_gets_a_verdict_against_its_fewer_steps_row_with_a_tie_within_the_noise():
    from fxcache.quality.evaluate import TIE_DB, verdicts

    fewer = _row("uncached, 10 steps (equal compute)", "fewer steps", 10, per=(29.0,) * 4, lat=5.0, flops=20.0)
    rows = [_row("uncached", "uncached", 50, lat=1.0, flops=100.0), fewer,
            # 1 dB better on every image: beats
            _row("A", "method", 50, per=(30.0,) * 4, equal=10, lat=4.0, flops=20.0),
            # 0.4 dB worse pooled, but the per-image PSNRs swing by +-5 dB around it: within the noise
            _row("B", "method", 50, per=(31.0, 25.0, 35.0, 29.0), equal=10, lat=4.0, flops=20.0),
            _row("C", "method", 50, psnr=28.9, per=None, equal=10, lat=4.0, flops=20.0),  # no spread: TIE_DB
            _row("D", "method", 50, per=(27.0,) * 4, equal=10, lat=4.0, flops=20.0),
            _row("E", "method", 50, psnr=math.inf, per=(math.inf,) * 4, equal=10, lat=4.0, flops=20.0),
            _row("F", "method", 50, psnr=60.0, per=(60.0,) * 4, equal=50, lat=1.0, flops=99.0)]
    found = {v.row.label: v for v in verdicts(rows)}
    assert [found[k].outcome for k in "ABCDEF"] == ["beats", "ties", "ties", "loses", "beats",
                                                    "saves less than a step"]
    assert found["B"].gap == pytest.approx(-0.41, abs=0.01) and found["B"].tolerance > 1.0
    assert found["A"].tolerance == found["C"].tolerance == found["D"].tolerance == TIE_DB
    assert found["A"].line() == ("A: beats fewer steps at equal FLOPs: PSNR 30.00 dB vs 29.00 dB with 10 steps "
                                 "(pooled; a tie is within 0.25 dB); latency 4.00x vs 5.00x faster, 5.00x vs 5.00x "
                                 "fewer FLOPs")
    assert found["D"].line().startswith("D: loses to fewer steps at equal FLOPs: PSNR 27.00 dB vs 29.00 dB")
    assert found["E"].line().startswith("E: beats fewer steps at equal FLOPs: PSNR inf dB vs 29.00 dB")
    assert "no fewer-steps row" in found["F"].line()
    # one image near-identical in the fewer-steps run (a per-image PSNR gap of 40 dB) does not make the tolerance
    # tens of dB: a 5 dB pooled gap over three images is no tie
    near = _row("uncached, 3 steps (equal compute)", "fewer steps", 3, per=(23.0, 24.0, 62.0), flops=20.0)
    worse = _row("G", "method", 50, per=(19.0, 21.0, 23.5), equal=3, flops=20.0)
    (v,) = verdicts([near, worse])
    assert v.outcome == "loses" and v.gap < -3.5 and v.tolerance < 3.0


def test_the_latency_note_says_when_the_timings_are_not_worth_quoting():
    from fxcache.quality.evaluate import latency_note

    steady = [_row("uncached", "uncached", 50, runs=[2.0, 2.05, 2.1]), _row("A", "method", 50, runs=[1.0, 1.0, 1.02])]
    assert latency_note(steady, load=0.2, cpus=2) is None
    assert "load average was 1.9 on 2 CPUs" in latency_note(steady, load=1.9, cpus=2)
    noisy = steady + [_row("B", "method", 50, runs=[1.0, 1.5, 1.1])]
    assert "differ by up to 45% of their median" in latency_note(noisy, load=0.0, cpus=2)
    once = [_row("uncached", "uncached", 50, runs=[2.0])]
    assert "timed once" in latency_note(once)


def test_the_pareto_plot_shows_identical_images_high_psnrs_and_a_legend_instead_of_labels():
    from fxcache.quality.evaluate import Report, pareto_figure

    rows = [_row("uncached", "uncached", 50, lat=1.0, flops=100.0),
            _row("A", "method", 50, psnr=75.0, equal=10, lat=3.0, flops=20.0),  # above the old 60 dB cap
            _row("B", "method", 50, psnr=math.inf, equal=10, lat=3.1, flops=20.0),  # identical images
            _row("C", "method", 50, psnr=30.0, equal=12, lat=2.9, flops=24.0),
            _row("uncached, 10 steps (equal compute)", "fewer steps", 10, psnr=29.0, lat=5.0, flops=20.0),
            _row("uncached, 12 steps (equal compute)", "fewer steps", 12, psnr=31.0, lat=4.2, flops=24.0),
            _row("noise floor", "noise floor", 50, psnr=11.0)]
    fig = pareto_figure(Report("m", 4, 50, 4.0, rows, {}))
    ax = fig.axes[0]
    points = {tuple(p) for c in ax.collections for p in c.get_offsets()}
    low, high = ax.get_ylim()
    assert (3.0, 75.0) in points  # not capped
    top = [y for x, y in points if x == 3.1]
    assert len(top) == 1 and 75.0 < top[0] < high and low < 11.0
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["identical to uncached (PSNR = inf)"]  # no per-point labels to overlap
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["noise floor (uncached on other noise)", "uncached, fewer steps (12, 10 steps)"]
    assert legend[2:] == ["A", "B", "C"]
    import matplotlib.pyplot as plt

    plt.close(fig)
