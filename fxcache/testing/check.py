"""Graph-equivalence checks of a user's own transformer, for their CI: what the analysis finds, graph breaks, the
FULL step and an every-step-FULL loop against the uncached model, each method's compiled variants against the
hooked eager reference, and no recompile over two generations. A diffusers upgrade that changes what fxcache
sees fails here, with one line per check saying why."""

from __future__ import annotations

import dataclasses
import os

import torch

from ..analysis import DEFAULT_BLOCK_LISTS
from ..analysis.units import ATTN
from ..config import make_config
from ..errors import ConfigError

#: methods whose maths the hooked reference writes out (ToCa's and ClusCa's have their own references)
REFERENCE_METHODS = ("fora", "duca", "taylorseer")

PASS, WARN, SKIP, FAIL = "PASS", "WARN", "SKIP", "FAIL"


@dataclasses.dataclass
class Check:
    """One line of a report. `status`: PASS; WARN (holds, at a cost the detail states; `strict=True` makes it a
    FAIL); SKIP (not checked, the detail says why: never a silent pass); FAIL."""

    name: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def __str__(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _verdict(ok: bool) -> str:
    return PASS if ok else FAIL


@dataclasses.dataclass
class CheckReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """No FAIL line (WARN and SKIP lines do not fail a report; with strict=True a WARN is a FAIL)."""
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARN]

    @property
    def skipped(self) -> list[Check]:
        return [c for c in self.checks if c.status == SKIP]

    def summary(self) -> str:
        """One line: the verdict and the count of each status."""
        tally = {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, SKIP, FAIL)}
        counts = ", ".join(f"{n} {s}" for s, n in tally.items() if n)
        if not self.ok:
            return f"FAILED: {len(self.failures)} check(s) failed ({counts})"
        if self.warnings:
            return (f"OK with {len(self.warnings)} warning(s) ({counts}): a WARN is no failure; strict=True "
                    "(--strict) makes it one")
        return f"OK ({counts})"

    def __str__(self) -> str:
        return "\n".join([*map(str, self.checks), LOWERING_NOTE, self.summary()])


#: what the checks run: the rewritten graphs themselves, which Inductor (or another lowering) then compiles
LOWERING_NOTE = ("(the cached variants run with the eager lowering: the rewritten graphs fxcache hands to Inductor, "
                 "checked before Inductor compiles them)")


