"""Desugar ``joint_softmax`` (one softmax over the union of several parts' keys, see
``expr.joint_softmax``) into ops every backend lowers: masked max, exp, sums.

For parts ``(l_i, d_i, m_i)`` with ``keep_i = [m_i != 0]``::

    z_i = keep_i ? l_i : -BIG              (written l_i * keep_i + (keep_i - 1) * BIG)
    M   = maximum_i max(z_i, d_i)          (the shared stabilizer)
    e_i = exp(z_i - M) * keep_i
    Z   = sum_i sum(e_i, d_i)
    w_k = e_k / maximum(Z, 1)

``keep_i`` is ``1 - step(-(m_i * m_i))`` (1 where m_i != 0): ``step`` has no gradient, so the
adjoint of the desugared form sends nothing into the masks. Whenever a key is kept the largest
kept e_i is exp(0) = 1, so Z >= 1 and ``maximum(Z, 1)`` is Z; when every key is masked Z = 0
and the weights are 0, as the reference rule defines. ``BIG`` (1e30) only has to push masked
logits below every kept one in float32; the nodes are shared between the parts, so a backend
that memoizes equal subexpressions computes M and Z once.
"""
from __future__ import annotations

from ..expr import Node, Op, exp, maximum, step
from ..expr import max as rmax
from ..expr import sum as rsum
from ..recurrence import Recurrence
from .rewrite import bottom_up, map_exprs

BIG = 1e30


def joint_softmax_expr(node: Node) -> Node:
    """The weights ``node`` (an ``Op.JSOFTMAX`` node) in masked max, exp and sums."""
    k, ds = node.arg
    zs, keeps = [], []
    for i in range(len(ds)):
        logits, mask = node.src[2 * i], node.src[2 * i + 1]
        if mask.op is Op.CONST and mask.arg != 0.0:
            keep, z = None, logits
        else:
            keep = 1.0 - step(-(mask * mask))
            z = logits * keep + (keep - 1.0) * BIG
        zs.append(z)
        keeps.append(keep)
    m = rmax(zs[0], ds[0])
    for z, d in zip(zs[1:], ds[1:]):
        m = maximum(m, rmax(z, d))
    es = [exp(z - m) if keep is None else exp(z - m) * keep for z, keep in zip(zs, keeps)]
    total = rsum(es[0], ds[0])
    for e, d in zip(es[1:], ds[1:]):
        total = total + rsum(e, d)
    return es[k] / maximum(total, 1.0)


def desugar_joint_softmax(rec: Recurrence) -> Recurrence:
    """``rec`` with every ``joint_softmax`` written as ``joint_softmax_expr`` (returns ``rec``
    itself when it has none)."""
    if not any(n.op is Op.JSOFTMAX for _, root in rec.exprs() for n in root.walk()):
        return rec
    return map_exprs(rec, bottom_up(
        lambda n: joint_softmax_expr(n) if n.op is Op.JSOFTMAX else None))


__all__ = ["BIG", "desugar_joint_softmax", "joint_softmax_expr"]
