"""The reference backend's rules: how each IR op and each transition kind is evaluated.

Two registries (``backends/rules.py``), with the same names in every backend:

- ``OP_RULES[op](ev, node, src)``: the value of ``node`` from its operands' values ``src``.
  ``ev`` is the evaluation in progress: ``ev.I`` the ``Interpreter`` (sizes, axes),
  ``ev.leaf(node)`` the value of an input/state leaf, ``ev.eval(node)`` the value of another
  expression (a let's body). Values are float64 arrays of full rank in canonical dim order
  with a leading time axis (size T or 1), so axis of dim d is ``ev.I.ax(d)``.
- ``TRANSITION_RULES[kind](I, h, b, ops, axis, col)``: one step ``h_t`` of a state from
  ``h = h_{t-1}``, the injected term ``b = b_t`` and the operands' values ``ops`` at t (no
  time axis: axis of dim d is ``I.axis[d]``); ``axis``/``col`` are the transition's dims.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from scancc.ir import Kind, Op
from scancc.ir.expr import L2NORM_EPS

from ..rules import Rules

OP_RULES = Rules("reference", "op")
TRANSITION_RULES = Rules("reference", "transition")

def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _scalar(v: float, I) -> np.ndarray:
    return np.full((1,) * (len(I.canon) + 1), v)


# ---- leaves ----

@OP_RULES.register(Op.INPUT, Op.STATE, Op.PREV)
def _leaf_rule(ev, node, src):
    return ev.leaf(node)


@OP_RULES.register(Op.PARAM)
def _param_rule(ev, node, src):
    return ev.eval(ev.I.rec.let(node.arg).expr)


@OP_RULES.register(Op.CONST)
def _const_rule(ev, node, src):
    return _scalar(node.arg, ev.I)


@OP_RULES.register(Op.SIZE)
def _size_rule(ev, node, src):
    return _scalar(float(ev.I.sizes[node.arg]), ev.I)


@OP_RULES.register(Op.IOTA)
def _iota_rule(ev, node, src):
    d = node.arg
    return np.arange(ev.I.sizes[d], dtype=np.float64).reshape((1,) + ev.I.canon_shape([d]))


# ---- elementwise ----

def _elementwise(f: Callable) -> Callable:
    def rule(ev, node, src):
        return f(*src)
    return rule


for _op, _f in {
    Op.NEG: np.negative,
    Op.EXP: np.exp,
    Op.EXPM1: np.expm1,
    Op.LOG: np.log,
    Op.SOFTPLUS: lambda x: np.logaddexp(0.0, x),
    Op.SIGMOID: _sigmoid,
    Op.LOGSIGMOID: lambda x: -np.logaddexp(0.0, -x),
    Op.SILU: lambda x: x * _sigmoid(x),
    Op.SQRT: np.sqrt,
    Op.RSQRT: lambda x: 1.0 / np.sqrt(x),
    Op.STEP: lambda x: (x >= 0).astype(np.float64),
    Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide,
    Op.MAXIMUM: np.maximum, Op.MINIMUM: np.minimum,
    Op.COS: np.cos, Op.SIN: np.sin, Op.ABS: np.abs, Op.TANH: np.tanh,
}.items():
    OP_RULES.add([_op], _elementwise(_f))


@OP_RULES.register(Op.CLAMP)
def _clamp_rule(ev, node, src):
    lo, hi = node.arg
    return np.clip(src[0], -np.inf if lo is None else lo, np.inf if hi is None else hi)


# ---- dim-structured ----

@OP_RULES.register(Op.SUM)
def _sum_rule(ev, node, src):
    return np.sum(src[0], axis=tuple(ev.I.ax(d) for d in node.arg), keepdims=True)


@OP_RULES.register(Op.MAX)
def _max_rule(ev, node, src):
    return np.max(src[0], axis=tuple(ev.I.ax(d) for d in node.arg), keepdims=True)


@OP_RULES.register(Op.L2NORM)
def _l2norm_rule(ev, node, src):
    x = src[0]
    return x / np.sqrt(np.sum(x * x, axis=ev.I.ax(node.arg), keepdims=True) + L2NORM_EPS)


@OP_RULES.register(Op.FLIP)
def _flip_rule(ev, node, src):
    return np.flip(src[0], axis=ev.I.ax(node.arg))


@OP_RULES.register(Op.GROUP)
def _group_rule(ev, node, src):
    I, (g, d) = ev.I, node.arg
    rep = I.sizes[d] // I.sizes[g]
    return np.swapaxes(np.repeat(src[0], rep, axis=I.ax(g)), I.ax(g), I.ax(d))


@OP_RULES.register(Op.UNGROUP)
def _ungroup_rule(ev, node, src):
    I, (d, g) = ev.I, node.arg
    x, ad = src[0], I.ax(d)
    shape = list(x.shape)
    split = shape[:ad] + [I.sizes[g], shape[ad] // I.sizes[g]] + shape[ad + 1:]
    return np.swapaxes(x.reshape(split).sum(axis=ad + 1), ad, I.ax(g))


@OP_RULES.register(Op.SOFTMAX)
def _softmax_rule(ev, node, src):
    ax = ev.I.ax(node.arg)
    logits = src[0]
    keep = np.ones_like(logits, dtype=bool) if len(src) == 1 else (src[1] != 0)
    logits, keep = np.broadcast_arrays(logits, keep)
    masked = np.where(keep, logits, -np.inf)
    m = np.max(masked, axis=ax, keepdims=True)
    p = np.where(keep, np.exp(masked - np.where(np.isfinite(m), m, 0.0)), 0.0)
    s = np.sum(p, axis=ax, keepdims=True)
    return p / np.where(s == 0, 1.0, s)  # a fully masked row reads nothing: weights 0


@OP_RULES.register(Op.JSOFTMAX)
def _joint_softmax_rule(ev, node, src):
    """The weights of one part of a softmax over the union of every part's keys."""
    k, ds = node.arg
    parts = []
    for i, d in enumerate(ds):
        logits, keep = np.broadcast_arrays(src[2 * i], src[2 * i + 1] != 0)
        parts.append((np.where(keep, logits, -np.inf), keep, ev.I.ax(d)))
    m = functools.reduce(np.maximum, [np.max(z, axis=ax, keepdims=True) for z, _, ax in parts])
    m = np.where(np.isfinite(m), m, 0.0)
    p = [np.where(keep, np.exp(z - m), 0.0) for z, keep, _ in parts]
    s = functools.reduce(np.add, [np.sum(pi, axis=ax, keepdims=True)
                                  for pi, (_, _, ax) in zip(p, parts)])
    return p[k] / np.where(s == 0, 1.0, s)  # every key masked: weights 0


