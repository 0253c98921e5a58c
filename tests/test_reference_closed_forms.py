"""The standard library on the reference backend against independent truths: closed forms
(masked-attention / decay-matrix forms, convolution with the impulse response), explicit dense
transition matrices, scipy.signal.lfilter and torch's conv1d / attention."""
import math

import numpy as np
import pytest
import scancc
from scancc.testing import assert_close

TS = [1, 2, 63, 64, 257]


def rng_for(*key):
    return np.random.default_rng(abs(hash(key)) % 2**32)


def run(name, *args, init=None, **kw):
    return scancc.compile(name)(*args, initial_state=init, output_final_state=True, **kw)


def decay_form(q, k, v, logdecay, S0, scale):
    """o_t = scale * (q_t . S_t), S_t = e^{G_t} S0 + sum_{s<=t} e^{G_t - G_s} k_s v_s^T, where
    G is the cumulative log decay, broadcast over [B, T, H, K]; written as a T x T form."""
    G = np.cumsum(logdecay, axis=1)                               # [B, T, H, K]
    T = q.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    diff = G[:, :, None] - G[:, None, :]                          # [B, T, S, H, K]
    w = np.where(causal[None, :, :, None, None], np.exp(np.where(causal[None, :, :, None, None],
                                                               diff, 0.0)), 0.0)
    attn = np.einsum("bthk,btshk,bshk->bths", q, w, k)
    o = np.einsum("bths,bshv->bthv", attn, v) + np.einsum("bthk,bhkv->bthv", q * np.exp(G), S0)
    S = np.einsum("bhk,bhkv->bhkv", np.exp(G[:, -1]), S0) + np.einsum(
        "bshk,bshv->bhkv", np.exp(G[:, -1:] - G) * k, v)
    return o * scale, S


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", ["linear_attn", "retnet", "simple_gla", "gla"])
def test_linear_attention_family_matches_decay_matrix_form(name, T):
    r = rng_for(name, T)
    B, H, K, V = 2, 3, 5, 7
    q, k = r.standard_normal((B, T, H, K)), r.standard_normal((B, T, H, K))
    v, S0 = r.standard_normal((B, T, H, V)), r.standard_normal((B, H, K, V))
    extra = {}
    if name == "linear_attn":
        logd = np.zeros((B, T, H, K))
    elif name == "retnet":
        gamma = 1 - 2.0 ** (-5 - np.arange(H))
        logd = np.broadcast_to(np.log(gamma)[None, None, :, None], (B, T, H, K))
    elif name == "simple_gla":
        g = -np.logaddexp(0, -r.standard_normal((B, T, H)) - 2)
        logd, extra = np.broadcast_to(g[..., None], (B, T, H, K)), {"g": g}
    else:
        g = -np.logaddexp(0, -r.standard_normal((B, T, H, K)) - 2)
        logd, extra = g, {"g": g}
    want_o, want_S = decay_form(q, k, v, logd, S0, K ** -0.5)
    o, S = run(name, q, k, v, init=S0, **extra)
    assert_close(o, want_o, "float64")
    assert_close(S, want_S, "float64", "final state")


def test_scale_option_and_call_time_scale():
    r = rng_for("scale")
    q, k, v = (r.standard_normal((1, 9, 2, 4)) for _ in range(3))
    want, _ = decay_form(q, k, v, np.zeros_like(q), np.zeros((1, 2, 4, 4)), 0.25)
    assert_close(scancc.compile("linear_attn", scale=0.25)(q, k, v), want, "float64")
    assert_close(scancc.compile("linear_attn")(q, k, v, scale=0.25), want, "float64")


@pytest.mark.parametrize("T", [1, 63, 257])
def test_hgrn_matches_cumulative_form(T):
    r = rng_for("hgrn", T)
    x, g, h0 = r.standard_normal((2, T, 5)), -r.uniform(0.01, 1, (2, T, 5)), r.standard_normal((2, 5))
    G = np.cumsum(g, axis=1)
    causal = np.tril(np.ones((T, T)))
    want = np.einsum("ts,btsd,bsd->btd", causal,
                     np.exp(np.minimum(G[:, :, None] - G[:, None, :], 0)), x) + np.exp(G) * h0[:, None]
    o, h = run("hgrn", x, g, init=h0)
    assert_close(o, want, "float64")
    assert_close(h, want[:, -1], "float64")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 2, 63])
