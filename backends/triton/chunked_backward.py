"""The chunked backward: gradients of a chunkable recurrence (identity, scalar, key-diagonal or
householder decay) without
the per-step state sequence ever reaching memory.

Derived from the chunked-form analysis (``scancc.ir.passes.chunked`` through ``chunked.analyze``),
not per recurrence. With the factors of the chunked form, per grid index (batch, heads, ...):
q_t (the readout contraction's q-side, along K), k_t (the injected term's K-side), v_t (its
other factors, along V), g_t (the log-decay; 0 for identity), the forward is
S_t = e^{g_t} S_{t-1} + k_t v_tᵀ, O_t = S_tᵀ q_t, and the outputs are elementwise functions of
O and the inputs. Its backward, for chunks of BT steps (c the in-chunk cumulative log-decays,
L the chunk's last step, S the state entering the chunk, dh = dL/dS leaving it), is:

1. ``fwd_h`` (sequential over chunks, parallel over grid x K-blocks x V-blocks): the state
   entering each chunk, [G, NC, K, V] (float32; bfloat16 for a 16-bit call, the pass itself
   in float32) -- chunk boundaries only, never per step;
2. ``bwd_dh`` (sequential over chunks in reverse, same grid): dh of each chunk,
   dh_{i-1} = e^{c_L} dh_i + (q ⊙ e^{c})ᵀ dO (tensor-core dots), and dh_{-1}, the gradient of
   the initial state;
3. ``bwd_dv`` (grid x chunks x V-blocks) and ``bwd_dqk`` (grid x chunks x K-blocks), with
   A = (q kᵀ) ⊙ D and dA = (dO vᵀ) ⊙ D (D_ts = e^{c_t - c_s}, t >= s):

       dq = dA k + e^{c} ⊙ (dO Sᵀ)
       dk = dAᵀ q + e^{c_L - c} ⊙ (v dhᵀ)
       dv = Aᵀ dO + (k ⊙ e^{c_L - c}) dh
       dg_r = sum_{t >= r in the chunk} (q_t·dq_t - k_t·dk_t)
              + e^{c_L} <dh, S> + sum_s k_s·(e^{c_L-c_s} dh v_s)

   the last line is the reverse cumulative-sum identity (as fla's chunk backward): dL/dc_t is
   q_t·dq_t - k_t·dk_t (every D_ts is e^{c_t - c_s}: it adds its weight to c_t and takes it from
   c_s), plus, at t = L, the two terms through which the state leaving the chunk reads c_L;
   g_r enters every c_t with t >= r. Each K-block writes its share (the identity is linear),
   summed here. Hard resets (log-decay <= RESET_LOG_DECAY, the forward's edge rule) are
   counted, not summed: D_ts is 0 across one, and dg is 0 at one (the exact identity gives 0
   there; the reference's is a * dL/da, below 1.2e-38 |dL/da|). When an input's gradient
   reads the contraction O itself (mamba2's z gate), ``bwd_dv`` also writes
   O = A v + e^{c} ⊙ (q S).
4. the chain rule from the factor gradients (dq, dk, dv, dg) and the output cotangents back to
   the recurrence's inputs through its let expressions: the elementwise VJPs of
   ``scancc.ir.passes.adjoint.vjp``, evaluated with torch ops on the inputs' device
   (``_TorchEval``); inputs without a time dim get their per-step contributions summed.

So one backward call is: a few torch elementwise ops for the factors, four kernel launches,
a few torch elementwise ops for the chain rule -- a fixed number whatever T is.

What the kernels take over from the torch ops (derived from the factor expressions, no
per-recurrence case): a factor that is one input (maybe ``group``-ed, maybe lacking a grid
dim) or an output cotangent times a constant is read in place through strides (``_direct``,
``_Factor``; mamba2's B and C per group); a per-step scalar w on the injected term
(``_split_scale``: v = w x, mamba2's dt) is applied on load and bwd_dv's epilogue writes
dL/dx = w dL/dv and dL/dw = sum_V(dL/dv x); a gradient that is exactly a factor's cotangent
is written by the kernels into the input's gradient (linear_attn, simple_gla, gla: no torch
op), and other factor gradients of an input-read factor in that input's layout.

What it takes (``plan`` says why not, and ``scancc.autograd`` then keeps its generic path):
one state, identity or scalar decay, the Triton chunked emitter's form (one contraction
sum(S * q, K)), a cotangent of the contraction that does not read the contraction (an output
gate's *input* gradient may read it: O is then recomputed), and ops the torch evaluator has.

Householder transitions (delta_net, gated_delta_net) take ``chunked_backward_householder``
(the WY/UT form, hand-derived: the two sequential passes Triton kernels, the per-chunk
gradients torch ops) with the same chain rule; the plan then has the extra factors hk (the
reflection's k) and beta.

Not done here: the dplr kind; recurrent edge semantics for
non-finite *inputs* everywhere (the causal masks select, so a NaN at step t stays out of the
intra-chunk products of later steps, but products over time inside a dot and dg's reverse
cumulative sum still carry it over its chunk: docs/training.md); factors that are not one input (mamba2's g = dt A, a z-gated dO) are
still materialised as float32 [G, T, K|V] tensors, and the rest of the chain rule (mamba2's
dx = dL/dx + dy D, the ungroup sums of dB and dC, dD) is torch ops (bytes:
docs/performance/training.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from scancc.ir import Input, Kind, Node, Op, Recurrence
from scancc.ir.passes.adjoint import _Ctx, vjp
from scancc.ir.passes.lets import inline_lets_in
from scancc.ir.passes.rewrite import substitute

from . import chunked

KINDS = (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL, Kind.HOUSEHOLDER)
# set by tests: every buffer the kernels write starts NaN (an element left unwritten shows)
POISON = False
# the dot_precision option -> tl.dot input_precision of the backward's float32 operands
PRECISION = {"auto": "tf32x3", "ieee": "ieee", "tf32x3": "tf32x3", "tf32": "tf32",
             "input": "tf32"}
SUPPORTED_OPS = {Op.INPUT, Op.PARAM, Op.CONST, Op.IOTA, Op.SIZE, Op.NEG, Op.EXP, Op.EXPM1, Op.LOG,
                 Op.SOFTPLUS, Op.SIGMOID, Op.LOGSIGMOID, Op.SILU, Op.SQRT, Op.RSQRT, Op.CLAMP,
                 Op.STEP, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAXIMUM, Op.MINIMUM, Op.SUM,
                 Op.MAX, Op.GROUP, Op.UNGROUP, Op.FLIP, Op.L2NORM}


class NotSupported(Exception):
    pass


@dataclass(frozen=True)
class Plan:
    """What the chunked backward of ``rec`` evaluates (all expressions let-free)."""
    rec: Recurrence
    form: chunked.Form
    state: str
    q: Node                     # factor expressions (dims: grid + K | V, maybe time)
    k: Node
    v: Node
    g: Node | None              # the log-decay (None: identity)
    hk: Node | None             # HOUSEHOLDER: the reflection's k (along K) and beta (grid)
    beta: Node | None
    d_contraction: Node         # dL/dO from the output cotangents (no O in it)
    grads: dict                 # input name -> its gradient expression
    cot: dict                   # output name -> placeholder input of its cotangent
    fcot: dict                  # "q" | "k" | "v" | "g" -> placeholder input of its cotangent
    o_name: str                 # placeholder input of the contraction O
    needs_o: bool               # some input gradient reads O (bwd_grads then writes it)
    ctx_rec: Recurrence         # dims_of for the placeholders too
    w: Node | None = None       # the injected term's per-step scalar (v is then w * v)


def _check_ops(n: Node, what: str) -> None:
    for m in n.walk():
        if m.op not in SUPPORTED_OPS:
            raise NotSupported(f"{what}: op {m.op.value!r} is not evaluated by the chunked "
                               "backward's chain rule")


@lru_cache(maxsize=64)
def _plan(rec: Recurrence) -> Plan | str:
    try:
        return _build(rec)
    except (NotSupported, chunked.NotChunkable) as e:
        return str(e)


def plan(rec: Recurrence) -> Plan:
    """The chunked backward's plan of ``rec``; NotSupported saying why there is none."""
    p = _plan(rec)
    if isinstance(p, str):
        raise NotSupported(p)
    return p


