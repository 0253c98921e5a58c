"""The chunked backward's kernels (module doc of ``chunked_backward``): plain Triton, generic
over the chunked form's factors, computing in float32.

Every factor (q, k, v, g, dO) and every factor gradient (dq, dk, dv, dg, O) is addressed
through strides, not a fixed [G, T, K|V] layout, so a factor that is one of the recurrence's
inputs is read where it lies, in its dtype (``chunked_backward._Factor``): the flattened grid
index i_g splits into (i_g // N1, i_g % N1) (the outer and inner grid dims), each divided by
its group ratio (mamba2's B and C: heads -> groups, read per group, never copied per head),
times its stride; then time and the feature dim (K or V) by theirs. A materialised factor is
the same with the strides of a contiguous [G, T, F] tensor. The chunk-boundary states and
their gradients (hc, dhc: [G, NC, K, V]) and h0 / dht / dh0 ([G, K, V]) stay contiguous.

With HAS_W the V-side factor is v_t = w_t x_t: a per-step scalar w (its own strided
[grid, T] factor) times x, the ``v`` the kernels read (mamba2: v = dt x). ``bwd_dv`` then
writes the chain rule's two terms in its epilogue, w ⊙ dL/dv (dL/dx) in ``dv`` and each
V-block's share of sum_V(dL/dv ⊙ x) (dL/dw) in ``dw``, instead of dL/dv.
Imported only through ``chunked_backward.kernels()``, after the runtime chose the interpreter
or the GPU."""
import triton
import triton.language as tl

# log(2**-126): a decay below float32's smallest normal number is a hard reset
# (scancc.ir.passes.chunked.RESET_LOG_DECAY; the test checks they agree)
RESET: tl.constexpr = tl.constexpr(-87.33654475055310898657)


@triton.jit
def _rows(p, i_g, N1, s0, s1, r0, r1):
    """``p`` advanced to grid index i_g: the outer index (i_g // N1) over r0 times s0, the
    inner (i_g % N1) over r1 times s1 (r: a group ratio, 1 when the tensor has the dim)."""
    return p + (i_g // N1 // r0) * s0 + (i_g % N1 // r1) * s1


@triton.jit
def _decays(g, o_t, T, BT: tl.constexpr):
    """Cumulative log-decays of a chunk with hard resets counted: (c, n, c_L, n_L)."""
    reset = g <= RESET
    n = tl.cumsum(reset.to(tl.int32), 0)
    c = tl.cumsum(tl.where(reset, 0.0, g), 0)
    last = tl.arange(0, BT) == BT - 1   # padded steps are g = 0: they change nothing
    return c, n, tl.sum(tl.where(last, c, 0.0), 0), tl.sum(tl.where(last, n, 0), 0)


@triton.jit
def _decays_t(g, BT: tl.constexpr):
    """``_decays`` of log-decays along K, [BK, BT] (time along axis 1): (c, n) [BK, BT],
    (c_L, n_L) [BK]."""
    reset = g <= RESET
    n = tl.cumsum(reset.to(tl.int32), 1)
    c = tl.cumsum(tl.where(reset, 0.0, g), 1)
    last = (tl.arange(0, BT) == BT - 1)[None, :]
    return c, n, tl.sum(tl.where(last, c, 0.0), 1), tl.sum(tl.where(last, n, 0), 1)


@triton.jit
def _decays_k(g, BT: tl.constexpr):
    """``_decays`` of log-decays along K, [BT, BK] (time along axis 0): (c, n) [BT, BK],
    (c_L, n_L) [BK]."""
    reset = g <= RESET
    n = tl.cumsum(reset.to(tl.int32), 0)
    c = tl.cumsum(tl.where(reset, 0.0, g), 0)
    last = (tl.arange(0, BT) == BT - 1)[:, None]
    return c, n, tl.sum(tl.where(last, c, 0.0), 0), tl.sum(tl.where(last, n, 0), 0)


@triton.jit
def fwd_h(k, k_s0, k_s1, k_r0, k_r1, k_st, k_sf, v, v_s0, v_s1, v_r0, v_r1, v_st, v_sf, g, g_s0,
          g_s1, g_r0, g_r1, g_st, g_sf, w, w_s0, w_s1, w_r0, w_r1, w_st, w_sf, h0, hc, T, K, V, NC,
          N1, HAS_W: tl.constexpr, HAS_G: tl.constexpr, HAS_H0: tl.constexpr, BT: tl.constexpr,
          BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, DIAG: tl.constexpr = False):
    """The state entering each chunk: hc[i_g, i_c] ([K, V] float32), one [BK, BV] tile per
    program, sequential over chunks."""
    i_g, i_k, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    k = _rows(k, i_g, N1, k_s0, k_s1, k_r0, k_r1)  # this grid index's rows
    v = _rows(v, i_g, N1, v_s0, v_s1, v_r0, v_r1)
    g = _rows(g, i_g, N1, g_s0, g_s1, g_r0, g_r1)
    w = _rows(w, i_g, N1, w_s0, w_s1, w_r0, w_r1)
    h0, hc = h0 + i_g * K * V, hc + i_g * NC * K * V
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    p_kv = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + p_kv, mask=m_kv, other=0.0)
    for i_c in range(0, NC):
        tl.store(hc + i_c * K * V + p_kv, S.to(hc.dtype.element_ty), mask=m_kv)
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < T
        # k read transposed: [BK, BT]
        b_kt = tl.load(k + o_t[None, :] * k_st + o_k[:, None] * k_sf,
                       mask=m_t[None, :] & (o_k[:, None] < K), other=0.0).to(tl.float32)
        b_v = tl.load(v + o_t[:, None] * v_st + o_v[None, :] * v_sf,
                      mask=m_t[:, None] & (o_v[None, :] < V), other=0.0).to(tl.float32)
        if HAS_W:  # v = w ⊙ x: w scales k's columns ([BK, BT], the narrower tile)
            b_kt = b_kt * tl.load(w + o_t * w_st, mask=m_t, other=0.0).to(tl.float32)[None, :]
        if DIAG:  # log-decays along K: [BK, BT], cumulated along time (axis 1)
            b_gt = tl.load(g + o_t[None, :] * g_st + o_k[:, None] * g_sf,
                           mask=m_t[None, :] & (o_k[:, None] < K), other=0.0).to(tl.float32)
            c, n, c_l, n_l = _decays_t(b_gt, BT)
            to_end = tl.where(n == n_l[:, None], tl.exp(c_l[:, None] - c), 0.0)
            S = S * tl.where(n_l == 0, tl.exp(c_l), 0.0)[:, None] + tl.dot(
                b_kt * to_end, b_v, input_precision=PREC)
        elif HAS_G:
            b_g = tl.load(g + o_t * g_st, mask=m_t, other=0.0).to(tl.float32)
            c, n, c_l, n_l = _decays(b_g, o_t, T, BT)
            to_end = tl.where(n == n_l, tl.exp(c_l - c), 0.0)
            S = S * tl.where(n_l == 0, tl.exp(c_l), 0.0) + tl.dot(
                b_kt * to_end[None, :], b_v, input_precision=PREC)
        else:
            S = S + tl.dot(b_kt, b_v, input_precision=PREC)


