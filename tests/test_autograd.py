"""Training: gradients through the derived backward recurrence (scancc.ir.adjoint) against
finite differences (torch.autograd.gradcheck, float64) and against torch autograd through
independent implementations (flash-linear-attention's naive recurrences, transformers' Mamba
scan)."""
import numpy as np
import pytest
import scancc
from scancc.autograd import has_adjoint
from scancc import registry
import scancc.autograd as ag
from scancc.ir import IRError
from scancc.testing import sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

# every library recurrence
DERIVED = [n for n in registry.names() if registry.get(n).origin == "library"
           and has_adjoint(registry.get(n).build())]
# bmojo's gradcheck (every final state: ~100 backward runs) takes ~170 s here: `-m slow`;
# tests/test_bmojo_grad.py checks its gradients in the default run
GRADCHECKED = [pytest.param(n, marks=pytest.mark.slow) if n == "bmojo" else n for n in DERIVED]
SMALL = {"batch": 1, "time": 5, "heads": 2, "key": 3, "value": 2, "chan": 3, "dstate": 2,
         "headdim": 2, "groups": 1, "width": 3, "order": 3}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 2)  # T=5: chunks of 2, 2, 1 (boundaries crossed)


def _gradcheck(ker, hints):
    rec = ker.ir
    sizes = {d.name: d.size or SMALL.get(d.name, 2) for d in rec.dims}
    x = {k: torch.tensor(v, requires_grad=True)
         for k, v in sample_inputs(rec, sizes, 3, hints).items()}
    h0 = {k: torch.tensor(v, requires_grad=True) for k, v in sample_state(rec, sizes, 4).items()}
    names, snames = list(x), list(h0)

    def f(*ts):
        out, fin = ker(**dict(zip(names, ts)), initial_state=dict(zip(snames, ts[len(names):])),
                       output_final_state=True)
        return (out, *(fin.values() if isinstance(fin, dict) else [fin]))

    # finite differences in float64 (eps 1e-6) are good to ~1e-9: a tight rtol catches
    # a derivative that is off by 0.1%
    assert torch.autograd.gradcheck(f, tuple(x.values()) + tuple(h0.values()), atol=1e-8,
                                    rtol=1e-6)


@pytest.mark.parametrize("name", GRADCHECKED)
def test_gradcheck_every_input_and_both_states(name):
    e = scancc.get(name)
    opts = {o: True for o in e.optional_inputs}
    if name == "mamba":
        opts["delta_softplus"] = True
    if name == "mamba2":
        opts.update(dt_softplus=True, dt_limit=None)  # clamp's kink is not differentiable
    if name == "fir":
        opts["activation"] = "silu"
    _gradcheck(scancc.compile(name, **opts), e.hints)


def test_gradcheck_of_the_registered_custom_recurrence(gated_iir):
    """examples/gated_iir.py: a companion state whose feedback depends on the input."""
    _gradcheck(scancc.compile("gated_iir"), gated_iir.hints)


def test_gradcheck_of_a_dense_transition():
    from scancc.ir import Builder, dense, reduce_sum, sigmoid, silu
    r = Builder("autograd_test_dense")
    b, t, h, n, c = (r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head"),
                     r.dim("n"), r.dim("c"))
    x, g = r.input("x", [b, t, h, n]), r.input("g", [b, t, h])
    m = r.input("m", [h, n, c])
    s = r.state("s", [b, h, n], dense(n, c, m * sigmoid(g)), inject=silu(x))
    r.output("y", [b, t, h, n], s * x + reduce_sum(s * s, n))
    ker = scancc.compile(r.build())
    _gradcheck(ker, {"m": "small"})
    assert "dense_adjoint(axis=n, col=c" in str(ag.adjoint(ker.ir).backward)


