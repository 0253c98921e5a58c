"""The dplr transition kind, h <- (Diag(w) + a b^T) h + inject along an axis, and the library
recurrences built on it (rwkv7, kda).

Truth is independent of scancc: a hand-written NumPy loop with explicit K x K matrices for the
kind, flash-linear-attention's naive recurrences (fla-core: ``dplr_recurrence``, the naive
generalized delta rule that fla's rwkv7 calls, and ``naive_recurrent_kda``) for the library,
torch.autograd.gradcheck (finite differences) and torch autograd through fla's naive
functions for gradients. Backends NaN-poison their outputs, so an element a kernel never
writes fails every comparison here (``scancc.testing.errors`` is inf on a non-finite output).
"""
import importlib.util
import pathlib
import warnings

import numpy as np
import pytest

import scancc
import scancc.autograd as ag
from scancc.backends import get
from scancc.ir import (Builder, IRError, Kind, VerifyError, dplr, exp, householder,
                       parse_recurrence, reduce_sum)
from scancc.ir.verify import verify
from scancc.ir.passes import derive
from scancc.testing import assert_close, sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

# the helpers of the library-truth tests (rng_for, arr, randn, log_gate, unit_rows, l2n,
# bump_last, assert_misses, assert_dtypes, run, th), loaded from their file, not copied
_spec = importlib.util.spec_from_file_location(
    "_library_truth_helpers", pathlib.Path(__file__).with_name("test_library_truth.py"))
LT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(LT)


# ---- the kind against a NumPy loop with explicit matrices ------------------------------------

def kind_rec(with_w=True, extra_dim=False):
    """S [batch, key, value(, chan)] = dplr(key, a, b, w) + x; w and b vary along the value
    dim too (a different rank-1 matrix per column), a along the key only; y = S."""
    r = Builder("dplr_probe" + ("_w" if with_w else "") + ("_c" if extra_dim else ""))
    bt, t, k, v = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key"), r.dim("value")
    sd = [bt, k, v] + ([r.dim("chan")] if extra_dim else [])
    x = r.input("x", [bt, t] + sd[1:])
    a = r.input("a", [bt, t, k])
    if extra_dim:  # operands along the axis only: NKI steps one column of (value, chan) at a time
        bb, w = r.input("b", [bt, t, k]), r.input("w", [bt, t, k]) if with_w else None
    else:
        bb, w = r.input("b", [bt, t, k, v]), r.input("w", [bt, t, k, v]) if with_w else None
    S = r.state("S", sd, dplr(k, a=a, b=bb, w=w), inject=x)
    r.output("y", [bt, t] + sd[1:], S)
    return r.build()


def numpy_loop(x, a, b, w, S0):
    """The definition with explicit matrices: S[:, col] = (diag(w) + outer(a, b)) S[:, col] + x,
    one K x K matrix per (batch, column); x [B, T, K, C...], a [B, T, K], b and w [B, T, K(, C)]."""
    B, T, K = a.shape
    S = S0.reshape(B, K, -1).copy()
    C = S.shape[-1]
    bb = b.reshape(B, T, K, -1) * np.ones((1, 1, 1, C))
    ww = np.ones((B, T, K, C)) if w is None else w.reshape(B, T, K, -1) * np.ones((1, 1, 1, C))
    xs = x.reshape(B, T, K, C)
    ys = np.empty((B, T, K, C))
    for t in range(T):
        for i in range(B):
            for c in range(C):
                M = np.diag(ww[i, t, :, c]) + np.outer(a[i, t], bb[i, t, :, c])
                S[i, :, c] = M @ S[i, :, c] + xs[i, t, :, c]
        ys[:, t] = S
    return ys.reshape(x.shape), S.reshape(S0.shape)


def kind_inputs(rec, sizes, seed=0):
    """Inputs that keep the scan stable: |w| < 1, a and b of norm ~0.7."""
    rng = np.random.default_rng(seed)
    x = {}
    for inp in rec.inputs:
        shape = tuple(sizes[d] for d in inp.dims)
        if inp.name == "w":
            x["w"] = rng.uniform(0.3, 0.95, shape)
        elif inp.name in ("a", "b"):
            x[inp.name] = 0.7 * rng.standard_normal(shape) / np.sqrt(sizes["key"])
        else:
            x[inp.name] = rng.standard_normal(shape)
    return {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}


