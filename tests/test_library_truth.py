"""The standard library on the reference backend against the published reference code of the
recurrences' authors, called (not copied): flash-linear-attention's naive recurrences (fla-core)
and the PyTorch Mamba / Mamba2 scans in transformers (torch ports of mamba_ssm's selective_scan_ref
and SSD chunk scan). test_reference_closed_forms.py checks the same recurrences against
closed forms derived in the test; this file checks the conventions (layouts, scales, gate signs,
group mapping, dt handling, state layout) against code we did not write.

Inputs are drawn in float32 and widened, so every reference sees exactly the values scancc sees
whatever casts it does on entry; each comparison also runs scancc once on a perturbed input and
requires a miss, so a kernel that ignores its inputs cannot pass."""
import types
import warnings
import zlib

import numpy as np
import pytest
import scancc
from scancc.testing import assert_close, quiet_transformers, within

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

DTYPES = ["float64", "float32"]
FLA_SKIP = "fla-core (the [test] extra) is not installed"
TF_SKIP = "transformers (the [test] extra) is not installed"


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))  # hash() is salted per run


def arr(x, dtype):
    """float32-representable values as a torch tensor of ``dtype``."""
    return torch.from_numpy(np.asarray(x, np.float32)).to(getattr(torch, dtype))


def randn(r, dtype, *shape):
    return arr(r.standard_normal(shape), dtype)


def log_gate(r, dtype, *shape):
    """log-space decays logsigmoid(n + 2): mostly near 0, some strong (as the library hints)."""
    return arr(-np.logaddexp(0.0, -(r.standard_normal(shape) + 2.0)), dtype)


def unit_rows(r, dtype, *shape):
    x = r.standard_normal(shape)
    return arr(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype)


def l2n(x):
    """fla's in-kernel normalization, x / sqrt(sum x^2 + 1e-6) (its l2norm is Triton-only)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def bump_last(x, dim):
    """x with +1 on its last time step (dim): changes the last output and the final state."""
    y = x.clone()
    y.select(dim, -1).add_(1.0)
    return y


def assert_misses(got, ref, dtype, what):
    ok, rel, _ = within(got, ref, dtype)
    assert not ok, f"{what}: a perturbed input still matches the reference (rel {rel:.1e})"


def assert_dtypes(o, S, dtype):
    """The API's contract: output in the input dtype, final state float64 for float64 inputs
    and float32 otherwise."""
    assert o.dtype == getattr(torch, dtype)
    assert S is None or S.dtype == (torch.float64 if dtype == "float64" else torch.float32)


def run(name, init=None, **kw):
    return scancc.compile(name)(initial_state=init, output_final_state=True, **kw)


# ---- flash-linear-attention -----------------------------------------------------------------
# fla's naive functions cast every input and the state to float32 on entry (`.float()`) and
# accumulate in float32 whatever the input dtype, so the reference itself carries float32
# rounding: all fla comparisons use the float32 entry of the tolerance table. The float64 runs
# still exercise scancc's float64 path (dtypes checked); float64 accuracy is checked against the
# closed forms in test_reference_closed_forms.py.

@pytest.fixture(scope="module")
def fla():
    with warnings.catch_warnings():  # "Triton is not supported on current platform" on CPU
        warnings.simplefilter("ignore")
        pytest.importorskip("fla", reason=FLA_SKIP)
        from fla.ops.delta_rule.naive import delta_rule_recurrence
        from fla.ops.gated_delta_rule import naive_recurrent_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.hgrn.naive import naive_recurrent_hgrn
        from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
        from fla.ops.retention.naive import naive_retention
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    return types.SimpleNamespace(
        linear_attn=naive_recurrent_linear_attn, retnet=naive_retention,
        simple_gla=naive_recurrent_simple_gla, gla=naive_recurrent_gla, hgrn=naive_recurrent_hgrn,
        delta_net=delta_rule_recurrence, gated_delta_net=naive_recurrent_gated_delta_rule)


def th(x):
    """[B, T, H, ...] <-> [B, H, T, ...]: naive_retention and delta_rule_recurrence take
    head-major layouts while scancc follows fla's public [B, T, H, K]."""
    return x.transpose(1, 2)


