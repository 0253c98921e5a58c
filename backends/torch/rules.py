"""The torch backend's rules: the PyTorch text of each IR op and each transition kind.

Two registries (``backends/rules.py``), with the same names in every backend:

- ``OP_RULES[op](L, node, src) -> str``: a torch expression for ``node`` from the expressions
  of its operands ``src`` (names or number literals). Values are full-rank tensors in the
  recurrence's canonical dim order with a leading time axis (size n or 1), as the reference's
  are, so the axis of dim d is ``L.ax(d)``; a literal stays a Python number until an op needs
  a tensor (``L.tensor``).
- ``TRANSITION_RULES[kind](L, h, b, ops, axis, col) -> str``: a torch expression for one step
  of a state from the names of ``h = h_{t-1}``, the injected term ``b`` and the operands
  ``ops`` at the step (no time axis: the axis of dim d is ``L.step_ax(d)``). A rule that needs a
  helper function asks ``L.helper(name)`` (the helpers below, emitted into the module once).
"""
from __future__ import annotations

from scancc.ir import Kind, Op
from scancc.ir.expr import L2NORM_EPS
from scancc.ir.passes.softmax import joint_softmax_expr

from ..rules import Rules

OP_RULES = Rules("torch", "op")
TRANSITION_RULES = Rules("torch", "transition")


def _num(v: float) -> str:
    s = repr(float(v))
    if s in ("inf", "-inf", "nan"):
        return f'float("{s}")'
    return f"({s})" if s.startswith("-") else s


# ---- leaves ----

@OP_RULES.register(Op.INPUT, Op.STATE, Op.PREV)
def _leaf_rule(L, node, src):
    return L.leaf(node)


@OP_RULES.register(Op.PARAM)
def _param_rule(L, node, src):
    return L.let(node.arg)


@OP_RULES.register(Op.CONST)
def _const_rule(L, node, src):
    return _num(node.arg)


@OP_RULES.register(Op.SIZE)
def _size_rule(L, node, src):
    return f"float({L.sz(node.arg)})"


@OP_RULES.register(Op.IOTA)
def _iota_rule(L, node, src):
    d = node.arg
    shape = ", ".join("-1" if c == d else "1" for c in ("<t>",) + L.canon)
    return f"torch.arange({L.sz(d)}, dtype=acc, device=dev).reshape({shape})"


# ---- elementwise ----

_UNARY = {
    Op.EXP: "torch.exp({})", Op.EXPM1: "torch.expm1({})", Op.LOG: "torch.log({})",
    Op.SOFTPLUS: "torch.logaddexp({}, torch.zeros((), dtype=acc, device=dev))",
    Op.SIGMOID: "torch.sigmoid({})", Op.LOGSIGMOID: "torch.nn.functional.logsigmoid({})",
    Op.SILU: "torch.nn.functional.silu({})", Op.SQRT: "torch.sqrt({})",
    Op.RSQRT: "torch.rsqrt({})", Op.STEP: "({} >= 0).to(acc)",
    Op.COS: "torch.cos({})", Op.SIN: "torch.sin({})", Op.ABS: "torch.abs({})",
    Op.TANH: "torch.tanh({})",
}


def _unary(fmt: str):
    def rule(L, node, src):
        return fmt.format(L.tensor(src[0]))
    return rule


for _op, _fmt in _UNARY.items():
    OP_RULES.add([_op], _unary(_fmt))


@OP_RULES.register(Op.NEG)
def _neg_rule(L, node, src):
    return f"-{L.par(src[0])}"


_INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/"}


@OP_RULES.register(*_INFIX)
def _infix_rule(L, node, src):
    a, b = src
    return f"{L.par(a)} {_INFIX[node.op]} {L.par(b)}"


@OP_RULES.register(Op.MAXIMUM, Op.MINIMUM)
def _minmax_rule(L, node, src):
    f = "maximum" if node.op is Op.MAXIMUM else "minimum"
    return f"torch.{f}({L.tensor(src[0])}, {L.tensor(src[1])})"


@OP_RULES.register(Op.CLAMP)
def _clamp_rule(L, node, src):
    lo, hi = node.arg
    args = "".join(f", {k}={_num(v)}" for k, v in (("min", lo), ("max", hi)) if v is not None)
    return f"torch.clamp({L.tensor(src[0])}{args})"


# ---- dim-structured ----

def _axes(L, dims) -> str:
    ax = [L.ax(d) for d in dims]
    return str(ax[0]) if len(ax) == 1 else "(" + ", ".join(map(str, ax)) + ")"


