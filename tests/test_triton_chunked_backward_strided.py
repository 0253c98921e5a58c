"""The Triton chunked backward's strided factors (backends/triton/chunked_backward.py
``_direct``, chunked_backward_kernels.py's module doc): a factor that is one input (or an
output cotangent, maybe times a constant) is read where it lies -- non-contiguous views,
bfloat16, mamba2's B and C per group -- and a gradient that is exactly a factor's cotangent
is written by the kernels in place. Gradients against the reference backend's float64
derived adjoint; every kernel-written buffer starts NaN (POISON)."""
import numpy as np
import pytest
import scancc
from scancc import autograd as ag
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
if not scancc.backends.get("triton").available()[0]:
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

from scancc.backends.triton import chunked_backward as cb  # noqa: E402

SMALL = {"block_sizes": {"time": 16}}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(cb, "POISON", True)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch: (kernel name, positional args)."""
    seen = []
    real = cb.kernels()

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def call(*args, **kw):
                seen.append((self.k.fn.__name__, args))
                return self.k[grid](*args, **kw)
            return call
    monkeypatch.setattr(cb, "kernels", lambda: tuple(Spy(k) for k in real))
    return seen


def _case(name, T, build, seed=0, **over):
    e = scancc.get(name)
    rec = e.build(**build)
    sizes = default_sizes(rec, time=T, **{"key": 5, "value": 3, "heads": 2, "dstate": 3,
                                          "headdim": 2, **over})
    x = sample_inputs(rec, sizes, seed, e.hints)
    h0 = sample_state(rec, sizes, seed + 1)
    rng = np.random.default_rng(seed + 2)
    dy = {o.name: rng.standard_normal(tuple(sizes[d] for d in o.dims)) for o in rec.outputs}
    dh = {s.name: rng.standard_normal(tuple(sizes[d] for d in s.dims)) for s in rec.states}
    return rec, sizes, x, h0, dy, dh


def _strided(a, dtype=torch.float32):
    """``a`` as a non-contiguous view of the same values: stored with its axes reversed."""
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(a))).to(dtype)
    v = t.permute(tuple(reversed(range(t.dim()))))
    assert v.dim() < 2 or not v.is_contiguous()
    return v


def _run(rec, sizes, x, h0, dy, dh, dtype=torch.float32, strided=True):
    conv = _strided if strided else (lambda a, dt: torch.from_numpy(a).to(dt))
    xs = {k: conv(v, dtype) for k, v in x.items()}
    ys = {k: conv(v, dtype) for k, v in dy.items()}
    s0 = {k: torch.from_numpy(v).float() for k, v in h0.items()}
    ds = {k: torch.from_numpy(v).float() for k, v in dh.items()}
    return xs, ys, cb.backward(rec, xs, ys, sizes, s0, ds, SMALL)


def _check(rec, x, h0, dy, dh, got, T, what, dtype="float32"):
    want, want0 = ag.backward(rec, x, dy, h0, dh)
    g, g0 = got
    for k in want:
        assert_close(g[k].double().numpy(), want[k], dtype, f"{what} d{k}", T=T)
    for k in want0:
        assert_close(g0[k].double().numpy(), want0[k], dtype, f"{what} d{k}_0", T=T)


@pytest.mark.parametrize("name", ["linear_attn", "simple_gla", "gla"])
def test_strided_inputs_are_read_in_place(name, launches):
    """Non-contiguous q, k, v, g and dO views: the kernels get the views' own storage (no
    copy); dq, dk, dv (and dg) are written by them into the gradients handed back."""
    rec, sizes, x, h0, dy, dh = _case(name, 37, {}, seed=3)
    xs, ys, got = _run(rec, sizes, x, h0, dy, dh)
    _check(rec, x, h0, dy, dh, got, 37, name)
    ptrs = {a.data_ptr() for _, args in launches for a in args if isinstance(a, torch.Tensor)}
    for k, v in xs.items():
        assert v.data_ptr() in ptrs, f"{k} was copied before the kernels"
        assert got[0][k].data_ptr() in ptrs, f"d{k} was not written by the kernels"
    # dO = d_o * rsqrt(K): the cotangent itself, with the scale as an argument
    assert ys["o"].data_ptr() in ptrs


def test_mamba2_B_and_C_are_read_per_group(launches):
    """mamba2 with 2 groups of 2 heads: the kernels read B and C themselves (group ratio 2 on
    the heads index), dy as dO; the gradients equal the reference's."""
    rec, sizes, x, h0, dy, dh = _case("mamba2", 37, {"D": True}, seed=5, groups=2, heads=4)
    xs, ys, got = _run(rec, sizes, x, h0, dy, dh)
    _check(rec, x, h0, dy, dh, got, 37, "mamba2 grouped")
    name, args = next(a for a in launches if a[0] == "bwd_dqk")
    q = args[:7]                    # q, its outer / inner strides and ratios, time, feature
    k = args[7:14]
    assert q[0].data_ptr() == xs["C"].data_ptr() and k[0].data_ptr() == xs["B"].data_ptr()
    assert (q[3], q[4]) == (1, 2) and (k[3], k[4]) == (1, 2)  # heads // 2 -> the group
    assert args[35].data_ptr() == ys["y"].data_ptr()          # dO (after q k v g w) is dy


