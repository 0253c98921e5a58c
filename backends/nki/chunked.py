"""The chunked (SSD) form of scalar/identity states on the Tensor engine.

For a state S[..., K, V] with ``S_t = a_t S_{t-1} + k_t v_t^T`` (a_t one number per step) that
the outputs read only as ``y_t = sum_K S_t q_t``, a chunk of C <= 128 steps, evaluated with time
on the partitions, is

    c = cumsum(log a)             (one matmul with an upper-triangular ones matrix U)
    y = V^T ((K Q^T) o exp(c_t - c_s) [s <= t]) + exp(c_t) S_prev^T Q^T     (nc_matmuls)
    S = exp(c_C) S_prev + (K o exp(c_C - c_s))^T V                          (one nc_matmul)

with K (C x K), V (C x V), Q (C x K) and S kept as a (K, V) tile. Exponents are masked before
the exp, so only c_t - c_s <= 0 is exponentiated. ``y`` is handed to the generic readout
lowering as the value of the contraction node.

Edges (the rules of ``scancc.ir.passes.chunked``): the factor tiles are sanitized
(non-finite -> 0, ``sanitize``) before any matmul or transpose and the poison is written back
as NaN (``zero_where``: a uint8 predicate and ``nisa.tensor_copy_predicated``) into the
output and the state leaving the chunk; log-decays <= RESET_LOG_DECAY are hard resets
(``chunk_decay``: c sums the other log-decays, R counts the resets, decays are
exp(c_t - c_s) [R_t == R_s], always multiplied). docs/nki.md has the formulas.
"""
from __future__ import annotations

from dataclasses import dataclass

from scancc.ir import Kind, Node, Op, Recurrence
from scancc.ir.passes import chunked as shared

from ..rules import Rules
from .rules import ACT as _ACT, ALU as _ALU
from .rules import PY_BINARY, PY_MATH, UNARY_LINES, const_unary
from .values import BIG, Idx, V, fmt

# the expression lowerer of the chunk layout (time on the partitions): the same keys as
# rules.OP_RULES, rule(R, node, env, feat, scope, memo) -> (kind, name or expression)
CHUNK_OP_RULES = Rules("nki", "chunked-form op")
_OK_OPS = set(_ACT) | set(_ALU) | {Op.INPUT, Op.PARAM, Op.CONST, Op.SIZE, Op.IOTA, Op.GROUP,
                                   Op.NEG, Op.CLAMP, Op.LOGSIGMOID, Op.EXPM1}

# the key-diagonal form's secondary chunking: at level h the pairs (s in the left half, t in
# the right half) of every aligned 2h-step block of the chunk (the module doc)
LEVELS = (1, 2, 4, 8, 16, 32, 64)


def diag_levels(twe: int) -> list[int]:
    """The levels a chunk of at most ``twe`` steps needs (h < twe)."""
    return [h for h in LEVELS if h < twe]


def constant_sites(chunks: dict, twe: int) -> list[int]:
    """SBUF bytes per partition of the chunked forms' constant tiles (``chunk_constants``;
    the plan counts them statically): tri and neg; with a key-diagonal state low, stri, eye
    and per level lk, m and lq (one per readout flavour: t itself, prev)."""
    sites = [512, 512] if chunks else []
    flav = {cp.prev for cp in chunks.values() if cp.diag}
    if flav:
        sites += [512] * (3 + len(diag_levels(twe)) * (2 + len(flav)))
    return sites


@dataclass
class ChunkPlan:
    kd: str                          # the contracted dim (S's partitions)
    logdecay: Node | None            # log a_t (None: identity)
    kpart: Node                      # the inject's factors without the partition dim
    vpart: Node                      # the factors with it
    sums: list                       # [(contraction node, q)]
    diag: bool = False               # the key-diagonal form (a decay per K, or prev() readouts)
    prev: bool = False               # the readouts read prev(S), the state entering the step


def find_chunked(rec: Recurrence, pd: str, outer, sizes) -> dict[str, ChunkPlan]:
    """States the chunked form applies to (see the module doc), by name: the shared analysis
    (``scancc.ir.passes.chunked``, prev() readouts included) and what this emitter supports:
    an identity, scalar or key-diagonal decay, V on the partitions, K <= 128 (one tile), the
    other state dims outer loops, every part loaded time-major."""
    plans = {}
    lets = {l.name: l.expr for l in rec.lets}
    for name, cs in shared.analyze(rec, prev=True).states.items():
        kd = cs.K
        if cs.kind not in (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL) or cs.V != pd or \
                not set(cs.grid) <= set(outer) or sizes[kd] > 128 or not cs.v_side:
            continue
        # the key-diagonal form: a decay per K, or a readout of prev(S) (any decay)
        diag = cs.kind is Kind.DIAGONAL or cs.reads_prev
        ld = cs.log_decay if cs.log_decay is not None or not diag else \
            Node(Op.CONST, (), 0.0)
        ks = [f for f in cs.inject if f not in cs.v_side]   # the factors without pd
        kpart = shared.product(ks)
        vpart = shared.product(cs.v_side)
        sums = [(c.node, c.q) for c in cs.contractions]
        parts = [(kpart, kd), (vpart, pd)] + [(q, kd) for _, q in sums]
        if ld is not None:
            parts.append((ld, kd if cs.kind is Kind.DIAGONAL else None))
        if all(_time_major(rec, n, f, pd, kd, outer, lets) for n, f in parts):
            plans[name] = ChunkPlan(kd, ld, kpart, vpart, sums, diag, cs.reads_prev)
    return plans


def _time_major(rec, node, feat, pd, kd, outer, lets) -> bool:
    """Every leaf loads with time before ``feat`` and no other non-outer dim."""
    for n in node.walk():
        if n.op not in _OK_OPS:
            return False
        if n.op is Op.PARAM and not _time_major(rec, lets[n.arg], feat, pd, kd, outer, lets):
            return False
        if n.op is Op.IOTA and n.arg not in outer:
            return False
        if n.op is Op.GROUP and n.arg[1] not in outer:
            return False
        if n.op is Op.INPUT:
            dims = rec.input(n.arg).dims
            groups = {m.arg[0] for m in node.walk() if m.op is Op.GROUP}
            for d in dims:
                if d not in outer and d != rec.time and d != feat and d not in groups:
                    return False
            if feat in dims and (rec.time not in dims or dims.index(rec.time) > dims.index(feat)):
                return False
    return True


@CHUNK_OP_RULES.register(Op.CONST)
def _tconst_rule(R, node, env, feat, sc, memo):
    return ("const", fmt(node.arg))