def test_gradients_match_torch_autograd_through_fla_naive_gated_delta_rule():
    naive = pytest.importorskip("fla.ops.gated_delta_rule", reason="fla-core is not installed")
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
            .double().requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    gg = (-torch.rand(B, T, H, generator=g, dtype=torch.float64)).requires_grad_()
    h0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    args = (q, k, v, beta, gg, h0)
    o_ref, s_ref = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, gg, initial_state=h0,
                                                          output_final_state=True)
    want = torch.autograd.grad((o_ref * w).sum() + s_ref.pow(2).sum(), args)
    o, s = scancc.compile("gated_delta_net")(q, k, v, gg, beta, initial_state=h0,
                                             output_final_state=True)
    got = torch.autograd.grad((o * w).sum() + s.pow(2).sum(), args)
    for a, b, n in zip(got, want, ["q", "k", "v", "beta", "g", "h0"]):
        # fla computes in float32 internally: compare at float32 precision
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-5, msg=n)


def test_gradients_match_torch_autograd_through_transformers_mamba_scan():
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba",
                             reason="transformers is not installed")
    g = torch.Generator().manual_seed(1)
    b, d, L, n = 2, 4, 11, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, delta, z = r(b, d, L), r(b, d, L) * 0.5, r(b, d, L)
    A, Bm, Cm, D, bias = -torch.exp(r(d, n)), r(b, n, L), r(b, n, L), r(d), r(d) * 0.1
    args = [t.requires_grad_() for t in (u, delta, A, Bm, Cm, D, z, bias)]
    w = r(b, d, L)
    y_ref = mm.mamba_selective_scan(u, delta, A, Bm, Cm, D=D, z=z, delta_bias=bias,
                                    delta_softplus=True)
    want = torch.autograd.grad((y_ref * w).sum(), args)
    y = scancc.compile("mamba", delta_softplus=True)(u, delta, A, Bm, Cm, D=D, z=z,
                                                     delta_bias=bias)
    got = torch.autograd.grad((y * w).sum(), args)
    for a, bb, nm in zip(got, want, ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]):
        # transformers computes the scan in float32 internally: compare at float32 precision
        torch.testing.assert_close(a, bb, rtol=1e-4, atol=1e-5, msg=nm)


def test_a_tiny_model_trains():
    """A few Adam steps on a GLA layer with learned projections reduce the loss."""
    g = torch.Generator().manual_seed(2)
    B, T, D, H, K = 2, 16, 6, 2, 3
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    target = torch.roll(x, 1, dims=1)[..., :H * K].reshape(B, T, H, K)   # recall the previous token
    W = torch.nn.ParameterDict({n: torch.nn.Parameter(0.3 * torch.randn(D, H * K, generator=g,
                                                                        dtype=torch.float64))
                                for n in ("q", "k", "v", "g")})
    opt = torch.optim.Adam(W.parameters(), lr=0.05)
    ker = scancc.compile("gla")
    losses = []
    for _ in range(15):
        p = {n: (x @ W[n]).reshape(B, T, H, K) for n in W}
        o = ker(p["q"], p["k"], p["v"], torch.nn.functional.logsigmoid(p["g"]))
        loss = (o - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_chunking_does_not_change_gradients(monkeypatch):
    e = scancc.get("simple_gla")
    rec = e.build()
    sizes = {"batch": 1, "time": 13, "heads": 2, "key": 3, "value": 4}
    x = sample_inputs(rec, sizes, 5, e.hints)
    dy = {"o": np.random.default_rng(6).standard_normal((1, 13, 2, 4))}
    g1, h1 = ag.backward(rec, x, dy, chunk=13)
    g2, h2 = ag.backward(rec, x, dy, chunk=4)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h1["S"], h2["S"], rtol=1e-12, atol=1e-12)


def test_adjoint_steps_have_no_derived_adjoint_themselves():
    bwd = ag.adjoint(scancc.get("fir").build()).backward
    with pytest.raises(IRError, match="the adjoint of a shift_adjoint transition is not derived"):
        ag.derive(bwd)


def _grads(fn, args, w):
    return torch.autograd.grad((fn(*args) * w).sum(), args)


