"""Split a block into cached units: token-mixing attention (A) and token-wise units (F, cross-attention).

A unit's cached value is its output *before* the gate multiply and the residual add: the outputs of a direct
child module of the block. Token-wise units also get a *region*: the nodes that recompute the unit from a few
inputs (the *stops*) row by row, so that a PARTIAL step can run the region on k gathered tokens.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..graph_io import Key
from .aliases import aliases, is_mutation
from .blocks import Block, walk
from .module_stack import child_of, is_param_placeholder

ATTN = "attn"  # token-mixing attention (self / joint): reused whole from the cache on cached steps
XATTN = "xattn"  # cross-attention: token-wise in the query tokens
MLP = "mlp"  # feed-forward / fused projection: token-wise


@dataclasses.dataclass
class Unit:
    """A cached child of a block.

    Attributes:
        name: module path, e.g. "transformer_blocks.0.ff".
        cls: module class name.
        kind: "attn", "xattn" or "mlp".
        outputs: nodes whose values are cached (before gate and residual).
        tokens: number of tokens of the (single) output of a token-wise unit, else None.
        region: token-wise units only: nodes that recompute `outputs[0]` row by row, in graph order.
        gather: region inputs with the token layout (B, tokens, ...): gathered to k rows on PARTIAL steps.
        passthrough: region inputs without a token dimension (modulation, text states, weights).
        partial: whether the unit can be recomputed on a subset of tokens; `why_not` says why not.
    """

    name: str
    cls: str
    kind: str
    outputs: list[fx.Node]
    tokens: int | None = None
    region: list[fx.Node] = dataclasses.field(default_factory=list)
    gather: list[fx.Node] = dataclasses.field(default_factory=list)
    passthrough: list[fx.Node] = dataclasses.field(default_factory=list)
    partial: bool = False
    why_not: str = ""
    block: int = -1  # index of its block in the plan's blocks

    @property
    def cache_keys(self) -> list:
        """The typed cache key of each output, in order."""
        return [Key.unit_output(self.name, i) for i in range(len(self.outputs))]

    @property
    def token_wise(self) -> bool:
        return self.kind in (XATTN, MLP)


def _val(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def _shape(n) -> tuple[int, ...] | None:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _is_attention(cls: str) -> bool:
    return "Attention" in cls or cls.endswith("Attn")


def _is_norm(cls: str) -> bool:
    return "Norm" in cls


_POINTWISE_FUNCS = {
    operator.add, operator.mul, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.mul, torch.sub, torch.div, torch.neg, torch.tanh, torch.sigmoid, torch.erf, torch.exp,
    torch.sqrt, torch.rsqrt, torch.pow, torch.clamp, torch.where,
    F.gelu, F.silu, F.relu, F.mish, F.sigmoid, F.tanh, F.dropout, F.softplus, F.leaky_relu, F.hardswish,
    torch.nn.functional.gelu,
}
_POINTWISE_METHODS = {
    "add", "mul", "sub", "div", "neg", "pow", "float", "half", "bfloat16", "to", "type_as", "contiguous",
    "sigmoid", "tanh", "clamp", "exp", "sqrt", "rsqrt", "__add__", "__mul__", "__sub__", "__truediv__",
}
_LINEAR = {F.linear, torch._C._nn.linear}
_LASTDIM_NORMS = {F.layer_norm, F.rms_norm, torch.layer_norm, torch.rms_norm}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_SPLITS_F = {torch.chunk, torch.split, torch.tensor_split}
_SPLITS_M = {"chunk", "split", "tensor_split"}


def _tensor_operands(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if isinstance(_val(a), torch.Tensor)]


def _dim_arg(n: fx.Node, pos: int, default: int) -> int:
    if "dim" in n.kwargs:
        return n.kwargs["dim"]
    return n.args[pos] if len(n.args) > pos else default


def _token_layout(shape, batch: int, tokens: int) -> bool:
    return shape is not None and len(shape) >= 2 and shape[0] in (batch, 1) and shape[1] == tokens


def _broadcasts_over_tokens(shape, out_rank: int) -> bool:
    """True when an operand of this shape has no token dimension once right-aligned to a (B, L, ...) output."""
    pos = 1 - (out_rank - len(shape))
    return pos < 0 or shape[pos] == 1


def rowwise(n: fx.Node, batch: int, tokens: int) -> bool:
    """Whether output row j of node `n` depends only on row j of its (B, tokens, ...) inputs."""
    if n.op not in ("call_function", "call_method"):
        return False
    target = n.target
    if target is operator.getitem:
        src = n.args[0]
        return isinstance(_val(src), (tuple, list)) and isinstance(n.args[1], int) and rowwise(src, batch, tokens)
    if target in _SPLITS_F or target in _SPLITS_M:
        shape = _shape(n.args[0])
        if not _token_layout(shape, batch, tokens) or len(shape) < 3:
            return False
        dim = _dim_arg(n, 2, 0)
        return dim % len(shape) == len(shape) - 1
    out = _shape(n)
    if not _token_layout(out, batch, tokens) or len(out) < 3:
        return False
    if target in _CATS:
        return _dim_arg(n, 1, 0) % len(out) == len(out) - 1 and all(
            _token_layout(_shape(a), batch, tokens) and len(_shape(a)) == len(out) for a in n.args[0]
        )
    if target in _LINEAR:
        x = n.args[0]
        others = _tensor_operands(n)[1:]
        return _token_layout(_shape(x), batch, tokens) and all(len(_shape(w)) <= 2 and x not in (w,) for w in others) \
            and all(is_param_placeholder(w) or _broadcasts_over_tokens(_shape(w), len(out)) for w in others)
    if target in _LASTDIM_NORMS:
        normalized = n.args[1] if len(n.args) > 1 else n.kwargs.get("normalized_shape")
        if not isinstance(normalized, (tuple, list)) or len(normalized) != 1:
            return False
    elif not (target in _POINTWISE_FUNCS or (n.op == "call_method" and target in _POINTWISE_METHODS)):
        return False
    for a in _tensor_operands(n):
        s = _shape(a)
        if _token_layout(s, batch, tokens) and len(s) == len(out):
            continue
        if is_param_placeholder(a) and _broadcasts_over_tokens(s, len(out)):
            continue
        if not _broadcasts_over_tokens(s, len(out)):
            return False
    return True


def _classify_stops(region: list[fx.Node], batch: int, tokens: int, must_gather=None):
    members = set(region)
    gather, passthrough = [], []
    for n in region:
        for a in n.all_input_nodes:
            if a in members or a in gather or a in passthrough:
                continue
            s = _shape(a)
            wants = _token_layout(s, batch, tokens) and not is_param_placeholder(a)
            if must_gather is not None:
                wants = a in must_gather
            (gather if wants else passthrough).append(a)
    return gather, passthrough


def _children(block: Block) -> dict[str, dict]:
    subs: dict[str, dict] = {}
    for n in block.nodes:
        c = child_of(n, block.name)
        if c is not None:
            subs.setdefault(c[0], {"cls": c[1], "nodes": []})["nodes"].append(n)
    for d in subs.values():
        members = set(d["nodes"])
        d["set"] = members
        d["outputs"] = [n for n in d["nodes"] if any(u not in members for u in n.users)]
    return subs


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (
        n.op == "call_method" and n.target in ("add", "add_", "__add__", "__iadd__"))


def _descendants(outs, members: set) -> set:
    return set(walk(outs, lambda x: (u for u in x.users if u in members)))


def _is_residual_branch(outs, block: Block, child_sets: list[set], through: set | None = None) -> bool:
    """Forward from `outs` through block-level nodes only (no other child) to a block output, passing a residual
    add: an add with an operand that does not depend on `outs` (the stream the branch is added to).

    Rejects children that feed the stream otherwise: modulation layers (gates, shifts) and projections whose
    output *replaces* the stream (long-skip merges), which a cache would freeze. `through`: nodes of norm children
    the walk may pass (a norm that applies the gate, as Mochi's `norm4(ff_out, tanh(gate))`); an add inside them
    (a norm's shift) is no residual add.
    """
    through = through or set()
    block_outputs, members = set(block.outputs), block.node_set
    downstream = _descendants(outs, members)
    todo, seen, reaches, residual = list(outs), set(), False, False
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x in block_outputs:
            reaches = True
        if _is_add(x) and x not in through and any(a not in downstream for a in x.all_input_nodes):
            residual = True
        for u in x.users:
            if u not in members or any(u in s for s in child_sets):
                continue
            todo.append(u)
    return reaches and residual


def _upstream_externals(start: fx.Node, members: set) -> set:
    todo, seen, ext = [start], set(), set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        for a in x.all_input_nodes:
            if a in members:
                todo.append(a)
            elif not is_param_placeholder(a):
                ext.add(a)
    return ext


_SDPA_NAMES = ("scaled_dot_product_attention",)


def _is_sdpa(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "__name__", "") in _SDPA_NAMES


def _sdpa_arg(n: fx.Node, pos: int, name: str):
    return n.kwargs.get(name, n.args[pos] if len(n.args) > pos else None)


def _cross_attention_inputs(child: dict) -> set | None:
    """Query-side inputs of a cross-attention child; None when it mixes tokens (self/joint attention)."""
    sdpas = [n for n in child["nodes"] if _is_sdpa(n)]
    if not sdpas:
        return None
    q_side: set = set()
    for s in sdpas:
        q, k, v = _sdpa_arg(s, 0, "query"), _sdpa_arg(s, 1, "key"), _sdpa_arg(s, 2, "value")
        if not all(isinstance(x, fx.Node) for x in (q, k, v)):
            return None
        qe = _upstream_externals(q, child["set"])
        kve = _upstream_externals(k, child["set"]) | _upstream_externals(v, child["set"])
        if qe & kve or not qe:
            return None
        q_side |= qe
    return q_side


def _f_region(out: fx.Node, block: Block, batch: int, tokens: int, excluded: set) -> list[fx.Node]:
    """Backward slice of row-wise nodes from `out`, inside the block, not entering attention or norm children."""
    members, region, todo = block.node_set, set(), [out]
    while todo:
        x = todo.pop()
        if x in region or x not in members or x in excluded or not rowwise(x, batch, tokens):
            continue
        region.add(x)
        todo.extend(x.all_input_nodes)
    return [n for n in block.nodes if n in region]


# ops whose output passes an input's values on (possibly scaled, shifted or viewed): a child whose output reaches
# one of its inputs through these alone carries that input (a residual add inside the child)
_CARRY_FUNCS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    operator.itruediv, operator.neg, operator.getitem, torch.add, torch.sub, torch.mul, torch.div, torch.neg,
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk,
    torch.split, torch.unbind, torch.clone,
}
_CARRY_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "__add__", "__radd__", "__iadd__", "__sub__",
    "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__itruediv__", "__getitem__", "to", "type",
    "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone", "view", "view_as", "reshape",
    "reshape_as", "flatten", "unflatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk", "split",
    "unbind", "expand", "expand_as",
}


def _carries(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _CARRY_FUNCS) or (
        n.op == "call_method" and n.target in _CARRY_METHODS)


def _carried_input(outs: list[fx.Node], members: set) -> fx.Node | None:
    """An input of the child that its output passes on through adds, scalings and views alone (`x + attn(x)`):
    the output carries the residual stream, so a cache of it would freeze the stream. None when there is none."""
    for x in walk(outs, lambda x: x.all_input_nodes if x in members and _carries(x) else ()):
        if x not in members and not is_param_placeholder(x) and isinstance(_val(x), torch.Tensor) \
                and _val(x).dim() >= 2:
            return x
    return None


def _mutated_elsewhere(outs: list[fx.Node], members: set) -> fx.Node | None:
    """A node outside the child that writes into one of its outputs (or a view of one): `attn_out.mul_(gate)`.
    A cache of such an output would hold the written value, and the write would run again on the cache."""
    for o in outs:
        for a in aliases(o):
            if a not in members and is_mutation(a):
                return a
    return None


def _refusal(outs: list[fx.Node], members: set) -> str:
    carried = _carried_input(outs, members)
    if carried is not None:
        return f"its output passes its input `{carried.name}` on (a residual add inside the module)"
    written = _mutated_elsewhere(outs, members)
    if written is not None:
        return f"its output is changed in place after the module (`{written.name}`: {written.target})"
    return ""


def find_units(block: Block, batch: int) -> list[Unit]:
    """Units of one block, in graph order of their first node. Children that cannot be cached safely (their
    output carries the residual stream, or is written in place after the module) are listed in `block.refused`."""
    subs = _children(block)
    units: list[Unit] = []
    excluded: set = set()
    for path, d in subs.items():
        if _is_attention(d["cls"]) or _is_norm(d["cls"]):
            excluded |= d["set"]
    for path, d in subs.items():
        outs = [o for o in d["outputs"] if isinstance(_val(o), torch.Tensor)]
        if not outs or len(outs) != len(d["outputs"]):
            continue
        if not _is_norm(d["cls"]):
            why = _refusal(outs, d["set"])
            if why:
                block.refused[path] = why
                continue
        if _is_attention(d["cls"]):
            q_side = _cross_attention_inputs(d)
            unit = Unit(name=path, cls=d["cls"], kind=XATTN if q_side else ATTN, outputs=outs)
            if q_side:
                _fill_xattn(unit, d, q_side, batch)
            units.append(unit)
        elif not _is_norm(d["cls"]):
            # a norm child on the way is part of the gate (Mochi's `norm4(ff_out, tanh(gate))`): walked through
            others = [x["set"] for p, x in subs.items() if p != path and not _is_norm(x["cls"])]
            norms = set().union(*(x["set"] for p, x in subs.items() if p != path and _is_norm(x["cls"])))
            if len(outs) != 1 or not _token_layout(_shape(outs[0]), batch, _shape(outs[0])[1] if _shape(outs[0])
                                                   and len(_shape(outs[0])) >= 3 else -1):
                continue  # not a (batch, tokens, ...) value: modulation or other per-sample conditioning
            if not _is_residual_branch(outs, block, others, norms):
                continue
            unit = Unit(name=path, cls=d["cls"], kind=MLP, outputs=outs)
            _fill_mlp(unit, block, batch, excluded)
            units.append(unit)
    return units


def _single_token_output(unit: Unit, batch: int) -> bool:
    if len(unit.outputs) != 1:
        unit.why_not = f"{len(unit.outputs)} outputs; partial recompute needs one"
        return False
    s = _shape(unit.outputs[0])
    if s is None or len(s) < 3 or s[0] != batch:
        unit.why_not = f"output shape {s} is not (batch, tokens, ...)"
        return False
    unit.tokens = s[1]
    return True


def _runs_on_fewer_tokens(unit: Unit) -> str:
    """Run the region on fake tensors with fewer rows than traced; '' if it works, else why not.

    Catches token counts baked into the graph (reshapes with literal sizes, RoPE tables of the full length).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    k = max(1, unit.tokens - 1)
    g, env = fx.Graph(), {}
    for stop in unit.gather + unit.passthrough:
        env[stop] = g.placeholder(stop.name)
    for n in unit.region:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[unit.outputs[0]])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            args = []
            for stop in unit.gather + unit.passthrough:
                v = _val(stop)
                shape = list(v.shape)
                if stop in unit.gather:
                    shape[1] = k
                args.append(torch.empty(shape, dtype=v.dtype, device=v.device))
            out = fx.Interpreter(fx.GraphModule(torch.nn.Module(), g)).run(*args)
    except Exception as exc:  # any failure means: do not recompute this unit on a subset
        return f"its region does not run on fewer tokens ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    want = list(_shape(unit.outputs[0]))
    want[1] = k
    if not isinstance(out, torch.Tensor) or list(out.shape) != want:
        return f"its region gives shape {getattr(out, 'shape', None)} on {k} tokens, expected {want}"
    return ""


def _finish_partial(unit: Unit) -> None:
    unit.why_not = _runs_on_fewer_tokens(unit)
    unit.partial = not unit.why_not


def _fill_mlp(unit: Unit, block: Block, batch: int, excluded: set) -> None:
    if not _single_token_output(unit, batch):
        return
    region = _f_region(unit.outputs[0], block, batch, unit.tokens, excluded)
    if not region or region[-1] is not unit.outputs[0]:
        unit.why_not = f"its output `{unit.outputs[0].name}` is not a row-wise op"
        return
    unit.region = region
    unit.gather, unit.passthrough = _classify_stops(region, batch, unit.tokens)
    if not unit.gather:
        unit.why_not = "no token input to gather"
        return
    _finish_partial(unit)


def _fill_xattn(unit: Unit, child: dict, q_side: set, batch: int) -> None:
    if not _single_token_output(unit, batch):
        return
    if not all(_token_layout(_shape(q), batch, unit.tokens) for q in q_side):
        unit.why_not = "query input is not (batch, tokens, ...)"
        return
    unit.region = [n for n in child["nodes"] if n.op in ("call_function", "call_method")]
    unit.gather, unit.passthrough = _classify_stops(unit.region, batch, unit.tokens, must_gather=q_side)
    _finish_partial(unit)
