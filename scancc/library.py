"""The standard library: each recurrence of docs/library.md, defined once in the IR.

Argument names and layouts follow flash-linear-attention (``[B, T, H, K]``, gates in log
space, state ``[B, H, K, V]``, ``o_t = scale * S_t^T q_t``) and mamba_ssm (S6 ``[B, D, L]``,
SSD ``[B, L, H, P]``), so a kernel is a drop-in for code written against them.
"""
from __future__ import annotations

import math

from scancc.ir import (companion, const, diagonal, dot, exp, flip, group, householder,
                       identity, iota, l2norm, rsqrt, scalar, shift, silu, size, softmax,
                       softplus, clamp)
from scancc.ir import cos, dense, expm1, joint_softmax, prev, sigmoid, sin, step, tanh
from scancc.ir.recurrence import selection

from .registry import register


def _scale(scale, dim):
    """The q scale: a given number, or dim^-1/2 by default (fla's convention)."""
    return rsqrt(size(dim)) if scale is None else const(float(scale))


def _attn_dims(r):
    return (r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head"),
            r.dim("key"), r.dim("value"))


def _qkv(r, b, t, h, k, v):
    return (r.input("q", [b, t, h, k]), r.input("k", [b, t, h, k]), r.input("v", [b, t, h, v]))


