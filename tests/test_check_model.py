"""fxcache.testing.check_model and `fxcache check` (issue #14, deliverable 5): a user's CI check that fxcache
caches their transformer as the maths says, with one PASS / WARN / SKIP / FAIL line per check and a failing exit on
any failure (on a warning too with strict)."""

import inspect

import pytest
import torch
from safetensors.torch import save_file

from fxcache.cli import main
from fxcache.errors import ConfigError
from fxcache.runtime.taylor import TaylorState
from fxcache.testing import check_model
from fxcache.testing.models import make_inputs, make_model
from families import FAMILIES

METHODS = ["fora", "duca", "taylorseer"]


def line_of(obj, text: str) -> str:
    """`file:line` of the first source line of `obj` that holds `text` (where a graph break must be reported)."""
    lines, start = inspect.getsourcelines(obj)
    return f"{inspect.getsourcefile(obj)}:{start + next(i for i, t in enumerate(lines) if text in t)}"


class Breaking(torch.nn.Module):
    """A DiT whose forward reads a value back to Python between its blocks (`.item()`): a graph break."""

    def __init__(self):
        super().__init__()
        self.inner = make_model("dit")

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        if hidden_states.abs().max().item() > 1e6:  # data-dependent Python control flow
            hidden_states = hidden_states / 2
        return self.inner(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels,
                          return_dict=return_dict)


def test_a_graph_break_in_a_cached_model_warns_where_and_strict_fails_it():
    """fxcache caches the graph that holds the blocks: the break is a WARN (the user's file:line, what it costs),
    not a FAIL; strict=True makes it one."""
    report = check_model(Breaking(), make_inputs("dit"), ["fora"], steps=3)
    assert report.ok, str(report)
    line = str(report).splitlines()[1]
    assert line.startswith("WARN graph breaks: ") and line_of(Breaking.forward, ".item()") in line, line
    assert "2 of 2 block(s) cached" in line and "runs eagerly and uncached" in line
    assert report.warnings and report.summary().startswith("OK with 1 warning(s)")
    strict = check_model(Breaking(), make_inputs("dit"), [], strict=True)
    assert not strict.ok and [c.name for c in strict.failures] == ["graph breaks"]
    assert "strict" in strict.failures[0].detail and strict.summary().startswith("FAILED: 1 check(s) failed")
    with pytest.raises(ConfigError, match="strict must be True or False, got 'yes'"):
        check_model(Breaking(), make_inputs("dit"), [], strict="yes")


def scale_blocks(model, graph_break: bool):
    """A user's forward hook on every transformer block that scales its output (reading a value back to Python
    first, a graph break inside the hook, when `graph_break`)."""
    def hook(module, args, out):
        if graph_break and out.abs().max().item() > 1e9:
            return out
        return out * 1.5

    for block in model.transformer_blocks:
        block.register_forward_hook(hook)
    return hook


@pytest.mark.parametrize("graph_break", [False, True], ids=["inlined", "graph-breaking"])
def test_a_block_hook_is_no_false_fail(graph_break):
    """Dynamo inlines a traceable hook into the block's graph; a hook that graph-breaks leaves each block's forward
    compiled on its own and the hook eager. Either way fxcache computes what the hooked model computes, and the
    hooked reference (built from every graph's blocks, the hooks running as the model runs them) agrees."""
    model, inputs = make_model("dit"), make_inputs("dit")
    with torch.no_grad():
        plain = model(**inputs)[0]
        hook = scale_blocks(model, graph_break)
        assert not torch.allclose(model(**inputs)[0], plain)  # the hook changes what the model computes
    report = check_model(model, inputs, METHODS, steps=5)
    assert report.ok and not report.failures, str(report)
    for method in METHODS:
        line = next(c for c in report.checks if c.name == f"{method}: variants equal the hooked reference")
        assert line.status == "PASS", str(report)
    breaks = next(c for c in report.checks if c.name == "graph breaks")
    if graph_break:
        assert breaks.status == "WARN" and line_of(hook, ".item()") in breaks.detail, breaks.detail
        assert "2 of 2 block(s) cached" in breaks.detail
    else:
        assert breaks.status == "PASS", breaks.detail


