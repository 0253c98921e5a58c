"""Derive the backward (adjoint) recurrence of a recurrence, as ordinary IR (a pass:
recurrence -> its backward recurrence; it uses the let-inlining and flip-sinking passes).

Forward, per state: h_t = A_t h_{t-1} + b_t and readouts y_t = R(h_t, x_t). With the output
cotangents dy_t and dh_final, the backward carries nu_t = A_{t+1}^T lambda_{t+1} (the gradient
that flows into h_t from later steps) and runs in reverse time:

    g_t       = (dR/dh_t)^T dy_t                      (a VJP of the readouts)
    lambda_t  = nu_t + g_t = prev(nu) + g_t            (dL/dh_t)
    nu_{t-1}  = A_t^T nu_t + A_t^T g_t                 (the backward state update)

so nu starts at dh_final and ends at dL/dh_{-1}, the gradient of the initial state. A readout
of prev(S) (h_{t-1}) adds its VJP p_t after the transposed transition, nu_{t-1} = A_t^T (nu_t
+ g_t) + p_t (symmetric kinds: p_t joins the injected term). The
gradients of the inputs are VJPs of the readouts (cotangent dy_t) and of the transition
expressions A_t(h_{t-1}) + b_t (cotangent lambda_t); for inputs without a time dim the
backward outputs per-step contributions, which the caller sums over each chunk. The backward
is an ordinary recurrence: it reads the forward inputs, dy, and the forward states h_t and
h_{t-1} (recomputed chunk by chunk by the caller, see scancc.autograd), all reversed in time.

For the symmetric structures (identity, scalar, diagonal, householder: A^T = A) the backward
state has the forward's transition and the injected term A_t^T g_t, an expression. A dplr
transition Diag(w) + a b^T is not symmetric, but its transpose Diag(w) + b a^T is a dplr
again (a and b swapped): its backward state is that dplr, with the injected term A_t^T g_t
as an expression, as for the symmetric ones (so the backward of a dplr state runs on every
backend that runs a dplr state, no adjoint-step kind needed). Shift,
companion and dense are not symmetric: their backward state uses the adjoint-step kinds
(``shift_adjoint``, ``companion_adjoint``, ``dense_adjoint``: h_t = A_t^T (h_{t-1} + b_t)) with
the injected term g_t, so nu_{t-1} = A_t^T (nu_t + g_t) needs no expression for A^T g.

Cascades (a state's inject/operands read state(j) of an earlier state or prev(j) of any):
the composed step is block lower-triangular, so its transpose runs the other way: the
cotangent lambda^k_t of a state flows, by the VJP of its step, into lambda^j_t of each state
whose state(j) it read and into nu^j_{t-1} of each state whose prev(j) it read; the lambdas
are built last state first and the backward states (which then read prev(nu^k)) are declared
in reverse order. A selection state, its choice e_t held fixed (piecewise constant: no
gradient through score/valid/keys/filled), is the diagonal h_t = (1 - e_t) h_{t-1} + e_t b_t;
its backward state is diagonal(1 - e_t), the item written gets sum_axis e_t lambda_t, and e_t
is recomputed from the forward states (``selection_choice``, one let of the backward).

Packed variable-length batches (ir/segments.py) need nothing here: the forward's reset at a
sequence's first step cuts h_{t-1} from the transition, so nu crossing the boundary in
reverse time is cut too. The caller (scancc/varlen.py) runs this backward as a packed call
on the reversed boundaries (``segments.reversed_cu``), each reversed sequence's nu starting
at its d final state and ending at its d initial state, and feeds h_{t-1} = the sequence's
initial state at its first step.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import IRError
from ..expr import (L2NORM_EPS, Node, Op, const, cos, exp, iota, sigmoid, sin, size, sqrt, step,
                    ungroup)
from ..expr import sum as rsum
from ..expr import max as rmax
from ..recurrence import (ADJOINT_KIND, Input, Kind, Let, Output, Recurrence, State, Transition,
                          adjoint_step, diagonal, identity)
from .flips import sink_flips_in
from .lets import inline_lets_in
from .rewrite import substitute
from ..verify import verify

SYMMETRIC = {Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL, Kind.HOUSEHOLDER}
# kinds whose A h is an expression (h_t is recomputed from h_{t-1}) and whose transpose is a
# transition of a kind in this set (inject-after adjoint: nu_{t-1} = A^T nu_t + A^T g_t)
EXPRESSED = SYMMETRIC | {Kind.DPLR}
# selection: with the choice held fixed, h_t = (1 - e_t) h_{t-1} + e_t b_t (e_t one-hot along
# the axis, or 0), a diagonal transition; its adjoint is that diagonal, e_t recomputed from the
# forward states (``selection_choice``), and no gradient through the choice
DERIVED = EXPRESSED | set(ADJOINT_KIND) | {Kind.SELECTION}   # kinds whose adjoint is derived
AFTER = EXPRESSED | {Kind.SELECTION}   # backward in the inject-after form (nu_{t-1} = A^T ... + p)


@dataclass(frozen=True)
class Adjoint:
    forward: Recurrence
    backward: Recurrence          # runs on time-reversed sequences
    states_view: Recurrence       # the forward with every state sequence as an output
    cotangent: dict               # forward output -> backward input holding its dy
    state_seq: dict               # forward state -> (backward input of h_t, of h_{t-1})
    adjoint_state: dict           # forward state -> backward state nu
    grad: dict                    # forward input -> backward output of its gradient


def _is(n: Node | None, v: float) -> bool:
    return n is not None and n.op is Op.CONST and n.arg == v


def _add(a, b):
    return b if a is None else a if b is None else a + b


def _mul(a, b):
    if _is(a, 1.0):
        return b
    if _is(b, 1.0):
        return a
    return a * b


class _Ctx:
    """dims_of for nodes of the backward recurrence while it is being built."""

    def __init__(self, dims, inputs, states, lets=()):
        self.rec = Recurrence("adjoint_ctx", dims, tuple(inputs), tuple(lets),
                              tuple(State(s, d, identity(), const(0.0)) for s, d in states), ())

    def dims(self, n: Node):
        return self.rec.dims_of(n)


def _unbroadcast(ctx: _Ctx, contrib: Node, like: Node) -> Node:
    extra = tuple(d for d in ctx.dims(contrib) if d not in ctx.dims(like))
    return rsum(contrib, extra) if extra else contrib


def _local_vjp(n: Node, c: Node) -> list[tuple[Node, Node]]:
    """(operand, cotangent contribution) pairs for node n given its cotangent c."""
    op, s = n.op, n.src
    if op is Op.ADD:
        return [(s[0], c), (s[1], c)]
    if op is Op.SUB:
        return [(s[0], c), (s[1], -c)]
    if op is Op.MUL:
        return [(s[0], _mul(c, s[1])), (s[1], _mul(c, s[0]))]
    if op is Op.DIV:
        return [(s[0], c / s[1]), (s[1], -(c * s[0]) / (s[1] * s[1]))]
    if op is Op.NEG:
        return [(s[0], -c)]
    if op is Op.EXP:
        return [(s[0], c * n)]
    if op is Op.EXPM1:
        return [(s[0], c * exp(s[0]))]
    if op is Op.LOG:
        return [(s[0], c / s[0])]
    if op is Op.SOFTPLUS:
        return [(s[0], c * sigmoid(s[0]))]
    if op is Op.SIGMOID:
        return [(s[0], c * n * (1.0 - n))]
    if op is Op.LOGSIGMOID:
        return [(s[0], c * sigmoid(-s[0]))]
    if op is Op.SILU:
        sg = sigmoid(s[0])
        return [(s[0], c * (sg + s[0] * sg * (1.0 - sg)))]
    if op is Op.SQRT:
        return [(s[0], c * 0.5 / n)]
    if op is Op.RSQRT:
        return [(s[0], c * -0.5 * n / s[0])]
    if op is Op.CLAMP:
        lo, hi = n.arg
        m = c
        if lo is not None:
            m = m * step(s[0] - lo)
        if hi is not None:
            m = m * step(hi - s[0])
        return [(s[0], m)]
    if op in (Op.MAXIMUM, Op.MINIMUM):
        first = step(s[0] - s[1]) if op is Op.MAXIMUM else step(s[1] - s[0])
        return [(s[0], c * first), (s[1], c * (1.0 - first))]
    if op is Op.STEP:
        return []
    if op is Op.COS:
        return [(s[0], -(c * sin(s[0])))]
    if op is Op.SIN:
        return [(s[0], c * cos(s[0]))]
    if op is Op.ABS:  # sign(x), with sign(0) = +1 (a subgradient)
        return [(s[0], c * (2.0 * step(s[0]) - 1.0))]
    if op is Op.TANH:
        return [(s[0], c * (1.0 - n * n))]
    if op is Op.SUM:
        return [(s[0], c)]  # broadcasting by name puts c back on the reduced dims
    if op is Op.MAX:
        return [(s[0], c * step(s[0] - n))]
    if op is Op.L2NORM:
        r = sqrt(rsum(s[0] * s[0], n.arg) + L2NORM_EPS)
        return [(s[0], (c - n * rsum(c * n, n.arg)) / r)]
    if op is Op.SOFTMAX:
        return [(s[0], n * (c - rsum(n * c, n.arg)))]  # a mask has no gradient
    if op is Op.JSOFTMAX:  # w_k = joint weights of part k: dl_i = [i = k] w_k c - w_i r
        k, ds = n.arg
        r = rsum(n * c, ds[k])
        return [(s[2 * i], n * c - n * r if i == k else -(Node(Op.JSOFTMAX, s, (i, ds)) * r))
                for i in range(len(ds))]  # the masks have no gradient
    if op is Op.FLIP:
        return [(s[0], Node(Op.FLIP, (c,), n.arg))]
    if op is Op.GROUP:
        g, d = n.arg
        return [(s[0], ungroup(c, d, g))]
    if op is Op.UNGROUP:
        d, g = n.arg
        return [(s[0], Node(Op.GROUP, (c,), (g, d)))]
    if op in (Op.CONST, Op.IOTA, Op.SIZE):
        return []
    if op is Op.PARAM:  # only a backward's own let (a selection's choice): no gradient
        return []
    raise IRError(f"adjoint: no VJP rule for op {op.value!r}")


def vjp(ctx: _Ctx, roots: list[tuple[Node, Node]], wrt: set[Node]) -> dict[Node, Node]:
    """Reverse-mode over the expression DAG: the cotangent of every node in ``wrt``."""
    order: list[Node] = []
    seen: set[Node] = set()
    for root, _ in roots:
        for n in root.walk():
            if n not in seen:
                seen.add(n)
                order.append(n)
    # walk() yields sources before users, and a node seen in an earlier root keeps its place,
    # so `order` is topological over all roots
    cot: dict[Node, Node] = {}
    for root, c in roots:
        cot[root] = _add(cot.get(root), _unbroadcast(ctx, c, root))
    for n in reversed(order):
        c = cot.get(n)
        if c is None or n in wrt or n.op in (Op.INPUT, Op.STATE, Op.PREV):
            continue
        for s, contrib in _local_vjp(n, c):
            cot[s] = _add(cot.get(s), _unbroadcast(ctx, contrib, s))
    return {n: cot[n] for n in wrt if n in cot}


def apply_transition(t: Transition, h: Node, ops: dict[str, Node]) -> Node:
    """A_t h as an expression, for the kinds in EXPRESSED (A_t^T h: apply the transposed
    transition, ``adjoint_step(t)``, with its operands)."""
    if t.kind is Kind.IDENTITY:
        return h
    if t.kind in (Kind.SCALAR, Kind.DIAGONAL):
        return ops["decay"] * h
    if t.kind is Kind.HOUSEHOLDER:
        k = ops["k"]
        out = h - ops["beta"] * k * rsum(k * h, t.axis)
        return ops["alpha"] * out if "alpha" in ops else out
    if t.kind is Kind.DPLR:
        low = ops["a"] * rsum(ops["b"] * h, t.axis)
        return (ops["w"] * h if "w" in ops else h) + low
    raise IRError(f"{t.kind.value} is not a transition applied as an expression")


def newest(axis: str) -> Node:
    """1 at the newest slot of a shift axis (the last), 0 elsewhere."""
    return step(iota(axis) - (size(axis) - 1.0))


def step_expr(t: Transition, ops: dict[str, Node], inject: Node, h_now: Node, h_before: Node,
              ) -> Node:
    """h_t = A_t h_{t-1} + b_t as an expression of the operands, the inject and the states
    (inputs of the backward), for the VJP w.r.t. the operands and the inject. ``h_before`` of a
    dense state is indexed by the column dim (see ``derive``)."""
    if t.kind in EXPRESSED:
        return apply_transition(t, h_before, ops) + inject
    if t.kind is Kind.SHIFT:           # the slots but the newest hold constants
        return newest(t.axis) * inject
    if t.kind is Kind.COMPANION:       # shifted h_{t-1} = h_t off the newest slot
        shifted = (1.0 - newest(t.axis)) * h_now
        return newest(t.axis) * (rsum(ops["feedback"] * shifted, (t.axis,)) + inject)
    if t.kind is Kind.DENSE:
        return rsum(ops["matrix"] * h_before, (t.col,)) + inject
    raise IRError(f"the adjoint of a {t.kind.value} transition is not derived")


def _is_zero(x: Node) -> Node:
    """1 where x == 0, else 0 (step(x) = [x >= 0])."""
    return step(x) * step(-x)


def _first(mask: Node, axis: str) -> Node:
    """One-hot of the lowest slot along ``axis`` where the 0/1 ``mask`` is 1 (0 if none)."""
    rank = mask * (size(axis) - iota(axis))          # m - i at the masked slots: the lowest wins
    return mask * step(rank - rmax(rank, (axis,)))


def selection_choice(axis: str, ops: dict[str, Node]) -> Node:
    """e_t, the selection's choice as an expression (1 at the slot the incoming item fills,
    0 elsewhere; all 0 if it fills none) of its operands, exactly the rule of Kind.SELECTION:
    the lowest free slot (filled == 0), else, if score > the smallest stored key, the lowest
    slot holding it; nothing when valid == 0. Built of step/max/iota only (every backend
    lowers them; all exact in floating point), so the backward recomputes it from the forward
    states it reads and no backend needs a rule for it."""
    free = _is_zero(ops["filled"])
    low = -rmax(-ops["keys"], (axis,))                # the smallest stored key
    replace = 1.0 - step(low - ops["score"])          # score > low
    at_low = step(low - ops["keys"])                  # keys == low
    pick = _first(free, axis) + (1.0 - rmax(free, (axis,))) * replace * _first(at_low, axis)
    return (1.0 - _is_zero(ops["valid"])) * pick


def derive(rec: Recurrence) -> Adjoint:
    """The backward recurrence of ``rec`` (see the module docstring)."""
    for s in rec.states:
        if s.transition.kind not in DERIVED:
            raise IRError(f"recurrence {rec.name!r}, state {s.name!r}: the adjoint of a "
                          f"{s.transition.kind.value} transition is not derived (derived: "
                          f"{', '.join(sorted(k.value for k in DERIVED))})")
    # readouts of prev(S) (the state entering the step): their VJP p_t (w.r.t. h_{t-1}) is
    # added after the transposed transition, nu_{t-1} = A_t^T (nu_t + g_t) + p_t: an
    # expression for the symmetric kinds (and selection), not derived for the adjoint-step kinds
    read_prev = {n.arg for o in rec.outputs for n in inline_lets_in(rec, o.expr, {}).walk()
                 if n.op is Op.PREV}
    for s in rec.states:
        if s.name in read_prev and s.transition.kind not in AFTER:
            raise IRError(f"recurrence {rec.name!r}, state {s.name!r}: the adjoint of a "
                          f"readout of prev({s.name}) of a {s.transition.kind.value} state is "
                          "not derived yet")
    time = rec.time
    taken = {d.name for d in rec.dims} | {x.name for x in rec.inputs} | \
        {s.name for s in rec.states} | {o.name for o in rec.outputs} | {l.name for l in rec.lets}

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    cot = {o.name: fresh(f"d_{o.name}") for o in rec.outputs}
    seq = {s.name: (fresh(f"h_{s.name}"), fresh(f"hp_{s.name}")) for s in rec.states}
    nu = {s.name: fresh(f"nu_{s.name}") for s in rec.states}
    grad = {x.name: fresh(f"grad_{x.name}") for x in rec.inputs}
    has_time = {x.name: time in x.dims for x in rec.inputs}

    extra_inputs = [Input(cot[o.name], o.dims) for o in rec.outputs]
    for s in rec.states:
        t = s.transition
        # h_{t-1} of a dense state is read along the column dim: the same array, its axis
        # dim renamed (the matrix contracts it)
        before = tuple(t.col if t.kind is Kind.DENSE and d == t.axis else d for d in s.dims)
        extra_inputs += [Input(seq[s.name][0], (time,) + s.dims),
                         Input(seq[s.name][1], (time,) + before)]
    # a cascaded state's own h_{t-1} in its step, kept apart from its reads of prev() while
    # the cotangents of those reads are taken (a placeholder, substituted back)
    own_prev = {s: fresh(f"own_{s}") for s in rec.cascaded}
    before_dims = {x.name: x.dims for x in extra_inputs}
    placeholders = [Input(own_prev[s], before_dims[seq[s][1]]) for s in own_prev]
    ctx_states = [(nu[s.name], s.dims) for s in rec.states]
    ctx = _Ctx(rec.dims, list(rec.inputs) + extra_inputs + placeholders, ctx_states)

    memo: dict = {}
    inl = lambda n: inline_lets_in(rec, n, memo)  # noqa: E731
    h_now = {Node(Op.STATE, (), s.name): Node(Op.INPUT, (), seq[s.name][0]) for s in rec.states}
    h_prev = {Node(Op.PREV, (), s.name): Node(Op.INPUT, (), seq[s.name][1]) for s in rec.states}
    reads = {**h_now, **h_prev}   # a state read (readouts, cascades) -> the recomputed sequence
    outs = [(substitute(inl(o.expr), reads), Node(Op.INPUT, (), cot[o.name]))
            for o in rec.outputs]
    g = vjp(ctx, outs, set(h_now.values()) | set(h_prev.values()))
    now_in = {s.name: Node(Op.INPUT, (), seq[s.name][0]) for s in rec.states}
    prev_in = {s.name: Node(Op.INPUT, (), seq[s.name][1]) for s in rec.states}

    # the operands and injected terms, their state reads (a cascade) on the state sequences
    ops, inj, choice = {}, {}, {}
    choice_of: dict = {}
    choice_lets: list[Let] = []
    for s in rec.states:
        t = s.transition
        ops[s.name] = {k: substitute(inl(v), reads) for k, v in t.operands}
        inj[s.name] = substitute(inl(s.inject), reads)
        if t.kind is Kind.SELECTION:
            # one let per choice (the states that share the operands share it): the
            # backward reads it like a constant (no gradient through the choice)
            key = (t.axis, tuple(sorted(ops[s.name].items(), key=lambda kv: kv[0])))
            if key not in choice_of:
                name = fresh(f"choice_{s.name}")
                choice_lets.append(Let(name, selection_choice(t.axis, ops[s.name])))
                choice_of[key] = Node(Op.PARAM, (), name)
            choice[s.name] = choice_of[key]
    if choice_lets:
        ctx = _Ctx(rec.dims, list(rec.inputs) + extra_inputs + placeholders, ctx_states,
                   choice_lets)

    def step_root(s: State, hp: Node) -> tuple[Node, Node]:
        """(h_t as an expression of what the step reads, its cotangent lambda_t): a
        selection's only differentiable path is its item, written at e_t (the choice, held
        fixed: no root through score/valid/keys/filled)."""
        t = s.transition
        if t.kind is Kind.SELECTION:   # the item's cotangent: sum over the axis of e_t lambda_t
            return inj[s.name], _mul(choice[s.name], lam[s.name])
        return step_expr(t, ops[s.name], inj[s.name], now_in[s.name], hp), lam[s.name]

    # Cascades (block lower-triangular A): lambda^j_t = nu^j_t + g^j_t + c^j_t, where c^j_t is
    # the cotangent from the later states' steps that read state(j) (their lambda^k_t, k > j),
    # and nu^j_{t-1} gets q^j_t, the cotangent from the steps that read prev(j). The lambdas
    # are built last state first, so each c^j is complete when lambda^j is built; the
    # backward state nu^j reads prev(nu^k) of the states k that read it.
    cascaded = set(rec.cascaded)
    c: dict[str, Node] = {}
    q: dict[str, Node] = {}
    lam: dict[str, Node] = {}
    gsum: dict[str, Node | None] = {}
    for s in reversed(rec.states):
        gsum[s.name] = _add(g.get(now_in[s.name]), c.get(s.name))
        lam[s.name] = _add(Node(Op.PREV, (), nu[s.name]), gsum[s.name])
        if s.name not in cascaded:
            continue
        # the state's own h_{t-1} (its transition) stands apart from its reads of prev(S)
        own = Node(Op.INPUT, (), own_prev[s.name])
        root = step_root(s, own)
        wrt = {now_in[r.name] for r in rec.states if r.name != s.name} | set(prev_in.values())
        cross = vjp(ctx, [root], wrt)
        for r in rec.states:
            if now_in[r.name] in cross:
                c[r.name] = _add(c.get(r.name), substitute(cross[now_in[r.name]],
                                                           {own: prev_in[s.name]}))
            if prev_in[r.name] in cross:
                q[r.name] = _add(q.get(r.name), substitute(cross[prev_in[r.name]],
                                                           {own: prev_in[s.name]}))

    roots = list(outs)
    states = []
    for s in rec.states:
        t = s.transition
        roots.append(step_root(s, prev_in[s.name]))
        gs = gsum[s.name]
        ps = _add(g.get(prev_in[s.name]), q.get(s.name))   # + p_t: the VJP w.r.t. prev(S)
        if t.kind is Kind.SELECTION:   # nu_{t-1} = (1 - e_t) (nu_t + g_t) + p_t
            keep = 1.0 - choice[s.name]
            bt = diagonal(keep)
            inject = _add(keep * gs if gs is not None else None, ps)
        elif t.kind in EXPRESSED:   # nu_{t-1} = A^T nu_t + A^T g_t, with A^T g_t an expression
            bt = adjoint_step(Transition(t.kind, t.axis, tuple((k, ops[s.name][k])
                                                               for k, _ in t.operands), t.col))
            inject = apply_transition(bt, gs, dict(bt.operands)) if gs is not None else None
            inject = _add(inject, ps)
        else:                     # the adjoint step adds g_t first: A^T (nu_t + g_t)
            if ps is not None:
                raise IRError(f"recurrence {rec.name!r}, state {s.name!r}: the adjoint of a "
                              f"read of prev({s.name}) by a cascaded state of a "
                              f"{t.kind.value} state is not derived yet")
            bt = adjoint_step(Transition(t.kind, t.axis, tuple((k, ops[s.name][k])
                                                               for k, _ in t.operands), t.col))
            inject = gs
        states.append(State(nu[s.name], s.dims, bt, const(0.0) if inject is None else inject))
    if cascaded:   # nu^j reads prev(nu^k) of the later states k: declare those first
        states.reverse()
    leaves = {Node(Op.INPUT, (), x.name) for x in rec.inputs}
    grads = vjp(ctx, roots, leaves)

    # h_t of a symmetric (or dplr) state is recomputed from h_{t-1} in the backward (A_t h_{t-1} + b_t,
    # elementwise or one reduction), so the backward reads one state sequence, not two
    recompute = {now_in[s.name]: apply_transition(s.transition, prev_in[s.name], ops[s.name])
                 + inj[s.name]
                 for s in rec.states if s.transition.kind in EXPRESSED and s.name not in cascaded}
    smemo: dict = {}
    outputs, flips = [], {}

    def finish(n: Node) -> Node:
        return sink_flips_in(ctx.dims, substitute(n, recompute, smemo), flips)

    def finish_transition(st: State) -> Transition:
        t = st.transition
        if not any(n.op is Op.INPUT and n in recompute for _, e in t.operands for n in e.walk()):
            return t
        return Transition(t.kind, t.axis, tuple((k, finish(e)) for k, e in t.operands), t.col)

    states = [State(st.name, st.dims, finish_transition(st), finish(st.inject)) for st in states]
    lets = tuple(Let(l.name, finish(l.expr)) for l in choice_lets)
    for x in rec.inputs:
        gx = grads.get(Node(Op.INPUT, (), x.name), const(0.0))
        gx = _unbroadcast(ctx, gx, Node(Op.INPUT, (), x.name))
        # an input without a time dim gets its per-step contributions, summed by the caller
        # (per chunk, so this costs chunk x |x|, never T x |x|)
        outputs.append(Output(grad[x.name], x.dims if has_time[x.name] else (time,) + x.dims,
                              finish(gx)))
    exprs = [st.inject for st in states] + [o.expr for o in outputs] + \
        [n for st in states for _, n in st.transition.operands] + [l.expr for l in lets]
    used = {n.arg for r in exprs for n in r.walk() if n.op is Op.INPUT}
    inputs = tuple(x for x in list(rec.inputs) + extra_inputs if x.name in used)
    backward = verify(Recurrence(f"{rec.name}_bwd", rec.dims, inputs, lets, tuple(states),
                                 tuple(outputs), rec.numerics,
                                 f"backward of {rec.name} (run on time-reversed sequences)"))
    # the forward outputs stay, so every input is still used (and the IR verifies)
    view_outs = rec.outputs + tuple(
        Output(seq[s.name][0], (time,) + s.dims, Node(Op.STATE, (), s.name)) for s in rec.states)
    states_view = verify(Recurrence(f"{rec.name}_states", rec.dims, rec.inputs, rec.lets,
                                    rec.states, view_outs, rec.numerics))
    return Adjoint(rec, backward, states_view, cot, seq, nu, grad)


__all__ = ["Adjoint", "derive", "vjp", "apply_transition", "step_expr", "selection_choice",
           "SYMMETRIC", "EXPRESSED", "DERIVED", "AFTER"]
