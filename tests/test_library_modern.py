"""hgrn2, rwkv6 and mamba3 (the modern section of scancc/library.py) against independent
references: flash-linear-attention's naive recurrences (called, not copied) for HGRN2 (fla's
HGRN2Attention runs GLA with k = 1 - exp(g)) and RWKV-6, and for Mamba-3 a loop written here
from its definition (mamba_ssm's SISO step: accumulated angle, rotated q/k, trapezoidal
update with the previous (v, k) pair). The helpers and conventions are test_library_truth.py's
(float32-representable inputs, a perturbed run that must miss, the tolerance table).
Gradients of these entries are checked by test_autograd.py (every library recurrence);
backends against the reference by test_backends.py and ``scancc check``; here each also runs
on the NKI emulator (and, slow, Triton) against the independent truth."""
import importlib.util
import math
import pathlib
import warnings

import numpy as np
import pytest
import scancc
from scancc.testing import assert_close

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")


def _truth_helpers():
    """test_library_truth.py's helpers (rng_for, randn, log_gate, run, ...), loaded by path:
    the suite runs with --import-mode=importlib, where test modules are not importable."""
    path = pathlib.Path(__file__).with_name("test_library_truth.py")
    spec = importlib.util.spec_from_file_location("_scancc_library_truth_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


T_ = _truth_helpers()
DTYPES, rng_for, arr, randn, log_gate = T_.DTYPES, T_.rng_for, T_.arr, T_.randn, T_.log_gate
bump_last, assert_misses, assert_dtypes, run, th = (T_.bump_last, T_.assert_misses,
                                                     T_.assert_dtypes, T_.run, T_.th)


@pytest.fixture(scope="module")
def fla():
    with warnings.catch_warnings():  # "Triton is not supported on current platform" on CPU
        warnings.simplefilter("ignore")
        pytest.importorskip("fla", reason=T_.FLA_SKIP)
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6
    return naive_recurrent_gla, naive_recurrent_rwkv6


# ---- HGRN2 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 2, 63, 257])
def test_hgrn2_matches_fla_gla_with_tied_input_gate(fla, T, init, dtype):
    gla, _ = fla
    r = rng_for("hgrn2", T, init, dtype)
    B, H, K, V = 2, 3, 5, 7
    q, v, g = randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, V), \
        log_gate(r, dtype, B, T, H, K)
    S0 = randn(r, dtype, B, H, K, V) if init else None
    k = 1.0 - g.double().exp()   # fla's HGRN2Attention: k = 1 - g.exp(), g = logsigmoid(f)
    want_o, want_S = gla(q, k, v, g, initial_state=None if S0 is None else S0.float(),
                         output_final_state=True)
    o, S = run("hgrn2", S0, q=q, v=v, g=g)
    assert_dtypes(o, S, dtype)
    assert_close(o, want_o, "float32")
    assert_close(S, want_S, "float32", "final state")
    assert_misses(run("hgrn2", S0, q=q, v=bump_last(v, 1), g=g)[0], want_o, "float32", "hgrn2")


def test_hgrn2_is_chunkable():
    """The fast path: a diagonal decay with k = 1 - exp(g) a key-side factor."""
    from scancc.ir.passes import chunked
    form = chunked.analyze(scancc.compile("hgrn2").ir)
    assert set(form.states) == {"S"} and form.states["S"].kind.value == "diagonal"


# ---- RWKV-6 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 2, 63, 257])
def test_rwkv6_matches_fla_naive(fla, T, init, dtype):
    _, rwkv6 = fla
    r = rng_for("rwkv6", T, init, dtype)
    B, H, K, V = 2, 3, 5, 7
    rr, k, v = randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, V)
    w, u = log_gate(r, dtype, B, T, H, K), randn(r, dtype, H, K)
    S0 = randn(r, dtype, B, H, K, V) if init else None
    scale = 0.4 if init else None   # a non-default scale rides on the runs with a state
    want_o, want_S = rwkv6(th(rr), th(k), th(v), th(w), u, scale=scale,
                           initial_state=None if S0 is None else S0.float(),
                           output_final_state=True)
    want_o = th(want_o)
    kw = dict(r=rr, k=k, v=v, w=w, u=u, scale=scale)
    o, S = run("rwkv6", S0, **kw)
    assert_dtypes(o, S, dtype)
    assert_close(o, want_o, "float32")
    assert_close(S, want_S, "float32", "final state")
    # the bonus u matters, and so does the current token's key
    assert_misses(run("rwkv6", S0, **{**kw, "u": u + 1.0})[0], want_o, "float32", "rwkv6 u")
    assert_misses(run("rwkv6", S0, **{**kw, "v": bump_last(v, 1)})[0], want_o, "float32",
                  "rwkv6")


