"""The GPU check (benchmarks/gpu_check.sh) dry-run on CPU, so that the one prepared GPU run cannot fail on a typo,
and the carried wheel list (benchmarks/gpu_wheels.txt) checked against every module the check imports."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_gpu  # noqa: E402


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: str) -> dict[str, str | None]:
    """name -> pinned version (or None) of a package list."""
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[norm(name)] = version or None
    return out


IMAGE = listed(os.path.join(BENCH, "gpu_image.txt"))
WHEELS = listed(os.path.join(BENCH, "gpu_wheels.txt"))


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
        return True
    except md.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable, OUT="", FXCACHE_WHEEL_SITE=str(out / "site"))
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return out, proc


def test_the_dry_run_finishes_every_stage_and_row(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = {s["stage"]: s for s in map(json.loads, open(out / "check.jsonl"))}
    assert stages["pytest"]["rc"] == 0 and "skipped" in stages["pytest"]["summary"], stages["pytest"]
    assert "needs a CUDA GPU" in (out / "pytest.log").read_text()
    assert stages["bench"]["failed"] == [] and stages["bench"]["skipped"] == []

    rows = [json.loads(line) for line in open(out / "rows.jsonl")]
    assert [r["row"] for r in rows] == bench_gpu.order_rows(list(bench_gpu.DEFAULT_ROWS))
    assert rows[0]["row"] == "compile" and rows[-1]["row"].startswith("cache-dit")
    for r in rows:
        assert r["seconds"] > 0 and r["speedup"] > 0, r
        assert sum(k["calls"] for k in r["kinds"].values()) == r["steps"], r
        if r["row"].startswith("compile"):
            assert r["flops_speedup"] == pytest.approx(1.0), r
        elif r["row"] == "cache-dit":  # its threshold decides at run time (8 warm-up steps of 12 here)
            assert r["flops_speedup"] >= 1.0, r
        else:
            assert r["flops_speedup"] > 1.0, r
    by_row = {r["row"]: r for r in rows}
    assert set(by_row["duca"]["kinds"]) == {"full", "partial", "skip"}
    assert set(by_row["fora"]["kinds"]) == {"full", "reuse"}
    assert by_row["cache-dit-static"]["kinds"]["compute"]["calls"] == -(-rows[0]["steps"] // 5)
    assert by_row["duca-cudagraphs"]["cache_gib"] > 0
    assert "ms per call, by step kind" in proc.stdout
    env = json.load(open(out / "env.json"))
    assert env["torch"] and env["diffusers"] and env["cache_dit"]


def test_the_carried_wheels_cover_every_import_of_the_gpu_check(dry_run):
    """Every top-level module the tests and the benchmark imported comes from the standard library, this checkout,
    the GPU image or a carried wheel."""
    out, proc = dry_run
    names = set()
    for stage in ("imports-tests.txt", "imports-bench.txt"):
        names |= set((out / stage).read_text().split())
    assert {"torch", "diffusers", "cache_dit", "fxcache", "pytest"} <= names
    local = {"fxcache"} | {os.path.splitext(f)[0] for d in ("tests", "tests/gpu", "benchmarks")
                           for f in os.listdir(os.path.join(ROOT, d))}
    owners = md.packages_distributions()
    # what an image package needs in the version installed here is the image's business (it ships its own version)
    image_needs, todo = set(), [d for d in IMAGE if _installed(d)]
    while todo:
        for r in md.requires(todo.pop()) or []:
            need = norm(Requirement(r).name)
            if need not in image_needs and "extra ==" not in r and _installed(need):
                image_needs.add(need)
                todo.append(need)
    missing = {}
    for name in sorted(names - local - set(sys.stdlib_module_names)):
        dists = [norm(d) for d in owners.get(name, [])]
        if not dists or not any(d in IMAGE or d in WHEELS or d in image_needs for d in dists):
            missing[name] = dists
    assert not missing, f"carry these as wheels (benchmarks/gpu_wheels.txt): {missing}"


def test_the_carried_wheels_need_nothing_else():
    """Each carried wheel's requirements (for Python 3.12 on Linux) are in the image or carried, at versions that
    satisfy them where the version is known."""
    env = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", implementation_name="cpython", extra="")
    problems = []
    for name in WHEELS:
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            have = norm(req.name)
            if have not in IMAGE and have not in WHEELS:
                problems.append(f"{name} needs {req}: neither in the image nor carried")
                continue
            version = WHEELS.get(have) or IMAGE.get(have)
            if version and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{name} needs {req}, but {req.name} {version} is what the GPU machine gets")
    assert not problems, problems
    assert all(WHEELS.values()), "pin every carried wheel (name==version)"
