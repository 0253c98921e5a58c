"""The NKI backend's lowering rules: one function per IR op and per transition kind.

``OP_RULES`` (keyed by ``scancc.ir.Op``) lowers one expression node to a value (``values.V``):
``rule(R, node, env, scope, info) -> V`` with ``R`` the emitter (``lowering.Renderer``), ``env``
the loop index of each dim, ``scope`` where the value is placed and ``info`` the node's analysis
(varies along partitions, along time, is a trace-time constant, loop scopes used).

``ANALYSIS_RULES`` (the same keys as ``OP_RULES``) gives the ``info`` of a node: what it
varies along and which loops it depends on, which decides where its code is placed.

``TRANSITION_RULES`` (keyed by ``scancc.ir.Kind``) lowers one state's update over a time tile:
``rule(R, state, env, scope)``, allocating and writing the state's trajectory ``traj_S`` (or a
shift register's history ``hist_S``) and refreshing its carry; ``plan.STORAGE`` counts the
same tiles statically.

A missing entry raises ``UnsupportedError`` naming the op or kind, the backend and the
recurrence (``Rules.lookup``). The chunked form's own expression lowerer (time on the
partitions) has a registry with the same keys, ``chunked.CHUNK_OP_RULES``; both take the
instruction text of elementwise ops from the tables here.
"""
from __future__ import annotations

import math

from scancc.ir import Kind, Node, Op
from scancc.ir.passes.canonical import l2norm_expr
from scancc.ir.passes.softmax import joint_softmax_expr

from ..rules import Rules
from .values import Idx, V, fmt

OP_RULES = Rules("nki", "op")
TRANSITION_RULES = Rules("nki", "transition")

# ---- instruction text of elementwise ops, shared by both expression lowerers ----

# activation-engine functions
ACT = {Op.EXP: "exp", Op.LOG: "log", Op.SOFTPLUS: "softplus", Op.SIGMOID: "sigmoid",
       Op.SILU: "silu", Op.SQRT: "sqrt", Op.RSQRT: "rsqrt",
       Op.COS: "cos", Op.SIN: "sin", Op.ABS: "abs", Op.TANH: "tanh"}
# Vector-engine ALU ops
ALU = {Op.ADD: "add", Op.SUB: "subtract", Op.MUL: "multiply", Op.DIV: "divide",
       Op.MAXIMUM: "maximum", Op.MINIMUM: "minimum"}
# the same ops on trace-time constants (Python expressions)
PY_UNARY = {Op.NEG: "(-{0})", Op.EXP: "math.exp({0})", Op.LOG: "math.log({0})",
            Op.SOFTPLUS: "math.log1p(math.exp({0}))",
            Op.SIGMOID: "(1.0 / (1.0 + math.exp(-{0})))",
            Op.LOGSIGMOID: "(-math.log1p(math.exp(-{0})))",
            Op.SILU: "({0} / (1.0 + math.exp(-{0})))", Op.SQRT: "math.sqrt({0})",
            Op.RSQRT: "(1.0 / math.sqrt({0}))", Op.STEP: "(1.0 if {0} >= 0.0 else 0.0)",
            Op.COS: "math.cos({0})", Op.SIN: "math.sin({0})", Op.ABS: "abs({0})",
            Op.TANH: "math.tanh({0})"}
# the ones whose constant form calls the math module (the kernel then imports it)
PY_MATH = frozenset(set(PY_UNARY) - {Op.NEG, Op.STEP, Op.ABS})
PY_BINARY = {Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})",
             Op.DIV: "({0} / {1})", Op.MAXIMUM: "max({0}, {1})", Op.MINIMUM: "min({0}, {1})"}


def _clamp_ops(arg) -> list[tuple[str, float]]:
    lo, hi = arg
    return [(o, b) for o, b in (("maximum", lo), ("minimum", hi)) if b is not None]


def const_unary(op: Op, arg, x: str) -> str:
    """``op`` of the trace-time constant expression ``x``."""
    if op is Op.CLAMP:
        for alu, b in _clamp_ops(arg):
            x = f"{'max' if alu == 'maximum' else 'min'}({x}, {fmt(b)})"
        return x
    return PY_UNARY[op].format(x)


def _clamp_lines(dst: str, src: str, arg) -> list[str]:
    ops = _clamp_ops(arg)
    extra = f", op1=nl.{ops[1][0]}, operand1={fmt(ops[1][1])}" if len(ops) > 1 else ""
    return [f"nisa.tensor_scalar({dst}, {src}, nl.{ops[0][0]}, {fmt(ops[0][1])}{extra})"]


def _act_lines(fn: str):
    return lambda dst, src, arg: [f"nisa.activation({dst}, nl.{fn}, {src})"]


# unary op -> the instructions writing op(src) into dst (views of tiles of one shape)
UNARY_LINES = {
    Op.NEG: lambda dst, src, arg: [f"nisa.tensor_scalar({dst}, {src}, nl.multiply, -1.0)"],
    Op.CLAMP: _clamp_lines,
    # logsigmoid(x) = -softplus(-x)
    Op.LOGSIGMOID: lambda dst, src, arg: [
        f"nisa.activation({dst}, nl.softplus, {src}, scale=-1.0)",
        f"nisa.tensor_scalar({dst}, {dst}, nl.multiply, -1.0)"],
    # 1.0 where x >= 0 else 0.0: an ALU compare
    Op.STEP: lambda dst, src, arg: [f"nisa.tensor_scalar({dst}, {src}, nl.greater_equal, 0.0)"],
    **{op: _act_lines(fn) for op, fn in ACT.items()},
}


# ---- analysis rules: (varies along partitions, varies along time, is a trace-time
# constant, loop scopes used) of a node under an env; rule(R, node, env) ----

ANALYSIS_RULES = Rules("nki", "analysis")


@ANALYSIS_RULES.register(Op.CONST, Op.SIZE)
def _const_analysis(R, node, env):
    return False, False, True, frozenset()


@ANALYSIS_RULES.register(Op.IOTA)
def _iota_analysis(R, node, env):
    if node.arg == R.pd:
        return True, False, False, frozenset({R.pd_scope.sid})
    return False, False, True, env[node.arg].deps


