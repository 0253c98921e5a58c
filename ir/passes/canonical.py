"""Canonical rewrites: IR -> IR passes that keep the semantics and give backends one
spelling to lower.

- ``canonicalize``: ``exp(x) - 1`` becomes ``expm1(x)`` (also spelled ``exp(x) + -1`` or
  ``-1 + exp(x)``, and with the exp behind lets, e.g. s4d's ``(dA - 1) / A`` with
  ``let dA = exp(dt * A)``), so a backend lowers the accurate form by an ``expm1`` rule
  instead of matching the pattern in its renderer.
- ``desugar_l2norm``: ``l2norm(x, d)`` becomes ``x * rsqrt(sum(x * x, d) + L2NORM_EPS)``, for
  backends without an l2norm rule.
"""
from __future__ import annotations

from ..expr import L2NORM_EPS, Node, Op
from ..recurrence import Recurrence
from .rewrite import bottom_up, map_exprs
from .softmax import desugar_joint_softmax

_ONE = Node(Op.CONST, (), 1.0)
_MINUS_ONE = Node(Op.CONST, (), -1.0)


def _rewrite(rec: Recurrence, rule) -> Recurrence:
    out = map_exprs(rec, bottom_up(rule))
    return rec if out == rec else out


def canonicalize(rec: Recurrence) -> Recurrence:
    """``rec`` with every ``exp(x) - 1`` written ``expm1(x)`` (lets, transition operands,
    injected terms, readouts), and every ``joint_softmax`` desugared (softmax.py). Returns
    ``rec`` itself when there is nothing to rewrite."""
    rec = desugar_joint_softmax(rec)
    lets = {l.name: l.expr for l in rec.lets}

    def exp_arg(n: Node) -> Node | None:
        while n.op is Op.PARAM:  # lets bind earlier lets only: this ends
            n = lets[n.arg]
        return n.src[0] if n.op is Op.EXP else None

    def rule(n: Node) -> Node | None:
        if n.op is Op.SUB and n.src[1] == _ONE:
            e = n.src[0]
        elif n.op is Op.ADD and n.src[1] == _MINUS_ONE:
            e = n.src[0]
        elif n.op is Op.ADD and n.src[0] == _MINUS_ONE:
            e = n.src[1]
        else:
            return None
        x = exp_arg(e)
        # x comes from a let body (rewritten already) or from the rewritten sources
        return None if x is None else Node(Op.EXPM1, (x,))

    go = bottom_up(rule)
    for l in rec.lets:  # in order, so a let's body is canonical before a later let reads it
        lets[l.name] = go(l.expr)
    out = map_exprs(rec, go)
    return rec if out == rec else out


def l2norm_expr(x: Node, dim: str) -> Node:
    """``l2norm(x, dim)`` in elementwise ops and one reduction."""
    ss = Node(Op.SUM, (Node(Op.MUL, (x, x)),), (dim,))
    return Node(Op.MUL, (x, Node(Op.RSQRT, (Node(Op.ADD, (ss, Node(Op.CONST, (), L2NORM_EPS))),))))


def desugar_l2norm(rec: Recurrence) -> Recurrence:
    """``rec`` with every ``l2norm(x, d)`` written ``x * rsqrt(sum(x * x, d) + L2NORM_EPS)``.
    Returns ``rec`` itself when it has no l2norm."""
    return _rewrite(rec, lambda n: l2norm_expr(n.src[0], n.arg) if n.op is Op.L2NORM else None)


__all__ = ["canonicalize", "desugar_l2norm", "l2norm_expr"]
