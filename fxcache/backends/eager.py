"""lowering="eager": the rewritten graph run as Python, the bit-exact reference (debugging and tests)."""

from __future__ import annotations

from typing import Callable

from torch import fx


def lower(gm: fx.GraphModule, example_inputs, *, mode=None, options=None) -> Callable:
    return gm.forward
