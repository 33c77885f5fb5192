"""fxcache.testing.check_model and `fxcache check` (issue #14, deliverable 5): a user's CI check that fxcache
caches their transformer as the maths says, with one line per check and a failing exit on any failure."""

import torch
from safetensors.torch import save_file

from fxcache.cli import main
from fxcache.testing import check_model
from fxcache.testing.models import make_inputs, make_model


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


def test_a_model_with_a_graph_break_fails_that_check_and_says_where():
    report = check_model(Breaking(), make_inputs("dit"), ["fora"], steps=3)
    assert not report.ok
    failed = [c for c in report.failures if c.name == "graph breaks"]
    assert failed and "break" in failed[0].detail
    assert str(report).splitlines()[1].startswith("FAIL graph breaks")


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
    assert main(["check", "--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "inputs.safetensors"),
                 "--methods", "nope"]) == 1


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