@ANALYSIS_RULES.register(Op.INPUT, Op.STATE, Op.PREV)
def _leaf_analysis(R, node, env):
    """An input varies along time if it has the time dim; a state always does."""
    is_input = node.op is Op.INPUT
    dims = R.rec.input(node.arg).dims if is_input else R.rec.state(node.arg).dims
    deps = frozenset().union(*(env[d].deps for d in dims if d in env))
    haspd, hast = R.pd in dims, not is_input or R.time in dims
    # a state is written inside the partition loop (even one without the partition dim): a
    # value read from it is placed there too
    return haspd, hast, False, deps | (frozenset({R.pd_scope.sid}) if haspd or not is_input
                                       else frozenset()) \
        | (frozenset({R.time_scope.sid}) if hast else frozenset())


@ANALYSIS_RULES.register(Op.PARAM)
def _param_analysis(R, node, env):
    return R.analyze(R.lets[node.arg], env)


@ANALYSIS_RULES.register(Op.SUM, Op.MAX)
def _reduce_analysis(R, node, env):
    sub = dict(env)
    for d in node.arg:
        if d != R.pd:
            sub[d] = Idx("?", frozenset())
    p, t, c, deps = R.analyze(node.src[0], sub)
    return p and R.pd not in node.arg, t, c, deps


@ANALYSIS_RULES.register(Op.GROUP)
def _group_analysis(R, node, env):
    p, t, c, deps = R.analyze(node.src[0], R.group_env(node, env))
    if R.gathers(node, env):
        return True, t, False, deps | {R.pd_scope.sid}
    return p, t, c, deps


@ANALYSIS_RULES.register(Op.FLIP)
def _flip_analysis(R, node, env):
    return R.analyze(node.src[0], R.flip_env(node, env))


@ANALYSIS_RULES.register(Op.UNGROUP)
def _ungroup_analysis(R, node, env):
    d, g = node.arg
    p, t, c, deps = R.analyze(node.src[0], {**env, d: Idx("?", frozenset())})
    return p and d != R.pd, t, c, deps | (env[g].deps if g in env else frozenset())


@ANALYSIS_RULES.register(Op.L2NORM)
def _l2norm_analysis(R, node, env):
    """As its expansion (the l2norm rule lowers that)."""
    return R.analyze(l2norm_expr(node.src[0], node.arg), env)


@ANALYSIS_RULES.register(Op.JSOFTMAX)
def _joint_softmax_analysis(R, node, env):
    """As its expansion (the plan's canonicalize desugars it; the rule lowers that)."""
    return R.analyze(joint_softmax_expr(node), env)


@ANALYSIS_RULES.register(*UNARY_LINES, *ALU, Op.EXPM1, Op.SOFTMAX)
def _elementwise_analysis(R, node, env):
    """What any source varies along; constant if all are."""
    rs = [R.analyze(s, env) for s in node.src]
    return (any(r[0] for r in rs), any(r[1] for r in rs), all(r[2] for r in rs),
            frozenset().union(*(r[3] for r in rs)))


# ---- op rules: leaves ----

@OP_RULES.register(Op.L2NORM)
def _l2norm_rule(R, node, env, sc, info) -> V:
    """``l2norm(x, d)`` as ``x * rsqrt(sum(x * x, d) + L2NORM_EPS)``: the expansion of
    ``scancc.ir.passes.canonical.l2norm_expr`` (one epsilon), lowered by the rules of its ops."""
    return R.value(l2norm_expr(node.src[0], node.arg), env, sc)


@OP_RULES.register(Op.JSOFTMAX)
def _joint_softmax_rule(R, node, env, sc, info) -> V:
    """``joint_softmax`` as ``scancc.ir.passes.softmax.joint_softmax_expr`` (masked max, exp,
    sums), lowered by the rules of its ops (canonicalize desugars it before planning)."""
    return R.value(joint_softmax_expr(node), env, sc)


@OP_RULES.register(Op.CONST)
def _const_rule(R, node, env, sc, info) -> V:
    return V("const", fmt(node.arg))


@OP_RULES.register(Op.SIZE)
def _size_rule(R, node, env, sc, info) -> V:
    return V("const", fmt(R.sizes[node.arg]))


@OP_RULES.register(Op.IOTA)
def _iota_rule(R, node, env, sc, info) -> V:
    if node.arg != R.pd:
        return V("const", f"float({env[node.arg].expr})")
    v = R.tile(sc, "col")
    R.emit(sc, f"nisa.iota({v.view()}, [[0, 1]], offset=p0, channel_multiplier=1)")
    return v


@OP_RULES.register(Op.INPUT)
def _input_rule(R, node, env, sc, info) -> V:
    return R.load(node, env, sc)


@OP_RULES.register(Op.STATE)
def _state_rule(R, node, env, sc, info) -> V:
    a = node.arg
    s = R.rec.state(a)
    kind = "full" if R.pd in s.dims else "row"
    if s.transition.kind is Kind.SHIFT:  # slot j at step t is hist[:, rest, t + j]
        dims = R.inner_dims(s)
        rest = R.flat_of(dims[1:], env)
        return V(kind, f"hist_{a}", mid=f"{rest}, ", coff=f"({env[dims[0]].expr})")
    # with prev(S) read, column 0 of the trajectory is the state entering the tile
    return V(kind, f"traj_{a}", mid=f"{R.flat_index(s, env)}, ",
             coff="1" if a in R.prevs else "")


@OP_RULES.register(Op.PREV)
def _prev_rule(R, node, env, sc, info) -> V:
    """The state entering each step: the trajectory one column back."""
    a = node.arg
    s = R.rec.state(a)
    if s.transition.kind is Kind.SHIFT or a in R.chunks:
        R.fail(f"prev({a}) of a {s.transition.kind.value} state")
    kind = "full" if R.pd in s.dims else "row"
    return V(kind, f"traj_{a}", mid=f"{R.flat_index(s, env)}, ")


