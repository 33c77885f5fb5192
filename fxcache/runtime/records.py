"""`fxcache.stats` records: plain dicts (every field as it always was) that print as one short line.

A record holds the `StepPlan` that ran, whose repr lists every block: printed as a dict, three records were
kilobytes of text. The short form says what a log reader looks for: which request, step and branch, what ran.
"""

from __future__ import annotations


class Record(dict):
    """One model call: `graph`, `request`, `step`, `branch`, `kind`, `plan`, `tokens`, `flops`, `t`, `cached`,
    `cache_bytes` (and `component` for pipelines with several transformers; `signal` and `accumulated` for the
    methods that decide at run time: the value the call's rule read, and the value it compared with its
    threshold, None when it compared none)."""

    __slots__ = ()

    def __repr__(self) -> str:
        where = f"request {self.get('request')} step {self.get('step')} branch {self.get('branch')}"
        if "component" in self:
            where = f"{self['component']} {where}"
        what = [str(self.get("kind"))] if self.get("cached", True) else ["uncached"]
        if self.get("tokens") is not None:
            what.append(f"{self['tokens']} token{'' if self['tokens'] == 1 else 's'}")
        if self.get("flops") is not None:
            what.append(_flops(self["flops"]))
        if isinstance(self.get("t"), (int, float)):
            what.append(f"t={self['t']:.4g}")
        if isinstance(self.get("signal"), float):
            what.append(f"signal {self['signal']:.4g}")
        if isinstance(self.get("accumulated"), float) and self.get("accumulated") != self.get("signal"):
            what.append(f"accumulated {self['accumulated']:.4g}")
        if self.get("cache_bytes"):
            what.append(f"{_bytes(self['cache_bytes'])} cached")
        return f"<{where}, graph {self.get('graph')}: {', '.join(what)}>"


def flops_unit(values) -> tuple[float, str]:
    """(scale, name) of the unit that shows the largest of `values` as 1 to 999: FLOPs, kFLOPs ... PFLOPs."""
    top = max((v for v in values if v), default=0.0)
    for scale, name in ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if top >= scale:
            return scale, name
    return 1.0, "FLOPs"


def _flops(n: float) -> str:
    """FLOPs in the unit that fits them (FLUX-size calls read in TFLOPs, tiny test models in MFLOPs)."""
    scale, unit = flops_unit([n])
    return f"{n / scale:.3g} {unit}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def records(source) -> list[Record]:
    """Copies of a scope's records, as `stats()` hands them out."""
    return [Record(r) for r in source]