def test_fir_gradients_match_torch_autograd_through_conv1d():
    F = torch.nn.functional
    g = torch.Generator().manual_seed(3)
    B, T, D, W = 2, 11, 3, 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [t.requires_grad_() for t in (r(B, T, D), r(D, W), r(D))]
    w = r(B, T, D)

    def conv(x, weight, bias):  # causal depthwise conv, then silu (mamba's short conv)
        y = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=W - 1, groups=D)[..., :T]
        return F.silu(y).transpose(1, 2)

    want = _grads(conv, args, w)
    got = _grads(lambda x, wt, bs: scancc.compile("fir", activation="silu")(x, wt, bias=bs),
                 args, w)
    for a, b, n in zip(got, want, ["x", "weight", "bias"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)


def test_iir_gradients_match_torch_autograd_through_a_difference_equation():
    """Direct form II written out in torch: w_t = x_t - sum_k a_k w_{t-k}, y_t = sum_k b_k w_{t-k}."""
    g = torch.Generator().manual_seed(4)
    B, T, D, n = 2, 13, 3, 2
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    a = torch.tensor([[1.0, -0.5, 0.06], [1.0, 0.3, -0.1], [1.0, 0.0, 0.25]], dtype=torch.float64)
    b = torch.randn(D, n + 1, generator=g, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, b, a)]
    w_out = torch.randn(B, T, D, generator=g, dtype=torch.float64)

    def loop(x, b, a):
        ws = [torch.zeros(B, D, dtype=x.dtype)] * n
        ys = []
        for t in range(T):
            wt = x[:, t] - sum(a[:, k] * ws[-k] for k in range(1, n + 1))
            ws.append(wt)
            ys.append(sum(b[:, k] * ws[-1 - k] for k in range(n + 1)))
        return torch.stack(ys, 1)

    want = _grads(loop, args, w_out)
    got = _grads(lambda x, b, a: scancc.compile("iir")(x, b, a), args, w_out)
    for u, v, nm in zip(got, want, ["x", "b", "a"]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10, msg=nm)


def test_swa_gradients_match_torch_autograd_through_masked_attention():
    F = torch.nn.functional
    g = torch.Generator().manual_seed(5)
    B, T, H, K, V, W = 2, 9, 2, 3, 4, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = [t.requires_grad_() for t in (r(B, T, H, K), r(B, T, H, K), r(B, T, H, V))]
    w = r(B, T, H, V)
    i = torch.arange(T)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)

    def attn(q, k, v):
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
        return o.transpose(1, 2)

    want = _grads(attn, args, w)
    got = _grads(lambda q, k, v: scancc.compile("swa", window=W)(q, k, v), args, w)
    for a, b, n in zip(got, want, ["q", "k", "v"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=n)


def test_backward_ir_is_printable_and_round_trips():
    from scancc.ir import format_recurrence, parse_recurrence
    adj = ag.adjoint(scancc.get("gla").build())
    text = format_recurrence(adj.backward)
    assert "prev(nu_S)" in text and parse_recurrence(text) == adj.backward


def test_torch_compile_traces_scancc_ops_without_graph_breaks():
    F = torch.nn.functional
    ker = scancc.compile("simple_gla")

    def layer(x, Wq, Wk, Wv, Wg, h0):
        B, T, _ = x.shape
        q, k, v = ((x @ W).view(B, T, 2, 3) for W in (Wq, Wk, Wv))
        o, h = ker(q, k, v, F.logsigmoid(x @ Wg), initial_state=h0, output_final_state=True)
        return o.pow(2).sum() + h.sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, generator=g)
    params = [torch.randn(5, 6, generator=g, requires_grad=True) for _ in range(3)] + \
        [torch.randn(5, 2, generator=g, requires_grad=True),
         torch.randn(2, 2, 3, 3, generator=g, requires_grad=True)]
    explain = torch._dynamo.explain(layer)(x, *params)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    want = torch.autograd.grad(layer(x, *params), params)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(x, *params)
    got = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, layer(x, *params))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("target", [n for n, ok, _ in scancc.backends.report()
                                    if ok and n != "reference"])