@OP_RULES.register(Op.PARAM)
def _param_rule(R, node, env, sc, info) -> V:
    return R.value(R.lets[node.arg], env, sc)


# ---- op rules: dim-structured ----

@OP_RULES.register(Op.GROUP)
def _group_rule(R, node, env, sc, info) -> V:
    if R.gathers(node, env):
        return R.gather(node, env, sc, info)
    return R.value(node.src[0], R.group_env(node, env), sc)


@OP_RULES.register(Op.FLIP)
def _flip_rule(R, node, env, sc, info) -> V:
    return R.value(node.src[0], R.flip_env(node, env), sc)


@OP_RULES.register(Op.UNGROUP)
def _ungroup_rule(R, node, env, sc, info) -> V:
    return R.ungroup(node, env, sc, info)


@OP_RULES.register(Op.SUM, Op.MAX)
def _reduce_rule(R, node, env, sc, info) -> V:
    return R.reduce(node, env, sc, info)


@OP_RULES.register(Op.SOFTMAX)
def _softmax_rule(R, node, env, sc, info) -> V:
    return R.softmax(node, env, sc)


# ---- op rules: elementwise ----

@OP_RULES.register(Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAXIMUM, Op.MINIMUM)
def _binary_rule(R, node, env, sc, info) -> V:
    return R.binary(node.op, R.value(node.src[0], env, sc), R.value(node.src[1], env, sc),
                    sc, node)


@OP_RULES.register(Op.NEG, Op.CLAMP, Op.LOGSIGMOID, Op.STEP, Op.LOG, Op.SOFTPLUS, Op.SIGMOID,
                   Op.SILU, Op.SQRT, Op.RSQRT, Op.COS, Op.SIN, Op.ABS, Op.TANH)
def _unary_rule(R, node, env, sc, info) -> V:
    x = R.value(node.src[0], env, sc)
    if x.kind == "const":
        R.uses_math |= node.op in PY_MATH
        return V("const", const_unary(node.op, node.arg, x.ref))
    out = R.tile(sc, x.kind)
    for line in UNARY_LINES[node.op](out.view(), x.view(), node.arg):
        R.emit(sc, line)
    return out


@OP_RULES.register(Op.EXP)
def _exp_rule(R, node, env, sc, info) -> V:
    src = node.src[0]
    if src.op is Op.MUL:
        # exp(x * s) with s per partition: one activation with a (P, 1) scale
        va, vb = R.value(src.src[0], env, sc), R.value(src.src[1], env, sc)
        for x, s in ((va, vb), (vb, va)):
            if s.kind in ("col", "const") and x.kind in ("row", "full"):
                x = R.to_kind(x, "full", sc) if s.kind == "col" else x
                out = R.tile(sc, x.kind)
                R.emit(sc, f"nisa.activation({out.view()}, nl.exp, {x.view()}, "
                           f"scale={s.view()})")
                return out
    return _unary_rule(R, node, env, sc, info)


@OP_RULES.register(Op.EXPM1)
def _expm1_rule(R, node, env, sc, info) -> V:
    """exp(x) - 1 without float32 cancellation for small |x| (s4d's (exp(dt A) - 1) / A
    and its derivative; the plan's ``canonicalize`` writes them expm1): Kahan's
    (u - 1) x / log(u) with u = exp(x), on x and u clamped to |x| <= 0.5 so it stays
    finite (u == 1 gives x), and u - 1 where |x| > 0.5. u is the exp(x) the recurrence
    computes anyway (s4d's decay), so it is shared."""
    u = R.value(Node(Op.EXP, node.src), env, sc)
    x = R.value(node.src[0], env, sc)
    if u.kind == "const" or x.kind == "const":
        return R.binary(Op.SUB, u, V("const", "1.0"), sc, node)
    u = R.sbuf(u, sc)
    x = R.sbuf(R.to_kind(x, u.kind, sc), sc)

    def ts(src: V, op0: str, c0: float, op1: str | None = None, c1: float = 0.0) -> V:
        out = R.tile(sc, u.kind)
        extra = f", op1=nl.{op1}, operand1={fmt(c1)}" if op1 else ""
        R.emit(sc, f"nisa.tensor_scalar({out.view()}, {src.view()}, nl.{op0}, "
                   f"{fmt(c0)}{extra})")
        return out

    def tt(a: V, b: V, alu: str, out: V | None = None) -> V:
        out = out or R.tile(sc, u.kind)
        R.emit(sc, f"nisa.tensor_tensor({out.view()}, {a.view()}, {b.view()}, nl.{alu})")
        return out

    um1 = ts(u, "subtract", 1.0)
    xc = ts(x, "maximum", -0.5, "minimum", 0.5)
    uc = ts(u, "maximum", math.exp(-0.5), "minimum", math.exp(0.5))
    one = ts(uc, "equal", 1.0)
    den = R.tile(sc, u.kind)
    R.emit(sc, f"nisa.activation({den.view()}, nl.log, {uc.view()})")
    tt(den, one, "add", den)                      # log(u) + [u == 1]: never 0
    k = ts(uc, "subtract", 1.0)
    tt(k, xc, "multiply", k)
    tt(k, den, "divide", k)
    tt(tt(one, xc, "multiply"), k, "add", k)      # u == 1: x
    big = ts(x, "greater_equal", 0.5)
    tt(big, ts(x, "less", -0.5), "add", big)      # |x| > 0.5: u - 1
    tt(big, tt(um1, k, "subtract"), "multiply", big)
    return tt(k, big, "add", k)


# ---- transition rules ----