def test_rwkv6_readout_is_the_entering_state():
    """u = 0 and T = 1: o = scale * S0^T r exactly, whatever k, v, w (the state after the
    update would add k v^T)."""
    r = rng_for("rwkv6-prev")
    B, H, K, V = 1, 2, 3, 4
    x = dict(r=randn(r, "float64", B, 1, H, K), k=randn(r, "float64", B, 1, H, K),
             v=randn(r, "float64", B, 1, H, V), w=log_gate(r, "float64", B, 1, H, K),
             u=torch.zeros(H, K, dtype=torch.float64))
    S0 = randn(r, "float64", B, H, K, V)
    o, _ = run("rwkv6", S0, scale=1.0, **x)
    want = torch.einsum("bhkv,bhk->bhv", S0, x["r"][:, 0])[:, None]
    torch.testing.assert_close(o, want, rtol=1e-14, atol=1e-14)


# ---- Mamba-3 (SISO) ---------------------------------------------------------------------------

def mamba3_loop(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, S0=None,
                U0=None):
    """Mamba-3 SISO written out from its definition in float64 NumPy.

    Per step t and head: the angle accumulates, theta_t = theta_{t-1} + pi tanh(Angles_t) DT_t
    (theta_{-1} = 0); q and k (+ their biases) are rotated pairwise by theta_t,
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos); with lam = sigmoid(Trap), a = exp(ADT),
    b = (1 - lam) DT a, c = lam DT:
        S_t = a S_{t-1} + b v_{t-1} kr_{t-1}^T + c v_t kr_t^T   (S [P, N]; v_{-1} kr_{-1}^T = U0)
        y_t = S_t qr_t + D v_t, then * z sigmoid(z)
    Q, K [B, T, G, N/2, 2] shared by H/G consecutive heads. Returns y, S_T, theta_T and
    v_{T-1} kr_{T-1}^T."""
    B, T, G, J, _ = Q.shape
    H, P = V.shape[2], V.shape[3]
    N = 2 * J
    theta = np.zeros((B, H, J))
    S = np.zeros((B, H, P, N)) if S0 is None else S0.copy()
    U = np.zeros((B, H, P, N)) if U0 is None else U0.copy()
    ys = []
    for t in range(T):
        q = np.repeat(Q[:, t], H // G, axis=1) + Q_bias      # [B, H, J, 2]
        k = np.repeat(K[:, t], H // G, axis=1) + K_bias
        dt = DT[:, :, t]
        theta = theta + math.pi * np.tanh(Angles[:, t]) * dt[..., None]
        c, s = np.cos(theta), np.sin(theta)

        def rot(x):
            x0, x1 = x[..., 0], x[..., 1]
            return np.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(B, H, N)

        qr, kr = rot(q), rot(k)
        lam = 1.0 / (1.0 + np.exp(-Trap[:, :, t]))
        a = np.exp(ADT[:, :, t])
        b, g = (1.0 - lam) * dt * a, lam * dt
        v = V[:, t]
        S = (a[..., None, None] * S
             + b[..., None, None] * U
             + g[..., None, None] * v[..., :, None] * kr[..., None, :])
        y = np.einsum("bhpn,bhn->bhp", S, qr)
        if D is not None:
            y = y + D[None, :, None] * v
        if Z is not None:
            z = Z[:, t]
            y = y * z / (1.0 + np.exp(-z))
        ys.append(y)
        U = v[..., :, None] * kr[..., None, :]
    return np.stack(ys, 1), S, theta, U


def mamba3_inputs(seed, B, T, G, H, J, P, D=False, Z=False):
    r = np.random.default_rng(seed)

    def f32(x):
        return x.astype(np.float32).astype(np.float64)
    x = dict(Q=r.standard_normal((B, T, G, J, 2)) * 0.5, K=r.standard_normal((B, T, G, J, 2)) * 0.5,
             V=r.standard_normal((B, T, H, P)),
             ADT=-np.abs(r.standard_normal((B, H, T))) * 0.5,
             DT=r.uniform(0.05, 1.0, (B, H, T)), Trap=r.standard_normal((B, H, T)),
             Q_bias=r.standard_normal((H, J, 2)) * 0.5, K_bias=r.standard_normal((H, J, 2)) * 0.5,
             Angles=r.standard_normal((B, T, H, J)) * 2.0)
    if D:
        x["D"] = r.standard_normal(H)
    if Z:
        x["Z"] = r.standard_normal((B, T, H, P))
    return {k: f32(v) for k, v in x.items()}


def to_frame(S, theta, U):
    """The library's state X [B, H, P, J, 4] (index 2c + s: component c, slot s) from the
    loop's (S, theta, U = v kr^T): slot 0 is S R(theta) (the rotating frame), slot 1 is
    U R(theta)."""
    B, H, P, N = S.shape
    J = N // 2
    c, s = np.cos(theta)[:, :, None, :], np.sin(theta)[:, :, None, :]

    def frame(M):  # M [B, H, P, N] -> M R(theta), per column pair
        m0, m1 = M[..., 0::2], M[..., 1::2]
        return m0 * c + m1 * s, -m0 * s + m1 * c
    X = np.zeros((B, H, P, J, 4))
    X[..., 0], X[..., 2] = frame(S)
    X[..., 1], X[..., 3] = frame(U)
    return X


M3_CASES = [(1, 1, 2, False), (2, 1, 2, True), (37, 2, 4, False), (37, 1, 2, True),
            (64, 2, 2, True)]


@pytest.mark.parametrize("opts", [False, True], ids=["plain", "D-Z"])
@pytest.mark.parametrize("T,G,H,init", M3_CASES)
def test_mamba3_matches_its_definition(T, G, H, init, opts):
    x = mamba3_inputs(hash((T, G, H, init, opts)) % 1000, 2, T, G, H, 3, 4, D=opts, Z=opts)
    B, J, P = 2, 3, 4
    st = {}
    X0 = None
    if init:   # an entering state: S0 and the previous step's v k^T (any matrix), angle 0
        r = np.random.default_rng(5)
        st = dict(S0=r.standard_normal((B, H, P, 2 * J)), U0=r.standard_normal((B, H, P, 2 * J)))
        X0 = to_frame(st["S0"], np.zeros((B, H, J)), st["U0"])
    want_y, S, theta, U = mamba3_loop(**x, **st)
    ker = scancc.compile("mamba3", D=opts, Z=opts)
    y, X = ker(**x, initial_state=X0, output_final_state=True)
    np.testing.assert_allclose(y, want_y, rtol=1e-11, atol=1e-11)
    # the final state, in the rotating frame, against the loop's S, theta, U
    np.testing.assert_allclose(X, to_frame(S, theta, U), rtol=1e-11, atol=1e-11)
    # each part matters: no trapezoid (Trap -> +inf: lam = 1), no rotation, no bias all miss
    # (at T = 1 from a zero state q and k turn together and there is no previous step)
    for k, v in (("Trap", x["Trap"] + 30.0), ("Angles", 0.0 * x["Angles"]),
                 ("K_bias", 0.0 * x["K_bias"])):
        if T > 1 or k == "K_bias":
            y2, _ = ker(**{**x, k: v}, initial_state=X0, output_final_state=True)
            assert not np.allclose(y2, want_y, rtol=1e-6, atol=1e-6), k


def test_mamba3_state_carries_across_a_split():
    """T steps equal T/2 steps, then the rest from the returned state: the slot holding the
    last v k^T makes the trapezoid's first step of the second half right."""
    x = mamba3_inputs(7, 2, 20, 1, 2, 3, 4, D=True, Z=True)
    ker = scancc.compile("mamba3", D=True, Z=True)
    want, _ = ker(**x, output_final_state=True)
    first = {k: (v[:, :10] if k in ("Q", "K", "V", "Angles", "Z") else
                 v[:, :, :10] if k in ("ADT", "DT", "Trap") else v) for k, v in x.items()}
    second = {k: (v[:, 10:] if k in ("Q", "K", "V", "Angles", "Z") else
                  v[:, :, 10:] if k in ("ADT", "DT", "Trap") else v) for k, v in x.items()}
    y1, X1 = ker(**first, output_final_state=True)
    y2, _ = ker(**second, initial_state=X1, output_final_state=True)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), want, rtol=1e-12, atol=1e-12)
    y2z, _ = ker(**second, initial_state=0.0 * X1, output_final_state=True)
    assert not np.allclose(y2z, want[:, 10:], atol=1e-6)