def run_backend(target, rec, x, sizes, S0, options=None):
    if target == "reference":
        res = get(target).run(rec, x, sizes, {"S": S0}, True, {})
        return np.asarray(res.outputs["y"]), np.asarray(res.final_states["S"])
    tx = {k: torch.from_numpy(v.astype(np.float32)) for k, v in x.items()}
    res = get(target).run(rec, tx, sizes, {"S": torch.from_numpy(S0.astype(np.float32))}, True,
                          options or {})
    def f64(t):  # Triton returns torch tensors, the NKI emulator NumPy arrays
        return t.detach().double().numpy() if hasattr(t, "detach") else np.asarray(t, np.float64)
    return f64(res.outputs["y"]), f64(res.final_states["S"])


@pytest.mark.parametrize("with_w", [True, False])
@pytest.mark.parametrize("extra_dim", [False, True])
def test_reference_is_the_numpy_loop(with_w, extra_dim):
    rec = kind_rec(with_w, extra_dim)
    sizes = {"batch": 2, "time": 13, "key": 5, "value": 3, "chan": 2}
    x = kind_inputs(rec, sizes)
    S0 = np.random.default_rng(1).standard_normal(tuple(sizes[d] for d in rec.states[0].dims))
    y, S = run_backend("reference", rec, x, sizes, S0)
    want_y, want_S = numpy_loop(x["x"], x["a"], x["b"], x.get("w"), S0)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S, want_S, rtol=1e-12, atol=1e-12)
    if extra_dim:  # a and b enter as a b^T, not b a^T (a different recurrence)
        y2, _ = numpy_loop(x["x"], x["b"], x["a"], x.get("w"), S0)
        assert not np.allclose(y, y2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", ["triton", "nki"])
@pytest.mark.parametrize("with_w,extra_dim", [(True, False), (False, True)])
def test_backends_are_the_numpy_loop(target, with_w, extra_dim):
    """The recurrent rules (Triton registers; NKI per step, the axis last) against the loop,
    T = 37 (Triton's 32-step chunks: one full, one ragged), float32 inputs."""
    rec = kind_rec(with_w, extra_dim)
    sizes = {"batch": 2, "time": 37, "key": 5, "value": 3, "chan": 2}
    x = kind_inputs(rec, sizes, seed=2)
    S0 = np.random.default_rng(3).standard_normal(tuple(sizes[d] for d in rec.states[0].dims))
    S0 = S0.astype(np.float32).astype(np.float64)
    y, S = run_backend(target, rec, x, sizes, S0)
    want_y, want_S = numpy_loop(x["x"], x["a"], x["b"], x.get("w"), S0)
    assert_close(y, want_y, "float32", f"{target} output")
    assert_close(S, want_S, "float32", f"{target} final state")


def test_gated_householder_is_a_dplr():
    """alpha (I - beta k k^T) h (the householder kind) equals
    dplr(a=-alpha beta k, b=k, w=alpha) on the reference, to rounding."""
    def build(as_dplr):
        r = Builder("hh_as_dplr" if as_dplr else "hh")
        bt, t, k, v = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key"), r.dim("value")
        kk, x = r.input("k", [bt, t, k]), r.input("x", [bt, t, k, v])
        beta, g = r.input("beta", [bt, t]), r.input("g", [bt, t])
        al = exp(g)
        tr = dplr(k, a=-(al * beta * kk), b=kk, w=al) if as_dplr else householder(k, kk, beta, al)
        S = r.state("S", [bt, k, v], tr, inject=x)
        r.output("y", [bt, t, k, v], S)
        return r.build()
    sizes = {"batch": 2, "time": 11, "key": 4, "value": 3}
    hints = {"k": "unit_rows", "beta": "unit_interval", "g": "logsigmoid"}
    x = sample_inputs(build(False), sizes, 0, hints)
    S0 = sample_state(build(False), sizes, 1)
    ref = get("reference")
    want = ref.run(build(False), x, sizes, S0, True, {})
    got = ref.run(build(True), x, sizes, S0, True, {})
    np.testing.assert_allclose(got.outputs["y"], want.outputs["y"], rtol=1e-12, atol=1e-12)


# ---- IR: text form, verifier errors, adjoint structure ----------------------------------------

def test_text_form_round_trips():
    rec = kind_rec(True)
    text = str(rec)
    assert "dplr(axis=key, w=w, a=a, b=b)" in text
    assert parse_recurrence(text) == rec


def _bad(**ops):
    r = Builder("bad_dplr")
    bt, t, k, v = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key"), r.dim("value")
    r.dim("other")
    x = r.input("x", [bt, t, k, v])
    given = {n: r.input(n, [bt, t] + dims) for n, dims in ops.items()}
    for n in ("a", "b"):   # the other operands well formed
        if n not in given:
            given[n] = r.input(n, [bt, t, k])
    S = r.state("S", [bt, k, v], dplr(k, **given), inject=x)
    r.output("y", [bt, t, k, v], S)
    return r


@pytest.mark.parametrize("ops,msg", [
    ({"a": ["value"]}, "dplr a must vary along the axis 'key'"),
    ({"b": []}, "dplr b must vary along the axis 'key'"),
    ({"w": ["key", "other"]}, "not among"),
    ({"a": ["key", "other"]}, "not among"),
])
def test_verifier_rejects_bad_operands(ops, msg):
    r = _bad(**ops)
    with pytest.raises(VerifyError, match=msg):
        r.build()


def test_verifier_rejects_missing_and_unknown_operands():
    from scancc.ir import Transition
    r = Builder("bad_ops")
    bt, t, k = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key")
    x = r.input("x", [bt, t, k])
    S = r.state("S", [bt, k], Transition(Kind.DPLR, k, (("a", x),)), inject=x)
    r.output("y", [bt, t, k], S)
    with pytest.raises(VerifyError, match="dplr transition needs operand 'b'"):
        r.build()
    r = Builder("bad_ops2")
    bt, t, k = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key")
    x = r.input("x", [bt, t, k])
    S = r.state("S", [bt, k], Transition(Kind.DPLR, k, (("a", x), ("b", x), ("k", x))), inject=x)
    r.output("y", [bt, t, k], S)
    with pytest.raises(VerifyError, match="takes no operand 'k'"):
        r.build()
    with pytest.raises(IRError, match="expected a dim name"):
        dplr(3, a=x, b=x)


def test_the_backward_state_is_the_transpose():
    """The adjoint of a dplr state is a dplr with a and b swapped (Diag(w) + b a^T)."""
    rec = kind_rec(True)
    bwd = derive(rec).backward
    t = bwd.states[0].transition
    assert t.kind is Kind.DPLR
    assert dict(t.operands)["a"] == dict(rec.states[0].transition.operands)["b"]
    assert dict(t.operands)["b"] == dict(rec.states[0].transition.operands)["a"]
    verify(bwd)


# ---- gradients --------------------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 2)  # T=5: chunks of 2, 2, 1 (boundaries crossed)


@pytest.mark.parametrize("with_w", [True, False])
def test_gradcheck_of_the_kind(small_chunks, with_w):
    """Every input and the initial state, against finite differences (float64)."""
    rec = kind_rec(with_w)
    ker = scancc.compile(rec)
    sizes = {"batch": 1, "time": 5, "key": 3, "value": 2}
    x = {k: torch.tensor(v, requires_grad=True) for k, v in kind_inputs(rec, sizes, 4).items()}
    h0 = torch.tensor(np.random.default_rng(5).standard_normal((1, 3, 2)), requires_grad=True)
    names = list(x)

    def f(*ts):
        out, fin = ker(**dict(zip(names, ts)), initial_state=ts[-1], output_final_state=True)
        return out, fin
    assert torch.autograd.gradcheck(f, tuple(x.values()) + (h0,), atol=1e-8, rtol=1e-6)


# ---- the library against fla's naive recurrences ----------------------------------------------

@pytest.fixture(scope="module")
def fla():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("fla", reason=LT.FLA_SKIP)
        from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
        from fla.ops.kda.naive import naive_recurrent_kda
    return dplr_recurrence, naive_recurrent_kda


def rwkv7_inputs(r, dtype, B, T, H, K, V):
    """fla's rwkv7 convention: a = -kk, b = kk * iclr (kk unit rows, iclr in (0, 1)), so the
    transition Diag(exp(w)) - kk (kk iclr)^T is a contraction; w a log decay."""
    kk = LT.unit_rows(r, "float64", B, T, H, K)
    iclr = torch.from_numpy(r.uniform(0.05, 0.95, (B, T, H, K)))
    return dict(r=LT.randn(r, dtype, B, T, H, K), w=LT.log_gate(r, dtype, B, T, H, K),
                k=LT.randn(r, dtype, B, T, H, K), v=LT.randn(r, dtype, B, T, H, V),
                a=LT.arr(-kk, dtype), b=LT.arr(kk * iclr, dtype))


@pytest.mark.parametrize("dtype", LT.DTYPES)
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 2, 63, 257])
def test_rwkv7_matches_fla_dplr_recurrence(fla, T, init, dtype):
    dplr_recurrence, _ = fla
    r = LT.rng_for("rwkv7", T, init, dtype)
    B, H, K, V = 2, 3, 5, 7
    x = rwkv7_inputs(r, dtype, B, T, H, K, V)
    S0 = LT.randn(r, dtype, B, H, K, V) if init else None
    # dplr_recurrence is head-major, scales q by K^-1/2 (our default) and leaves a in its
    # dtype (float32 is lossless: the inputs are float32-representable)
    th = lambda t: LT.th(t.float())  # noqa: E731
    want_o, want_S = dplr_recurrence(*(th(x[n]) for n in ("r", "k", "v", "a", "b", "w")),
                                     initial_state=None if S0 is None else S0.float().clone())
    want_o = th(want_o)
    o, S = LT.run("rwkv7", S0, **x)
    LT.assert_dtypes(o, S, dtype)
    assert_close(o, want_o, "float32")
    assert_close(S, want_S, "float32", "final state")
    LT.assert_misses(LT.run("rwkv7", S0, **{**x, "v": LT.bump_last(x["v"], 1)})[0], want_o,
                     "float32", "rwkv7")
    # a and b are fla's (not swapped): exchanging them changes the result
    if T > 2:
        LT.assert_misses(LT.run("rwkv7", S0, **{**x, "a": x["b"], "b": x["a"]})[0], want_o,
                         "float32", "rwkv7 a <-> b")


