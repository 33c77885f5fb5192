"""`fxcache.calibrate` and `fxcache calibrate` on the committed text-to-image reference (a diffusers FluxPipeline,
true CFG: two transformer calls per step) and on a bare model with its own loop.

What is checked against something other than calibrate's own arithmetic: the chosen config, loaded from the file it
saved, rerun through `cache_backend` and `enable` on the plain pipeline, reaches the target against the pipeline's
own uncached images; TeaCache's polynomial is `np.polyfit` of changes measured here with hooks on the plain
model (the authors' `blocks[0].norm1(H_0, temb)[0]` and the model output, branches told by call parity); MagCache's
ratios are the ones diffusers' own calibration mode prints for the same pipeline, prompts and seeds."""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch

import fxcache
from fxcache.errors import ConfigError, UnknownOptionError
from fxcache.quality import t2i
from fxcache.quality.calibration import magcache_ratios, teacache_coefficients
from fxcache.quality.metrics import pooled_psnr
from fxcache.testing import make_inputs, make_model

PROMPTS = ["a picture of two red circles on the left", "a picture of one blue square at the top"]
STEPS = 8
TARGET = 30.0
CALL = dict(t2i.CALL_ARGS)  # 32x32, 16 text tokens, true CFG 4: cond and uncond calls per step


@pytest.fixture(scope="module")
def pipe():
    from fxcache.quality.pipeline_eval import load_pipeline

    return load_pipeline(t2i.CHECKPOINT, torch.float32)


def generate(pipe, prompts=PROMPTS, steps=STEPS, seed=0) -> torch.Tensor:
    """What a user's own calls give: one pipeline call per prompt, images in [-1, 1]."""
    return torch.cat([pipe(p, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                           output_type="pt", **CALL).images * 2 - 1 for p in prompts])


