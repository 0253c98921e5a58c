"""scancc.nn: the thin torch.nn.Module cores against code we did not write.

Each core runs with its own parameters (moved off their initial values, so a parameter wired to
the wrong head or channel shows) and is compared with an independent torch implementation fed
the same parameters: transformers' Mamba / Mamba2 torch scans (ports of mamba_ssm's references),
whole transformers Mamba / Mamba2 mixers with the core in place of their scan, and
flash-linear-attention's naive recurrences. Gradients of every parameter, input and the initial
state are compared with torch autograd through those implementations, and checked by finite
differences in float64 (gradcheck on the core with its parameters as inputs)."""
import copy
import io
import math
import warnings

import pytest
import scancc
import scancc.autograd as ag
from scancc.testing import assert_close, quiet_transformers, within

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
F = torch.nn.functional

from scancc.nn import (DeltaNetCore, GatedDeltaNetCore, GLACore, Mamba2Core,  # noqa: E402
                       MambaCore, ScanLayer)

# report() readies Triton's CPU interpreter before any kernel call can import triton
OTHER_TARGETS = [n for n, ok, _ in scancc.backends.report() if ok and n == "triton"]
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)   # the references compute in float32 internally


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 4)  # T = 7: the backward crosses a chunk boundary


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(g, *shape, dtype=torch.float32):
    """float32-representable values (so references that cast to float32 see them exactly)."""
    return torch.randn(*shape, generator=g).to(dtype)


def scramble(module, g, amount=0.3):
    """Move every parameter off its initialization (D = 1 everywhere hides a head mix-up)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g))


def leaves(module):
    """Detached copies of the parameters, for the independent implementation's graph."""
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


def grads(loss, tensors):
    return torch.autograd.grad(loss, list(tensors.values()))


def assert_grads_close(got, want, names, **tol):
    for a, b, n in zip(got, want, names):
        assert a.abs().max() > 0, f"{n}: zero gradient"
        torch.testing.assert_close(a, b.to(a.dtype), msg=lambda m, n=n: f"grad {n}: {m}",
                                   **(tol or GRAD_TOL))


def assert_misses(got, ref, dtype, what):
    ok, rel, _ = within(got, ref, dtype)
    assert not ok, f"{what}: still matches the reference (rel {rel:.1e})"


@pytest.fixture(scope="module")
def fla():
    with warnings.catch_warnings():  # "Triton is not supported on current platform" on CPU
        warnings.simplefilter("ignore")
        pytest.importorskip("fla", reason="fla-core (the [test] extra) is not installed")
        from fla.ops.delta_rule.naive import delta_rule_recurrence
        from fla.ops.gated_delta_rule import naive_recurrent_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla
    return dict(gla=naive_recurrent_gla, delta=delta_rule_recurrence,
                gated_delta=naive_recurrent_gated_delta_rule)