def test_rwkv7_scale_is_applied(fla):
    """scale=1.0 (chunk_rwkv7's default) equals fla with r scaled by K^1/2."""
    dplr_recurrence, _ = fla
    r = LT.rng_for("rwkv7-scale")
    B, T, H, K, V = 1, 9, 2, 4, 3
    x = rwkv7_inputs(r, "float32", B, T, H, K, V)
    th = LT.th
    want_o, _ = dplr_recurrence(th(x["r"] * K ** 0.5), *(th(x[n]) for n in ("k", "v", "a", "b", "w")))
    o, _ = LT.run("rwkv7", None, scale=1.0, **x)
    assert_close(o, th(want_o), "float32")


KDA_CASES = [(T, l2) for T in (1, 2, 63, 257) for l2 in (False, True) if T in (2, 257) or not l2]


@pytest.mark.parametrize("dtype", LT.DTYPES)
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T,l2_in_kernel", KDA_CASES)
def test_kda_matches_fla_naive_recurrent_kda(fla, T, l2_in_kernel, init, dtype):
    _, naive_kda = fla
    r = LT.rng_for("kda", T, init, l2_in_kernel, dtype)
    B, H, K, V = 2, 3, 5, 7
    if l2_in_kernel:  # raw q, k to scancc; fla's naive function never normalizes: feed it l2n
        q, k = LT.randn(r, dtype, B, T, H, K), LT.randn(r, dtype, B, T, H, K)
        rq, rk = LT.l2n(q), LT.l2n(k)
    else:
        q, k = LT.unit_rows(r, dtype, B, T, H, K), LT.unit_rows(r, dtype, B, T, H, K)
        rq, rk = q, k
    v, g = LT.randn(r, dtype, B, T, H, V), LT.log_gate(r, dtype, B, T, H, K)
    beta = LT.arr(r.uniform(0.05, 0.95, (B, T, H)), dtype)
    S0 = LT.randn(r, dtype, B, H, K, V) if init else None
    scale = 0.3 if init else None   # a non-default scale rides on the runs with a state
    want_o, want_S = naive_kda(rq, rk, v, g, beta, scale=scale,
                               initial_state=None if S0 is None else S0.float(),
                               output_final_state=True)
    kw = dict(q=q, k=k, v=v, g=g, beta=beta, scale=scale, use_qk_l2norm_in_kernel=l2_in_kernel)
    o, S = LT.run("kda", S0, **kw)
    LT.assert_dtypes(o, S, dtype)
    assert_close(o, want_o, "float32")
    assert_close(S, want_S, "float32", "final state")
    LT.assert_misses(LT.run("kda", S0, **{**kw, "v": LT.bump_last(v, 1)})[0], want_o, "float32",
                     "kda")
    if T > 2:   # the gate is per key (Diag(exp(g)) before the reflection): a per-head mean misses
        gm = g.mean(-1, keepdim=True).expand_as(g).contiguous()
        LT.assert_misses(LT.run("kda", S0, **{**kw, "g": gm})[0], want_o, "float32", "kda g")