@OP_RULES.register(Op.SUM)
def _sum_rule(L, node, src):
    return f"{L.par(L.tensor(src[0]))}.sum({_axes(L, node.arg)}, keepdim=True)"


@OP_RULES.register(Op.MAX)
def _max_rule(L, node, src):
    return f"{L.par(L.tensor(src[0]))}.amax({_axes(L, node.arg)}, keepdim=True)"


@OP_RULES.register(Op.L2NORM)
def _l2norm_rule(L, node, src):
    x = L.bind(L.tensor(src[0]))
    return f"{x} / torch.sqrt(({x} * {x}).sum({L.ax(node.arg)}, keepdim=True) + {L2NORM_EPS!r})"


@OP_RULES.register(Op.FLIP)
def _flip_rule(L, node, src):
    return f"torch.flip({L.tensor(src[0])}, ({L.ax(node.arg)},))"


@OP_RULES.register(Op.GROUP)
def _group_rule(L, node, src):
    g, d = node.arg
    ag, ad = L.ax(g), L.ax(d)
    rep = f"{L.sz(d)} // {L.sz(g)}"
    return f"torch.repeat_interleave({L.tensor(src[0])}, {rep}, dim={ag}).transpose({ag}, {ad})"


@OP_RULES.register(Op.UNGROUP)
def _ungroup_rule(L, node, src):
    d, g = node.arg
    ad, ag = L.ax(d), L.ax(g)
    return (f"{L.par(L.tensor(src[0]))}.unflatten({ad}, ({L.sz(g)}, -1)).sum({ad + 1})"
            f".transpose({ad}, {ag})")


@OP_RULES.register(Op.JSOFTMAX)
def _joint_softmax_rule(L, node, src):
    """``joint_softmax`` as its expansion (masked max, exp, sums); the lowering's canonicalize
    desugars it first, so this serves a caller that skipped that."""
    return L.emit(joint_softmax_expr(node))


@OP_RULES.register(Op.SOFTMAX)
def _softmax_rule(L, node, src):
    L.helper("softmax")
    mask = L.tensor(src[1]) if len(src) > 1 else "None"
    return f"_masked_softmax({L.tensor(src[0])}, {mask}, {L.ax(node.arg)})"


# ---- transitions: h_t = A_t(h_{t-1}) + b_t, one rule per structure ----

@TRANSITION_RULES.register(Kind.IDENTITY)
def _identity_rule(L, h, b, ops, axis, col):
    return f"{h} + {L.par(b)}"


@TRANSITION_RULES.register(Kind.SCALAR, Kind.DIAGONAL)
def _decay_rule(L, h, b, ops, axis, col):
    return f"{L.par(ops['decay'])} * {h} + {L.par(b)}"


@TRANSITION_RULES.register(Kind.SHIFT)
def _shift_rule(L, h, b, ops, axis, col):
    L.helper("shift_in")
    return f"_shift_in({h}, {L.step_ax(axis)}, {L.tensor(b)})"


@TRANSITION_RULES.register(Kind.COMPANION)
def _companion_rule(L, h, b, ops, axis, col):
    L.helper("shift_in")
    ax = L.step_ax(axis)
    zero = "torch.zeros((), dtype=acc, device=dev)"
    new = f"({L.par(ops['feedback'])} * _shift_in({h}, {ax}, {zero})).sum({ax}, keepdim=True)"
    return f"_shift_in({h}, {ax}, {new} + {L.par(b)})"


@TRANSITION_RULES.register(Kind.HOUSEHOLDER)
def _householder_rule(L, h, b, ops, axis, col):
    k = L.par(ops["k"])
    out = f"{h} - {L.par(ops['beta'])} * {k} * ({k} * {h}).sum({L.step_ax(axis)}, keepdim=True)"
    if "alpha" in ops:
        out = f"{L.par(ops['alpha'])} * ({out})"
    return f"{out} + {L.par(b)}"


@TRANSITION_RULES.register(Kind.DPLR)
def _dplr_rule(L, h, b, ops, axis, col):
    # (Diag(w) + a b^T) h along the axis: w * h + a * (b . h), then the inject
    low = f"{L.par(ops['a'])} * ({L.par(ops['b'])} * {h}).sum({L.step_ax(axis)}, keepdim=True)"
    diag = f"{L.par(ops['w'])} * {h}" if "w" in ops else h
    return f"{diag} + {low} + {L.par(b)}"