def l2n(x):
    """fla's in-kernel q/k normalization, x / sqrt(sum x^2 + 1e-6)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


# ---- Mamba2 --------------------------------------------------------------------------------

@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.0, 0.6)], ids=["default", "clamped"])
def test_mamba2_core_matches_transformers_chunk_scan_with_gradients(dt_limit):
    mm2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2",
                              reason="transformers (the [test] extra) is not installed")
    g = gen(0)
    b, T, H, P, G, N = 2, 7, 4, 3, 2, 5
    core = Mamba2Core(H, dt_limit=dt_limit)
    scramble(core, g)
    x = dict(x=rand(g, b, T, H, P), dt=rand(g, b, T, H), B=rand(g, b, T, G, N),
             C=rand(g, b, T, G, N), z=rand(g, b, T, H, P), h0=rand(g, b, H, P, N))
    x = {k: v.requires_grad_() for k, v in x.items()}
    wy, wh = rand(g, b, T, H, P), rand(g, b, H, P, N)

    y, h = core(x["x"], x["dt"], x["B"], x["C"], z=x["z"], initial_state=x["h0"],
                output_final_state=True)
    p = leaves(core)
    with quiet_transformers():   # chunk 4 of T = 7: a padded last chunk
        want_y, want_h = mm2.mamba2_chunk_scan(
            x["x"], x["dt"], -torch.exp(p["A_log"]), x["B"], x["C"], 4, D=p["D"],
            dt_bias=p["dt_bias"], initial_states=x["h0"], dt_softplus=True, dt_limit=dt_limit,
            return_final_states=True)
    want_y = want_y * F.silu(x["z"])      # mamba_ssm's z gate (transformers' scan takes none)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close(y, want_y, "float32")
    assert_close(h, want_h, "float32", "final state")

    got = grads((y * wy).sum() + (h * wh).sum(), {**x, **dict(core.named_parameters())})
    want = grads((want_y * wy).sum() + (want_h * wh).sum(), {**x, **p})
    assert_grads_close(got, want, list(x) + list(p))

    with torch.no_grad():        # the parameters are used: another A_log gives another output
        core.A_log.add_(0.5)
        assert_misses(core(x["x"], x["dt"], x["B"], x["C"], z=x["z"], initial_state=x["h0"]),
                      want_y, "float32", "A_log + 0.5")


def test_mamba2_core_in_place_of_a_transformers_mixers_scan():
    """The core loads a transformers Mamba2Mixer's dt_bias, A_log, D by name (strict); with the
    mixer's projections, conv and gated norm as the user's code around it, the result equals
    the mixer's own forward."""
    mm2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2",
                              reason="transformers (the [test] extra) is not installed")
    from transformers import Mamba2Config
    torch.manual_seed(0)
    cfg = Mamba2Config(hidden_size=8, num_heads=4, head_dim=4, expand=2, state_size=3, n_groups=2,
                       conv_kernel=4, chunk_size=4, num_hidden_layers=1, vocab_size=16)
    mixer = mm2.Mamba2Mixer(cfg, 0).eval()
    scramble(mixer, gen(1), 0.1)
    H, P, N, G, I = cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.n_groups, 16
    core = Mamba2Core(H, dt_limit=cfg.time_step_limit)
    core.load_state_dict({k: v for k, v in mixer.state_dict().items()
                          if k in ("dt_bias", "A_log", "D")}, strict=True)
    hs = rand(gen(2), 2, 7, cfg.hidden_size)
    b, T = hs.shape[:2]

    with torch.no_grad(), quiet_transformers():
        want = mixer(hs)
        gate, xbc, dt = mixer.in_proj(hs).split([I, I + 2 * G * N, H], dim=-1)
        xbc = F.silu(mixer.conv1d(xbc.transpose(1, 2))[..., :T]).transpose(1, 2)
        xs, B, C = xbc.split([I, G * N, G * N], dim=-1)
        y = core(xs.reshape(b, T, H, P), dt, B.reshape(b, T, G, N), C.reshape(b, T, G, N))
        got = mixer.out_proj(mixer.norm(y.reshape(b, T, I), gate))
    assert_close(got, want, "float32")


# ---- Mamba (S6) ----------------------------------------------------------------------------

def test_mamba_core_matches_transformers_selective_scan_with_gradients():
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba",
                             reason="transformers (the [test] extra) is not installed")
    g = gen(3)
    b, d, L, n = 2, 6, 7, 4
    core = MambaCore(d, n)
    scramble(core, g)
    f64 = torch.float64   # transformers keeps the input dtype: a float64 comparison
    x = dict(u=rand(g, b, d, L, dtype=f64), delta=rand(g, b, d, L, dtype=f64),
             B=rand(g, b, n, L, dtype=f64), C=rand(g, b, n, L, dtype=f64),
             z=rand(g, b, d, L, dtype=f64))
    x = {k: v.requires_grad_() for k, v in x.items()}
    wy, ws = rand(g, b, d, L, dtype=f64), rand(g, b, d, n, dtype=f64)

    y, s = core(**x, output_final_state=True)
    p = leaves(core)
    with quiet_transformers():
        want_y, want_s = mm.mamba_selective_scan(
            x["u"], x["delta"], -torch.exp(p["A_log"]), x["B"], x["C"], D=p["D"], z=x["z"],
            delta_bias=p["delta_bias"], delta_softplus=True, return_last_state=True)
    assert y.dtype == f64 and s.dtype == f64
    assert_close(y, want_y, "float64")
    assert_close(s, want_s, "float64", "final state")

    got = grads((y * wy).sum() + (s * ws).sum(), {**x, **dict(core.named_parameters())})
    want = grads((want_y * wy).sum() + (want_s * ws).sum(), {**x, **p})
    # transformers casts B and u to float32 on the way: their gradients carry float32 rounding
    assert_grads_close(got, want, list(x) + list(p), rtol=1e-5, atol=1e-7)

    # initial_state: two halves with the state carried equal the whole
    y1, s1 = core(**{k: v[..., :3] for k, v in x.items()}, output_final_state=True)
    y2, s2 = core(**{k: v[..., 3:] for k, v in x.items()}, initial_state=s1,
                  output_final_state=True)
    assert_close(torch.cat([y1, y2], -1), want_y, "float64", "output with a carried state")
    assert_close(s2, want_s, "float64", "final state after a carried state")