def _first_tensor(out) -> torch.Tensor:
    while not isinstance(out, torch.Tensor):
        out = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _loop(inputs: dict, key: str, steps: int) -> list[dict]:
    """`steps` calls whose timestep input falls from its example value (or from 1 when that is 0), in its dtype."""
    t0 = inputs[key]
    top = t0 if bool((t0 != 0).any()) else torch.ones_like(t0)
    if top.is_floating_point():
        return [dict(inputs, **{key: top * (steps - s) / steps}) for s in range(steps)]
    return [dict(inputs, **{key: (top * (steps - s)) // steps}) for s in range(steps)]


def _missing_arguments(model, inputs: dict, required: bool = True) -> list[str]:
    """The forward's keyword-able parameters absent from `inputs` (only those without a default: `required`)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in inputs
            and (p.default is inspect.Parameter.empty or not required)]


def check_model(model: torch.nn.Module, example_inputs: dict, methods=REFERENCE_METHODS, *, steps: int = 6,
                timestep_input: str | None = None, block_lists: tuple[str, ...] = DEFAULT_BLOCK_LISTS,
                tolerance: float = 1e-4, strict: bool = False) -> CheckReport:
    """Check that fxcache caches `model` as the maths says, on `example_inputs` (the forward's keyword arguments).

    Returns a `CheckReport` (`.ok`, one `Check` per line); `assert report.ok, report` in a pytest test. `methods`:
    names (or configs) run in a `steps`-call loop whose timestep falls; those in REFERENCE_METHODS are also
    compared with the hooked eager reference. `tolerance`: relative L2 error allowed against the uncached model and
    the reference (float32 reductions in another order). A graph break in a model fxcache still caches is a WARN
    (where it happens, what it costs); `strict=True` makes every WARN a FAIL."""
    if not isinstance(strict, bool):
        raise ConfigError(f"strict must be True or False, got {strict!r}")
    model = model.eval()
    checks = _checks(model, example_inputs, methods, steps, timestep_input, block_lists, tolerance)
    if strict:
        checks = [Check(c.name, FAIL, c.detail + " (strict: a warning fails)") if c.status == WARN else c
                  for c in checks]
    return CheckReport(checks)


def _checks(model, example_inputs, methods, steps, timestep_input, block_lists, tolerance) -> list[Check]:
    checks: list[Check] = []
    missing = _missing_arguments(model, example_inputs)
    if missing:
        return [Check("analysis", FAIL, f"example_inputs lack the forward's required argument(s) "
                                        f"{', '.join(missing)}")]
    with torch.no_grad():
        try:
            explained = _explain_quietly(model, example_inputs, block_lists, timestep_input)
        except Exception as exc:  # Dynamo could not trace it at all
            absent = _missing_arguments(model, example_inputs, required=False)
            hint = f" (example_inputs lack the forward's argument(s) {', '.join(absent)})" if absent else ""
            return [Check("analysis", FAIL, f"Dynamo could not trace the model: {exc}{hint}")]
        plans = [p for p in explained.plans if p is not None]
        if not plans:
            reasons = "; ".join(e for e in explained.errors if e) or "no graph"
            return [Check("analysis", FAIL, f"no graph can be cached: {reasons}")]
        plan = plans[0]
        more = f" (and {len(plans) - 1} more graph(s) with blocks)" if len(plans) > 1 else ""
        checks.append(Check("analysis", PASS, plan.summary().splitlines()[0] + more))
        checks.append(_graph_breaks(model, explained, plans, block_lists))
        if plan.timestep_index is not None:
            key = plan.input_paths.get(plan.timestep_index, "")
        else:  # a piece of a graph-broken forward: stepped by the forward's timestep argument
            from ..runtime.calls import timestep_parameter

            key = timestep_parameter(model, timestep_input) or ""
        if key not in example_inputs:
            checks.append(Check("timestep", FAIL, f"the timestep input `{key}` is not a top-level keyword of "
                                                  "example_inputs; pass the forward's arguments by name"))
            return checks
        loop = _loop(example_inputs, key, steps)
        uncached = [_first_tensor(model(**kw)) for kw in loop]
        units = _reference_units(model, plans)
        for method in methods:
            config = method if not isinstance(method, str) else make_config(method)
            try:
                _check_method(checks, model, config, loop, uncached, units, block_lists, timestep_input, steps,
                              tolerance)
            except Exception as exc:  # strict mode: a graph fxcache cannot cache, or a failing variant
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                checks.append(Check(f"{config.method}: cached run", FAIL, first))
            finally:
                torch._dynamo.reset()
    return checks


def _short(path: str) -> str:
    """A break location with an installed package's path shortened to the package (diffusers/models/...)."""
    marker = f"site-packages{os.sep}"
    return path.split(marker, 1)[1] if marker in path else path


def _graph_breaks(model, explained, plans, block_lists) -> Check:
    """PASS without a break. A model fxcache still caches: WARN, with where each break happens (the innermost frame
    outside torch: the model's code or a hook of the user's) and what it costs. (No graph with blocks is an
    analysis FAIL before this.)"""
    breaks = explained.graph_break_count
    if not breaks:
        return Check("graph breaks", PASS, f"{explained.graph_count} graph(s), 0 breaks")
    where: dict[str, str] = {}
    for reason, location in zip(explained.break_reasons, explained.break_locations):
        first = reason.strip().splitlines()[0] if reason.strip() else "graph break"
        where.setdefault(_short(location) if location else "an unknown place", first)
    places = "; ".join(f"at {loc} ({why})" for loc, why in list(where.items())[:3])
    if len(where) > 3:
        places += f"; and {len(where) - 3} more place(s)"
    cached, total = _block_share(model, plans, block_lists)
    share = f"{len(cached)} of {len(total)} block(s) cached" if total else f"{len(cached)} block(s) cached"
    return Check("graph breaks", WARN,
                 f"{explained.graph_count} graphs, {breaks} break(s) {places or '(Dynamo gave no reason)'}. "
                 f"fxcache caches the graphs that hold blocks ({share}, in {len(plans)} graph(s)); the code between "
                 "graphs runs eagerly and uncached, with a host sync and Python time per break")


def _block_share(model, plans, block_lists) -> tuple[set[str], list[str]]:
    """(the blocks fxcache caches, every block of the block lists it caches or that `block_lists` names in the
    model). A block's own graph (the forward broke in its block loop) runs for every block of its class in its
    list."""
    from ..analysis.pieces import module_block_lists

    lists = {name: model.get_submodule(name) for name in module_block_lists(model)
             if name in block_lists or name.rsplit(".", 1)[-1] in block_lists}
    cached: set[str] = set()
    for p in plans:
        for block in p.blocks:
            parent, _, _ = block.name.rpartition(".")
            try:
                lists.setdefault(parent, model.get_submodule(parent))
            except AttributeError:
                continue
            cached.add(block.name)
            if _own_forward(p):
                cached |= {f"{parent}.{i}" for i, m in enumerate(lists[parent]) if type(m).__name__ == block.cls}
    total = [f"{name}.{i}" for name, lst in lists.items() for i in range(len(lst))]
    return cached & set(total) if total else cached, total


def _own_forward(plan) -> bool:
    """Whether a graph is a block's own forward (a break inside the block loop): it runs for every block of its
    class."""
    return plan.blocks_found.startswith("as a block's own forward")


def _reference_units(model, plans) -> dict:
    """The hooked reference's units from every graph's plan (a graph-broken model caches blocks in several graphs;
    a block's own graph caches every block of its class), as module paths: `attention`, `token_wise` (outermost
    only) and `last_block` (the last cached block in the model's module order: its output is the head's input)."""
    mods = dict(model.named_modules())
    order = {name: i for i, name in enumerate(mods)}
    kinds: dict[str, str] = {}
    blocks: set[str] = set()
    for p in plans:
        for block in p.blocks:
            targets = [block.name]
            parent = block.name.rpartition(".")[0]
            if _own_forward(p) and isinstance(mods.get(parent), torch.nn.ModuleList):
                targets = [f"{parent}.{i}" for i, m in enumerate(mods[parent]) if type(m).__name__ == block.cls]
            for target in targets:
                blocks.add(target)
                for u in block.units:
                    kinds[target + u.name[len(block.name):] if u.name.startswith(block.name) else u.name] = u.kind
    names = set(kinds)
    attention = sorted((n for n, k in kinds.items() if k == ATTN), key=lambda n: order.get(n, -1))
    token_wise = sorted((n for n, k in kinds.items() if k != ATTN and not any(
        n.startswith(o + ".") for o in names if o != n)), key=lambda n: order.get(n, -1))
    last = max(blocks, key=lambda n: order.get(n, -1))
    return dict(attention=attention, token_wise=token_wise, last_block=last)


def _check_method(checks, model, config, loop, uncached, units, block_lists, timestep_input, steps,
                  tolerance) -> None:
    """The checks of one method: FULL and an every-step-FULL loop against the uncached model, two generations
    without a recompile, and (REFERENCE_METHODS) the loop against the hooked reference."""
    import fxcache
    from .reference import HookedReference

    label = config.method
    compiled, _ = _compile(model, config, block_lists, timestep_input)
    first = _first_tensor(compiled(**loop[0]))
    err = _rel(first, uncached[0])
    checks.append(Check(f"{label}: FULL equals uncached", _verdict(err <= tolerance), f"relative error {err:.1e}"))
    torch._dynamo.reset()
    every_config = config.every_call_computed()
    every, _ = _compile(model, every_config, block_lists, timestep_input)
    with fxcache.request(every):
        errs = [_rel(_first_tensor(every(**kw)), u) for kw, u in zip(loop, uncached)]
    how = "interval=1" if getattr(every_config, "interval", None) == 1 else f"threshold={every_config.threshold}"
    checks.append(Check(f"{label}: {how} equals uncached over {steps} steps", _verdict(max(errs) <= tolerance),
                        f"largest relative error {max(errs):.1e}"))
    torch._dynamo.reset()
    compiled, backend = _compile(model, config.every_call_reused(), block_lists, timestep_input)
    runs, graphs = [], []
    for _ in range(2):
        with fxcache.request(compiled):
            runs.append([_first_tensor(compiled(**kw)) for kw in loop])
        graphs.append(len(backend.runners))
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    per_call: dict = {}  # each call's kind, from its cached graphs (a graph-broken forward has several per call)
    for r in fxcache.stats(compiled):
        if r["cached"]:
            per_call.setdefault((r["request"], r["t"]), r["kind"])
    kinds = list(per_call.values())[: len(loop)]
    cached = [s for s, k in enumerate(kinds) if k != "full"]
    moved = max((_rel(runs[0][s], uncached[s]) for s in cached), default=0.0)
    checks.append(Check(f"{label}: caching active", _verdict(bool(cached) and moved > 1e-7),
                        f"steps {' '.join(kinds)}; " + (f"cached steps differ from uncached by up to {moved:.1e}"
                                                        if cached else "no cached step ran (all FULL)")
                        + ("" if not cached or moved > 1e-7 else ": they equal it, nothing was reused")))
    checks.append(Check(f"{label}: two generations, no recompile", _verdict(graphs[0] == graphs[1] and same),
                        f"{graphs[0]} compiled graph(s), {graphs[1] - graphs[0]} more in the second generation; "
                        "second generation " + ("equals the first" if same else "differs from the first")))
    name = f"{label}: variants equal the hooked reference"
    if label not in REFERENCE_METHODS:
        checks.append(Check(name, SKIP, f"the hooked reference writes out {', '.join(REFERENCE_METHODS)} only; "
                                        f"{label}'s variants are checked against the uncached model above"))
        return
    mods = dict(model.named_modules())
    absent = [n for n in [*units["attention"], *units["token_wise"], units["last_block"]] if n not in mods]
    if absent:
        checks.append(Check(name, SKIP, f"the reference hooks modules, and {absent[0]} (a unit fxcache caches) is "
                                        "not a submodule of the model"))
        return
    ref = HookedReference(model, config, **units)
    try:
        want = [_first_tensor(ref(s, 0, **kw)) for s, kw in enumerate(loop)]
    finally:
        ref.close()
    errs = [_rel(a, b) for a, b in zip(runs[0], want)]
    checks.append(Check(name, _verdict(max(errs) <= tolerance),
                        f"largest relative error {max(errs):.1e} over {steps} steps"))


def _compile(model, config, block_lists, timestep_input):
    import fxcache

    backend = fxcache.cache_backend(config, lowering="eager", strict=True, block_lists=block_lists,
                                    timestep_input=timestep_input)
    return torch.compile(model, backend=backend, dynamic=False), backend


def _explain_quietly(model, inputs, block_lists, timestep_input):
    import contextlib
    import io

    import fxcache

    with contextlib.redirect_stdout(io.StringIO()):
        return fxcache.explain(model, block_lists=block_lists, timestep_input=timestep_input, **inputs)