# a non-default scale rides on the runs with an initial state, for the functions that take one
# (fla's naive_recurrent_gla has no scale argument: fixed K^-1/2)
LA_CASES = [(name, T, init, 0.4 if init and name != "gla" else None)
            for name in ("linear_attn", "simple_gla", "gla") for T in (1, 2, 63, 257)
            for init in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,T,init,scale", LA_CASES)
def test_linear_attention_family_matches_fla(fla, name, T, init, scale, dtype):
    r = rng_for(name, T, scale, init, dtype)
    B, H, K, V = 2, 3, 5, 7
    q, k, v = randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, V)
    S0 = randn(r, dtype, B, H, K, V) if init else None
    gate = {"simple_gla": (B, T, H), "gla": (B, T, H, K)}.get(name)
    kw = {} if gate is None else {"g": log_gate(r, dtype, *gate)}
    # naive_recurrent_linear_attn adds initial_state to its float32 state out of place and then
    # fails on a float64 one; float32 is lossless here (inputs are float32-representable)
    ref_args = dict(initial_state=None if S0 is None else S0.float(), output_final_state=True)
    if name != "gla":
        ref_args["scale"] = scale
    want_o, want_S = getattr(fla, name)(q, k, v, *kw.values(), **ref_args)
    o, S = run(name, S0, q=q, k=k, v=v, scale=scale, **kw)
    assert_dtypes(o, S, dtype)
    assert_close(o, want_o, "float32")
    assert_close(S, want_S, "float32", "final state")
    o2, _ = run(name, S0, q=q, k=k, v=bump_last(v, 1), scale=scale, **kw)
    assert_misses(o2, want_o, "float32", name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 63, 257])
def test_retnet_matches_fla_retention(fla, T, dtype):
    # naive_retention returns no state; the state is checked by carrying it: scancc over
    # [0, T/2) then [T/2, T) from the carried state must reproduce fla's output over [0, T)
    r = rng_for("retnet", T, dtype)
    B, H, K, V = 2, 4, 5, 7   # 4 heads: gamma_h = 1 - 2^(-5-h) differs per head
    q, k, v = randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, V)
    want = th(fla.retnet(th(q), th(k), th(v)))
    o, S = run("retnet", q=q, k=k, v=v)
    assert_dtypes(o, S, dtype)
    assert_close(o, want, "float32")
    if T > 1:
        s = T // 2
        o1, S1 = run("retnet", q=q[:, :s], k=k[:, :s], v=v[:, :s])
        o2, _ = run("retnet", S1, q=q[:, s:], k=k[:, s:], v=v[:, s:])
        assert_close(torch.cat([o1, o2], 1), want, "float32", "output with a carried state")
    assert_misses(run("retnet", q=q, k=k, v=bump_last(v, 1))[0], want, "float32", "retnet")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 2, 64, 257])
def test_hgrn_matches_fla(fla, T, init, dtype):
    r = rng_for("hgrn", T, init, dtype)
    B, D = 2, 7
    x, g = randn(r, dtype, B, T, D), log_gate(r, dtype, B, T, D)
    h0 = randn(r, dtype, B, D) if init else None
    want_o, want_h = fla.hgrn(x, g, initial_state=h0, output_final_state=True)
    o, h = run("hgrn", h0, x=x, g=g)
    assert_dtypes(o, h, dtype)
    assert_close(o, want_o, "float32")
    assert_close(h, want_h, "float32", "final state")
    assert_misses(run("hgrn", h0, x=bump_last(x, 1), g=g)[0], want_o, "float32", "hgrn")