@triton.jit
def bwd_dh(q, q_s0, q_s1, q_r0, q_r1, q_st, q_sf, do, do_s0, do_s1, do_r0, do_r1, do_st, do_sf, g,
           g_s0, g_s1, g_r0, g_r1, g_st, g_sf, do_scale, dht, dhc, dh0, T, K, V, NC, N1,
           HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
           BV: tl.constexpr, PREC: tl.constexpr, DIAG: tl.constexpr = False):
    """dL/dS at the end of each chunk (dhc[i_g, i_c]), chunks in reverse, one [BK, BV] tile
    per program; dh0: the initial state's."""
    i_g, i_k, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q = _rows(q, i_g, N1, q_s0, q_s1, q_r0, q_r1)  # this grid index's rows
    do = _rows(do, i_g, N1, do_s0, do_s1, do_r0, do_r1)
    g = _rows(g, i_g, N1, g_s0, g_s1, g_r0, g_r1)
    dht, dhc, dh0 = dht + i_g * K * V, dhc + i_g * NC * K * V, dh0 + i_g * K * V
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    p_kv = o_k[:, None] * V + o_v[None, :]
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dh += tl.load(dht + p_kv, mask=m_kv, other=0.0)
    for j in range(0, NC):
        i_c = NC - 1 - j
        tl.store(dhc + i_c * K * V + p_kv, dh.to(dhc.dtype.element_ty), mask=m_kv)
        o_t = i_c * BT + tl.arange(0, BT)
        m_t = o_t < T
        b_qt = tl.load(q + o_t[None, :] * q_st + o_k[:, None] * q_sf,
                       mask=m_t[None, :] & (o_k[:, None] < K), other=0.0).to(tl.float32)
        b_do = tl.load(do + o_t[:, None] * do_st + o_v[None, :] * do_sf,
                       mask=m_t[:, None] & (o_v[None, :] < V), other=0.0).to(tl.float32)
        b_do = b_do * do_scale
        if DIAG:
            b_gt = tl.load(g + o_t[None, :] * g_st + o_k[:, None] * g_sf,
                           mask=m_t[None, :] & (o_k[:, None] < K), other=0.0).to(tl.float32)
            c, n, c_l, n_l = _decays_t(b_gt, BT)
            dh = dh * tl.where(n_l == 0, tl.exp(c_l), 0.0)[:, None] + tl.dot(
                b_qt * tl.where(n == 0, tl.exp(c), 0.0), b_do, input_precision=PREC)
        elif HAS_G:
            b_g = tl.load(g + o_t * g_st, mask=m_t, other=0.0).to(tl.float32)
            c, n, c_l, n_l = _decays(b_g, o_t, T, BT)
            dh = dh * tl.where(n_l == 0, tl.exp(c_l), 0.0) + tl.dot(
                b_qt * tl.where(n == 0, tl.exp(c), 0.0)[None, :], b_do, input_precision=PREC)
        else:
            dh += tl.dot(b_qt, b_do, input_precision=PREC)
    tl.store(dh0 + p_kv, dh, mask=m_kv)


