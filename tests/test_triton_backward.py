"""Derived backward recurrences (docs/training.md) lowered to Triton, against the reference:
they use step() and prev() (the state entering a step), which the recurrent lowering keeps as
a register copy; ungroup() (mamba/mamba2's grad_B/grad_C sum over the channels/heads of a
group, held by different programs) as an atomic add of each program's sum into its group.
The adjoint-step kinds of shift/companion/dense states are plain register updates."""
import numpy as np
import pytest
import scancc
from scancc.autograd import has_adjoint
from scancc import registry
from scancc.autograd import adjoint
from scancc.backends import UnsupportedError
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
if not scancc.backends.get("triton").available()[0]:
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

# every library recurrence (bmojo's backward, ~100 s a case in the interpreter: `-m slow`;
# tests/test_bmojo_grad.py runs its Triton gradients in the default run)
LOWERED = [pytest.param(n, marks=pytest.mark.slow) if n == "bmojo" else n
           for n in registry.names() if registry.get(n).origin == "library"
           and has_adjoint(registry.get(n).build())]


def _case(name, T=19, seed=0):
    e = scancc.get(name)
    rec = e.build(**{o: True for o in e.optional_inputs})
    b = adjoint(rec).backward
    sizes = default_sizes(b, time=T, key=5, value=3, heads=2, chan=3, dstate=3, order=3)
    x = sample_inputs(b, sizes, seed, {k: v for k, v in e.hints.items() if k in
                                       {i.name for i in b.inputs}})
    return b, x, sample_state(b, sizes, seed + 1)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", LOWERED)
def test_backward_recurrence_on_triton_matches_reference(name, with_state):
    b, x, h0 = _case(name)
    init = h0 if with_state else None
    want_y, want_h = scancc.compile(b)(**x, initial_state=init, output_final_state=True)
    k = scancc.compile(b, target="triton")
    assert k.backend.algorithm(b, {}) == "recurrent"  # prev() rules out the chunked form
    xs = {n: torch.from_numpy(v).float() for n, v in x.items()}
    hs = {n: torch.from_numpy(v).float() for n, v in h0.items()} if with_state else None
    got_y, got_h = k(**xs, initial_state=hs, output_final_state=True)
    for n in want_y:
        assert_close(got_y[n], want_y[n], "float32", f"{name} backward {n}")
    want_h = want_h if isinstance(want_h, dict) else {b.states[0].name: want_h}
    got_h = got_h if isinstance(got_h, dict) else {b.states[0].name: got_h}
    for n in want_h:
        assert_close(got_h[n], want_h[n], "float32", f"{name} backward final {n}")


def test_prev_reads_the_state_entering_the_step():
    from scancc.ir import Builder, Node, Op, prev, scalar
    r = Builder("prev_probe")
    bt, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [bt, t, d])
    r.state("h", [bt, d], scalar(Node(Op.CONST, (), 0.5)), inject=x)
    r.output("y", [bt, t, d], prev("h"))
    rec = r.build()
    xs = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)
    y = scancc.compile(rec, target="triton")(xs, initial_state=torch.full((1, 1), 8.0))
    want, h = [], 8.0
    for v in range(6):
        want.append(h)
        h = 0.5 * h + v
    np.testing.assert_allclose(y[0, :, 0].numpy(), want)


@pytest.mark.parametrize("name, over", [("mamba", {"groups": 2, "chan": 6}),
                                        ("mamba2", {"groups": 2, "heads": 4})])
def test_grouped_backward_sums_each_group(name, over):
    """grad_B/grad_C = ungroup(.., chan/heads, groups): the programs of a group add into it."""
    e = scancc.get(name)
    b = adjoint(e.build(**{o: True for o in e.optional_inputs})).backward
    sizes = default_sizes(b, time=11, key=5, value=3, dstate=3, headdim=2, **over)
    x = sample_inputs(b, sizes, 4, {k: v for k, v in e.hints.items() if k in
                                    {i.name for i in b.inputs}})
    want = scancc.compile(b)(**x)
    got = scancc.compile(b, target="triton")(**{n: torch.from_numpy(v).float()
                                                 for n, v in x.items()})
    for n in want:
        assert_close(got[n], want[n], "float32", f"{name} backward {n}")


def test_ungroup_inside_an_expression_is_unsupported():
    from scancc.ir import Builder, const, diagonal, ungroup
    r = Builder("triton_test_ungroup_inner")
    bt, t, c, g = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan"), \
        r.dim("groups", "group", 2)
    x = r.input("x", [bt, t, c])
    s = r.state("s", [bt, c], diagonal(const(0.5)), inject=x)
    r.output("y", [bt, t, g], ungroup(s, c, g) * 2.0)
    with pytest.raises(UnsupportedError,
                       match=r"ungroup.* inside an expression \(lowered only as a whole output\)"):
        scancc.compile(r.build(), target="triton")