@TRANSITION_RULES.register(Kind.DENSE)
def _dense_rule(L, h, b, ops, axis, col):
    a, c = L.step_ax(axis), L.step_ax(col)
    return (f"({L.par(ops['matrix'])} * {h}.transpose({a}, {c})).sum({c}, keepdim=True) "
            f"+ {L.par(b)}")


@TRANSITION_RULES.register(Kind.SELECTION)
def _selection_rule(L, h, b, ops, axis, col):
    # bounded memory: the item b into the lowest free slot, else over the lowest slot with the
    # smallest key if its score is larger; nothing where not valid
    L.helper("select_slot")
    args = ", ".join(L.tensor(ops[k]) for k in ("score", "valid", "keys", "filled"))
    return f"_select_slot({h}, {L.tensor(b)}, {args}, {L.step_ax(axis)})"


# adjoint steps: h_t = A_t^T (h_{t-1} + b_t)

@TRANSITION_RULES.register(Kind.SHIFT_ADJOINT)
def _shift_adjoint_rule(L, h, b, ops, axis, col):
    L.helper("shift_out")
    return f"_shift_out({h} + {L.par(b)}, {L.step_ax(axis)})"


@TRANSITION_RULES.register(Kind.COMPANION_ADJOINT)
def _companion_adjoint_rule(L, h, b, ops, axis, col):
    L.helper("shift_out")
    ax = L.step_ax(axis)
    x = L.bind(f"{h} + {L.par(b)}")
    return f"_shift_out({x} + {L.par(ops['feedback'])} * {x}.narrow({ax}, -1, 1), {ax})"


@TRANSITION_RULES.register(Kind.DENSE_ADJOINT)
def _dense_adjoint_rule(L, h, b, ops, axis, col):
    a, c = L.step_ax(axis), L.step_ax(col)
    return (f"({L.par(ops['matrix'])} * ({h} + {L.par(b)})).sum({a}, keepdim=True)"
            f".transpose({a}, {c})")


# ---- helper functions a rule may ask for (emitted into the module once, in this order) ----

