"""The coverage table (issue #14, deliverable 4): every diffusers transformer family with a tiny config in our tests
(tests/families.py), image and video, cached by every method it can take, with no option given.

Per family: the FULL step equals the uncached model at a size other than the config's; a 10-step loop (t falling,
latents drifting as a sampler moves them) under each method caches (the schedule's kinds run) and stays within the
method's usual error of the uncached model; a method a family cannot take runs uncached, says why in one warning, and
gives the uncached output. The README's coverage table is checked against these facts.
"""

from __future__ import annotations

import pathlib
import warnings

import pytest
import torch

import fxcache
from families import FAMILIES, sample
from fxcache import FxCacheWarning
from helpers import rel_err

#: the methods, as a user first tries them (intervals of their papers' usual settings)
METHODS = {
    "fora": dict(interval=3),
    "toca": dict(interval=3, fresh_ratio=0.25),
    "duca": dict(interval=3, ratio=0.25),
    "taylorseer": dict(interval=4, warmup_steps=1),
    "clusca": dict(interval=3),
}

#: a cached step's usual error: at most 1.5 times the error of returning the uncached output of the last FULL step
#: instead (how far the output moves between full steps; measured over every family with `python
#: tests/test_coverage.py`: the largest ratio was 1.21, TaylorSeer on HunyuanDiT). FULL steps equal the uncached
#: model.
USUAL = 1.5

_PIECES = "does not work per piece"  # ClusCa on a forward that graph-breaks
_NO_STREAM = "output to cluster"  # the feed-forward runs on a joint text + image sequence that no block returns
_NO_FF = "no token-wise feed-forward unit can be recomputed"  # the feed-forward mixes tokens (a conv) or is absent

#: (family, method) that cannot be cached, and the reason fxcache's warning gives
CANNOT: dict[tuple[str, str], str] = {
    **{(name, "clusca"): _PIECES for name in ("lumina2", "mochi", "framepack", "hunyuanvideo15", "omnigen",
                                             "hidream", "hunyuanimage")},
    **{(name, "clusca"): _NO_STREAM for name in ("cogvideox", "cogview3plus", "consisid")},
    **{(name, "clusca"): _NO_FF for name in ("sana", "sanavideo", "cogview4", "zimage")},
}

STEPS = 10


def smooth_loop(name: str, steps: int = STEPS) -> list[dict]:
    """One request: t from 0.9 down by 0.04 per step, the latents of seed 0 drifting towards those of seed 1 (3% a
    step), the conditioning of seed 0 throughout."""
    fam = FAMILIES[name]
    out = []
    for s in range(steps):
        t = 0.9 - 0.04 * s
        kw = fam.inputs(1, t, 0)
        other = fam.inputs(1, t, 1)[fam.latent]
        mix = 0.03 * s
        if isinstance(other, list):
            kw[fam.latent] = [a * (1 - mix) + b * mix for a, b in zip(kw[fam.latent], other)]
        else:
            kw[fam.latent] = kw[fam.latent] * (1 - mix) + other * mix
        out.append(kw)
    return out


