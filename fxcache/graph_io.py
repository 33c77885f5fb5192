"""The values a variant takes and returns beyond the model's own, typed: one declaration each.

A variant graph takes the model's inputs, then *extra inputs* (caches, per-step draws, Taylor scalars), and returns
the model's outputs, then the *cache entries it writes*. Each of those is a `GraphValue`: its `Role` (who supplies
it, how long it lives), its `Key` (what it is about: a unit output, a Taylor factor, a token stream's draw) and its
shape and dtype. The builder creates them, and the runner, the exporter and the export session consume them
through these types; nothing parses a name back. Every name a key has (in placeholders, records, manifests and the
seeds of per-step draws) is made here.
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from .errors import ExportError

MAX_ORDER = 8  # the highest Taylor order a config allows (TaylorSeer, ClusCa)


class Role(enum.Enum):
    """Who supplies an extra input and how long it lives."""

    CACHE = "cache"  # written by an earlier step of the branch (zeros when absent: a FULL step's old factors)
    STATE = "state"  # like CACHE, but restarted by every FULL step (ToCa staleness)
    BUFFER = "buffer"  # in-place variants: the persistent buffer of an entry the variant only writes
    INDICES = "idx"  # per step: token indices to recompute, (units, k), drawn
    UNIFORM = "rand"  # per step: uniform draws (ToCa's random score, ClusCa's member choice)
    PERMUTATION = "kinit"  # per step: the tokens a cold k-means starts from, (clusters,)
    WARM = "warm"  # per step: 1.0 when the branch has centroids for k-means to start from, (1,)
    TAYLOR_DIFF = "diff"  # FULL steps: 1/d per Taylor order, (m,)
    TAYLOR_COEF = "coef"  # forecast steps: delta^i / i!, (m + 1,)
    FOCA = "foca"  # a call reusing a FoCa-forecast residual: (g, u), the forecast's weight and window update, (2,)
    CARRY = "carry"  # a value the probe of a run-time decision computed and its tail reads (one call)
    SIGNAL = "signal"  # written by a probe: what the decision reads on the host (one call; never a tail input)

    @property
    def persistent(self) -> bool:
        """Kept per CFG branch from step to step (a cache entry), as opposed to made for one step."""
        return self.value in _PERSISTENT

    @property
    def passed(self) -> bool:
        """A probe's output used within the call (carried to the tail, or read as the signal), never kept."""
        return self.value in _PASSED

    @property
    def drawn(self) -> bool:
        """A random draw of the step: a pure function of (seed, step, key), shared by the CFG branches."""
        return self.value in _DRAWN


_PERSISTENT = frozenset({"cache", "state", "buffer"})
#: outputs a runner hands on within the call instead of keeping (a probe's)
_PASSED = frozenset({"carry", "signal"})
_DRAWN = frozenset({"idx", "rand"})


class Slot(enum.Enum):
    """What a key is about."""

    UNIT = "unit"  # output `output` of unit `unit` (before gate and residual)
    FINAL = "final"  # output `output` of the last block (the head's input: SKIP steps)
    TAYLOR = "taylor"  # Taylor factor `order` of output `output` of unit `unit`
    SCORE = "score"  # ToCa: the score (or its source) of unit `unit` at the last FULL step
    STALE = "stale"  # ToCa: steps since each token of unit `unit` was recomputed
    SCORE_DRAW = "score_draw"  # ToCa: the random score of unit `unit`
    INDICES = "indices"  # DuCa: the tokens recomputed in the stream of `tokens` tokens
    MEMBER_DRAW = "member_draw"  # ClusCa: the draw that picks one member per cluster in a stream
    KMEANS_INIT = "kmeans_init"  # ClusCa: the tokens a cold k-means of a stream starts from
    LABELS = "labels"  # ClusCa: each token's cluster in a stream
    CENTROIDS = "centroids"  # ClusCa: the centroids of a stream
    WARM = "warm"  # ClusCa: whether centroids exist
    TAYLOR_DIFF = "taylor_diff"
    TAYLOR_COEF = "taylor_coef"
    RESIDUAL = "residual"  # stream `output` after blocks `unit` ("a:b") minus the stream before them
    REFERENCE = "reference"  # what a run-time signal compares the call with (a residual, an indicator)
    CARRY = "carry"  # value `output` a probe carries to its tail (`unit` names a special one)
    SIGNAL = "signal"  # a probe's signal
    FOCA = "foca"  # the scalars of a FoCa forecast


_BY_UNIT = (Slot.UNIT, Slot.TAYLOR, Slot.SCORE, Slot.STALE, Slot.SCORE_DRAW)
_BY_STREAM = (Slot.INDICES, Slot.MEMBER_DRAW, Slot.KMEANS_INIT, Slot.LABELS, Slot.CENTROIDS)
_OUTPUT = (Slot.UNIT, Slot.FINAL, Slot.TAYLOR, Slot.RESIDUAL, Slot.CARRY)
_NAMED = (Slot.RESIDUAL, Slot.REFERENCE, Slot.CARRY)  # slots whose `unit` may hold a name that is not a module