# ---- every backend against the independent truths (float32) ------------------------------------

def _backend_case(fla, name, target, seed=11):
    """(kernel output, independent truth) for one float32 run at T = 37 with an initial
    state: fla's naive functions for hgrn2/rwkv6, the loop above for mamba3."""
    if name == "mamba3":
        x = mamba3_inputs(seed, 2, 37, 1, 2, 3, 4, D=True, Z=True)
        r = np.random.default_rng(seed)
        S0, U0 = r.standard_normal((2, 2, 4, 6)), r.standard_normal((2, 2, 4, 6))
        S0, U0 = S0.astype(np.float32).astype(np.float64), U0.astype(np.float32).astype(np.float64)
        want, *_ = mamba3_loop(**x, S0=S0, U0=U0)
        ker = scancc.compile("mamba3", target=target, D=True, Z=True)
        # angle 0: the frame is the identity, so X0 holds S0 and U0 exactly in float32
        y = ker(**{k: v.astype(np.float32) for k, v in x.items()},
                initial_state=to_frame(S0, np.zeros((2, 2, 3)), U0).astype(np.float32))
        return np.asarray(y, np.float64), want
    gla, rwkv6 = fla
    r = rng_for(name, "backend", seed)
    B, T, H, K, V = 2, 37, 2, 5, 6
    q, v, g = randn(r, "float32", B, T, H, K), randn(r, "float32", B, T, H, V), \
        log_gate(r, "float32", B, T, H, K)
    S0 = randn(r, "float32", B, H, K, V)
    if name == "hgrn2":
        x = dict(q=q, v=v, g=g)
        want, _ = gla(q, 1.0 - g.double().exp(), v, g, initial_state=S0)
    else:
        k, u = randn(r, "float32", B, T, H, K), randn(r, "float32", H, K)
        x = dict(r=q, k=k, v=v, w=g, u=u)
        want = th(rwkv6(th(q), th(k), th(v), th(g), u, initial_state=S0)[0])
    ker = scancc.compile(name, target=target)
    o = ker(**{k_: t.numpy() for k_, t in x.items()}, initial_state=S0.numpy())
    return np.asarray(o, np.float64), want.double().numpy()