def run_method(name: str, method: str, model, kws) -> tuple[list[torch.Tensor], list[dict], list[str], object]:
    backend = fxcache.cache_backend(method, lowering="eager", **METHODS[method])
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [sample(compiled(**kw)) for kw in kws]
    messages = [str(w.message) for w in caught if issubclass(w.category, FxCacheWarning)]
    return outs, fxcache.stats(compiled), messages, backend


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_step_equals_the_uncached_model_at_another_size(name):
    fam = FAMILIES[name]
    model = fam.model()
    kw = fam.off(1, 0.7, 3)
    with torch.no_grad():
        expected = sample(model(**kw))
    outs, records, messages, _ = run_method(name, "duca", model, [kw])
    torch._dynamo.reset()
    assert not messages, messages
    assert any(r["cached"] for r in records) and all(r["kind"] == "full" for r in records)
    assert rel_err(outs[0], expected) <= 1e-5


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_method_caches_the_family_within_its_usual_error(name):
    fam = FAMILIES[name]
    model = fam.model()
    kws = smooth_loop(name)
    with torch.no_grad():
        expected = [sample(model(**kw)) for kw in kws]
    for method in METHODS:
        outs, records, messages, backend = run_method(name, method, model, kws)
        torch._dynamo.reset()
        errors = [rel_err(o, e) for o, e in zip(outs, expected)]
        if (name, method) in CANNOT:
            assert messages and all(CANNOT[name, method] in m for m in messages), messages
            assert max(errors) <= 1e-6 and not any(r["cached"] and r["kind"] != "full" for r in records)
            continue
        assert not messages, (method, messages)
        cached = [r for r in records if r["cached"]]
        want = {backend.config.step_kind(s).value for s in range(STEPS)}
        assert {r["kind"].split("[")[0] for r in cached} == want, (method, [(r["step"], r["kind"]) for r in cached])
        assert all(r["kind"].startswith(backend.config.step_kind(r["step"]).value) or r["kind"] == "full"
                   for r in cached)
        full = full_calls(cached, backend.config)
        stale = stale_errors(expected, full)
        for s, (e, st) in enumerate(zip(errors, stale)):
            bound = 1e-5 if full[s] else USUAL * st + 1e-4
            assert e <= bound, (method, s, f"error {e:.3g}, stale {st:.3g}")
        assert max(errors) > 1e-5, f"{method}: every step equals the uncached model; caching is inactive"


# -- the README's table --------------------------------------------------------------------------------------------------

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_rows() -> dict[str, list[str]]:
    text = README.read_text()
    table = text.split("<!-- coverage:start -->", 1)[1].split("<!-- coverage:end -->", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_the_readme_coverage_table_states_what_the_tests_check():
    rows = readme_rows()
    assert sorted(rows) == sorted(FAMILIES)
    assert len(FAMILIES) >= 20 and sum(FAMILIES[n].kind == "video" for n in FAMILIES) >= 5
    for name, cells in rows.items():
        fam = FAMILIES[name]
        model_cls, kind, methods = cells[1].strip("`"), cells[2], cells[3:3 + len(METHODS)]
        assert model_cls == type(fam.model()).__name__, name
        assert kind == fam.kind, name
        for method, cell in zip(METHODS, methods):
            if (name, method) in CANNOT:
                assert cell.startswith("no"), (name, method, cell)
            else:
                assert cell == "yes", (name, method, cell)


def full_calls(cached: list[dict], config) -> list[bool]:
    """Per model call of the loop, whether it ran as a FULL step: its step (every piece of a call has the same
    one) is read from the records of that call's t (a model whose t rises runs its second call as step 0 too)."""
    steps = {}
    for r in cached:
        steps.setdefault(r["t"], r["step"])
    return [config.step_kind(s).value == "full" for s in steps.values()]


def stale_errors(expected: list[torch.Tensor], full: list[bool]) -> list[float]:
    """Per call, the error of returning the uncached output of the last FULL call instead: how far the model's
    output moves between full steps, the scale a cache's error is measured against."""
    out, last = [], 0
    for s, e in enumerate(expected):
        if full[s]:
            last = s
        out.append(rel_err(expected[last], e))
    return out


if __name__ == "__main__":  # the measurement behind the bounds: every family's error per method, and against stale
    import sys

    torch.set_num_threads(1)
    for name in sys.argv[1:] or sorted(FAMILIES):
        model = FAMILIES[name].model()
        kws = smooth_loop(name)
        with torch.no_grad():
            expected = [sample(model(**kw)) for kw in kws]
        row = []
        for method in METHODS:
            outs, records, messages, backend = run_method(name, method, model, kws)
            torch._dynamo.reset()
            errs = [rel_err(o, e) for o, e in zip(outs, expected)]
            stale = stale_errors(expected, full_calls([r for r in records if r["cached"]], backend.config))
            ratio = max((e / st for e, st in zip(errs, stale) if st > 0), default=0.0)
            row.append(f"{method}={max(errs):.3g} x{ratio:.2f}{'' if not messages else ' WARN'}")
        print(name, " | ".join(row), flush=True)
