"""The reference interpreter: the living definition of the IR's semantics.

float64, recurrent in time, vectorized over every other dim. Every value is a NumPy array
of full rank in the recurrence's canonical dim order (size 1 where a value lacks a dim), so
broadcasting by dim name is plain NumPy broadcasting. State-free expressions are evaluated
once for all time steps (a leading time axis, of size T or 1); the time loop then applies one
transition rule per state per step and evaluates the readouts on h_t.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from scancc.ir import Kind, Node, Op, Recurrence

_EXP_ARG_MAX = 700.0  # exp overflows float64 past ~709; sigmoid-style ops stay finite below


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


# rules for elementwise ops, keyed by IR op
UNARY_RULES: dict[Op, Callable] = {
    Op.NEG: np.negative,
    Op.EXP: np.exp,
    Op.LOG: np.log,
    Op.SOFTPLUS: lambda x: np.logaddexp(0.0, x),
    Op.SIGMOID: _sigmoid,
    Op.LOGSIGMOID: lambda x: -np.logaddexp(0.0, -x),
    Op.SILU: lambda x: x * _sigmoid(x),
    Op.SQRT: np.sqrt,
    Op.RSQRT: lambda x: 1.0 / np.sqrt(x),
    Op.STEP: lambda x: (x >= 0).astype(np.float64),
}
BINARY_RULES: dict[Op, Callable] = {
    Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide,
    Op.MAXIMUM: np.maximum, Op.MINIMUM: np.minimum,
}


class Interpreter:
    def __init__(self, rec: Recurrence, sizes: Mapping[str, int]):
        self.rec, self.sizes = rec, dict(sizes)
        self.canon = rec.canonical
        self.axis = {d: i for i, d in enumerate(self.canon)}
        self.state_nodes = {n for _, root in rec.exprs() for n in root.walk()
                            if rec.uses_state(n)}

    # ---- layout conversion ----
    def canon_shape(self, dims) -> tuple[int, ...]:
        return tuple(self.sizes[d] if d in dims else 1 for d in self.canon)

    def to_canon(self, arr: np.ndarray, layout: tuple[str, ...], lead_time: bool) -> np.ndarray:
        """Array in ``layout`` -> full-rank canonical array (with a leading time axis if asked)."""
        time = self.rec.time
        present = [d for d in self.canon if d in layout]
        src = ([layout.index(time)] if time in layout else []) + [layout.index(d) for d in present]
        a = np.transpose(arr, src)
        if lead_time and time not in layout:
            a = a[None]
        shape = ((a.shape[0],) if lead_time else ()) + self.canon_shape(present)
        return a.reshape(shape)

    def from_canon(self, a: np.ndarray, layout: tuple[str, ...]) -> np.ndarray:
        """Full-rank canonical array (no time axis) -> ``layout`` (no time dim)."""
        a = np.broadcast_to(a, self.canon_shape(layout))
        present = [d for d in self.canon if d in layout]
        a = a.reshape(tuple(self.sizes[d] for d in present))
        return np.transpose(a, [present.index(d) for d in layout])

    # ---- expressions ----
    def eval(self, node: Node, leaf: Callable[[Node], np.ndarray], memo: dict) -> np.ndarray:
        if node in memo:
            return memo[node]
        op, a = node.op, node.arg
        if op in (Op.INPUT, Op.STATE, Op.PREV):
            v = leaf(node)
        elif op is Op.PARAM:
            v = self.eval(self.rec.let(a).expr, leaf, memo)
        elif op is Op.CONST:
            v = np.full((1,) * (len(self.canon) + 1), a)
        elif op is Op.SIZE:
            v = np.full((1,) * (len(self.canon) + 1), float(self.sizes[a]))
        elif op is Op.IOTA:
            v = np.arange(self.sizes[a], dtype=np.float64).reshape((1,) + self.canon_shape([a]))
        else:
            src = [self.eval(s, leaf, memo) for s in node.src]
            v = self._apply(node, src)
        memo[node] = v
        return v

    def _ax(self, d: str) -> int:
        return 1 + self.axis[d]  # +1: the leading time axis

    def _apply(self, node: Node, src: list[np.ndarray]) -> np.ndarray:
        op, a = node.op, node.arg
        if op in UNARY_RULES:
            return UNARY_RULES[op](src[0])
        if op in BINARY_RULES:
            return BINARY_RULES[op](src[0], src[1])
        if op is Op.CLAMP:
            lo, hi = a
            return np.clip(src[0], -np.inf if lo is None else lo, np.inf if hi is None else hi)
        if op is Op.SUM:
            return np.sum(src[0], axis=tuple(self._ax(d) for d in a), keepdims=True)
        if op is Op.MAX:
            return np.max(src[0], axis=tuple(self._ax(d) for d in a), keepdims=True)
        if op is Op.L2NORM:
            x = src[0]
            return x / np.sqrt(np.sum(x * x, axis=self._ax(a), keepdims=True) + 1e-6)
        if op is Op.FLIP:
            return np.flip(src[0], axis=self._ax(a))
        if op is Op.GROUP:
            g, d = a
            rep = self.sizes[d] // self.sizes[g]
            return np.swapaxes(np.repeat(src[0], rep, axis=self._ax(g)), self._ax(g), self._ax(d))
        if op is Op.UNGROUP:
            d, g = a
            x, ad = src[0], self._ax(d)
            shape = list(x.shape)
            split = shape[:ad] + [self.sizes[g], shape[ad] // self.sizes[g]] + shape[ad + 1:]
            return np.swapaxes(x.reshape(split).sum(axis=ad + 1), ad, self._ax(g))
        if op is Op.SOFTMAX:
            ax = self._ax(a)
            logits = src[0]
            keep = np.ones_like(logits, dtype=bool) if len(src) == 1 else (src[1] != 0)
            logits, keep = np.broadcast_arrays(logits, keep)
            masked = np.where(keep, logits, -np.inf)
            m = np.max(masked, axis=ax, keepdims=True)
            p = np.where(keep, np.exp(masked - np.where(np.isfinite(m), m, 0.0)), 0.0)
            s = np.sum(p, axis=ax, keepdims=True)
            return p / np.where(s == 0, 1.0, s)  # a fully masked row reads nothing: weights 0
        raise KeyError(f"reference backend has no rule for op {op.value!r}")

    # ---- transitions: h_t = A_t(h_{t-1}) + b_t, one rule per structure ----
    def _shift_in(self, h: np.ndarray, ax: int, new: np.ndarray) -> np.ndarray:
        slot_shape = list(h.shape)
        slot_shape[ax] = 1
        return np.concatenate([np.delete(h, 0, axis=ax), np.broadcast_to(new, slot_shape)], ax)

    def _shift_out(self, x: np.ndarray, ax: int) -> np.ndarray:
        """The transpose of a shift: slot i takes slot i - 1, the oldest slot becomes 0."""
        zero = np.zeros_like(np.take(x, [0], axis=ax))
        return np.concatenate([zero, np.delete(x, x.shape[ax] - 1, axis=ax)], ax)

    def step(self, kind: Kind, h, b, ops: dict, axis: str | None, col: str | None):
        ax = self.axis[axis] if axis is not None else None
        if kind is Kind.IDENTITY:
            return h + b
        if kind in (Kind.SCALAR, Kind.DIAGONAL):
            return ops["decay"] * h + b
        if kind is Kind.SHIFT:
            return self._shift_in(h, ax, b)
        if kind is Kind.COMPANION:
            shifted = self._shift_in(h, ax, 0.0)
            new = np.sum(ops["feedback"] * shifted, axis=ax, keepdims=True) + b
            return self._shift_in(h, ax, new)
        if kind is Kind.HOUSEHOLDER:
            k = ops["k"]
            out = h - ops["beta"] * k * np.sum(k * h, axis=ax, keepdims=True)
            return (ops["alpha"] * out if "alpha" in ops else out) + b
        if kind is Kind.DENSE:
            hc = np.swapaxes(h, ax, self.axis[col])  # h indexed by the column dim
            return np.sum(ops["matrix"] * hc, axis=self.axis[col], keepdims=True) + b
        # adjoint steps: h_t = A_t^T (h_{t-1} + b_t)
        if kind is Kind.SHIFT_ADJOINT:
            return self._shift_out(h + b, ax)
        if kind is Kind.COMPANION_ADJOINT:
            x = h + b
            newest = np.take(x, [x.shape[ax] - 1], axis=ax)
            return self._shift_out(x + ops["feedback"] * newest, ax)
        if kind is Kind.DENSE_ADJOINT:
            x = h + b
            tc = np.sum(ops["matrix"] * x, axis=ax, keepdims=True)  # indexed by the column dim
            return np.swapaxes(tc, ax, self.axis[col])
        raise KeyError(f"reference backend has no rule for transition {kind.value!r}")

    # ---- the scan ----
    def run(self, inputs: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray] | None):
        rec, T = self.rec, self.sizes[self.rec.time]
        canon_in = {}
        for inp in rec.inputs:
            arr = np.asarray(inputs[inp.name], dtype=np.float64)
            layout = inp.dims
            if arr.ndim != len(layout):  # an optional dim left out (verified by bind_sizes)
                layout = tuple(d for d in layout if d not in inp.optional_dims)
            canon_in[inp.name] = self.to_canon(arr, layout, lead_time=True)

        full_memo: dict = {}
        full = lambda n: self.eval(n, lambda m: canon_in[m.arg], full_memo)  # noqa: E731

        plans = []
        for s in rec.states:
            t = s.transition
            shape = self.canon_shape(s.dims)
            if initial is not None and s.name in initial:
                h = self.to_canon(np.asarray(initial[s.name], np.float64), s.dims, False)
            else:
                h = np.zeros(shape)
            plans.append((s, h, full(s.inject), {k: full(v) for k, v in t.operands}))

        outs = {o.name: np.full(tuple(self.sizes[d] for d in o.dims), np.nan) for o in rec.outputs}
        states = {s.name: h for s, h, _, _ in plans}
        entering = states
        at = lambda v, i: v[i] if v.shape[0] > 1 else v[0]  # noqa: E731
        for i in range(T):
            new = {}
            for s, _, b, ops in plans:
                t = s.transition
                h = self.step(t.kind, states[s.name], at(b, i), {k: at(v, i) for k, v in ops.items()},
                              t.axis, t.col)
                new[s.name] = np.broadcast_to(h, states[s.name].shape)
            entering, states = states, new

            def leaf(n: Node):
                if n.op is Op.STATE:
                    return states[n.arg][None]
                if n.op is Op.PREV:
                    return entering[n.arg][None]
                return canon_in[n.arg][i:i + 1] if canon_in[n.arg].shape[0] > 1 \
                    else canon_in[n.arg]

            step_memo: dict = {}
            for o in rec.outputs:
                v = self._eval_step(o.expr, leaf, step_memo, full, i)
                layout = tuple(d for d in o.dims if d != rec.time)
                tpos = o.dims.index(rec.time)
                idx = (slice(None),) * tpos + (i,)
                outs[o.name][idx] = self.from_canon(v[0], layout)
        finals = {s.name: np.ascontiguousarray(self.from_canon(states[s.name], s.dims))
                  for s in rec.states}
        return outs, finals

    def _eval_step(self, node: Node, leaf, memo: dict, full, i: int) -> np.ndarray:
        """Evaluate a readout at step i: state-free subtrees come from the all-steps values."""
        if node not in self.state_nodes:
            v = full(node)
            return v[i:i + 1] if v.shape[0] > 1 else v
        if node in memo:
            return memo[node]
        if node.op in (Op.STATE, Op.PREV):
            v = leaf(node)
        elif node.op is Op.PARAM:
            v = self._eval_step(self.rec.let(node.arg).expr, leaf, memo, full, i)
        else:
            v = self._apply(node, [self._eval_step(s, leaf, memo, full, i) for s in node.src])
        memo[node] = v
        return v
