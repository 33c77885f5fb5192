"""Re-run a variant on fake tensors: refreshes `example_value`, validates shapes, counts FLOPs."""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


class _Prop(fx.Interpreter):
    def run_node(self, n):
        result = super().run_node(n)
        if n.op not in ("output",):
            n.meta["example_value"] = result
        return result


def propagate_shapes(gm: fx.GraphModule, inputs: list) -> int:
    """Propagate fake tensors through `gm`; returns the FLOPs counted by torch.utils.flop_counter.

    `inputs` are tensors or (shape, dtype, device) triples; they are turned into fakes of a private mode.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [
            torch.empty(x[0], dtype=x[1], device=x[2]) if isinstance(x, tuple) else mode.from_tensor(x)
            for x in inputs
        ]
        with FlopCounterMode(display=False) as counter:
            _Prop(gm).run(*fakes)
    return int(counter.get_total_flops())


def example_spec(value) -> tuple:
    """(shape, dtype, device) of a (fake) tensor, to rebuild it in another fake mode."""
    return (tuple(value.shape), value.dtype, value.device)
