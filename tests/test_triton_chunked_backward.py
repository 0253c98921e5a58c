"""The Triton chunked backward (backends/triton/chunked_backward.py, docs/training.md): the
gradients of identity, scalar and key-diagonal decay recurrences from chunk-boundary states, a reverse dh pass
and per-chunk matmuls, against the reference backend's float64 derived adjoint (itself
gradchecked in tests/test_autograd.py). Every buffer the kernels write starts NaN (POISON), so
an element they leave unwritten fails the comparison."""
import numpy as np
import pytest
import scancc
from scancc import autograd as ag
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
if not scancc.backends.get("triton").available()[0]:
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

from scancc.backends.triton import chunked_backward as cb  # noqa: E402

# chunks of 16 steps: T=37 crosses two chunk boundaries and is not a multiple of the chunk
SMALL = {"block_sizes": {"time": 16}}
# householder decays take the chunked backward under the default algorithm too
HH = SMALL


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(cb, "POISON", True)


def _case(name, T, seed=0, build=None, **over):
    e = scancc.get(name)
    rec = e.build(**(build if build is not None else {o: True for o in e.optional_inputs}))
    sizes = default_sizes(rec, time=T, **{"key": 5, "value": 3, "heads": 2, "dstate": 3,
                                          "headdim": 2, **over})
    x = sample_inputs(rec, sizes, seed, e.hints)
    h0 = sample_state(rec, sizes, seed + 1)
    rng = np.random.default_rng(seed + 2)
    dy = {o.name: rng.standard_normal(tuple(sizes[d] for d in o.dims)) for o in rec.outputs}
    dh = {s.name: rng.standard_normal(tuple(sizes[d] for d in s.dims)) for s in rec.states}
    return rec, sizes, x, h0, dy, dh


def _t(a, dtype=torch.float32):
    return {k: torch.from_numpy(np.asarray(v)).to(dtype) for k, v in a.items()}


def _compare(rec, x, h0, dy, dh, T, options, what, dtype="float32"):
    want, want0 = ag.backward(rec, x, dy, h0, dh)  # the reference: float64 derived adjoint
    got, got0 = ag.backward(rec, _t(x), _t(dy), _t(h0) if h0 else None,
                            _t(dh) if dh else None, target="triton", options=options)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == tuple(np.shape(want[k])), k
        assert_close(got[k].double().numpy(), want[k], dtype, f"{what} d{k}", T=T)
    for k in want0:
        assert_close(got0[k].double().numpy(), want0[k], dtype, f"{what} d{k}_0", T=T)


CASES = [("linear_attn", {}, {}), ("retnet", {}, {}), ("simple_gla", {}, {}), ("gla", {}, {}),
         # every optional input (D, z gate, dt_bias) and dt_softplus: the gradient of z reads
         # the contraction, which bwd_grads then writes
         ("mamba2", None, {}),
         ("mamba2", {"dt_softplus": True, "D": True, "z": True, "dt_bias": True},
          {"groups": 2, "heads": 4}),
         # householder (torch glue, chunked_backward_householder.py); the l2norm'd q/k lets
         ("delta_net", {}, {}), ("gated_delta_net", {}, {}),
         ("gated_delta_net", {"use_qk_l2norm_in_kernel": True}, {})]


@pytest.mark.parametrize("name, build, over", CASES,
                         ids=["linear_attn", "retnet", "simple_gla", "gla", "mamba2",
                              "mamba2_grouped", "delta_net", "gated_delta_net",
                              "gated_delta_net_l2norm"])
def test_gradients_match_the_reference(name, build, over):
    """T=37 in chunks of 16 (three chunks, the last partial), with an initial state and a
    final-state cotangent: every input's gradient and the initial state's."""
    rec, sizes, x, h0, dy, dh = _case(name, 37, build=build, **over)
    assert cb.applies(rec) == (True, "")
    _compare(rec, x, h0, dy, dh, 37, HH if "delta" in name else SMALL, name)


def test_default_chunk_and_no_state():
    """The default chunk (64 steps) with T=70, no initial state, no final-state cotangent."""
    rec, sizes, x, _, dy, _ = _case("simple_gla", 70, seed=3)
    _compare(rec, x, None, dy, None, 70, {}, "simple_gla T=70")