# ---- transitions: h_t = A_t(h_{t-1}) + b_t, one rule per structure ----

def _shift_in(h: np.ndarray, ax: int, new) -> np.ndarray:
    """Drop the oldest slot along ``ax``, append ``new`` as the newest."""
    slot_shape = list(h.shape)
    slot_shape[ax] = 1
    return np.concatenate([np.delete(h, 0, axis=ax), np.broadcast_to(new, slot_shape)], ax)


def _shift_out(x: np.ndarray, ax: int) -> np.ndarray:
    """The transpose of a shift: slot i takes slot i - 1, the oldest slot becomes 0."""
    zero = np.zeros_like(np.take(x, [0], axis=ax))
    return np.concatenate([zero, np.delete(x, x.shape[ax] - 1, axis=ax)], ax)


@TRANSITION_RULES.register(Kind.IDENTITY)
def _identity_rule(I, h, b, ops, axis, col):
    return h + b


@TRANSITION_RULES.register(Kind.SCALAR)
def _scalar_rule(I, h, b, ops, axis, col):
    return ops["decay"] * h + b


@TRANSITION_RULES.register(Kind.DIAGONAL)
def _diagonal_rule(I, h, b, ops, axis, col):
    return ops["decay"] * h + b


@TRANSITION_RULES.register(Kind.SHIFT)
def _shift_rule(I, h, b, ops, axis, col):
    return _shift_in(h, I.axis[axis], b)