@pytest.mark.parametrize("name", ["hgrn2", "rwkv6", "mamba3"])
def test_nki_matches(fla, name):
    got, want = _backend_case(fla, name, "nki")
    assert np.isfinite(got).all()   # outputs start NaN-poisoned: every element was written
    assert_close(got, want, "float32", T=37)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hgrn2", "rwkv6", "mamba3"])
def test_triton_matches(fla, name):
    got, want = _backend_case(fla, name, "triton")
    assert np.isfinite(got).all()
    assert_close(got, want, "float32", T=37)


@pytest.mark.parametrize("per_column", [False, True], ids=["shared", "per-column"])
def test_nki_dense_with_another_looped_dim(per_column):
    """mamba3's shape in small: a dense state with a looped dim beside its axis (the axis
    last), the matrix shared by the columns or varying along them; NKI against the
    reference at T = 45 over 16-step time tiles, with an entering state."""
    from scancc.ir import Builder, cos, dense, iota, reduce_sum, sin
    r = Builder(f"nki_dense_cols_{int(per_column)}")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    j, i, i2 = r.dim("pairs"), r.dim("comp", size=2), r.dim("comp_in", size=2)
    x, a = r.input("x", [b, t, d, j, i]), r.input("a", [b, t, j] if per_column else [b, t])
    # a rotation by a, damped: [[c, s], [-s, c]] * 0.9 built from iota one-hots
    diff = iota(i) - iota(i2)   # 0 on the diagonal, -1 at (0, 1), +1 at (1, 0)
    same = 1.0 - diff * diff
    m = (cos(a) * same - sin(a) * diff) * 0.9
    h = r.state("h", [b, d, j, i], dense(i, i2, m), inject=x)
    r.output("y", [b, t, d], reduce_sum(h * h, [j, i]))
    rec = r.build()
    rng = np.random.default_rng(int(per_column))
    x_ = {"x": rng.standard_normal((2, 45, 3, 3, 2)),
          "a": rng.standard_normal((2, 45, 3) if per_column else (2, 45))}
    h0 = rng.standard_normal((2, 3, 3, 2))
    want_y, want_h = scancc.compile(rec)(**x_, initial_state=h0, output_final_state=True)
    got_y, got_h = scancc.compile(rec, target="nki", time_tile=16)(
        **{k: v.astype(np.float32) for k, v in x_.items()}, initial_state=h0.astype(np.float32),
        output_final_state=True)
    assert_close(got_y, want_y, "float32", T=45)
    assert_close(got_h, want_h, "float32", "final state", T=45)