def test_hard_resets_match_the_reference():
    """Log-decays of -inf and -200 (below float32's smallest normal decay): hard resets,
    counted not summed (scancc.ir.passes.chunked "Edges"); dg there is 0, as the reference's
    a * dL/da is below 1e-38."""
    rec, sizes, x, h0, dy, dh = _case("simple_gla", 37, seed=5)
    x["g"][:, 3] = -np.inf
    x["g"][:, 20, 0] = -200.0
    x["g"][:, 31] = -np.inf      # in the last chunk
    _compare(rec, x, h0, dy, dh, 37, SMALL, "simple_gla resets")


def test_key_diagonal_resets_and_blocks():
    """gla: per-column hard resets (-inf and -200 in some key columns only), K = V = 20 in
    blocks of 16 (two K-blocks: each writes its own dg columns), default 16-step chunks."""
    rec, sizes, x, h0, dy, dh = _case("gla", 37, seed=9, key=20, value=20)
    x["g"][:, 5, :, 3] = -np.inf
    x["g"][:, 17, 1, 18] = -200.0
    x["g"][:, 33, :, :2] = -np.inf
    _compare(rec, x, h0, dy, dh, 37, {"block_sizes": {"key": 16, "value": 16}}, "gla resets")


def test_per_step_states_are_never_materialised(monkeypatch):
    """Through torch autograd: no runner of the forward, its states view or the derived
    backward recurrence is called (ag._run raises), and the backward is exactly the four
    kernel launches of the chunked form."""
    def boom(rec, *a, **k):
        raise AssertionError(f"the chunked path ran {rec.name} through autograd._run")
    monkeypatch.setattr(ag, "_run", boom)
    launched = []
    real = cb.kernels()

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def call(*args, **kw):
                launched.append((self.k.fn.__name__, grid, kw))
                return self.k[grid](*args, **kw)
            return call
    monkeypatch.setattr(cb, "kernels", lambda: tuple(Spy(k) for k in real))
    rec, sizes, x, h0, dy, dh = _case("mamba2", 37, build={"D": True})
    ker = scancc.compile(rec, target="triton", **SMALL)
    xs = {k: torch.from_numpy(v).float().requires_grad_() for k, v in x.items()}
    y = ker(**xs)
    assert ag.backward_target(ker, rec) == "triton"
    w = torch.from_numpy(dy["y"]).float()
    (y * w).sum().backward()
    assert [n for n, _, _ in launched] == ["fwd_h", "bwd_dh", "bwd_dv", "bwd_dqk"]
    monkeypatch.undo()  # the reference runs through ag._run
    want, _ = ag.backward(rec, x, dy)
    for k in want:
        assert_close(xs[k].grad.double().numpy(), want[k], "float32", f"d{k}", T=37)


def test_options_reach_the_launches(monkeypatch):
    """num_warps (times chunked_backward.WARPS), dot_precision and the time / key / value
    block sizes reach all four launches; K and V of 20 in blocks of 16 split both (dg summed over the K-blocks)."""
    launched = []
    real = cb.kernels()

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def call(*args, **kw):
                launched.append((self.k.fn.__name__, grid, kw))
                return self.k[grid](*args, **kw)
            return call
    monkeypatch.setattr(cb, "kernels", lambda: tuple(Spy(k) for k in real))
    rec, sizes, x, h0, dy, dh = _case("simple_gla", 37, key=20, value=20)
    opts = {"num_warps": 2, "dot_precision": "ieee",
            "block_sizes": {"time": 16, "key": 16, "value": 16}}
    _compare(rec, x, h0, dy, dh, 37, opts, "simple_gla options")
    assert len(launched) == 4
    for name, grid, kw in launched:
        assert kw["num_warps"] == 4 and kw["PREC"] == "ieee", name
        assert kw["BT"] == 16 and kw["BK"] == 16 and kw["BV"] == 16, name
    # value=20 in blocks of 16: two V-blocks; 37 steps in chunks of 16: three chunks
    assert [g for _, g, _ in launched] == [(4, 2, 2), (4, 2, 2), (4, 3, 2), (4, 3, 2)]


