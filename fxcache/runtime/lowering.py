"""Lowerings: how a variant graph becomes a callable. A name -> factory registry, like the methods."""

from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import fx

from ..errors import ConfigError

Lowering = Callable[..., Callable]
_LOWERINGS: dict[str, Lowering] = {}


def register_lowering(name: str):
    def deco(fn: Lowering) -> Lowering:
        if name in _LOWERINGS:
            raise ConfigError(f"lowering {name!r} is already registered by {_LOWERINGS[name].__module__}")
        _LOWERINGS[name] = fn
        return fn

    return deco


def lowering_names() -> list[str]:
    return sorted(_LOWERINGS)


def get_lowering(name: str) -> Lowering:
    if not isinstance(name, str) or name not in _LOWERINGS:
        close = difflib.get_close_matches(str(name), _LOWERINGS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown lowering {name!r}{hint} Registered: {', '.join(lowering_names())}")
    return _LOWERINGS[name]


@register_lowering("eager")
def lower_eager(gm: fx.GraphModule, example_inputs, *, mode=None, options=None) -> Callable:
    """Run the rewritten graph as Python: the bit-exact reference, for debugging and tests."""
    return gm.forward


@register_lowering("inductor")
def lower_inductor(gm: fx.GraphModule, example_inputs, *, mode=None, options=None) -> Callable:
    """torch.compile's default compiler, with the `mode=` and `options=` given to torch.compile."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode) if mode else {})
    patches.update(options or {})
    with torch._guards.tracing(None):
        return compile_fx(gm, list(example_inputs), config_patches=patches)