def test_mamba_core_in_place_of_a_transformers_mixers_scan():
    """A transformers MambaMixer's A_log and D load by name; its dt_proj.bias is the scan's
    delta_bias. With the mixer's projections and conv around it, the core reproduces it."""
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba",
                             reason="transformers (the [test] extra) is not installed")
    from transformers import MambaConfig
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=8, state_size=3, expand=2, conv_kernel=4, time_step_rank=2,
                      num_hidden_layers=1, vocab_size=16)
    mixer = mm.MambaMixer(cfg, 0).eval()
    scramble(mixer, gen(4), 0.1)
    I, N, R = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
    core = MambaCore(I, N)
    sd = mixer.state_dict()
    core.load_state_dict({"A_log": sd["A_log"], "D": sd["D"], "delta_bias": sd["dt_proj.bias"]},
                         strict=True)
    hs = rand(gen(5), 2, 7, cfg.hidden_size)
    T = hs.shape[1]

    with torch.no_grad(), quiet_transformers():
        want = mixer(hs)
        xs, gate = mixer.in_proj(hs).transpose(1, 2).chunk(2, dim=1)
        xs = F.silu(mixer.conv1d(xs)[..., :T])
        dt, B, C = mixer.x_proj(xs.transpose(1, 2)).split([R, N, N], dim=-1)
        delta = mixer.dt_proj.weight @ dt.transpose(1, 2)
        y = core(xs, delta, B.transpose(1, 2), C.transpose(1, 2), z=gate)
        got = mixer.out_proj(y.transpose(1, 2))
    assert_close(got, want, "float32")


# ---- flash-linear-attention cores ----------------------------------------------------------

B_, T_, H_, K_, V_ = 2, 7, 2, 4, 3


def attn_inputs(g, *names):
    shapes = dict(q=(B_, T_, H_, K_), k=(B_, T_, H_, K_), v=(B_, T_, H_, V_),
                  g=(B_, T_, H_, K_), a=(B_, T_, H_), beta=(B_, T_, H_), h0=(B_, H_, K_, V_))
    x = {n: rand(g, *shapes[n]) for n in names}
    if "g" in x:
        x["g"] = F.logsigmoid(x["g"] + 2.0)
    if "beta" in x:
        x["beta"] = torch.sigmoid(x["beta"])
    return {k: v.requires_grad_() for k, v in x.items()}