@TRANSITION_RULES.register(Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL)
def _scan_rule(R, s, env, sc) -> None:
    """One tensor_tensor_scan per state row and time tile, the carry passed as initial
    (identity: a scan of adds on a zero decay row)."""
    t = s.transition
    R.trajectory(s, sc)
    R.emit(sc, f"# state {s.name}: {t.kind.value}, one tensor_tensor_scan per row, the "
               "carry as initial")
    inner, sub, scopes = R.inner_loops(sc, R.inner_dims(s), env)
    f = R.flat_index(s, sub)
    full = "full" if R.pd in s.dims else "row"
    b = R.value(s.inject, sub, inner)
    b = R.to_kind(b, full, inner)
    r = R.rows(s)
    init = f"carry_{s.name}[0:{r}, {R.slot}, {f}:{f} + 1]"
    c0 = 0
    if s.name in R.prevs:  # column 0: the state entering the tile (for prev(S))
        c0 = 1
        R.emit(inner, f"nisa.tensor_copy(traj_{s.name}[0:{r}, {f}, 0:1], {init})")
    dst = f"traj_{s.name}[0:{r}, {f}, {c0}:tw + {c0}]" if c0 else \
        f"traj_{s.name}[0:{r}, {f}, 0:tw]"
    decay = t.operand("decay") if t.kind is not Kind.IDENTITY else None
    if decay is None:
        R.emit(inner, f"nisa.tensor_tensor_scan({dst}, zeros[0:{r}, 0:tw], {b.view()}, "
                      f"{init}, nl.add, nl.add)")
    else:
        a = R.to_kind(R.value(decay, sub, inner), full, inner)
        if a.psum and b.psum:
            b = R.sbuf(b, inner)
        R.emit(inner, f"nisa.tensor_tensor_scan({dst}, {a.view()}, {b.view()}, {init}, "
                      "nl.multiply, nl.add)")
    last = f"tw - 1 + {c0}:tw + {c0}" if c0 else "tw - 1:tw"
    R.emit(inner, f"nisa.tensor_copy({init}, traj_{s.name}[0:{r}, {f}, {last}])")
    R.closeall(scopes)


@TRANSITION_RULES.register(Kind.SHIFT)
def _shift_rule(R, s, env, sc) -> None:
    """A shift register is a window on its injects: hist[:, rest, u] is the inject of step
    t0 - (A - 1) + u, so slot j at step t is hist[:, rest, t + j]; the first A - 1 columns
    come from the carry, the rest is this tile's inject."""
    t = s.transition
    R.emit(sc, f"# state {s.name}: {t.kind.value} along {t.axis}, copied per slot")
    dims, r, n = R.inner_dims(s), R.rows(s), R.n_inner(s)
    if not dims or dims[0] != t.axis:
        R.fail(f"shift state {s.name!r}: the axis {t.axis!r} must be the first of its "
               f"looped dims {list(dims)}")
    rest, na = n // R.sizes[t.axis], R.sizes[t.axis]
    hist, cy = f"hist_{s.name}", f"carry_{s.name}"
    R.alloc_named(sc, hist, (128 if r == "P" else 1, rest, na - 1 + R.tt))
    if na > 1:
        back = R.loop(sc, "u", na - 1)
        R.emit(back, f"nisa.tensor_copy({hist}[0:{r}, 0:{rest}, u], "
                     f"{cy}[0:{r}, {R.slot}, (u + 1) * {rest}:(u + 2) * {rest}])")
        R.close(back)
    R.materialize([s.inject], dims[1:], env, sc, r, into=[(hist, f"{na - 1}:{na - 1} + tw")])
    # the new carry: every slot at the tile's last step
    last = R.loop(sc, "j", na)
    R.emit(last, f"nisa.tensor_copy({cy}[0:{r}, {R.slot}, j * {rest}:(j + 1) * "
                 f"{rest}], {hist}[0:{r}, 0:{rest}, tw - 1 + j])")
    R.close(last)


def selection_reads(R, s) -> dict[str, str]:
    """The states a selection's ``keys`` and ``filled`` read: each must be ``prev(X)`` of a
    selection state X over the same axis alone (inner dims exactly the axis), X this state or
    one declared before it (its trajectory is complete when this one steps)."""
    t, names = s.transition, [st.name for st in R.rec.states]
    out = {}
    for k in ("keys", "filled"):
        n = t.operand(k)
        x = R.rec.state(n.arg) if n.op is Op.PREV else None
        if x is None or x.transition.kind is not Kind.SELECTION or \
                R.inner_dims(x) != (t.axis,) or R.rows(x) != R.rows(s) or \
                names.index(x.name) > names.index(s.name):
            R.fail(f"selection state {s.name!r}: its {k} must be prev() of a selection state "
                   f"along {t.axis!r} alone, itself or one declared before it")
        out[k] = x.name
    return out