def test_bfloat16_inputs_read_in_their_dtype(launches):
    """bfloat16 tensors straight to the chunked backward: the direct factors reach the kernels
    in bfloat16 (converted on load); gradients within the bfloat16 tolerance of the float64
    reference on the same rounded values."""
    rec, sizes, x, h0, dy, dh = _case("simple_gla", 37, {}, seed=7)
    xs, ys, got = _run(rec, sizes, x, h0, dy, dh, dtype=torch.bfloat16, strided=False)
    bf = {k: v.double().numpy() for k, v in xs.items()}
    bdy = {k: v.double().numpy() for k, v in ys.items()}
    _check(rec, bf, h0, bdy, dh, got, 37, "simple_gla bf16", "bfloat16")
    dtypes = {a.dtype for _, args in launches for a in args if isinstance(a, torch.Tensor)}
    assert torch.bfloat16 in dtypes


def test_a_factor_broadcast_along_a_grid_dim():
    """A user recurrence whose k lacks the heads dim (one k per batch row, shared by every
    head): read with a zero stride along heads; its gradient (a sum over heads) through the
    chain rule."""
    from scancc.ir import Builder, dot, scalar, sigmoid
    r = Builder("shared_k")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    k_, v_ = r.dim("key"), r.dim("value")
    q, kk = r.input("q", [b, t, h, k_]), r.input("k", [b, t, k_])
    vv, g = r.input("v", [b, t, h, v_]), r.input("g", [b, t, h])
    S = r.state("S", [b, h, k_, v_], scalar(sigmoid(g)), inject=kk * vv)
    r.output("o", [b, t, h, v_], dot(S, q, k_))
    rec = r.build()
    assert cb.applies(rec) == (True, "")
    sizes = default_sizes(rec, time=37, key=5, value=3, heads=2)
    x = sample_inputs(rec, sizes, 13)
    h0 = sample_state(rec, sizes, 14)
    rng = np.random.default_rng(15)
    dy = {"o": rng.standard_normal(tuple(sizes[d] for d in rec.outputs[0].dims))}
    dh = {"S": rng.standard_normal(tuple(sizes[d] for d in rec.states[0].dims))}
    _, _, got = _run(rec, sizes, x, h0, dy, dh)
    _check(rec, x, h0, dy, dh, got, 37, "shared_k")


def test_mamba2_scaled_v_in_several_blocks():
    """mamba2 (z gate, dt_softplus, dt_bias) with headdim and dstate of 20 in blocks of 16:
    two V-blocks each write their share of dL/dw (w = dt, the injected term's per-step
    scalar, summed over the blocks) and two K-blocks their share of dg; grouped B and C."""
    rec, sizes, x, h0, dy, dh = _case(
        "mamba2", 37, {"dt_softplus": True, "D": True, "z": True, "dt_bias": True}, seed=9,
        groups=2, heads=4, headdim=20, dstate=20)
    assert cb.plan(rec).w is not None
    opts = {"block_sizes": {"time": 16, "headdim": 16, "dstate": 16}}
    xs = {k: _strided(v) for k, v in x.items()}
    got = cb.backward(rec, xs, {k: _strided(v) for k, v in dy.items()}, sizes,
                      {k: torch.from_numpy(v).float() for k, v in h0.items()},
                      {k: torch.from_numpy(v).float() for k, v in dh.items()}, opts)
    _check(rec, x, h0, dy, dh, got, 37, "mamba2 blocks")


