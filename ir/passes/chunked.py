"""The chunked-form analysis: which states the chunked (parallel-in-time) algorithms apply
to, and with which structure. One analysis, every backend consumes it (adding only the
constraints of its own emitter: tile sizes, layouts, supported decay kinds).

A state S with feature dims K and V (its other dims batch/head/group-like: the *grid*,
along which chunks are independent) is chunkable when

    S_t = A_t S_{t-1} + (k-side factors)(v-side factors)(scale factors)
    A_t = 1 (identity) | a_t (scalar: one number per grid index) | diag_K(a_t) (decay along K)
        | alpha_t (I - beta_t k_t k_tᵀ) (householder along K)
        | diag_K(w_t) + a_t b_tᵀ (dplr along K; w, a, b free of V)

and the readouts read S only through contractions ``sum(S * q, K)`` with q free of V (and
never through prev(S)). With log decays g_t (a_t = exp(g_t)) and their in-chunk cumulative
sums c, a chunk then is a few matmuls (see the backends' chunked.py):

    o_t   = sum_{s<=t} (q_t · (k_s ⊙ e^{c_t - c_s})) v_s  +  (q_t ⊙ e^{c_t}) S
    S_new = e^{c_last} ⊙ S  +  sum_s (k_s ⊙ e^{c_last - c_s}) v_sᵀ

``analyze(rec)`` returns a ``ChunkedForm``: per chunkable state a ``ChunkedState`` (the IR
facts above), per other state the reason it is not chunkable. ``analyze_state`` raises
``NotChunkable`` with the reason.

**Edges.** Every chunked emitter keeps the recurrent semantics where the matmul form would not
(docs/numerics.md, "Chunked forms at the edges"; tests/test_chunked_edges.py):

- *Non-finite values stay where the recurrence puts them.* A chunk's factor tiles (k-side,
  v-side, q-side, log-decay, householder k/beta) are sanitized (non-finite -> 0) before any
  matmul, and the poison is added back: output row t, column j is NaN when a k-side, decay
  or householder factor of a step s <= t of the chunk (any element), the v-side factor of
  column j at a step s <= t, or the q-side factor at t itself is non-finite; the state leaving
  the chunk is NaN in the rows (K) and columns (V) those factors poison (all of it for a
  scalar decay or a householder or dplr step; dplr's a/b are sanitized as householder's
  k/beta). A NaN state entering a chunk stays NaN through
  multiplications, never a select, so a later reset does not clear it (as in the reference).
- *Hard resets.* A log-decay at or below ``RESET_LOG_DECAY`` (a decay below float32's
  smallest normal number, exactly 0, or a log-gate of -inf) is a reset: the decay between
  steps s < t is 0 when a reset lies in (s, t], else exp(c_t - c_s) of the cumulative sums
  of the other log-decays. So -inf never enters a cumulative sum, and a huge negative gate
  costs no precision in the steps after it. What a reset drops is below float32 resolution:
  a_t |S| < 1.2e-38 |S|.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import IRError
from ..expr import Node, Op
from ..printer import format_expr
from ..recurrence import Kind, Recurrence, State
from .lets import resolve

# log(2**-126): a decay below float32's smallest normal number is a hard reset (module doc)
RESET_LOG_DECAY = -87.33654475055310898657

CHUNKED_KINDS = (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL, Kind.HOUSEHOLDER, Kind.DPLR)
_ONE = Node(Op.CONST, (), 1.0)


class NotChunkable(IRError):
    """A state (or recurrence) the chunked form does not apply to; ``str()`` says why."""


@dataclass(frozen=True)
class Contraction:
    """A readout's ``sum(S * q, K)``: ``node`` is the sum, ``q_side`` its other factors."""
    node: Node
    q_side: tuple[Node, ...]

    @property
    def q(self) -> Node:
        """The q-side factors as one expression (1.0 if none)."""
        return product(self.q_side)