def test_gla_core_matches_fla_naive_recurrent_gla_with_gradients(fla):
    g = gen(6)
    core = GLACore()
    assert list(core.state_dict()) == []
    x = attn_inputs(g, "q", "k", "v", "g", "h0")
    wo, wh = rand(g, B_, T_, H_, V_), rand(g, B_, H_, K_, V_)
    o, h = core(x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"], output_final_state=True)
    want_o, want_h = fla["gla"](x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"],
                                output_final_state=True)
    assert_close(o, want_o, "float32")
    assert_close(h, want_h, "float32", "final state")
    got = grads((o * wo).sum() + (h * wh).sum(), x)
    want = grads((want_o * wo).sum() + (want_h * wh).sum(), x)
    assert_grads_close(got, want, list(x))
    # scale: o is linear in it (the default is K^-1/2)
    o2 = GLACore(scale=0.3)(x["q"], x["k"], x["v"], x["g"], initial_state=x["h0"])
    assert_close(o2, want_o * 0.3 * math.sqrt(K_), "float32", "scale=0.3")


def test_delta_net_core_matches_fla_delta_rule_recurrence_with_gradients(fla):
    g = gen(7)
    core = DeltaNetCore()   # q, k normalized in the kernel (fla's qk_norm='l2')
    x = attn_inputs(g, "q", "k", "v", "beta", "h0")
    wo, wh = rand(g, B_, T_, H_, V_), rand(g, B_, H_, K_, V_)
    o, h = core(x["q"], x["k"], x["v"], x["beta"], initial_state=x["h0"],
                output_final_state=True)
    th = lambda t: t.transpose(1, 2)  # noqa: E731  (fla's naive delta rule is head-major)
    want_o, want_h = fla["delta"](th(l2n(x["q"])), th(l2n(x["k"])), th(x["v"]), th(x["beta"]),
                                  initial_state=x["h0"], output_final_state=True)
    want_o = th(want_o)
    assert_close(o, want_o, "float32")
    assert_close(h, want_h, "float32", "final state")
    got = grads((o * wo).sum() + (h * wh).sum(), x)
    want = grads((want_o * wo).sum() + (want_h * wh).sum(), x)
    assert_grads_close(got, want, list(x))


def test_gated_delta_net_core_matches_fla_naive_gated_delta_rule_with_gradients(fla):
    g = gen(8)
    core = GatedDeltaNetCore(H_, scale=0.4)
    scramble(core, g)
    x = attn_inputs(g, "q", "k", "v", "a", "beta", "h0")
    wo, wh = rand(g, B_, T_, H_, V_), rand(g, B_, H_, K_, V_)
    o, h = core(x["q"], x["k"], x["v"], x["a"], x["beta"], initial_state=x["h0"],
                output_final_state=True)
    p = leaves(core)   # fla's GatedDeltaNet layer: g = -exp(A_log) * softplus(a + dt_bias)
    gate = -torch.exp(p["A_log"]) * F.softplus(x["a"] + p["dt_bias"])
    want_o, want_h = fla["gated_delta"](l2n(x["q"]), l2n(x["k"]), x["v"], x["beta"], gate,
                                        scale=0.4, initial_state=x["h0"],
                                        output_final_state=True)
    assert_close(o, want_o, "float32")
    assert_close(h, want_h, "float32", "final state")
    got = grads((o * wo).sum() + (h * wh).sum(), {**x, **dict(core.named_parameters())})
    want = grads((want_o * wo).sum() + (want_h * wh).sum(), {**x, **p})
    assert_grads_close(got, want, list(x) + list(p))


# ---- finite differences, float64 ------------------------------------------------------------

def _gradcheck_case(name, g):
    """(float64 core, its inputs by name) at tiny sizes, T = 5 across chunks of 4."""
    d = torch.float64
    r = lambda *s: rand(g, *s, dtype=d)  # noqa: E731
    b, T, H, K, V = 1, 5, 2, 2, 2
    if name == "mamba2":
        core, x = Mamba2Core(H), dict(x=r(b, T, H, 2), dt=r(b, T, H), B=r(b, T, 1, 2),
                                      C=r(b, T, 1, 2), z=r(b, T, H, 2))
    elif name == "mamba":
        core, x = MambaCore(3, 2), dict(u=r(b, 3, T), delta=r(b, 3, T), B=r(b, 2, T),
                                        C=r(b, 2, T), z=r(b, 3, T))
    else:
        x = dict(q=r(b, T, H, K), k=r(b, T, H, K), v=r(b, T, H, V))
        if name == "gla":
            core, x["g"] = GLACore(), F.logsigmoid(r(b, T, H, K) + 2.0)
        elif name == "delta_net":
            core, x["beta"] = DeltaNetCore(), torch.sigmoid(r(b, T, H))
        else:
            core = GatedDeltaNetCore(H)
            x["a"], x["beta"] = r(b, T, H), torch.sigmoid(r(b, T, H))
    scramble(core, g)
    return core.double(), x


@pytest.mark.parametrize("name", ["mamba2", "mamba", "gla", "delta_net", "gated_delta_net"])
def test_gradcheck_parameters_and_inputs_in_float64(name):
    core, x = _gradcheck_case(name, gen(9))
    pnames, xnames = [n for n, _ in core.named_parameters()], list(x)

    def f(*ts):
        params = dict(zip(pnames, ts[:len(pnames)]))
        return torch.func.functional_call(core, params, tuple(ts[len(pnames):]))

    args = tuple(p.detach().clone().requires_grad_() for p in core.parameters()) + \
        tuple(v.detach().clone().requires_grad_() for v in x.values())
    assert all(a.dtype == torch.float64 for a in args), [a.dtype for a in args]
    # fast mode: random projections of the Jacobian, each exact to finite-difference precision
    assert torch.autograd.gradcheck(f, args, atol=1e-8, rtol=1e-6, fast_mode=True), \
        (pnames, xnames)


# ---- training -----------------------------------------------------------------------------

class TinyMamba2(torch.nn.Module):
    """A Mamba2-style block: the user's projections around the core."""

    def __init__(self, d=6, H=2, P=3, N=4):
        super().__init__()
        self.H, self.P, self.N = H, P, N
        self.in_proj = torch.nn.Linear(d, H * P + H + 2 * N)
        self.core = Mamba2Core(H)
        self.out_proj = torch.nn.Linear(H * P, d)

    def forward(self, u):
        b, T, _ = u.shape
        x, dt, B, C = self.in_proj(u).split([self.H * self.P, self.H, self.N, self.N], -1)
        y = self.core(x.reshape(b, T, self.H, self.P), dt, B.reshape(b, T, 1, self.N),
                      C.reshape(b, T, 1, self.N))
        return self.out_proj(y.reshape(b, T, -1))


class TinyGatedDeltaNet(torch.nn.Module):
    def __init__(self, d=6, H=2, K=3):
        super().__init__()
        self.H, self.K = H, K
        self.proj = torch.nn.Linear(d, 3 * H * K + 2 * H)
        self.core = GatedDeltaNetCore(H)
        self.out_proj = torch.nn.Linear(H * K, d)

    def forward(self, u):
        b, T, _ = u.shape
        q, k, v, a, beta = self.proj(u).split([self.H * self.K] * 3 + [self.H] * 2, -1)
        hk = lambda t: t.reshape(b, T, self.H, self.K)  # noqa: E731
        o = self.core(hk(q), hk(k), hk(v), a, torch.sigmoid(beta))
        return self.out_proj(o.reshape(b, T, -1))


@pytest.mark.parametrize("model_cls", [TinyMamba2, TinyGatedDeltaNet])
def test_a_few_adam_steps_reduce_the_loss_and_move_the_core_parameters(model_cls):
    torch.manual_seed(0)
    model = model_cls()
    u = rand(gen(10), 2, 12, 6)
    target = torch.roll(u, 1, dims=1)          # recall the previous token
    before = {n: p.detach().clone() for n, p in model.core.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    losses = []
    for _ in range(12):
        loss = (model(u) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in model.core.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            assert p.grad.abs().max() > 0, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.core.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def test_torch_compile_traces_a_model_with_a_core_in_one_graph():
    model = TinyMamba2()
    explain = torch._dynamo.explain(model)(rand(gen(16), 2, 5, 6))
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons


# ---- parameters, names, initialization --------------------------------------------------------

def test_state_dict_names_shapes_and_initialization():
    torch.manual_seed(0)
    m2 = Mamba2Core(8)
    assert [(k, tuple(v.shape)) for k, v in m2.state_dict().items()] == \
        [("dt_bias", (8,)), ("A_log", (8,)), ("D", (8,))]
    dt = F.softplus(m2.dt_bias)
    assert (dt >= 1e-3 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()
    assert (m2.A_log.exp() >= 1).all() and (m2.A_log.exp() <= 16).all()
    assert torch.equal(m2.D, torch.ones(8))

    m1 = MambaCore(5, 3)
    assert [(k, tuple(v.shape)) for k, v in m1.state_dict().items()] == \
        [("A_log", (5, 3)), ("D", (5,)), ("delta_bias", (5,))]
    assert torch.allclose(m1.A_log.exp(), torch.tensor([1.0, 2.0, 3.0]).expand(5, 3))
    dt = F.softplus(m1.delta_bias)
    assert (dt >= 1e-3 - 1e-7).all() and (dt <= 0.1 + 1e-7).all()

    gd = GatedDeltaNetCore(6)
    assert [(k, tuple(v.shape)) for k, v in gd.state_dict().items()] == \
        [("A_log", (6,)), ("dt_bias", (6,))]
    assert (gd.A_log.exp() <= 16).all()

    assert list(GLACore().state_dict()) == list(DeltaNetCore().state_dict()) == []
    for core in (m2, m1, gd):
        assert all(p.dtype == torch.float32 and p._no_weight_decay for p in core.parameters())

    # reset_parameters draws again; load_state_dict round-trips
    m2b = Mamba2Core(8)
    assert not torch.equal(m2b.dt_bias, m2.dt_bias)
    m2b.load_state_dict(m2.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m2b.parameters(), m2.parameters()))


def test_copy_save_and_load_rebuild_the_kernel():
    g = gen(11)
    core = Mamba2Core(2)
    args = (rand(g, 1, 4, 2, 3), rand(g, 1, 4, 2), rand(g, 1, 4, 1, 2), rand(g, 1, 4, 1, 2))
    y = core(*args)
    buf = io.BytesIO()
    torch.save(core, buf)
    buf.seek(0)
    for other in (copy.deepcopy(core), torch.load(buf, weights_only=False)):
        assert torch.equal(other(*args), y)


def test_half_precision_inputs_with_float32_parameters():
    g = gen(12)
    core = GatedDeltaNetCore(H_)
    x = {k: v.detach() for k, v in attn_inputs(g, "q", "k", "v", "a", "beta").items()}
    want = core(*x.values())
    xb = {k: v.bfloat16().requires_grad_() for k, v in x.items()}
    o = core(*xb.values())
    assert o.dtype == torch.bfloat16
    assert_close(o.float(), want, "bfloat16")
    o.float().pow(2).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in core.parameters())
    assert all(v.grad.dtype == torch.bfloat16 for v in xb.values())


def test_scan_layer_wraps_any_recurrence():
    g = gen(13)
    layer = ScanLayer("retnet", scale=0.5)
    q, k, v = rand(g, 1, 5, 2, 3), rand(g, 1, 5, 2, 3), rand(g, 1, 5, 2, 4)
    o, S = layer(q, k, v, output_final_state=True)
    want = scancc.compile("retnet", scale=0.5)(q, k, v)
    assert torch.equal(o, want) and S.shape == (1, 2, 3, 4)
    assert list(layer.state_dict()) == [] and "retnet" in repr(layer)


# ---- errors ---------------------------------------------------------------------------------

def test_bad_shapes_raise_the_kernels_clear_error():
    g = gen(14)
    x, dt = rand(g, 1, 5, 3, 2), rand(g, 1, 5, 3)
    B = C = rand(g, 1, 5, 1, 4)
    with pytest.raises(scancc.InputError, match=r"input 'A': dim 'heads' has size 4.*heads=3"):
        Mamba2Core(4)(x, dt, B, C)                       # 3 heads in, a 4-head core
    with pytest.raises(scancc.InputError, match=r"input 'B': expected 4 dims"):
        Mamba2Core(3)(x, dt, B[:, :, 0], C)
    with pytest.raises(scancc.InputError, match=r"input 'C': dim 'time'"):
        Mamba2Core(3)(x, dt, B, C[:, :4])
    u = rand(g, 1, 6, 5)
    with pytest.raises(scancc.InputError, match=r"input 'B': dim 'dstate' has size 2"):
        MambaCore(6, 3)(u, u, rand(g, 1, 2, 5), rand(g, 1, 2, 5))
    q = rand(g, 1, 5, 2, 3)
    with pytest.raises(scancc.InputError, match=r"input 'g': expected 4 dims"):
        GLACore()(q, q, q, rand(g, 1, 5, 2))
    with pytest.raises(scancc.InputError, match=r"input 'a'.*heads=2"):
        GatedDeltaNetCore(2)(q, q, q, rand(g, 1, 5, 3), rand(g, 1, 5, 2))
    with pytest.raises(scancc.InputError, match=r"initial_state 'S': expected shape"):
        DeltaNetCore()(q, q, q, rand(g, 1, 5, 2), initial_state=rand(g, 1, 2, 3, 4))


# ---- other backends -------------------------------------------------------------------------

@pytest.mark.parametrize("target", OTHER_TARGETS)
def test_cores_on_another_backend_match_the_reference_target(target):
    g = gen(15)
    ref, dev = Mamba2Core(2), Mamba2Core(2, target=target)
    dev.load_state_dict(ref.state_dict())
    args = [rand(g, 1, 5, 2, 3), rand(g, 1, 5, 2), rand(g, 1, 5, 1, 4), rand(g, 1, 5, 1, 4)]
    assert_close(dev(*args), ref(*args), "float32", f"Mamba2Core on {target}")
    dev(*args).pow(2).sum().backward()   # the backward runs where scancc.autograd puts it
    ref(*args).pow(2).sum().backward()
    for (n, a), b in zip(dev.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n, **GRAD_TOL)
    q = [rand(g, 1, 5, 2, 3) for _ in range(3)] + [F.logsigmoid(rand(g, 1, 5, 2, 3))]
    assert_close(GLACore(target=target)(*q), GLACore()(*q), "float32", f"GLACore on {target}")
