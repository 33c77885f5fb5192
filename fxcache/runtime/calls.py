"""Which model call a piece of a graph-broken forward belongs to, and that call's step.

When Dynamo splits a forward into several graphs (an `.item()`, data-dependent control flow, an op it cannot
trace), the pieces that hold blocks often do not see the timestep: it was embedded in an earlier piece, or in
Python code Dynamo left eager (a graph break inside the block loop leaves the whole forward eager and compiles each
block's forward on its own). Such a piece finds its model call on the Python stack: the innermost
`nn.Module.__call__` around it whose forward takes a timestep (a parameter named for time, or `timestep_input=`)
holding a per-sample scalar tensor. The call's original arguments are there, untouched by the forward. Every piece
of one call shares one position (step, CFG branch): the first piece to run locates it with the step rule, the
others read it. Nothing here is traced by Dynamo.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

import torch

from ..analysis.inputs import latent_name
from ..analysis.pieces import module_block_lists, module_calls
from ..analysis.timestep import is_time_name, not_a_timestep
from .step import StepTracker, TimeDirection

#: the usual names of a forward's timestep parameter, first match taken (`timestep` beside `timestep_r`)
_TIME_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")


@dataclasses.dataclass
class ModelCall:
    """One call of a model, as its `__call__` frame shows it."""

    model: torch.nn.Module
    timestep: torch.Tensor
    conditioning: list  # the call's other tensor arguments, but the latents
    latents: torch.Tensor | None
    marker: tuple  # (args, kwargs) objects of this call: identity tells one call from the next


def _per_sample_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and (value.dim() == 0 or value.dim() == 1) and value.numel() >= 1 \
        and not value.is_complex()


def _signature(module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


def timestep_parameter(module, timestep_input=None) -> str | None:
    """The name of `module.forward`'s timestep parameter: `timestep_input` (a name, or an index counted among the
    parameters), else the one parameter named for time (timestep, t, sigma, noise_level, ...), else None."""
    sig = _signature(module)
    if sig is None:
        return None
    names = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if isinstance(timestep_input, int):
        return names[timestep_input] if timestep_input < len(names) else None
    if isinstance(timestep_input, str):
        head = timestep_input.split(".", 1)[0]
        return head if head in names else None
    exact = [n for n in _TIME_NAMES if n in names]
    if exact:
        return exact[0]
    timed = [n for n in names if is_time_name(n)]
    return timed[0] if len(timed) == 1 else None


def _bind(module, args, kwargs, name: str) -> ModelCall | None:
    sig = _signature(module)
    if sig is None:
        return None
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    values = bound.arguments
    t = values.get(name)
    if not _per_sample_scalar(t):
        return None
    latent = latent_name([n for n in values if n != name], list(sig.parameters))
    conditioning = [v for n, v in values.items()
                    if n not in (name, latent) and isinstance(v, torch.Tensor) and not v.is_complex()]
    return ModelCall(module, t, conditioning, values.get(latent), (args, kwargs))


def misnamed_timestep(timestep_input) -> str | None:
    """Why no model call around a piece gives its step, when `timestep_input` is the reason: the error saying that
    it names, in a model call on the stack (a module with block lists), a parameter whose value is not a
    per-sample scalar; None otherwise."""
    if timestep_input is None:
        return None
    for module, locs in module_calls(sys._getframe(1)):
        name, sig = timestep_parameter(module, timestep_input), _signature(module)
        if name is None or sig is None or not module_block_lists(module):
            continue
        try:
            values = sig.bind_partial(*locs.get("args", ()), **locs.get("kwargs", {})).arguments
        except TypeError:
            continue
        value = values.get(name)
        if value is None or _per_sample_scalar(value) or isinstance(value, (int, float)):
            continue
        scalars = [(n, tuple(v.shape)) for n, v in values.items() if _per_sample_scalar(v)]
        own = timestep_parameter(module)
        return not_a_timestep(timestep_input, name, value, scalars,
                              own if own is not None and _per_sample_scalar(values.get(own)) else None)
    return None


def find_model_call(accepts, timestep_input=None, model=None) -> ModelCall | None:
    """The `__call__` frame on the stack of the model around a piece: once known, `model`'s; else the innermost
    frame whose module `accepts(module)` and whose forward takes a per-sample scalar timestep, or an outer such
    frame whose module holds more block lists (a model whose blocks sit in stages that take the timestep too)."""
    found, lists = None, 0
    for module, locs in module_calls(sys._getframe(1)):
        if module is model if model is not None else accepts(module):
            name = timestep_parameter(module, timestep_input)
            call = _bind(module, locs.get("args", ()), locs.get("kwargs", {}), name) if name else None
            if model is not None:
                return call
            if call is not None:
                held = len(module_block_lists(module))
                if found is None or held > lists:
                    found, lists = call, held
    return found


class CallKeeper:
    """The key under which a request keeps each model's `CallState` (requests key their states by an object with
    a `scope`)."""

    def __init__(self, scope):
        self.scope = scope


class CallState:
    """Per (request, model): the step rule over the model's calls, and the position of its latest call."""

    def __init__(self, scope, continue_unmatched: bool):
        self.tracker = StepTracker(TimeDirection.of(scope.time_direction), scope.max_branches,
                                   continue_unmatched=continue_unmatched)
        self.marker: tuple | None = None
        self.position = None
        self.t = float("nan")
        self.seq = 0  # calls located so far: a piece runs each call's dropped / new branch once
        self.model_ref = None  # (a request's states are looked through for a model's graph states: not one)

    def same_call(self, marker: tuple) -> bool:
        return self.marker is not None and self.marker[0] is marker[0] and self.marker[1] is marker[1]

    def release(self) -> None:
        self.tracker.reset()
        self.marker = self.position = None

    def cache_bytes(self) -> int:
        return 0
