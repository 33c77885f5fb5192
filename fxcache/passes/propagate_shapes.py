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


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What a call's FLOPs can depend on besides tensor values: every tensor argument's shape, dtype and device,
    every other argument's value (None, bool, int, float, str; lists, tuples and dicts element by element) and,
    for anything else, the object itself (by identity: two calls are merged only when nothing can tell them
    apart)."""

    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, str(v.device))
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(sig(x) for x in v))
        if isinstance(v, dict):
            return ("dict", tuple((k, sig(x)) for k, x in v.items()))
        if v is None or isinstance(v, (bool, int, float, str)):
            return (type(v).__name__, v)
        return ("object", id(v))

    return tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


class CallFlops:
    """FLOPs of every call of some modules, counted once per distinct call signature (`call_signature`).

    `watch(callee, module)` puts a forward pre-hook on `callee` (what the caller calls: `module` itself or its
    `torch.compile` wrapper). Each call is tallied under the current `key` and its signature; the first call of a
    signature is also run once more on `module`, eagerly, under torch's FLOP counter (`eager_flops`: CPU attention
    counted). `flops(key)` is the sum over the signatures seen under `key` of calls x FLOPs per call; `passes` is
    the number of counted runs. Exact when a call's FLOPs follow from its signature, as for a transformer without
    data-dependent control flow; a generation of S steps is then counted in one call per distinct shape (CFG
    batched or not, each transformer of a pipeline) instead of S or 2 S. Remove the hooks with `close()`.
    """

    def __init__(self):
        self.key = None
        self.calls: dict = {}  # key -> {(module index, signature): calls}
        self.per_call: dict = {}  # (module index, signature) -> FLOPs of one call
        self.passes = 0
        self._hooks = []
        self._modules: list[torch.nn.Module] = []

    def watch(self, callee: torch.nn.Module, module: torch.nn.Module | None = None) -> None:
        module = callee if module is None else module
        index = len(self._modules)
        self._modules.append(module)
        busy = [False]  # `callee is module`: the counted run must not count itself

        def hook(_, args, kwargs):
            if busy[0]:
                return
            sig = (index, call_signature(args, kwargs))
            tally = self.calls.setdefault(self.key, {})
            tally[sig] = tally.get(sig, 0) + 1
            if sig not in self.per_call:
                busy[0] = True
                try:
                    self.per_call[sig] = eager_flops(lambda: module(*args, **kwargs))
                finally:
                    busy[0] = False
                self.passes += 1

        self._hooks.append(callee.register_forward_pre_hook(hook, with_kwargs=True))

    def flops(self, key=None) -> int:
        return sum(n * self.per_call[sig] for sig, n in self.calls.get(key, {}).items())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


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
