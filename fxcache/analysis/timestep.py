"""Find the timestep input by data flow: the user placeholder that feeds a diffusers `Timesteps` module, or, in
any other code, the one whose values reach a sinusoidal embedding (both a sine and a cosine)."""

from __future__ import annotations

import torch
from torch import fx

from .module_stack import is_param_placeholder, stack_entries

#: forward parameter names that say "time" / "guidance", used only to choose between several sinusoidal inputs
_TIME_WORDS = ("timestep", "time", "sigma", "noise_level")
_GUIDANCE_WORDS = ("guidance", "cfg", "scale")


def is_time_name(name: str) -> bool:
    """A parameter name that says time (`timestep`, `t`, `sigma`, ...) and not guidance."""
    low = name.lower()
    return (any(w in low for w in _TIME_WORDS) or low in ("t", "ts")) and not any(w in low for w in _GUIDANCE_WORDS)


def find_timestep(gm: fx.GraphModule, paths: dict[int, str] | None = None,
                  batch: int | None = None) -> tuple[int, fx.Node, str] | None:
    """(placeholder index, node, how it was found) of the timestep input, or None.

    First a diffusers `Timesteps` module's input; else the per-sample scalar input (shape (), (1,) or (B,)) whose
    values reach both a sine and a cosine that a linear layer reads: a sinusoidal embedding, however written (the
    original DiT code's `TimestepEmbedder`, BFL's `timestep_embedding`). With several (a guidance scale embedded
    the same way, as FLUX-dev does): the one whose forward parameter names time; else, those named for guidance
    left out, the only one left; else None (the caller asks for `timestep_input=`: a guess could freeze the
    steps). `paths`: placeholder index -> forward argument name (`input_paths`); `batch`: the blocks' batch size
    (an (N,) input of another length, such as token positions, is not per-sample)."""
    found = find_timestep_input(gm)
    if found is not None:
        return found[0], found[1], "it feeds a diffusers `Timesteps` module"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = _sinusoidal(gm, batch)
    if not candidates:
        return None

    def name(x):
        return (paths or {}).get(placeholders.index(x), x.name)

    named = [x for x in candidates if any(w in name(x).lower() for w in _TIME_WORDS) or name(x) in ("t", "ts")]
    unguided = [x for x in candidates if not any(w in name(x).lower() for w in _GUIDANCE_WORDS)]
    chosen = named if len(named) == 1 else unguided if len(unguided) == 1 else candidates
    if len(chosen) != 1:
        return None
    x = chosen[0]
    others = [name(c) for c in candidates if c is not x]
    how = "its values reach a sinusoidal embedding (sin and cos)"
    if others:
        how += f"; also embedded so: {', '.join(others)} (not taken: their names)"
    return placeholders.index(x), x, how


