"""Graph-equivalence checks of a user's own transformer, for their CI: what the analysis finds, graph breaks, the
FULL step and an every-step-FULL loop against the uncached model, each method's compiled variants against the
hooked eager reference, and no recompile over two generations. A diffusers upgrade that changes what fxcache
sees fails here, with one line per check saying why."""

from __future__ import annotations

import dataclasses

import torch

from ..analysis import DEFAULT_BLOCK_LISTS
from ..analysis.units import ATTN
from ..config import make_config

#: methods whose maths the hooked reference writes out (ToCa's and ClusCa's have their own references)
REFERENCE_METHODS = ("fora", "duca", "taylorseer")


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


@dataclasses.dataclass
class CheckReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def __str__(self) -> str:
        return "\n".join(map(str, self.checks))


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
                tolerance: float = 1e-4) -> CheckReport:
    """Check that fxcache caches `model` as the maths says, on `example_inputs` (the forward's keyword arguments).

    Returns a `CheckReport` (`.ok`, one `Check` per line); `assert report.ok, report` in a pytest test. `methods`:
    names (or configs) run in a `steps`-call loop whose timestep falls; those in REFERENCE_METHODS are also
    compared with the hooked eager reference. `tolerance`: relative L2 error allowed against the uncached model and
    the reference (float32 reductions in another order)."""
    model = model.eval()
    checks: list[Check] = []
    missing = _missing_arguments(model, example_inputs)
    if missing:
        return CheckReport([Check("analysis", False, f"example_inputs lack the forward's required argument(s) "
                                                     f"{', '.join(missing)}")])
    with torch.no_grad():
        try:
            explained = _explain_quietly(model, example_inputs, block_lists, timestep_input)
        except Exception as exc:  # Dynamo could not trace it at all
            absent = _missing_arguments(model, example_inputs, required=False)
            hint = f" (example_inputs lack the forward's argument(s) {', '.join(absent)})" if absent else ""
            return CheckReport([Check("analysis", False, f"Dynamo could not trace the model: {exc}{hint}")])
        plans = [p for p in explained.plans if p is not None]
        if not plans:
            reasons = "; ".join(e for e in explained.errors if e) or "no graph"
            return CheckReport([Check("analysis", False, f"no graph can be cached: {reasons}")])
        plan = plans[0]
        checks.append(Check("analysis", True, plan.summary().splitlines()[0]))
        breaks = explained.graph_break_count
        checks.append(Check("graph breaks", breaks == 0, f"{explained.graph_count} graph(s), {breaks} break(s)"
                            + (": " + "; ".join(explained.break_reasons[:3]) if breaks else "")))
        if plan.timestep_index is not None:
            key = plan.input_paths.get(plan.timestep_index, "")
        else:  # a piece of a graph-broken forward: stepped by the forward's timestep argument
            from ..runtime.calls import timestep_parameter

            key = timestep_parameter(model, timestep_input) or ""
        if key not in example_inputs:
            checks.append(Check("timestep", False, f"the timestep input `{key}` is not a top-level keyword of "
                                                   "example_inputs; pass the forward's arguments by name"))
            return CheckReport(checks)
        loop = _loop(example_inputs, key, steps)
        uncached = [_first_tensor(model(**kw)) for kw in loop]
        names = {u.name for u in plan.units}
        attention = [u.name for u in plan.units if u.kind == ATTN]
        token_wise = [u.name for u in plan.units if u.kind != ATTN and not any(
            u.name.startswith(o + ".") for o in names if o != u.name)]
        for method in methods:
            config = method if not isinstance(method, str) else make_config(method)
            try:
                _check_method(checks, model, config, loop, uncached, plan, attention, token_wise, block_lists,
                              timestep_input, steps, tolerance)
            except Exception as exc:  # strict mode: a graph fxcache cannot cache, or a failing variant
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                checks.append(Check(f"{config.method}: cached run", False, first))
            finally:
                torch._dynamo.reset()
    return CheckReport(checks)


def _check_method(checks, model, config, loop, uncached, plan, attention, token_wise, block_lists, timestep_input,
                  steps, tolerance) -> None:
    """The checks of one method: FULL and an every-step-FULL loop against the uncached model, two generations
    without a recompile, and (REFERENCE_METHODS) the loop against the hooked reference."""
    import fxcache
    from .reference import HookedReference

    label = config.method
    compiled, _ = _compile(model, config, block_lists, timestep_input)
    first = _first_tensor(compiled(**loop[0]))
    err = _rel(first, uncached[0])
    checks.append(Check(f"{label}: FULL equals uncached", err <= tolerance, f"relative error {err:.1e}"))
    torch._dynamo.reset()
    every, _ = _compile(model, dataclasses.replace(config, interval=1), block_lists, timestep_input)
    with fxcache.request(every):
        errs = [_rel(_first_tensor(every(**kw)), u) for kw, u in zip(loop, uncached)]
    checks.append(Check(f"{label}: interval=1 equals uncached over {steps} steps", max(errs) <= tolerance,
                        f"largest relative error {max(errs):.1e}"))
    torch._dynamo.reset()
    compiled, backend = _compile(model, config, block_lists, timestep_input)
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
    checks.append(Check(f"{label}: caching active", bool(cached) and moved > 1e-7,
                        f"steps {' '.join(kinds)}; " + (f"cached steps differ from uncached by up to {moved:.1e}"
                                                        if cached else "no cached step ran (all FULL)")
                        + ("" if not cached or moved > 1e-7 else ": they equal it, nothing was reused")))
    checks.append(Check(f"{label}: two generations, no recompile", graphs[0] == graphs[1] and same,
                        f"{graphs[0]} compiled graph(s), {graphs[1] - graphs[0]} more in the second generation; "
                        "second generation " + ("equals the first" if same else "differs from the first")))
    if label in REFERENCE_METHODS:
        ref = HookedReference(model, config, attention=attention, token_wise=token_wise,
                              last_block=plan.blocks[-1].name)
        try:
            want = [_first_tensor(ref(s, 0, **kw)) for s, kw in enumerate(loop)]
        finally:
            ref.close()
        errs = [_rel(a, b) for a, b in zip(runs[0], want)]
        checks.append(Check(f"{label}: variants equal the hooked reference", max(errs) <= tolerance,
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