def test_a_wrong_cached_step_still_fails_the_reference_check_on_a_hooked_model(monkeypatch):
    """The reference follows the model, not fxcache: TaylorSeer forecasting one step too far (FULL steps stay
    right) fails the reference check of a model with a graph-breaking block hook."""
    forecast = TaylorState.forecast_inputs
    monkeypatch.setattr(TaylorState, "forecast_inputs", lambda self, step, device: forecast(self, step + 1, device))
    model, inputs = make_model("dit"), make_inputs("dit")
    scale_blocks(model, graph_break=True)
    report = check_model(model, inputs, ["taylorseer"], steps=5)
    status = {c.name: c.status for c in report.checks}
    assert status["taylorseer: FULL equals uncached"] == "PASS"
    assert status["taylorseer: variants equal the hooked reference"] == "FAIL", str(report)
    assert not report.ok and report.summary().startswith("FAILED")


def test_a_method_without_a_reference_says_so_in_a_skip_line():
    """ToCa's maths is not in the hooked reference: its reference check is a SKIP line with why, not left out."""
    report = check_model(make_model("dit"), make_inputs("dit"), ["toca"], steps=3)
    skip = next(c for c in report.checks if c.name == "toca: variants equal the hooked reference")
    assert skip.status == "SKIP" and "fora, duca, taylorseer only" in skip.detail
    assert report.ok and report.skipped == [skip], str(report)


def test_the_cli_exits_zero_on_a_good_model_and_prints_a_line_per_check(tmp_path, capsys):
    model = make_model("dit")
    model.save_pretrained(tmp_path / "model")
    tensors = {k: v.contiguous() for k, v in make_inputs("dit").items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp_path / "inputs.safetensors"))
    rc = main(["check", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "inputs.safetensors"),
               "--methods", "fora,taylorseer", "--steps", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("PASS ") >= 8 and "FAIL" not in out
    assert out.strip().splitlines()[-1].startswith("fxcache check: OK (") and "exit status 0" in out
    assert main(["check", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "inputs.safetensors"),
                 "--methods", "nope"]) == 1


def test_the_cli_passes_a_graph_breaking_model_with_a_warning_and_strict_fails_it(tmp_path, capsys):
    """Lumina2 graph-breaks and is cached: exit 0 with a WARN line and a verdict saying so; --strict exits 1."""
    family = FAMILIES["lumina2"]
    family.model().save_pretrained(tmp_path / "model")
    tensors = {k: v.contiguous() for k, v in family.inputs(1, 0.9, 0).items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp_path / "inputs.safetensors"))
    argv = ["check", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "inputs.safetensors"),
            "--methods", "fora", "--steps", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "WARN graph breaks: " in out and "transformer_lumina2.py:" in out and "FAIL" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("fxcache check: OK with 1 warning(s)") and last.endswith("exit status 0"), last
    assert main([*argv, "--strict"]) == 1
    out = capsys.readouterr().out
    assert "FAIL graph breaks: " in out, out
    assert out.strip().splitlines()[-1].startswith("fxcache check: FAILED: 1 check(s) failed")


def test_a_model_that_caches_nothing_fails_caching_active_and_missing_arguments_are_named():
    report = check_model(make_model("dit"), make_inputs("dit"), [fxcache_config("fora", interval=1)], steps=3)
    active = next(c for c in report.checks if c.name == "fora: caching active")
    assert not active.ok and "no cached step ran" in active.detail
    inputs = make_inputs("dit")
    inputs.pop("timestep")
    report = check_model(make_model("dit"), inputs, ["fora"])
    assert not report.ok and "timestep" in report.checks[0].detail


def fxcache_config(name, **options):
    from fxcache.config import make_config

    return make_config(name, **options)