# in-kernel L2 normalization at a short and a long length only
DELTA_CASES = [(T, l2) for T in (1, 2, 63, 257) for l2 in (False, True) if T in (2, 257) or not l2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T,l2_in_kernel", DELTA_CASES)
@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net"])
def test_delta_rules_match_fla(fla, name, T, l2_in_kernel, init, dtype):
    r = rng_for(name, T, init, l2_in_kernel, dtype)
    B, H, K, V = 2, 3, 5, 7
    if l2_in_kernel:  # raw q, k to scancc; fla's naive functions never normalize: feed them l2n
        q, k = randn(r, dtype, B, T, H, K), randn(r, dtype, B, T, H, K)
        rq, rk = l2n(q), l2n(k)
    else:
        q, k = unit_rows(r, dtype, B, T, H, K), unit_rows(r, dtype, B, T, H, K)
        rq, rk = q, k
    v = randn(r, dtype, B, T, H, V)
    beta = arr(r.uniform(0.05, 0.95, (B, T, H)), dtype)
    S0 = randn(r, dtype, B, H, K, V) if init else None
    kw = dict(q=q, k=k, v=v, beta=beta, use_qk_l2norm_in_kernel=l2_in_kernel)
    if name == "delta_net":   # head-major layout, fixed K^-1/2 scale
        want_o, want_S = fla.delta_net(th(rq), th(rk), th(v), th(beta), initial_state=S0,
                                       output_final_state=True)
        want_o, scale = th(want_o), None
    else:                     # a non-default scale, as its naive function takes one
        kw["g"], scale = log_gate(r, dtype, B, T, H), 0.3
        want_o, want_S = fla.gated_delta_net(rq, rk, v, beta, kw["g"], scale=scale,
                                             initial_state=S0, output_final_state=True)
    o, S = run(name, S0, scale=scale, **kw)
    assert_dtypes(o, S, dtype)
    assert_close(o, want_o, "float32")
    assert_close(S, want_S, "float32", "final state")
    assert_misses(run(name, S0, scale=scale, **{**kw, "v": bump_last(v, 1)})[0], want_o,
                  "float32", name)


# ---- transformers' Mamba / Mamba2 torch scans -------------------------------------------------

@pytest.fixture(scope="module")
def tf():
    pytest.importorskip("transformers", reason=TF_SKIP)
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    return types.SimpleNamespace(mamba=mamba_selective_scan, mamba2=mamba2_chunk_scan)


def mamba_inputs(r, dtype, b, d, n, T, G, opts):
    """u, delta [b, d, T], A [d, n], B, C [b, n, T] (G None) or [b, G, n, T], optional D, z,
    delta_bias; delta > 0 when no softplus follows (the discretization step)."""
    bc = (b, n, T) if G is None else (b, G, n, T)
    delta = randn(r, dtype, b, d, T) if opts else arr(r.uniform(0.01, 0.2, (b, d, T)), dtype)
    x = dict(u=randn(r, dtype, b, d, T), delta=delta, A=-torch.exp(randn(r, dtype, d, n)),
             B=randn(r, dtype, *bc), C=randn(r, dtype, *bc))
    if opts:
        x.update(D=randn(r, dtype, d), z=randn(r, dtype, b, d, T),
                 delta_bias=randn(r, dtype, d), delta_softplus=True)
    return x


def tf_mamba(scan, G, x, **extra):
    """``scan`` (transformers' mamba_selective_scan) on scancc's inputs ``x``. It has no groups:
    run it per group on that group's channels, which read group c // (d/G) as mamba_ssm's
    selective_scan_ref repeats B, C ("G N -> (G H) N")."""
    def call(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        with quiet_transformers():
            return scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=True, **extra)
    if G is None:
        return call(**x)
    d, per = x["u"].shape[1], x["u"].shape[1] // G
    chan = ("u", "delta", "A", "D", "z", "delta_bias")
    outs = [call(**{k: (v[:, g * per:(g + 1) * per] if k in ("u", "delta", "z") else
                        v[g * per:(g + 1) * per] if k in chan else
                        v[:, g] if k in ("B", "C") else v) for k, v in x.items()})
            for g in range(G)]
    assert sum(o.shape[1] for o, _ in outs) == d
    return torch.cat([o for o, _ in outs], 1), torch.cat([s for _, s in outs], 1)


# G None: B, C [b, n, T]; G = 1: the explicit group dim of size 1; G = 3 of 6 channels
MAMBA_CASES = [(T, G) for T in (1, 2, 63, 257) for G in (None, 1, 3) if G != 1 or T == 63]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [False, True], ids=["plain", "D-z-bias-softplus"])
@pytest.mark.parametrize("T,G", MAMBA_CASES)
def test_mamba_matches_transformers_selective_scan(tf, T, G, opts, dtype):
    # transformers computes in the input dtype (its .float() casts of B and u are lossless on
    # float32-representable inputs), so float64 inputs compare at the float64 entry
    r = rng_for("mamba", T, G, opts, dtype)
    x = mamba_inputs(r, dtype, 2, 6, 5, T, G, opts)
    want_y, want_s = tf_mamba(tf.mamba, G, x)
    y, s = run("mamba", **x)
    assert_dtypes(y, s, dtype)
    assert_close(y, want_y, dtype)
    assert_close(s, want_s, dtype, "final state")
    # transformers' scan takes no initial state: check scancc's by carrying it across a split
    if T > 1:
        cut = T // 2
        def part(a, b):
            return {k: (v[..., a:b] if k in ("u", "delta", "z", "B", "C") else v)
                    for k, v in x.items()}
        y1, s1 = run("mamba", **part(0, cut))
        y2, s2 = run("mamba", s1, **part(cut, T))
        assert_close(torch.cat([y1, y2], -1), want_y, dtype, "output with a carried state")
        assert_close(s2, want_s, dtype, "final state after a carried state")
    assert_misses(run("mamba", **{**x, "u": bump_last(x["u"], -1)})[0], want_y, dtype, "mamba")


