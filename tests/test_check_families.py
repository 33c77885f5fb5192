"""No false FAIL from fxcache.testing.check_model on the families the README lists as cached: tiny random-init
models of FLUX, SD3, PixArt, Lumina2 (its forward graph-breaks) and Wan (a video DiT), the default methods."""

import pytest

from fxcache.testing import check_model
from families import FAMILIES

METHODS = ["fora", "duca", "taylorseer"]


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "lumina2", "wan"])
def test_no_false_fail_on_the_supported_families(family):
    """Tiny random-init models of families the README lists as cached (Lumina2 graph-breaks on its caption lengths
    and is cached as a piece; Wan is a video DiT): the default methods pass every check; a break is a WARN that
    names the model's own file and line."""
    f = FAMILIES[family]
    report = check_model(f.model(), f.inputs(1, 0.9, 0), METHODS, steps=4)
    assert report.ok and all(c.status == "PASS" for c in report.checks if c.name != "graph breaks"), str(report)
    names = [c.name for c in report.checks]
    for method in METHODS:
        assert f"{method}: FULL equals uncached" in names
        assert f"{method}: variants equal the hooked reference" in names
        assert f"{method}: two generations, no recompile" in names
    breaks = next(c for c in report.checks if c.name == "graph breaks")
    if family == "lumina2":
        assert breaks.status == "WARN", str(report)
        assert "diffusers/models/transformers/transformer_lumina2.py:" in breaks.detail
        assert "2 of 2 block(s) cached" in breaks.detail and "eagerly and uncached" in breaks.detail
        assert report.summary().startswith("OK with 1 warning(s)")
    else:
        assert breaks.status == "PASS" and report.summary().startswith("OK (")
