"""The invariant checks after each pass catch what a broken pass would do, and name the pass."""

import operator

import pytest
import torch

from fxcache.graph_io import Key, Role, Slot
from fxcache.passes import GraphBuilder, PassInvariantError, graph_pass


@graph_pass
def declares_an_unread_input(b):
    b.take(Role.UNIFORM, Key.stream(Slot.MEMBER_DRAW, 16), (1, 16), torch.float32)


@graph_pass
def adds_an_inplace_op(b, unit):
    out = b.env[unit.outputs[0]]
    with b.graph.inserting_after(out):
        b.graph.call_method("mul_", (out, 2.0))


@graph_pass
def hides_a_placeholder(b):
    b.add_placeholder("undeclared")


@graph_pass
def writes_a_node_it_removed(b, unit):
    out = b.env[unit.outputs[0]]
    with b.graph.inserting_after(out):
        node = b.graph.call_function(operator.neg, (out,))
    b.give(Role.CACHE, Key.unit_output("x"), node)
    b.graph.erase_node(node)


@pytest.mark.parametrize("broken,args,message", [
    (declares_an_unread_input, (), "declared inputs nobody reads"),
    (adds_an_inplace_op, (1,), "in-place ops the model does not have"),
    (hides_a_placeholder, (), "placeholders \\['undeclared'\\] are not the declared inputs \\[\\]"),
    (writes_a_node_it_removed, (1,), "declared outputs that are not in the graph"),
])
def test_a_broken_pass_is_named(dit, monkeypatch, broken, args, message):
    monkeypatch.setenv("FXCACHE_CHECK_PASSES", "1")
    gm, plan = dit
    b = GraphBuilder(gm)
    with pytest.raises(PassInvariantError, match=f"after pass {broken.__name__}: {message}"):
        broken(b, *(plan.units[a] for a in args))


def test_checks_are_off_unless_asked_for(dit, monkeypatch):
    monkeypatch.delenv("FXCACHE_CHECK_PASSES", raising=False)
    gm, _ = dit
    declares_an_unread_input(GraphBuilder(gm))  # no check, no error