def applies(rec: Recurrence) -> tuple[bool, str]:
    p = _plan(rec)
    return (False, p) if isinstance(p, str) else (True, "")


def _build(rec: Recurrence) -> Plan:
    if len(rec.states) != 1:
        raise NotSupported("needs exactly one state")
    F = chunked.analyze(rec)
    if F.kind not in KINDS:
        raise NotSupported(f"decay kind {F.kind.value!r}: the chunked backward takes identity, "
                           "scalar, key-diagonal and householder decays")
    s = rec.states[0]
    if set(F.grid) - set(s.dims):
        # (gated_delta_net with grouped value heads and l2norm'd q/k: the analysis's grid
        # keeps qk_heads) the state has no such dim to pass between chunks
        raise NotSupported(f"the chunked form's grid {F.grid} has dims the state "
                           f"{s.name} lacks")
    memo: dict = {}
    inl = lambda n: inline_lets_in(rec, n, memo)  # noqa: E731
    from scancc.ir.passes.chunked import product
    q, k, v = inl(product(F.q_side)), inl(product(F.k_side)), inl(product(F.v_side))
    g = hk = beta = w = None
    if F.kind is not Kind.HOUSEHOLDER:
        k, wk = _split_scale(rec, k, F.grid)
        v, wv = _split_scale(rec, v, F.grid)
        ws = [x for x in (wk, wv) if x is not None]
        w = product(ws) if ws else None
    if F.kind is not Kind.IDENTITY and F.log_decay is not None:
        g = inl(Node(Op.LOG, (F.log_decay,)) if F.log_of else F.log_decay)
    if F.kind is Kind.HOUSEHOLDER:
        hk, beta = inl(F.hk), inl(F.beta)
        if set(rec.dims_of(beta)) - set(F.grid) - {rec.time}:
            raise NotSupported("the householder beta varies along a state dim")
    taken = {d.name for d in rec.dims} | {x.name for x in rec.inputs} | \
        {o.name for o in rec.outputs} | {l.name for l in rec.lets} | {s.name}

    def fresh(base):
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name
    T = rec.time
    o_name = fresh("O")
    contraction_dims = rec.dims_of(F.contraction)
    placeholders = [Input(o_name, (T,) + contraction_dims)]
    cot = {}
    for o in rec.outputs:
        cot[o.name] = fresh(f"d_{o.name}")
        placeholders.append(Input(cot[o.name], o.dims))
    fcot = {}
    factors = (("q", q), ("k", k), ("v", v), ("g", g), ("hk", hk), ("beta", beta), ("w", w))
    for name, e in factors:
        if e is None:
            continue
        fcot[name] = fresh(f"d{name}_factor")
        placeholders.append(Input(fcot[name], (T,) + rec.dims_of(e)))
    ctx = _Ctx(rec.dims, list(rec.inputs) + placeholders, [])
    O = Node(Op.INPUT, (), o_name)
    outs = []
    for o in rec.outputs:
        e = substitute(inl(o.expr), {inl(F.contraction): O}, {})
        if any(n.op is Op.STATE or n.op is Op.PREV for n in e.walk()):
            raise NotSupported(f"output {o.name!r} reads the state outside its contraction")
        outs.append((e, Node(Op.INPUT, (), cot[o.name])))
    dO = vjp(ctx, outs, {O}).get(O)
    if dO is None:
        raise NotSupported("no output reads the state")
    if any(n == O for n in dO.walk()):
        raise NotSupported("the outputs' VJP w.r.t. the contraction reads the contraction "
                           "(e.g. a gate applied to it): the chunked backward does not "
                           "recompute it")
    roots = list(outs) + [(e, Node(Op.INPUT, (), fcot[name]))
                          for name, e in factors if e is not None]
    leaves = {Node(Op.INPUT, (), x.name) for x in rec.inputs}
    gx = vjp(ctx, roots, leaves)
    grads, needs_o = {}, False
    for x in rec.inputs:
        e = gx.get(Node(Op.INPUT, (), x.name))
        if e is not None:
            needs_o = needs_o or any(n == O for n in e.walk())
            _check_ops(e, f"the gradient of {x.name!r}")
        grads[x.name] = e
    for what, e in factors + (("dO", dO),):
        if e is not None:
            _check_ops(e, f"factor {what}")
    return Plan(rec, F, s.name, q, k, v, g, hk, beta, dO, grads, cot, fcot, o_name, needs_o,
                ctx.rec, w)