def test_delta_rules_match_dense_transition_matrices(gated, T):
    r = rng_for("delta", gated, T)
    B, H, K, V = 2, 2, 6, 3
    q, k = r.standard_normal((B, T, H, K)), r.standard_normal((B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v, beta = r.standard_normal((B, T, H, V)), r.uniform(0, 1, (B, T, H))
    g = -r.uniform(0, 0.5, (B, T, H))
    S = r.standard_normal((B, H, K, V))
    S0, o = S.copy(), np.zeros((B, T, H, V))
    eye = np.eye(K)
    for t in range(T):  # explicit K x K matrices: M = alpha (I - beta k k^T)
        M = eye - beta[:, t, :, None, None] * np.einsum("bhi,bhj->bhij", k[:, t], k[:, t])
        if gated:
            M = np.exp(g[:, t])[..., None, None] * M
        S = M @ S + beta[:, t, :, None, None] * np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S) * K ** -0.5
    args = (q, k, v, g, beta) if gated else (q, k, v, beta)
    got_o, got_S = run("gated_delta_net" if gated else "delta_net", *args, init=S0)
    assert_close(got_o, o, "float64")
    assert_close(got_S, S, "float64", "final state")


def test_delta_rule_l2norm_option_normalizes_q_and_k():
    r = rng_for("l2")
    q, k, v = (r.standard_normal((1, 7, 2, 4)) for _ in range(3))
    beta = r.uniform(0, 1, (1, 7, 2))
    n = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
    want = scancc.compile("delta_net")(n(q), n(k), v, beta)
    got = scancc.compile("delta_net", use_qk_l2norm_in_kernel=True)(q, k, v, beta)
    assert_close(got, want, "float64")
    assert not np.allclose(scancc.compile("delta_net")(q, k, v, beta), want)


def ssm_closed_form(u, dt, A, Bm, Cm, x0):
    """Diagonal SSM x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t per (batch, channel, state), as a
    T x T decay matrix; u, dt [b, d, T], A [d, n], Bm, Cm [b, d, n, T] -> (y [b,d,T], x_T)."""
    T = u.shape[-1]
    cum = np.cumsum(dt, axis=-1)[:, :, None, :] * A[None, :, :, None]      # [b, d, n, T]
    diff = cum[..., :, None] - cum[..., None, :]                         # [b, d, n, t, s]
    causal = np.tril(np.ones((T, T), bool))
    L = np.where(causal, np.exp(np.where(causal, diff, 0.0)), 0.0)
    inj = dt[:, :, None, :] * Bm * u[:, :, None, :]                      # [b, d, n, s]
    xs = np.einsum("bdnts,bdns->bdnt", L, inj) + np.exp(cum) * x0[..., None]
    return np.einsum("bdnt,bdnt->bdt", Cm, xs), xs[..., -1]


@pytest.mark.parametrize("T", [1, 2, 63, 257])
@pytest.mark.parametrize("G", [None, 1, 3])
def test_mamba_matches_closed_form(T, G):
    r = rng_for("mamba", T, G)
    b, d, n = 2, 6, 5
    u, delta = r.standard_normal((b, d, T)), r.standard_normal((b, d, T))
    A = -np.exp(r.standard_normal((d, n)))
    shapeBC = (b, n, T) if G is None else (b, G, n, T)
    Bm, Cm = r.standard_normal(shapeBC), r.standard_normal(shapeBC)
    D, z, bias = r.standard_normal(d), r.standard_normal((b, d, T)), r.standard_normal(d)
    x0 = r.standard_normal((b, d, n))
    rep = lambda X: (np.repeat(X[:, None], d, 1) if G is None  # noqa: E731
                     else np.repeat(X, d // G, axis=1))
    dt = np.logaddexp(0, delta + bias[:, None])
    y, xT = ssm_closed_form(u, dt, A, rep(Bm), rep(Cm), x0)
    y = (y + D[:, None] * u) * z / (1 + np.exp(-z))
    got_y, got_x = run("mamba", u, delta, A, Bm, Cm, init=x0, D=D, z=z, delta_bias=bias,
                       delta_softplus=True)
    assert_close(got_y, y, "float64")
    assert_close(got_x, xT, "float64", "final state")


@pytest.mark.parametrize("T", [1, 63, 257])
@pytest.mark.parametrize("G", [1, 2])
def test_mamba2_matches_ssd_matrix_form(T, G):
    r = rng_for("mamba2", T, G)
    b, H, P, N = 2, 4, 3, 5
    x, dt = r.standard_normal((b, T, H, P)), r.standard_normal((b, T, H))
    A, D, dt_bias = -np.exp(r.standard_normal(H)), r.standard_normal(H), r.standard_normal(H)
    Bm, Cm = r.standard_normal((b, T, G, N)), r.standard_normal((b, T, G, N))
    h0 = r.standard_normal((b, H, P, N))
    dts = np.logaddexp(0, dt + dt_bias)
    Bh, Ch = np.repeat(Bm, H // G, axis=2), np.repeat(Cm, H // G, axis=2)   # [b, T, H, N]
    cum = np.cumsum(dts * A, axis=1)                                        # [b, T, H]
    causal = np.tril(np.ones((T, T), bool))
    seg = cum[:, :, None] - cum[:, None, :]                                 # [b, t, s, H]
    L = np.where(causal[None, :, :, None], np.exp(np.where(causal[None, :, :, None], seg, 0)), 0)
    y = np.einsum("btsh,bthn,bshn,bsh,bshp->bthp", L, Ch, Bh, dts, x)
    y += np.einsum("bthn,bhpn,bth->bthp", Ch, h0, np.exp(cum)) + D[:, None] * x
    hT = np.einsum("bsh,bshn,bsh,bshp->bhpn", np.exp(cum[:, -1:] - cum), Bh, dts, x) + \
        np.exp(cum[:, -1])[..., None, None] * h0
    got_y, got_h = run("mamba2", x, dt, A, Bm, Cm, init=h0, D=D, dt_bias=dt_bias,
                       dt_softplus=True)
    assert_close(got_y, y, "float64")
    assert_close(got_h, hT, "float64", "final state")


def test_mamba2_dt_limit_clamps_dt():
    r = rng_for("dtlim")
    x, dt = r.standard_normal((1, 5, 2, 3)), r.standard_normal((1, 5, 2)) * 3
    A, Bm, Cm = -np.ones(2), r.standard_normal((1, 5, 1, 4)), r.standard_normal((1, 5, 1, 4))
    want = scancc.compile("mamba2")(x, np.clip(dt, 0.1, 0.5), A, Bm, Cm)
    got = scancc.compile("mamba2", dt_limit=(0.1, 0.5))(x, dt, A, Bm, Cm)
    assert_close(got, want, "float64")


@pytest.mark.parametrize("T", [1, 64, 257])
def test_s4d_equals_convolution_with_impulse_response(T):
    r = rng_for("s4d", T)
    b, H, N = 2, 3, 4
    u = r.standard_normal((b, H, T))
    A, C = -np.exp(r.standard_normal((H, N))), r.standard_normal((H, N))
    log_dt, D = r.uniform(np.log(1e-3), np.log(1e-1), H), r.standard_normal(H)
    dA = np.exp(np.exp(log_dt)[:, None] * A)                              # [H, N]
    Kimp = np.einsum("hn,hnl->hl", C * (dA - 1) / A, dA[..., None] ** np.arange(T))
    want = np.stack([np.stack([np.convolve(u[i, h], Kimp[h])[:T] for h in range(H)])
                     for i in range(b)]) + D[:, None] * u
    got, _ = run("s4d", u, A, C, log_dt, D)
    assert_close(got, want, "float64")


@pytest.mark.parametrize("T", [1, 3, 63])
@pytest.mark.parametrize("W", [1, 4])
def test_fir_equals_torch_depthwise_conv1d(T, W):
    torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
    r = rng_for("fir", T, W)
    b, d = 2, 5
    x, w, bias = r.standard_normal((b, T, d)), r.standard_normal((d, W)), r.standard_normal(d)
    want = torch.nn.functional.conv1d(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(w)[:, None],
                                      torch.from_numpy(bias), padding=W - 1, groups=d)[..., :T]
    want = torch.nn.functional.silu(want).transpose(1, 2).numpy()
    got, win = run("fir", x, w, bias=bias, activation="silu")
    assert_close(got, want, "float64")
    pad = np.concatenate([np.zeros((b, W, d)), x], axis=1)
    assert_close(win, pad[:, -W:].transpose(0, 2, 1), "float64", "final window")


@pytest.mark.parametrize("T", [1, 2, 63, 257])
@pytest.mark.parametrize("order", [1, 3])
def test_iir_equals_scipy_lfilter(T, order):
    signal = pytest.importorskip("scipy.signal", reason="scipy (the [test] extra) is missing")
    r = rng_for("iir", T, order)
    b_, d = 2, 4
    x = r.standard_normal((b_, T, d))
    roots = r.uniform(-0.9, 0.9, (d, order))
    a = np.stack([np.poly(z) for z in roots])                              # [d, order+1], a0 = 1
    bc = r.standard_normal((d, order + 1))
    want = np.stack([np.stack([signal.lfilter(bc[c], a[c], x[i, :, c]) for c in range(d)], -1)
                     for i in range(b_)])
    got, w = run("iir", x, bc, a)
    assert_close(got, want, "float64")
    # the state holds the last order+1 values of w = lfilter(1, a, x)
    wv = np.stack([np.stack([signal.lfilter([1.0], a[c], x[i, :, c]) for c in range(d)])
                   for i in range(b_)])                                    # [b, d, T]
    wv = np.concatenate([np.zeros((b_, d, order + 1)), wv], axis=-1)[..., -(order + 1):]
    assert_close(w, wv, "float64", "final state")


@pytest.mark.parametrize("T", [1, 2, 63])
@pytest.mark.parametrize("W", [1, 5])
def test_swa_equals_masked_softmax_attention(T, W):
    torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
    r = rng_for("swa", T, W)
    B, H, K, V = 2, 3, 4, 5
    q, k, v = r.standard_normal((B, T, H, K)), r.standard_normal((B, T, H, K)), \
        r.standard_normal((B, T, H, V))
    i = np.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
    tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(mask)).transpose(1, 2).numpy()
    got = scancc.compile("swa", window=W)(q, k, v)
    assert_close(got, want, "float64")


def test_swa_initial_window_is_attended():
    """A carried window: running T in two halves with the state in between equals one run."""
    r = rng_for("swa2")
    q, k, v = (r.standard_normal((1, 10, 2, 3)) for _ in range(3))
    ker = scancc.compile("swa", window=3)
    full = ker(q, k, v)
    y1, st = ker(q[:, :4], k[:, :4], v[:, :4], output_final_state=True)
    y2 = ker(q[:, 4:], k[:, 4:], v[:, 4:], initial_state=st)
    assert_close(np.concatenate([y1, y2], 1), full, "float64")
    assert set(st) == {"kw", "vw", "valid"}


def test_float32_inputs_return_float32_and_match():
    r = rng_for("f32")
    q, k, v = (r.standard_normal((1, 33, 2, 4)).astype(np.float32) for _ in range(3))
    o = scancc.compile("linear_attn")(q, k, v)
    assert o.dtype == np.float32
    want, _ = decay_form(*(a.astype(np.float64) for a in (q, k, v)), np.zeros((1, 33, 2, 4)),
                         np.zeros((1, 2, 4, 4)), 0.5)
    assert_close(o, want, "float32")


def test_retnet_gamma_is_per_head_constant():
    # gamma_h = 1 - 2^(-5-h): with k = e_0 and v = 1 at t=0 only, o_t = gamma_h^t * scale * q_0
    T, H = 6, 3
    q = np.zeros((1, T, H, 1)) + 1.0
    k = np.zeros((1, T, H, 1))
    k[:, 0] = 1.0
    v = np.ones((1, T, H, 1))
    o = scancc.compile("retnet")(q, k, v)
    gam = 1 - 2.0 ** (-5 - np.arange(H))
    np.testing.assert_allclose(o[0, :, :, 0], gam[None] ** np.arange(T)[:, None], rtol=1e-12)
    assert math.isclose(gam[0], 1 - 1 / 32)


def test_adjoint_steps_are_the_transposed_matrices():
    """shift_adjoint / companion_adjoint / dense_adjoint: h_t = A^T (h_{t-1} + b_t) with A the
    forward kind's explicit matrix (shift: (S h)_i = h_{i+1}; companion: (I + e_last f^T) S)."""
    from scancc.ir import Builder, Transition
    from scancc.ir.recurrence import Kind
    r = Builder("adjoint_kinds")
    b, t, w, n, c = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("w"), r.dim("n"), \
        r.dim("c")
    x, f = r.input("x", [b, t, w]), r.input("f", [w])
    y, m = r.input("y", [b, t, n]), r.input("m", [n, c])
    sa = r.state("sa", [b, w], Transition(Kind.SHIFT_ADJOINT, "w"), inject=x)
    ca = r.state("ca", [b, w], Transition(Kind.COMPANION_ADJOINT, "w", (("feedback", f),)),
                 inject=x)
    da = r.state("da", [b, n], Transition(Kind.DENSE_ADJOINT, "n", (("matrix", m),), "c"),
                 inject=y)
    r.output("o_sa", [b, t, w], sa)
    r.output("o_ca", [b, t, w], ca)
    r.output("o_da", [b, t, n], da)
    rec = r.build()
    rg = rng_for("adjoint_kinds")
    B, T, W, N = 2, 6, 4, 3
    xs, fs, ys, ms = rg.standard_normal((B, T, W)), rg.standard_normal(W), \
        rg.standard_normal((B, T, N)), rg.standard_normal((N, N))
    h0 = {"sa": rg.standard_normal((B, W)), "ca": rg.standard_normal((B, W)),
          "da": rg.standard_normal((B, N))}
    out, _ = scancc.compile(rec)(x=xs, f=fs, y=ys, m=ms, initial_state=h0,
                                 output_final_state=True)
    S = np.eye(W, k=1)                                   # (S h)_i = h_{i+1}, newest slot 0
    A = (np.eye(W) + np.outer(np.eye(W)[-1], fs)) @ S    # companion: newest = f . S h
    for name, mat, inj in (("sa", S, xs), ("ca", A, xs), ("da", ms, ys)):
        h, want = h0[name], []
        for i in range(T):
            h = (h + inj[:, i]) @ mat                    # rows: A^T (h + b) = (h + b) A
            want.append(h)
        assert_close(out[f"o_{name}"], np.stack(want, 1), "float64", name)
