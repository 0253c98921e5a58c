"""The chunked algorithm: parallel within chunks of BLOCK_TIME steps (matmuls via tl.dot),
recurrent across chunks, for states ``S[K, V] = a_t ⊙ S + k_t v_tᵀ`` read out as
``o_t = sum_K q_t S_t`` where the decay a_t is 1 (identity), one number per grid index
(scalar: linear_attn, retnet, simple_gla, mamba2 — the SSD "segsum" form) or varies along K
(diagonal: gla); and for householder transitions ``S = alpha (I - beta k kᵀ) S + u wᵀ``
(delta_net, gated_delta_net) in the UT form (see ``Lowering._householder_chunk``); for dplr
transitions ``S = (Diag(w) + a bᵀ) S + u wᵀ`` (rwkv7, kda) in the same form with K-diagonal
decay pair tiles (``Lowering._dplr_chunk``).

With log decays g and their in-chunk cumulative sums c (c_t = g_1 + ... + g_t), for t in the
chunk and S the state before it:

    o_t   = sum_{s<=t} (q_t · (k_s ⊙ e^{c_t - c_s})) v_s  +  (q_t ⊙ e^{c_t}) S
    S_new = e^{c_last} ⊙ S  +  sum_s (k_s ⊙ e^{c_last - c_s}) v_sᵀ

Every exponent is c_t - c_s with t >= s, so <= 0 (docs/numerics.md); the key-diagonal
intra-chunk term splits it at a step e with s <= e < t into two exponents <= 0 (below).
A readout of the state entering the step, ``sum(prev(S) * q, K)`` (RWKV-6; ``Form.prev``),
takes the strictly causal mask (s < t) and c_{t-1} = c_t - g_t in place of c_t in o_t (its reset count n_{t-1} =
n_t - [g_t is a reset]); the state update is the same, and the poison moves one step later
(``scancc.ir.passes.chunked``, "Readouts of prev(S)"). The K-diagonal
intra-chunk term needs a per-K exponent; it is built by halving (``_diagonal_pairs``): each
pair s < t lies in exactly one block of 2h steps (h = BT/2, ..., 1) with s in the left half
and t in the right one, and with e the left half's last step (s <= e < t),
e^{c_t - c_s} = e^{c_t - c_e} e^{c_e - c_s}, both exponents <= 0, so the pairs of one level
are one tl.dot of (q ⊙ e^{c_t - c_e}) and (k ⊙ e^{c_e - c_s}) (log2 BT dots, tensor cores)
and the diagonal s = t is q_t · k_t; no [BT, BT, BK] product (docs/numerics.md). The
inter-chunk terms and the state update are tl.dot for every kind.
Option ``dot_precision`` (default "auto": tensor cores, float32 accumulation): on 16-bit inputs
the intra-chunk dots take 16-bit operands and the dots that read or update the state float32
operands at tf32; on float32 inputs every dot is tf32x3 (about float32 accuracy). ``"ieee"`` is
exact float32 (the chunked form then matches the recurrent one at every dtype), ``"tf32"``
single-pass tf32 (about 4e-4 relative on float32 inputs: over the float32 table), ``"tf32x3"``
every dot at tf32x3, ``"input"`` every operand in the input dtype (at bf16 over the 1e-2
table: docs/triton.md). The interpreter computes tf32 and tf32x3 in float32, so only "ieee"
and the input-dtype roundings are checked bit-for-bit against their GPU semantics here.

At the edges the kernels keep the recurrent semantics (``scancc.ir.passes.chunked``, "Edges"):
factor tiles are sanitized before any dot and the NaN is added back where the recurrence
puts it (``Lowering._poison``); log-decays at or below RESET_LOG_DECAY are hard resets,
counted (n) rather than summed, so e^{c_t - c_s} is a select on n_t == n_s.
"""
from __future__ import annotations

from dataclasses import dataclass

from scancc.ir import Kind, Node, Op, Recurrence
from scancc.ir.passes import chunked as shared
from scancc.ir.printer import format_expr, format_transition

from . import recurrent
from .plan import Plan, plan
from .recurrent import Env, Idx


@dataclass(frozen=True)
class Form:
    """The chunked form of a recurrence, found by matching its IR."""
    K: str                     # the contracted state dim
    V: str                     # the other state dim (split across programs)
    grid: tuple[str, ...]
    kind: Kind                 # IDENTITY, SCALAR, or DIAGONAL (decay along K)
    log_decay: Node | None     # g_t, with a_t = exp(g_t)
    log_of: bool               # True: g = log(decay) (decay not written as exp(...))
    k_side: tuple[Node, ...]   # factors of the injected term with dims K (and grid)
    v_side: tuple[Node, ...]   # the other factors (dims V and grid, or grid only)
    q_side: tuple[Node, ...]   # factors of the readout contraction besides the state
    contraction: Node          # the readout's sum(S * q, K) node
    hk: Node | None = None     # HOUSEHOLDER: the reflection's k (along K) and beta
    beta: Node | None = None
    la: Node | None = None     # DPLR: the rank-1 term's a and b (along K)
    lb: Node | None = None
    prev: bool = False         # the readout reads prev(S) (the state entering the step)


class NotChunkable(Exception):
    pass


