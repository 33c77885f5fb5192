"""lowering="inductor" (the default): torch.compile's own compiler, with the `mode=` and `options=` given to
torch.compile. Compiled outside any tracing context: the variant is lowered on first use, at run time."""

from __future__ import annotations

from typing import Callable

import torch
from torch import fx


def lower(gm: fx.GraphModule, example_inputs, *, mode=None, options=None) -> Callable:
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode) if mode else {})
    patches.update(options or {})
    with torch._guards.tracing(None):
        return compile_fx(gm, list(example_inputs), config_patches=patches)
