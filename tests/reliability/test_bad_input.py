"""Bad input gets a clear fxcache error that names what is accepted, as early as it can be told."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fxcache
from fxcache import ConfigError, UnsupportedGraphError
from fxcache.testing import make_inputs, make_model


class _NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, timestep):
        return self.lin(x) * timestep[:, None]


def test_strict_raises_the_analysis_error_itself():
    compiled = torch.compile(_NoBlocks(), backend=fxcache.cache_backend("duca", strict=True, lowering="eager"),
                             dynamic=False)
    with pytest.raises(UnsupportedGraphError, match="no transformer blocks found") as info, torch.no_grad():
        compiled(torch.randn(2, 4), torch.tensor([0.5, 0.5]))
    assert not isinstance(info.value, torch._dynamo.exc.BackendCompilerFailed)


def test_unknown_options_are_config_errors_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown option 'intervall'.*did you mean 'interval'.*valid options"):
        fxcache.cache_backend("duca", intervall=3)
    with pytest.raises(ConfigError, match="dataclasses.replace"):
        fxcache.cache_backend(fxcache.DuCaConfig(), interval=3)


def test_the_cli_prints_an_unknown_option_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "fxcache", "export", "--reference", "dit", "-o", "intervall=3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "unknown option 'intervall'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("bad", ["False", 0, 1, None])
def test_strict_must_be_a_bool(bad):
    with pytest.raises(ConfigError, match="strict must be True or False"):
        fxcache.cache_backend("duca", strict=bad)


@pytest.mark.parametrize("method", ["duca", "toca", "clusca"])
def test_seeds_beyond_64_bits_are_refused(method):
    with pytest.raises(ConfigError, match="seed must be <= 18446744073709551615"):
        fxcache.cache_backend(method, seed=2**64)
    fxcache.cache_backend(method, seed=2**64 - 1)  # the largest a torch.Generator takes


@pytest.mark.parametrize("bad", [1.5, True, -1, "", b"timestep", ["timestep"]])
def test_timestep_input_of_the_wrong_type_fails_at_cache_backend(bad):
    with pytest.raises(ConfigError, match="timestep_input must be"):
        fxcache.cache_backend("duca", timestep_input=bad)


def test_an_int_timestep_input_counts_the_forwards_parameters():
    """DiT's forward(hidden_states, timestep, class_labels, ...): timestep_input=1 is `timestep`."""
    model = make_model("dit")
    backend = fxcache.cache_backend("fora", lowering="eager", strict=True, timestep_input=1)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(**make_inputs("dit"))
    assert backend.plans[0].timestep_name.endswith("timestep_")
    torch._dynamo.reset()
    backend = fxcache.cache_backend("fora", lowering="eager", strict=True, timestep_input=2)  # class_labels: int
    compiled = torch.compile(make_model("dit"), backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(**make_inputs("dit"))
    assert backend.plans[0].timestep_name.endswith("class_labels_")
    torch._dynamo.reset()
    backend = fxcache.cache_backend("fora", lowering="eager", strict=True, timestep_input=9)
    compiled = torch.compile(make_model("dit"), backend=backend, dynamic=False)
    with pytest.raises(UnsupportedGraphError, match="forward's parameter #9"), torch.no_grad():
        compiled(**make_inputs("dit"))


@pytest.mark.parametrize("option,value", [("max_branches", 0), ("keep_caches", "yes"), ("inplace", 1),
                                          ("time_direction", "down"), ("block_lists", ["transformer_blocks"])])
def test_backend_options_are_checked(option, value):
    with pytest.raises(ConfigError, match=option):
        fxcache.cache_backend("duca", **{option: value})


def test_stats_and_reset_of_a_module_compiled_in_place():
    model = make_model("dit")
    backend = fxcache.cache_backend("fora", lowering="eager", interval=3)
    model.compile(backend=backend, dynamic=False)
    assert fxcache.stats(model) == []  # found before its first call
    with torch.no_grad():
        for t in (0.9, 0.6, 0.3):
            model(**make_inputs("dit", t=t))
    assert [r["kind"] for r in fxcache.stats(model)] == ["full", "reuse", "reuse"]
    assert fxcache.cache_bytes(model) > 0
    fxcache.reset(model)
    assert fxcache.cache_bytes(model) == 0
    with torch.no_grad():
        model(**make_inputs("dit", t=0.2))
    assert fxcache.stats(model)[-1]["kind"] == "full"


@pytest.mark.parametrize("method,option,value,bound", [
    ("clusca", "kmeans_iters", 2**40, 1000),
    ("toca", "spatial_grid", 65, 64),
    ("toca", "step_buckets", 65, 64),
    ("fora", "interval", 2**200, 10000),
    ("duca", "warmup_steps", 10001, 10000),
    ("duca", "num_steps", 10001, 10000),
])
def test_options_have_upper_bounds(method, option, value, bound):
    """A k-means that would loop for hours, or a step count no sampler runs, is refused at once."""
    extra = dict(schedule="dit") if option == "num_steps" else {}
    with pytest.raises(ConfigError, match=f"{option} must be <= {bound}"):
        fxcache.cache_backend(method, **{option: value}, **extra)
    fxcache.cache_backend(method, **{option: bound}, **extra)  # the bound itself is accepted


def test_a_step_count_other_than_the_schedules_num_steps_is_said():
    """A schedule written for num_steps (the countdown of the dit presets) says so when a loop goes past it, once,
    and an export for another step count is refused before tracing."""
    compiled = torch.compile(make_model("dit"), backend=fxcache.cache_backend(
        "fora", interval=2, schedule="countdown", num_steps=3, lowering="eager"), dynamic=False)
    with pytest.warns(fxcache.FxCacheWarning, match="step 3 is past num_steps=3") as caught, torch.no_grad():
        for s in range(5):
            compiled(**make_inputs("dit", t=1.0 - s / 6))
    assert sum("past num_steps" in str(w.message) for w in caught) == 1
    assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "full", "reuse", "full"]
    with pytest.raises(ConfigError, match="written for num_steps=50 but the export covers num_steps=25"):
        fxcache.export(make_model("dit"), make_inputs("dit"), "fora", preset="dit", out_dir="/nonexistent/x",
                       num_steps=25)


def test_a_wrapped_transformer_is_found_by_structure_and_a_wrong_block_list_names_the_right_one():
    """A wrapper module (PEFT's base_model.model, a user's own) moves the block list below the root: found by
    structure with no option; an explicit block_lists that matches nothing gets an error naming the path."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    strict = torch.compile(Wrapper(make_model("dit")), backend=fxcache.cache_backend(
        "fora", strict=True, lowering="eager", block_lists=("transformer_blocks",)), dynamic=False)
    with pytest.raises(UnsupportedGraphError, match=r"pass block_lists=\('inner.transformer_blocks',\)"), \
            torch.no_grad():
        strict(**make_inputs("dit"))
    for options in ({}, {"block_lists": ("inner.transformer_blocks",)}):
        torch._dynamo.reset()
        backend = fxcache.cache_backend("fora", strict=True, lowering="eager", **options)
        compiled = torch.compile(Wrapper(make_model("dit")), backend=backend, dynamic=False)
        with torch.no_grad():
            for s in range(3):
                compiled(**make_inputs("dit", t=1.0 - s / 4))
        assert [r["kind"] for r in fxcache.stats(compiled)] == ["full", "reuse", "reuse"]