@CHUNK_OP_RULES.register(Op.SIZE)
def _tsize_rule(R, node, env, feat, sc, memo):
    return ("const", fmt(R.sizes[node.arg]))


@CHUNK_OP_RULES.register(Op.IOTA)
def _tiota_rule(R, node, env, feat, sc, memo):
    return ("const", f"float({env[node.arg].expr})")


@CHUNK_OP_RULES.register(Op.PARAM)
def _tparam_rule(R, node, env, feat, sc, memo):
    return R.tval(R.lets[node.arg], env, feat, sc, memo)


@CHUNK_OP_RULES.register(Op.GROUP)
def _tgroup_rule(R, node, env, feat, sc, memo):
    g, d = node.arg
    rep = R.sizes[d] // R.sizes[g]
    sub = dict(env)
    sub[g] = (Idx("0", frozenset()) if R.sizes[g] == 1 else
              Idx(f"({env[d].expr}) // {rep}", env[d].deps))
    return R.tval(node.src[0], sub, feat, sc, memo)


@CHUNK_OP_RULES.register(Op.INPUT)
def _tinput_rule(R, node, env, feat, sc, memo):
    a = node.arg
    w = feat[2] if feat else "1"
    dims = R.rec.input(a).dims
    hast, hasf = R.time in dims, bool(feat) and feat[0] in dims
    kind = "tf" if hasf else ("tc" if hast else "s")
    idx = ", ".join("t0:t1" if d == R.time else feat[1] if feat and d == feat[0]
                    else env[d].expr for d in dims)
    # placed in the outermost loop its indices allow (B of mamba2 once for all heads)
    deps = frozenset().union(*(env[d].deps for d in dims if d in env))
    deps |= {R.time_scope.sid}
    if hasf and feat[0] == R.pd:
        deps |= {R.pd_scope.sid}
    home = R.target(deps, sc)
    lkey = ("tload", a, tuple((d, env[d]) for d in dims if d in env),
            feat[0] if hasf else None)
    nm = next((h.memo[lkey] for h in home.chain() if lkey in h.memo), None)
    if nm is None:
        nm = R.talloc(home, kind)
        elems = R.twe * (R.pe if hasf and feat[0] == R.pd else
                         R.sizes[feat[0]] if hasf else 1) if hast else 1
        R.dma(home, f"nisa.dma_copy({R.tview(kind, nm, w)}, in_{a}[{idx}])", elems)
        home.memo[lkey] = nm
    return (kind, nm)


@CHUNK_OP_RULES.register(*_ALU)
def _tbinary_rule(R, node, env, feat, sc, memo):
    return R.tbinary(node.op, R.tval(node.src[0], env, feat, sc, memo),
                     R.tval(node.src[1], env, feat, sc, memo), feat, sc)


@CHUNK_OP_RULES.register(*UNARY_LINES)
def _tunary_rule(R, node, env, feat, sc, memo):
    x = R.tval(node.src[0], env, feat, sc, memo)
    if x[0] == "const":
        R.uses_math |= node.op in PY_MATH
        return ("const", const_unary(node.op, node.arg, x[1]))
    w = feat[2] if feat else "1"
    nm = R.talloc(sc, x[0])
    for line in UNARY_LINES[node.op](R.tview(x[0], nm, w), R.tview(x[0], x[1], w), node.arg):
        R.emit(sc, line)
    return (x[0], nm)


@CHUNK_OP_RULES.register(Op.EXPM1)
def _texpm1_rule(R, node, env, feat, sc, memo):
    """exp(x) - 1 without float32 cancellation (hgrn2's k = -expm1(g)): Kahan's formula as
    ``rules._expm1_rule`` (u = exp(x) shared with the decay)."""
    u = R.tval(Node(Op.EXP, node.src), env, feat, sc, memo)
    x = R.tval(node.src[0], env, feat, sc, memo)
    if u[0] == "const" or x[0] == "const":
        return R.tbinary(Op.SUB, u, ("const", "1.0"), feat, sc)
    if x[0] != u[0]:
        x = R.t_to_full(x, feat, sc) if u[0] == "tf" else x
    kind, w = u[0], feat[2] if feat else "1"
    v = lambda nm: R.tview(kind, nm, w)  # noqa: E731

    def ts(src, op0, c0, op1=None, c1=0.0):
        out = R.talloc(sc, kind)
        extra = f", op1=nl.{op1}, operand1={fmt(c1)}" if op1 else ""
        R.emit(sc, f"nisa.tensor_scalar({v(out)}, {v(src)}, nl.{op0}, {fmt(c0)}{extra})")
        return out

    def tt(a, b, alu, out=None):
        out = out or R.talloc(sc, kind)
        R.emit(sc, f"nisa.tensor_tensor({v(out)}, {v(a)}, {v(b)}, nl.{alu})")
        return out
    import math
    um1 = ts(u[1], "subtract", 1.0)
    xc = ts(x[1], "maximum", -0.5, "minimum", 0.5)
    uc = ts(u[1], "maximum", math.exp(-0.5), "minimum", math.exp(0.5))
    one = ts(uc, "equal", 1.0)
    den = R.talloc(sc, kind)
    R.emit(sc, f"nisa.activation({v(den)}, nl.log, {v(uc)})")
    tt(den, one, "add", den)                      # log(u) + [u == 1]: never 0
    k = ts(uc, "subtract", 1.0)
    tt(k, xc, "multiply", k)
    tt(k, den, "divide", k)
    tt(tt(one, xc, "multiply"), k, "add", k)      # u == 1: x
    big = ts(x[1], "greater_equal", 0.5)
    tt(big, ts(x[1], "less", -0.5), "add", big)   # |x| > 0.5: u - 1
    tt(big, tt(um1, k, "subtract"), "multiply", big)
    return (kind, tt(k, big, "add", k))