@dataclass(frozen=True)
class ChunkedState:
    """The chunked form of one state (see the module doc)."""
    state: str
    K: str                          # the contracted feature dim
    V: str                          # the other feature dim
    grid: tuple[str, ...]           # the state's other dims (canonical order): independent chunks
    kind: Kind                      # IDENTITY, SCALAR, DIAGONAL (decay varies along K) or
    #                                 HOUSEHOLDER; a diagonal decay constant along K is SCALAR
    decay: Node | None              # a_t as written (decay operand, householder alpha); None: 1
    log_decay: Node | None          # g_t, a_t = exp(g_t): the exp's argument, or log(a_t)
    decay_is_exp: bool              # True: a_t is exp(g_t) (lets at its top looked through)
    inject: tuple[Node, ...]        # the injected term's factors, in order
    k_side: tuple[Node, ...]        # ... those along K (not V)
    v_side: tuple[Node, ...]        # ... those along V (not K)
    scale_side: tuple[Node, ...]    # ... those along neither (grid dims only)
    contractions: tuple[Contraction, ...]  # every readout contraction of S, in output order
    hk: Node | None = None          # HOUSEHOLDER: the reflection's k (along K), beta, alpha
    beta: Node | None = None
    alpha: Node | None = None
    la: Node | None = None          # DPLR: the rank-1 term's a and b (along K, not V); the
    lb: Node | None = None          # decay is w (along K or not)


@dataclass(frozen=True)
class ChunkedForm:
    """The analysis of a recurrence: ``states`` the chunkable ones, ``reasons`` why the others
    are not (by state name; together they cover every state)."""
    rec: Recurrence = field(repr=False)
    states: dict[str, ChunkedState]
    reasons: dict[str, str]

    def only(self) -> ChunkedState:
        """The chunked form of a recurrence with one state; NotChunkable otherwise."""
        if len(self.rec.states) != 1:
            raise NotChunkable("needs exactly one state")
        name = self.rec.states[0].name
        if name not in self.states:
            raise NotChunkable(self.reasons[name])
        return self.states[name]


def factors(n: Node) -> list[Node]:
    """The factors of a product ``a * b * ...`` (``[n]`` if n is not a product)."""
    if n.op is Op.MUL:
        return factors(n.src[0]) + factors(n.src[1])
    return [n]


def product(fs) -> Node:
    """``f0 * f1 * ...`` (left to right), 1.0 if empty."""
    fs = list(fs)
    if not fs:
        return _ONE
    out = fs[0]
    for f in fs[1:]:
        out = Node(Op.MUL, (out, f))
    return out


def analyze(rec: Recurrence) -> ChunkedForm:
    """The chunked form of every state of ``rec`` that has one, and why the others do not."""
    states, reasons = {}, {}
    for s in rec.states:
        try:
            states[s.name] = analyze_state(rec, s)
        except NotChunkable as e:
            reasons[s.name] = str(e)
    return ChunkedForm(rec, states, reasons)


