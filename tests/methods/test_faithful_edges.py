"""Edges of the step-count presets: a request shorter than the schedule's num_steps, ratio schedules that count
the steps, step buckets, warm-up under the references' schedules, explain with a preset."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxcache
from fxcache import ConfigError
from fxcache.config import make_config
from fxcache.testing.models import make_model
from helpers import loop_inputs


def test_a_request_shorter_than_the_presets_num_steps_warns_once():
    model = make_model("dit")
    backend = fxcache.cache_backend("toca", preset="dit", lowering="eager")
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            with fxcache.request(compiled):
                for kw in loop_inputs("dit", 7):
                    compiled(**kw)
    short = [w for w in caught if "ended after 7 steps" in str(w.message)]
    assert len(short) == 1 and "num_steps=50" in str(short[0].message)


@pytest.mark.parametrize("method,preset", [("duca", "pixart"), ("toca", "pixart"), ("toca", "dit")])
def test_presets_whose_ratio_follows_progress_plan_for_their_step_count(method, preset):
    """DuCa's PixArt preset keeps a constant interval but its ratio schedule counts steps: it has a step count
    too, so a longer or shorter loop is reported and an export for another count is refused."""
    assert make_config(method, preset=preset).planned_steps == make_config(method, preset=preset).num_steps
    assert make_config("duca").planned_steps is None


@given(buckets=st.integers(50, 64), step=st.integers(0, 49))
def test_as_many_buckets_as_steps_is_a_table_per_step(buckets, step):
    per_step = make_config("toca", preset="dit")
    bucketed = make_config("toca", preset="dit", step_buckets=buckets)
    assert bucketed.schedule_step(step) == per_step.schedule_step(step) == step


@pytest.mark.parametrize("method", ["toca", "duca"])
@pytest.mark.parametrize("schedule", ["dit", "pixart"])
def test_the_references_schedules_take_no_warmup(method, schedule):
    with pytest.raises(ConfigError, match="warmup_steps must be 1"):
        make_config(method, schedule=schedule, num_steps=20, warmup_steps=3)


def test_explain_with_a_preset_summarises_the_schedule(capsys):
    model = make_model("dit", sample_size=32)
    kw = loop_inputs("dit", 1, size=32)[0]
    result = fxcache.explain(model, **kw, method="toca", preset="dit")
    line = result.schedules[0]
    assert "schedule over 50 steps" in line and "mixed steps" in line and "s = 4, 17" in line
    assert "distinct plans" in line
    with pytest.raises(ConfigError, match="pass the method by name"):
        fxcache.explain(model, **kw, preset="dit")
