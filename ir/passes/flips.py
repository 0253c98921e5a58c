"""Flip-sinking: move every ``flip(x, d)`` down to the leaves.

Flips commute with elementwise ops, with reductions over other dims, and with softmax and
l2norm (equivariant along their own dim), and vanish on values without ``d``; two flips along
the same dim cancel, along different dims commute. The adjoint needs this: the VJP of a flip
is a flip of a cotangent, which reads the backward state; sunk, it ends on inputs (a flipped
load) or on parts without ``d``. Flips stay on leaves, ``param``, ``group`` and ``ungroup``
(a chain of flips along different dims on one of those).
"""
from __future__ import annotations

from typing import Callable

from ..expr import BINARY, UNARY, Node, Op
from ..recurrence import Recurrence
from .rewrite import map_exprs

DimsOf = Callable[[Node], tuple[str, ...]]


def sink_flips_in(dims_of: DimsOf, node: Node, memo: dict | None = None) -> Node:
    """``node`` with its flips sunk; ``dims_of`` gives a node's dims (``Recurrence.dims_of``
    of the recurrence the node belongs to). ``memo`` may be shared between calls."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    out = node
    if node.op is Op.FLIP:
        d, x = node.arg, sink_flips_in(dims_of, node.src[0], memo)
        out = _flip(dims_of, x, d, memo)
    elif node.src:
        out = Node(node.op, tuple(sink_flips_in(dims_of, s, memo) for s in node.src), node.arg)
    memo[node] = out
    return out


def _flip(dims_of: DimsOf, x: Node, d: str, memo: dict) -> Node:
    """flip(x, d) with the flip pushed below x's op where it commutes."""
    key = ("flip", x, d)
    if key in memo:
        return memo[key]
    op = x.op
    if d not in dims_of(x):
        out = x
    elif op is Op.FLIP and x.arg == d:
        out = x.src[0]
    elif op is Op.FLIP:  # flips along different dims commute: sink this one below
        out = Node(Op.FLIP, (_flip(dims_of, x.src[0], d, memo),), x.arg)
    elif op in UNARY or op in BINARY or (op in (Op.SUM, Op.MAX) and d not in x.arg) \
            or op in (Op.SOFTMAX, Op.L2NORM):
        out = Node(op, tuple(_flip(dims_of, s, d, memo) for s in x.src), x.arg)
    else:  # a leaf, a param, group/ungroup: the flip stays here
        out = Node(Op.FLIP, (x,), d)
    memo[key] = out
    return out


def sink_flips(rec: Recurrence) -> Recurrence:
    """``rec`` with the flips of every expression sunk to the leaves (same semantics)."""
    memo: dict = {}
    return map_exprs(rec, lambda n: sink_flips_in(rec.dims_of, n, memo))


__all__ = ["sink_flips", "sink_flips_in"]