def test_gradients_through_a_kernel_of_another_backend(target):
    """A triton/nki kernel is differentiable too; its backward runs on the backend itself where
    that backend lowers the backward recurrence, else on the reference."""
    e = scancc.get("simple_gla")
    rec = e.build()
    sizes = {"batch": 1, "time": 9, "heads": 2, "key": 4, "value": 3}
    x = sample_inputs(rec, sizes, 7, e.hints)
    ref = {k: torch.tensor(v, requires_grad=True) for k, v in x.items()}
    dev = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in x.items()}
    want = torch.autograd.grad(scancc.compile("simple_gla")(**ref).pow(2).sum(), list(ref.values()))
    ker = scancc.compile("simple_gla", target=target)
    got = torch.autograd.grad(ker(**dev).pow(2).sum(), list(dev.values()))
    assert ag.backward_target(ker, ker.ir) in ("reference", target)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [n for n, ok, _ in scancc.backends.report()
                                    if ok and n != "reference"])
def test_bfloat16_calls_get_gradients_at_bfloat16_tolerance(target):
    """bfloat16 tensors in: the forward kernel runs in bfloat16, the backward kernels in
    float32 (docs/training.md); gradients are bfloat16 and within the bfloat16 tolerance of the
    float64 reference's on the same (rounded) inputs."""
    from scancc.testing import assert_close
    e = scancc.get("gla")
    rec = e.build()
    sizes = {"batch": 1, "time": 70, "heads": 2, "key": 4, "value": 3}
    x = sample_inputs(rec, sizes, 8, e.hints)
    bf = {k: torch.tensor(v).to(torch.bfloat16).requires_grad_() for k, v in x.items()}
    ref = {k: v.detach().double().requires_grad_() for k, v in bf.items()}
    w = torch.from_numpy(np.random.default_rng(9).standard_normal((1, 70, 2, 3)))
    ker = scancc.compile("gla", target=target)
    got = torch.autograd.grad((ker(**bf).double() * w).sum(), list(bf.values()))
    want = torch.autograd.grad((scancc.compile("gla")(**ref) * w).sum(), list(ref.values()))
    for a, b, n in zip(got, want, x):
        assert a.dtype == torch.bfloat16
        assert_close(a.double().numpy(), b.numpy(), "bfloat16", n)


def test_torch_backward_keeps_tensors_on_their_device(monkeypatch):
    """Every kernel launch of a torch call's backward gets torch tensors on the caller's
    device: no round trip through host NumPy between launches."""
    seen = []
    real = ag._run

    def spy(rec, inputs, init, target="reference", *options):
        arrays = list(inputs.values()) + list((init or {}).values())
        seen.append(all(isinstance(a, torch.Tensor) and a.device == q.device for a in arrays))
        return real(rec, inputs, init, target, *options)
    monkeypatch.setattr(ag, "_run", spy)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 7, 2, 3, generator=g, requires_grad=True) for _ in range(3))
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 7, 2, 3, generator=g)).requires_grad_()
    scancc.compile("gla")(q, k, v, gk).sum().backward()
    # per chunk (T/2 of them): forward (but the last's), recompute, backward
    assert len(seen) >= 3 * 4 - 1 and all(seen)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.slow
@pytest.mark.parametrize("target", [n for n, ok, _ in scancc.backends.report()
                                    if ok and n != "reference"])
@pytest.mark.parametrize("name", DERIVED)
def test_every_library_backward_on_the_backend_through_chunks(name, target):
    """`scancc check --backward` as a test: forward, recompute and backward kernels of the
    target, T = 40 in chunks of 2 (this module's fixture), against the reference's gradients."""
    from scancc.check import check_backward
    row = check_backward(name, target, T=40)
    assert row.ok, row.note