def test_bfloat16_gradients_at_the_bfloat16_tolerance():
    """bfloat16 tensors through torch autograd: the backward computes in float32 from the
    bfloat16 inputs; gradients (bfloat16) within the bfloat16 tolerance of the float64
    reference on the same rounded inputs."""
    rec, sizes, x, h0, dy, dh = _case("simple_gla", 37, seed=7)
    bf = {k: torch.from_numpy(v).to(torch.bfloat16).requires_grad_() for k, v in x.items()}
    ref = {k: v.detach().double().numpy() for k, v in bf.items()}
    w = torch.from_numpy(dy["o"])
    y = scancc.compile(rec, target="triton", **SMALL)(**bf)
    (y.double() * w).sum().backward()
    want, _ = ag.backward(rec, ref, dy)
    for k in want:
        assert bf[k].grad.dtype == torch.bfloat16
        assert_close(bf[k].grad.double().numpy(), want[k], "bfloat16", f"d{k}", T=37)


def test_what_takes_the_generic_path():
    """dplr transitions (rwkv7, kda), a decay along V (mamba's S6), and algorithm='recurrent' keep
    the derived backward recurrence; the hard-reset threshold is the chunked analysis's."""
    from scancc.backends import get
    from scancc.ir.passes.chunked import RESET_LOG_DECAY
    be = get("triton")
    for name in ("rwkv7", "kda", "mamba", "hgrn"):
        rec = scancc.get(name).build()
        ok, why = cb.applies(rec)
        assert not ok and why, name
        assert be.chunked_backward(rec, {}) is None
    for name in ("linear_attn", "retnet", "simple_gla", "gla", "mamba2", "delta_net",
                 "gated_delta_net"):
        assert be.chunked_backward(scancc.get(name).build(), {}) is cb.backward, name
    rec = scancc.get("simple_gla").build()
    assert be.chunked_backward(rec, {"algorithm": "staged"}) is cb.backward
    assert be.chunked_backward(rec, {"algorithm": "recurrent"}) is None
    from scancc.backends.triton import chunked_backward_kernels as kern
    assert kern.RESET.value == RESET_LOG_DECAY
    from scancc.backends.triton import chunked_backward_householder as hh
    assert hh.RESET_LOG_DECAY == RESET_LOG_DECAY


def test_numpy_arrays_take_the_chunked_path_too(monkeypatch):
    """``scancc.autograd.backward`` with NumPy arrays on triton (``scancc check --backward``)
    runs the chunked backward through CPU tensors and hands back NumPy gradients."""
    launched = []
    real = cb.backward

    def spy(*a, **k):
        launched.append(1)
        return real(*a, **k)
    monkeypatch.setattr(cb, "backward", spy)
    from scancc.backends import get
    monkeypatch.setattr(type(get("triton")), "chunked_backward",
                        lambda self, rec, options: spy)
    rec, sizes, x, h0, dy, dh = _case("linear_attn", 21, seed=11)
    want, want0 = ag.backward(rec, x, dy, h0, dh)
    got, got0 = ag.backward(rec, x, dy, h0, dh, target="triton", options=SMALL)
    assert launched == [1]
    for k in want:
        assert isinstance(got[k], np.ndarray) and got[k].dtype == np.float32
        assert_close(got[k], want[k], "float32", f"d{k}", T=21)
    assert_close(got0["S"], want0["S"], "float32", "dS_0", T=21)


