"""Which forward argument each graph input is, from Dynamo's placeholder sources.

Dynamo names where a placeholder came from: `L['timestep']`, `L['kwargs']['timestep']` (a forward wrapped with
`*args, **kwargs`, as peft's `apply_lora_scale` does), `L['args'][0]`, `L['added_cond_kwargs']['resolution']`, or
`L['self']...` for module state. This turns them into the forward's argument paths: "timestep",
"hidden_states", "added_cond_kwargs.resolution".
"""

from __future__ import annotations

import inspect

from torch import fx

#: user inputs that change at every step of one sampling loop: not part of a call's conditioning fingerprint
LATENT_NAMES = ("hidden_states", "latents", "latent_model_input", "sample", "x")
PER_STEP_MARKERS = ("controlnet",)


def forward_parameters(module) -> list[str] | None:
    """Names of `module.forward`'s parameters in order (through `functools.wraps` wrappers), or None."""
    forward = getattr(module, "forward", None)
    if forward is None:
        return None
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _chain(source) -> list:
    """Root first: the local name, then item keys / attribute names down to the placeholder."""
    parts = []
    while source is not None:
        for attr in ("local_name", "index", "member"):
            if hasattr(source, attr):
                parts.append(getattr(source, attr))
                break
        else:
            parts.append(None)
        source = getattr(source, "base", None)
    return parts[::-1]


def input_path(node: fx.Node, forward_params: list[str] | None = None) -> str | None:
    """The dotted forward-argument path of a placeholder, None for module state or an unknown source."""
    parts = _chain(getattr(node, "_dynamo_source", None))
    if not parts or parts[0] is None or parts[0] == "self":
        return None
    if parts[0] == "kwargs":
        parts = parts[1:]
    elif parts[0] == "args" and len(parts) > 1 and isinstance(parts[1], int):
        name = forward_params[parts[1]] if forward_params and parts[1] < len(forward_params) else f"args.{parts[1]}"
        parts = [name] + parts[2:]
    if not parts or any(p is None for p in parts):
        return None
    return ".".join(str(p) for p in parts)


def input_paths(gm: fx.GraphModule, forward_params: list[str] | None = None) -> dict[int, str]:
    """Placeholder index -> forward-argument path, for every placeholder that is a user input."""
    out = {}
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        path = input_path(n, forward_params)
        if path is not None:
            out[i] = path
    return out


def latent_name(names: list[str], forward_params=None) -> str | None:
    """Of a call's argument names, the latents': the first of the usual latent names, else the forward's first
    parameter."""
    for usual in LATENT_NAMES:
        if usual in names:
            return usual
    first = forward_params[0] if forward_params else (names[0] if names else None)
    return first if first in names else None


def is_per_step_input(path: str, forward_params: list[str] | None = None) -> bool:
    """Latents and per-step residuals (ControlNet): inputs a sampling loop changes at every call."""
    head = path.split(".", 1)[0]
    if head in LATENT_NAMES or (forward_params and head == forward_params[0]):
        return True
    return any(m in path for m in PER_STEP_MARKERS)