@TRANSITION_RULES.register(Kind.SELECTION)
def _selection_rule(R, s, env, sc) -> None:
    """Per step, on (rows, m) tiles: the lowest free slot (filled == 0), else the lowest slot
    with the smallest key if score > that key, else none (index m); a one-hot e of it; then
    slot j becomes h_j + e_j (b - h_j) for the item b. keys/filled come from the carry (this
    state) or the trajectory column of the state entering step t (an earlier state)."""
    t = s.transition
    reads = selection_reads(R, s)
    R.trajectory(s, sc)
    R.emit(sc, f"# state {s.name}: selection along {t.axis}, stepped through time")
    dims, r, n = R.inner_dims(s), R.rows(s), R.n_inner(s)
    m = R.sizes[t.axis]
    rest_dims, rest = dims[1:], n // m
    for k in ("score", "valid"):
        if set(R.rec.dims_of(t.operand(k))) & set(rest_dims):
            R.fail(f"selection state {s.name!r}: its {k} varies along {list(rest_dims)}")
    tc = "t + 1" if s.name in R.prevs else "t"
    if s.name in R.prevs:
        R.emit(sc, f"nisa.tensor_copy(traj_{s.name}[0:{r}, 0:{n}, 0], "
                   f"carry_{s.name}[0:{r}, {R.slot}, 0:{n}])")
    inj, score, valid = R.materialize([s.inject, t.operand("score"), t.operand("valid")],
                                      rest_dims, env, sc, r)
    big = fmt(float(m))   # "no slot": exact in fp32 (a large number would swallow the index)
    row = lambda p: R.alloc(sc, (128, m), 4 * m, p, storage=True)  # noqa: E731
    col = lambda p: R.alloc(sc, (128, 1), 4, p, storage=True)  # noqa: E731
    idx, free, cand, e = row("idx"), row("free"), row("cand"), row("e")
    anyf, first, kmin, low, gt, tmp, slot = (col(p) for p in
                                             ("anyf", "first", "kmin", "low", "gt", "tmp", "slot"))
    diff = R.alloc(sc, (128, rest), 4 * rest, "diff", storage=True)
    R.emit(sc, f"nisa.iota({idx}[0:{r}, 0:{m}], [[1, {m}]], offset=0, channel_multiplier=0)")

    def stored(x: str) -> str:
        return (f"carry_{x}[0:{r}, {R.slot}, 0:{m}]" if x == s.name
                else f"traj_{x}[0:{r}, 0:{m}, t]")     # column t: the state entering step t
    step = R.step_loop(sc)
    em = lambda line: R.emit(step, line)  # noqa: E731
    c = lambda x: f"{x}[0:{r}, 0:1]"  # noqa: E731
    w = lambda x: f"{x}[0:{r}, 0:{m}]"  # noqa: E731
    # the lowest free slot: min over slots of idx (free) or BIG + idx (filled)
    em(f"nisa.tensor_scalar({w(free)}, {stored(reads['filled'])}, nl.equal, 0.0)")
    em(f"nisa.tensor_reduce({c(anyf)}, nl.maximum, {w(free)}, axis=1, keepdims=True)")
    em(f"nisa.tensor_scalar({w(cand)}, {w(free)}, nl.multiply, -{big}, op1=nl.add, "
       f"operand1={big})")
    em(f"nisa.tensor_tensor({w(cand)}, {w(cand)}, {w(idx)}, nl.add)")
    em(f"nisa.tensor_reduce({c(first)}, nl.minimum, {w(cand)}, axis=1, keepdims=True)")
    # the lowest slot with the smallest key
    em(f"nisa.tensor_reduce({c(kmin)}, nl.minimum, {stored(reads['keys'])}, axis=1, "
       "keepdims=True)")
    em(f"nisa.tensor_scalar({w(cand)}, {stored(reads['keys'])}, nl.equal, {c(kmin)})")
    em(f"nisa.tensor_scalar({w(cand)}, {w(cand)}, nl.multiply, -{big}, op1=nl.add, "
       f"operand1={big})")
    em(f"nisa.tensor_tensor({w(cand)}, {w(cand)}, {w(idx)}, nl.add)")
    em(f"nisa.tensor_reduce({c(low)}, nl.minimum, {w(cand)}, axis=1, keepdims=True)")
    # slot = valid ? (any free ? first : (kmin < score ? low : BIG)) : BIG
    em(f"nisa.tensor_tensor({c(gt)}, {c(kmin)}, {score}[0:{r}, 0:1, t], nl.less)")
    em(f"nisa.tensor_scalar({c(tmp)}, {c(low)}, nl.subtract, {big})")
    em(f"nisa.tensor_tensor({c(tmp)}, {c(tmp)}, {c(gt)}, nl.multiply)")
    em(f"nisa.tensor_scalar({c(tmp)}, {c(tmp)}, nl.add, {big})")
    em(f"nisa.tensor_tensor({c(slot)}, {c(first)}, {c(tmp)}, nl.subtract)")
    em(f"nisa.tensor_tensor({c(slot)}, {c(slot)}, {c(anyf)}, nl.multiply)")
    em(f"nisa.tensor_tensor({c(slot)}, {c(slot)}, {c(tmp)}, nl.add)")
    em(f"nisa.tensor_scalar({c(gt)}, {valid}[0:{r}, 0:1, t], nl.not_equal, 0.0)")
    em(f"nisa.tensor_scalar({c(slot)}, {c(slot)}, nl.subtract, {big})")
    em(f"nisa.tensor_tensor({c(slot)}, {c(slot)}, {c(gt)}, nl.multiply)")
    em(f"nisa.tensor_scalar({c(slot)}, {c(slot)}, nl.add, {big})")
    em(f"nisa.tensor_scalar({w(e)}, {w(idx)}, nl.equal, {c(slot)})")
    # slot j: h_j + e_j (b - h_j)
    js = R.loop(step, "j", m)
    cur = f"carry_{s.name}[0:{r}, {R.slot}, j * {rest}:(j + 1) * {rest}]"
    R.emit(js, f"nisa.tensor_tensor({diff}[0:{r}, 0:{rest}], {inj}[0:{r}, 0:{rest}, t], {cur}, "
               "nl.subtract)")
    R.emit(js, f"nisa.tensor_scalar({diff}[0:{r}, 0:{rest}], {diff}[0:{r}, 0:{rest}], "
               f"nl.multiply, {e}[0:{r}, j:j + 1])")
    R.emit(js, f"nisa.tensor_tensor(traj_{s.name}[0:{r}, j * {rest}:(j + 1) * {rest}, {tc}], "
               f"{cur}, {diff}[0:{r}, 0:{rest}], nl.add)")
    R.close(js)
    em(f"nisa.tensor_copy(carry_{s.name}[0:{r}, {R.slot}, 0:{n}], "
       f"traj_{s.name}[0:{r}, 0:{n}, {tc}])")
    R.close(step)


