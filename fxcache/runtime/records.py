"""`fxcache.stats` records: plain dicts (every field as it always was) that print as one short line.

A record holds the `StepPlan` that ran, whose repr lists every block: printed as a dict, three records were
kilobytes of text. The short form says what a log reader looks for: which request, step and branch, what ran.
"""

from __future__ import annotations


class Record(dict):
    """One model call: `graph`, `request`, `step`, `branch`, `kind`, `plan`, `tokens`, `flops`, `t`, `cached`,
    `cache_bytes` (and `component` for pipelines with several transformers)."""

    __slots__ = ()

    def __repr__(self) -> str:
        where = f"request {self.get('request')} step {self.get('step')} branch {self.get('branch')}"
        if "component" in self:
            where = f"{self['component']} {where}"
        what = [str(self.get("kind"))] if self.get("cached", True) else ["uncached"]
        if self.get("tokens") is not None:
            what.append(f"{self['tokens']} tokens")
        if self.get("flops") is not None:
            what.append(f"{self['flops'] / 1e6:.3g} MFLOPs")
        if isinstance(self.get("t"), (int, float)):
            what.append(f"t={self['t']:.4g}")
        if self.get("cache_bytes"):
            what.append(f"{self['cache_bytes'] / 2**10:.1f} KiB cached")
        return f"<{where}, graph {self.get('graph')}: {', '.join(what)}>"


def records(source) -> list[Record]:
    """Copies of a scope's records, as `stats()` hands them out."""
    return [Record(r) for r in source]
