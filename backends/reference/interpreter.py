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

from scancc.ir import Node, Op, Recurrence

from .rules import OP_RULES, TRANSITION_RULES


class _Eval:
    """An evaluation in progress, as the op rules see it (see rules.py)."""
    __slots__ = ("I", "leaf", "eval")

    def __init__(self, I: "Interpreter", leaf: Callable[[Node], np.ndarray],
                 ev: Callable[[Node], np.ndarray]):
        self.I, self.leaf, self.eval = I, leaf, ev


class Interpreter:
    # float64 values of a state's injected term evaluated at once (a block of steps): 32 MiB
    BLOCK_ELEMS = 1 << 22

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
    def ax(self, d: str) -> int:
        """The axis of dim ``d`` in an expression value (after the leading time axis)."""
        return 1 + self.axis[d]

    def rule(self, op: Op) -> Callable:
        return OP_RULES.lookup(op, self.rec.name)

    def eval(self, node: Node, leaf: Callable[[Node], np.ndarray], memo: dict) -> np.ndarray:
        """The value of ``node`` at every step (a leading time axis of size T or 1)."""
        if node in memo:
            return memo[node]
        ev = _Eval(self, leaf, lambda n: self.eval(n, leaf, memo))
        v = self.rule(node.op)(ev, node, [self.eval(s, leaf, memo) for s in node.src])
        memo[node] = v
        return v

    # ---- transitions: h_t = A_t(h_{t-1}) + b_t, one rule per structure (rules.py) ----
    def step(self, kind, h, b, ops: dict, axis: str | None, col: str | None):
        return TRANSITION_RULES.lookup(kind, self.rec.name)(self, h, b, ops, axis, col)

    # ---- the scan ----
    def run(self, inputs: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray] | None,
            cu_seqlens=None):
        """(outputs, final states) by name. ``cu_seqlens``: a packed variable-length batch
        (scancc/ir/segments.py): every state resets at each boundary, ``initial`` and the final
        states carry one entry per sequence along the batch dim."""
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

        if cu_seqlens is not None:
            seq_init, starts, ends, finals = self._segments(initial, cu_seqlens)
        else:
            starts = ends = {}
        states = {}
        for s in rec.states:
            if initial is not None and s.name in initial and cu_seqlens is None:
                states[s.name] = self.to_canon(np.asarray(initial[s.name], np.float64), s.dims,
                                               False)
            else:
                states[s.name] = np.zeros(self.canon_shape(s.dims))

        outs = {o.name: np.full(tuple(self.sizes[d] for d in o.dims), np.nan) for o in rec.outputs}
        entering = states
        at = lambda v, i: v[i] if v.shape[0] > 1 else v[0]  # noqa: E731
        # injected terms and transition operands are evaluated a block of steps at a time (no op
        # works along time: the verifier allows no time dim as an op's dim), so memory holds one
        # block of them (an inject has the state's dims), never all T steps
        block = self.time_block(T)
        cascaded = set(rec.cascaded)
        for t0 in range(0, T, block):
            bmemo: dict = {}

            def sliced(m: Node, t0=t0):
                a = canon_in[m.arg]
                return a[t0:t0 + block] if a.shape[0] > 1 else a
            blk = lambda n: self.eval(n, sliced, bmemo)  # noqa: E731
            # a cascaded state (its inject/operands read states) is evaluated step by step
            plans = [(s, None, None) if s.name in cascaded else
                     (s, blk(s.inject), {k: blk(v) for k, v in s.transition.operands})
                     for s in rec.states]
            for i in range(t0, min(T, t0 + block)):
                j = i - t0
                if i in starts:  # the reset: a select of the sequence's initial state
                    states = dict(seq_init(starts[i]))
                new = {}
                for s, b, ops in plans:  # in declaration order: a cascade reads earlier h_t
                    t = s.transition
                    if b is None:
                        b, ops = self._cascade_terms(s, i, new, states, canon_in)
                        b, ops = b[None], {k: v[None] for k, v in ops.items()}
                    h = self.step(t.kind, states[s.name], at(b, j),
                                  {k: at(v, j) for k, v in ops.items()}, t.axis, t.col)
                    new[s.name] = np.broadcast_to(h, states[s.name].shape)
                entering, states = states, new
                self._readouts(i, states, entering, canon_in, full, outs)
                if i in ends:
                    finals[ends[i]] = states
        if cu_seqlens is not None:
            return outs, self._stack_finals(finals, seq_init)
        finals = {s.name: np.ascontiguousarray(self.from_canon(states[s.name], s.dims))
                  for s in rec.states}
        return outs, finals

    # ---- packed variable-length batches (scancc/ir/segments.py) ----
    def _batch_axis(self, s) -> int | None:
        """The axis of the batch dim in state ``s``'s layout (None: it has none)."""
        b = [d.name for d in self.rec.dims if d.role == "batch"]
        return s.dims.index(b[0]) if b and b[0] in s.dims else None

    def _segments(self, initial, cu):
        """(n -> initial states of sequence n, step -> sequence starting there, step ->
        sequence ending there, {n: final states} prefilled for empty sequences)."""
        from scancc.ir.segments import ends, segments, starts
        rec = self.rec

        def seq_init(n: int) -> dict:
            out = {}
            for s in rec.states:
                if initial is not None and s.name in initial:
                    a = np.asarray(initial[s.name], np.float64)
                    ax = self._batch_axis(s)
                    a = a[n] if ax is None else np.take(a, [n], axis=ax)
                    out[s.name] = self.to_canon(a, s.dims, False)
                else:
                    out[s.name] = np.zeros(self.canon_shape(s.dims))
            return out
        finals = {n: seq_init(n) for n, a, b in segments(cu) if a == b}
        return seq_init, starts(cu), ends(cu), finals

    def _stack_finals(self, finals: dict, seq_init) -> dict:
        """Per-sequence final states stacked along the batch dim (a leading dim if none)."""
        out = {}
        for s in self.rec.states:
            per = [np.ascontiguousarray(self.from_canon(finals[n][s.name], s.dims))
                   for n in range(len(finals))]
            ax = self._batch_axis(s)
            out[s.name] = np.stack(per) if ax is None else np.concatenate(per, axis=ax)
        return out

    def _cascade_terms(self, s, i: int, new: dict, states: dict, canon_in: dict):
        """The injected term and operands of cascaded state ``s`` at step ``i`` (no time axis):
        ``state(x)`` reads h_i of an earlier state (in ``new``), ``prev(x)`` h_{i-1}."""
        def leaf(n: Node):
            if n.op is Op.STATE:
                return new[n.arg][None]
            if n.op is Op.PREV:
                return states[n.arg][None]
            a = canon_in[n.arg]
            return a[i:i + 1] if a.shape[0] > 1 else a
        memo: dict = {}
        ev = lambda n: self.eval(n, leaf, memo)[0]  # noqa: E731
        return ev(s.inject), {k: ev(v) for k, v in s.transition.operands}

    def time_block(self, T: int) -> int:
        """Steps per block of injected terms and operands: about ``BLOCK_ELEMS`` float64
        values of the largest state per block (at least 1 step, at most T)."""
        biggest = max((int(np.prod(self.canon_shape(s.dims))) for s in self.rec.states),
                      default=1)
        return max(1, min(T, self.BLOCK_ELEMS // max(1, biggest)))

    def _readouts(self, i: int, states: dict, entering: dict, canon_in: dict, full, outs: dict):
        """Write every output at step ``i`` (``states``: h_i; ``entering``: h_{i-1})."""
        rec = self.rec

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

    def _eval_step(self, node: Node, leaf, memo: dict, full, i: int) -> np.ndarray:
        """Evaluate a readout at step i: state-free subtrees come from the all-steps values."""
        if node not in self.state_nodes:
            v = full(node)
            return v[i:i + 1] if v.shape[0] > 1 else v
        if node in memo:
            return memo[node]
        ev = _Eval(self, leaf, lambda n: self._eval_step(n, leaf, memo, full, i))
        v = self.rule(node.op)(ev, node, [self._eval_step(s, leaf, memo, full, i)
                                          for s in node.src])
        memo[node] = v
        return v
