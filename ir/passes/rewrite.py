"""Node-level rewriting helpers the passes share: substitution, and applying a rewrite to
every expression of a recurrence."""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..expr import Node
from ..recurrence import Let, Output, Recurrence, State, Transition


def substitute(node: Node, mapping: dict[Node, Node], memo: dict | None = None) -> Node:
    """``node`` with every subtree found in ``mapping`` replaced (structurally: nodes compare
    by value). ``memo`` may be shared between calls with the same mapping."""
    memo = {} if memo is None else memo
    if node in mapping:
        return mapping[node]
    if node in memo:
        return memo[node]
    out = Node(node.op, tuple(substitute(s, mapping, memo) for s in node.src), node.arg) \
        if node.src else node
    memo[node] = out
    return out


def map_exprs(rec: Recurrence, fn: Callable[[Node], Node]) -> Recurrence:
    """``rec`` with ``fn`` applied to every root expression: lets, transition operands,
    injected terms and readouts (names, dims and structure unchanged)."""
    lets = tuple(Let(l.name, fn(l.expr)) for l in rec.lets)
    states = tuple(State(s.name, s.dims,
                         Transition(s.transition.kind, s.transition.axis,
                                    tuple((k, fn(v)) for k, v in s.transition.operands),
                                    s.transition.col),
                         fn(s.inject)) for s in rec.states)
    outputs = tuple(Output(o.name, o.dims, fn(o.expr)) for o in rec.outputs)
    return dataclasses.replace(rec, lets=lets, states=states, outputs=outputs)


def bottom_up(rule: Callable[[Node], Node | None]) -> Callable[[Node], Node]:
    """A rewrite of a whole expression from a local ``rule`` (None: leave the node), applied
    to the sources first; shared subtrees are rewritten once."""
    memo: dict[Node, Node] = {}

    def go(n: Node) -> Node:
        if n in memo:
            return memo[n]
        m = Node(n.op, tuple(go(s) for s in n.src), n.arg) if n.src else n
        r = rule(m)
        out = m if r is None else r
        memo[n] = out
        return out
    return go


__all__ = ["substitute", "map_exprs", "bottom_up"]
