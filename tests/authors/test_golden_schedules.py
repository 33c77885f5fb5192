"""Every preset's plans against the golden step tables read from the authors' code (`golden/*.json`, made by
`golden/derive_tables.py` from the authors' scheduling rules, with the file and line of each rule): the kind of
every block at every step, and for partial blocks the tokens each unit recomputes.

The plans are asked of the method's recipe for a model laid out as the reference model (DiT-XL/2 at 256 px: 28
blocks of 256 tokens; PixArt-alpha at 256 px: 28 blocks, cross-attention; FLUX.1-dev at 1024 px: 19 double blocks
of 4096 image and 512 text tokens, 38 single blocks of 4608), so the test needs no model and checks all 50 steps.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from fxcache.config import make_config
from fxcache.methods import recipe_for
from fxcache.step_plan import GraphView, UnitView

GOLDEN = pathlib.Path(__file__).parent / "golden"


def layout(data: dict) -> tuple[GraphView, list[list[str]]]:
    """The reference model's blocks as a GraphView, and each block's partial unit names in the golden files'
    `<list>.<layer>.<unit>` form."""
    family, tokens = data["family"], data["tokens"]
    blocks, names = [], []
    if family == "flux":
        img, txt = tokens["img"], tokens["txt"]
        for layer in range(19):
            blocks.append((UnitView(f"double.{layer}.attn", "attn", 0, layer, 19, 0),
                           UnitView(f"double.{layer}.mlp_img", "mlp", img, layer, 19, 0),
                           UnitView(f"double.{layer}.mlp_txt", "mlp", txt, layer, 19, 0)))
            names.append([f"double.{layer}.mlp_img", f"double.{layer}.mlp_txt"])
        for layer in range(38):
            blocks.append((UnitView(f"single.{layer}.fused", "mlp", img + txt, layer, 38, 1),))
            names.append([f"single.{layer}.fused"])
    else:
        n = tokens["img"]
        for layer in range(28):
            units = [UnitView(f"blocks.{layer}.attn", "attn", 0, layer, 28, 0)]
            if family == "pixart":
                units.append(UnitView(f"blocks.{layer}.xattn", "xattn", n, layer, 28, 0))
            units.append(UnitView(f"blocks.{layer}.mlp", "mlp", n, layer, 28, 0))
            blocks.append(tuple(units))
            names.append([u.name for u in units if u.tokens])
    return GraphView(tuple(blocks)), names


#: golden file -> (method, preset). TaylorSeer's FLUX preset keeps the paper's order 2 (the code's default is 1):
#: orders do not change step kinds.
CASES = {
    "dit_toca": ("toca", "dit"), "dit_fora": ("fora", "dit"), "dit_duca": ("duca", "dit"),
    "dit_taylorseer": ("taylorseer", "dit"), "dit_clusca": ("clusca", "dit"),
    "pixart_toca": ("toca", "pixart"), "pixart_duca": ("duca", "pixart"),
    "flux_toca": ("toca", "flux"), "flux_taylorseer": ("taylorseer", "flux"), "flux_clusca": ("clusca", "flux"),
}
#: fxcache's block kinds by the golden files' names
KIND = {"full": "full", "partial": "partial", "skipped": "skip", "reuse": "reuse", "forecast": "forecast",
        "cluster": "cluster"}


def our_steps(method: str, preset: str, view: GraphView, names, num_steps: int) -> list[dict]:
    config = make_config(method, preset=preset)
    recipe = recipe_for(config)
    out = []
    for s in range(num_steps):
        plan = recipe.plan(s, view)
        kinds, k = [], {}
        for li, (block, units) in enumerate(zip(plan.blocks, names)):
            kind = KIND[block.kind.value]
            if kind == "cluster" and view.blocks[li][0].list_index > 0:
                kind = "forecast"  # ClusCa refreshes the first block list's units; the others are forecast only
            kinds.append(kind)
            if kind == "partial":
                k.update(zip(units, block.k))
        out.append({"blocks": kinds, "k": k})
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_plans_equal_the_authors_tables(name):
    data = json.loads((GOLDEN / f"{name}.json").read_text())
    method, preset = CASES[name]
    view, names = layout(data)
    ours = our_steps(method, preset, view, names, data["num_steps"])
    for s, (got, want) in enumerate(zip(ours, data["steps"])):
        assert got["blocks"] == want["blocks"], f"{name} s={s}: block kinds differ"
        if "partial" in want["blocks"]:
            assert got["k"] == want["k"], f"{name} s={s}: recomputed tokens differ"
    assert len(ours) == len(data["steps"]) == data["num_steps"]


def test_the_tables_name_the_authors_files_and_lines():
    for name in CASES:
        data = json.loads((GOLDEN / f"{name}.json").read_text())
        assert data["source"]["commit"] and len(data["source"]["commit"]) == 40
        assert data["rules"] and all(r["file"] and r["lines"] for r in data["rules"])
