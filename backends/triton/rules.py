"""The Triton backend's lowering rules: ``OP_RULES`` keyed by IR op (``rule(L, node, env,
tv) -> str``: the emitted expression, or the name it was bound to; ``tv``: the value varies
per time step) and ``TRANSITION_RULES`` keyed by transition kind (``rule(L, state, env)``:
emits the state's update into the step). ``L`` is the lowering (recurrent.Lowering or its
chunked subclass): rules emit through its ``value``/``bind``/``load``/``reduce``.

The same registry names exist in every backend (backends/rules.py); a missing entry raises
``UnsupportedError`` naming the op or kind, the backend and the recurrence.
"""
from __future__ import annotations

from scancc.ir import Kind, Node, Op
from scancc.ir.passes.softmax import joint_softmax_expr

from ..rules import Rules
from .emit import number, par, simple

OP_RULES = Rules("triton", "op")
TRANSITION_RULES = Rules("triton", "transition")


# ---- OP_RULES: leaves ----

@OP_RULES.register(Op.INPUT)
def _input_rule(L, node: Node, env, tv: bool) -> str:
    return L.load(node.arg, env)


@OP_RULES.register(Op.STATE)
def _state_rule(L, node: Node, env, tv: bool) -> str:
    return L.state_var[node.arg]


@OP_RULES.register(Op.PREV)
def _prev_rule(L, node: Node, env, tv: bool) -> str:
    return L.prev_var[node.arg]


@OP_RULES.register(Op.CONST)
def _const_rule(L, node: Node, env, tv: bool) -> str:
    return number(node.arg)


@OP_RULES.register(Op.SIZE)
def _size_rule(L, node: Node, env, tv: bool) -> str:
    return f"{L.size[node.arg]} * 1.0"


@OP_RULES.register(Op.IOTA)
def _iota_rule(L, node: Node, env, tv: bool) -> str:
    return f"{par(env[node.arg].expr)}.to(tl.float32)"


@OP_RULES.register(Op.PARAM)
def _param_rule(L, node: Node, env, tv: bool) -> str:
    expr = L.rec.let(node.arg).expr
    s = L.value(expr, env)
    if simple(s):
        return s
    name = L.bind(tv, f"b_{node.arg}", s)
    L._memo[(expr, env.key)] = name  # the same expression elsewhere reads the binding
    return name


@OP_RULES.register(Op.GROUP, Op.FLIP)
def _remap_rule(L, node: Node, env, tv: bool) -> str:
    """group/flip: the operand read at remapped indices (see Lowering._remap)."""
    return L.value(node.src[0], L._remap(node, env))


# ---- OP_RULES: elementwise ----
#
# (template over operand strings, precedence of the result: 1 for +/-, 2 for * and /, 3 for
# unary minus, 4 for an atom or a call). Operands a template uses more than once are bound
# to a name first (see Lowering._operands).
_TEMPLATES: dict[Op, tuple[str, int]] = {
    Op.NEG: ("-{0}", 3),
    Op.EXP: ("tl.exp({0})", 4),
    Op.LOG: ("tl.log({0})", 4),
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|)
    Op.SOFTPLUS: ("tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0})))", 1),
    Op.SIGMOID: ("tl.sigmoid({0})", 4),
    Op.LOGSIGMOID: ("tl.minimum({0}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({0})))", 1),
    Op.SILU: ("{0} * tl.sigmoid({0})", 2),
    Op.SQRT: ("tl.sqrt({0})", 4),
    Op.RSQRT: ("tl.rsqrt({0})", 4),
    Op.STEP: ("tl.where({0} >= 0.0, 1.0, 0.0)", 4),
    Op.COS: ("tl.cos({0})", 4),
    Op.SIN: ("tl.sin({0})", 4),
    Op.ABS: ("tl.abs({0})", 4),
    Op.ADD: ("{0} + {1}", 1),
    Op.SUB: ("{0} - {1}", 1),
    Op.MUL: ("{0} * {1}", 2),
    Op.DIV: ("{0} / {1}", 2),
    # NaN propagates, as in the reference (np.maximum) and NKI: tl.maximum's default drops it
    Op.MAXIMUM: ("tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)", 4),
    Op.MINIMUM: ("tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)", 4),
}
# the precedence an operand of an infix template needs to go without parentheses
NEED = {"-{0}": (3,), "{0} + {1}": (1, 2), "{0} - {1}": (1, 2), "{0} * {1}": (2, 3),
        "{0} / {1}": (2, 3), "{0} * tl.sigmoid({0})": (3,)}


def _shared(L, node: Node, tv: bool, expr: str) -> str:
    """An elementwise value read by several nodes is bound to a name once."""
    if L.parents.get(node, 0) > 1:
        return L.bind(tv, f"b_{node.op.value}", expr)
    return expr