def _split_scale(rec: Recurrence, e: Node, grid) -> tuple[Node, Node | None]:
    """A K- or V-side factor ``e`` as (x, w): x one input (maybe grouped) the kernels can read
    where it lies, w the product of its other factors when they vary along nothing but time
    and the grid (a per-step scalar: mamba2's v = clamp(dt) * x). The injected term k vᵀ
    then has w on its V side whichever side it came from (a scalar commutes), which the
    kernels apply on load and whose gradient terms they write (kernels' module doc).
    (e, None) when ``e`` is not of that form."""
    parts, stack = [], [e]
    while stack:
        n = stack.pop()
        if n.op is Op.MUL:
            stack.extend(reversed(n.src))
        else:
            parts.append(n)
    scal = [n for n in parts if not set(rec.dims_of(n)) - set(grid) - {rec.time}]
    rest = [n for n in parts if n not in scal]
    if not scal or len(rest) != 1:
        return e, None
    x = rest[0]
    while x.op is Op.GROUP:
        x = x.src[0]
    if x.op is not Op.INPUT:
        return e, None
    from scancc.ir.passes.chunked import product
    return rest[0], product(scal)


# ---- torch evaluation of state-free expressions (the reference interpreter's layout) ----

class _TorchEval:
    """Values are float32 torch tensors of full rank: a leading time axis (size T or 1), then
    the recurrence's canonical dims (size 1 where a value lacks one)."""

    def __init__(self, rec: Recurrence, ctx_rec: Recurrence, sizes: Mapping[str, int], leaf):
        import torch
        self.t, self.rec, self.ctx, self.sizes, self.leaf = torch, rec, ctx_rec, sizes, leaf
        self.canon = rec.canonical
        self.axis = {d: 1 + i for i, d in enumerate(self.canon)}
        self.memo: dict = {}
        self.like = None

    def shape(self, dims) -> tuple[int, ...]:
        return tuple(self.sizes[d] if d in dims else 1 for d in self.canon)

    def to_canon(self, arr, layout):
        time = self.rec.time
        present = [d for d in self.canon if d in layout]
        src = ([layout.index(time)] if time in layout else []) + [layout.index(d) for d in present]
        a = arr.permute(src)
        if time not in layout:
            a = a.unsqueeze(0)
        return self.spread(a, layout)

    def spread(self, a, dims):
        """(time, the canonical dims in ``dims``, in order) -> full rank: size-1 axes inserted
        for the others (views, no copy)."""
        for i, d in enumerate(self.canon):
            if d not in dims:
                a = a.unsqueeze(1 + i)
        return a

    def from_canon(self, a, layout):
        """(time-led canonical) -> ``layout``; a time-free layout sums the time axis."""
        time = self.rec.time
        # a value along a dim the layout lacks (a factor broadcast over it): summed
        extra = [self.axis[d] for d in self.canon if d not in layout and a.shape[self.axis[d]] > 1]
        if extra:
            a = a.sum(dim=extra, keepdim=True)
        if time not in layout:
            a = a.sum(0)
            full = self.shape(layout)
        else:
            full = (self.sizes[time],) + self.shape(layout)
        a = a.expand(full) if a.dim() == len(full) else a
        present = [d for d in self.canon if d in layout]
        lead = [self.sizes[time]] if time in layout else []
        a = a.reshape(tuple(lead) + tuple(self.sizes[d] for d in present))
        order = ([time] if time in layout else []) + present
        return a.permute([order.index(d) for d in layout])

    def scalar(self, v):
        return self.t.full((1,) * (len(self.canon) + 1), float(v), dtype=self.t.float32,
                           device=self.device)

    def eval(self, n: Node):
        m = self.memo.get(n)
        if m is not None:
            return m
        t, op = self.t, n.op
        if op is Op.INPUT:
            r = self.leaf(n.arg)
        elif op is Op.PARAM:
            r = self.eval(self.rec.let(n.arg).expr)
        elif op is Op.CONST:
            r = self.scalar(n.arg)
        elif op is Op.SIZE:
            r = self.scalar(self.sizes[n.arg])
        elif op is Op.IOTA:
            r = t.arange(self.sizes[n.arg], dtype=t.float32, device=self.device).reshape(
                (1,) + self.shape([n.arg]))
        else:
            s = [self.eval(x) for x in n.src]
            r = self._apply(n, s)
        self.memo[n] = r
        return r

    def _apply(self, n, s):
        t, op, F = self.t, n.op, self.t.nn.functional
        un = {Op.NEG: t.neg, Op.EXP: t.exp, Op.EXPM1: t.expm1, Op.LOG: t.log,
              Op.SOFTPLUS: lambda x: t.logaddexp(t.zeros_like(x), x), Op.SIGMOID: t.sigmoid,
              Op.LOGSIGMOID: F.logsigmoid, Op.SILU: lambda x: x * t.sigmoid(x), Op.SQRT: t.sqrt,
              Op.RSQRT: t.rsqrt, Op.STEP: lambda x: (x >= 0).to(t.float32)}
        bi = {Op.ADD: t.add, Op.SUB: t.sub, Op.MUL: t.mul, Op.DIV: t.div,
              Op.MAXIMUM: t.maximum, Op.MINIMUM: t.minimum}
        if op in un:
            return un[op](s[0])
        if op in bi:
            return bi[op](s[0], s[1])
        if op is Op.CLAMP:
            lo, hi = n.arg
            return t.clamp(s[0], lo, hi)
        if op is Op.SUM:
            return s[0].sum(dim=tuple(self.axis[d] for d in n.arg), keepdim=True)
        if op is Op.MAX:
            return s[0].amax(dim=tuple(self.axis[d] for d in n.arg), keepdim=True)
        if op is Op.FLIP:
            return s[0].flip(self.axis[n.arg])
        if op is Op.L2NORM:
            from scancc.ir.expr import L2NORM_EPS
            x = s[0]
            return x / t.sqrt((x * x).sum(dim=self.axis[n.arg], keepdim=True) + L2NORM_EPS)
        if op is Op.GROUP:
            g, d = n.arg
            rep = self.sizes[d] // self.sizes[g]
            return s[0].repeat_interleave(rep, dim=self.axis[g]).transpose(self.axis[g],
                                                                           self.axis[d])
        if op is Op.UNGROUP:
            d, g = n.arg
            x, ad = s[0], self.axis[d]
            shape = list(x.shape)
            split = shape[:ad] + [self.sizes[g], shape[ad] // self.sizes[g]] + shape[ad + 1:]
            return x.reshape(split).sum(dim=ad + 1).transpose(ad, self.axis[g])
        raise NotSupported(f"op {op.value!r}")  # plan() refuses these first


# ---- the kernels ----

@lru_cache(maxsize=1)
def kernels():
    """(fwd_h, bwd_dh, bwd_dv, bwd_dqk, bwd_dv_diag, bwd_dqk_diag) of
    ``chunked_backward_kernels``, imported on first use (after the runtime chose the
    interpreter or the GPU)."""
    from . import runtime
    runtime.prepare()
    from . import chunked_backward_kernels as m
    return m.fwd_h, m.bwd_dh, m.bwd_dv, m.bwd_dqk, m.bwd_dv_diag, m.bwd_dqk_diag


@lru_cache(maxsize=1)
def householder_kernels():
    """(hh_fwd_h, hh_bwd_dh) of ``chunked_backward_kernels``: the householder decays'
    sequential passes (``chunked_backward_householder``), imported as ``kernels``."""
    from . import runtime
    runtime.prepare()
    from . import chunked_backward_kernels as m
    return m.hh_fwd_h, m.hh_bwd_dh


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclass
class Config:
    BT: int
    BK: int
    BV: int
    num_warps: int
    precision: str
    BVS: int = 0    # the V tile of the sequential passes fwd_h and bwd_dh (0: BV)
    BVH: int = 0    # the V tile of the householder passes hh_fwd_h, hh_bwd_dh (0: BV)


# warps per program as a multiple of the num_warps option (default 4): the kernels hold
# several [64, 64] float32 tiles (as staged.Lowering.WARPS; ptxas: docs/performance/training.md)
WARPS = 2


# the V tile of the sequential passes (fwd_h, bwd_dh): 128 wide, each K tile of k / q is
# then read once per 128 columns of V rather than per 64 (ptxas at K=V=128, 8 warps: zero
# spills; docs/performance/training.md)
SEQ_BV = 128


# the householder passes hold the whole K axis (W S contracts over it): [K, 32] state tiles
# (ptxas at K=V=128, 8 warps: zero spills with 32-row sub-blocks; docs/performance/training.md)
HH_BV = 32


def config(K: int, V: int, options: Mapping[str, Any], diag: bool = False) -> Config:
    """Block sizes and warps of the kernels: chunks of 64 steps (16 for key-diagonal decays,
    whose intra-chunk terms are [BT, BT, BK] products, as the forward's), K and V in blocks of at most
    64 (the ``block_sizes`` of the time, K and V dims and ``num_warps`` override; the keys
    "time", "K", "V" here); the sequential passes take V in blocks of up to ``SEQ_BV``
    unless the V block is given. ``dot_precision`` "auto": tf32 when the call's inputs were 16-bit
    (``options["_inputs_16bit"]``), tf32x3 on float32 ones (as the forward)."""
    bs = dict(options.get("block_sizes") or {})
    nw = min(WARPS * (options.get("num_warps") or 4), 32)
    mode = options.get("dot_precision", "auto") or "auto"
    prec = ("tf32" if options.get("_inputs_16bit") else "tf32x3") if mode == "auto" \
        else PRECISION[mode]
    return Config(max(16, bs.get("time", 16 if diag else 64)),
                  max(16, bs.get("K", min(_pow2(K), 64))),
                  max(16, bs.get("V", min(_pow2(V), 64))), nw, prec,
                  max(16, bs.get("V", min(_pow2(V), SEQ_BV))),
                  max(16, bs.get("V", min(_pow2(V), HH_BV))))


_SCALE_OPS = {Op.CONST, Op.SIZE, Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.ADD, Op.SUB,
              Op.MUL, Op.DIV}


@dataclass
class _Factor:
    """A tensor the kernels address through strides (``chunked_backward_kernels``'s doc): the
    grid index's outer and inner strides and group ratios, then time's and the feature's
    (stride 0: the tensor lacks that dim and is read broadcast along it)."""
    t: Any
    s0: int
    s1: int
    r0: int = 1
    r1: int = 1
    st: int = 0
    sf: int = 0

    def read(self) -> list:
        return [self.t, self.s0, self.s1, self.r0, self.r1, self.st, self.sf]

    def write(self) -> list:
        return [self.t, self.s0, self.s1, self.st, self.sf]


def _flat_factor(x, N1: int) -> _Factor:
    """A contiguous [G, T] or [G, T, F] tensor (G = outer x N1)."""
    T = x.shape[1]
    f = x.shape[2] if x.dim() == 3 else 1
    return _Factor(x, N1 * T * f, T * f, 1, 1, f, 1 if x.dim() == 3 else 0)


def _direct(rec: Recurrence, grid, sizes, e: Node, feat, tensors) -> tuple[_Factor, str] | None:
    """``e`` read straight from one input (or output cotangent) where it lies, when it is that
    tensor (maybe grouped: ``group(B, groups, heads)`` reads B per group) over at most the
    grid, time and ``feat`` dims: (its strided factor, the tensor's name), else None.
    ``tensors``: name -> (tensor, its dims)."""
    if len(grid) > 2:
        return None
    groups = {}
    while e.op is Op.GROUP:
        g, d = e.arg
        groups[d] = g
        e = e.src[0]
    if e.op is not Op.INPUT or e.arg not in tensors:
        return None
    x, dims = tensors[e.arg]
    allowed = set(grid) | {rec.time} | ({feat} if feat else set()) | set(groups.values())
    if set(dims) - allowed or any(g not in dims for g in groups.values()):
        return None

    def at(d):
        if d in groups:
            g = groups[d]
            return x.stride(dims.index(g)), sizes[d] // sizes[g]
        return (x.stride(dims.index(d)), 1) if d in dims else (0, 1)
    (s0, r0) = at(grid[0]) if len(grid) >= 1 else (0, 1)
    (s1, r1) = at(grid[1]) if len(grid) == 2 else (0, 1)
    st = at(rec.time)[0]
    sf = at(feat)[0] if feat else 0
    return _Factor(x, s0, s1, r0, r1, st, sf), e.arg


def _scaled(e: Node) -> tuple[Node, Node | None]:
    """``e`` as (x, scale) when it is x times a constant expression (the cotangent of a
    contraction scaled by rsqrt(size(key)), say), else (e, None)."""
    if e.op is Op.MUL:
        for a, b in ((e.src[0], e.src[1]), (e.src[1], e.src[0])):
            if all(n.op in _SCALE_OPS for n in b.walk()):
                return a, b
    return e, None


def backward(rec: Recurrence, inputs: Mapping[str, Any], d_out: Mapping[str, Any],
             sizes: Mapping[str, int], initial_state: Mapping[str, Any] | None,
             d_final_state: Mapping[str, Any] | None,
             options: Mapping[str, Any]) -> tuple[dict, dict]:
    """Gradients (by input name, by state name) of a chunkable recurrence: float32 torch
    tensors, ``inputs`` in their declared full layouts (float32), ``sizes`` the dim sizes."""
    import torch
    p = plan(rec)
    F, s = p.form, rec.state(p.state)
    T, K, V = sizes[rec.time], sizes[F.K], sizes[F.V]
    grid = rec.order(F.grid)
    G = 1
    for d in grid:
        G *= sizes[d]
    dev = next(iter(inputs.values())).device
    f32 = torch.float32
    opts = dict(options)
    bs = dict(opts.get("block_sizes") or {})
    opts["block_sizes"] = {role: bs[d] for role, d in (("time", rec.time), ("K", F.K),
                                                       ("V", F.V)) if d in bs}
    diag = F.kind is Kind.DIAGONAL
    cfg = config(K, V, opts, diag)

    cots: dict = {}
    # the output cotangents, converted to float32 only when a torch op reads them (the
    # kernels read a cotangent that is dO in place)
    raw = {p.cot[o.name]: (o, d_out.get(o.name)) for o in rec.outputs}

    def leaf(name):
        if name in cots:
            return cots[name]
        if name in raw:
            o, d = raw[name]
            if d is None:
                d = torch.zeros(tuple(sizes[x] for x in o.dims), dtype=f32, device=dev)
            cots[name] = ev.to_canon(d.to(f32), o.dims)
            return cots[name]
        if name in inputs:
            return ev.to_canon(inputs[name].to(f32), rec.input(name).dims)
        raise KeyError(name)
    ev = _TorchEval(rec, p.ctx_rec, sizes, leaf)
    ev.device = dev

    canon = rec.canonical
    ax = {d: 1 + i for i, d in enumerate(canon)}

    def flat(val, feat):
        """A time-led canonical value -> [G, T, |feat|] contiguous float32 (feat None: [G, T])."""
        keep = list(grid) + ([feat] if feat else [])
        full = (T,) + tuple(sizes[d] if d in keep else 1 for d in canon)
        val = val.expand(full)
        for d in reversed(canon):                 # drop the size-1 dims the factor lacks
            if d not in keep:
                val = val.squeeze(ax[d])
        # now (T, *keep in canonical order): grid first, time next, feat last
        order = [d for d in canon if d in keep]
        perm = [1 + order.index(d) for d in grid] + [0] + \
            ([1 + order.index(feat)] if feat else [])
        return val.permute(perm).reshape((G, T) + ((sizes[feat],) if feat else ())) \
            .contiguous()

    def unflat(x, feat):
        """[G, T, |feat|] -> time-led canonical."""
        x = x.reshape(tuple(sizes[d] for d in grid) + (T,) + ((sizes[feat],) if feat else ()))
        names = list(grid) + [rec.time] + ([feat] if feat else [])
        order = [rec.time] + [d for d in canon if d in names]
        return ev.spread(x.permute([names.index(d) for d in order]), names)

    N1 = sizes[grid[1]] if len(grid) == 2 else 1
    tensors = {x.name: (inputs[x.name], x.dims) for x in rec.inputs}
    tensors.update({p.cot[o.name]: (d_out[o.name], o.dims) for o in rec.outputs
                    if d_out.get(o.name) is not None})
    direct = {} if F.kind is Kind.HOUSEHOLDER else {
        "q": _direct(rec, grid, sizes, p.q, F.K, tensors),
        "k": _direct(rec, grid, sizes, p.k, F.K, tensors),
        "v": _direct(rec, grid, sizes, p.v, F.V, tensors),
        "g": _direct(rec, grid, sizes, p.g, F.K if diag else None, tensors)
        if p.g is not None else None,
        "w": _direct(rec, grid, sizes, p.w, None, tensors) if p.w is not None else None}
    do_e, do_scale = _scaled(p.d_contraction)
    if F.kind is not Kind.HOUSEHOLDER:
        direct["do"] = _direct(rec, grid, sizes, do_e, F.V, tensors)
    do_scale = float(ev.eval(do_scale).reshape(-1)[0]) \
        if do_scale is not None and direct.get("do") is not None else 1.0

    def factor(name, e, feat):
        """The kernels' view of factor ``name``: straight from its input, else materialised."""
        d = direct.get(name)
        return d[0] if d is not None else _flat_factor(flat(ev.eval(e), feat), N1)
    if F.kind is Kind.HOUSEHOLDER:
        fq, fk, fv = flat(ev.eval(p.q), F.K), flat(ev.eval(p.k), F.K), flat(ev.eval(p.v), F.V)
        fdo = flat(ev.eval(p.d_contraction), F.V)
        fg = flat(ev.eval(p.g), None) if p.g is not None else None
    else:
        fq, fk, fv = factor("q", p.q, F.K), factor("k", p.k, F.K), factor("v", p.v, F.V)
        fdo = factor("do", p.d_contraction, F.V)
        fg = factor("g", p.g, F.K if diag else None) if p.g is not None else None
        fw = factor("w", p.w, None) if p.w is not None else None

    def state_flat(x):
        x = x.to(f32).permute([s.dims.index(d) for d in grid] +
                              [s.dims.index(F.K), s.dims.index(F.V)])
        return x.reshape(G, K, V).contiguous()
    h0 = (initial_state or {}).get(s.name)
    dht = (d_final_state or {}).get(s.name)
    h0 = state_flat(h0) if h0 is not None else None
    dht = state_flat(dht) if dht is not None else None

    nc, nk, nv = -(-T // cfg.BT), -(-K // cfg.BK), -(-V // cfg.BV)

    def new(*shape, dtype=f32):
        if POISON:
            return torch.full(shape, float("nan"), dtype=dtype, device=dev)
        return torch.empty(shape, dtype=dtype, device=dev)
    if F.kind is Kind.HOUSEHOLDER:
        return _householder(p, ev, cots, flat, unflat, fq, fk, fv, fdo, fg, h0, dht, cfg, new,
                            sizes, dev)
    # the chunk-boundary states and their gradients in bfloat16 for 16-bit calls (as fla
    # keeps them in the input dtype): the passes carry them in float32, only the copies the
    # per-chunk kernels read are rounded
    sdt = torch.bfloat16 if opts.get("_inputs_16bit") else f32
    hc, dhc, dh0 = new(G, nc, K, V, dtype=sdt), new(G, nc, K, V, dtype=sdt), new(G, K, V)
    has_g = fg is not None
    done: dict = {}   # input name -> its gradient, written by the kernels in its layout

    def grad_out(name, feat, flat_shape):
        """Where the kernels write factor ``name``'s gradient: when the factor is read from
        an input of exactly its dims, a tensor in that input's layout -- its gradient itself
        when that is exactly this factor's cotangent (the chain rule's identity, e.g.
        linear_attn's q), else one the chain rule's torch ops then read in the layout their
        result takes (mamba2's dL/dx + dy D: no transposing copy); else a float32 [G, T, F]
        tensor."""
        d = direct.get(name)
        if d is not None and d[0].r0 == d[0].r1 == 1 and d[0].st and (feat is None or d[0].sf):
            x = rec.input(d[1]) if d[1] in {i.name for i in rec.inputs} else None
            if x is not None and \
                    set(x.dims) == set(grid) | {rec.time} | ({feat} if feat else set()):
                out = new(*(sizes[d_] for d_ in x.dims))
                if p.grads[x.name] == Node(Op.INPUT, (), p.fcot[name]):
                    done[x.name] = out
                got = _direct(rec, grid, sizes, Node(Op.INPUT, (), x.name), feat,
                              {x.name: (out, x.dims)})
                return got[0], ev.to_canon(out, x.dims)
        out = new(*flat_shape)
        return _flat_factor(out, N1), None
    dq, cq = grad_out("q", F.K, (G, T, K))
    dk, ck = grad_out("k", F.K, (G, T, K))
    dv, cv = grad_out("v", F.V, (G, T, V))
    dgk = cg = None
    if has_g:
        if diag or nk == 1:
            dgk, cg = grad_out("g", F.K if diag else None, (G, T, K) if diag else (G, T))
        else:  # each K-block's share, summed below: [G, nk, T]
            x = new(G, nk, T)
            dgk = _Factor(x, N1 * nk * T, nk * T, 1, 1, 1, T)
    fo = _flat_factor(new(G, T, V), N1) if p.needs_o else None
    has_w = fw is not None
    # dL/dw: each V-block's share ([G, nv, T], summed below; [G, T] with one V-block)
    dw = (_flat_factor(new(G, T), N1) if nv == 1 else
          _Factor(new(G, nv, T), N1 * nv * T, nv * T, 1, 1, 1, T)) if has_w else None
    wf, dwf = (fw, dw) if has_w else (fq, dv)     # not read / written without HAS_W
    fwd_h, bwd_dh, bwd_dv, bwd_dqk, bwd_dv_diag, bwd_dqk_diag = kernels()
    gf = fg if has_g else fq                       # not read without HAS_G
    kw = dict(BT=cfg.BT, BK=cfg.BK, BV=cfg.BV, PREC=cfg.precision, num_warps=cfg.num_warps)
    dg = None
    if T > 0:
        import numpy as np
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            nvs = -(-V // cfg.BVS)
            seq = dict(kw, BV=cfg.BVS)
            fwd_h[(G, nk, nvs)](*fk.read(), *fv.read(), *gf.read(),
                               *wf.read(), h0 if h0 is not None else fk.t, hc, T, K, V,
                               nc, N1, HAS_W=has_w, HAS_G=has_g, HAS_H0=h0 is not None,
                               DIAG=diag, **seq)
            bwd_dh[(G, nk, nvs)](*fq.read(), *fdo.read(), *gf.read(), do_scale,
                                 dht if dht is not None else fq.t, dhc, dh0, T, K, V, nc, N1,
                                 HAS_G=has_g, HAS_DHT=dht is not None, DIAG=diag, **seq)
            ov = fo if fo is not None else dv
            qkvg = [*fq.read(), *fk.read(), *fv.read(), *gf.read()]
            rest = [*fdo.read(), do_scale, hc, dhc]
            dv_args = [*qkvg, *rest, *dv.write(), *ov.write(), *wf.read(), *dwf.write(), T, K,
                       V, nc, N1]
            dqk_args = [*qkvg, *wf.read(), *rest, *dq.write(), *dk.write(),
                        *(dgk if has_g else dq).write(), T, K, V, nc, N1]
            if diag:
                bwd_dv_diag[(G, nc, nv)](*dv_args, HAS_W=has_w, WANT_O=fo is not None, **kw)
                bwd_dqk_diag[(G, nc, nk)](*dqk_args, HAS_W=has_w, **kw)
            else:
                bwd_dv[(G, nc, nv)](*dv_args, HAS_W=has_w, HAS_G=has_g, WANT_O=fo is not None,
                                    **kw)
                bwd_dqk[(G, nc, nk)](*dqk_args, HAS_G=has_g, HAS_W=has_w, **kw)
        if has_g:
            dg = dgk.t if (diag or nk == 1) else dgk.t.sum(1)
    else:
        dh0 = dht if dht is not None else torch.zeros(G, K, V, dtype=f32, device=dev)
        if has_g:
            dg = dgk.t if cg is not None else \
                torch.zeros((G, 0, K) if diag else (G, 0), dtype=f32, device=dev)
    # the chain rule: factor cotangents in, input gradients out
    cots[p.fcot["q"]] = cq if cq is not None else unflat(dq.t, F.K)
    cots[p.fcot["k"]] = ck if ck is not None else unflat(dk.t, F.K)
    cots[p.fcot["v"]] = cv if cv is not None else unflat(dv.t, F.V)
    if has_g:
        cots[p.fcot["g"]] = cg if cg is not None else unflat(dg, F.K if diag else None)
    if has_w:
        cots[p.fcot["w"]] = unflat(dw.t if nv == 1 or T == 0 else dw.t.sum(1), None) \
            if T > 0 else torch.zeros((0,) + ev.shape(grid), dtype=f32, device=dev)
    if fo is not None:
        cots[p.o_name] = unflat(fo.t, F.V) if T > 0 else \
            torch.zeros((0,) + ev.shape(rec.dims_of(p.form.contraction)), dtype=f32, device=dev)
    return _chain(p, ev, sizes, dh0, dev, done)


def _householder(p, ev, cots, flat, unflat, fq, fk, fv, fdo, fg, h0, dht, cfg, new, sizes,
                 dev):
    """The householder kind (``chunked_backward_householder``: torch ops, WY/UT form)."""
    import torch
    from . import chunked_backward_householder as hh
    F, rec = p.form, p.rec
    T, K, V = sizes[rec.time], sizes[F.K], sizes[F.V]
    f32 = torch.float32
    fhk, fbeta = flat(ev.eval(p.hk), F.K), flat(ev.eval(p.beta), None)
    G = fq.shape[0]
    if T > 0:
        dq, dhk, du, dw, dbeta, dg, dh0, fo = hh.backward(fq, fhk, fk, fv, fbeta, fg, fdo, h0,
                                                          dht, cfg.BT, new, cfg=cfg,
                                                          kernels=householder_kernels())
    else:
        dq, dhk, du = (torch.zeros(G, 0, K, dtype=f32, device=dev) for _ in range(3))
        dw, dbeta = torch.zeros(G, 0, V, dtype=f32, device=dev), \
            torch.zeros(G, 0, dtype=f32, device=dev)
        dg = torch.zeros(G, 0, dtype=f32, device=dev) if fg is not None else None
        fo = torch.zeros(G, 0, V, dtype=f32, device=dev)
        dh0 = dht if dht is not None else torch.zeros(G, K, V, dtype=f32, device=dev)
    cots[p.fcot["q"]], cots[p.fcot["k"]] = unflat(dq, F.K), unflat(du, F.K)
    cots[p.fcot["v"]], cots[p.fcot["hk"]] = unflat(dw, F.V), unflat(dhk, F.K)
    cots[p.fcot["beta"]] = unflat(dbeta, None)
    if fg is not None:
        cots[p.fcot["g"]] = unflat(dg, None)
    if p.needs_o:
        cots[p.o_name] = unflat(fo, F.V)
    return _chain(p, ev, sizes, dh0, dev)


def _chain(p, ev, sizes, dh0, dev, done=None):
    """Input gradients from the factor cotangents (set in ``ev``'s leaves) and dh0; ``done``:
    those the kernels wrote already."""
    import torch
    rec, F, s = p.rec, p.form, p.rec.state(p.state)
    T, K, V = sizes[rec.time], sizes[F.K], sizes[F.V]
    f32 = torch.float32
    grid = rec.order(F.grid)
    grads = {}
    for x in rec.inputs:
        e = p.grads[x.name]
        shape = tuple(sizes[d] for d in x.dims)
        if done and x.name in done:
            grads[x.name] = done[x.name]
            continue
        if e is None:
            grads[x.name] = torch.zeros(shape, dtype=f32, device=dev)
            continue
        val = ev.eval(e)
        if rec.time in x.dims:
            val = val.expand((T,) + tuple(val.shape[1:]))
        elif val.shape[0] != T:              # a time-invariant contribution, at every step
            val = val * T
        grads[x.name] = ev.from_canon(val, x.dims).to(f32).contiguous()
    d0 = dh0.reshape(tuple(sizes[d] for d in grid) + (K, V))
    names = list(grid) + [F.K, F.V]
    d0 = d0.permute([names.index(d) for d in s.dims]).contiguous()
    return grads, {s.name: d0}


__all__ = ["plan", "applies", "backward", "kernels", "config", "Plan",
           "NotSupported", "KINDS"]