class _Step:
    """What the per-step rules (companion, householder, dense) share: the trajectory column
    ``new`` written at step t from the carry ``cur``, and a (P, 1) accumulator ``col``."""

    def __init__(self, R, s, sc):
        t = s.transition
        R.trajectory(s, sc)
        R.emit(sc, f"# state {s.name}: {t.kind.value} along {t.axis}, stepped through time")
        self.dims, self.r, self.n = R.inner_dims(s), R.rows(s), R.n_inner(s)
        hh = t.kind in (Kind.HOUSEHOLDER, Kind.DENSE, Kind.DPLR) and self.dims and \
            self.dims[-1] == t.axis
        if self.dims != (t.axis,) and not hh:
            R.fail(f"{t.kind.value} state {s.name!r}: its looped dims {list(self.dims)} must "
                   f"be exactly the axis {t.axis!r} (partition dim {R.pd!r})")
        # with prev(S) read, column 0 of the trajectory is the state entering the tile
        self.tc = "t + 1" if s.name in R.prevs else "t"
        r, n = self.r, self.n
        if s.name in R.prevs:
            R.emit(sc, f"nisa.tensor_copy(traj_{s.name}[0:{r}, 0:{n}, 0], "
                       f"carry_{s.name}[0:{r}, {R.slot}, 0:{n}])")
        self.cur = f"carry_{s.name}[0:{r}, {R.slot}, 0:{n}]"
        self.new = f"traj_{s.name}[0:{r}, 0:{n}, {self.tc}]"
        # a (P, 1) accumulator for the kinds that reduce into a column (not dense: it reduces
        # straight into the trajectory)
        self.col = None if t.kind is Kind.DENSE else R.alloc(sc, (128, 1), 4, "acc",
                                                               storage=True)

    def end(self, R, s, step, n: int | None = None) -> None:
        """The carry is the trajectory's column at step t."""
        r, n = self.r, self.n if n is None else n
        R.emit(step, f"nisa.tensor_copy(carry_{s.name}[0:{r}, {R.slot}, 0:{n}], "
                     f"traj_{s.name}[0:{r}, 0:{n}, {self.tc}])")
        R.close(step)


@TRANSITION_RULES.register(Kind.COMPANION)
def _companion_rule(R, s, env, sc) -> None:
    """Per step: the feedback as tensor_tensor + tensor_reduce, copies for the shift."""
    st = _Step(R, s, sc)
    r, n, col, tc = st.r, st.n, st.col, st.tc
    inj, fb = R.materialize([s.inject, s.transition.operand("feedback")], st.dims, env, sc, r)
    prod = R.alloc(sc, (128, n), 4 * n, "prod", storage=True)
    step = R.step_loop(sc)
    if n > 1:
        R.emit(step, f"nisa.tensor_tensor({prod}[0:{r}, 0:{n - 1}], {fb}[0:{r}, 0:{n - 1}, t], "
                     f"carry_{s.name}[0:{r}, {R.slot}, 1:{n}], nl.multiply)")
        R.emit(step, f"nisa.tensor_reduce({col}[0:{r}, 0:1], nl.add, "
                     f"{prod}[0:{r}, 0:{n - 1}], axis=1, keepdims=True)")
        R.emit(step, f"nisa.tensor_copy(traj_{s.name}[0:{r}, 0:{n - 1}, {tc}], "
                     f"carry_{s.name}[0:{r}, {R.slot}, 1:{n}])")
    else:
        R.emit(step, f"nisa.memset({col}[0:{r}, 0:1], 0.0)")
    R.emit(step, f"nisa.tensor_tensor(traj_{s.name}[0:{r}, {n - 1}:{n}, {tc}], "
                 f"{col}[0:{r}, 0:1], {inj}[0:{r}, {n - 1}:{n}, t], nl.add)")
    st.end(R, s, step)


@TRANSITION_RULES.register(Kind.HOUSEHOLDER)
def _householder_rule(R, s, env, sc) -> None:
    """Per step, one reflection per column of the other looped dims (hm), the axis last:
    k * h, tensor_reduce, beta, tensor_scalar(k, s), subtract, alpha, add the inject."""
    t = s.transition
    st = _Step(R, s, sc)
    r, n, col, tc, dims = st.r, st.n, st.col, st.tc, st.dims
    na = R.sizes[t.axis]
    if dims == (t.axis,):  # one loop nest for both (what they share loads once)
        inj, k = R.materialize([s.inject, t.operand("k")], dims, env, sc, r)
    else:
        inj, = R.materialize([s.inject], dims, env, sc, r)
        k, = R.materialize([t.operand("k")], (t.axis,), env, sc, r)
    scal = [t.operand("beta")] + ([t.operand("alpha")] if t.operand("alpha") else [])
    beta, *alpha = R.materialize(scal, (), env, sc, r)
    alpha = alpha[0] if alpha else None
    prod = R.alloc(sc, (128, na), 4 * na, "prod", storage=True)
    step = R.step_loop(sc)
    inner, nk = step, n // na
    if nk > 1:
        inner = R.loop(step, "hm", nk)
    cs = f"hm * {na}:(hm + 1) * {na}" if nk > 1 else f"0:{na}"
    cur = f"carry_{s.name}[0:{r}, {R.slot}, {cs}]"
    new = f"traj_{s.name}[0:{r}, {cs}, {tc}]"
    injv = f"{inj}[0:{r}, {cs}, t]"
    R.emit(inner, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], {k}[0:{r}, 0:{na}, t], "
                  f"{cur}, nl.multiply)")
    R.emit(inner, f"nisa.tensor_reduce({col}[0:{r}, 0:1], nl.add, "
                  f"{prod}[0:{r}, 0:{na}], axis=1, keepdims=True)")
    R.emit(inner, f"nisa.tensor_tensor({col}[0:{r}, 0:1], {col}[0:{r}, 0:1], "
                  f"{beta}[0:{r}, 0:1, t], nl.multiply)")
    R.emit(inner, f"nisa.tensor_scalar({prod}[0:{r}, 0:{na}], {k}[0:{r}, 0:{na}, t], "
                  f"nl.multiply, {col}[0:{r}, 0:1])")
    R.emit(inner, f"nisa.tensor_tensor({new}, {cur}, {prod}[0:{r}, 0:{na}], nl.subtract)")
    if alpha is not None:
        R.emit(inner, f"nisa.tensor_copy({col}[0:{r}, 0:1], {alpha}[0:{r}, 0:1, t])")
        R.emit(inner, f"nisa.tensor_scalar({new}, {new}, nl.multiply, {col}[0:{r}, 0:1])")
    R.emit(inner, f"nisa.tensor_tensor({new}, {new}, {injv}, nl.add)")
    if nk > 1:
        R.close(inner)
    st.end(R, s, step, na * nk)