def analyze(rec: Recurrence, prev: bool = False) -> Form:
    """The shared chunked-form analysis (``scancc.ir.passes.chunked``) of the one state, and
    what this emitter supports: one state, K and V register axes and the other state dims
    program ids, one contraction ``sum(S * q, K)`` read into outputs along the grid and V.
    ``prev``: also a contraction ``sum(prev(S) * q, K)`` (the forward kernels lower it; the
    default leaves it NotChunkable for the consumers that do not, e.g. chunked_backward)."""
    try:
        cs = shared.analyze(rec, prev).only()
    except shared.NotChunkable as e:
        raise NotChunkable(str(e)) from None
    s = rec.state(cs.state)
    P = plan(rec)
    if not set(cs.grid) <= set(P.grid):
        raise NotChunkable(f"state dims {list(s.dims)}: needs exactly two non-grid dims (K, V)")
    K, V = cs.K, cs.V
    sums = {n for o in rec.outputs for n in o.expr.walk() if n.op is Op.SUM and rec.uses_state(n)}
    if len(cs.contractions) != 1 or sums != {cs.contractions[0].node}:
        raise NotChunkable("the readout must read the state through one contraction "
                           "sum(S * q, K)")
    csum, q_side = cs.contractions[0].node, cs.contractions[0].q_side
    for o in rec.outputs:
        if V not in o.dims and rec.uses_state(o.expr):
            raise NotChunkable(f"output {o.name!r} lacks the value dim {V!r}")
        extra = set(rec.dims_of(o.expr)) - set(P.grid) - {V}
        if extra:
            raise NotChunkable(f"output {o.name!r} varies along {sorted(extra)}")
    if not cs.k_side:
        raise NotChunkable("the injected term has no factor along K")
    v_side = tuple(f for f in cs.inject if f not in cs.k_side)
    for f in cs.k_side + v_side + q_side:
        if set(rec.dims_of(f)) - set(P.grid) - {K, V}:
            raise NotChunkable(f"factor {format_expr(f)} varies along another dim")
    # g_t for the emitter: the exp's argument, or the decay itself with log_of (tl.log(a_t))
    log_of = cs.decay is not None and not cs.decay_is_exp
    g = cs.decay if log_of else cs.log_decay
    return Form(K, V, P.grid, cs.kind, g, log_of, cs.k_side, v_side, q_side, csum,
                cs.hk, cs.beta, cs.la, cs.lb, cs.reads_prev)


def applies(rec: Recurrence) -> tuple[bool, str]:
    """Whether the forward chunked kernel takes ``rec`` (readouts of prev(S) included)."""
    try:
        analyze(rec, prev=True)
    except NotChunkable as e:
        return False, str(e)
    return True, ""


