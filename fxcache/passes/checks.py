"""Invariant checks run after every pass when asked for: `FXCACHE_CHECK_PASSES=1`, or the `fxcache.passes` logger
at DEBUG (as TORCH_LOGS does for torch's own passes). The test suite runs with them on.

After each pass: the graph lints; the placeholders the builder added are exactly the inputs the passes declared,
in order; every declared input is read; no in-place op exists that the original graph did not have (the in-place
cache pass, which runs after the build, is the only one that adds any); every declared output is a node of the
graph. A failure names the pass.
"""

from __future__ import annotations

import functools
import logging
import os

from ..analysis.aliases import is_mutation

log = logging.getLogger("fxcache.passes")

#: every pass, by name (what the checks and the debug log call it)
PASSES: dict[str, object] = {}


def checks_enabled() -> bool:
    return os.environ.get("FXCACHE_CHECK_PASSES") == "1" or log.isEnabledFor(logging.DEBUG)


class PassInvariantError(AssertionError):
    """A pass broke an invariant of the variant under construction (a bug in the pass, not in the model)."""


def check(b, after: str) -> None:
    def fail(what: str) -> None:
        raise PassInvariantError(f"after pass {after}: {what}")

    try:
        b.graph.lint()
    except Exception as exc:  # fx raises RuntimeError / AssertionError for malformed graphs
        fail(f"the graph does not lint: {exc}")
    added = [ph.target for ph in b.added]
    declared = [v.key.placeholder for v in b.inputs]
    if added != declared:
        fail(f"placeholders {added} are not the declared inputs {declared}")
    unread = [ph.target for ph in b.added if not ph.users and ph not in b.extra_outputs]
    if unread:
        fail(f"declared inputs nobody reads: {unread}")
    original = {b.env[n] for n in b.gm.graph.nodes if is_mutation(n) and n in b.env}
    added_mutations = [n.name for n in b.graph.nodes if is_mutation(n) and n not in original]
    if added_mutations:
        fail(f"in-place ops the model does not have: {added_mutations}")
    nodes = set(b.graph.nodes)
    lost = [key.name for (_, key), node in zip(b.written, b.extra_outputs) if node not in nodes]
    if lost:
        fail(f"declared outputs that are not in the graph: {lost}")


def graph_pass(fn):
    """Register a pass under its function's name; with checks on, check the graph after every call of it."""

    @functools.wraps(fn)
    def run(b, *args, **kwargs):
        result = fn(b, *args, **kwargs)
        if checks_enabled():
            check(b, fn.__name__)
            log.debug("pass %s: %d nodes, %d inputs, %d outputs", fn.__name__, len(b.graph.nodes), len(b.inputs),
                      len(b.written))
        return result

    PASSES[fn.__name__] = run
    return run