@triton.jit
def _chunk(g, g_st, o_t, m_t, T, HAS_G: tl.constexpr, BT: tl.constexpr):
    """(e_q, e_k, e_l, seg) of a chunk: e^{c_t}, e^{c_L - c_t}, e^{c_L}, and D_ts = e^{c_t - c_s}
    for t >= s (0 across a reset)."""
    causal = o_t[:, None] >= o_t[None, :]
    if HAS_G:
        b_g = tl.load(g + o_t * g_st, mask=m_t, other=0.0).to(tl.float32)
        c, n, c_l, n_l = _decays(b_g, o_t, T, BT)
        e_q = tl.where(n == 0, tl.exp(c), 0.0)
        e_k = tl.where(n == n_l, tl.exp(c_l - c), 0.0)
        e_l = tl.where(n_l == 0, tl.exp(c_l), 0.0)
        seg = tl.exp(tl.where(causal & (n[:, None] == n[None, :]),
                              c[:, None] - c[None, :], float("-inf")))
    else:
        e_q = tl.full([BT], 1.0, tl.float32)
        e_k = tl.full([BT], 1.0, tl.float32)
        e_l = 1.0
        seg = tl.where(causal, 1.0, 0.0)
    return e_q, e_k, e_l, seg


@triton.jit
def _scaled_v(b_x, b_dv, w, w_st, dw, dw_st, dw_sf, i_v, o_t, m_t):
    """v = w ⊙ x (HAS_W): this V-block's share of dL/dw = sum_V(dL/dv ⊙ x) stored (dw_sf:
    the stride between V-blocks' shares), and (v, dL/dx = w ⊙ dL/dv)."""
    b_w = tl.load(w + o_t * w_st, mask=m_t, other=0.0).to(tl.float32)
    tl.store(dw + i_v * dw_sf + o_t * dw_st, tl.sum(b_dv * b_x, 1).to(dw.dtype.element_ty),
             mask=m_t)
    return b_x * b_w[:, None], b_dv * b_w[:, None]


