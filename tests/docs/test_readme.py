"""Every ```python block of README.md, run in order as a reader pastes them, read from the file at test time.

The blocks assume names a reader has (`pipe`, `transformer`, `latents`, ...): `stand_ins()` gives small real
ones. Blocks that make an fxcache backend or export session must cache: after the block, non-FULL steps are in
the stats of what it made (a session the block only loads is driven through a short loop first). A block that
fails, or uses a name nobody defined, fails the test; the only blocks not run are those in `NOT_RUN`, each with
its reason, and an entry that matches no block fails too.

Two things differ from a reader's run, for time: the Inductor lowering is replaced by the eager one (the same
variant graphs, run as Python instead of compiled; `tests/test_inductor.py` covers Inductor), and the passes'
invariants are not re-checked after every pass (`tests/passes/` does that).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import fxcache
from fxcache.backends import eager
from fxcache.deploy import CachedSession
from fxcache.testing import make_inputs, make_model

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SCENES = REPO / "fxcache" / "quality" / "checkpoints" / "scenes"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

#: a line of a block that is not run -> why (keep this short: a listed block is documentation nobody checks)
NOT_RUN: dict[str, str] = {}


def python_blocks() -> list[str]:
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def stand_ins() -> dict:
    """The names the README's blocks take as given: a real diffusers FluxPipeline (the committed text-to-image
    reference, with real tokenizers and text encoders, sampled at 32x32), a tiny DiT transformer with its call
    arguments, and a scheduler and latents for a custom loop."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(SCENES)).to(torch.float32)
    pipe.default_sample_size = 32  # 32x32 images (the reference's size) when a call gives none
    pipe.set_progress_bar_config(disable=True)
    transformer = make_model("dit", out_channels=4)  # predicts noise only: the custom loop's scheduler steps it
    example_kwargs = make_inputs("dit")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(6)
    conditioning = {k: v for k, v in example_kwargs.items() if k not in ("hidden_states", "timestep", "return_dict")}
    return dict(torch=torch, fxcache=fxcache, pipe=pipe, prompt="a picture of two red circles on the left",
                transformer=transformer, example_kwargs=example_kwargs, scheduler=scheduler,
                timesteps=scheduler.timesteps, latents=example_kwargs["hidden_states"].clone(),
                conditioning=conditioning)


def drive(session, example_kwargs: dict, steps: int = 6) -> None:
    """A session the block loaded but did not call: a short sampling loop through it, as a pipeline would."""
    first = example_kwargs["timestep"]
    with torch.no_grad(), fxcache.request(session):
        for i in range(steps):
            session(**dict(example_kwargs, timestep=(first * (1 - 0.1 * i)).to(first.dtype)))


def test_not_run_entries_each_name_one_block():
    found = python_blocks()
    for line, why in NOT_RUN.items():
        assert why and sum(line in b for b in found) == 1, f"NOT_RUN entry {line!r} names no single README block"


def test_every_python_block_of_the_readme_runs_and_what_enables_caching_caches(tmp_path, monkeypatch):
    found = python_blocks()
    assert len(found) >= 2, "README.md has no python blocks: the pattern no longer finds them"
    monkeypatch.setattr("fxcache.backends.inductor.lower", eager.lower)
    monkeypatch.setenv("FXCACHE_CHECK_PASSES", "0")  # the passes' invariants are checked by their own tests
    made: list = []
    for cls in (fxcache.CacheBackend, CachedSession):
        init = cls.__init__

        def recording(self, *args, __init=init, **kwargs):
            __init(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", recording)
    (tmp_path / "fxcache").symlink_to(REPO / "fxcache", target_is_directory=True)  # the README's relative paths
    monkeypatch.chdir(tmp_path)  # what the blocks write lands here
    namespace = stand_ins()
    ran = []
    for i, code in enumerate(found):
        listed = [why for line, why in NOT_RUN.items() if line in code]
        if listed:
            continue
        before = len(made)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(compile(code, f"README.md python block {i}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"README python block {i} fails ({type(exc).__name__}: {exc}); neither runnable nor in "
                            f"NOT_RUN:\n{code}")
        ours = [str(w.message) for w in caught if issubclass(w.category, fxcache.FxCacheWarning)]
        assert not ours, f"README python block {i} warns:\n{code}\n{ours}"
        new = made[before:]
        sessions = [m for m in new if isinstance(m, CachedSession)]
        for session in sessions:
            if not session.stats():
                drive(session, namespace["example_kwargs"])
        checked = sessions or new
        if checked:
            kinds = {r["kind"] for m in checked for r in m.stats()}
            assert kinds - {"full"}, f"README python block {i} sets up caching but nothing it made cached " \
                                     f"(kinds {sorted(kinds)}):\n{code}"
            for session in sessions:
                assert {r["kind"] for r in session.stats()} - {"full"}, f"block {i}: a session did not cache"
        ran.append(i)
    assert len(ran) + sum(any(line in b for line in NOT_RUN) for b in found) == len(found)