@pytest.fixture(scope="module")
def fbcache_run(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "fbcache.json"
    torch._dynamo.reset()
    cal = fxcache.calibrate(pipe, "fbcache", target_psnr=TARGET, prompts=PROMPTS, steps=STEPS, call_args=CALL,
                            grid=(0.04, 0.16, 0.32), refine=1, out=path, verbose=False)
    return cal, path


def test_the_chosen_threshold_reaches_the_target_when_run_again_from_its_file(pipe, fbcache_run):
    cal, path = fbcache_run
    reaching = [p for p in cal.curve if p.cached_calls > 0 and p.psnr >= TARGET]
    assert cal.reached and reaching and any(p.psnr < TARGET for p in cal.curve), \
        "the grid must cross the target for the choice to mean anything"
    assert cal.chosen.share == min(p.share for p in reaching) < 1.0
    assert len(cal.curve) == 4, "three grid points and one bisection between the two around the target"
    assert [p.value for p in cal.curve] == sorted(p.value for p in cal.curve)
    uncached = generate(pipe)
    assert cal.config == fxcache.load_config(path)
    assert json.loads(path.read_text())["config"] == cal.config.to_dict()

    fxcache.enable(pipe, str(path), lowering="eager")  # the file, as a user's pipeline takes it
    try:
        enabled = generate(pipe)
        kinds = [r["kind"] for r in fxcache.stats(pipe)]
    finally:
        fxcache.disable(pipe)
    assert pooled_psnr(enabled, uncached) >= TARGET
    assert pooled_psnr(enabled, uncached) == pytest.approx(cal.chosen.psnr, abs=0.01)
    assert sum(k != "full" for k in kinds) == cal.chosen.cached_calls > 0

    backend = fxcache.cache_backend(path, lowering="eager")
    assert backend.config == cal.config
    view = copy.copy(pipe)
    view.transformer = torch.compile(pipe.transformer, backend=backend, dynamic=False)
    compiled = generate(view)
    fxcache.runtime.attach.detach(pipe.transformer, backend)
    assert float((compiled - enabled).abs().max()) < 1e-5, "one config, the same images either way"


def test_each_point_stands_beside_fewer_steps_at_its_compute(pipe, fbcache_run):
    """The fewer-steps sampler of a point is the uncached pipeline with round(steps x share) steps, its PSNR
    against the full-step images; the table prints both, and the saved curve holds them."""
    cal, path = fbcache_run
    point = next(p for p in cal.curve if p.fewer_steps is not None)
    assert point.fewer_steps == round(STEPS * point.share) < STEPS
    assert point.fewer_psnr == pytest.approx(pooled_psnr(generate(pipe, steps=point.fewer_steps), generate(pipe)),
                                             abs=1e-6)
    assert cal.fewer_steps[point.fewer_steps] == point.fewer_psnr
    assert point.versus in ("beats", "ties", "loses")
    table = cal.table().splitlines()
    row = next(line for line in table if line.startswith(f"| {point.value:.4g}"))
    assert f"| {point.fewer_steps} | {point.fewer_psnr:.2f} | {point.versus} |" in row
    assert "(chosen)" in next(line for line in table if line.startswith(f"| {cal.chosen.value:.4g}"))
    saved = json.loads(path.read_text())
    assert [p["value"] for p in saved["curve"]] == [p.value for p in cal.curve]
    assert saved["fewer_steps"][str(point.fewer_steps)] == pytest.approx(point.fewer_psnr)
    assert saved["settings"]["prompts"] == PROMPTS and saved["settings"]["steps"] == STEPS


def test_a_target_no_setting_reaches_is_said_and_the_most_accurate_caching_point_returned(pipe, capsys):
    torch._dynamo.reset()
    cal = fxcache.calibrate(pipe, "fbcache", target_psnr=200, prompts=PROMPTS[:1], steps=STEPS, call_args=CALL,
                            grid=(0.01, 0.16))
    printed = capsys.readouterr().out
    assert not cal.reached
    assert cal.curve[0].cached_calls == 0 and math.isinf(cal.curve[0].psnr), \
        "a threshold that caches nothing gives the uncached images: it reaches any target, and is never chosen"
    assert cal.config.threshold == 0.16 and cal.chosen.cached_calls > 0
    assert cal.message.startswith("no threshold measured reaches 200 dB while caching: the most accurate one "
                                  "that caches is threshold 0.16")
    assert cal.message in printed and "| threshold |" in printed

    nothing = fxcache.calibrate(pipe, "fbcache", target_psnr=20, prompts=PROMPTS[:1], steps=STEPS, call_args=CALL,
                                grid=(0.01,), verbose=False)
    assert not nothing.reached
    assert nothing.message.startswith("no threshold in the grid made fbcache cache any call")


@pytest.fixture(scope="module")
def teacache_run(pipe):
    torch._dynamo.reset()
    return fxcache.calibrate(pipe, "teacache", target_psnr=20, prompts=PROMPTS, steps=STEPS, call_args=CALL,
                             grid=(0.16,), verbose=False)


def hooked_changes(pipe) -> tuple[list[float], list[float]]:
    """TeaCache's fitting pairs measured on the plain pipeline as the authors' FLUX script reads its indicator:
    `blocks[0].norm1(H_0, temb)[0]`, and the transformer's output; consecutive calls of each CFG branch, the
    pipeline calling cond then uncond at every step."""
    block = pipe.transformer.transformer_blocks[0]
    indicators, outputs = [], []

    def before(module, args, kwargs):
        indicators.append(module.norm1(kwargs["hidden_states"], emb=kwargs["temb"])[0])

    def after(module, args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out.sample)

    hooks = [block.register_forward_pre_hook(before, with_kwargs=True),
             pipe.transformer.register_forward_hook(after)]
    try:
        generate(pipe)
    finally:
        for h in hooks:
            h.remove()
    assert len(outputs) == len(indicators) == 2 * STEPS * len(PROMPTS)

    def rel(a, b):
        return float((a - b).abs().mean() / b.abs().mean())

    x, y = [], []
    for g in range(len(PROMPTS)):
        for branch in (0, 1):
            calls = list(range(g * 2 * STEPS + branch, (g + 1) * 2 * STEPS, 2))
            for prev, cur in zip(calls, calls[1:]):
                x.append(rel(indicators[cur], indicators[prev]))
                y.append(rel(outputs[cur], outputs[prev]))
    return x, y


def test_teacache_gets_the_polyfit_of_changes_measured_on_the_plain_model(pipe, teacache_run):
    x, y = hooked_changes(pipe)
    rec = teacache_run.recording
    assert sorted(rec.x) == pytest.approx(sorted(x), rel=1e-6) and sorted(rec.y) == pytest.approx(sorted(y), rel=1e-6)
    expected = np.polyfit(x, y, 4)
    assert teacache_run.config.coefficients == pytest.approx(tuple(expected), rel=1e-6)
    assert teacache_run.fitted["coefficients"] == list(teacache_run.config.coefficients)
    assert teacache_coefficients(rec) == teacache_run.config.coefficients
    assert teacache_run.config.num_steps == STEPS, "TeaCache's last forced step is the sampler's"
    # the fit is the polynomial the search ran with: the point's config carries it
    assert teacache_run.curve[0].config.coefficients == teacache_run.config.coefficients


def diffusers_magcache_ratios(pipe, steps=STEPS) -> dict[str, list[list[float]]]:
    """The ratios diffusers' MagCache calibration mode prints at the end of each context's run, on a copy of the
    transformer (hooks diffusers removes leave each block's `forward` an instance attribute, which changes what
    Dynamo traces: the module-scoped pipeline stays as loaded)."""
    from diffusers import MagCacheConfig

    pipe = copy.copy(pipe)
    pipe.transformer = copy.deepcopy(pipe.transformer)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        generate(pipe, steps=steps)
    lines = printed.getvalue().splitlines()
    lists = [ast.literal_eval(lines[i + 1]) for i, line in enumerate(lines) if "Calibration Complete" in line]
    assert len(lists) == 2 * len(PROMPTS), printed.getvalue()
    return {"cond": lists[0::2], "uncond": lists[1::2]}  # each pipeline call ends cond's run first


def test_magcache_ratios_equal_diffusers_calibration_on_the_same_pipeline(pipe, teacache_run):
    theirs = diffusers_magcache_ratios(pipe)
    rec = teacache_run.recording
    for branch, name in ((0, "cond"), (1, "uncond")):
        assert rec.ratios[branch] == [pytest.approx(r, rel=1e-5) for r in theirs[name]]
        assert magcache_ratios(rec, branch=branch) == pytest.approx(np.mean(theirs[name], axis=0), rel=1e-5)
    pooled = magcache_ratios(rec)
    assert len(pooled) == STEPS and pooled[0] == 1.0
    assert pooled == pytest.approx(np.mean(theirs["cond"] + theirs["uncond"], axis=0), rel=1e-5)


def test_magcache_calibration_gives_its_config_the_measured_ratios(pipe):
    if "magcache" not in fxcache.method_names():
        pytest.skip("the magcache method is not registered in this fxcache (its config takes the ratios)")
    torch._dynamo.reset()
    cal = fxcache.calibrate(pipe, "magcache", target_psnr=20, prompts=PROMPTS, steps=STEPS, call_args=CALL,
                            grid=(0.1,), verbose=False)
    assert cal.config.mag_ratios == pytest.approx(tuple(magcache_ratios(cal.recording)))
    assert cal.config.num_steps == STEPS and cal.config.threshold == 0.1
    assert set(cal.fitted["per_branch"]) == {"0", "1"}


def test_a_bare_model_is_calibrated_through_the_users_own_loop():
    """`sample(model)` is the user's loop; each seed's noise comes from torch's global RNG, seeded per call, so every
    setting sees the same noise. The chosen point's PSNR is what the same loop gives with the config compiled."""
    model = make_model("flux").eval()
    kw = make_inputs("flux")
    steps = 6

    def sample(m):
        x = torch.randn(kw["hidden_states"].shape)
        for s in range(steps):
            x = x - m(**dict(kw, hidden_states=x, timestep=torch.full((1,), 1 - s / steps)))[0] / steps
        return x.tanh()

    cal = fxcache.calibrate(model, "fora", target_psnr=10, sample=sample, seeds=(0, 1), grid=(2, 3), verbose=False)
    assert cal.steps == steps, "a bare model's step count is counted in its loop"
    assert all(p.fewer_steps is None and p.versus is None for p in cal.curve)

    def run(m, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return sample(m)

    uncached = torch.cat([run(model, s) for s in (0, 1)])
    for point in cal.curve:
        compiled = torch.compile(model, backend=fxcache.cache_backend(point.config, lowering="eager"),
                                 dynamic=False)
        images = []
        for seed in (0, 1):
            with fxcache.request(compiled):
                images.append(run(compiled, seed))
        assert pooled_psnr(torch.cat(images), uncached) == pytest.approx(point.psnr, abs=1e-6)
        assert sum(r["kind"] != "full" for r in fxcache.stats(compiled)) == point.cached_calls > 0


def test_calibrate_cli_prints_the_curve_and_writes_a_config_file(tmp_path, capsys):
    from fxcache.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration\n" + PROMPTS[0] + "\n")
    out = tmp_path / "fora.json"
    argv = ["calibrate", "--pipeline", t2i.CHECKPOINT, "--prompts", str(prompts), "--method", "fora",
            "--target", "15", "--steps", "6", "--grid", "2,3", "--out", str(out),
            "-a", "height=32", "-a", "width=32", "-a", "max_sequence_length=16"]
    rc = main(argv)
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert rc == (0 if saved["reached"] else 1)
    assert "| interval | compute (FLOPs share) |" in printed and saved["message"] in printed
    config = fxcache.load_config(out)
    assert config.method == "fora" and config.interval == saved["chosen"]["value"]
    assert [p["value"] for p in saved["curve"]][:1] == [2]


@pytest.mark.parametrize("argv, message, code", [
    (["--method", "nosuch"], "--method: unknown method 'nosuch'", 1),
    (["--method", "fbcache", "--grid", "0.1,x"], "expected comma-separated numbers", 2),
    (["--method", "fbcache", "--target", "nan"], "expected a finite number", 2),
])
def test_calibrate_cli_refuses_bad_input_in_one_line(tmp_path, capsys, argv, message, code):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    from fxcache.cli import main

    base = ["calibrate", "--pipeline", t2i.CHECKPOINT, "--prompts", str(prompts), "--target", "30"]
    if code == 2:
        with pytest.raises(SystemExit) as info:
            main(base + argv)
        assert info.value.code == 2
    else:
        assert main(base + argv) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_config_files_load_through_cache_backend_and_enable_or_fail_clearly(pipe, tmp_path):
    path = tmp_path / "fora.json"
    path.write_text(json.dumps({"method": "fora", "interval": 3}))  # a hand-written config: others default
    assert fxcache.cache_backend(path).config == fxcache.FORAConfig(interval=3)  # a path object
    assert fxcache.cache_backend(str(path), interval=4).config == fxcache.FORAConfig(interval=4)  # an override
    backend = fxcache.enable(pipe, str(path), lowering="eager", interval=5)
    try:
        assert backend.config == fxcache.FORAConfig(interval=5) and backend.lowering == "eager"
    finally:
        fxcache.disable(pipe)

    def fails(content, error=ConfigError, name="bad.json"):
        bad = tmp_path / name
        if content is not None:
            bad.write_text(content)
        with pytest.raises(error) as info:
            fxcache.cache_backend(str(bad))
        with pytest.raises(error):
            fxcache.enable(pipe, str(bad))
        assert "_fxcache" not in pipe.__dict__, "a file that does not load leaves the pipeline as it was"
        assert repr(str(bad)) in str(info.value)
        return str(info.value)

    assert "no such config file" in fails(None, name="missing.json")
    assert "is not JSON: Expecting value at line 1 column 1" in fails("threshold: 0.1")
    assert "unknown cache method 'nosuch'" in fails(json.dumps({"method": "nosuch"}))
    assert "did you mean 'interval'" in fails(json.dumps({"method": "fora", "intervl": 3}), UnknownOptionError)
    assert "written by a newer fxcache" in fails(json.dumps({"method": "fora", "version": 99}))
    assert "names no method" in fails(json.dumps([1, 2]))
    assert "FORAConfig.interval must be" in fails(json.dumps({"method": "fora", "interval": "three"}))


@pytest.mark.parametrize("call, message", [
    (dict(method="fbcache", threshold=0.1), "calibrate searches fbcache's threshold: leave it out"),
    (dict(method="nosuch"), "unknown cache method 'nosuch'"),
    (dict(method="fora", target_psnr=float("nan")), "target_psnr must be a finite number"),
    (dict(method="fora", prompts=None), "prompts must be a non-empty list of str"),
    (dict(method="fora", call_args=dict(CALL, num_inference_steps=3)), "num_inference_steps is set by calibrate"),
    (dict(method="fora", sample=lambda m: m), "sample= is for a bare model"),
    (dict(method="fora", grid=(2, -1)), "intervals are ints >= 1"),
    (dict(method="fora", intervall=3), "unknown option 'intervall'"),
    (dict(method="fora", steps=1), "a 1-step sampler leaves nothing for an interval to cache"),
    (dict(method="fora", lowering="eagre"), "unknown lowering 'eagre'; did you mean 'eager'"),
    (dict(method="magcache", retention_ratio=2.0), "MagCacheConfig.retention_ratio must be a number in"),
])
def test_calibrate_refuses_bad_arguments_before_sampling(pipe, call, message):
    args = dict(dict(target_psnr=30.0, prompts=PROMPTS, steps=STEPS, call_args=CALL), **call)
    with pytest.raises(ConfigError, match=message):
        fxcache.calibrate(pipe, args.pop("method"), **args)


def test_calibrate_refuses_a_compiled_transformer(pipe):
    fxcache.enable(pipe, "fora", lowering="eager")
    try:
        with pytest.raises(ConfigError, match=r"call fxcache.disable\(pipe\)"):
            fxcache.calibrate(pipe, "fora", target_psnr=30, prompts=PROMPTS, steps=STEPS, call_args=CALL)
    finally:
        fxcache.disable(pipe)
    with pytest.raises(ConfigError, match="sample=callable"):
        fxcache.calibrate(make_model("flux"), "fora", target_psnr=30)