@dataclasses.dataclass(frozen=True)
class Key:
    """What a value is about. `unit`: a unit's module path; `output`: which of its outputs; `order`: a Taylor
    factor's order; `tokens`: the token count of a stream."""

    slot: Slot
    unit: str = ""
    output: int = 0
    order: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:  # keys are looked up on every call: hash once
        object.__setattr__(self, "_hash", hash((self.slot.value, self.unit, self.output, self.order, self.tokens)))

    def __hash__(self) -> int:
        return self._hash

    # -- constructors: the only way keys are made ---------------------------------------------------------------
    @classmethod
    def unit_output(cls, unit: str, output: int = 0) -> "Key":
        return cls(Slot.UNIT, unit=unit, output=output)

    @classmethod
    def final(cls, output: int = 0) -> "Key":
        return cls(Slot.FINAL, output=output)

    def factor(self, order: int) -> "Key":
        """Taylor factor `order` of this unit output (or of this stream residual: its unit names the run)."""
        assert self.slot in (Slot.UNIT, Slot.RESIDUAL)
        unit = self.unit if self.slot is Slot.UNIT else f"residual[{self.unit}]"
        return Key(Slot.TAYLOR, unit=unit, output=self.output, order=order)

    @property
    def base(self) -> "Key":
        """The unit output a Taylor factor belongs to (itself for any other key)."""
        return Key.unit_output(self.unit, self.output) if self.slot is Slot.TAYLOR else self

    @classmethod
    def residual(cls, stream: int, start: int, end: int, part: str = "") -> "Key":
        """Stream `stream` of the cut after blocks [start, end) minus its value before them (`part`: which of the
        values a FoCa forecast keeps of it: "full", "full_prev", "k", "km1")."""
        return cls(Slot.RESIDUAL, unit=f"{start}:{end}" + (f":{part}" if part else ""), output=stream)

    @classmethod
    def reference(cls, what: str) -> "Key":
        return cls(Slot.REFERENCE, unit=what)

    @classmethod
    def carry(cls, index: int, what: str = "") -> "Key":
        return cls(Slot.CARRY, unit=what, output=index)

    @classmethod
    def signal(cls) -> "Key":
        return cls(Slot.SIGNAL)

    @classmethod
    def score(cls, unit: str) -> "Key":
        return cls(Slot.SCORE, unit=unit)

    @classmethod
    def stale(cls, unit: str) -> "Key":
        return cls(Slot.STALE, unit=unit)

    @classmethod
    def score_draw(cls, unit: str) -> "Key":
        return cls(Slot.SCORE_DRAW, unit=unit)

    @classmethod
    def stream(cls, slot: Slot, tokens: int) -> "Key":
        assert slot in _BY_STREAM
        return cls(slot, tokens=tokens)

    @classmethod
    def scalar(cls, slot: Slot) -> "Key":
        assert slot in (Slot.WARM, Slot.TAYLOR_DIFF, Slot.TAYLOR_COEF, Slot.FOCA)
        return cls(slot)

    # -- names --------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The key's one name: in records, placeholder names and the seed of a per-step draw (so the hooked
        reference, which draws by the same names, makes the same draws)."""
        s = self.slot
        if s is Slot.UNIT:
            return f"{self.unit}:{self.output}"
        if s is Slot.FINAL:
            return f"final:{self.output}"
        if s is Slot.TAYLOR:
            return f"taylor{self.order}:{self.unit}:{self.output}"
        if s is Slot.RESIDUAL:
            return f"residual[{self.unit}]:{self.output}"
        if s is Slot.REFERENCE:
            return f"reference:{self.unit}"
        if s is Slot.CARRY:
            return f"carry:{self.unit}" if self.unit else f"carry:{self.output}"
        if s is Slot.SIGNAL:
            return "signal"
        return {Slot.SCORE: "tocascore:{u}", Slot.STALE: "tocastale:{u}", Slot.SCORE_DRAW: "tocarand:{u}",
                Slot.INDICES: "idx:{t}", Slot.MEMBER_DRAW: "rand:{t}", Slot.KMEANS_INIT: "kinit:{t}",
                Slot.LABELS: "clusterlabels:{t}", Slot.CENTROIDS: "clustercentroids:{t}", Slot.WARM: "cluster_warm",
                Slot.TAYLOR_DIFF: "taylor_diff", Slot.TAYLOR_COEF: "taylor_coef",
                Slot.FOCA: "foca"}[s].format(u=self.unit,
                                                                                            t=self.tokens)

    def __str__(self) -> str:
        return self.name

    @property
    def placeholder(self) -> str:
        """A graph placeholder name for the value (a Python identifier)."""
        return "cache_" + "".join(c if c.isalnum() else "_" for c in self.name)

    # -- (de)serialisation for manifests -------------------------------------------------------------------------
    def to_json(self) -> dict:
        out: dict = {"slot": self.slot.value}
        if self.slot in _BY_UNIT or self.slot in _NAMED:
            out["unit"] = self.unit
        if self.slot in _OUTPUT:
            out["output"] = self.output
        if self.slot is Slot.TAYLOR:
            out["order"] = self.order
        if self.slot in _BY_STREAM:
            out["tokens"] = self.tokens
        return out

    @classmethod
    def from_json(cls, data, where: str) -> "Key":
        """A key from a manifest; ExportError naming the field for anything malformed."""
        if not isinstance(data, dict):
            raise ExportError(f"manifest field {where} must be an object, got {type(data).__name__}")
        slots = {s.value: s for s in Slot}
        slot = slots.get(data.get("slot")) if isinstance(data.get("slot"), str) else None
        if slot is None:
            raise ExportError(f"manifest field {where}.slot must be one of {', '.join(slots)}, got "
                              f"{data.get('slot')!r}")
        wanted = set(cls(slot).to_json())
        if set(data) != wanted:
            raise ExportError(f"manifest field {where} must have exactly the fields {', '.join(sorted(wanted))} "
                              f"for slot {slot.value!r}, got {', '.join(sorted(map(str, data)))}")
        unit = data.get("unit", "")
        if not isinstance(unit, str) or (slot in _BY_UNIT and not unit) or len(unit) > 1000:
            raise ExportError(f"manifest field {where}.unit must be a module path, got {unit!r}")
        ints = {}
        for name, limit in (("output", 1 << 16), ("order", MAX_ORDER), ("tokens", 1 << 31)):
            v = data.get(name, 0)
            low = 1 if name == "tokens" and slot in _BY_STREAM else 0
            if type(v) is not int or not low <= v <= limit:
                raise ExportError(f"manifest field {where}.{name} must be an int from {low} to {limit}, got {v!r}")
            ints[name] = v
        return cls(slot, unit=unit, **ints)


@dataclasses.dataclass(frozen=True)
class GraphValue:
    """An extra input or a written cache entry of a variant."""

    role: Role
    key: Key
    shape: tuple[int, ...]
    dtype: torch.dtype

    def check(self) -> str:
        """'' when shape and dtype fit the role and key, else what is wrong (for values read from a manifest:
        the runtime allocates and indexes by them)."""
        shape, dtype, key = self.shape, self.dtype, self.key
        if self.role is Role.INDICES:
            if len(shape) != 2 or shape[1] > key.tokens:
                return f"shape must be (units, k) with k <= tokens={key.tokens}, got {list(shape)}"
            if dtype is not torch.int64:
                return "dtype must be int64 (token indices)"
        elif self.role is Role.PERMUTATION:
            if len(shape) != 1 or shape[0] > key.tokens:
                return f"shape must be (count,) with count <= tokens={key.tokens}, got {list(shape)}"
            if dtype is not torch.int64:
                return "dtype must be int64 (token indices)"
        elif self.role in (Role.TAYLOR_COEF, Role.TAYLOR_DIFF):
            most = MAX_ORDER + 1 if self.role is Role.TAYLOR_COEF else MAX_ORDER
            if len(shape) != 1 or not 1 <= shape[0] <= most:
                return f"shape must be (n,) with 1 <= n <= {most}, got {list(shape)}"
            if dtype is not torch.float32:
                return "dtype must be float32 (Taylor scalars)"
        elif self.role is Role.FOCA:
            if tuple(shape) != (2,) or dtype is not torch.float32:
                return "shape must be [2] and dtype float32 (the forecast's weight and window update)"
        elif self.role is Role.WARM:
            if tuple(shape) != (1,) or dtype is not torch.float32:
                return "shape must be [1] and dtype float32"
        elif self.role is Role.UNIFORM and dtype is not torch.float32:
            return "dtype must be float32 (uniform draws)"
        return ""


#: which slots each role may carry (the pairs the builder makes)
ROLE_SLOTS = {
    Role.CACHE: {Slot.UNIT, Slot.FINAL, Slot.TAYLOR, Slot.SCORE, Slot.LABELS, Slot.CENTROIDS, Slot.RESIDUAL,
                 Slot.REFERENCE},
    Role.STATE: {Slot.STALE},
    Role.BUFFER: {Slot.UNIT, Slot.FINAL, Slot.TAYLOR, Slot.SCORE, Slot.LABELS, Slot.CENTROIDS, Slot.STALE,
                  Slot.RESIDUAL, Slot.REFERENCE},
    Role.CARRY: {Slot.CARRY},
    Role.SIGNAL: {Slot.SIGNAL},
    Role.INDICES: {Slot.INDICES},
    Role.UNIFORM: {Slot.SCORE_DRAW, Slot.MEMBER_DRAW, Slot.KMEANS_INIT},  # KMEANS_INIT: ClusCa kmeans="ref"
    Role.PERMUTATION: {Slot.KMEANS_INIT},
    Role.WARM: {Slot.WARM},
    Role.FOCA: {Slot.FOCA},
    Role.TAYLOR_DIFF: {Slot.TAYLOR_DIFF},
    Role.TAYLOR_COEF: {Slot.TAYLOR_COEF},
}


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: how manifests name dtypes."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value