@TRANSITION_RULES.register(Kind.DPLR)
def _dplr_rule(R, s, env, sc) -> None:
    """Per step, (Diag(w) + a b^T) h on one column of the other looped dims (hm) at a time,
    the axis last: b * h, tensor_reduce, tensor_scalar(a, s), w * h, add, add the inject."""
    t = s.transition
    st = _Step(R, s, sc)
    r, n, col, tc, dims = st.r, st.n, st.col, st.tc, st.dims
    na = R.sizes[t.axis]
    names = [k for k in ("w", "a", "b") if t.operand(k) is not None]
    opn = [t.operand(k) for k in names]
    if dims == (t.axis,):  # one loop nest for all (what they share loads once)
        inj, *ops = R.materialize([s.inject] + opn, dims, env, sc, r)
    else:
        for k, o in zip(names, opn):
            if set(R.rec.dims_of(o)) & set(dims[:-1]):
                R.fail(f"dplr state {s.name!r}: operand {k} varies along the looped dims "
                       f"{list(dims[:-1])} beside the axis (only along the axis {t.axis!r}, "
                       f"the partition dim {R.pd!r} and the outer dims here)")
        inj, = R.materialize([s.inject], dims, env, sc, r)
        ops = R.materialize(opn, (t.axis,), env, sc, r)
    op = dict(zip(names, ops))
    prod = R.alloc(sc, (128, na), 4 * na, "prod", storage=True)
    step = R.step_loop(sc)
    inner, nk = step, n // na
    if nk > 1:
        inner = R.loop(step, "hm", nk)
    cs = f"hm * {na}:(hm + 1) * {na}" if nk > 1 else f"0:{na}"
    cur = f"carry_{s.name}[0:{r}, {R.slot}, {cs}]"
    new = f"traj_{s.name}[0:{r}, {cs}, {tc}]"
    injv = f"{inj}[0:{r}, {cs}, t]"
    R.emit(inner, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], {op['b']}[0:{r}, 0:{na}, t], "
                  f"{cur}, nl.multiply)")
    R.emit(inner, f"nisa.tensor_reduce({col}[0:{r}, 0:1], nl.add, "
                  f"{prod}[0:{r}, 0:{na}], axis=1, keepdims=True)")
    R.emit(inner, f"nisa.tensor_scalar({prod}[0:{r}, 0:{na}], {op['a']}[0:{r}, 0:{na}, t], "
                  f"nl.multiply, {col}[0:{r}, 0:1])")
    if "w" in op:
        R.emit(inner, f"nisa.tensor_tensor({new}, {op['w']}[0:{r}, 0:{na}, t], {cur}, "
                      "nl.multiply)")
        R.emit(inner, f"nisa.tensor_tensor({new}, {new}, {prod}[0:{r}, 0:{na}], nl.add)")
    else:
        R.emit(inner, f"nisa.tensor_tensor({new}, {cur}, {prod}[0:{r}, 0:{na}], nl.add)")
    R.emit(inner, f"nisa.tensor_tensor({new}, {new}, {injv}, nl.add)")
    if nk > 1:
        R.close(inner)
    st.end(R, s, step, na * nk)


@TRANSITION_RULES.register(Kind.DENSE)
def _dense_rule(R, s, env, sc) -> None:
    """Per step, per column hm of the other looped dims (the axis last) and row a:
    tensor_tensor + tensor_reduce, then the inject. The matrix is materialized per column
    only where it varies along the other looped dims."""
    t = s.transition
    st = _Step(R, s, sc)
    r, n, tc, dims = st.r, st.n, st.tc, st.dims
    na = R.sizes[t.axis]
    rest = n // na
    inj, = R.materialize([s.inject], dims, env, sc, r)
    per_col = rest > 1 and bool(set(dims[:-1]) & set(R.rec.dims_of(t.operand("matrix"))))
    lead = dims[:-1] if per_col else ()
    m, = R.materialize([t.operand("matrix")], lead + (t.axis, t.col), env, sc, r)
    prod = R.alloc(sc, (128, n), 4 * n, "prod", storage=True)
    step = R.step_loop(sc)
    col = R.loop(step, "hm", rest) if rest > 1 else step
    c0 = f"hm * {na}" if rest > 1 else "0"
    cur = f"carry_{s.name}[0:{r}, {R.slot}, {c0}:{c0} + {na}]" if rest > 1 else st.cur
    row = R.loop(col, "a", na)
    m0 = f"hm * {na * na} + a * {na}" if per_col else f"a * {na}"
    R.emit(row, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], "
                f"{m}[0:{r}, {m0}:{m0} + {na}, t], {cur}, nl.multiply)")
    a0 = f"{c0} + a" if rest > 1 else "a"
    R.emit(row, f"nisa.tensor_reduce(traj_{s.name}[0:{r}, {a0}:{a0} + 1, {tc}], nl.add, "
                f"{prod}[0:{r}, 0:{na}], axis=1, keepdims=True)")
    R.close(row)
    if rest > 1:
        R.close(col)
    R.emit(step, f"nisa.tensor_tensor({st.new}, {st.new}, {inj}[0:{r}, 0:{n}, t], nl.add)")
    st.end(R, s, step)