HELPERS = {
    "shift_in": '''def _shift_in(h, ax, new):
    """Drop the oldest slot of ``h`` along ``ax`` and append ``new`` as the newest."""
    slot = list(h.shape)
    slot[ax] = 1
    return torch.cat([h.narrow(ax, 1, h.shape[ax] - 1), new.expand(slot)], ax)''',
    "shift_out": '''def _shift_out(x, ax):
    """The transpose of a shift: slot i takes slot i - 1, the oldest slot becomes 0."""
    return torch.cat([torch.zeros_like(x.narrow(ax, 0, 1)), x.narrow(ax, 0, x.shape[ax] - 1)],
                     ax)''',
    "select_slot": '''def _select_slot(h, b, score, valid, keys, filled, ax):
    """One step of a bounded memory along ``ax``: the item ``b`` goes into the lowest free slot
    (``filled`` == 0), else replaces the lowest slot holding the smallest of ``keys`` if its
    ``score`` is larger; ``h`` is kept where ``valid`` == 0."""
    shape = torch.broadcast_shapes(h.shape, b.shape, score.shape, valid.shape, keys.shape,
                                   filled.shape)
    free, keys = (filled == 0).expand(shape), keys.expand(shape)
    slot = torch.arange(shape[ax], device=h.device).reshape(
        [-1 if i == ax else 1 for i in range(len(shape))])
    none = shape[ax]  # past the last slot
    first_free = torch.where(free, slot, none).amin(ax, keepdim=True)
    kmin = keys.amin(ax, keepdim=True)
    first_min = torch.where(keys == kmin, slot, none).amin(ax, keepdim=True)
    any_free = first_free < none
    idx = torch.where(any_free, first_free, first_min)
    write = (valid != 0) & (any_free | (score > kmin))
    return torch.where((slot == idx) & write, b, h)''',
    "softmax": '''def _masked_softmax(logits, mask, ax):
    """Softmax along ``ax``; weight 0 where ``mask`` == 0 (a fully masked row reads nothing)."""
    keep = torch.ones_like(logits, dtype=torch.bool) if mask is None else (mask != 0)
    logits, keep = torch.broadcast_tensors(logits, keep)
    masked = torch.where(keep, logits, float("-inf"))
    m = masked.amax(ax, keepdim=True)
    p = torch.where(keep, torch.exp(masked - torch.where(torch.isfinite(m), m, 0.0)), 0.0)
    s = p.sum(ax, keepdim=True)
    return p / torch.where(s == 0, 1.0, s)''',
    "linear_scan": '''def _linear_scan(a, b):
    """h_t = a_t h_(t-1) + b_t along dim 0 from h = 0, as a parallel prefix scan (Brent-Kung:
    an up-sweep and a down-sweep of log2(n) vectorised steps each, about 2n combines in all):
    returns (a_t ... a_1, h_t)."""
    n = b.shape[0]
    a = a.expand(n, *a.shape[1:]).clone()
    b = b.expand((n,) + torch.broadcast_shapes(a.shape[1:], b.shape[1:])).clone()
    s = 1
    while s < n:  # up-sweep: step 2s-1 of each block of 2s composes the whole block
        m = len(range(2 * s - 1, n, 2 * s))
        b[2 * s - 1::2 * s] += a[2 * s - 1::2 * s] * b[s - 1::2 * s][:m]
        a[2 * s - 1::2 * s] *= a[s - 1::2 * s][:m]
        s *= 2
    s //= 2
    while s >= 1:  # down-sweep: the steps between complete prefixes
        m = len(range(3 * s - 1, n, 2 * s))
        b[3 * s - 1::2 * s] += a[3 * s - 1::2 * s] * b[2 * s - 1::2 * s][:m]
        a[3 * s - 1::2 * s] *= a[2 * s - 1::2 * s][:m]
        s //= 2
    return a, b''',
    "diag_scores": '''def _diag_decay_scores(q, k, c, R):
    """scores[t, s] = sum_K q_t k_s exp(c_t - c_s) for s <= t with no reset in (s, t] (else 0):
    [..., n, K] -> [..., n, n], by halving (n padded to a power of two N): for every block of
    2h steps (h = 1, 2, 4, ..., N/2), all blocks at once, a step s of its first half reaches a
    step t of its second half through the first half's last step m, exp(c_t - c_m) exp(c_m -
    c_s): one batched matmul per h, both exponents <= 0 for decays <= 1 (no exp of a positive
    cumulative sum; exact up to rounding); the pairs s = t are q_t . k_t. A reset in (s, t]
    lies in (s, m] or (m, t]: the factor of that side is dropped (a select: its exp may
    overflow). Elementwise work O(n K log n), not the O(n^2 K) of pairwise decays."""
    n, K = q.shape[-2], q.shape[-1]
    lead = q.shape[:-2]
    N = 1 << max(n - 1, 0).bit_length()
    if N != n:  # padded steps come after every real one (only padded rows read them)
        p = N - n
        q, k = (torch.nn.functional.pad(x, (0, 0, 0, p)) for x in (q, k))
        c, R = (torch.cat([x, x[..., -1:, :].expand(*lead, p, K)], -2) for x in (c, R))
    out = q.new_zeros(*lead, N, N)
    out.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))
    h = 1
    while h < N:
        nb = N // (2 * h)
        qb, kb, cb, Rb = (x.reshape(*lead, nb, 2, h, K) for x in (q, k, c, R))
        cm, Rm = cb[..., 0, -1:, :], Rb[..., 0, -1:, :]  # [..., nb, 1, K]: first half's end
        qs = torch.where(Rb[..., 1, :, :] == Rm,
                         qb[..., 1, :, :] * torch.exp(cb[..., 1, :, :] - cm), 0.0)
        ks = torch.where(Rb[..., 0, :, :] == Rm,
                         kb[..., 0, :, :] * torch.exp(cm - cb[..., 0, :, :]), 0.0)
        # out[block b: second half rows, first half columns] for every b (a strided view)
        blk = out.view(*lead, nb, 2, h, nb, 2, h)[..., :, 1, :, :, 0, :]
        blk.diagonal(dim1=-4, dim2=-2).copy_((qs @ ks.transpose(-1, -2)).movedim(-3, -1))
        h *= 2
    return out[..., :n, :n] if N != n else out''',
    "flush_subnormal": '''def _flush_subnormal(x):
    """``x`` with its subnormal entries (|x| < the dtype's smallest normal) set to 0: powers
    of a stable filter's transition decay into them, and subnormal arithmetic is ~100x slower
    on x86 CPUs; the change is below the smallest normal number."""
    return x.masked_fill(x.abs() < torch.finfo(x.dtype).tiny, 0)''',
    "companion_chunk": '''def _companion_chunk(h, b, f, ax, block=32):
    """The newest slots w_0..w_(n-1) a companion state with time-invariant feedback ``f``
    appends over a chunk, [n, ...] with size 1 along ``ax``: w_t = b_t + sum_{L=1}^{p}
    c_L w_(t-L), c_L = f[W-1-L], p = W-1, the window ``h`` holding the w before the chunk.
    Closed form in blocks of ``block`` steps, a fixed number of big ops for any n:
    - one unit lower-triangular (banded Toeplitz) solve gives, for every block at once, its
      slots from a zero state (forward substitution: the recurrence's order), and G [block, p],
      a block's slots from a unit entering window (its zero-input response);
    - the windows entering the blocks, s_(k+1) = M s_k + z_k (M = G's last p rows, z_k the
      last p zero-state slots of block k), by a log-depth doubling scan over the blocks;
    - every block's slots: its zero-state slots + G s_k, one batched matmul."""
    n, W = b.shape[0], h.shape[ax]
    p = W - 1
    if p == 0:
        return b
    hm, fl = h.movedim(ax, -1), f.movedim(ax, -1).flip(-1)   # fl[..., L] = c_L
    bm = b.movedim(ax + 1, -1)[..., 0]                       # [n, ...]
    shape = torch.broadcast_shapes(hm.shape[:-1], fl.shape[:-1], bm.shape[1:])
    Lb = max(min(n, block), p)                               # block length (>= p)
    nb = -(-n // Lb)                                         # blocks (the last one zero-padded)
    # time last, a row per block: one 2-D transposing copy (fast), then the zero padding
    Bk = bm.expand(n, *shape).reshape(n, -1).t().contiguous().reshape(*shape, n)
    # a non-finite input poisons its step and every later one (as the recurrence does), not
    # the block's earlier steps (the matmul would): 0 into the matmul, NaN added back after
    poison = torch.cumsum(Bk - Bk, -1)                       # 0, NaN from the first bad step
    Bk = torch.nan_to_num(Bk, nan=0.0, posinf=0.0, neginf=0.0)
    if nb * Lb != n:
        Bk = torch.nn.functional.pad(Bk, (0, nb * Lb - n))
    Bk = Bk.reshape(*shape, nb, Lb)
    # the impulse response g of the all-pole filter over a block (forward substitution, the
    # recurrence's order; subnormals flushed), then Toeplitz matrices as flipped sliding
    # windows (unfold): Ti[s, t] = g_(t-s), the transposed inverse of the unit lower-triangular
    # band A; R[t, j] = c_(t+p-j) (0 past lag p): step t of a block reads slot j of the
    # entering window (w_(j-p)) at lag t+p-j
    a = torch.cat([torch.ones_like(fl[..., :1]), -fl[..., 1:]], -1)
    a = torch.nn.functional.pad(a, (Lb - 1, max(Lb - W, 0)))[..., :2 * Lb - 1]
    A = a.unfold(-1, Lb, 1).flip(-1)                          # [*, Lb, Lb]: A[t, j] = a_(t-j)
    e0 = torch.zeros(Lb, 1, dtype=A.dtype, device=A.device)
    e0[0] = 1
    g = torch.linalg.solve_triangular(A, e0, upper=False, unitriangular=True)[..., 0]
    g = torch.nn.functional.pad(_flush_subnormal(g), (Lb - 1, 0))
    Ti = g.unfold(-1, Lb, 1).flip(-2)                        # [*, Lb, Lb]: Ti[s, t] = g_(t-s)
    R = torch.nn.functional.pad(fl[..., 1:], (0, Lb - 1)).unfold(-1, p, 1).flip(-1)
    Z = Bk @ Ti                                              # [..., nb, Lb]: zero-state slots
    Gt = _flush_subnormal(R.transpose(-1, -2) @ Ti)          # [*, p, Lb]: from a unit window
    s0 = hm[..., 1:].expand(*shape, p)[..., None, :]          # the window entering the chunk
    if nb > 1:  # the windows leaving each block: e_k = e_(k-1) M^T + z_k, e_(-1) = s0
        Mt = Gt[..., Lb - p:]
        e = Z[..., Lb - p:] + torch.nn.functional.pad(s0 @ Mt, (0, 0, 0, nb - 1))
        d = 1
        while d < nb:                                          # doubling (Hillis-Steele) scan
            e = torch.cat([e[..., :d, :], e[..., d:, :] + e[..., :nb - d, :] @ Mt], -2)
            Mt, d = _flush_subnormal(Mt @ Mt), 2 * d
        s0 = torch.cat([s0, e[..., :nb - 1, :]], -2)          # [..., nb, p]: entering windows
    w = (Z + s0 @ Gt).reshape(*shape, nb * Lb)[..., :n] + poison
    return w.movedim(-1, 0).unsqueeze(ax + 1)''',
}

__all__ = ["OP_RULES", "TRANSITION_RULES", "HELPERS"]