def sinusoidal_inputs(gm: fx.GraphModule, paths: dict[int, str] | None = None,
                      batch: int | None = None) -> list[str]:
    """The names of the per-sample inputs whose values reach a sinusoidal embedding (for an error that lists
    them)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [(paths or {}).get(placeholders.index(x), x.name) for x in _sinusoidal(gm, batch)]


def _sinusoidal(gm: fx.GraphModule, batch: int | None) -> list[fx.Node]:
    """The per-sample user inputs whose values reach both a sine and a cosine that a linear layer reads."""
    reaches: dict[fx.Node, set[str]] = {}
    for n in gm.graph.nodes:
        wave = _wave(n)
        if wave is not None and _feeds_linear(n):
            for x in _upstream_inputs(n):
                reaches.setdefault(x, set()).add(wave)
    return [x for x in gm.graph.nodes if x.op == "placeholder" and reaches.get(x) == {"sin", "cos"}
            and _per_sample_scalar(x, batch)]


def _wave(n: fx.Node) -> str | None:
    if n.op == "call_function" and n.target in (torch.sin, torch.cos):
        return n.target.__name__
    if n.op == "call_method" and n.target in ("sin", "cos"):
        return n.target
    return None


#: ops a sinusoidal embedding passes through between its sin / cos and the embedder's first linear layer
_PLUMBING = {"cat", "concat", "stack", "to", "float", "half", "bfloat16", "type", "flip", "getitem", "view",
             "reshape", "contiguous", "unsqueeze", "squeeze", "flatten", "type_as", "chunk", "split", "mul"}


def _name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _feeds_linear(n: fx.Node, depth: int = 8) -> bool:
    """Whether a sine / cosine flows into a linear layer through concatenation and casts only: an embedding of
    the value (an embedder's MLP), not a rotary position code (which multiplies queries and keys)."""
    todo, seen = [(n, 0)], set()
    while todo:
        x, d = todo.pop()
        for u in x.users:
            if u in seen:
                continue
            seen.add(u)
            name = _name(u)
            if name == "linear" or (u.op == "call_module" and "linear" in name.lower()):
                return True
            if d + 1 < depth and name in _PLUMBING:
                todo.append((u, d + 1))
    return False


def _upstream_inputs(n: fx.Node) -> set[fx.Node]:
    todo, seen, out = [n], set(), set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder":
            if not is_param_placeholder(x):
                out.add(x)
            continue
        todo.extend(x.all_input_nodes)
    return out


def _per_sample_scalar(x: fx.Node, batch: int | None) -> bool:
    """A 0-d input, or (N,) with N the batch (or 1): one value per sample, as a timestep is."""
    v = x.meta.get("example_value")
    if not isinstance(v, torch.Tensor) or v.dim() > 1:
        return False
    return v.dim() == 0 or batch is None or v.shape[0] in (1, batch)


def not_a_timestep(spec, name: str, value, scalars: list[tuple[str, tuple]], found: str | None = None,
                   batch: int | None = None) -> str:
    """The error for a `timestep_input=` (`spec`) that names `name`, whose `value` is not a per-sample scalar:
    what it is, what a timestep is, the per-sample scalar inputs (name, shape) there are, and the one fxcache
    finds itself (`found`), if any."""
    if isinstance(value, torch.Tensor):
        what = f"a {value.dim()}-D tensor of shape {tuple(value.shape)}"
        if value.dim() == 1 and batch is not None:
            what += f", not one value per sample (batch {batch})"
    else:
        what = f"a {type(value).__name__}"
    message = (f"timestep_input={spec!r} names `{name}`, {what}; the timestep is a per-sample scalar (shape (B,) or "
               f"()), whose value each call's step is read from")
    if scalars:
        message += "; the per-sample scalar inputs: " + ", ".join(f"`{n}` {s}" for n, s in scalars)
    else:
        message += "; no input is a per-sample scalar: pass the timestep as a tensor of shape (B,)"
    if found is not None:
        message += f"; fxcache finds `{found}` itself: leave timestep_input unset"
    return message


def check_named_timestep(gm: fx.GraphModule, index: int, spec, paths: dict[int, str],
                         batch: int | None) -> None:
    """Raise UnsupportedGraphError when the input that `timestep_input=spec` names (placeholder `index`) is not a
    per-sample scalar (a 0-d or (B,) tensor, or a number) and feeds no diffusers `Timesteps` module (whose input
    may hold a value per token, as Wan 2.2's image-to-video does): read as t, the latents or a text embedding
    would step the loop at random."""
    from ..errors import UnsupportedGraphError

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    node = placeholders[index]
    value = node.meta.get("example_value")
    if _per_sample_scalar(node, batch) or isinstance(value, (int, float)):
        return
    fed = find_timestep_input(gm)
    if fed is not None and fed[0] == index:
        return
    scalars = [(paths[i], tuple(p.meta["example_value"].shape)) for i, p in enumerate(placeholders)
               if i in paths and _per_sample_scalar(p, batch)]
    found = find_timestep(gm, paths, batch)
    raise UnsupportedGraphError(not_a_timestep(spec, paths.get(index, node.name), value, scalars,
                                               paths.get(found[0]) if found is not None else None, batch))


def find_timestep_input(gm: fx.GraphModule) -> tuple[int, fx.Node] | None:
    """(placeholder index, node) of the input of a diffusers `Timesteps` module, or None when there is none."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if not any(cls.__name__ == "Timesteps" for _, cls in stack_entries(n)):
            continue
        todo, seen = [n], set()
        while todo:
            x = todo.pop()
            if x in seen:
                continue
            seen.add(x)
            if x.op == "placeholder" and not is_param_placeholder(x):
                return placeholders.index(x), x
            todo.extend(x.all_input_nodes)
    return None


def resolve_timestep_input(gm: fx.GraphModule, spec: int | str,
                           forward_params: list[str] | None = None) -> tuple[int, fx.Node] | None:
    """An explicit timestep input: the forward's parameter `spec` (its name, a dotted path into a dict argument,
    or its index among the forward's parameters)."""
    from .inputs import input_paths

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    paths = input_paths(gm, forward_params)
    if isinstance(spec, int):
        if not forward_params or spec >= len(forward_params):
            return None
        spec = forward_params[spec]
    for i, path in paths.items():
        if path == spec:
            return i, placeholders[i]
    for i, path in paths.items():
        if path.split(".", 1)[0] == spec:
            return i, placeholders[i]
    return None