class Lowering(recurrent.Lowering):
    algorithm = "chunked"
    scalar_groups = False

    def make_plan(self) -> Plan:
        self.form = analyze(self.rec, prev=True)
        f = self.form
        return Plan(f.grid, (f.V,), (self.rec.time, f.K, f.V), ())

    def axis_of(self, d: str) -> int:
        return 0 if d == self.rec.time else 1  # tiles are [time, K] or [time, V]

    def const_sizes(self) -> list[str]:
        return [self.form.K, self.form.V]

    # the fused kernel's chunk (steps), every kind (block_sizes={"time": ...} overrides it)
    FUSED_BT = 16

    def block_size(self, d: str, n: int, sizes: dict | None = None) -> int:
        if d == self.rec.time:
            # chunks of 16 steps for every kind (identity/scalar decays had 32): the [BT, K]
            # tiles held beside the [K, BV] state halve; sm_90, K=V=128, 4 warps: spill stores
            # 972 -> 40 B (linear_attn), 1296 -> 252 (simple_gla), 1180 -> 316 (retnet), 1460
            # -> 264 (mamba2) per thread at a modelled +0.1 / +4.0 / +9.0 / +0.5 % (docs/triton.md)
            return self.FUSED_BT
        return max(16, super().block_size(d, n, sizes))  # tl.dot needs >= 16 on a GPU

    def block_default(self, d: str) -> str:
        if d == self.rec.time:
            return f'{self.names_blocks}.get("{d}", {self.block_size(d, 0)})'
        return f"max(16, {super().block_default(d)})"

    def _base_env(self) -> dict[str, Idx]:
        base = {d: Idx(self.pid[d], None, None) for d in self.plan.grid}
        T = self.rec.time
        base[T] = Idx(self.off[T], T, self.msk[T], True)
        for d in (self.form.K, self.form.V):
            base[d] = Idx(self.off[d], d, self.msk[d])
        return base

    def load(self, name: str, env: Env) -> str:
        inp = self.rec.input(name)
        key = ("load", name, tuple(env[d] for d in inp.dims))
        if key in self._memo:
            return self._memo[key]
        tv = self.rec.time in inp.dims
        p = self.names.ir("p_", name)
        b = self.names.ir("b_", name)
        ptr, mask = self.pointer(self.arg[name], inp.dims, env, None, time_env=True)
        self.emit(tv, f"{p} = {ptr}")
        m = f", mask={mask}, other=0.0" if mask else ""
        self.emit(tv, f"{b} = tl.load({p}{m}).to(tl.float32)")
        self._memo[key] = b
        return b

    def product(self, factors, env: Env) -> str:
        if not factors:
            return "1.0"
        vals = [self.par(self.value(f, env), 2) for f in factors]
        return " * ".join(vals)

    def render_kernel(self) -> list[str]:
        rec, F = self.rec, self.form
        self.pro, self.body, self.step = [], [], []
        self._memo, self._varies, self._prec = {}, {}, {}
        env = Env(self._base_env())
        T, K, V = rec.time, F.K, F.V
        BT, BK, BV = self.block[T], self.block[K], self.block[V]
        s = rec.states[0]
        h = self.state_var[s.name]
        head = self._program_ids()
        head += [f"{self.off[K]} = tl.arange(0, {BK})[None, :]",
                 f"{self.off[V]} = {self.pid[V]} * {BV} + tl.arange(0, {BV})[None, :]",
                 f"{self.msk[K]} = {self.off[K]} < {self.size[K]}",
                 f"{self.msk[V]} = {self.off[V]} < {self.size[V]}"]
        init = [f"{h} = tl.zeros([{BK}, {BV}], dtype=tl.float32)"]
        kv_env = Env(env.base)
        ptr, mask = self.pointer(self.h0[s.name], s.dims, self._kv_env(kv_env), None)
        p0 = self.names.ir("p_", self.h0[s.name])
        init += [f"if {self.use_h0[s.name]}:", f"    {p0} = {ptr}",
                 f"    {h} += tl.load({p0}, mask={mask}, other=0.0).to(tl.float32)"]
        b = self.body
        # int64: time offsets times the strides after time may pass 2^31
        b.append(f"{self.off[T]} = i_c * {BT} + tl.arange(0, {BT})[:, None].to(tl.int64)")
        b.append(f"{self.msk[T]} = {self.off[T]} < {self.size[T]}")
        b.append(f"# {s.name}: {format_transition(s.transition)} + {format_expr(s.inject)}")
        qk, tv = f"{self.msk[T]} & {self.msk[K]}", f"{self.msk[T]} & {self.msk[V]}"
        b.append("# edges (scancc.ir.passes.chunked): non-finite factors enter the dots as 0 "
                 "and their NaN is added back where the recurrence puts it")
        kf, k_ok = self._factor("b_kf", self.product(F.k_side, env), qk)
        vf, v_ok = self._factor("b_vf", self.product(F.v_side, env), tv)
        b.append(f"# {format_expr(F.contraction)}")
        qf, q_ok = self._factor("b_qf", self.product(F.q_side, env), qk)
        dot = self._dot
        causal = f"({self.off[T]} >= tl.trans({self.off[T]}))"
        # the readout's mask: t >= s, or t > s for a readout of prev(S)
        rmask = self._readout_mask(causal)
        # non-finite counts: per step (rows, poisoning that step and the later ones) and per
        # state row (K); ``whole``: those that poison the whole state
        rows, krows, whole = [self._bad(k_ok, 1)], [self._bad(k_ok, 0)], []
        if F.kind is Kind.HOUSEHOLDER:
            o, hx = self._householder_chunk(env, qf, kf, vf, qk, causal)
            rows += hx
            whole = ["step"]  # a reflection mixes the rows
        elif F.kind is Kind.DPLR:
            o, hx = self._dplr_chunk(env, qf, kf, vf, qk, causal)
            rows += hx
            whole = ["step"]  # the rank-1 term mixes the rows
        elif F.kind is Kind.IDENTITY:
            a = self.bind(True, "b_A", f"tl.where({rmask}, "
                          + dot(qf, f"tl.trans({kf})") + ", 0.0)")
            o = self.bind(True, "b_o", dot(a, vf)
                          + " + " + dot(qf, h, "read"))
            b.append(f"{h} += " + dot(f"tl.trans({kf})", vf, "update"))
        else:
            gm = qk if F.kind is Kind.DIAGONAL else self.msk[T]
            g, g_ok, gc, gn, gl, gnl = self._log_decay(env, gm)
            rows.append(self._bad(g_ok, 1))
            gq, nq = self._readout_cumsums(g, gc, gn)  # c_t, n_t (prev(S): c_{t-1}, n_{t-1})
            if F.kind is Kind.SCALAR:
                whole = [self._bad(g_ok, 0)]
                same = f"({nq} == tl.trans({gn}))"
                seg = (f"tl.exp(tl.where({rmask} & {same}, {gq} - tl.trans({gc}), "
                       f"float(\"-inf\")))")
                a = self.bind(True, "b_A", dot(qf, f"tl.trans({kf})")
                              + f" * {seg}")
                decay_S = f"tl.where({gnl} == 0, tl.exp({gl}), 0.0)"
            else:
                krows.append(self._bad(g_ok, 0))
                # per-K exponents c_t - c_s, t >= s, no reset in (s, t]
                a = self._diagonal_pairs(qf, kf, gq, nq, gc, gn)
                decay_S = f"tl.trans(tl.where({gnl} == 0, tl.exp({gl}), 0.0))"
            e_now = f"tl.where({nq} == 0, tl.exp({gq}), 0.0)"
            o = self.bind(True, "b_o", dot(a, vf) + " + "
                          + dot(f"({qf} * {e_now})", h, "read"))
            kd = f"({kf} * tl.where({gn} == {gnl}, tl.exp({gl} - {gc}), 0.0))"
            b.append(f"{h} = {h} * {decay_S} + "
                     + dot(f"tl.trans{kd}", vf, "update"))
        vbad = self.bind(True, "b_bad_v", self._bad(v_ok, None))
        self._poison(o, h, rows, krows, whole, self._bad(q_ok, 1), vbad)
        self._memo[(F.contraction, env.key)] = o
        for out in rec.outputs:
            b.append(f"# {out.name} = {format_expr(out.expr)}")
            v = self.value(out.expr, env)
            ptr, mask = self.pointer(self.arg[out.name], out.dims, env, None, time_env=True)
            p = self.names.ir("p_", out.name)
            b.append(f"{p} = {ptr}")
            b.append(f"tl.store({p}, {self.par(v, 4)}.to({p}.dtype.element_ty), mask={mask})")
        fin = [f"if {self.store_ht}:"]
        ptr, mask = self.pointer(self.ht[s.name], s.dims, self._kv_env(kv_env), None)
        pt = self.names.ir("p_", self.ht[s.name])
        fin += [f"    {pt} = {ptr}", f"    tl.store({pt}, {h}, mask={mask})"]
        lines = head + self.pro + init
        lines.append(f"for i_c in range(0, tl.cdiv({self.size[T]}, {BT})):")
        lines += ["    " + ln for ln in self.body]
        return lines + fin

    def _householder_chunk(self, env: Env, qf: str, uf: str, wf: str, qk: str,
                           causal: str) -> tuple[str, list[str]]:
        """S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + u_t w_tᵀ over one chunk (UT form).

        With r_tᵀ = k_tᵀ S_{t-1} and c the in-chunk cumulative log alpha:
          (I + M) R = e^{c_{t-1}} K S + N W,  M[t,i] = e^{c_{t-1}-c_i} (k_t·k_i) alpha_i beta_i,
                                              N[t,i] = e^{c_{t-1}-c_i} (k_t·u_i)        (i < t)
          o_t = e^{c_t} q_tᵀ S
                + sum_{i<=t} e^{c_t-c_i} ((q_t·u_i) w_i - (q_t·k_i) alpha_i beta_i r_i)
          S'  = e^{c_L} S + sum_i e^{c_L-c_i} (u_i w_iᵀ - alpha_i beta_i k_i r_iᵀ)
        R comes from forward substitution, one row per step of a loop over the chunk. Each
        e^{c_t - c_s} is 0 where a reset lies in (s, t] (and alpha is 0 at a reset).
        Returns (the output tile, the per-step non-finite counts of k, beta and the decay).
        """
        T, b, dot = self.rec.time, self.body, self._dot
        h = self.state_var[self.rec.states[0].name]
        BT = self.block[T]
        t = self._householder_tiles(env, qk, causal)
        kh, ab, seg_prev, seg = t["kh"], t["ab"], t["seg_prev"], t["seg"]
        e_prev, e_now, e_last, to_end = t["e_prev"], t["e_now"], t["e_last"], t["to_end"]
        scaled = self._scaled

        # the inject's k-side the reflection's k (u = k: delta_net, gated_delta_net): N is M
        # without ab, and -QK R + QU W = QU X, -Kdᵀ R + Udᵀ W = Udᵀ X with X = W - ab ⊙ R
        shared = self.form.k_side == (self.form.hk,)
        if shared:
            n = self.bind(True, "b_N", f"{dot(kh, f'tl.trans({kh})')} * {seg_prev}")
            m = self.bind(True, "b_M", f"{n} * tl.trans({ab})")
        else:
            m = self.bind(True, "b_M", f"{dot(kh, f'tl.trans({kh})')} * {seg_prev} * "
                          f"tl.trans({ab})")
            n = self.bind(True, "b_N", f"{dot(kh, f'tl.trans({uf})')} * {seg_prev}")
        r = self.bind(True, "b_R", f"{scaled(dot(kh, h, 'read'), e_prev)} + {dot(n, wf, 'solve')}")
        rows = self.bind(True, "o_row", f"tl.arange(0, {BT})[:, None]")
        i, mr, upd = self.names.new("i_r"), self.names.new("b_m_r"), self.names.new("b_upd")
        b.append(f"for {i} in range(1, {BT}):  # forward substitution: R = (I + M)^-1 R")
        b.append(f"    {mr} = tl.sum(tl.where({rows} == {i}, {m}, 0.0), axis=0, keep_dims=True)")
        b.append(f"    {upd} = tl.sum(tl.trans({mr}) * {r}, axis=0, keep_dims=True)")
        b.append(f"    {r} = tl.where({rows} == {i}, {r} - {upd}, {r})")
        if shared:
            x = self.bind(True, "b_X", f"{wf} - {ab} * {r}")
            qum = self.bind(True, "b_QU", f"{dot(qf, f'tl.trans({kh})')} * {seg}")
            o = self.bind(True, "b_o", f"{scaled(dot(qf, h, 'read'), e_now)} + "
                          f"{dot(qum, x, 'solve')}")
            ud = kh if to_end is None else f"({kh} * {to_end})"
            b.append(f"{h} = {scaled(h, e_last)} + {dot(f'tl.trans({ud})', x, 'update')}")
            return o, t["bad"]
        qkm = self.bind(True, "b_QK", f"{dot(qf, f'tl.trans({kh})')} * {seg} * tl.trans({ab})")
        qum = self.bind(True, "b_QU", f"{dot(qf, f'tl.trans({uf})')} * {seg}")
        o = self.bind(True, "b_o", f"{scaled(dot(qf, h, 'read'), e_now)} - {dot(qkm, r, 'solve')} + "
                      f"{dot(qum, wf)}")
        kd = f"({kh} * {ab})" if to_end is None else f"({kh} * {ab} * {to_end})"
        ud = uf if to_end is None else f"({uf} * {to_end})"
        b.append(f"{h} = {scaled(h, e_last)} - {dot(f'tl.trans{kd}', r, 'update')} + "
                 f"{dot(f'tl.trans({ud})', wf, 'update')}")
        return o, t["bad"]

    def _dplr_chunk(self, env: Env, qf: str, uf: str, wf: str, qk: str,
                    causal: str) -> tuple[str, list[str]]:
        """S_t = (Diag(w_t) + a_t b_tᵀ) S_{t-1} + u_t w'_tᵀ over one chunk (docs/ir.md).

        With r_tᵀ = b_tᵀ S_{t-1}, c the in-chunk cumulative log w (per K) and D[t, i, k] the
        K-diagonal transport e^{c_{t-1,k} - c_{i,k}} (i < t; 0 across a reset of k):
          (I - M) R = (b ⊙ e^{c_{t-1}}) S + N W',  M[t,i] = sum_k b_t,k a_i,k D[t,i,k],
                                                  N[t,i] = sum_k b_t,k u_i,k D[t,i,k]
          o_t = (q_t ⊙ e^{c_t})ᵀ S + sum_{i<=t} (q_t·(a_i ⊙ e^{c_t-c_i})) r_i
                                            + (q_t·(u_i ⊙ e^{c_t-c_i})) w'_i
          S'  = e^{c_L} ⊙ S + sum_i (a_i ⊙ e^{c_L-c_i}) r_iᵀ + (u_i ⊙ e^{c_L-c_i}) w'_iᵀ
        The pair tiles are sums over K built one row t at a time (``_dplr_pairs``); R by
        forward substitution, one row per step. Returns (the output tile, the per-step non-finite
        counts of a, b and the decay)."""
        F, T, b, dot = self.form, self.rec.time, self.body, self._dot
        h = self.state_var[self.rec.states[0].name]
        BT = self.block[T]
        af, a_ok = self._factor("b_la", self.value(F.la, env), qk)
        bf, b_ok = self._factor("b_lb", self.value(F.lb, env), qk)
        g, g_ok, gc, gn, gl, gnl = self._log_decay(env, qk)
        bad = [self._bad(a_ok, 1), self._bad(b_ok, 1), self._bad(g_ok, 1)]
        reset = f"{g}_reset"
        gn_prev = self.bind(True, "b_gn_prev", f"{gn} - {reset}.to(tl.int32)")
        gc_prev = f"({gc} - {g})"
        # pair tiles over the transports from after step i to before step t (i < t)
        m, n = self._dplr_pairs(bf, [af, uf], gc_prev, gn_prev, gc, gn, True, ["b_M", "b_N"])
        e_prev = f"tl.where({gn_prev} == 0, tl.exp({gc_prev}), 0.0)"
        r = self.bind(True, "b_R", f"{dot(f'({bf} * {e_prev})', h, 'read')} + {dot(n, wf, 'solve')}")
        rows = self.bind(True, "o_row", f"tl.arange(0, {BT})[:, None]")
        i, mr, upd = self.names.new("i_r"), self.names.new("b_m_r"), self.names.new("b_upd")
        b.append(f"for {i} in range(1, {BT}):  # forward substitution: R = (I - M)^-1 R")
        b.append(f"    {mr} = tl.sum(tl.where({rows} == {i}, {m}, 0.0), axis=0, keep_dims=True)")
        b.append(f"    {upd} = tl.sum(tl.trans({mr}) * {r}, axis=0, keep_dims=True)")
        b.append(f"    {r} = tl.where({rows} == {i}, {r} + {upd}, {r})")
        # and to after step t (i <= t)
        qa, qu = self._dplr_pairs(qf, [af, uf], gc, gn, gc, gn, False, ["b_QA", "b_QU"])
        e_now = f"tl.where({gn} == 0, tl.exp({gc}), 0.0)"
        o = self.bind(True, "b_o", f"{dot(f'({qf} * {e_now})', h, 'read')} + {dot(qa, r, 'solve')} + "
                      f"{dot(qu, wf)}")
        to_end = self.bind(True, "b_to_end", f"tl.where({gn} == {gnl}, tl.exp({gl} - {gc}), 0.0)")
        e_last = f"tl.trans(tl.where({gnl} == 0, tl.exp({gl}), 0.0))"
        b.append(f"{h} = {h} * {e_last} + {dot(f'tl.trans({af} * {to_end})', r, 'update')} + "
                 f"{dot(f'tl.trans({uf} * {to_end})', wf, 'update')}")
        return o, bad

    def _dplr_pairs(self, x: str, ys: list[str], c_row: str, n_row: str, c_col: str,
                    n_col: str, strict: bool, names: list[str]) -> list[str]:
        """[BT, BT] pair tiles P[t, i] = sum_k x[t, k] y[i, k] e^{c_row[t, k] - c_col[i, k]}
        (0 where n_row[t, k] != n_col[i, k], a reset between; i < t if ``strict``, else
        i <= t), one per y of ``ys``, built one row t at a time from [BT, BK] tiles: the whole
        [BT, BT, BK] transport would be 32K floats at K=128 and spilled (issue 15, ptxas:
        docs/performance/triton.md). The exponents are those of the whole transport (each
        <= 0), the masks the same; shared with the staged form (staged.py)."""
        b, BT = self.body, self.block[self.rec.time]
        row = self.bind(True, "o_row", f"tl.arange(0, {BT})[:, None]")
        accs = [self.bind(True, nm, f"tl.zeros([{BT}, {BT}], dtype=tl.float32)") for nm in names]
        j = self.names.new("i_j")
        xj, cj, nj, dj = (self.names.new(v) for v in ("b_x_j", "b_c_j", "b_n_j", "b_d_j"))
        pick = f"tl.where({row} == {j}, {{}}, 0{{}})"
        before = "<" if strict else "<="
        b.append(f"for {j} in range(0, {BT}):  # row {j} of the pair tiles")
        b.append(f"    {xj} = tl.sum({pick.format(x, '.0')}, axis=0, keep_dims=True)")
        b.append(f"    {cj} = tl.sum({pick.format(c_row, '.0')}, axis=0, keep_dims=True)")
        b.append(f"    {nj} = tl.sum({pick.format(n_row, '')}, axis=0, keep_dims=True)")
        b.append(f"    {dj} = tl.exp(tl.where(({row} {before} {j}) & ({nj} == {n_col}), "
                 f"{cj} - {c_col}, float(\"-inf\")))")
        for acc, y in zip(accs, ys):
            b.append(f"    {acc} = tl.where({row} == {j}, tl.trans(tl.sum({xj} * {y} * {dj}, "
                     f"axis=1, keep_dims=True)), {acc})")
        return accs

    # the largest chunk _diagonal_pairs takes (its levels are emitted for halves up to BT / 2)
    MAX_DIAGONAL_BT = 256

    def _diagonal_pairs(self, qf: str, kf: str, gq: str, nq: str, gc: str, gn: str) -> str:
        """The key-diagonal intra-chunk pair tile A[t, s] = sum_k q_t k_s e^{c'_t - c_s} (s <= t,
        or s < t for a readout of prev(S); 0 where n'_t != n_s, a reset between; c'_t, n'_t:
        ``gq``, ``nq``, the readout's cumulative sums) by halving, with no [BT, BT, BK]
        product: every pair s < t of the chunk lies in one block of 2h steps (h = BT/2,
        BT/4, ..., 1: the highest bit where s and t differ) with s in its left half and t in
        its right half. With e the last step of the left half, e^{c'_t - c_s} =
        e^{c'_t - c_e} e^{c_e - c_s} and both exponents are <= 0 (s <= e < t, and e <= t - 1
        for prev(S)); a reset in (s, t] is one in (s, e] or in (e, t] (n'_t != n_e or
        n_e != n_s, n never decreases), which sets that factor's exponent to -inf. One tl.dot
        per level over the whole chunk: (q ⊙ e^{c'_t - c_e}) (k ⊙ e^{c_e - c_s})ᵀ, the q rows
        of left halves and the k rows of right halves 0, the pairs of different blocks masked;
        c_e and n_e are picked from the [BT/2h, 2h, BK] view of c and n. The diagonal s = t is
        q_t · k_t (exponent 0; none for prev(S)). Shared with the staged form."""
        b, T, K = self.body, self.rec.time, self.form.K
        BT, BK = self.block[T], self.block[K]
        row = self.bind(True, "o_row", f"tl.arange(0, {BT})[:, None]")
        col = self.bind(True, "o_col", f"tl.arange(0, {BT})[None, :]")
        ninf = 'float("-inf")'
        b.append(f"tl.static_assert({BT} <= {self.MAX_DIAGONAL_BT}, \"key-diagonal chunks of at "
                 f"most {self.MAX_DIAGONAL_BT} steps\")")
        if self.form.prev:
            a = self.bind(True, "b_A", f"tl.zeros([{BT}, {BT}], dtype=tl.float32)")
        else:
            a = self.bind(True, "b_A", f"tl.where({row} == {col}, tl.sum({qf} * {kf}, axis=1, "
                          "keep_dims=True), 0.0)  # s = t")
        h = 1
        while h < self.MAX_DIAGONAL_BT:
            sh = f"[{BT} // {2 * h}, {2 * h}, {BK}]"
            x = {v: self.names.new(f"b_{v}_{h}") for v in ("ce", "ne", "qe", "ke")}
            pos = f"tl.arange(0, {2 * h})[None, :, None] == {h - 1}"
            pick = (lambda t, z: f"tl.reshape(tl.broadcast_to(tl.sum(tl.where({pos}, "  # noqa: E731
                    f"tl.reshape({t}, {sh}), {z}), axis=1, keep_dims=True), {sh}), [{BT}, {BK}])")
            right = f"({row} // {h} % 2 == 1)"
            lines = [f"{x['ce']} = {pick(gc, '0.0')}  # c and n at e, the left half's last step",
                     f"{x['ne']} = {pick(gn, '0')}",
                     f"{x['qe']} = {qf} * tl.exp(tl.where({right} & ({nq} == {x['ne']}), "
                     f"{gq} - {x['ce']}, {ninf}))",
                     f"{x['ke']} = {kf} * tl.exp(tl.where(~{right} & ({gn} == {x['ne']}), "
                     f"{x['ce']} - {gc}, {ninf}))",
                     f"{a} += tl.where({row} // {2 * h} == {col} // {2 * h}, "
                     f"{self._dot(x['qe'], 'tl.trans(' + x['ke'] + ')', 'read')}, 0.0)"]
            b.append(f"if {BT} > {h}:  # s in the left, t in the right half of {2 * h} steps")
            b += ["    " + ln for ln in lines]
            h *= 2
        return a

    @staticmethod
    def _scaled(x: str, e: str | None) -> str:
        return x if e is None else f"{e} * {x}"

    def _householder_tiles(self, env: Env, qk: str, causal: str, pairs: bool = True) -> dict:
        """The chunk's householder tiles (``_householder_chunk``; shared with the staged form):
        kh, beta (sanitized factors), ab (alpha beta), seg_prev / seg (e^{c_{t-1}-c_i}, i < t /
        e^{c_t-c_i}, i <= t), e_prev / e_now / e_last / to_end (e^{c_{t-1}}, e^{c_t}, e^{c_L},
        e^{c_L-c_t}; None without a decay) and bad (per-step non-finite counts of k, beta and
        the decay). Without ``pairs``, no [BT, BT] tiles (seg_prev, seg: None)."""
        F, T = self.form, self.rec.time
        kh, kh_ok = self._factor("b_hk", self.value(F.hk, env), qk)
        beta, beta_ok = self._factor("b_beta", self.value(F.beta, env), self.msk[T])
        bad = [self._bad(kh_ok, 1), self._bad(beta_ok, 1)]
        strict = f"({self.off[T]} > tl.trans({self.off[T]}))"
        if F.log_decay is not None:
            g, g_ok, gc, gn, gl, gnl = self._log_decay(env, self.msk[T])
            bad.append(self._bad(g_ok, 1))
            reset = f"{g}_reset"
            gn_prev = f"({gn} - {reset}.to(tl.int32))"  # resets in steps before t
            ab = self.bind(True, "b_ab", f"tl.where({reset}, 0.0, tl.exp({g})) * {beta}")
            seg_prev = seg = None
            if pairs:
                seg_prev = self.bind(True, "b_seg_prev", f"tl.exp(tl.where({strict} & "
                                     f"({gn_prev} == tl.trans({gn})), {gc} - {g} - tl.trans({gc}), "
                                     f"float(\"-inf\")))")
                seg = self.bind(True, "b_seg", f"tl.exp(tl.where({causal} & "
                                f"({gn} == tl.trans({gn})), {gc} - tl.trans({gc}), "
                                f"float(\"-inf\")))")
            e_prev = f"tl.where({gn_prev} == 0, tl.exp({gc} - {g}), 0.0)"
            e_now = f"tl.where({gn} == 0, tl.exp({gc}), 0.0)"
            e_last = f"tl.where({gnl} == 0, tl.exp({gl}), 0.0)"
            to_end = f"tl.where({gn} == {gnl}, tl.exp({gl} - {gc}), 0.0)"
        else:
            ab = beta
            seg_prev = f"tl.where({strict}, 1.0, 0.0)" if pairs else None
            seg = f"tl.where({causal}, 1.0, 0.0)" if pairs else None
            e_prev = e_now = e_last = to_end = None
        return dict(kh=kh, beta=beta, bad=bad, ab=ab, seg_prev=seg_prev, seg=seg,
                    e_prev=e_prev, e_now=e_now, e_last=e_last, to_end=to_end)

    def _readout_mask(self, causal: str) -> str:
        """The intra-chunk mask of the readout: ``causal`` (t >= s), or for a readout of
        prev(S) the strictly causal t > s."""
        if not self.form.prev:
            return causal
        T = self.rec.time
        return f"({self.off[T]} > tl.trans({self.off[T]}))"

    def _readout_cumsums(self, g: str, gc: str, gn: str) -> tuple[str, str]:
        """The cumulative log-decay and reset count the readout at t sees: (c_t, n_t), or for a
        readout of prev(S) (c_{t-1}, n_{t-1}) = (c_t - g_t, n_t - [g_t is a reset]) (g is 0
        at a reset, so c_{t-1} needs no select)."""
        if not self.form.prev:
            return gc, gn
        gq = self.bind(True, "b_gc_prev", f"{gc} - {g}")
        nq = self.bind(True, "b_gn_prev", f"{gn} - {g}_reset.to(tl.int32)")
        return gq, nq

    def _poison(self, o: str, h: str, rows: list[str], krows: list[str], whole: list[str],
                qbad: str, vbad: str):
        """Adds NaN back where the recurrence puts it (module doc of scancc.ir.passes.chunked),
        into the output tile ``o`` and the state ``h`` leaving the chunk."""
        step = self._poison_output(o, rows, qbad, vbad)
        self._poison_state(h, krows, whole, step, vbad)

    def _poison_output(self, o: str, rows: list[str], qbad: str, vbad: str) -> str:
        """NaN into output rows at and after a step with a non-finite k-side/decay/householder
        factor (``rows``: per-step counts), rows with a non-finite q (``qbad``: per-step
        counts), and columns at and after a non-finite v-side factor (``vbad``: the [BT, BV]
        tile of 0/1). Returns the name of the per-step counts."""
        step = self.bind(True, "b_bad_step", " + ".join(rows))
        # prev(S): a bad factor at step s poisons the outputs from s + 1 on (exclusive sums)
        ex = lambda x: f" - {x}" if self.form.prev else ""  # noqa: E731
        prow = self.bind(True, "b_prow", f"(tl.cumsum({step}, axis=0){ex(step)} > 0) | "
                         f"({qbad} > 0)")
        pcol = self.bind(True, "b_pcol", f"tl.cumsum({vbad}, axis=0){ex(vbad)} > 0")
        self.body.append(f"{o} += tl.where({prow} | {pcol}, float(\"nan\"), 0.0)")
        return step

    @staticmethod
    def _bad(ok: str, axis: int | None) -> str:
        """The count of non-finite elements of a tile (``ok`` its finiteness) along ``axis``
        (None: the tile of 0/1 itself). An expression, used where the poison is added: taken
        early, the counts stay live through the dots (ptxas: more spills, not fewer)."""
        e = f"tl.where({ok}, 0, 1)"
        return e if axis is None else f"tl.sum({e}, axis={axis}, keep_dims=True)"

    def _poison_state(self, h: str, krows: list[str], whole: list[str], step: str, vbad: str):
        """NaN into the state ``h`` leaving the chunk: the rows (K) of non-finite k-side
        factors (``krows``), the columns of v-side ones (``vbad``), all of it for ``whole``
        (counts; "step": any of the per-step counts ``step``)."""
        srow = " | ".join([f"(tl.trans({' + '.join(krows)}) > 0)"] +
                          [f"(tl.sum({step if w == 'step' else w}) > 0)" for w in whole])
        self.body.append(f"{h} += tl.where({srow} | (tl.sum({vbad}, axis=0, keep_dims=True) > 0), "
                         f"float(\"nan\"), 0.0)")

    def _factor(self, base: str, expr: str, mask: str) -> tuple[str, str]:
        """(tile, finite): a chunk's factor tile, 0 outside ``mask`` and where non-finite
        (so the dots never see NaN or inf), and where it was finite (to add the poison back)."""
        x = self.bind(True, base, f"tl.where({mask}, {expr}, 0.0)")
        ok = self.bind(True, f"{x}_ok", f"tl.abs({x}) < float(\"inf\")")
        self.body.append(f"{x} = tl.where({ok}, {x}, 0.0)")
        return x, ok

    def _log_decay(self, env: Env, mask: str):
        """The chunk's log-decay tiles (g, finite, c, n, c_last, n_last): g the log-decays
        with resets (g <= RESET_LOG_DECAY, kept in ``{g}_reset``) and non-finite values (NaN,
        +inf: ``finite`` false) set to 0, c their cumulative sums, n the cumulative count of
        resets; the decay from s to t is exp(c_t - c_s) where n_t == n_s, else 0."""
        F = self.form
        g = self.value(F.log_decay, env)
        if F.log_of:
            g = f"tl.log({g})"
        g = self.bind(True, "b_g", f"tl.where({mask}, {g}, 0.0)")  # padded rows: no decay
        ok = self.bind(True, f"{g}_ok", f"{g} < float(\"inf\")")  # NaN, +inf: poison
        reset = self.bind(True, f"{g}_reset", f"{g} <= {shared.RESET_LOG_DECAY!r}")
        self.body.append(f"{g} = tl.where({ok} & ~{reset}, {g}, 0.0)")
        gc = self.bind(True, "b_gc", f"tl.cumsum({g}, axis=0)")
        gn = self.bind(True, "b_gn", f"tl.cumsum({reset}.to(tl.int32), axis=0)")
        gl = self.bind(True, "b_glast", f"tl.sum({g}, axis=0, keep_dims=True)")
        gnl = self.bind(True, "b_gnlast", f"tl.sum({reset}.to(tl.int32), axis=0, keep_dims=True)")
        return g, ok, gc, gn, gl, gnl

    @property
    def dot_f32(self) -> str | None:
        """The kernel's constexpr precision of float32 dot operands under "auto" (the launcher
        sets it from the input dtype: tf32x3 on float32 inputs, tf32 on 16-bit ones)."""
        if self.options.get("dot_precision", "auto") != "auto":
            return None
        if not hasattr(self, "_dot_f32"):
            self._dot_f32 = self.names.new("DOT_F32")
        return self._dot_f32

    def signature(self) -> tuple[list[str], list[str]]:
        params, consts = super().signature()
        return params, consts + ([self.dot_f32] if self.dot_f32 else [])

    def compile_args(self, sizes: dict, dtype: str) -> tuple[dict, dict]:
        sig, const = super().compile_args(sizes, dtype)
        if self.dot_f32:
            const[self.dot_f32] = "tf32x3" if dtype == "float32" else "tf32"
        return sig, const

    def fused_warps(self, nw: str) -> str:
        """The fused kernel's warps (an expression) from the launcher's ``num_warps`` ``nw``:
        twice as many for identity and K-diagonal decays (sm_90, chunks of 16, K=V=128: no
        spills for a modelled +7.1 % (linear_attn); gla 3284 -> 96 B and -1.8 %); scalar
        decays and householder transitions stay at ``nw`` (zero spills at 8 warps cost them
        +17 % / +120 %); docs/triton.md "the fused kernel's chunk and warps")."""
        return f"min(2 * {nw}, 32)" if self.form.kind in (Kind.IDENTITY, Kind.DIAGONAL) else nw

    def render_launcher(self) -> str:
        """The recurrent launcher, plus the DOT_F32 argument under "auto"."""
        text = super().render_launcher()
        if type(self).render_launcher is Lowering.render_launcher:  # the fused kernel alone
            w = self.fused_warps("num_warps")
            if w != "num_warps":
                text = text.replace("        num_warps=num_warps,\n", f"        num_warps={w},\n")
        if not self.dot_f32:
            return text
        lines = text.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith("    grid = ("))
        first = self.arg[self.rec.inputs[0].name]
        lines.insert(at, f'    {self.dot_f32} = "tf32x3" if {first}.dtype == torch.float32 '
                         'else "tf32"  # float32 dot operands (dot_precision="auto")')
        nw = next(i for i, ln in enumerate(lines) if ln.strip().startswith("num_warps="))
        lines.insert(nw, f"        {self.dot_f32},")
        return "\n".join(lines) + "\n"

    def _dot(self, a: str, b: str, role: str = "intra") -> str:
        """tl.dot of two float32 tiles, at the precision the ``dot_precision`` option asks.

        "auto" (default): tensor cores, float32 accumulation. On 16-bit inputs the intra-chunk
        dots ("intra", "solve") take 16-bit operands and the dots that read or update the state
        (``role`` "read", "update": the accumulation-sensitive operands, the state and the
        decay-scaled k) float32 operands at tf32; on float32 inputs every dot is tf32x3 (about
        float32 accuracy). Measured/modelled (docs/triton.md): every operand in bf16 exceeds
        the 1e-2 bf16 table (delta_net 1.03e-2, mamba2 1.01e-2 at T=257); plain tf32 on
        float32 inputs, modelled, 4.3e-4 rel-RMS against the 2e-5 float32 table (opt-in:
        "tf32")."""
        mode = self.options.get("dot_precision", "auto")
        if mode == "auto" and role in ("read", "update"):
            return f"tl.dot({a}, {b}, input_precision={self.dot_f32})"
        if mode in ("input", "auto"):  # operands in the input dtype: bf16/fp16 tensor cores
            dt = f"{self.arg[self.rec.inputs[0].name]}.dtype.element_ty"
            prec = '"ieee"' if mode == "input" else self.dot_f32
            return f"tl.dot({a}.to({dt}), {b}.to({dt}), input_precision={prec})"
        return f'tl.dot({a}, {b}, input_precision="{mode}")'

    def _kv_env(self, env: Env) -> Env:
        """Indices of the [K, V] state block: K down the rows, V along the columns."""
        K = self.form.K
        return env.with_(K, Idx(f"tl.trans({self.off[K]})", K, f"tl.trans({self.msk[K]})"))