def test_custom_ops_fake_outputs_match_real_ones_for_strided_inputs():
    """torch.compile (inductor) lays out buffers from the ops' fake implementations: their
    outputs' sizes and strides must equal the real ones, also when an input is a strided view
    (the issue: docs/layers.md's Mamba2Block under torch.compile + backward failed with
    'expected ... stride 64==1 ... Error in op: torch.ops.scancc.scan_backward')."""
    from torch.library import opcheck
    e = scancc.get("simple_gla")
    rec = e.build()
    x = sample_inputs(rec, {"batch": 2, "time": 9, "heads": 2, "key": 8, "value": 12}, 0, e.hints)
    ker = scancc.compile("simple_gla", "reference")
    ts = [torch.tensor(x[i.name]) for i in rec.inputs]
    ts[0] = ts[0].transpose(1, 2).contiguous().transpose(1, 2)  # q: a strided view
    ts[2] = ts[2][..., ::1].transpose(0, 1).contiguous().transpose(0, 1)
    assert not ts[0].is_contiguous() and not ts[2].is_contiguous()
    o = ker(*ts)
    key = ker._last.slot
    grads = [torch.randn_like(o), torch.zeros(2, 2, 8, 12, dtype=torch.float64)]
    for op, args in ((torch.ops.scancc.scan.default, (key, ts, [], False)),
                     (torch.ops.scancc.scan_backward.default, (key, ts, [], grads, 64))):
        assert opcheck(op, args, test_utils=("test_faketensor",)) == \
            {"test_faketensor": "SUCCESS"}


@pytest.mark.slow
def test_the_docs_mamba2_block_trains_under_torch_compile(monkeypatch):
    """docs/layers.md's Mamba2Block (strided views into the scan) under torch.compile with
    inductor: forward and gradients equal eager (about a minute of compiling)."""
    import pathlib
    import re
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "layers.md").read_text()
    src = re.search(r"```python\n(import torch.*?class Mamba2Block.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(src, ns)  # noqa: S102 - the documented example itself
    torch.manual_seed(0)
    m = ns["Mamba2Block"](32)
    u = torch.randn(2, 40, 32)
    ref = m(u)
    ref.sum().backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out = torch.compile(m)(u)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for p, g in zip(m.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_backend_options_reach_every_backward_launch(monkeypatch):
    """A Triton kernel compiled with num_warps / dot_precision / block_sizes runs its backward
    (the forward recompute, the states view and the backward recurrence) with them; its
    ``algorithm`` reaches the IRs that have that structure, the others get the backend's
    choice. Gradients still equal the reference's. (rwkv7: identity, scalar,
    key-diagonal and householder decays take the chunked backward,
    tests/test_triton_chunked_backward.py.)"""
    from scancc.backends import get
    be = get("triton")
    seen = []
    real = type(be).run

    def spy(self, rec, inputs, sizes, initial_state, output_final_state, options):
        seen.append((rec.name, dict(options)))
        return real(self, rec, inputs, sizes, initial_state, output_final_state, options)
    monkeypatch.setattr(type(be), "run", spy)
    e = scancc.get("rwkv7")
    rec = e.build()
    x = sample_inputs(rec, {"batch": 1, "time": 9, "heads": 2, "key": 4, "value": 3}, 7, e.hints)
    opts = {"algorithm": "chunked", "num_warps": 2, "dot_precision": "ieee",
            "block_sizes": {"value": 16}}
    ker = scancc.compile("rwkv7", target="triton", **opts)
    dev = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in x.items()}
    ref = {k: torch.tensor(v, requires_grad=True) for k, v in x.items()}
    got = torch.autograd.grad(ker(**dev).pow(2).sum(), list(dev.values()))
    want = torch.autograd.grad(scancc.compile("rwkv7")(**ref).pow(2).sum(),
                               list(ref.values()))
    assert ag.backward_target(ker, ker.ir) == "triton"
    back = seen[1:]  # after the forward call
    assert len({n for n, _ in back}) == 3, back  # forward recompute, states view, backward
    for name, o in back:
        assert o["num_warps"] == 2 and o["dot_precision"] == "ieee", (name, o)
        assert o["block_sizes"] == {"value": 16}, (name, o)
        assert o.get("algorithm") in (None, "chunked"), (name, o)
    assert any(o.get("algorithm") == "chunked" for n, o in back if n == "rwkv7")
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
