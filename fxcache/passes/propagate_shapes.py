"""Re-run a variant on fake tensors: refreshes `example_value`, validates shapes, counts FLOPs."""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


def ensure_cpu_attention_flops() -> None:
    """Give torch's FLOP counter a formula for CPU attention, which it lacks (it would count attention as 0).

    Counted like torch counts the CUDA SDPA kernels: Q @ K^T plus P @ V. Registered once, only if missing.
    """
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, s_q, d_q = query_shape
        s_k, d_v = key_shape[-2], value_shape[-1]
        return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


class _NoModuleTracking:
    """Stands in for FlopCounterMode's module tracker, which registers *global* module forward hooks while it
    counts: another thread's Dynamo then sees hooks on every module (guards fail, a shape it already compiled is
    traced again, and tracing can fail with "already tracked for mutation"). fxcache counts totals only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts the total only and installs no global module hooks (thread-safe to use while
    other threads run or compile models)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


def eager_flops(fn) -> int:
    """FLOPs of running `fn()` as it is (no grad), counted by torch.utils.flop_counter with CPU attention included:
    the uncached or hooked models the caches are compared with."""
    ensure_cpu_attention_flops()
    with torch.no_grad(), flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


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
    ensure_cpu_attention_flops()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [
            torch.empty(x[0], dtype=x[1], device=x[2]) if isinstance(x, tuple) else mode.from_tensor(x)
            for x in inputs
        ]
        with flop_counter() as counter:
            _Prop(gm).run(*fakes)
    return int(counter.get_total_flops())


def example_spec(value) -> tuple:
    """(shape, dtype, device) of a (fake) tensor, to rebuild it in another fake mode."""
    return (tuple(value.shape), value.dtype, value.device)