def test_torch_compile_trains_through_the_chunked_backward(monkeypatch):
    """torch.compile (fullgraph, aot_eager) of a layer calling a Triton simple_gla kernel with
    non-contiguous (view) inputs: one graph, its backward runs the chunked kernels (spied), and
    the gradients equal the float64 reference's."""
    import torch.nn.functional as F
    launched = []
    real = cb.backward

    def spy(*a, **k):
        launched.append(1)
        return real(*a, **k)
    from scancc.backends import get
    monkeypatch.setattr(type(get("triton")), "chunked_backward",
                        lambda self, rec, options: spy)
    ker = scancc.compile("simple_gla", target="triton", block_sizes={"time": 16})
    ref = scancc.compile("simple_gla")

    def layer(k_, x, Wq, Wk, Wv, Wg, h0):
        B, T, _ = x.shape
        q, k, v = ((x @ W).view(B, T, 2, 3) for W in (Wq, Wk, Wv))
        o, h = k_(q, k, v, F.logsigmoid(x @ Wg), initial_state=h0, output_final_state=True)
        return o.pow(2).sum() + h.sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 5, generator=g)
    params = [torch.randn(5, 6, generator=g, requires_grad=True) for _ in range(3)] + \
        [torch.randn(5, 2, generator=g, requires_grad=True),
         torch.randn(2, 2, 3, 3, generator=g, requires_grad=True)]
    compiled = torch.compile(lambda *a: layer(ker, *a), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, *params), params)
    assert launched, "the compiled backward did not take the chunked path"
    p64 = [p.detach().double().requires_grad_() for p in params]
    want = torch.autograd.grad(layer(ref, x.double(), *p64), p64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def _custom():
    """A user recurrence with the scalar chunked structure the library lacks: a decay written
    as sigmoid(a) (not exp: the log-decay is log(sigmoid(a)), let-bound), a scale factor on
    the injected term, a time-invariant per-head input in the readout, and a residual."""
    from scancc.ir import Builder, dot, scalar, sigmoid
    r = Builder("custom_scalar")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    k_, v_ = r.dim("key"), r.dim("value")
    q, kk, vv = r.input("q", [b, t, h, k_]), r.input("k", [b, t, h, k_]), \
        r.input("v", [b, t, h, v_])
    a, beta, w = r.input("a", [b, t, h]), r.input("beta", [b, t, h]), r.input("w", [h])
    gate = r.let("gate", sigmoid(a))
    S = r.state("S", [b, h, k_, v_], scalar(gate), inject=kk * vv * beta)
    r.output("o", [b, t, h, v_], dot(S, q, k_) * w + vv)
    return r.build()


def test_a_user_recurrence_with_the_structure():
    rec = _custom()
    assert cb.applies(rec) == (True, "")
    sizes = default_sizes(rec, time=37, key=5, value=3, heads=2)
    x = sample_inputs(rec, sizes, 13)
    h0 = sample_state(rec, sizes, 14)
    rng = np.random.default_rng(15)
    dy = {"o": rng.standard_normal(tuple(sizes[d] for d in rec.outputs[0].dims))}
    dh = {"S": rng.standard_normal(tuple(sizes[d] for d in rec.states[0].dims))}
    _compare(rec, x, h0, dy, dh, 37, SMALL, "custom_scalar")


# ---- householder transitions (chunked_backward_householder.py: torch ops in the WY/UT form)

def test_householder_resets_and_default_chunk():
    """gated_delta_net with hard resets (-inf, -200) inside chunks and on a chunk's first
    step, in chunks of 16; then delta_net with the default 64-step chunk at T=70 and neither an
    initial state nor a final-state cotangent."""
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", 37, seed=21)
    x["g"][:, 3] = -np.inf
    x["g"][:, 16, 0] = -200.0
    x["g"][:, 35] = -np.inf
    _compare(rec, x, h0, dy, dh, 37, HH, "gated_delta_net resets")
    rec, sizes, x, _, dy, _ = _case("delta_net", 70, seed=22)
    _compare(rec, x, None, dy, None, 70, {}, "delta_net T=70")


def test_householder_never_runs_the_state_sequence(monkeypatch):
    """Through torch autograd on gated_delta_net: no runner of the forward, its states view
    or the derived backward recurrence is called (ag._run raises); the householder chunked
    backward runs once; gradients equal the float64 reference's."""
    from scancc.backends.triton import chunked_backward_householder as hh

    def boom(rec, *a, **k):
        raise AssertionError(f"the chunked path ran {rec.name} through autograd._run")
    monkeypatch.setattr(ag, "_run", boom)
    calls = []
    real = hh.backward

    def spy(*a, **k):
        calls.append(a[-2])            # BT
        return real(*a, **k)
    monkeypatch.setattr(hh, "backward", spy)
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", 37, seed=23)
    ker = scancc.compile(rec, target="triton", **HH)
    xs = {k: torch.from_numpy(v).float().requires_grad_() for k, v in x.items()}
    y = ker(**xs)
    assert ag.backward_target(ker, rec) == "triton"
    (y * torch.from_numpy(dy["o"]).float()).sum().backward()
    assert calls == [16]
    monkeypatch.undo()
    want, _ = ag.backward(rec, x, dy)
    for k in want:
        assert_close(xs[k].grad.double().numpy(), want[k], "float32", f"d{k}", T=37)


def test_householder_bfloat16_gradients():
    """gated_delta_net in bfloat16 through torch autograd: the backward computes in float32
    from the bfloat16 inputs; gradients within the bfloat16 tolerance of the float64
    reference on the same rounded inputs."""
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", 37, seed=24)
    bf = {k: torch.from_numpy(v).to(torch.bfloat16).requires_grad_() for k, v in x.items()}
    ref = {k: v.detach().double().numpy() for k, v in bf.items()}
    y = scancc.compile(rec, target="triton", **HH)(**bf)
    (y.double() * torch.from_numpy(dy["o"])).sum().backward()
    want, _ = ag.backward(rec, ref, dy)
    for k in want:
        assert bf[k].grad.dtype == torch.bfloat16
        assert_close(bf[k].grad.double().numpy(), want[k], "bfloat16", f"d{k}", T=37)


def _custom_householder():
    """A user recurrence of the householder structure the library lacks: the decay written
    as sigmoid(a) (its log let-bound by the analysis), beta = sigmoid(b) as a let, an injected
    term with a separate u (not beta k) and a time-invariant per-head output scale."""
    from scancc.ir import Builder, dot, householder, sigmoid
    r = Builder("custom_householder")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    k_, v_ = r.dim("key"), r.dim("value")
    q, kk, vv = r.input("q", [b, t, h, k_]), r.input("k", [b, t, h, k_]), \
        r.input("v", [b, t, h, v_])
    u = r.input("u", [b, t, h, k_])
    a, bb, w = r.input("a", [b, t, h]), r.input("b", [b, t, h]), r.input("w", [h])
    beta = r.let("beta", sigmoid(bb))
    S = r.state("S", [b, h, k_, v_], householder(k_, kk, beta, sigmoid(a)), inject=u * vv)
    r.output("o", [b, t, h, v_], dot(S, q, k_) * w)
    return r.build()


def test_a_user_householder_recurrence():
    rec = _custom_householder()
    assert cb.applies(rec) == (True, "")
    sizes = default_sizes(rec, time=37, key=5, value=3, heads=2)
    x = sample_inputs(rec, sizes, 25)
    rng = np.random.default_rng(26)
    x["k"] = x["k"] / np.linalg.norm(x["k"], axis=-1, keepdims=True)
    h0 = sample_state(rec, sizes, 27)
    dy = {"o": rng.standard_normal(tuple(sizes[d] for d in rec.outputs[0].dims))}
    dh = {"S": rng.standard_normal(tuple(sizes[d] for d in rec.states[0].dims))}
    _compare(rec, x, h0, dy, dh, 37, HH, "custom_householder")


def test_householder_zero_steps():
    """T = 0: no chunk; the initial state's gradient is the final-state cotangent and the
    input gradients are empty, as the reference's."""
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", 0, seed=28)
    _compare(rec, x, h0, dy, dh, 0, HH, "gated_delta_net T=0")


def test_auto_takes_the_chunked_backward_for_householder_decays():
    """algorithm='auto' (and 'chunked', 'staged') run householder decays through the chunked
    backward, never the derived backward recurrence's per-step states; 'recurrent' keeps it."""
    be = scancc.backends.get("triton")
    rec = scancc.get("gated_delta_net").build()
    for opts in ({}, {"algorithm": "auto"}, {"algorithm": "chunked"}, {"algorithm": "staged"}):
        assert be.chunked_backward(rec, opts) is cb.backward, opts
    assert be.chunked_backward(rec, {"algorithm": "recurrent"}) is None
    assert be.chunked_backward(scancc.get("simple_gla").build(), {}) is cb.backward


# ---- householder under the default algorithm: the Triton sequential passes (hh_fwd_h,
# hh_bwd_dh), T across 64-step chunk boundaries, through torch autograd

def _loop_gated_delta(q, k, v, g, beta, h0):
    """gated_delta_net as a plain torch loop (float64; torch autograd differentiates it):
    S_t = e^{g_t} (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ, o_t = S_tᵀ q_t / sqrt(K)."""
    S, outs = h0, []
    for t in range(q.shape[1]):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]                    # [B, H, K|V]
        bt, at = beta[:, t, :, None, None], torch.exp(g[:, t])[:, :, None, None]
        S = at * (S - bt * kt[..., None] * (kt[..., None, :] @ S)) + \
            bt * kt[..., None] * vt[..., None, :]
        outs.append((S * qt[..., None]).sum(-2) / q.shape[-1] ** 0.5)
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
def test_householder_auto_runs_the_triton_passes(T, monkeypatch):
    """gated_delta_net through torch autograd under the default options (64-step chunks, K=5,
    V=20 in two V-blocks of 16): the two sequential-pass kernels launch once each, no
    BackwardFallbackWarning, no runner of the derived path (ag._run raises); gradients of
    every input, the initial state and through the final state equal torch autograd through a
    plain float64 loop, at the float32 tolerance."""
    import warnings
    launched = []
    real = cb.householder_kernels()

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            launched.append((self.k.fn.__name__, grid))
            return self.k[grid]
    monkeypatch.setattr(cb, "householder_kernels", lambda: tuple(Spy(k) for k in real))

    def boom(rec, *a, **k):
        raise AssertionError(f"the generic path ran {rec.name}")
    monkeypatch.setattr(ag, "_run", boom)
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", T, seed=40 + T, value=20)
    ker = scancc.compile(rec, target="triton", block_sizes={"value": 16})
    xs = {k: torch.from_numpy(v).float().requires_grad_() for k, v in x.items()}
    s0 = torch.from_numpy(h0["S"]).float().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ag.BackwardFallbackWarning)
        y, fin = ker(**xs, initial_state=s0, output_final_state=True)
        loss = (y * torch.from_numpy(dy["o"]).float()).sum() + \
            (fin * torch.from_numpy(dh["S"]).float()).sum()
        loss.backward()
    assert [n for n, _ in launched] == ["hh_fwd_h", "hh_bwd_dh"]
    assert all(grid == (2 * 2, 2) for _, grid in launched), launched   # G = B·H, 2 V-blocks
    xd = {k: torch.from_numpy(v).requires_grad_() for k, v in x.items()}
    sd = torch.from_numpy(h0["S"]).requires_grad_()
    o, S = _loop_gated_delta(xd["q"], xd["k"], xd["v"], xd["g"], xd["beta"], sd)
    ((o * torch.from_numpy(dy["o"])).sum() + (S * torch.from_numpy(dh["S"])).sum()).backward()
    for k in x:
        assert xs[k].grad.dtype == torch.float32
        assert_close(xs[k].grad.double().numpy(), xd[k].grad.numpy(), "float32", f"d{k}", T=T)
    assert_close(s0.grad.double().numpy(), sd.grad.numpy(), "float32", "dS0", T=T)