@pytest.mark.parametrize("name", ["rwkv7", "kda"])
def test_gradients_match_torch_autograd_through_fla(fla, small_chunks, name):
    """Gradients of every input and the initial state through the derived backward against
    torch autograd through fla's naive functions (float64 inputs; fla computes in float32)."""
    dplr_recurrence, naive_kda = fla
    r = LT.rng_for("grad", name)
    B, T, H, K, V = 1, 7, 2, 4, 3
    if name == "rwkv7":
        x = rwkv7_inputs(r, "float64", B, T, H, K, V)
    else:
        x = dict(q=LT.unit_rows(r, "float64", B, T, H, K), k=LT.unit_rows(r, "float64", B, T, H, K),
                 v=LT.randn(r, "float64", B, T, H, V), g=LT.log_gate(r, "float64", B, T, H, K),
                 beta=LT.arr(r.uniform(0.05, 0.95, (B, T, H)), "float64"))
    S0 = LT.randn(r, "float64", B, H, K, V)
    do, dS = LT.randn(r, "float64", B, T, H, V), LT.randn(r, "float64", B, H, K, V)

    def grads(fn):
        leaves = {n: t.clone().requires_grad_(True) for n, t in {**x, "S0": S0}.items()}
        o, S = fn(leaves)
        torch.autograd.backward([o.double(), S.double()], [do, dS])
        return {n: t.grad for n, t in leaves.items()}

    def ours(L):
        return LT.run(name, L["S0"], **{n: L[n] for n in x})

    def theirs(L):
        f = {n: L[n].float() for n in L}
        if name == "rwkv7":
            o, S = dplr_recurrence(*(LT.th(f[n]) for n in ("r", "k", "v", "a", "b", "w")),
                                   initial_state=f["S0"])
            return LT.th(o), S
        return naive_kda(f["q"], f["k"], f["v"], f["g"], f["beta"], initial_state=f["S0"],
                         output_final_state=True)

    got, want = grads(ours), grads(theirs)
    for n in want:
        assert_close(got[n], want[n], "float32", f"grad {n}")