@triton.jit
def bwd_dv(q, q_s0, q_s1, q_r0, q_r1, q_st, q_sf, k, k_s0, k_s1, k_r0, k_r1, k_st, k_sf, v, v_s0,
           v_s1, v_r0, v_r1, v_st, v_sf, g, g_s0, g_s1, g_r0, g_r1, g_st, g_sf, do, do_s0, do_s1,
           do_r0, do_r1, do_st, do_sf, do_scale, hc, dhc, dv, dv_s0, dv_s1, dv_st, dv_sf, o, o_s0,
           o_s1, o_st, o_sf, w, w_s0, w_s1, w_r0, w_r1, w_st, w_sf, dw, dw_s0, dw_s1, dw_st, dw_sf,
           T, K, V, NC, N1, HAS_W: tl.constexpr, HAS_G: tl.constexpr, WANT_O: tl.constexpr,
           BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dv = (A ⊙ D)ᵀ dO + (k ⊙ e^{c_L - c}) dh of one chunk and V-block (A = q kᵀ over K
    blocks); with WANT_O also the contraction O = (A ⊙ D) v + e^{c} ⊙ (q S)."""
    i_g, i_c, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q = _rows(q, i_g, N1, q_s0, q_s1, q_r0, q_r1)  # this grid index's rows
    k = _rows(k, i_g, N1, k_s0, k_s1, k_r0, k_r1)
    v = _rows(v, i_g, N1, v_s0, v_s1, v_r0, v_r1)
    g = _rows(g, i_g, N1, g_s0, g_s1, g_r0, g_r1)
    do = _rows(do, i_g, N1, do_s0, do_s1, do_r0, do_r1)
    dv = _rows(dv, i_g, N1, dv_s0, dv_s1, 1, 1)
    o = _rows(o, i_g, N1, o_s0, o_s1, 1, 1)
    w = _rows(w, i_g, N1, w_s0, w_s1, w_r0, w_r1)
    dw = _rows(dw, i_g, N1, dw_s0, dw_s1, 1, 1)
    hc, dhc = hc + i_g * NC * K * V, dhc + i_g * NC * K * V
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        p_kv = i_c * K * V + o_k[:, None] * V + o_v[None, :]
        b_q = tl.load(q + o_t[:, None] * q_st + o_k[None, :] * q_sf, mask=m_tk,
                      other=0.0).to(tl.float32)
        b_kt = tl.load(k + o_t[None, :] * k_st + o_k[:, None] * k_sf,
                       mask=m_t[None, :] & (o_k[:, None] < K), other=0.0).to(tl.float32)
        b_dh = tl.load(dhc + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        a += tl.dot(b_q, b_kt, input_precision=PREC)
        b_dv += tl.dot(tl.trans(b_kt), b_dh, input_precision=PREC)
        if WANT_O:
            b_s = tl.load(hc + p_kv, mask=m_kv, other=0.0).to(tl.float32)
            b_o += tl.dot(b_q, b_s, input_precision=PREC)
    # the decays after the K loop: they scale rows, so nothing in the loop needs them live
    e_q, e_k, e_l, seg = _chunk(g, g_st, o_t, m_t, T, HAS_G, BT)
    # the causal mask selects (tl.where), not multiplies: a non-finite product at t stays out
    # of s > t, as in the recurrence (D_ts is 0 there, and NaN * 0 is NaN)
    a = tl.where(o_t[:, None] >= o_t[None, :], a * seg, 0.0)
    b_do = tl.load(do + o_t[:, None] * do_st + o_v[None, :] * do_sf, mask=m_tv,
                   other=0.0).to(tl.float32) * do_scale
    b_dv = b_dv * e_k[:, None] + tl.dot(tl.trans(a), b_do, input_precision=PREC)
    if HAS_W or WANT_O:
        b_v = tl.load(v + o_t[:, None] * v_st + o_v[None, :] * v_sf, mask=m_tv,
                      other=0.0).to(tl.float32)
    if HAS_W:
        b_v, b_dv = _scaled_v(b_v, b_dv, w, w_st, dw, dw_st, dw_sf, i_v, o_t, m_t)
    tl.store(dv + o_t[:, None] * dv_st + o_v[None, :] * dv_sf,
             b_dv.to(dv.dtype.element_ty), mask=m_tv)
    if WANT_O:
        b_o = b_o * e_q[:, None] + tl.dot(a, b_v, input_precision=PREC)
        tl.store(o + o_t[:, None] * o_st + o_v[None, :] * o_sf, b_o.to(o.dtype.element_ty),
                 mask=m_tv)


@triton.jit
def bwd_dqk(q, q_s0, q_s1, q_r0, q_r1, q_st, q_sf, k, k_s0, k_s1, k_r0, k_r1, k_st, k_sf, v, v_s0,
            v_s1, v_r0, v_r1, v_st, v_sf, g, g_s0, g_s1, g_r0, g_r1, g_st, g_sf, w, w_s0, w_s1,
            w_r0, w_r1, w_st, w_sf, do, do_s0, do_s1, do_r0, do_r1, do_st, do_sf, do_scale, hc,
            dhc, dq, dq_s0, dq_s1, dq_st, dq_sf, dk, dk_s0, dk_s1, dk_st, dk_sf, dg, dg_s0, dg_s1,
            dg_st, dg_sf, T, K, V, NC, N1, HAS_G: tl.constexpr, HAS_W: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq = (dA ⊙ D) k + e^{c} ⊙ (dO Sᵀ), dk = (dA ⊙ D)ᵀ q + e^{c_L - c} ⊙ (v dhᵀ) of one chunk
    and K-block (dA = dO vᵀ over V blocks), and this K-block's share of dg (dg[i_g, i_k, t]:
    summed over the K-blocks by the caller: the reverse cumulative sum is linear)."""
    i_g, i_c, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q = _rows(q, i_g, N1, q_s0, q_s1, q_r0, q_r1)  # this grid index's rows
    k = _rows(k, i_g, N1, k_s0, k_s1, k_r0, k_r1)
    v = _rows(v, i_g, N1, v_s0, v_s1, v_r0, v_r1)
    g = _rows(g, i_g, N1, g_s0, g_s1, g_r0, g_r1)
    do = _rows(do, i_g, N1, do_s0, do_s1, do_r0, do_r1)
    dq = _rows(dq, i_g, N1, dq_s0, dq_s1, 1, 1)
    dk = _rows(dk, i_g, N1, dk_s0, dk_s1, 1, 1)
    dg = _rows(dg, i_g, N1, dg_s0, dg_s1, 1, 1)
    w = _rows(w, i_g, N1, w_s0, w_s1, w_r0, w_r1)
    hc, dhc = hc + i_g * NC * K * V, dhc + i_g * NC * K * V
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k[None, :] < K)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkh = tl.zeros([BT, BK], dtype=tl.float32)
    x_sdh = 0.0
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        # the state tiles read transposed: [BV, BK]
        m_vk = (o_v[:, None] < V) & (o_k[None, :] < K)
        p_vk = i_c * K * V + o_k[None, :] * V + o_v[:, None]
        b_vt = tl.load(v + o_t[None, :] * v_st + o_v[:, None] * v_sf,
                       mask=m_t[None, :] & (o_v[:, None] < V), other=0.0).to(tl.float32)
        b_do = tl.load(do + o_t[:, None] * do_st + o_v[None, :] * do_sf, mask=m_tv,
                       other=0.0).to(tl.float32) * do_scale
        b_st = tl.load(hc + p_vk, mask=m_vk, other=0.0).to(tl.float32)
        b_dht = tl.load(dhc + p_vk, mask=m_vk, other=0.0).to(tl.float32)
        da += tl.dot(b_do, b_vt, input_precision=PREC)
        b_dq += tl.dot(b_do, b_st, input_precision=PREC)
        b_dkh += tl.dot(tl.trans(b_vt), b_dht, input_precision=PREC)
        if HAS_G:
            x_sdh += tl.sum(tl.sum(b_st * b_dht, 1), 0)
    if HAS_W:  # v = w ⊙ x scales dA's columns and (v dhᵀ)'s rows: once, after the V loop
        b_w = tl.load(w + o_t * w_st, mask=m_t, other=0.0).to(tl.float32)
        da = da * b_w[None, :]
        b_dkh = b_dkh * b_w[:, None]
    e_q, e_k, e_l, seg = _chunk(g, g_st, o_t, m_t, T, HAS_G, BT)  # after the V loop
    da = tl.where(o_t[:, None] >= o_t[None, :], da * seg, 0.0)  # selected (bwd_dv)
    b_q = tl.load(q + o_t[:, None] * q_st + o_k[None, :] * q_sf, mask=m_tk,
                  other=0.0).to(tl.float32)
    b_k = tl.load(k + o_t[:, None] * k_st + o_k[None, :] * k_sf, mask=m_tk,
                  other=0.0).to(tl.float32)
    b_dq = b_dq * e_q[:, None] + tl.dot(da, b_k, input_precision=PREC)
    b_dkh = b_dkh * e_k[:, None]
    b_dk = b_dkh + tl.dot(tl.trans(da), b_q, input_precision=PREC)
    tl.store(dq + o_t[:, None] * dq_st + o_k[None, :] * dq_sf, b_dq.to(dq.dtype.element_ty),
             mask=m_tk)
    tl.store(dk + o_t[:, None] * dk_st + o_k[None, :] * dk_sf, b_dk.to(dk.dtype.element_ty),
             mask=m_tk)
    if HAS_G:
        d = tl.sum(b_q * b_dq, 1) - tl.sum(b_k * b_dk, 1)
        x = e_l * x_sdh + tl.sum(tl.sum(b_k * b_dkh, 1), 0)
        rev = tl.sum(tl.where(o_t[None, :] >= o_t[:, None], d[None, :], 0.0), 1)
        b_g = tl.load(g + o_t * g_st, mask=m_t, other=0.0).to(tl.float32)
        # dg_sf: the stride between the K-blocks' shares (0 with one K-block: written in place)
        tl.store(dg + i_k * dg_sf + o_t * dg_st,
                 tl.where(b_g <= RESET, 0.0, rev + x).to(dg.dtype.element_ty), mask=m_t)