# ---- RWKV-6's chunked forms (the prev(S) readout rule) -----------------------------------------

_RWKV6_KER: dict = {}


def _rwkv6_triton(algorithm, **options):
    """The rwkv6 Triton kernel of one algorithm (cached: the interpreter compiles per source)."""
    key = (algorithm, tuple(sorted(options.items())))
    if key not in _RWKV6_KER:
        _RWKV6_KER[key] = scancc.compile("rwkv6", target="triton", algorithm=algorithm,
                                         **options)
    return _RWKV6_KER[key]


def test_rwkv6_takes_the_chunked_prev_rule():
    """The shared analysis accepts rwkv6's prev(S) readout only when asked (prev=True); the
    Triton forward lowers it, the consumers that do not (NKI, the chunked backward) see
    NotChunkable as before."""
    from scancc.backends.triton import chunked as triton_chunked
    from scancc.backends.triton import chunked_backward, staged
    from scancc.ir.passes import chunked
    rec = scancc.get("rwkv6").build()
    assert not chunked.analyze(rec).states
    cs = chunked.analyze(rec, prev=True).only()
    assert cs.kind.value == "diagonal" and cs.reads_prev
    assert triton_chunked.applies(rec)[0] and staged.applies(rec)[0]
    assert not chunked_backward.applies(rec)[0]


@pytest.mark.parametrize("algorithm", ["chunked", "staged"])
@pytest.mark.parametrize("T,init", [(37, True), (16, False), (50, True)])
def test_rwkv6_chunked_matches_fla_naive(fla, algorithm, T, init):
    """rwkv6 on Triton's chunked forms (16-step chunks: T = 37, 50 cross two and three chunk
    boundaries, T = 16 is one full chunk) against fla's naive rwkv6 and the reference, at
    exact float32 dots ("ieee") and the default tensor-core precision ("auto")."""
    _, rwkv6 = fla
    r = rng_for("rwkv6-chunked", T, init)
    B, H, K, V = 2, 2, 5, 6
    rr, k = randn(r, "float32", B, T, H, K), randn(r, "float32", B, T, H, K)
    v, w = randn(r, "float32", B, T, H, V), log_gate(r, "float32", B, T, H, K)
    u = randn(r, "float32", H, K)
    S0 = randn(r, "float32", B, H, K, V) if init else None
    want_o, want_S = rwkv6(th(rr), th(k), th(v), th(w), u, initial_state=S0,
                           output_final_state=True)
    want_o = th(want_o).double().numpy()
    x = {n: t.numpy() for n, t in dict(r=rr, k=k, v=v, w=w, u=u).items()}
    ref_o = np.asarray(scancc.compile("rwkv6")(
        **{n: a.astype(np.float64) for n, a in x.items()},
        initial_state=None if S0 is None else S0.double().numpy()))
    assert_close(ref_o, want_o, "float32", T=T)
    for prec in ("ieee", "auto"):
        o, S = _rwkv6_triton(algorithm, dot_precision=prec)(
            **x, initial_state=None if S0 is None else S0.numpy(), output_final_state=True)
        o, S = np.asarray(o, np.float64), np.asarray(S, np.float64)
        assert np.isfinite(o).all()
        assert_close(o, want_o, "float32", f"{algorithm}/{prec} output", T=T)
        assert_close(S, want_S.double().numpy(), "float32", f"{algorithm}/{prec} state", T=T)
        if prec == "ieee":  # exact dots: as close to the reference as the recurrent kernel
            np.testing.assert_allclose(o, ref_o, rtol=0, atol=2e-5 * np.abs(ref_o).max())
    # the bonus u is in the kernel's output: perturbed, it misses the truth
    got = np.asarray(_rwkv6_triton(algorithm, dot_precision="ieee")(
        **{**x, "u": x["u"] + 1.0}, initial_state=None if S0 is None else S0.numpy()))
    assert_misses(got, want_o, "float32", "rwkv6 chunked with u + 1")