@pytest.mark.slow
def test_mamba_matches_transformers_associative_scan(tf):
    # the second reference: transformers' associative-scan path (a parallel prefix scan, a
    # different summation order) is only taken while dynamo traces the function, hence the
    # eager-backend torch.compile; it costs seconds of tracing, so one awkward length only
    r = rng_for("mamba-assoc")
    x = mamba_inputs(r, "float64", 2, 6, 5, 37, None, True)
    with warnings.catch_warnings():  # dynamo's notes about transformers' lru_cache helpers
        warnings.simplefilter("ignore")
        want_y, want_s = tf_mamba(torch.compile(tf.mamba, backend="eager", fullgraph=True),
                                  None, x, use_associative_scan=True)
    seq_y, _ = tf_mamba(tf.mamba, None, x)
    assert not torch.equal(want_y, seq_y), "the associative path was not taken"
    y, s = run("mamba", **x)
    assert_close(y, want_y, "float64")
    assert_close(s, want_s, "float64", "final state")
    assert_misses(run("mamba", **{**x, "u": bump_last(x["u"], -1)})[0], want_y, "float64",
                  "mamba")


# mamba2_chunk_scan casts x, B, C and dt to float32 on entry and returns float32 whatever the
# input dtype, so its comparisons use the float32 entry of the tolerance table.
# (T, chunk_size): chunks that divide T and ones that leave a padded last chunk.
M2_T_CHUNK = [(1, 8), (2, 2), (63, 16), (64, 16), (257, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [False, True], ids=["plain", "D-bias-softplus-limit-init"])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T,chunk", M2_T_CHUNK)
def test_mamba2_matches_transformers_chunk_scan(tf, T, chunk, G, opts, dtype):
    r = rng_for("mamba2", T, chunk, G, opts, dtype)
    b, H, P, N = 2, 4, 3, 5
    x = dict(x=randn(r, dtype, b, T, H, P), A=-torch.exp(randn(r, dtype, H)),
             B=randn(r, dtype, b, T, G, N), C=randn(r, dtype, b, T, G, N))
    ref, opt, h0 = {}, {}, None
    if opts:   # raw dt through bias + softplus, then a clamp that bites on both sides
        x.update(dt=randn(r, dtype, b, T, H), D=randn(r, dtype, H), dt_bias=randn(r, dtype, H))
        opt = dict(dt_softplus=True, dt_limit=(0.2, 0.9))
        h0 = randn(r, dtype, b, H, P, N)
        ref = dict(D=x["D"], dt_bias=x["dt_bias"], initial_states=h0, **opt)
    else:      # positive dt: no softplus, and transformers' default dt_limit (0, inf) is inert
        x["dt"] = arr(r.uniform(0.01, 0.2, (b, T, H)), dtype)
    with quiet_transformers():
        want_y, want_h = tf.mamba2(x["x"], x["dt"], x["A"], x["B"], x["C"], chunk,
                                   return_final_states=True, **ref)
    y, h = run("mamba2", h0, **x, **opt)
    assert_dtypes(y, h, dtype)
    assert_close(y, want_y, "float32")
    assert_close(h, want_h, "float32", "final state")
    assert_misses(run("mamba2", h0, **{**x, "x": bump_last(x["x"], 1)}, **opt)[0], want_y,
                  "float32", "mamba2")


def test_mamba2_zero_lower_dt_limit_clamps_negative_dt(tf):
    r = rng_for("mamba2-dt0")
    b, T, H, P, G, N = 1, 9, 2, 3, 1, 4
    x, A = randn(r, "float64", b, T, H, P), -torch.exp(randn(r, "float64", H))
    B, C = randn(r, "float64", b, T, G, N), randn(r, "float64", b, T, G, N)
    dt = randn(r, "float64", b, T, H)            # about half negative, no softplus
    with quiet_transformers():
        want = tf.mamba2(x, dt, A, B, C, 4, dt_limit=(0.0, 0.5))
    # the reference is the clamp: scancc on dt clamped by hand matches it
    assert_close(run("mamba2", x=x, dt=dt.clamp(0.0, 0.5), A=A, B=B, C=C)[0], want, "float32")
    got = run("mamba2", x=x, dt=dt, A=A, B=B, C=C, dt_limit=(0.0, 0.5))[0]
    assert_close(got, want, "float32")