@pytest.mark.parametrize("with_state", [False, True])
def test_adjoint_step_kinds_match_reference(with_state):
    from scancc.testing import adjoint_steps_recurrence
    rec = adjoint_steps_recurrence()
    sizes = default_sizes(rec, time=13, batch=2, heads=2, w=5, n=3, c=3)
    x = sample_inputs(rec, sizes, 2, {"m": "small", "f": "small"})
    h0 = sample_state(rec, sizes, 3) if with_state else None
    want_y, want_h = scancc.compile(rec)(**x, initial_state=h0, output_final_state=True)
    t = {n: torch.from_numpy(v).float() for n, v in x.items()}
    th = {n: torch.from_numpy(v).float() for n, v in h0.items()} if with_state else None
    got_y, got_h = scancc.compile(rec, target="triton")(**t, initial_state=th,
                                                        output_final_state=True)
    for n in want_y:
        assert_close(got_y[n], want_y[n], "float32", n)
    for n in want_h:
        assert_close(got_h[n], want_h[n], "float32", f"final {n}")


def test_registered_custom_recurrence_trains_on_triton(gated_iir):
    """examples/gated_iir.py: gradients from Triton forward + Triton backward kernels equal
    the reference's (float64)."""
    rec = gated_iir.build()
    sizes = default_sizes(rec, time=70, batch=2, chan=3, order=3)
    x = sample_inputs(rec, sizes, 4, gated_iir.hints)
    ker = scancc.compile("gated_iir", target="triton")
    assert scancc.autograd.backward_target(ker, rec) == "triton"
    dev = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in x.items()}
    ref = {k: torch.tensor(v, requires_grad=True) for k, v in x.items()}
    wgt = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 70, 3)))
    got = torch.autograd.grad((ker(**dev) * wgt.float()).sum(), list(dev.values()))
    want = torch.autograd.grad((scancc.compile("gated_iir")(**ref) * wgt).sum(),
                               list(ref.values()))
    for a, b, n in zip(got, want, x):
        assert_close(a.double().numpy(), b.numpy(), "float32", n)


# ---- the tiled backward (issue 12): batch on the grid, state tiles that fit registers ----
#
# A dim that only the backward's output sums mix, linearly, is no longer held whole
# (backends/triton/plan.py partial_dims): batch (summed into the gradients of time-invariant
# inputs) is a grid dim, and one feature dim of a K x V state (gla: key, summed into
# grad_v; gated_delta_net: value, summed into grad_q/grad_k/grad_g/grad_beta; mamba2:
# headdim) is split into blocks; the outputs summed over them are added into atomically.
# Forced small blocks give several blocks per program row (the last one masked).

TILED = [  # (recurrence, sizes, block_sizes forcing several blocks, grid dims, split dims)
    ("gla", {"batch": 3, "heads": 2, "key": 5, "value": 3}, {"key": 2},
     ("batch", "heads"), ("key",)),
    ("gated_delta_net", {"batch": 2, "heads": 2, "key": 4, "value": 5}, {"value": 2},
     ("batch", "heads"), ("value",)),
    ("mamba2", {"batch": 3, "heads": 2, "headdim": 5, "dstate": 3, "groups": 1},
     {"headdim": 2}, ("batch", "heads"), ("headdim",)),
    ("mamba", {"batch": 3, "chan": 5, "dstate": 3, "groups": 1}, {"chan": 2},
     ("batch",), ("chan",)),
]


def _tiled_case(name, sizes, T, seed):
    e = scancc.get(name)
    rec = e.build(**{o: True for o in e.optional_inputs})
    b = adjoint(rec).backward
    sz = default_sizes(b, time=T, **sizes)
    hints = {k: v for k, v in e.hints.items() if k in {i.name for i in b.inputs}}
    return rec, b, sz, sample_inputs(b, sz, seed, hints), sample_state(b, sz, seed + 1)


@pytest.mark.parametrize("name, sizes, blocks, grid, split", TILED,
                         ids=[c[0] for c in TILED])
def test_tiled_backward_plan(name, sizes, blocks, grid, split):
    """batch is a grid dim (one program per index, as in the forward), the split feature dim
    is split, and at the realistic shapes the launcher's blocks hold at most TILE_ELEMENTS
    state elements per program (the mamba2 backward held all of batch x headdim x dstate)."""
    from scancc.backends.triton import _lowering
    from scancc.backends.triton.plan import TILE_ELEMENTS
    e = scancc.get(name)
    b = adjoint(e.build(**{o: True for o in e.optional_inputs})).backward
    L = _lowering(b, {})
    assert L.algorithm == "recurrent"
    assert L.plan.grid == grid and L.plan.split == split
    assert "batch" in L.plan.grid and "batch" not in L.plan.regs
    assert L.plan.partial == {"gla": ("key",), "gated_delta_net": ("value",),
                              "mamba2": ("batch", "headdim"), "mamba": ("batch",)}[name]
    real = {"gla": dict(heads=16, key=128, value=128),
            "gated_delta_net": dict(heads=16, key=128, value=128),
            "mamba2": dict(heads=80, headdim=64, dstate=128, groups=1),
            "mamba": dict(chan=5120, dstate=16, groups=1)}[name]
    sz = default_sizes(b, batch=8, time=64, **real)
    _, const = L.compile_args(sz, "float32")
    tile = 1
    for d in L.plan.regs:
        tile *= const[L.block[d]]
    assert tile <= TILE_ELEMENTS, (name, {d: const[L.block[d]] for d in L.plan.regs})
    # the launcher's own default (the expression it evaluates) agrees with compile_args
    src = L.render()
    for d in split:
        assert f"{TILE_ELEMENTS} //" in src.split(f'{L.block[d]} = ')[1].splitlines()[0]