def _rwkv6_edge_inputs(seed, T=40):
    r = np.random.default_rng(seed)
    B, H, K, V = 1, 2, 5, 6
    x = dict(r=r.standard_normal((B, T, H, K)), k=r.standard_normal((B, T, H, K)),
             v=r.standard_normal((B, T, H, V)),
             w=-np.logaddexp(0.0, -(r.standard_normal((B, T, H, K)) + 2.0)),
             u=r.standard_normal((H, K)))
    return {n: a.astype(np.float32) for n, a in x.items()}, r


@pytest.mark.parametrize("algorithm", ["chunked", "staged"])
@pytest.mark.parametrize("name,step", [("k", 5), ("k", 15), ("v", 16), ("w", 20), ("r", 31),
                                       ("w", 0)])
def test_rwkv6_chunked_nan_placement(algorithm, name, step):
    """A NaN in one element of k, v, w or r at one step: the chunked output is non-finite
    exactly where the reference's is (prev(S): k, v, w at step s poison steps > s through the
    state, and step s itself only through the bonus term (k, v) or the readout's r)."""
    x, r = _rwkv6_edge_inputs(step)
    a = x[name].copy()
    idx = (0, step, int(r.integers(2))) + tuple(int(r.integers(n)) for n in a.shape[3:])
    a[idx] = np.nan
    x[name] = a
    ref = np.asarray(scancc.compile("rwkv6")(**{n: v.astype(np.float64) for n, v in x.items()}))
    got = np.asarray(_rwkv6_triton(algorithm, dot_precision="ieee")(**x), np.float64)
    fin = np.isfinite(ref)
    assert not fin.all(), "the NaN reaches no output"
    np.testing.assert_array_equal(np.isfinite(got), fin)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=0, atol=2e-5 * np.abs(ref[fin]).max())


@pytest.mark.parametrize("algorithm", ["chunked", "staged"])
@pytest.mark.parametrize("gate", [-np.inf, -200.0])
def test_rwkv6_chunked_hard_resets(algorithm, gate):
    """Log-decays of -inf (a decay of exactly 0) and -200 (below float32's smallest normal)
    at steps 0, 7, 16 (a chunk's first step) and 31 (its last) in some key rows: finite and
    within the float32 table against the reference, with an entering state."""
    x, r = _rwkv6_edge_inputs(7)
    S0 = r.standard_normal((1, 2, 5, 6)).astype(np.float32)
    for t in (0, 7, 16, 31):
        x["w"][0, t, int(r.integers(2)), r.integers(5, size=2)] = gate
    ref = np.asarray(scancc.compile("rwkv6")(**{n: v.astype(np.float64) for n, v in x.items()},
                                             initial_state=S0.astype(np.float64)))
    got = np.asarray(_rwkv6_triton(algorithm, dot_precision="ieee")(**x, initial_state=S0),
                     np.float64)
    assert np.isfinite(ref).all() and np.isfinite(got).all()
    assert_close(got, ref, "float32", T=40)