def test_householder_grouped_value_heads_auto():
    """fla's grouped value heads (q/k read per group), default options, T=65 (two 64-step
    chunks, the second one step long), against the float64 reference. With l2norm'd q/k as
    well, the chunked analysis's grid keeps qk_heads, a dim the state lacks: the plan says so
    and the derived backward runs (no silent wrong answer)."""
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", 65, seed=51,
                                      build={"grouped_value_heads": True}, heads=4,
                                      qk_heads=2)
    assert cb.applies(rec) == (True, "")
    _compare(rec, x, h0, dy, dh, 65, {}, "gated_delta_net gva")
    rec = scancc.get("gated_delta_net").build(grouped_value_heads=True,
                                              use_qk_l2norm_in_kernel=True)
    ok, why = cb.applies(rec)
    assert not ok and "qk_heads" in why


def test_householder_nan_input_reaches_what_the_reference_reaches():
    """One NaN in gated_delta_net's v at step 20 (T=37, 16-step chunks): every gradient's NaN
    entries include the reference's (none lost); the finite ones agree. (The chunk's products
    over time spread it further than the reference: docs/training.md.)"""
    rec, sizes, x, h0, dy, dh = _case("gated_delta_net", 37, seed=52)
    x["v"][0, 20, 1, 1] = np.nan
    want, _ = ag.backward(rec, x, dy)
    got, _ = cb.backward(rec, _t(x), _t(dy), sizes, None, None, SMALL)
    for k in want:
        ref, mine = np.isnan(want[k]), torch.isnan(got[k]).numpy()
        assert ref.any() or k == "v", k
        assert (mine >= ref).all(), f"d{k} lost NaN entries"
        ok = ~mine
        assert_close(got[k].double().numpy()[ok], want[k][ok], "float32", f"d{k}", T=37)