# ---- the YAML form ------------------------------------------------------------------------

KDA_YAML = """
name: kda_yaml
dims: {batch: batch, time: time, heads: head, key: feature, value: feature}
inputs:
  q: [batch, time, heads, key]
  k: [batch, time, heads, key]
  v: [batch, time, heads, value]
  g: [batch, time, heads, key]
  beta: [batch, time, heads]
states:
  S:
    dims: [batch, heads, key, value]
    transition: dplr(axis=key, w=exp(g), a=-(beta * k), b=exp(g) * k)
    inject: beta * k * v
outputs:
  o:
    dims: [batch, time, heads, value]
    expr: sum(S * q, key) * rsqrt(size(key))
"""


def test_a_yaml_spec_writes_the_kind(tmp_path):
    """The spec's transition string is the text form: a KDA spec equals the library's kda."""
    from scancc.spec import load_recurrence
    p = tmp_path / "kda.yaml"
    p.write_text(KDA_YAML)
    rec = load_recurrence(p)
    assert rec.states[0].transition.kind is Kind.DPLR
    lib = scancc.get("kda").build()
    sizes = {"batch": 2, "time": 9, "heads": 2, "key": 4, "value": 3}
    x = sample_inputs(lib, sizes, 0, scancc.get("kda").hints)
    S0 = sample_state(lib, sizes, 1)
    want = get("reference").run(lib, x, sizes, S0, True, {})
    got = get("reference").run(rec, x, sizes, S0, True, {})
    np.testing.assert_allclose(got.outputs["o"], want.outputs["o"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.final_states["S"], want.final_states["S"], rtol=1e-12,
                               atol=1e-12)


def test_a_yaml_operand_error_names_the_line(tmp_path):
    from scancc.spec import SpecError, load_recurrence
    p = tmp_path / "bad.yaml"
    p.write_text(KDA_YAML.replace("b=exp(g) * k)", "b=beta)"))
    with pytest.raises(SpecError, match=r"dplr b must vary along the axis 'key'") as e:
        load_recurrence(p)
    assert "bad.yaml:13:" in str(e.value)   # the transition's line


def test_nki_operands_along_another_looped_dim_take_another_layout():
    """b varies along chan beside the axis: the NKI rule steps one column of the other looped
    dims at a time with operands along the axis only, so the layout with chan on the
    partitions is taken (layouts are preferences) and the result is the reference's."""
    r = Builder("dplr_nki_cols")
    bt, t, k = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key")
    v, c = r.dim("value"), r.dim("chan")
    x, a = r.input("x", [bt, t, k, v, c]), r.input("a", [bt, t, k])
    S = r.state("S", [bt, k, v, c], dplr(k, a=a, b=r.input("b", [bt, t, k, c])), inject=x)
    r.output("y", [bt, t, k, v, c], S)
    rec = r.build()
    sizes = {"batch": 2, "time": 7, "key": 4, "value": 3, "chan": 2}
    xs = kind_inputs(rec, sizes, 6)
    S0 = np.random.default_rng(7).standard_normal((2, 4, 3, 2)).astype(np.float32).astype(float)
    want = run_backend("reference", rec, xs, sizes, S0)
    got = run_backend("nki", rec, xs, sizes, S0)
    assert_close(got[0], want[0], "float32", "nki output")
    assert_close(got[1], want[1], "float32", "nki final state")


# ---- the chunked form (Triton) ------------------------------------------------------------

def test_chunked_analysis_takes_dplr_along_k_only():
    from scancc.ir.passes import chunked
    for name in ("rwkv7", "kda"):
        cs = chunked.analyze(scancc.get(name).build()).only()
        assert cs.kind is Kind.DPLR and cs.K == "key" and cs.la is not None and cs.lb is not None
    # w along the value dim, or no w: no chunked form, with the reason
    r = Builder("dplr_wv")
    bt, t, k, v = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key"), r.dim("value")
    q, kk = r.input("q", [bt, t, k]), r.input("k", [bt, t, k])
    vv, w = r.input("v", [bt, t, v]), r.input("w", [bt, t, k, v])
    S = r.state("S", [bt, k, v], dplr(k, a=kk, b=q, w=w), inject=kk * vv)
    r.output("o", [bt, t, v], reduce_sum(S * q, k))
    with pytest.raises(chunked.NotChunkable, match="must not vary along the value dim"):
        chunked.analyze(r.build()).only()
    r = Builder("dplr_now")
    bt, t, k, v = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("key"), r.dim("value")
    q, kk, vv = r.input("q", [bt, t, k]), r.input("k", [bt, t, k]), r.input("v", [bt, t, v])
    S = r.state("S", [bt, k, v], dplr(k, a=kk, b=q), inject=kk * vv)
    r.output("o", [bt, t, v], reduce_sum(S * q, k))
    with pytest.raises(chunked.NotChunkable, match="without w"):
        chunked.analyze(r.build()).only()


@pytest.mark.parametrize("name", ["rwkv7", "kda"])
def test_chunked_matches_the_reference_across_chunks_and_resets(name):
    """Triton's chunked WY form (chunks of 16) against the reference at T = 41 (two full
    chunks and a ragged one), with an initial state, a hard reset (log-decay -inf) of one key
    element inside a chunk and of every element at a chunk's first step."""
    e = scancc.get(name)
    rec = e.build()
    sizes = {"batch": 2, "time": 41, "heads": 2, "key": 6, "value": 5}
    x = sample_inputs(rec, sizes, 8, e.hints)
    g = "g" if name == "kda" else "w"
    x[g][0, 20, 1, 3] = -np.inf
    x[g][1, 32] = -np.inf
    x = {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}
    S0 = sample_state(rec, sizes, 9)["S"].astype(np.float32).astype(np.float64)
    ref = get("reference").run(rec, x, sizes, {"S": S0}, True, {})
    tx = {k: torch.from_numpy(v.astype(np.float32)) for k, v in x.items()}
    res = get("triton").run(rec, tx, sizes, {"S": torch.from_numpy(S0.astype(np.float32))}, True,
                            {"algorithm": "chunked"})
    assert res.counters["algorithm"] == "chunked"
    assert_close(res.outputs["o"], ref.outputs["o"], "float32", "chunked output")
    assert_close(res.final_states["S"], ref.final_states["S"], "float32", "chunked final state")