def analyze_state(rec: Recurrence, s: State) -> ChunkedState:
    """The chunked form of state ``s``; raises NotChunkable saying why there is none."""
    t = s.transition
    if rec.cascaded:  # conservative: a cascade reads h_t of other states at every step
        raise NotChunkable(f"a cascade (state(s) {', '.join(rec.cascaded)} read states): "
                           "the recurrence runs recurrently")
    if t.kind not in CHUNKED_KINDS:
        raise NotChunkable(f"transition {t.kind.value!r} (needs identity, scalar, diagonal, "
                           "householder or dplr)")
    if any(n.op is Op.PREV and n.arg == s.name for o in rec.outputs for n in o.expr.walk()):
        raise NotChunkable(f"a readout reads prev({s.name}): the state entering each step")
    role = {d.name: d.role for d in rec.dims}
    feats = [d for d in s.dims if role[d] == "feature"]
    if len(feats) != 2:
        raise NotChunkable(f"state dims {list(s.dims)}: needs exactly two feature dims (K, V), "
                           "the others batch/head/group")
    K, V, contractions = _contractions(rec, s, feats)
    grid = rec.order(d for d in s.dims if d not in (K, V))
    dims = lambda n: set(rec.dims_of(n))  # noqa: E731

    inject = tuple(factors(s.inject))
    for f in inject:
        if {K, V} <= dims(f):
            raise NotChunkable(f"the injected term is not a product of a K-factor and a "
                               f"V-factor: {format_expr(f)} varies along both {K!r} and {V!r}")
    k_side = tuple(f for f in inject if K in dims(f))
    v_side = tuple(f for f in inject if V in dims(f))
    scale_side = tuple(f for f in inject if not {K, V} & dims(f))

    kind, decay, hk, beta, alpha, la, lb = t.kind, None, None, None, None, None, None
    if kind is Kind.DPLR:
        if t.axis != K:
            raise NotChunkable(f"the dplr axis {t.axis!r} is not the contracted dim {K!r}")
        la, lb, decay = t.operand("a"), t.operand("b"), t.operand("w")
        if decay is None:
            raise NotChunkable("a dplr without w (write w=1.0 for the chunked form)")
        if any(V in dims(x) for x in (la, lb, decay)):
            raise NotChunkable("dplr a, b and w must not vary along the value dim")
    elif kind is Kind.HOUSEHOLDER:
        if t.axis != K:
            raise NotChunkable(f"the householder axis {t.axis!r} is not the contracted dim {K!r}")
        hk, beta, alpha = t.operand("k"), t.operand("beta"), t.operand("alpha")
        if V in dims(hk) or V in dims(beta):
            raise NotChunkable("householder k must vary along K only, beta along no state "
                               "feature dim")
        if alpha is not None and V in dims(alpha):
            raise NotChunkable("householder alpha must be one number per grid index")
        decay = alpha
    elif kind is not Kind.IDENTITY:
        decay = t.operand("decay")
        if V in dims(decay):
            raise NotChunkable("the decay varies along the value dim")
        if kind is Kind.DIAGONAL and K not in dims(decay):
            kind = Kind.SCALAR
    log_decay, is_exp = None, False
    if decay is not None:
        e = resolve(rec, decay)
        is_exp = e.op is Op.EXP
        log_decay = e.src[0] if is_exp else Node(Op.LOG, (decay,))
    return ChunkedState(s.name, K, V, grid, kind, decay, log_decay, is_exp, inject, k_side,
                        v_side, scale_side, contractions, hk, beta, alpha, la, lb)


def _contractions(rec: Recurrence, s: State, feats: list[str]):
    """(K, V, contractions): the readouts must read ``s`` only through ``sum(S * q, K)``."""
    me = Node(Op.STATE, (), s.name)
    found: list[Contraction] = []
    for o in rec.outputs:
        for n in o.expr.walk():
            if n.op is not Op.SUM or me not in factors(n.src[0]) or \
                    any(c.node == n for c in found):
                continue
            fs = factors(n.src[0])
            q_side = list(fs)
            q_side.remove(me)
            if len(n.arg) != 1 or n.arg[0] not in feats:
                raise NotChunkable(f"the readout contraction {format_expr(n)} is over "
                                   f"{list(n.arg)}, not one feature dim of {s.name!r}")
            if any(rec.uses_state(f) for f in q_side):
                raise NotChunkable(f"the contraction {format_expr(n)} must be sum(S * q, K) with "
                                   "q free of states")
            found.append(Contraction(n, tuple(q_side)))
    if not found:
        raise NotChunkable(f"the readout must read the state {s.name!r} through a contraction "
                           "sum(S * q, K)")
    ks = {c.node.arg[0] for c in found}
    if len(ks) != 1:
        raise NotChunkable(f"the readout contractions of {s.name!r} are over different dims "
                           f"{sorted(ks)}")
    K = ks.pop()
    V = next(d for d in feats if d != K)
    for c in found:
        if any(V in rec.dims_of(f) for f in c.q_side):
            raise NotChunkable(f"the contraction {format_expr(c.node)} must be sum(S * q, K) with "
                               f"q free of the value dim {V!r}")
    # every read of S goes through one of the contractions
    inside = {c.node for c in found}
    memo: dict[Node, bool] = {}

    def reaches(n: Node) -> bool:
        if n in inside:
            return False
        if n == me:
            return True
        if n not in memo:
            memo[n] = any(reaches(x) for x in n.src)
        return memo[n]
    for o in rec.outputs:
        if reaches(o.expr):
            raise NotChunkable(f"output {o.name!r} reads the state {s.name!r} outside a "
                               "contraction sum(S * q, K)")
    return K, V, tuple(found)


__all__ = ["analyze", "analyze_state", "ChunkedForm", "ChunkedState", "Contraction",
           "NotChunkable", "factors", "product", "CHUNKED_KINDS", "RESET_LOG_DECAY"]