class _Adjoint:
    """What the adjoint-step rules share: h_t = A_t^T (h_{t-1} + b_t), stepped through the
    tile: x = carry + inject, then the transposed transition into the trajectory column."""

    def __init__(self, R, s, sc, env, axis_first: bool):
        t = s.transition
        R.trajectory(s, sc)
        R.emit(sc, f"# state {s.name}: {t.kind.value} along {t.axis}, h = A^T (h + b), "
                   "stepped through time")
        self.dims, self.r, self.n = R.inner_dims(s), R.rows(s), R.n_inner(s)
        dims = self.dims
        if not dims or dims[0 if axis_first else -1] != t.axis:
            R.fail(f"{t.kind.value} state {s.name!r}: the axis {t.axis!r} must be the "
                   f"{'first' if axis_first else 'last'} of its looped dims {list(dims)}")
        self.na = R.sizes[t.axis]
        self.rest = self.n // self.na
        self.tc = "t + 1" if s.name in R.prevs else "t"
        self.traj, self.cy = f"traj_{s.name}", f"carry_{s.name}"
        r, n = self.r, self.n
        if s.name in R.prevs:
            R.emit(sc, f"nisa.tensor_copy({self.traj}[0:{r}, 0:{n}, 0], {self.cy}[0:{r}, "
                       f"{R.slot}, 0:{n}])")
        self.inj, = R.materialize([s.inject], dims, env, sc, r)
        self.x = R.alloc(sc, (128, n), 4 * n, "x", storage=True)

    def operand(self, R, s, opn: Node, env, sc, dims) -> tuple[str, bool]:
        """The transition operand materialized over ``dims``, per column hm of the other
        looped dims where it varies along them: (tile, per column)."""
        per_col = bool(set(self.dims[:-1]) & set(R.rec.dims_of(opn)))
        lead = self.dims[:-1] if per_col else ()
        op, = R.materialize([opn], lead + dims, env, sc, self.r)
        return op, per_col

    def begin(self, R, sc):
        """The step loop, with x = carry + inject."""
        r, n = self.r, self.n
        step = R.step_loop(sc)
        R.emit(step, f"nisa.tensor_tensor({self.x}[0:{r}, 0:{n}], {self.cy}[0:{r}, {R.slot}, "
                     f"0:{n}], {self.inj}[0:{r}, 0:{n}, t], nl.add)")
        return step

    def columns(self, R, step):
        """A loop over the columns hm of the other looped dims (the axis last): (scope,
        first column of hm, x's columns for hm)."""
        r, na, rest = self.r, self.na, self.rest
        col = R.loop(step, "hm", rest) if rest > 1 else step
        c0 = f"hm * {na}" if rest > 1 else "0"
        xs = f"{self.x}[0:{r}, {c0}:{c0} + {na}]" if rest > 1 else f"{self.x}[0:{r}, 0:{na}]"
        return col, c0, xs

    def end(self, R, step, col=None) -> None:
        if col is not None and self.rest > 1:
            R.close(col)
        r, n = self.r, self.n
        R.emit(step, f"nisa.tensor_copy({self.cy}[0:{r}, {R.slot}, 0:{n}], "
                     f"{self.traj}[0:{r}, 0:{n}, {self.tc}])")
        R.close(step)


@TRANSITION_RULES.register(Kind.SHIFT_ADJOINT)
def _shift_adjoint_rule(R, s, env, sc) -> None:
    """The reverse shift: the oldest slot zeroed, one copy one slot up (the axis first: slot
    j is columns j*rest:(j+1)*rest, so the other looped dims move together)."""
    ad = _Adjoint(R, s, sc, env, axis_first=True)
    r, n, rest, tc, traj = ad.r, ad.n, ad.rest, ad.tc, ad.traj
    step = ad.begin(R, sc)
    R.emit(step, f"nisa.memset({traj}[0:{r}, 0:{rest}, {tc}], 0.0)")
    if ad.na > 1:
        R.emit(step, f"nisa.tensor_copy({traj}[0:{r}, {rest}:{n}, {tc}], "
                     f"{ad.x}[0:{r}, 0:{n - rest}])")
    ad.end(R, step)


@TRANSITION_RULES.register(Kind.COMPANION_ADJOINT)
def _companion_adjoint_rule(R, s, env, sc) -> None:
    """The reverse shift after adding feedback * x[newest] (a tensor_scalar by the newest
    column), per column of the other looped dims."""
    t = s.transition
    ad = _Adjoint(R, s, sc, env, axis_first=False)
    r, na, tc, traj = ad.r, ad.na, ad.tc, ad.traj
    op, per_col = ad.operand(R, s, t.operand("feedback"), env, sc, (t.axis,))
    prod = R.alloc(sc, (128, na), 4 * na, "prod", storage=True)
    step = ad.begin(R, sc)
    col, c0, xs = ad.columns(R, step)
    last = f"{c0} + {na - 1}" if ad.rest > 1 else f"{na - 1}"
    fcols = f"{c0}:{c0} + {na}" if per_col else f"0:{na}"
    R.emit(col, f"nisa.tensor_scalar({prod}[0:{r}, 0:{na}], {op}[0:{r}, {fcols}, t], "
                f"nl.multiply, {ad.x}[0:{r}, {last}:{last} + 1])")
    R.emit(col, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], {prod}[0:{r}, 0:{na}], "
                f"{xs}, nl.add)")
    R.emit(col, f"nisa.memset({traj}[0:{r}, {c0}:{c0} + 1, {tc}], 0.0)")
    if na > 1:
        R.emit(col, f"nisa.tensor_copy({traj}[0:{r}, {c0} + 1:{c0} + {na}, {tc}], "
                    f"{prod}[0:{r}, 0:{na - 1}])")
    ad.end(R, step, col)


@TRANSITION_RULES.register(Kind.DENSE_ADJOINT)
def _dense_adjoint_rule(R, s, env, sc) -> None:
    """slot a = sum(M[:, a] * x): one multiply + tensor_reduce per slot, with M materialized
    column-major (flat col * na + axis: column a of M is a row)."""
    t = s.transition
    ad = _Adjoint(R, s, sc, env, axis_first=False)
    r, na, tc, traj = ad.r, ad.na, ad.tc, ad.traj
    op, per_col = ad.operand(R, s, t.operand("matrix"), env, sc, (t.col, t.axis))
    prod = R.alloc(sc, (128, na), 4 * na, "prod", storage=True)
    step = ad.begin(R, sc)
    col, c0, xs = ad.columns(R, step)
    row = R.loop(col, "a", na)
    m0 = f"hm * {na * na} + a * {na}" if per_col and ad.rest > 1 else f"a * {na}"
    R.emit(row, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], "
                f"{op}[0:{r}, {m0}:{m0} + {na}, t], {xs}, nl.multiply)")
    R.emit(row, f"nisa.tensor_reduce({traj}[0:{r}, {c0} + a:{c0} + a + 1, {tc}], "
                f"nl.add, {prod}[0:{r}, 0:{na}], axis=1, keepdims=True)")
    R.close(row)
    ad.end(R, step, col)


__all__ = ["ACT", "ALU", "ANALYSIS_RULES", "OP_RULES", "PY_BINARY", "PY_MATH", "PY_UNARY", "TRANSITION_RULES",
           "UNARY_LINES", "const_unary"]