def test_sequential_passes_take_wider_v_tiles(monkeypatch):
    """Default blocks at V = 100: fwd_h and bwd_dh walk the chunks with one 128-wide V tile
    (chunked_backward.SEQ_BV), the per-chunk kernels with two of 64; gradients equal the
    reference's."""
    grids = []
    real = cb.kernels()

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def call(*args, **kw):
                grids.append((self.k.fn.__name__, grid, kw["BV"]))
                return self.k[grid](*args, **kw)
            return call
    monkeypatch.setattr(cb, "kernels", lambda: tuple(Spy(k) for k in real))
    rec, sizes, x, h0, dy, dh = _case("simple_gla", 37, {}, seed=17, value=100, heads=1)
    got = cb.backward(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                      {k: torch.from_numpy(v).float() for k, v in dy.items()}, sizes,
                      {k: torch.from_numpy(v).float() for k, v in h0.items()},
                      {k: torch.from_numpy(v).float() for k, v in dh.items()}, {})
    _check(rec, x, h0, dy, dh, got, 37, "simple_gla V=100")
    G, bvs = sizes["batch"], cb.SEQ_BV
    nvs = -(-100 // bvs)
    assert grids == [("fwd_h", (G, 1, nvs), bvs), ("bwd_dh", (G, 1, nvs), bvs),
                     ("bwd_dv", (G, 1, 2), 64), ("bwd_dqk", (G, 1, 1), 64)]


def test_autograd_hands_16bit_inputs_over_uncast(monkeypatch):
    """``scancc.autograd.backward`` gives the chunked backward bfloat16 tensors as they are
    (no float32 copy of every input first); the gradients come back float32 within the
    bfloat16 tolerance of the reference on the same rounded values."""
    seen = []
    real = cb.backward

    def spy(rec, inputs, d_out, *a, **k):
        seen.append({v.dtype for v in list(inputs.values()) + list(d_out.values())})
        return real(rec, inputs, d_out, *a, **k)
    from scancc.backends import get
    monkeypatch.setattr(type(get("triton")), "chunked_backward",
                        lambda self, rec, options: spy)
    rec, sizes, x, h0, dy, dh = _case("linear_attn", 21, {}, seed=19)
    bf = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in x.items()}
    bdy = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in dy.items()}
    got = ag.backward(rec, bf, bdy, target="triton", options=SMALL)
    assert seen == [{torch.bfloat16}]
    want, _ = ag.backward(rec, {k: v.double().numpy() for k, v in bf.items()},
                          {k: v.double().numpy() for k, v in bdy.items()})
    for k in want:
        assert got[0][k].dtype == torch.float32
        assert_close(got[0][k].double().numpy(), want[k], "bfloat16", f"d{k}", T=21)


# which gradients get exactly the reference's NaN entries for one NaN in an input factor at
# step 20 (T=37, 16-step chunks); the others (the products over time inside tensor-core dots,
# 0 * NaN, and dg's reverse cumulative sum) get a superset, within the NaN's chunk
EXACT_NAN = {("gla", "q"): "qkvg", ("gla", "k"): "qkv", ("gla", "v"): "qkv",
             ("simple_gla", "q"): "qv", ("simple_gla", "k"): "kv",
             ("simple_gla", "v"): "qkv"}


@pytest.mark.parametrize("name, which", sorted(EXACT_NAN))
def test_a_nan_input_reaches_the_gradients_the_reference_does(name, which):
    """A NaN in one element of q, k or v: the causal masks select rather than multiply, so
    the NaN stays out of the steps the recurrence does not reach from it (the gradients in
    EXACT_NAN match the float64 reference's NaN entries exactly); every other gradient's
    NaN entries include the reference's (none is lost)."""
    rec, sizes, x, h0, dy, dh = _case(name, 37, {}, seed=23)
    x[which][0, 20, 1, 1] = np.nan
    want, _ = ag.backward(rec, x, dy)
    got, _ = cb.backward(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                         {k: torch.from_numpy(v).float() for k, v in dy.items()}, sizes, None,
                         None, SMALL)
    for k in want:
        ref, mine = np.isnan(want[k]), torch.isnan(got[k]).numpy()
        assert ref.any() or k == which, k
        if k in EXACT_NAN[(name, which)]:
            assert (ref == mine).all(), f"d{k}: {mine.sum()} NaN, the reference {ref.sum()}"
            ok = ~ref
            assert_close(got[k].double().numpy()[ok], want[k][ok], "float32", f"d{k}", T=37)
        else:
            assert (mine >= ref).all(), f"d{k} lost NaN entries"