class ChunkedMixin:
    """Emission of the chunked form; mixed into the Renderer (uses its emit/alloc helpers)."""

    def chunk_constants(self, top) -> None:
        self.fixed(512, 512)
        self.emit(top, "# U[s, t] = 1 where s <= t (cumsums, causal masks); NEG: 0 there, else "
                       "-BIG")
        self.emit(top, "tri = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)")
        self.emit(top, "nisa.iota(tri, [[1, 128]], offset=0, channel_multiplier=-1)")
        self.emit(top, "nisa.tensor_scalar(tri, tri, nl.greater_equal, 0.0)")
        self.emit(top, "neg = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)")
        self.emit(top, f"nisa.tensor_scalar(neg, tri, nl.subtract, 1.0, op1=nl.multiply, "
                       f"operand1={BIG!r})")
        flav = sorted({cp.prev for cp in self.chunks.values() if cp.diag})
        if not flav:
            return
        levels = diag_levels(self.twe)
        self.fixed(*constant_sites(self.chunks, self.twe)[2:])
        self.emit(top, "# key-diagonal form: low[p, s] = [p > s], stri[p, t] = [p < t], "
                       "eye[p, t] = [p == t]")
        self.emit(top, "low = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)")
        self.emit(top, "nisa.tensor_scalar(low, tri, nl.subtract, 1.0, op1=nl.multiply, "
                       "operand1=-1.0)")
        for nm, op, c in (("stri", "greater_equal", "1.0"), ("eye", "equal", "0.0")):
            self.emit(top, f"{nm} = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)")
            self.emit(top, f"nisa.iota({nm}, [[1, 128]], offset=0, channel_multiplier=-1)")
            self.emit(top, f"nisa.tensor_scalar({nm}, {nm}, nl.{op}, {c})")
        if not levels:
            return
        self.emit(top, "# level h: the aligned 2h-step blocks of the chunk, split in halves; "
                       "x[p, t] = p - (the first step of t's block), b[p, t] = t - (the same)")
        x = self.alloc(top, (128, 128), 512, "x")
        b = self.alloc(top, (128, 128), 512, "b")
        w = self.alloc(top, (128, 128), 512, "w")
        for h in levels:
            n = 128 // (2 * h)
            self.emit(top, f"nisa.iota({x}, [[{-2 * h}, {n}], [0, {2 * h}]], offset=0, "
                           "channel_multiplier=1)")
            self.emit(top, f"nisa.iota({b}, [[0, {n}], [1, {2 * h}]], offset=0, "
                           "channel_multiplier=0)")
            self.emit(top, f"# lk{h}[p, s] = 1 for p in (s, ref(s)], ref(s) the last step of "
                           f"s's left half (s in it); lq{h}[p, t] = 1 for p in (ref(t), t] "
                           f"(lqp{h}: (ref(t), t)), t in the right half; m{h}[s, t] = 1 for s "
                           "in the left and t in the right half of one block")
            self.emit(top, f"nisa.tensor_scalar({w}, {x}, nl.subtract, {float(h - 1)}, "
                           "reverse0=True, op1=nl.greater_equal, operand1=0.0)")
            self.emit(top, f"lk{h} = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)")
            self.emit(top, f"nisa.tensor_tensor(lk{h}, {w}, low, nl.multiply)")
            self.emit(top, f"m{h} = nl.ndarray((128, 128), dtype=nl.float32, buffer=nl.sbuf)")
            self.emit(top, f"nisa.tensor_scalar(m{h}, {x}, nl.greater_equal, 0.0)")
            self.emit(top, f"nisa.tensor_tensor(m{h}, m{h}, {w}, nl.multiply)")
            self.emit(top, f"nisa.tensor_scalar({b}, {b}, nl.greater_equal, {float(h)})")
            self.emit(top, f"nisa.tensor_tensor(m{h}, m{h}, {b}, nl.multiply)")
            self.emit(top, f"nisa.tensor_scalar({w}, {x}, nl.greater_equal, {float(h)})")
            for p in flav:
                nm = f"lqp{h}" if p else f"lq{h}"
                self.emit(top, f"{nm} = nl.ndarray((128, 128), dtype=nl.float32, "
                               "buffer=nl.sbuf)")
                self.emit(top, f"nisa.tensor_tensor({nm}, {w}, {'stri' if p else 'tri'}, "
                               "nl.multiply)")

    # values with time on the partitions: const | s (1, 1) | tc (tw, 1) | tf (tw, F)
    def tview(self, kind: str, ref: str, width: str = "1") -> str:
        return {"s": f"{ref}[0:1, 0:1]", "tc": f"{ref}[0:tw, 0:1]",
                "tf": f"{ref}[0:tw, 0:{width}]"}[kind]

    def talloc(self, sc, kind: str) -> str:
        shape = {"s": (1, 1), "tc": (128, 1), "tf": (128, 128)}[kind]
        return self.alloc(sc, shape, 4 * shape[1], "tc")

    def tval(self, node: Node, env: dict, feat, sc, memo: dict):
        """(kind, name or expression) of ``node`` in the chunk layout; ``feat`` = (dim, HBM
        slice, width) of the free dim."""
        key = (node, tuple(sorted((d, i.expr) for d, i in env.items())), feat and feat[0])
        if key not in memo:
            rule = CHUNK_OP_RULES.lookup(node.op, self.rec.name)
            memo[key] = rule(self, node, env, feat, sc, memo)
        return memo[key]

    def t_to_col(self, v, sc):
        """A (1, 1) scalar or a constant -> a (tw, 1) column."""
        nm = self.talloc(sc, "tc")
        if v[0] == "const":
            self.emit(sc, f"nisa.memset({self.tview('tc', nm)}, {v[1]})")
        else:
            ps = self.psum_tile(sc, (128, 1))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:tw, 0:1], ones_row[0:1, 0:tw], "
                          f"{self.tview('s', v[1])})")
            self.emit(sc, f"nisa.tensor_copy({self.tview('tc', nm)}, {ps}[0:tw, 0:1])")
        return ("tc", nm)

    def t_to_full(self, v, feat, sc):
        if v[0] == "tf":
            return v
        if v[0] != "tc":
            v = self.t_to_col(v, sc)
        nm = self.talloc(sc, "tf")
        self.emit(sc, f"nisa.tensor_scalar({self.tview('tf', nm, feat[2])}, "
                      f"zeros[0:tw, 0:{feat[2]}], nl.add, {self.tview('tc', v[1])})")
        return ("tf", nm)

    def tbinary(self, op: Op, a, b, feat, sc):
        w = feat[2] if feat else "1"
        alu = _ALU[op]
        if a[0] == "const" and b[0] == "const":
            return ("const", PY_BINARY[op].format(a[1], b[1]))
        if a[0] == "const" or b[0] == "const":
            c, x, rev = (a, b, True) if a[0] == "const" else (b, a, False)
            nm = self.talloc(sc, x[0])
            self.emit(sc, f"nisa.tensor_scalar({self.tview(x[0], nm, w)}, "
                          f"{self.tview(x[0], x[1], w)}, nl.{alu}, {c[1]}"
                          + (", reverse0=True)" if rev else ")"))
            return (x[0], nm)
        if a[0] == "s" and b[0] != "s":
            a = self.t_to_col(a, sc)
        if b[0] == "s" and a[0] != "s":
            b = self.t_to_col(b, sc)
        if a[0] != b[0]:  # a (tw, 1) column against a (tw, F) tile: per-partition operand
            (col, full, rev) = (a, b, True) if a[0] == "tc" else (b, a, False)
            nm = self.talloc(sc, "tf")
            self.emit(sc, f"nisa.tensor_scalar({self.tview('tf', nm, w)}, "
                          f"{self.tview('tf', full[1], w)}, nl.{alu}, {self.tview('tc', col[1])}"
                          + (", reverse0=True)" if rev else ")"))
            return ("tf", nm)
        kind = a[0]
        nm = self.talloc(sc, kind)
        self.emit(sc, f"nisa.tensor_tensor({self.tview(kind, nm, w)}, {self.tview(kind, a[1], w)}, "
                      f"{self.tview(kind, b[1], w)}, nl.{alu})")
        return (kind, nm)

    def sanitize(self, x: str, rows: str, cols: str, sc) -> tuple[str, str]:
        """(clean, bad) of the SBUF tile view ``x[0:rows, 0:cols]``: ``clean`` is x with its
        non-finite elements set to 0 (what the matmuls read), ``bad`` 1.0 where x is not finite
        (the poison added back; ir/passes/chunked.py, "Edges")."""
        shape = (128, 1) if cols == "1" else (128, 128)
        view = f"[0:{rows}, 0:{cols}]"
        bad = self.alloc(sc, shape, 4 * shape[1], "bad")
        self.emit(sc, f"nisa.tensor_scalar({bad}{view}, {x}{view}, nl.multiply, 0.0, "
                      "op1=nl.not_equal, operand1=0.0)")
        clean = self.alloc(sc, shape, 4 * shape[1], "clean")
        self.emit(sc, f"nisa.tensor_copy({clean}{view}, {x}{view})")
        self.zero_where(clean + view, bad + view, rows, cols, sc)
        return clean, bad

    def zero_where(self, dst: str, flag: str, rows: str, cols: str, sc, value: str = "0.0",
                   plus: str | None = None) -> None:
        """``dst = value`` where the fp32 view ``flag`` (rows x cols; ``+ plus``, a number or a
        (rows, 1) column, if given) is nonzero, through a uint8 predicate tile."""
        shape = (128, 1) if cols == "1" else (128, 128)
        pred = self.alloc(sc, shape, shape[1], "pred", dtype="nl.uint8")
        view = f"[0:{rows}, 0:{cols}]"
        self.emit(sc, f"nisa.tensor_scalar({pred}{view}, {flag}, nl.not_equal, 0.0)" if plus is None
                  else f"nisa.tensor_scalar({pred}{view}, {flag}, nl.add, {plus}, "
                       "op1=nl.not_equal, operand1=0.0)")
        self.emit(sc, f"nisa.tensor_copy_predicated({dst}, {value}, {pred}{view})")

    def chunk_state(self, s, cp: ChunkPlan, env: dict, sc) -> None:
        """One chunk (the time tile, tw <= 128 steps) of a chunked state; readouts memoized.
        The factor tiles are sanitized before any matmul and their poison added back to the
        outputs and the state; log-decays <= RESET_LOG_DECAY are hard resets (the module doc
        of scancc.ir.passes.chunked, "Edges")."""
        if cp.diag:
            return self.chunk_state_diag(s, cp, env, sc)
        K = self.sizes[cp.kd]
        kf, vf = (cp.kd, f"0:{K}", str(K)), (self.pd, "p0:p1", "P")
        memo: dict = {}
        carry = f"carry_{s.name}[0:{K}, {self.slot}, 0:P]"
        self.emit(sc, f"# chunked (matmul) form of state {s.name}: time on the partitions")
        km = self.t_to_full(self.tval(cp.kpart, env, kf, sc, memo), kf, sc)[1]
        vm = self.t_to_full(self.tval(cp.vpart, env, vf, sc, memo), vf, sc)[1]
        self.emit(sc, "# non-finite factors -> 0 before any matmul (clean*); bad*: 1.0 where they "
                      "were (x * 0 != 0)")
        km, badk = self.sanitize(km, "tw", str(K), sc)
        vm, badv = self.sanitize(vm, "tw", "P", sc)
        if cp.logdecay is not None:
            lv = self.tval(cp.logdecay, env, None, sc, memo)
            lc = lv[1] if lv[0] == "tc" else self.t_to_col(lv, sc)[1]
            dec, ec, badk = self.chunk_decay(lc, badk, K, sc)
        kt = self.transpose_in(km, "tw", str(K), sc)
        # per step s: 1.0 (or more) where a k-side or decay factor of s is not finite; comb adds
        # the v-side's column j: y[j, t] is NaN where sum_{s<=t} comb[s, j] > 0
        rbad = self.alloc(sc, (128, 1), 4, "rbad")
        self.emit(sc, f"nisa.tensor_reduce({rbad}[0:tw, 0:1], nl.add, {badk}[0:tw, 0:{K}], "
                      "axis=1)")
        comb = self.alloc(sc, (128, 128), 512, "comb")
        self.emit(sc, f"nisa.tensor_scalar({comb}[0:tw, 0:P], {badv}[0:tw, 0:P], nl.add, "
                      f"{rbad}[0:tw, 0:1])")
        for node, q in cp.sums:
            qm = self.t_to_full(self.tval(q, env, kf, sc, memo), kf, sc)[1]
            qm, badq = self.sanitize(qm, "tw", str(K), sc)
            qt = self.transpose_in(qm, "tw", str(K), sc)
            gt = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_matmul({gt}[0:tw, 0:tw], {kt}[0:{K}, 0:tw], "
                          f"{qt}[0:{K}, 0:tw])")
            wts = self.alloc(sc, (128, 128), 512, "wts")
            self.emit(sc, f"nisa.tensor_tensor({wts}[0:tw, 0:tw], {gt}[0:tw, 0:tw], "
                          f"{'tri' if cp.logdecay is None else dec}[0:tw, 0:tw], nl.multiply)")
            py = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_matmul({py}[0:P, 0:tw], {vm}[0:tw, 0:P], "
                          f"{wts}[0:tw, 0:tw])")
            if cp.logdecay is not None:
                bq = self.psum_tile(sc, (128, 128))
                self.emit(sc, f"nisa.nc_matmul({bq}[0:{K}, 0:tw], ones_row[0:1, 0:{K}], "
                              f"{ec}[0:1, 0:tw])")
                qs = self.alloc(sc, (128, 128), 512, "qs")
                self.emit(sc, f"nisa.tensor_tensor({qs}[0:{K}, 0:tw], {qt}[0:{K}, 0:tw], "
                              f"{bq}[0:{K}, 0:tw], nl.multiply)")
            else:
                qs = qt
            self.emit(sc, f"nisa.nc_matmul({py}[0:P, 0:tw], {carry}, {qs}[0:{K}, 0:tw])")
            y = self.alloc(sc, (128, self.tt), 4 * self.tt, "y")
            self.emit(sc, f"nisa.tensor_copy({y}[0:P, 0:tw], {py}[0:P, 0:tw])")
            self.emit(sc, "# y[j, t] = NaN where comb poisons a step s <= t or q_t is not finite")
            qbad = self.alloc(sc, (128, 1), 4, "qbad")
            self.emit(sc, f"nisa.tensor_reduce({qbad}[0:tw, 0:1], nl.add, {badq}[0:tw, 0:{K}], "
                          "axis=1)")
            ps = self.psum_tile(sc, (1, 128))
            self.emit(sc, f"nisa.nc_transpose({ps}[0:1, 0:tw], {qbad}[0:tw, 0:1])")
            qrow = self.alloc(sc, (1, 128), 512, "qrow")
            self.emit(sc, f"nisa.tensor_copy({qrow}[0:1, 0:tw], {ps}[0:1, 0:tw])")
            pc = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_matmul({pc}[0:P, 0:tw], {comb}[0:tw, 0:P], tri[0:tw, 0:tw])")
            self.emit(sc, f"nisa.nc_matmul({pc}[0:P, 0:tw], ones_row[0:1, 0:P], "
                          f"{qrow}[0:1, 0:tw])")
            self.zero_where(f"{y}[0:P, 0:tw]", f"{pc}[0:P, 0:tw]", "P", "tw", sc,
                            'float("nan")')
            sc.memo[self.env_key(node, env)] = V("full", y)
        if cp.logdecay is not None:
            self.emit(sc, "# decays to the chunk's end: dec[s, tw - 1] per step s, ec[tw - 1] "
                          "for the state (multiplied: a NaN state stays NaN)")
            ks = self.alloc(sc, (128, 128), 512, "ks")
            self.emit(sc, f"nisa.tensor_scalar({ks}[0:tw, 0:{K}], {km}[0:tw, 0:{K}], "
                          f"nl.multiply, {dec}[0:tw, tw - 1:tw])")
            ps = self.psum_tile(sc, (128, 1))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:{K}, 0:1], ones_row[0:1, 0:{K}], "
                          f"{ec}[0:1, tw - 1:tw])")
            eK = self.alloc(sc, (128, 1), 4, "ek")
            self.emit(sc, f"nisa.tensor_copy({eK}[0:{K}, 0:1], {ps}[0:{K}, 0:1])")
            self.emit(sc, f"nisa.tensor_scalar({carry}, {carry}, nl.multiply, {eK}[0:{K}, 0:1])")
        else:
            ks = km
        ps = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_matmul({ps}[0:{K}, 0:P], {ks}[0:tw, 0:{K}], {vm}[0:tw, 0:P])")
        self.emit(sc, f"nisa.tensor_tensor({carry}, {carry}, {ps}[0:{K}, 0:P], nl.add)")
        self.emit(sc, "# the state leaving the chunk: NaN in poisoned rows (k-side, decay) and "
                      "columns (v-side), where (1 + badk)^T (1 + badv) - tw > 0")
        k1 = self.alloc(sc, (128, 128), 512, "k1")
        self.emit(sc, f"nisa.tensor_scalar({k1}[0:tw, 0:{K}], {badk}[0:tw, 0:{K}], nl.add, 1.0)")
        v1 = self.alloc(sc, (128, 128), 512, "v1")
        self.emit(sc, f"nisa.tensor_scalar({v1}[0:tw, 0:P], {badv}[0:tw, 0:P], nl.add, 1.0)")
        ps = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_matmul({ps}[0:{K}, 0:P], {k1}[0:tw, 0:{K}], {v1}[0:tw, 0:P])")
        self.zero_where(carry, f"{ps}[0:{K}, 0:P]", str(K), "P", sc, 'float("nan")',
                        plus="-tw")

    def chunk_state_diag(self, s, cp: ChunkPlan, env: dict, sc) -> None:
        """One chunk of a key-diagonal state (a decay per K; or a readout of prev(S)): the
        intra-chunk weights A[s, t] = sum_k k_s,k q_t,k e^{c_t,k - c_s,k} by secondary
        chunking (module doc: per level h one matmul of (k o e^{c_ref - c_s}) and
        (q o e^{c_t - c_ref}), every exponent <= 0, masked to the level's pairs; the s == t
        term q_t . k_t on the diagonal), the entering state's read (q o e^{c_t}) S and the
        update e^{c_L} S + (k o e^{c_L - c_s})^T V as matmuls. Every exponent is a segment sum
        of the clean log-decays (a matmul with a constant 0/1 tile), pushed to -BIG when a
        reset lies in the segment (its reset count, the same matmul). prev: the segments end
        at t - 1 and the s == t term is left out."""
        K = self.sizes[cp.kd]
        kf, vf = (cp.kd, f"0:{K}", str(K)), (self.pd, "p0:p1", "P")
        memo: dict = {}
        carry = f"carry_{s.name}[0:{K}, {self.slot}, 0:P]"
        self.emit(sc, f"# chunked key-diagonal form of state {s.name}: time on the partitions"
                  + (" (the readouts read prev)" if cp.prev else ""))
        km = self.t_to_full(self.tval(cp.kpart, env, kf, sc, memo), kf, sc)[1]
        vm = self.t_to_full(self.tval(cp.vpart, env, vf, sc, memo), vf, sc)[1]
        lg = self.t_to_full(self.tval(cp.logdecay, env, kf, sc, memo), kf, sc)[1]
        self.emit(sc, "# non-finite factors -> 0 before any matmul (clean*); bad*: 1.0 where they "
                      "were (x * 0 != 0)")
        km, badk = self.sanitize(km, "tw", str(K), sc)
        vm, badv = self.sanitize(vm, "tw", "P", sc)
        gr, badk = self.chunk_decay_diag(lg, badk, K, sc)
        kt = self.transpose_in(km, "tw", str(K), sc)
        rbad = self.alloc(sc, (128, 1), 4, "rbad")
        self.emit(sc, f"nisa.tensor_reduce({rbad}[0:tw, 0:1], nl.add, {badk}[0:tw, 0:{K}], "
                      "axis=1)")
        comb = self.alloc(sc, (128, 128), 512, "comb")
        self.emit(sc, f"nisa.tensor_scalar({comb}[0:tw, 0:P], {badv}[0:tw, 0:P], nl.add, "
                      f"{rbad}[0:tw, 0:1])")
        causal = "stri" if cp.prev else "tri"
        eq, ek, qh = (self.alloc(sc, (128, 128), 512, n) for n in ("eq", "ek", "qh"))
        for node, q in cp.sums:
            qm = self.t_to_full(self.tval(q, env, kf, sc, memo), kf, sc)[1]
            qm, badq = self.sanitize(qm, "tw", str(K), sc)
            qt = self.transpose_in(qm, "tw", str(K), sc)
            acc = self.alloc(sc, (128, 128), 512, "acc")
            if cp.prev:
                self.emit(sc, f"nisa.memset({acc}[0:tw, 0:tw], 0.0)")
            else:
                self.emit(sc, "# the s == t term: q_t . k_t on the diagonal")
                dk = self.alloc(sc, (128, 128), 512, "dk")
                self.emit(sc, f"nisa.tensor_tensor({dk}[0:tw, 0:{K}], {qm}[0:tw, 0:{K}], "
                              f"{km}[0:tw, 0:{K}], nl.multiply)")
                dcol = self.alloc(sc, (128, 1), 4, "dcol")
                self.emit(sc, f"nisa.tensor_reduce({dcol}[0:tw, 0:1], nl.add, {dk}[0:tw, 0:{K}], "
                              "axis=1)")
                self.emit(sc, f"nisa.tensor_scalar({acc}[0:tw, 0:tw], eye[0:tw, 0:tw], "
                              f"nl.multiply, {dcol}[0:tw, 0:1])")
            for h in diag_levels(self.twe):
                self.emit(sc, f"# level {h}: s in the left, t in the right half of a {2 * h}-step "
                              "block, through its last left step ref")
                self.seg_exp(eq, gr, f"lqp{h}" if cp.prev else f"lq{h}", "tw", K, sc)
                self.emit(sc, f"nisa.tensor_tensor({qh}[0:{K}, 0:tw], {eq}[0:{K}, 0:tw], "
                              f"{qt}[0:{K}, 0:tw], nl.multiply)")
                self.seg_exp(ek, gr, f"lk{h}", "tw", K, sc)
                self.emit(sc, f"nisa.tensor_tensor({ek}[0:{K}, 0:tw], {ek}[0:{K}, 0:tw], "
                              f"{kt}[0:{K}, 0:tw], nl.multiply)")
                pa = self.psum_tile(sc, (128, 128))
                self.emit(sc, f"nisa.nc_matmul({pa}[0:tw, 0:tw], {ek}[0:{K}, 0:tw], "
                              f"{qh}[0:{K}, 0:tw])")
                self.emit(sc, f"nisa.tensor_tensor({eq}[0:tw, 0:tw], {pa}[0:tw, 0:tw], "
                              f"m{h}[0:tw, 0:tw], nl.multiply)")
                self.emit(sc, f"nisa.tensor_tensor({acc}[0:tw, 0:tw], {acc}[0:tw, 0:tw], "
                              f"{eq}[0:tw, 0:tw], nl.add)")
            self.emit(sc, "# the entering state: (q o e^{c_t}) S" if not cp.prev else
                          "# the entering state: (q o e^{c_{t-1}}) S")
            self.seg_exp(eq, gr, causal, "tw", K, sc)
            self.emit(sc, f"nisa.tensor_tensor({qh}[0:{K}, 0:tw], {eq}[0:{K}, 0:tw], "
                          f"{qt}[0:{K}, 0:tw], nl.multiply)")
            py = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_matmul({py}[0:P, 0:tw], {vm}[0:tw, 0:P], "
                          f"{acc}[0:tw, 0:tw])")
            self.emit(sc, f"nisa.nc_matmul({py}[0:P, 0:tw], {carry}, {qh}[0:{K}, 0:tw])")
            y = self.alloc(sc, (128, self.tt), 4 * self.tt, "y")
            self.emit(sc, f"nisa.tensor_copy({y}[0:P, 0:tw], {py}[0:P, 0:tw])")
            self.emit(sc, "# y[j, t] = NaN where comb poisons a step s <= t (prev: s < t) or q_t "
                          "is not finite")
            qbad = self.alloc(sc, (128, 1), 4, "qbad")
            self.emit(sc, f"nisa.tensor_reduce({qbad}[0:tw, 0:1], nl.add, {badq}[0:tw, 0:{K}], "
                          "axis=1)")
            ps = self.psum_tile(sc, (1, 128))
            self.emit(sc, f"nisa.nc_transpose({ps}[0:1, 0:tw], {qbad}[0:tw, 0:1])")
            qrow = self.alloc(sc, (1, 128), 512, "qrow")
            self.emit(sc, f"nisa.tensor_copy({qrow}[0:1, 0:tw], {ps}[0:1, 0:tw])")
            pc = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_matmul({pc}[0:P, 0:tw], {comb}[0:tw, 0:P], "
                          f"{causal}[0:tw, 0:tw])")
            self.emit(sc, f"nisa.nc_matmul({pc}[0:P, 0:tw], ones_row[0:1, 0:P], "
                          f"{qrow}[0:1, 0:tw])")
            self.zero_where(f"{y}[0:P, 0:tw]", f"{pc}[0:P, 0:tw]", "P", "tw", sc,
                            'float("nan")')
            sc.memo[self.env_key(node, env)] = V("full", y)
        self.emit(sc, "# the state leaving the chunk: e^{c_L} S + (k o e^{c_L - c_s})^T V")
        eL = self.alloc(sc, (128, 1), 4, "el")
        self.seg_exp(eL, gr, "ones_col", "1", K, sc)
        self.emit(sc, f"nisa.tensor_scalar({carry}, {carry}, nl.multiply, {eL}[0:{K}, 0:1])")
        self.seg_exp(ek, gr, "low", "tw", K, sc, rows_are_time=True)
        self.emit(sc, f"nisa.tensor_tensor({ek}[0:tw, 0:{K}], {ek}[0:tw, 0:{K}], "
                      f"{km}[0:tw, 0:{K}], nl.multiply)")
        ps = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_matmul({ps}[0:{K}, 0:P], {ek}[0:tw, 0:{K}], {vm}[0:tw, 0:P])")
        self.emit(sc, f"nisa.tensor_tensor({carry}, {carry}, {ps}[0:{K}, 0:P], nl.add)")
        self.emit(sc, "# the state leaving the chunk: NaN in poisoned rows (k-side, decay) and "
                      "columns (v-side), where (1 + badk)^T (1 + badv) - tw > 0")
        k1 = self.alloc(sc, (128, 128), 512, "k1")
        self.emit(sc, f"nisa.tensor_scalar({k1}[0:tw, 0:{K}], {badk}[0:tw, 0:{K}], nl.add, 1.0)")
        v1 = self.alloc(sc, (128, 128), 512, "v1")
        self.emit(sc, f"nisa.tensor_scalar({v1}[0:tw, 0:P], {badv}[0:tw, 0:P], nl.add, 1.0)")
        ps = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_matmul({ps}[0:{K}, 0:P], {k1}[0:tw, 0:{K}], {v1}[0:tw, 0:P])")
        self.zero_where(carry, f"{ps}[0:{K}, 0:P]", str(K), "P", sc, 'float("nan")',
                        plus="-tw")

    def seg_exp(self, dst: str, gr: str, mask: str, width: str, K: int, sc,
                rows_are_time: bool = False) -> None:
        """``dst`` = exp of the segment sums of the clean log-decays ``gr[:, 0:K]`` that the
        0/1 tile ``mask`` (p on the partitions) selects, -BIG where the segment holds a reset
        (``gr[:, K:2K]``). Layout (K, width): dst[k, j] = exp(sum_p g[p, k] mask[p, j]);
        ``rows_are_time``: (tw, K), dst[j, k] the same."""
        if rows_are_time:
            ps = self.psum_tile(sc, (128, 2 * K))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:tw, 0:{2 * K}], {mask}[0:tw, 0:tw], "
                          f"{gr}[0:tw, 0:{2 * K}])")
            v, g, r = f"{dst}[0:tw, 0:{K}]", f"{ps}[0:tw, 0:{K}]", f"{ps}[0:tw, {K}:{2 * K}]"
        else:
            pg = self.psum_tile(sc, (128, 128 if width != "1" else 1))
            pr = self.psum_tile(sc, (128, 128 if width != "1" else 1))
            self.emit(sc, f"nisa.nc_matmul({pg}[0:{K}, 0:{width}], {gr}[0:tw, 0:{K}], "
                          f"{mask}[0:tw, 0:{width}])")
            self.emit(sc, f"nisa.nc_matmul({pr}[0:{K}, 0:{width}], {gr}[0:tw, {K}:{2 * K}], "
                          f"{mask}[0:tw, 0:{width}])")
            v, g, r = f"{dst}[0:{K}, 0:{width}]", f"{pg}[0:{K}, 0:{width}]", \
                f"{pr}[0:{K}, 0:{width}]"
        self.emit(sc, f"nisa.tensor_scalar({v}, {r}, nl.minimum, 1.0, op1=nl.multiply, "
                      f"operand1={-BIG!r})")
        self.emit(sc, f"nisa.tensor_tensor({v}, {v}, {g}, nl.add)")
        self.emit(sc, f"nisa.activation({v}, nl.exp, {v})")

    def chunk_decay_diag(self, g: str, badk: str, K: int, sc) -> tuple[str, str]:
        """From the chunk's log-decay tile ``g`` (tw, K): ``gr`` (tw, 2K), the log-decays with
        non-finite ones and resets (<= RESET_LOG_DECAY) set to 0 next to 1.0 at each reset,
        and ``badk`` with the decay's poison (NaN or +inf: not a reset) added per element."""
        self.emit(sc, f"# log-decays <= {shared.RESET_LOG_DECAY!r} (decay < 2**-126, 0, -inf) "
                      "are hard resets; gr = [clean log-decay | 1.0 at a reset]")
        gr = self.alloc(sc, (128, 2 * K), 8 * K, "gr")
        g0, r0 = f"{gr}[0:tw, 0:{K}]", f"{gr}[0:tw, {K}:{2 * K}]"
        gv = f"{g}[0:tw, 0:{K}]"
        self.emit(sc, f"nisa.tensor_scalar({r0}, {gv}, nl.greater_equal, "
                      f"{shared.RESET_LOG_DECAY!r}, reverse0=True)")
        badg = self.alloc(sc, (128, 128), 512, "badg")
        bv = f"{badg}[0:tw, 0:{K}]"
        self.emit(sc, f"nisa.tensor_scalar({bv}, {gv}, nl.multiply, 0.0, op1=nl.not_equal, "
                      "operand1=0.0)")
        self.emit(sc, f"nisa.tensor_copy({g0}, {gv})")
        flag = self.alloc(sc, (128, 128), 512, "flag")
        self.emit(sc, f"nisa.tensor_tensor({flag}[0:tw, 0:{K}], {bv}, {r0}, nl.add)")
        self.zero_where(g0, f"{flag}[0:tw, 0:{K}]", "tw", str(K), sc)
        self.emit(sc, "# the decay's poison: not finite and not a reset (NaN, +inf)")
        self.emit(sc, f"nisa.tensor_tensor({bv}, {bv}, {r0}, nl.subtract)")
        self.emit(sc, f"nisa.tensor_scalar({bv}, {bv}, nl.maximum, 0.0)")
        badk2 = self.alloc(sc, (128, 128), 512, "bad")
        self.emit(sc, f"nisa.tensor_tensor({badk2}[0:tw, 0:{K}], {badk}[0:tw, 0:{K}], {bv}, "
                      "nl.add)")
        return gr, badk2

    def chunk_decay(self, g: str, badk: str, K: int, sc) -> tuple[str, str, str]:
        """From the chunk's log-decay column ``g`` (tw, 1): ``dec`` (tw, tw), the decay from
        step s to t (0 for s > t or when a reset lies in (s, t], else exp(c_t - c_s) of the
        cumulative non-reset log-decays c), ``ec`` (1, tw), the decay of the entering state to
        step t, and ``badk`` with the decay's poison (NaN or +inf) added to every K of its
        step (a scalar decay poisons the whole state)."""
        self.emit(sc, f"# log-decays <= {shared.RESET_LOG_DECAY!r} (decay < 2**-126, 0, -inf) "
                      "are hard resets")
        gr = self.alloc(sc, (128, 2), 8, "gr")   # [clean log-decay | 1.0 at a reset]
        g0, r0 = f"{gr}[0:tw, 0:1]", f"{gr}[0:tw, 1:2]"
        self.emit(sc, f"nisa.tensor_scalar({r0}, {g}[0:tw, 0:1], nl.greater_equal, "
                      f"{shared.RESET_LOG_DECAY!r}, reverse0=True)")
        badg = self.alloc(sc, (128, 1), 4, "badg")
        self.emit(sc, f"nisa.tensor_scalar({badg}[0:tw, 0:1], {g}[0:tw, 0:1], nl.multiply, 0.0, "
                      "op1=nl.not_equal, operand1=0.0)")
        self.emit(sc, f"nisa.tensor_copy({g0}, {g}[0:tw, 0:1])")
        self.zero_where(g0, f"{badg}[0:tw, 0:1]", "tw", "1", sc, plus=r0)
        self.emit(sc, "# the decay's poison: not finite and not a reset (NaN, +inf)")
        self.emit(sc, f"nisa.tensor_scalar({badg}[0:tw, 0:1], {badg}[0:tw, 0:1], nl.subtract, "
                      f"{r0}, op1=nl.maximum, operand1=0.0)")
        badk2 = self.alloc(sc, (128, 128), 512, "bad")
        self.emit(sc, f"nisa.tensor_scalar({badk2}[0:tw, 0:{K}], {badk}[0:tw, 0:{K}], nl.add, "
                      f"{badg}[0:tw, 0:1])")
        self.emit(sc, "# cumulative sums (U): c of the clean log-decays, R the resets up to t")
        ps = self.psum_tile(sc, (128, 2))
        self.emit(sc, f"nisa.nc_matmul({ps}[0:tw, 0:2], tri[0:tw, 0:tw], {gr}[0:tw, 0:2])")
        ccol = self.alloc(sc, (128, 2), 8, "ccol")
        self.emit(sc, f"nisa.tensor_copy({ccol}[0:tw, 0:2], {ps}[0:tw, 0:2])")
        rows = []
        for i, nm in ((0, "crow"), (1, "rrow")):   # ... and as rows
            ps = self.psum_tile(sc, (1, 128))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:1, 0:tw], {gr}[0:tw, {i}:{i + 1}], "
                          "tri[0:tw, 0:tw])")
            row = self.alloc(sc, (1, 128), 512, nm)
            self.emit(sc, f"nisa.tensor_copy({row}[0:1, 0:tw], {ps}[0:1, 0:tw])")
            rows.append(row)
        crow, rrow = rows
        self.emit(sc, "# dec[s, t] = U[s, t] * exp(c_t - c_s) * [R_t == R_s] (the exponent "
                      "masked by NEG first)")
        bc = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_matmul({bc}[0:tw, 0:tw], ones_row[0:1, 0:tw], "
                      f"{crow}[0:1, 0:tw])")
        dec = self.alloc(sc, (128, 128), 512, "dec")
        self.emit(sc, f"nisa.tensor_tensor({dec}[0:tw, 0:tw], {bc}[0:tw, 0:tw], "
                      "neg[0:tw, 0:tw], nl.add)")
        negc = self.alloc(sc, (128, 1), 4, "negc")
        self.emit(sc, f"nisa.tensor_scalar({negc}[0:tw, 0:1], {ccol}[0:tw, 0:1], "
                      "nl.multiply, -1.0)")
        self.emit(sc, f"nisa.activation({dec}[0:tw, 0:tw], nl.exp, {dec}[0:tw, 0:tw], "
                      f"bias={negc}[0:tw, 0:1])")
        br = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_matmul({br}[0:tw, 0:tw], ones_row[0:1, 0:tw], "
                      f"{rrow}[0:1, 0:tw])")
        same = self.alloc(sc, (128, 128), 512, "same")
        self.emit(sc, f"nisa.tensor_scalar({same}[0:tw, 0:tw], {br}[0:tw, 0:tw], nl.subtract, "
                      f"{ccol}[0:tw, 1:2], op1=nl.equal, operand1=0.0)")
        self.emit(sc, f"nisa.tensor_tensor({dec}[0:tw, 0:tw], {dec}[0:tw, 0:tw], "
                      f"{same}[0:tw, 0:tw], nl.multiply)")
        self.emit(sc, "# ec[t] = exp(c_t) * [R_t == 0]: the decay of the entering state")
        ec = self.alloc(sc, (1, 128), 512, "ec")
        self.emit(sc, f"nisa.activation({ec}[0:1, 0:tw], nl.exp, {crow}[0:1, 0:tw])")
        self.emit(sc, f"nisa.tensor_scalar({rrow}[0:1, 0:tw], {rrow}[0:1, 0:tw], nl.equal, 0.0)")
        self.emit(sc, f"nisa.tensor_tensor({ec}[0:1, 0:tw], {ec}[0:1, 0:tw], "
                      f"{rrow}[0:1, 0:tw], nl.multiply)")
        return dec, ec, badk2

    def transpose_in(self, src: str, rows: str, cols: str, sc) -> str:
        """(rows, cols) SBUF -> (cols, rows) SBUF through a Tensor-engine transpose."""
        ps = self.psum_tile(sc, (128, 128))
        self.emit(sc, f"nisa.nc_transpose({ps}[0:{cols}, 0:{rows}], {src}[0:{rows}, 0:{cols}])")
        out = self.alloc(sc, (128, 128), 512, "tr")
        self.emit(sc, f"nisa.tensor_copy({out}[0:{cols}, 0:{rows}], {ps}[0:{cols}, 0:{rows}])")
        return out

    def chunk_state_dma(self, s, cp: ChunkPlan, env: dict, sc, load: bool) -> None:
        """The (K, V) carry from/to the state's HBM layout (a transpose if V comes first)."""
        K = self.sizes[cp.kd]
        full = {**env, cp.kd: Idx(f"0:{K}", frozenset())}
        hbm = f"{'init' if load else 'final'}_{s.name}[{self.hbm_index(s.dims, full, 'p0:p1', '')}]"
        carry = f"carry_{s.name}[0:{K}, {self.slot}, 0:P]"
        if s.dims.index(cp.kd) < s.dims.index(self.pd):
            self.emit(sc, f"nisa.dma_copy({carry}, {hbm})" if load
                      else f"nisa.dma_copy({hbm}, {carry})")
            return
        stage = self.alloc(sc, (128, 128), 512, "stage")
        if load:
            self.emit(sc, f"nisa.dma_copy({stage}[0:P, 0:{K}], {hbm})")
            ps = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_transpose({ps}[0:{K}, 0:P], {stage}[0:P, 0:{K}])")
            self.emit(sc, f"nisa.tensor_copy({carry}, {ps}[0:{K}, 0:P])")
        else:
            ps = self.psum_tile(sc, (128, 128))
            self.emit(sc, f"nisa.nc_transpose({ps}[0:P, 0:{K}], {carry})")
            self.emit(sc, f"nisa.tensor_copy({stage}[0:P, 0:{K}], {ps}[0:P, 0:{K}])")
            self.emit(sc, f"nisa.dma_copy({hbm}, {stage}[0:P, 0:{K}])")