@OP_RULES.register(*_TEMPLATES)
def _template_rule(L, node: Node, env, tv: bool) -> str:
    template, p = _TEMPLATES[node.op]
    out = template.format(*L._operands(node, env, template))
    L._prec[out] = p
    return _shared(L, node, tv, out)


@OP_RULES.register(Op.UNGROUP)
def _ungroup_rule(L, node: Node, env, tv: bool) -> str:
    """``ungroup(x, d, g)``, lowered only as a whole output (the lowering checks that first):
    this program's part of its group's sum, which the output step adds into the group's
    element atomically (the programs of one group add into the same elements). A block of a
    split ``d`` lies inside one group (see the launcher), so it is summed here first."""
    d, _ = node.arg
    v = L.value(node.src[0], env)
    return L.reduce("sum", v, [d], env, "0.0") if d in L.plan.split else v


@OP_RULES.register(Op.CLAMP)
def _clamp_rule(L, node: Node, env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    lo, hi = node.arg
    # a NaN input stays NaN (reference and NKI agree); tl.maximum's default would drop it.
    # Bounds are finite (the verifier rejects others), so number() never prints a bare inf
    nan = ", propagate_nan=tl.PropagateNan.ALL"
    if lo is not None:
        x = f"tl.maximum({x}, {number(lo)}{nan})"
    if hi is not None:
        x = f"tl.minimum({x}, {number(hi)}{nan})"
    return _shared(L, node, tv, x)


@OP_RULES.register(Op.EXPM1)
def _expm1_rule(L, node: Node, env, tv: bool) -> str:
    # exp(x) - 1 cancels for small |x| in float32 (s4d's ZOH term (exp(dt A) - 1) / A, written
    # expm1 by scancc.ir.passes.canonical); Kahan: (u - 1) x / log(u), with u = exp(x)
    # rounded, is accurate to a few ulps. u is the value of exp(x): a let binding it is reused
    u = L.value(Node(Op.EXP, node.src), env)
    if not simple(u):
        u = L.bind(tv, "b_exp", u)
    xs = L.value(node.src[0], env)
    if not simple(xs):
        xs = L.bind(tv, "b_x", xs)
    out = L.bind(tv, "b_expm1", f"tl.where(({u} == 1.0) | (tl.abs({xs}) > 0.5), "
                 f"tl.where({u} == 1.0, {xs}, {u} - 1.0), ({u} - 1.0) * {xs} / tl.log({u}))")
    return _shared(L, node, tv, out)


@OP_RULES.register(Op.TANH)
def _tanh_rule(L, node: Node, env, tv: bool) -> str:
    # Triton has no tl.tanh; tanh|x| = -e / (2 + e) with e = expm1(-2|x|) (the expm1 rule:
    # accurate for small |x|, where 1 - exp(-2|x|) would cancel), then the sign of x
    x = node.src[0]
    xs = L.value(x, env)
    if not simple(xs):
        xs = L.bind(tv, "b_x", xs)
    arg = Node(Op.MUL, (Node(Op.CONST, (), -2.0), Node(Op.ABS, (x,))))
    L._memo[(arg, env.key)] = L.bind(tv, "b_m2x", f"-2.0 * tl.abs({xs})")
    e = L.value(Node(Op.EXPM1, (arg,)), env)
    r = L.bind(tv, "b_tanh", f"-{e} / (2.0 + {e})")
    return _shared(L, node, tv, f"tl.where({xs} < 0.0, -{r}, {r})")


# ---- TRANSITION_RULES: emit the update of one state, rule(L, state, env) ----

@TRANSITION_RULES.register(Kind.IDENTITY)
def _identity_rule(L, s, env):
    h = L.state_var[s.name]
    L.body.append(f"{h} = {h} + {L.par(L.value(s.inject, env), 2)}")


@TRANSITION_RULES.register(Kind.SCALAR, Kind.DIAGONAL)
def _scalar_rule(L, s, env):
    h = L.state_var[s.name]
    a = L.par(L.value(s.transition.operand("decay"), env), 2)
    L.body.append(f"{h} = {a} * {h} + {L.par(L.value(s.inject, env), 2)}")


@TRANSITION_RULES.register(Kind.SHIFT)
def _shift_rule(L, s, env):
    h, w = L.state_var[s.name], s.transition.axis
    b = L.value(s.inject, env)
    L.body.append(f"{h} = tl.where({L.off[w]} == i_t % {L.size[w]}, {b}, {h})")


@TRANSITION_RULES.register(Kind.SELECTION)
def _selection_rule(L, s, env):
    """Bounded memory: the item goes into the lowest free slot, else into the lowest slot with
    the smallest score if its score is larger (slot index SIZE: nowhere)."""
    h, ax, t = L.state_var[s.name], s.transition.axis, s.transition
    off, n = L.off[ax], L.size[ax]
    val = {k: L.par(L.value(t.operand(k), env), 1) for k in ("score", "valid", "keys", "filled")}
    key = ("selection", ax, t.operands, env.key)  # states sharing the operands share the slot
    if key not in L._memo:
        free = L.bind(True, "b_free", L.reduce(
            "min", f"tl.where({val['filled']} == 0.0, {off}, {n})", [ax], env, n))
        kmin = L.bind(True, "b_kmin", L.reduce("min", val["keys"], [ax], env, 'float("inf")'))
        low = L.bind(True, "b_low", L.reduce(
            "min", f"tl.where({val['keys']} == {kmin}, {off}, {n})", [ax], env, n))
        L._memo[key] = L.bind(True, "b_slot", f"tl.where({free} < {n}, {free}, tl.where("
                              f"{val['score']} > {kmin}, {low}, {n}))")
    slot = L._memo[key]
    b = L.value(s.inject, env)
    L.body.append(f"{h} = tl.where({val['valid']} != 0.0, tl.where({off} == {slot}, {b}, {h}), "
                  f"{h})")


@TRANSITION_RULES.register(Kind.COMPANION)
def _companion_rule(L, s, env):
    h, w = L.state_var[s.name], s.transition.axis
    slot = L.bind(True, f"m_{s.name}_new", f"{L.off[w]} == i_t % {L.size[w]}")
    f = L.par(L.value(s.transition.operand("feedback"), env), 2)
    shifted = f"tl.where({slot}, 0.0, {h})"
    fb = L.reduce("sum", f"{f} * {shifted}", [w], env, "0.0")
    new = L.bind(True, f"b_{s.name}_new", f"{fb} + {L.par(L.value(s.inject, env), 2)}")
    L.body.append(f"{h} = tl.where({slot}, {new}, {h})")


@TRANSITION_RULES.register(Kind.HOUSEHOLDER)
def _householder_rule(L, s, env):
    h, ax = L.state_var[s.name], s.transition.axis
    t = s.transition
    k = L.value(t.operand("k"), env)
    if not simple(k):
        k = L.bind(True, "b_hk", k)
    beta = L.par(L.value(t.operand("beta"), env), 2)
    kh = L.bind(True, f"b_{s.name}_k", L.reduce("sum", f"{k} * {h}", [ax], env, "0.0"))
    upd = f"{h} - {beta} * {k} * {kh}"
    if t.operand("alpha") is not None:
        upd = f"{L.par(L.value(t.operand('alpha'), env), 2)} * ({upd})"
    L.body.append(f"{h} = {upd} + {L.par(L.value(s.inject, env), 2)}")


@TRANSITION_RULES.register(Kind.DENSE)
def _dense_rule(L, s, env):
    h, ax, col = L.state_var[s.name], s.transition.axis, s.transition.col
    m = L.par(L.value(s.transition.operand("matrix"), env), 2)
    # h re-indexed along the column dim: a masked one-hot contraction over the axis
    one_hot = f"tl.where({L.off[ax]} == {L.off[col]}, {h}, 0.0)"
    hc = L.bind(True, f"b_{s.name}_col", L.reduce("sum", one_hot,
                                                   [ax], env, "0.0"))
    new = L.reduce("sum", f"{m} * {hc}", [col], env, "0.0")
    L.body.append(f"{h} = {new} + {L.par(L.value(s.inject, env), 2)}")


@TRANSITION_RULES.register(Kind.DPLR)
def _dplr_rule(L, s, env):
    """(Diag(w) + a b^T) h + inject: one reduction of b * h along the axis per step."""
    h, ax, t = L.state_var[s.name], s.transition.axis, s.transition
    bv = L.value(t.operand("b"), env)
    if not simple(bv):
        bv = L.bind(True, "b_lowrank", bv)
    bh = L.bind(True, f"b_{s.name}_b", L.reduce("sum", f"{bv} * {h}", [ax], env, "0.0"))
    an, sign = t.operand("a"), "+"
    if an.op is Op.NEG:    # a = -u (the delta rules): h - u * (b . h), not h + -u * (b . h)
        an, sign = an.src[0], "-"
    a = L.par(L.value(an, env), 2)
    diag = h if t.operand("w") is None else f"{L.par(L.value(t.operand('w'), env), 2)} * {h}"
    L.body.append(f"{h} = {diag} {sign} {a} * {bh} + {L.par(L.value(s.inject, env), 2)}")


# adjoint steps, h = A^T (h + b): plain registers (no ring), the reverse shift a gather

def _plus_inject(L, s, env) -> str:
    h = L.state_var[s.name]
    return L.bind(True, f"b_{s.name}_in", f"{h} + {L.par(L.value(s.inject, env), 2)}")


def _reverse_shift(L, s, x: str) -> str:
    """Slot i <- slot i - 1, slot 0 <- 0 (padding slots stay 0)."""
    w = s.transition.axis
    shape = ", ".join(L.block[d] if d in s.dims else "1" for d in L.plan.regs)
    idx = f"tl.broadcast_to(tl.maximum({L.off[w]} - 1, 0), [{shape}])"
    moved = f"tl.gather({x}, {idx}, axis={L.axis_of(w)})"
    return f"tl.where(({L.off[w]} == 0) | ({L.off[w]} >= {L.size[w]}), 0.0, {moved})"


@TRANSITION_RULES.register(Kind.SHIFT_ADJOINT)
def _shift_adjoint_rule(L, s, env):
    x = _plus_inject(L, s, env)
    L.body.append(f"{L.state_var[s.name]} = {_reverse_shift(L, s, x)}")


@TRANSITION_RULES.register(Kind.COMPANION_ADJOINT)
def _companion_adjoint_rule(L, s, env):
    w = s.transition.axis
    x = _plus_inject(L, s, env)
    f = L.par(L.value(s.transition.operand("feedback"), env), 2)
    last = L.reduce("sum", f"tl.where({L.off[w]} == {L.size[w]} - 1, {x}, 0.0)", [w], env, "0.0")
    z = L.bind(True, f"b_{s.name}_fb", f"{x} + {f} * {last}")
    L.body.append(f"{L.state_var[s.name]} = {_reverse_shift(L, s, z)}")


@TRANSITION_RULES.register(Kind.DENSE_ADJOINT)
def _dense_adjoint_rule(L, s, env):
    ax, col = s.transition.axis, s.transition.col
    x = _plus_inject(L, s, env)
    m = L.par(L.value(s.transition.operand("matrix"), env), 2)
    # sum over the axis gives the new state indexed by the column dim; a one-hot contraction
    # re-indexes it along the axis
    by_col = L.bind(True, f"b_{s.name}_col", L.reduce("sum", f"{m} * {x}", [ax], env, "0.0"))
    one_hot = f"tl.where({L.off[ax]} == {L.off[col]}, {by_col}, 0.0)"
    L.body.append(f"{L.state_var[s.name]} = {L.reduce('sum', one_hot, [col], env, '0.0')}")




# ---- OP_RULES over a dim ----

@OP_RULES.register(Op.SUM)
def _sum_rule(L, node: Node, env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    return L.bind(tv, "b_sum", L.reduce("sum", x, node.arg, env, "0.0"))


@OP_RULES.register(Op.MAX)
def _max_rule(L, node: Node, env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    return L.bind(tv, "b_max", L.reduce("max", x, node.arg, env, 'float("-inf")'))


@OP_RULES.register(Op.L2NORM)
def _l2norm_rule(L, node: Node, env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    if not simple(x):
        x = L.bind(tv, "b_x", x)
    ss = L.reduce("sum", f"{x} * {x}", [node.arg], env, "0.0")
    return L.bind(tv, "b_l2norm", f"{x} / tl.sqrt({ss} + 1e-06)")


@OP_RULES.register(Op.JSOFTMAX)
def _joint_softmax_rule(L, node: Node, env, tv: bool) -> str:
    """``joint_softmax`` lowered as its expansion (masked max, exp, sums; the lowering's
    canonicalize desugars it first, so this serves a caller that skipped that)."""
    return L.value(joint_softmax_expr(node), env)


@OP_RULES.register(Op.SOFTMAX)
def _softmax_rule(L, node: Node, env, tv: bool) -> str:
    d = node.arg
    logits = L.value(node.src[0], env)
    keep = [m for m in [env[d].mask] if m]
    if len(node.src) > 1:
        keep.append(f"({L.par(L.value(node.src[1], env), 1)} != 0.0)")
    keep_s = " & ".join(keep) if keep else None
    z = f"tl.where({keep_s}, {logits}, float(\"-inf\"))" if keep_s else logits
    z = L.bind(tv, "b_logits", z)
    ax = L.axis_of(d)
    # a fully masked row has max -inf: shift by 0 there, and read nothing (weights 0)
    mx = L.bind(tv, "b_max", f"tl.max({z}, axis={ax}, keep_dims=True)")
    L.emit(tv, f"{mx} = tl.where({mx} == float(\"-inf\"), 0.0, {mx})")
    p = f"tl.exp({z} - {mx})"
    p = L.bind(tv, "b_p", f"tl.where({keep_s}, {p}, 0.0)" if keep_s else p)
    den = L.bind(tv, "b_den", f"tl.sum({p}, axis={ax}, keep_dims=True)")
    return L.bind(tv, "b_softmax", f"{p} / tl.where({den} == 0.0, 1.0, {den})")


__all__ = ["OP_RULES", "TRANSITION_RULES"]