# ---- key-diagonal decays (gla): the decay varies along K, so the intra-chunk terms are
# [BT, BT, BK] broadcast products (as the forward's), chunks of 16 steps ----

@triton.jit
def _causal3(x, o_t):
    """x [BT, BT, BK] with t < s selected out (not multiplied: bwd_dv's comment)."""
    return tl.where((o_t[:, None] >= o_t[None, :])[:, :, None], x, 0.0)


@triton.jit
def _seg3(c, n, o_t):
    """D_tsk = e^{c_tk - c_sk} for t >= s in the same reset segment of column k: [BT, BT, BK]."""
    keep = (o_t[:, None] >= o_t[None, :])[:, :, None] & (n[:, None, :] == n[None, :, :])
    return tl.exp(tl.where(keep, c[:, None, :] - c[None, :, :], float("-inf")))


@triton.jit
def bwd_dv_diag(q, q_s0, q_s1, q_r0, q_r1, q_st, q_sf, k, k_s0, k_s1, k_r0, k_r1, k_st, k_sf, v,
                v_s0, v_s1, v_r0, v_r1, v_st, v_sf, g, g_s0, g_s1, g_r0, g_r1, g_st, g_sf, do,
                do_s0, do_s1, do_r0, do_r1, do_st, do_sf, do_scale, hc, dhc, dv, dv_s0, dv_s1,
                dv_st, dv_sf, o, o_s0, o_s1, o_st, o_sf, w, w_s0, w_s1, w_r0, w_r1, w_st, w_sf, dw,
                dw_s0, dw_s1, dw_st, dw_sf, T, K, V, NC, N1, HAS_W: tl.constexpr,
                WANT_O: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PREC: tl.constexpr):
    """``bwd_dv`` for key-diagonal decays: A_ts = sum_k q_tk k_sk D_tsk, dv = Aᵀ dO +
    (k ⊙ e^{c_L - c}) dh, O = A v + (q ⊙ e^{c}) S."""
    i_g, i_c, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q = _rows(q, i_g, N1, q_s0, q_s1, q_r0, q_r1)  # this grid index's rows
    k = _rows(k, i_g, N1, k_s0, k_s1, k_r0, k_r1)
    v = _rows(v, i_g, N1, v_s0, v_s1, v_r0, v_r1)
    g = _rows(g, i_g, N1, g_s0, g_s1, g_r0, g_r1)
    do = _rows(do, i_g, N1, do_s0, do_s1, do_r0, do_r1)
    dv = _rows(dv, i_g, N1, dv_s0, dv_s1, 1, 1)
    o = _rows(o, i_g, N1, o_s0, o_s1, 1, 1)
    w = _rows(w, i_g, N1, w_s0, w_s1, w_r0, w_r1)
    dw = _rows(dw, i_g, N1, dw_s0, dw_s1, 1, 1)
    hc, dhc = hc + i_g * NC * K * V, dhc + i_g * NC * K * V
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    a = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        p_kv = i_c * K * V + o_k[:, None] * V + o_v[None, :]
        b_q = tl.load(q + o_t[:, None] * q_st + o_k[None, :] * q_sf, mask=m_tk,
                      other=0.0).to(tl.float32)
        b_k = tl.load(k + o_t[:, None] * k_st + o_k[None, :] * k_sf, mask=m_tk,
                      other=0.0).to(tl.float32)
        c, n, c_l, n_l = _decays_k(tl.load(g + o_t[:, None] * g_st + o_k[None, :] * g_sf,
                                           mask=m_tk, other=0.0).to(tl.float32), BT)
        a += tl.sum(_causal3(b_q[:, None, :] * b_k[None, :, :] * _seg3(c, n, o_t), o_t), 2)
        e_k = tl.where(n == n_l[None, :], tl.exp(c_l[None, :] - c), 0.0)
        b_dh = tl.load(dhc + p_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_dv += tl.dot(b_k * e_k, b_dh, input_precision=PREC)
        if WANT_O:
            b_s = tl.load(hc + p_kv, mask=m_kv, other=0.0).to(tl.float32)
            b_o += tl.dot(b_q * tl.where(n == 0, tl.exp(c), 0.0), b_s, input_precision=PREC)
    b_do = tl.load(do + o_t[:, None] * do_st + o_v[None, :] * do_sf, mask=m_tv,
                   other=0.0).to(tl.float32) * do_scale
    b_dv += tl.dot(tl.trans(a), b_do, input_precision=PREC)
    if HAS_W or WANT_O:
        b_v = tl.load(v + o_t[:, None] * v_st + o_v[None, :] * v_sf, mask=m_tv,
                      other=0.0).to(tl.float32)
    if HAS_W:
        b_v, b_dv = _scaled_v(b_v, b_dv, w, w_st, dw, dw_st, dw_sf, i_v, o_t, m_t)
    tl.store(dv + o_t[:, None] * dv_st + o_v[None, :] * dv_sf, b_dv.to(dv.dtype.element_ty),
             mask=m_tv)
    if WANT_O:
        b_o = b_o + tl.dot(a, b_v, input_precision=PREC)
        tl.store(o + o_t[:, None] * o_st + o_v[None, :] * o_sf, b_o.to(o.dtype.element_ty),
                 mask=m_tv)


@triton.jit
def bwd_dqk_diag(q, q_s0, q_s1, q_r0, q_r1, q_st, q_sf, k, k_s0, k_s1, k_r0, k_r1, k_st, k_sf, v,
                 v_s0, v_s1, v_r0, v_r1, v_st, v_sf, g, g_s0, g_s1, g_r0, g_r1, g_st, g_sf, w,
                 w_s0, w_s1, w_r0, w_r1, w_st, w_sf, do, do_s0, do_s1, do_r0, do_r1, do_st, do_sf,
                 do_scale, hc, dhc, dq, dq_s0, dq_s1, dq_st, dq_sf, dk, dk_s0, dk_s1, dk_st, dk_sf,
                 dg, dg_s0, dg_s1, dg_st, dg_sf, T, K, V, NC, N1, HAS_W: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """``bwd_dqk`` for key-diagonal decays, dg per K column ([G, T, K]):
    dq_tk = sum_s dA_ts k_sk D_tsk + e^{c_tk} (dO Sᵀ)_tk, dk_sk = sum_t dA_ts q_tk D_tsk +
    e^{c_Lk - c_sk} (v dhᵀ)_sk, dg = the reverse cumulative sum over the chunk of
    q ⊙ dq - k ⊙ dk, plus e^{c_L} ⊙ sum_V(S ⊙ dh) + sum_s k_s ⊙ e^{c_L - c_s} ⊙ (v dhᵀ)_s."""
    i_g, i_c, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    q = _rows(q, i_g, N1, q_s0, q_s1, q_r0, q_r1)  # this grid index's rows
    k = _rows(k, i_g, N1, k_s0, k_s1, k_r0, k_r1)
    v = _rows(v, i_g, N1, v_s0, v_s1, v_r0, v_r1)
    g = _rows(g, i_g, N1, g_s0, g_s1, g_r0, g_r1)
    do = _rows(do, i_g, N1, do_s0, do_s1, do_r0, do_r1)
    dq = _rows(dq, i_g, N1, dq_s0, dq_s1, 1, 1)
    dk = _rows(dk, i_g, N1, dk_s0, dk_s1, 1, 1)
    dg = _rows(dg, i_g, N1, dg_s0, dg_s1, 1, 1)
    w = _rows(w, i_g, N1, w_s0, w_s1, w_r0, w_r1)
    hc, dhc = hc + i_g * NC * K * V, dhc + i_g * NC * K * V
    o_t = i_c * BT + tl.arange(0, BT)
    m_t = o_t < T
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k[None, :] < K)
    da = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkh = tl.zeros([BT, BK], dtype=tl.float32)
    x_sdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        m_vk = (o_v[:, None] < V) & (o_k[None, :] < K)
        p_vk = i_c * K * V + o_k[None, :] * V + o_v[:, None]
        b_vt = tl.load(v + o_t[None, :] * v_st + o_v[:, None] * v_sf,
                       mask=m_t[None, :] & (o_v[:, None] < V), other=0.0).to(tl.float32)
        b_do = tl.load(do + o_t[:, None] * do_st + o_v[None, :] * do_sf, mask=m_tv,
                       other=0.0).to(tl.float32) * do_scale
        b_st = tl.load(hc + p_vk, mask=m_vk, other=0.0).to(tl.float32)
        b_dht = tl.load(dhc + p_vk, mask=m_vk, other=0.0).to(tl.float32)
        da += tl.dot(b_do, b_vt, input_precision=PREC)
        b_dq += tl.dot(b_do, b_st, input_precision=PREC)
        b_dkh += tl.dot(tl.trans(b_vt), b_dht, input_precision=PREC)
        x_sdh += tl.sum(b_st * b_dht, 0)
    if HAS_W:  # v = w ⊙ x scales dA's columns and (v dhᵀ)'s rows: once, after the V loop
        b_w = tl.load(w + o_t * w_st, mask=m_t, other=0.0).to(tl.float32)
        da = da * b_w[None, :]
        b_dkh = b_dkh * b_w[:, None]
    b_g = tl.load(g + o_t[:, None] * g_st + o_k[None, :] * g_sf, mask=m_tk,
                  other=0.0).to(tl.float32)
    c, n, c_l, n_l = _decays_k(b_g, BT)
    seg = _seg3(c, n, o_t)
    b_q = tl.load(q + o_t[:, None] * q_st + o_k[None, :] * q_sf, mask=m_tk,
                  other=0.0).to(tl.float32)
    b_k = tl.load(k + o_t[:, None] * k_st + o_k[None, :] * k_sf, mask=m_tk,
                  other=0.0).to(tl.float32)
    b_dq = b_dq * tl.where(n == 0, tl.exp(c), 0.0) + tl.sum(
        _causal3(da[:, :, None] * b_k[None, :, :] * seg, o_t), 1)
    b_dkh = b_dkh * tl.where(n == n_l[None, :], tl.exp(c_l[None, :] - c), 0.0)
    b_dk = b_dkh + tl.sum(_causal3(da[:, :, None] * b_q[:, None, :] * seg, o_t), 0)
    tl.store(dq + o_t[:, None] * dq_st + o_k[None, :] * dq_sf, b_dq.to(dq.dtype.element_ty),
             mask=m_tk)
    tl.store(dk + o_t[:, None] * dk_st + o_k[None, :] * dk_sf, b_dk.to(dk.dtype.element_ty),
             mask=m_tk)
    d = b_q * b_dq - b_k * b_dk
    x = tl.where(n_l == 0, tl.exp(c_l), 0.0) * x_sdh + tl.sum(b_k * b_dkh, 0)
    rev = tl.sum(tl.where((o_t[None, :] >= o_t[:, None])[:, :, None], d[None, :, :], 0.0), 1)
    tl.store(dg + o_t[:, None] * dg_st + o_k[None, :] * dg_sf,
             tl.where(b_g <= RESET, 0.0, rev + x[None, :]).to(dg.dtype.element_ty), mask=m_tk)


# ---- householder decays (chunked_backward_householder.py): the two sequential passes ----
#
# Per chunk, with the WY/UT terms the glue computes batched over (grid, chunks) -- W = T⁻¹
# (K ⊙ e^{c_{t-1}}) and Y = T⁻¹ N w ([BT, K], [BT, V]), kd = K ⊙ P e^{c_L - c}, ud = U ⊙
# e^{c_L - c}, qe = Q ⊙ e^{c} ([BT, K]), A_qk ([BT, BT]) and e_L = e^{c_L} -- the state
# leaving a chunk is S' = e_L S - kdᵀ (W S + Y) + udᵀ w, and dL/dS entering it is
# dS = e_L dh - Wᵀ (kd dh + A_qkᵀ dO) + qeᵀ dO. Each program holds the whole K axis of one
# [K, BV] tile (W S contracts over K), sequential over chunks; the per-chunk tensors are
# contiguous [G, NC * BT, K | V] (padded steps are zero), A_qk [G, NC, BT, BT], e_L [G, NC].


@triton.jit
def hh_fwd_h(wy, kd, ud, y, v, el, h0, hc, K, V, NC, HAS_H0: tl.constexpr, BT: tl.constexpr,
             BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The state entering each chunk (hc[i_g, i_c], [K, V]) of a householder decay; a chunk's
    rows in sub-blocks of BS (every row reads the same entering state: the sub-blocks' terms
    sum, and the [BS, K] tiles are what fits registers at K = 128)."""
    i_g, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    TP = NC * BT
    wy, kd, ud = wy + i_g * TP * K, kd + i_g * TP * K, ud + i_g * TP * K
    y, v, el = y + i_g * TP * V, v + i_g * TP * V, el + i_g * NC
    h0, hc = h0 + i_g * K * V, hc + i_g * NC * K * V
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_b = tl.arange(0, BS)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + p_kv, mask=m_kv, other=0.0)
    for i_c in range(0, NC):
        tl.store(hc + i_c * K * V + p_kv, S.to(hc.dtype.element_ty), mask=m_kv)
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for i_s in tl.static_range(0, BT // BS):
            o_t = i_c * BT + i_s * BS + o_b
            b_w = tl.load(wy + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_y = tl.load(y + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
            b_r = tl.dot(b_w, S, input_precision=PREC) + b_y          # R = W S + Y [BS, BV]
            b_kdt = tl.load(kd + o_t[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
            acc -= tl.dot(b_kdt, b_r, input_precision=PREC)
            b_udt = tl.load(ud + o_t[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
            b_v = tl.load(v + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
            acc += tl.dot(b_udt, b_v, input_precision=PREC)
        S = S * tl.load(el + i_c) + acc


@triton.jit
def hh_bwd_dh(wy, kd, qe, aqk, do, el, dht, dhc, dh0, K, V, NC, HAS_DHT: tl.constexpr,
              BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              PREC: tl.constexpr):
    """dL/dS leaving each chunk (dhc[i_g, i_c]) of a householder decay, chunks in reverse,
    rows in sub-blocks of BS as ``hh_fwd_h``; dh0: the initial state's."""
    i_g, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)
    TP = NC * BT
    wy, kd, qe = wy + i_g * TP * K, kd + i_g * TP * K, qe + i_g * TP * K
    do, aqk, el = do + i_g * TP * V, aqk + i_g * NC * BT * BT, el + i_g * NC
    dht, dhc, dh0 = dht + i_g * K * V, dhc + i_g * NC * K * V, dh0 + i_g * K * V
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_b = tl.arange(0, BS)
    o_c = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dh += tl.load(dht + p_kv, mask=m_kv, other=0.0)
    for j in range(0, NC):
        i_c = NC - 1 - j
        tl.store(dhc + i_c * K * V + p_kv, dh.to(dhc.dtype.element_ty), mask=m_kv)
        b_do = tl.load(do + (i_c * BT + o_c)[:, None] * V + o_v[None, :], mask=m_v[None, :],
                       other=0.0)                                        # [BT, BV]
        acc = tl.zeros([BK, BV], dtype=tl.float32)
        for i_s in tl.static_range(0, BT // BS):
            r = i_s * BS + o_b
            o_t = i_c * BT + r
            b_kd = tl.load(kd + o_t[:, None] * K + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_at = tl.load(aqk + i_c * BT * BT + o_c[None, :] * BT + r[:, None])  # A_qkᵀ rows
            b_r = tl.dot(b_kd, dh, input_precision=PREC) + \
                tl.dot(b_at, b_do, input_precision=PREC)                 # [BS, BV]
            b_wt = tl.load(wy + o_t[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
            acc -= tl.dot(b_wt, b_r, input_precision=PREC)
            b_qet = tl.load(qe + o_t[None, :] * K + o_k[:, None], mask=m_k[:, None], other=0.0)
            b_dos = tl.load(do + o_t[:, None] * V + o_v[None, :], mask=m_v[None, :], other=0.0)
            acc += tl.dot(b_qet, b_dos, input_precision=PREC)
        dh = dh * tl.load(el + i_c) + acc
    tl.store(dh0 + p_kv, dh, mask=m_kv)