@register("linear_attn", origin="library")
def linear_attn(r, scale=None):
    """Linear attention without a normalizer: S = S + k v^T, o = scale * S^T q."""
    b, t, h, k, v = _attn_dims(r)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    S = r.state("S", [b, h, k, v], identity(), inject=kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


@register("retnet", origin="library")
def retnet(r, scale=None):
    """Retention: S = gamma_h S + k v^T with gamma_h = 1 - 2^(-5-h)."""
    b, t, h, k, v = _attn_dims(r)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    gamma = r.let("gamma", 1.0 - exp((-5.0 - iota(h)) * math.log(2.0)))
    S = r.state("S", [b, h, k, v], scalar(gamma), inject=kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


@register("simple_gla", origin="library", hints={"g": "logsigmoid"})
def simple_gla(r, scale=None):
    """Scalar-gated linear attention: S = exp(g_t) S + k v^T, g [B, T, H] in log space."""
    b, t, h, k, v = _attn_dims(r)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    g = r.input("g", [b, t, h])
    S = r.state("S", [b, h, k, v], scalar(exp(g)), inject=kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


@register("gla", origin="library", hints={"g": "logsigmoid"})
def gla(r, scale=None):
    """Gated linear attention: S = Diag(exp(g_t)) S + k v^T, g [B, T, H, K] in log space."""
    b, t, h, k, v = _attn_dims(r)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    g = r.input("g", [b, t, h, k])
    S = r.state("S", [b, h, k, v], diagonal(exp(g)), inject=kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


@register("hgrn", origin="library", hints={"g": "logsigmoid"})
def hgrn(r):
    """HGRN: h = exp(g_t) * h + x_t, o = h; x, g [B, T, D] (g in log space)."""
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x, g = r.input("x", [b, t, d]), r.input("g", [b, t, d])
    hh = r.state("h", [b, d], diagonal(exp(g)), inject=x)
    r.output("o", [b, t, d], hh)


def _delta(r, gated: bool, scale, use_qk_l2norm_in_kernel: bool, grouped_value_heads=False):
    b, t, h, k, v = _attn_dims(r)
    q, kk, vv, hq = _gva_qkv(r, b, t, h, k, v, grouped_value_heads)
    if gated:
        g = r.input("g", [b, t, h])
    beta = r.input("beta", [b, t, h])
    if use_qk_l2norm_in_kernel:
        q, kk = r.let("qn", l2norm(q, k)), r.let("kn", l2norm(kk, k))
    if grouped_value_heads:
        q, kk = group(q, hq, h), group(kk, hq, h)   # value head i reads q/k head i // G
    tr = householder(k, kk, beta, exp(g) if gated else None)
    S = r.state("S", [b, h, k, v], tr, inject=beta * kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


def _gva_qkv(r, b, t, h, k, v, grouped_value_heads):
    """q, k, v and the q/k heads dim. fla's grouped value attention (GVA, ``HV = G * H``):
    q, k keep H heads (dim ``qk_heads``) while v, the gates, beta, the state and o have HV
    (dim ``heads``); without it both are ``heads``."""
    hq = r.dim("qk_heads", "group") if grouped_value_heads else h
    return r.input("q", [b, t, hq, k]), r.input("k", [b, t, hq, k]), \
        r.input("v", [b, t, h, v]), hq


@register("delta_net", origin="library",
          hints={"q": "unit_rows", "k": "unit_rows", "beta": "unit_interval"})
def delta_net(r, scale=None, use_qk_l2norm_in_kernel=False):
    """Delta rule: S = (I - beta k k^T) S + beta k v^T (q, k expected L2-normalized)."""
    _delta(r, False, scale, use_qk_l2norm_in_kernel)


@register("gated_delta_net", origin="library",
          hints={"q": "unit_rows", "k": "unit_rows", "beta": "unit_interval", "g": "logsigmoid"})
def gated_delta_net(r, scale=None, use_qk_l2norm_in_kernel=False, grouped_value_heads=False):
    # grouped_value_heads (fla's GVA, HV = G * H value heads, as chunk_gated_delta_rule): q, k
    # [B, T, H, K] (dim qk_heads); v [B, T, HV, V], g, beta [B, T, HV], the state [B, HV, K, V]
    # and o [B, T, HV, V] (dim heads); value head i reads q/k head i // G. (A comment, not the
    # docstring: the docstring heads every generated kernel, goldens included.)
    """Gated delta rule: S = exp(g) (I - beta k k^T) S + beta k v^T, g [B, T, H] log space."""
    _delta(r, True, scale, use_qk_l2norm_in_kernel, grouped_value_heads)


@register("mamba", optional_inputs=("D", "z", "delta_bias"), origin="library",
          hints={"delta": "positive", "A": "negative", "delta_bias": "positive"})
def mamba(r, delta_softplus=False, D=False, z=False, delta_bias=False):
    """Mamba S6 (mamba_ssm's selective_scan_ref): x = exp(dt A) x + dt B u; y = C x + D u,
    optionally gated by silu(z). B, C are [B, N, L] or grouped [B, G, N, L]."""
    b, d, t = r.dim("batch", "batch"), r.dim("chan"), r.dim("time", "time")
    g, n = r.dim("groups", "group"), r.dim("dstate")
    u, delta = r.input("u", [b, d, t]), r.input("delta", [b, d, t])
    A = r.input("A", [d, n])
    B = r.input("B", [b, g, n, t], optional_dims=[g])
    C = r.input("C", [b, g, n, t], optional_dims=[g])
    Dv = r.input("D", [d]) if D else None
    zv = r.input("z", [b, d, t]) if z else None
    dt = delta + r.input("delta_bias", [d]) if delta_bias else delta
    dt = r.let("dt", softplus(dt) if delta_softplus else dt)
    x = r.state("x", [b, d, n], diagonal(exp(dt * A)), inject=dt * group(B, g, d) * u)
    y = dot(x, group(C, g, d), n)
    if Dv is not None:
        y = y + Dv * u
    if zv is not None:
        y = y * silu(zv)
    r.output("y", [b, d, t], y)


@register("mamba2", optional_inputs=("D", "z", "dt_bias"), origin="library",
          hints={"dt": "positive", "A": "negative", "dt_bias": "positive"})
def mamba2(r, dt_softplus=False, dt_limit=(0.0, math.inf), D=False, z=False, dt_bias=False):
    """Mamba2 SSD (mamba_ssm's chunk-scan reference): h = exp(dt A_h) h + dt x B^T;
    y = h C + D x, optionally gated by silu(z)."""
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    p, g, n = r.dim("headdim"), r.dim("groups", "group"), r.dim("dstate")
    x, dt = r.input("x", [b, t, h, p]), r.input("dt", [b, t, h])
    A = r.input("A", [h])
    B, C = r.input("B", [b, t, g, n]), r.input("C", [b, t, g, n])
    Dv = r.input("D", [h]) if D else None
    zv = r.input("z", [b, t, h, p]) if z else None
    if dt_bias:
        dt = dt + r.input("dt_bias", [h])
    if dt_softplus:
        dt = softplus(dt)
    if dt_limit is not None:  # like mamba_ssm, dt is clamped to [0, inf) by default
        lo, hi = dt_limit
        lo = None if lo is None or lo == -math.inf else float(lo)
        hi = None if hi is None or hi == math.inf else float(hi)
        if lo is not None or hi is not None:
            dt = clamp(dt, lo, hi)
    dt = r.let("dt_", dt)
    hs = r.state("h", [b, h, p, n], scalar(exp(dt * A)), inject=dt * x * group(B, g, h))
    y = dot(hs, group(C, g, h), n)
    if Dv is not None:
        y = y + Dv * x
    if zv is not None:
        y = y * silu(zv)
    r.output("y", [b, t, h, p], y)


@register("s4d", origin="library", hints={"A": "negative", "log_dt": "log_dt"})
def s4d(r):
    """S4D (real diagonal, ZOH): x = exp(dt A) x + (exp(dt A) - 1)/A u; y = C x + D u,
    dt = exp(log_dt)."""
    b, h, t, n = r.dim("batch", "batch"), r.dim("heads", "head"), r.dim("time", "time"), \
        r.dim("dstate")
    u = r.input("u", [b, h, t])
    A, C = r.input("A", [h, n]), r.input("C", [h, n])
    log_dt, D = r.input("log_dt", [h]), r.input("D", [h])
    dA = r.let("dA", exp(exp(log_dt) * A))
    x = r.state("x", [b, h, n], diagonal(dA), inject=(dA - 1.0) / A * u)
    r.output("y", [b, h, t], dot(C, x, n) + D * u)


@register("fir", optional_inputs=("bias",), origin="library", hints={"weight": "small"})
def fir(r, activation=None, bias=False):
    """Causal depthwise FIR (Mamba's short conv): y_t = bias + sum_j weight[:, j] x_{t-W+1+j},
    optionally followed by silu (activation='silu')."""
    if activation not in (None, "silu"):
        raise ValueError(f"fir: activation must be None or 'silu', got {activation!r}")
    b, t, d, w = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan"), r.dim("width")
    x, weight = r.input("x", [b, t, d]), r.input("weight", [d, w])
    win = r.state("win", [b, d, w], shift(w), inject=x)
    y = dot(weight, win, w)
    if bias:
        y = y + r.input("bias", [d])
    r.output("y", [b, t, d], silu(y) if activation == "silu" else y)


@register("iir", origin="library", hints={"a": "stable_poly", "b": "small"})
def iir(r):
    """IIR filter per channel in controllable canonical form (direct form II), equal to
    scipy.signal.lfilter(b, a, x) with a[:, 0] = 1. The state holds the last n+1 values of
    w_t = x_t - sum_k a_k w_{t-k}; y_t = sum_k b_k w_{t-k}."""
    bt, t, d, o = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan"), r.dim("order")
    x = r.input("x", [bt, t, d])
    bc, ac = r.input("b", [d, o]), r.input("a", [d, o])
    w = r.state("w", [bt, d, o], companion(o, -flip(ac, o)), inject=x)
    r.output("y", [bt, t, d], dot(flip(bc, o), w, o))


@register("swa", origin="library")
def swa(r, window=4, scale=None):
    """Sliding-window softmax attention as a canonical realization: shift registers of the
    last W keys and values, and a softmax readout; ``valid`` marks filled slots."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"swa: window must be a positive integer, got {window!r}")
    b, t, h, k, v = _attn_dims(r)
    w = r.dim("window", size=window)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    kw = r.state("kw", [b, h, w, k], shift(w), inject=kk)
    vw = r.state("vw", [b, h, w, v], shift(w), inject=vv)
    valid = r.state("valid", [b, w], shift(w), inject=const(1.0))
    logits = dot(q, kw, k) * _scale(scale, k)
    r.output("o", [b, t, h, v], dot(softmax(logits, w, mask=valid), vw, w))


# ---- the modern recurrence family (issue 15): HGRN2, RWKV-6, Mamba-3 ----

@register("hgrn2", origin="library", hints={"g": "logsigmoid"})
def hgrn2(r, scale=None):
    """HGRN2 (fla's HGRN2Attention core): GLA with the input gate tied to the forget gate,
    S = Diag(exp(g_t)) S + (1 - exp(g_t)) v_t^T, o = scale * S^T q; q, g [B, T, H, K] (g in
    log space, fla's logsigmoid(f)), v [B, T, H, V] (fla's i)."""
    b, t, h, k, v = _attn_dims(r)
    q, vv = r.input("q", [b, t, h, k]), r.input("v", [b, t, h, v])
    g = r.input("g", [b, t, h, k])
    kk = r.let("k", -expm1(g))  # 1 - exp(g), accurate where the gate is near 1
    S = r.state("S", [b, h, k, v], diagonal(exp(g)), inject=kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


@register("rwkv6", origin="library", hints={"w": "logsigmoid", "u": "small"})
def rwkv6(bld, scale=None):
    """RWKV-6 (fla's chunk_rwkv6 / naive_recurrent_rwkv6): S = Diag(exp(w_t)) S + k_t v_t^T;
    the readout sees the state entering the step plus the bonus u on the current token,
    o_t = scale * (S_{t-1} + Diag(u) k_t v_t^T)^T r_t; r, k, w [B, T, H, K] (w in log space),
    v [B, T, H, V], u [H, K]."""
    b, t, h, k, v = _attn_dims(bld)
    rr, kk, vv = (bld.input("r", [b, t, h, k]), bld.input("k", [b, t, h, k]),
                  bld.input("v", [b, t, h, v]))
    w, u = bld.input("w", [b, t, h, k]), bld.input("u", [h, k])
    bld.state("S", [b, h, k, v], diagonal(exp(w)), inject=kk * vv)
    o = dot(prev("S"), rr, k) + dot(u * kk, rr, k) * vv
    bld.output("o", [b, t, h, v], o * _scale(scale, k))


@register("mamba3", optional_inputs=("D", "Z"), origin="library",
          hints={"ADT": "negative", "DT": "positive", "Q": "small", "K": "small"})
def mamba3(bld, D=False, Z=False):
    """Mamba-3 SISO (mamba_ssm's mamba3_siso_step_ref): the exponential-trapezoidal update
    H_t = a_t H_{t-1} + b_t v_{t-1} kr_{t-1}^T + c_t v_t kr_t^T with a = exp(ADT),
    b = (1 - sigmoid(Trap)) DT a, c = sigmoid(Trap) DT, kr/qr = K/Q (+ bias) rotated pairwise
    by the accumulated angle theta_t = sum_s pi tanh(Angles_s) DT_s; y = H qr + D v, optionally
    * silu(Z). Q, K [B, T, G, N/2, 2] (mamba_ssm's [B, T, G, N] viewed as pairs), V, Z
    [B, T, H, P], ADT, DT, Trap [B, H, T], Angles [B, T, H, N/2], Q_bias, K_bias [H, N/2, 2],
    D [H].

    The state is held in the rotating frame, X = H R(theta_t), whose transition is the rotation
    by the step's own angle (cos/sin of pi tanh(Angles) DT: no accumulated angle, no host
    precompute), and carries the last v k^T in a second slot for the trapezoid's b term: per
    head, value column and pair, a 4x4 ``dense`` over (component, slot), slot index
    2 * component + slot (slot 0: X, slot 1: v_{t-1} k_{t-1}^T)."""
    b, t, h = bld.dim("batch", "batch"), bld.dim("time", "time"), bld.dim("heads", "head")
    p, g = bld.dim("headdim"), bld.dim("groups", "group")
    j, c = bld.dim("pairs"), bld.dim("comp", size=2)
    cs, cs2 = bld.dim("slot", size=4), bld.dim("slot_in", size=4)
    Q, K = bld.input("Q", [b, t, g, j, c]), bld.input("K", [b, t, g, j, c])
    V = bld.input("V", [b, t, h, p])
    ADT, DT, Trap = (bld.input("ADT", [b, h, t]), bld.input("DT", [b, h, t]),
                     bld.input("Trap", [b, h, t]))
    Q_bias, K_bias = bld.input("Q_bias", [h, j, c]), bld.input("K_bias", [h, j, c])
    Angles = bld.input("Angles", [b, t, h, j])
    Dv = bld.input("D", [h]) if D else None
    Zv = bld.input("Z", [b, t, h, p]) if Z else None

    # index i of slot/slot_in is component i // 2 and slot i % 2 (0: X, 1: the last v k^T)
    ci = bld.let("comp_of", step(iota(cs) - 2.0))
    ci2 = bld.let("comp_in", step(iota(cs2) - 2.0))
    main = bld.let("main", 1.0 - (iota(cs) - 2.0 * ci))   # 1 on slot 0
    last = bld.let("last_in", iota(cs2) - 2.0 * ci2)      # 1 on slot_in 1
    pick = bld.let("pick", 1.0 - (iota(c) - ci) * (iota(c) - ci))  # component c at index i
    qs = bld.let("q_s", dot(group(Q, g, h) + Q_bias, pick, c))
    ks = bld.let("k_s", dot(group(K, g, h) + K_bias, pick, c))
    lam = bld.let("lam", sigmoid(Trap))
    alpha = bld.let("alpha", exp(ADT))
    beta = bld.let("beta", (1.0 - lam) * DT * alpha)
    gamma = bld.let("gamma", lam * DT)
    dtheta = bld.let("dtheta", math.pi * tanh(Angles) * DT)
    # X_new = (alpha X + beta U) R(dtheta): per pair of columns [[cos, sin], [-sin, cos]]
    rot = cos(dtheta) * (1.0 - (ci - ci2) * (ci - ci2)) + sin(dtheta) * (ci2 - ci)
    M = bld.let("M", rot * main * (alpha * (1.0 - last) + beta * last))
    X = bld.state("X", [b, h, p, j, cs], dense(cs, cs2, M),
                  inject=V * ks * (gamma * main + (1.0 - main)))
    y = dot(X * main, qs, [j, cs])
    if Dv is not None:
        y = y + Dv * V
    if Zv is not None:
        y = y * silu(Zv)
    bld.output("y", [b, t, h, p], y)


# ---- diagonal-plus-low-rank transitions (the dplr kind): rwkv7, kda ----
#
# fla's state layout [B, H, K, V] with S_t = (Diag(w_t) + a_t b_t^T) S_{t-1} + k_t v_t^T along
# K: scancc.ir.dplr(key, a, b, w) is exactly that matrix. (fla writes the same step in its
# transposed [V, K] view, S_t = S_{t-1} (Diag(w) + a b^T) + v k^T, so fla's ``a``/``b`` of
# rwkv7 are the IR's ``b``/``a``.)

@register("rwkv7", origin="library",
          hints={"w": "logsigmoid", "a": "unit_rows", "b": "unit_rows"})
def rwkv7(r, scale=None):
    """RWKV-7 / the generalized delta rule (fla's fused_recurrent_rwkv7 and naive
    dplr_recurrence): S = Diag(exp(w_t)) S + b_t (a_t^T S) + k_t v_t^T, o = scale * S^T r;
    r, w, k, a, b [B, T, H, K] (w a log decay), v [B, T, H, V]; scale K^-1/2 by default (as
    fused_recurrent_rwkv7; fla's chunk_rwkv7 defaults to 1.0: pass scale=1.0 for it)."""
    from scancc.ir import dplr
    b, t, h, k, v = _attn_dims(r)   # inputs in fla's argument order
    rr, w = r.input("r", [b, t, h, k]), r.input("w", [b, t, h, k])
    kk, vv = r.input("k", [b, t, h, k]), r.input("v", [b, t, h, v])
    a, bb = r.input("a", [b, t, h, k]), r.input("b", [b, t, h, k])
    S = r.state("S", [b, h, k, v], dplr(k, a=bb, b=a, w=exp(w)), inject=kk * vv)
    r.output("o", [b, t, h, v], dot(S, rr, k) * _scale(scale, k))


@register("kda", origin="library",
          hints={"q": "unit_rows", "k": "unit_rows", "beta": "unit_interval", "g": "logsigmoid"})
def kda(r, scale=None, use_qk_l2norm_in_kernel=False, grouped_value_heads=False):
    # grouped_value_heads (fla's GVA, HV = G * H value heads, as naive_recurrent_kda): q, k
    # [B, T, H, K] (dim qk_heads); v [B, T, HV, V], g [B, T, HV, K], beta [B, T, HV], the state
    # [B, HV, K, V] and o [B, T, HV, V] (dim heads); value head i reads q/k head i // G (fla's
    # repeat_interleave). Off by default: one value head per key head, as the docstring says.
    """Kimi Delta Attention (fla's naive_recurrent_kda, one value head per key head):
    S = (I - beta k k^T) Diag(exp(g_t)) S + beta k v^T, o = scale * S^T q; q, k, g [B, T, H, K]
    (g a per-key log decay), v [B, T, H, V], beta [B, T, H]."""
    from scancc.ir import dplr
    b, t, h, k, v = _attn_dims(r)
    q, kk, vv, hq = _gva_qkv(r, b, t, h, k, v, grouped_value_heads)
    g, beta = r.input("g", [b, t, h, k]), r.input("beta", [b, t, h])
    if use_qk_l2norm_in_kernel:
        q, kk = r.let("qn", l2norm(q, k)), r.let("kn", l2norm(kk, k))
    if grouped_value_heads:
        q, kk = group(q, hq, h), group(kk, hq, h)   # value head i reads q/k head i // G
    decay = r.let("decay", exp(g))
    # (I - beta k k^T) Diag(d) = Diag(d) + (-beta k) (d k)^T
    tr = dplr(k, a=-(beta * kk), b=decay * kk, w=decay)
    S = r.state("S", [b, h, k, v], tr, inject=beta * kk * vv)
    r.output("o", [b, t, h, v], dot(S, q, k) * _scale(scale, k))


# ---- B'MOJO: eidetic and fading memory in one recurrence (docs/bmojo.md) ----

def _window_arg(name, window):
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"{name}: window must be a positive integer, got {window!r}")
    return window


@register("bmojo_f", origin="library")
def bmojo_f(r, window=4, scale=None):
    """B'MOJO-F: one softmax of scale*q_t over the keys of a window {(k_j, v_j): t-W < j <= t}
    and a fading window {(kf_j, vf_j): t-2W < j <= t-W} (j >= 0). kf/vf (the fading tokens,
    an SSM's output in the layer) ride a 2W shift register whose older half is read."""
    W = _window_arg("bmojo_f", window)
    b, t, h, k, v = _attn_dims(r)
    w, f = r.dim("window", size=W), r.dim("fading", size=2 * W)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    kf, vf = r.input("kf", [b, t, h, k]), r.input("vf", [b, t, h, v])
    kw = r.state("kw", [b, h, w, k], shift(w), inject=kk)
    vw = r.state("vw", [b, h, w, v], shift(w), inject=vv)
    valid = r.state("valid", [b, w], shift(w), inject=const(1.0))
    kfw = r.state("kf_win", [b, h, f, k], shift(f), inject=kf)
    vfw = r.state("vf_win", [b, h, f, v], shift(f), inject=vf)
    validf = r.state("valid_f", [b, f], shift(f), inject=const(1.0))
    sc = _scale(scale, k)
    older = step((W - 1.0) - iota(f))  # slots 0..W-1 of the 2W register: t-2W < j <= t-W
    pw, pf = joint_softmax([(dot(q, kw, k) * sc, w, valid),
                            (dot(q, kfw, k) * sc, f, validf * older)])
    r.output("o", [b, t, h, v], dot(pw, vw, w) + dot(pf, vfw, f))


def bmojo(window=4, memory=4, predictor=2, scale=None):
    """The B'MOJO recurrence (the registered ``bmojo``) with these options."""
    from .registry import get
    return get("bmojo").build(window=window, memory=memory, predictor=predictor, scale=scale)


@register("bmojo", origin="library")
def _bmojo(r, window=4, memory=4, predictor=2, scale=None):
    """B'MOJO: bmojo_f plus an eidetic memory of m tokens. The token j = t-W leaving the
    window enters the memory (selection state) with its innovation score
    s_j = sum_v (y_j - mean(y_{j-1..j-P}))^2 (y before time 0 is 0): into a free slot, else
    replacing the lowest slot with the smallest score if s_j is larger. o_t is one softmax of
    scale*q_t over the window, the fading window and the memory."""
    W = _window_arg("bmojo", window)
    m, P = _window_arg("bmojo (memory)", memory), _window_arg("bmojo (predictor)", predictor)
    b, t, h, k, v = _attn_dims(r)
    # x: the window plus the token leaving it (slot 0, j = t-W); f: the fading window (as in
    # bmojo_f); ypast: y_{t-W-P} .. y_t (slot P is y_j, slots 0..P-1 its predictor window)
    x, f = r.dim("window", size=W + 1), r.dim("fading", size=2 * W)
    mem, yd = r.dim("memory", size=m), r.dim("ypast", size=W + P + 1)
    q, kk, vv = _qkv(r, b, t, h, k, v)
    kf, vf = r.input("kf", [b, t, h, k]), r.input("vf", [b, t, h, v])
    y = r.input("y", [b, t, h, v])
    kx = r.state("kw", [b, h, x, k], shift(x), inject=kk)
    vx = r.state("vw", [b, h, x, v], shift(x), inject=vv)
    valid = r.state("valid", [b, x], shift(x), inject=const(1.0))
    kfw = r.state("kf_win", [b, h, f, k], shift(f), inject=kf)
    vfw = r.state("vf_win", [b, h, f, v], shift(f), inject=vf)
    validf = r.state("valid_f", [b, f], shift(f), inject=const(1.0))
    ys = r.state("ys", [b, h, yd, v], shift(yd), inject=y)
    # the cascade: the memory reads the current shift registers (declared before it)
    i = iota(yd)
    err = dot(ys, step(i - P) * step(P - i), yd) - dot(ys, step((P - 1.0) - i), yd) * (1.0 / P)
    score = dot(err, err, v)
    oldest = step(-iota(x))
    # the stored key is s_j + 1 (> 0, as s_j >= 0): 0 marks a free slot, so keys and occupancy
    # are one state (every backend's selection rule reads them from one earlier state)
    key = score + 1.0
    sel = selection(mem, key, dot(valid, oldest, x), prev("mem_key"), prev("mem_key"))
    mf = r.state("mem_key", [b, h, mem], sel, inject=key)
    mk = r.state("mem_k", [b, h, mem, k], sel, inject=dot(kx, oldest, x))
    mv = r.state("mem_v", [b, h, mem, v], sel, inject=dot(vx, oldest, x))
    sc = _scale(scale, k)
    window = valid * step(iota(x) - 1.0)     # slots 1..W: t-W < j <= t
    older = step((W - 1.0) - iota(f))         # slots 0..W-1: t-2W < j <= t-W
    pw, pf, pm = joint_softmax([(dot(q, kx, k) * sc, x, window),
                                (dot(q, kfw, k) * sc, f, validf * older),
                                (dot(q, mk, k) * sc, mem, mf)])
    r.output("o", [b, t, h, v], dot(pw, vx, x) + dot(pf, vfw, f) + dot(pm, mv, mem))
