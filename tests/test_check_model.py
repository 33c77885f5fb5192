"""fxcache.testing.check_model and `fxcache check` (issue #14, deliverable 5): a user's CI check that fxcache
caches their transformer as the maths says, with one PASS / WARN / SKIP / FAIL line per check and a failing exit on
any failure (on a warning too with strict)."""

import inspect

import pytest
import torch
from safetensors.torch import save_file

from fxcache.cli import main
from fxcache.errors import ConfigError
from fxcache.testing import check_model
from fxcache.testing.models import make_inputs, make_model
from families import FAMILIES


def line_of(obj, text: str) -> str:
    """`file:line` of the first source line of `obj` that holds `text` (where a graph break must be reported)."""
    lines, start = inspect.getsourcelines(obj)
    return f"{inspect.getsourcefile(obj)}:{start + next(i for i, t in enumerate(lines) if text in t)}"


def test_a_diffusers_transformer_passes_every_check():
    report = check_model(make_model("flux"), make_inputs("flux"), ["fora", "duca", "taylorseer"], steps=5)
    assert report.ok, str(report)
    names = [c.name for c in report.checks]
    assert names[:2] == ["analysis", "graph breaks"]
    for method in ("fora", "duca", "taylorseer"):
        assert f"{method}: FULL equals uncached" in names
        assert f"{method}: variants equal the hooked reference" in names
        assert f"{method}: two generations, no recompile" in names


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