@TRANSITION_RULES.register(Kind.SELECTION)
def _selection_rule(I, h, b, ops, axis, col):
    """Bounded memory: the incoming item b goes into the lowest free slot, else replaces the
    lowest slot with the smallest stored score if its score is larger; nothing if not valid."""
    ax = I.axis[axis]
    score, valid, keys, filled = (ops[k] for k in ("score", "valid", "keys", "filled"))
    shape = np.broadcast_shapes(h.shape, np.shape(b), np.shape(score), np.shape(valid),
                                np.shape(keys), np.shape(filled))
    free = np.broadcast_to(filled == 0, shape)
    keys = np.broadcast_to(keys, shape)
    any_free = free.any(axis=ax, keepdims=True)
    idx = np.where(any_free, np.argmax(free, axis=ax, keepdims=True),
                   np.argmin(keys, axis=ax, keepdims=True))  # argmin/argmax: the lowest slot
    write = (valid != 0) & (any_free | (score > np.min(keys, axis=ax, keepdims=True)))
    slot = np.arange(shape[ax]).reshape([-1 if i == ax else 1 for i in range(len(shape))])
    return np.where((slot == idx) & write, b, h)


@TRANSITION_RULES.register(Kind.COMPANION)
def _companion_rule(I, h, b, ops, axis, col):
    ax = I.axis[axis]
    shifted = _shift_in(h, ax, 0.0)
    new = np.sum(ops["feedback"] * shifted, axis=ax, keepdims=True) + b
    return _shift_in(h, ax, new)


@TRANSITION_RULES.register(Kind.HOUSEHOLDER)
def _householder_rule(I, h, b, ops, axis, col):
    k = ops["k"]
    out = h - ops["beta"] * k * np.sum(k * h, axis=I.axis[axis], keepdims=True)
    return (ops["alpha"] * out if "alpha" in ops else out) + b


@TRANSITION_RULES.register(Kind.DENSE)
def _dense_rule(I, h, b, ops, axis, col):
    hc = np.swapaxes(h, I.axis[axis], I.axis[col])  # h indexed by the column dim
    return np.sum(ops["matrix"] * hc, axis=I.axis[col], keepdims=True) + b


@TRANSITION_RULES.register(Kind.DPLR)
def _dplr_rule(I, h, b, ops, axis, col):
    # (Diag(w) + a b^T) h along the axis: w * h + a * (b . h), then the inject
    low = ops["a"] * np.sum(ops["b"] * h, axis=I.axis[axis], keepdims=True)
    return (ops["w"] * h if "w" in ops else h) + low + b


# adjoint steps: h_t = A_t^T (h_{t-1} + b_t)

@TRANSITION_RULES.register(Kind.SHIFT_ADJOINT)
def _shift_adjoint_rule(I, h, b, ops, axis, col):
    return _shift_out(h + b, I.axis[axis])


@TRANSITION_RULES.register(Kind.COMPANION_ADJOINT)
def _companion_adjoint_rule(I, h, b, ops, axis, col):
    ax = I.axis[axis]
    x = h + b
    newest = np.take(x, [x.shape[ax] - 1], axis=ax)
    return _shift_out(x + ops["feedback"] * newest, ax)


@TRANSITION_RULES.register(Kind.DENSE_ADJOINT)
def _dense_adjoint_rule(I, h, b, ops, axis, col):
    x = h + b
    tc = np.sum(ops["matrix"] * x, axis=I.axis[axis], keepdims=True)  # indexed by the column dim
    return np.swapaxes(tc, I.axis[axis], I.axis[col])


__all__ = ["OP_RULES", "TRANSITION_RULES"]
