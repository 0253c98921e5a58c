"""Let-inlining: replace every ``PARAM`` read by the expression its let binds."""
from __future__ import annotations

import dataclasses

from ..expr import Node, Op
from ..recurrence import Recurrence
from .rewrite import map_exprs


def inline_lets_in(rec: Recurrence, node: Node, memo: dict | None = None) -> Node:
    """``node`` (an expression of ``rec``) with no ``PARAM`` left. ``memo`` may be shared
    between calls on the same recurrence, so a let read in many places is inlined once."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    if node.op is Op.PARAM:
        out = inline_lets_in(rec, rec.let(node.arg).expr, memo)
    elif node.src:
        out = Node(node.op, tuple(inline_lets_in(rec, s, memo) for s in node.src), node.arg)
    else:
        out = node
    memo[node] = out
    return out


def inline_lets(rec: Recurrence) -> Recurrence:
    """``rec`` with every let inlined into its readers, and no lets."""
    memo: dict = {}
    out = map_exprs(rec, lambda n: inline_lets_in(rec, n, memo))
    return dataclasses.replace(out, lets=())


def resolve(rec: Recurrence, node: Node) -> Node:
    """``node`` with the lets at its top looked through (``PARAM a`` -> what ``a`` binds)."""
    while node.op is Op.PARAM:
        node = rec.let(node.arg).expr
    return node


__all__ = ["inline_lets", "inline_lets_in", "resolve"]
