"""Training: gradients through the derived backward recurrence (scancc.ir.adjoint) against
finite differences (torch.autograd.gradcheck, float64) and against torch autograd through
independent implementations (flash-linear-attention's naive recurrences, transformers' Mamba
scan)."""
import numpy as np
import pytest
import scancc
import scancc.autograd as ag
from scancc.ir import IRError
from scancc.testing import sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

DERIVED = ["linear_attn", "retnet", "simple_gla", "gla", "hgrn", "delta_net", "gated_delta_net",
           "mamba", "mamba2", "s4d"]
SMALL = {"batch": 1, "time": 5, "heads": 2, "key": 3, "value": 2, "chan": 3, "dstate": 2,
         "headdim": 2, "groups": 1}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 2)  # T=5: chunks of 2, 2, 1 (boundaries crossed)


@pytest.mark.parametrize("name", DERIVED)
def test_gradcheck_every_input_and_both_states(name):
    e = scancc.get(name)
    opts = {o: True for o in e.optional_inputs}
    if name == "mamba":
        opts["delta_softplus"] = True
    if name == "mamba2":
        opts.update(dt_softplus=True, dt_limit=None)  # clamp's kink is not differentiable
    ker = scancc.compile(name, **opts)
    rec = ker.ir
    sizes = {d.name: SMALL.get(d.name, 2) for d in rec.dims}
    x = {k: torch.tensor(v, requires_grad=True)
         for k, v in sample_inputs(rec, sizes, 3, e.hints).items()}
    h0 = {k: torch.tensor(v, requires_grad=True) for k, v in sample_state(rec, sizes, 4).items()}
    names, snames = list(x), list(h0)

    def f(*ts):
        out, fin = ker(**dict(zip(names, ts)), initial_state=dict(zip(snames, ts[len(names):])),
                       output_final_state=True)
        return out, fin

    # finite differences in float64 (eps 1e-6) are good to ~1e-9: a tight rtol catches
    # a derivative that is off by 0.1%
    assert torch.autograd.gradcheck(f, tuple(x.values()) + tuple(h0.values()), atol=1e-8,
                                    rtol=1e-6)


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


@pytest.mark.parametrize("name, kind", [("fir", "shift"), ("iir", "companion"), ("swa", "shift")])
def test_underived_structures_fail_with_a_clear_error(name, kind):
    rec = scancc.get(name).build()
    x = {k: torch.tensor(v, requires_grad=True)
         for k, v in sample_inputs(rec, {d.name: 3 for d in rec.dims if d.size is None}).items()}
    with pytest.raises(IRError, match=f"adjoint of a {kind} transition is not derived yet"):
        scancc.compile(name)(**x)


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