@pytest.mark.parametrize("with_state", [pytest.param(False, marks=pytest.mark.slow), True])
@pytest.mark.parametrize("name, sizes, blocks, grid, split", TILED,
                         ids=[c[0] for c in TILED])
def test_tiled_backward_recurrence_matches_reference(name, sizes, blocks, grid, split,
                                                     with_state):
    """Several blocks of the split dim and B > 1: every output (the atomically summed ones
    included) equals the reference's, and so do the final adjoint states."""
    _, b, _, x, h0 = _tiled_case(name, sizes, 9, 3)
    init = h0 if with_state else None
    want_y, want_h = scancc.compile(b)(**x, initial_state=init, output_final_state=True)
    k = scancc.compile(b, target="triton", block_sizes=blocks)
    xs = {n: torch.from_numpy(v).float() for n, v in x.items()}
    hs = {n: torch.from_numpy(v).float() for n, v in h0.items()} if with_state else None
    got_y, got_h = k(**xs, initial_state=hs, output_final_state=True)
    for n in want_y:
        assert np.isfinite(got_y[n].numpy()).all(), n
        assert_close(got_y[n], want_y[n], "float32", f"{name} backward {n}")
    want_h = want_h if isinstance(want_h, dict) else {b.states[0].name: want_h}
    got_h = got_h if isinstance(got_h, dict) else {b.states[0].name: got_h}
    for n in want_h:
        assert_close(got_h[n], want_h[n], "float32", f"{name} backward final {n}")


@pytest.mark.parametrize("name, sizes, blocks", [
    pytest.param(*c[:3], marks=[pytest.mark.slow] if c[0] == "mamba2" else [], id=c[0])
    for c in TILED if c[0] in ("gla", "mamba2")])
def test_tiled_gradients_through_autograd(name, sizes, blocks):
    """The whole training path (forward chunks, recompute, tiled backward; T crossing a chunk
    boundary) on Triton with the forced blocks, against the reference's float64 gradients."""
    from scancc.autograd import backward
    e = scancc.get(name)
    rec = e.build(**{o: True for o in e.optional_inputs})
    sz = default_sizes(rec, time=11, **sizes)
    x = sample_inputs(rec, sz, 5, e.hints)
    rng = np.random.default_rng(6)
    dy = {o.name: rng.standard_normal(tuple(sz[d] for d in o.dims)) for o in rec.outputs}
    want, want0 = backward(rec, x, dy, chunk=4)
    got, got0 = backward(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                         {k: torch.from_numpy(v).float() for k, v in dy.items()},
                         chunk=4, target="triton", options={"block_sizes": blocks})
    for n in want:
        assert_close(got[n].numpy(), want[n], "float32", f"{name} grad {n}")
    for n in want0:
        assert_close(got0[n].numpy(), want0[n], "float32", f"{name} grad init {n}")


@pytest.mark.parametrize("name, sizes, blocks", [
    pytest.param(*c[:3], marks=[pytest.mark.slow] if c[0] == "mamba2" else [], id=c[0])
    for c in TILED if c[0] in ("gla", "mamba2", "mamba")])
def test_tiled_backward_scan_algorithm(name, sizes, blocks):
    """The scan algorithm (what "auto" picks for these backward recurrences on a GPU) lowers
    stages 1 and 3 with the same plan: chunks of 4 steps, several blocks, B > 1."""
    _, b, _, x, h0 = _tiled_case(name, sizes, 11, 8)
    want_y, want_h = scancc.compile(b)(**x, initial_state=h0, output_final_state=True)
    k = scancc.compile(b, target="triton", algorithm="scan",
                       block_sizes={**blocks, "time": 4})
    xs = {n: torch.from_numpy(v).float() for n, v in x.items()}
    hs = {n: torch.from_numpy(v).float() for n, v in h0.items()}
    got_y, got_h = k(**xs, initial_state=hs, output_final_state=True)
    for n in want_y:
        assert_close(got_y[n], want_y[n], "float32", f"{name} scan backward {n}")
    want_h = want_h if isinstance(want_h, dict) else {b.states[0].name: want_h}
    got_h = got_h if isinstance(got_h, dict) else {b.states[0].name: got_h}
    for n in want_h:
        assert_close(got_h[n], want_h[n], "float32", f"{name} scan backward final {n}")
