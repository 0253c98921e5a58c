"""The NKI backend on derived backward recurrences (scancc.autograd.adjoint) and on the IR ops
they use: step (an ALU compare), ungroup (a loop over the elements of each group) and prev
(the scan's trajectory one column back, the carry entering the tile in column 0)."""
import numpy as np
import pytest

import scancc
from scancc import registry
from scancc.autograd import adjoint
from scancc.backends import get
from scancc.backends.base import UnsupportedError
from scancc.backends.nki import emulator as E
from scancc.ir import (Builder, companion, const, dense, diagonal, exp, flip, householder, iota,
                       prev, reduce_sum, sigmoid, step, ungroup)
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

nl, nisa = E.language, E.isa

# the backward of each library recurrence (with every optional input) that NKI lowers
BACKWARD = {
    "linear_attn": {}, "retnet": {}, "simple_gla": {}, "gla": {}, "hgrn": {}, "s4d": {},
    "mamba": dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    "mamba2": dict(D=True, z=True, dt_bias=True, dt_softplus=True),
    "delta_net": {}, "gated_delta_net": {},
    "fir": dict(bias=True, activation="silu"), "iir": {}, "swa": {},
}


def _named(v, names):
    return v if isinstance(v, dict) else {names[0]: v}


def run_both(rec, x, init, **options):
    """(nki outputs, nki finals, reference outputs, reference finals), all as dicts."""
    onames, snames = [o.name for o in rec.outputs], [s.name for s in rec.states]
    kern = scancc.compile(rec, target="nki", **options)
    o, f = kern(**x, initial_state=init, output_final_state=True)
    # the emulator's measured SBUF/PSUM peak stays within the plan's figure
    c, plan = kern.last_run.counters, kern.backend.last_plan
    assert c["peak_sbuf_bytes_per_partition"] <= plan.sbuf_bytes
    assert c["peak_psum_banks"] <= plan.psum_banks <= E.PSUM_BANKS
    ro, rf = scancc.compile(rec)(**x, initial_state=init, output_final_state=True)
    return _named(o, onames), _named(f, snames), _named(ro, onames), _named(rf, snames)


def check_close(rec, x, init, **options):
    o, f, ro, rf = run_both(rec, x, init, **options)
    assert set(o) == set(ro) and set(f) == set(rf)
    for k in ro:
        assert_close(o[k], ro[k], "float32", k)
    for k in rf:
        assert_close(f[k], rf[k], "float32", f"final {k}")


# the per-step (householder) backward steps one reflection per value column: fewer columns
# by default, the default sizes in the slow run
SMALL = {"delta_net": {"value": 4}, "gated_delta_net": {"value": 4}}


def _library_backward(name, init, over):
    entry = registry.get(name)
    b = adjoint(entry.build(**BACKWARD[name])).backward
    sizes = default_sizes(b, time=70, **over)
    x = sample_inputs(b, sizes, seed=3, hints=entry.hints)
    h0 = sample_state(b, sizes) if init else None
    check_close(b, x, h0, time_tile=16)


@pytest.mark.parametrize("init", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("name", list(BACKWARD))
def test_library_backward(name, init):
    """T = 70 over a 16-step time tile: prev(S) crosses four tile boundaries."""
    _library_backward(name, init, SMALL.get(name, {}))


@pytest.mark.slow
@pytest.mark.parametrize("init", [False, True], ids=["zero", "init"])
@pytest.mark.parametrize("name", list(SMALL))
def test_library_backward_default_sizes(name, init):
    _library_backward(name, init, {})


@pytest.mark.parametrize("name,over", [("mamba", {"groups": 2}),
                                       ("mamba2", {"groups": 2, "heads": 4})])
def test_backward_grouped(name, over):
    """grad_B/grad_C = ungroup(.., pd, groups) with groups inside the partition tile: a
    selector-column matmul per group; those outputs lack the partition dim."""
    entry = registry.get(name)
    b = adjoint(entry.build(**BACKWARD[name])).backward
    sizes = default_sizes(b, time=45, **over)
    x = sample_inputs(b, sizes, seed=5, hints=entry.hints)
    check_close(b, x, sample_state(b, sizes), time_tile=32)


def test_output_without_partition_dim_needs_one_tile():
    """An output lacking the partition dim needs that dim in one partition tile: at batch=130
    the batch cannot be the partition dim of mamba's backward (grad_A lacks it), so the plan
    takes another layout (and matches the reference); when no layout fits, a clear error that
    names the budget and the shape."""
    from scancc.backends.nki.plan import plan_space
    entry = registry.get("mamba")
    b = adjoint(entry.build()).backward
    sizes = default_sizes(b, time=4, batch=130)
    assert plan_space(b, sizes).pd != "batch"
    x = sample_inputs(b, sizes, seed=0, hints=entry.hints)
    check_close(b, x, None)
    sizes = default_sizes(b, time=4, batch=130, chan=130, dstate=130)
    x = sample_inputs(b, sizes, seed=0, hints=entry.hints)
    with pytest.raises(UnsupportedError, match="no tile plan fits.*trn1 budget.*batch=130"):
        scancc.compile(b, target="nki")(**x)


def test_backward_default_tile_and_float32_arrays():
    """The plan's own time tile, float32 arrays (the NKI input dtype)."""
    entry = registry.get("gla")
    b = adjoint(entry.build()).backward
    sizes = default_sizes(b, time=33)
    x = {k: v.astype(np.float32) for k, v in
         sample_inputs(b, sizes, seed=4, hints=entry.hints).items()}
    check_close(b, x, sample_state(b, sizes))


def _user_rec():
    """prev of a full (P, TT) state and of a row state (no partition dim), step of a tile
    and of a trace-time constant, ungroup of a state expression and of an input."""
    r = Builder("nki_test_bwd_ops")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    c, g = r.dim("chan"), r.dim("groups", "group", 2)
    x, a = r.input("x", [b, t, h, c]), r.input("a", [h, c])
    w = r.input("w", [b, t, c])
    s = r.state("s", [b, h, c], diagonal(sigmoid(a)), inject=x)
    q = r.state("q", [b, c], diagonal(sigmoid(w)), inject=w * w)
    r.output("y", [b, t, h, c], prev("s") * step(x) + s * step(iota(c) - 1.5))
    r.output("z", [b, t, h, g], ungroup(prev("s") * x, c, g) + ungroup(x, c, g))
    r.output("u", [b, t, h, c], prev("q") * x - q * step(-w))
    return r.build()


@pytest.mark.parametrize("T,tt", [(1, None), (37, 8), (70, 16)])
@pytest.mark.parametrize("init", [False, True], ids=["zero", "init"])
def test_user_step_ungroup_prev(T, tt, init):
    rec = _user_rec()
    sizes = {"batch": 2, "time": T, "heads": 3, "chan": 6, "groups": 2}
    x = sample_inputs(rec, sizes, seed=T)
    h0 = sample_state(rec, sizes) if init else None
    opts = {"time_tile": tt} if tt else {}
    check_close(rec, x, h0, **opts)


def test_prev_is_the_entering_state():
    """Not just close to the reference: prev("s") at t equals s at t - 1, the initial at 0."""
    r = Builder("nki_test_prev")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, d])
    s = r.state("s", [b, d], diagonal(const(0.5)), inject=x)
    r.output("cur", [b, t, d], s)
    r.output("old", [b, t, d], prev("s"))
    rec = r.build()
    sizes = {"batch": 1, "time": 20, "chan": 4}
    x = sample_inputs(rec, sizes, seed=0)
    h0 = sample_state(rec, sizes)
    o, f, _, _ = run_both(rec, x, h0, time_tile=8)
    np.testing.assert_array_equal(o["old"][:, 1:], o["cur"][:, :-1])
    np.testing.assert_allclose(o["old"][:, 0], h0["s"], rtol=1e-6)


def _step_states_rec():
    """prev of each per-step transition: householder with an extra looped dim (one
    reflection per column), companion and dense; and a sum over a dim nested in a sum over
    the same dim."""
    r = Builder("nki_test_prev_steps")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    k, v, i, j = r.dim("key"), r.dim("value"), r.dim("row"), r.dim("col")
    x, kk = r.input("x", [b, t, h, v]), r.input("k", [b, t, h, k])
    beta, fb = r.input("beta", [b, t, h]), r.input("fb", [h, i])
    m = r.input("m", [h, i, j])
    s = r.state("s", [b, h, k, v], householder(k, kk, beta, sigmoid(beta)), inject=kk * x)
    c = r.state("c", [b, h, i], companion(i, fb), inject=reduce_sum(x, v))
    d = r.state("d", [b, h, i], dense(i, j, m), inject=reduce_sum(kk, k))
    r.output("y", [b, t, h, v], reduce_sum(prev("s") * kk, k) + reduce_sum(s, k))
    r.output("z", [b, t, h, i], prev("c") - c + prev("d") * d)
    r.output("w", [b, t, h], reduce_sum(reduce_sum(prev("s") * reduce_sum(kk, k), v) * kk, k))
    return r.build()


@pytest.mark.parametrize("init", [False, True], ids=["zero", "init"])
def test_prev_of_step_states(init):
    rec = _step_states_rec()
    sizes = {"batch": 2, "time": 23, "heads": 3, "key": 4, "value": 3, "row": 3, "col": 3}
    x = sample_inputs(rec, sizes, seed=7, hints={"k": "unit_rows", "beta": "unit_interval",
                                                 "fb": "small", "m": "small"})
    check_close(rec, x, sample_state(rec, sizes) if init else None, time_tile=8)


def test_step_source_is_a_compare():
    rec = _user_rec()
    src = get("nki").render(rec, {"sizes": {"batch": 2, "time": 8, "heads": 3, "chan": 6,
                                            "groups": 2}})
    assert "nl.greater_equal, 0.0)" in src
    assert "(1.0 if" in src  # step of a trace-time constant folds


def test_ungroup_across_partitions_is_unsupported():
    r = Builder("nki_test_ungroup_pd")
    b, t, c, g = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan"), \
        r.dim("groups", "group", 2)
    x = r.input("x", [b, t, c])
    s = r.state("s", [b, c], diagonal(const(0.5)), inject=x)
    r.output("y", [b, t, g], ungroup(s, c, g))
    rec = r.build()
    with pytest.raises(UnsupportedError, match="ungroup"):
        scancc.compile(rec, target="nki").source


def test_emulator_greater_equal_is_step():
    """tensor_scalar(greater_equal, 0.0) is the step function, 1.0 at 0 and -0.0."""
    a = np.array([[-1.0, -0.0, 0.0, 1e-30, -1e-30, 2.0]], dtype=np.float32)

    def k(x):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(t, x)
        r = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(r, t, nl.greater_equal, 0.0)
        nisa.dma_copy(out, r)
        return out
    o = E.Kernel(k, "trn1")(a)
    np.testing.assert_array_equal(o, [[0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])


def test_expm1_without_cancellation():
    """exp(x) - 1 is computed as Kahan's expm1: relative accuracy near 0, u - 1 elsewhere
    (including u = 0): (exp(x) - 1) / x to float32 ulps where plain float32 loses digits."""
    r = Builder("nki_test_expm1")
    b, t, c = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, c])
    h = r.state("h", [b, c], diagonal(const(0.5)), inject=x)
    r.output("y", [b, t, c], (exp(x) - 1.0) / x + h * 0.0)
    rec = r.build()
    vals = np.array([1e-7, -1e-7, 1e-5, -3e-4, 2e-3, -0.05, 0.3, -0.49, 0.51, -0.7, 2.0, -3.0,
                     -100.0, 20.0, 1e-20, -4e-38])
    xs = np.tile(vals, (1, 3, 1))  # [batch 1, time 3, chan 16]
    o, _, _, _ = run_both(rec, {"x": xs}, None)
    x32 = xs.astype(np.float32).astype(np.float64)  # the kernel's inputs
    np.testing.assert_allclose(o["y"], np.expm1(x32) / x32, rtol=5e-7)


@pytest.mark.parametrize("order", ["outer", "time"])
@pytest.mark.parametrize("name", ["gla", "delta_net", "mamba2"])
def test_backward_both_loop_orders(name, order):
    """The entering carry of prev(S) in either loop order (time tile outermost keeps a carry
    slot per outer index and partition tile)."""
    entry = registry.get(name)
    b = adjoint(entry.build(**BACKWARD[name])).backward
    sizes = default_sizes(b, time=37, **SMALL.get(name, {}))
    x = sample_inputs(b, sizes, seed=6, hints=entry.hints)
    check_close(b, x, sample_state(b, sizes), time_tile=16, loop_order=order)


@pytest.mark.parametrize("init", [False, True], ids=["zero", "init"])
def test_adjoint_step_kinds(init):
    """shift/companion/dense adjoint steps with another looped dim beside the axis, across
    time tiles, read directly and through prev."""
    from scancc.testing import adjoint_steps_recurrence
    rec = adjoint_steps_recurrence()
    sizes = default_sizes(rec, time=37, batch=2, heads=3, w=5, n=3, c=3)
    x = sample_inputs(rec, sizes, seed=2, hints={"m": "small", "f": "small"})
    check_close(rec, x, sample_state(rec, sizes) if init else None, time_tile=16)


def test_registered_custom_recurrence_backward(gated_iir):
    b = adjoint(gated_iir.build()).backward
    sizes = default_sizes(b, time=45, batch=2, chan=3, order=3)
    x = sample_inputs(b, sizes, seed=6, hints=gated_iir.hints)
    check_close(b, x, sample_state(b, sizes), time_tile=16)


@pytest.mark.parametrize("batch", [2, 4])
def test_dense_axis_is_never_an_outer_loop(batch):
    """A dense state read only through sum(s * q, n): every output and state has n, which must
    still be stepped inside the tile (it was once made an outer loop, and the backward's
    dense_adjoint then read past its columns: NaN or an emulator error)."""
    torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
    r = Builder("nki_test_dense_readout")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    n, c = r.dim("n", size=3), r.dim("c", size=3)
    x, q, m = r.input("x", [b, t, h, n]), r.input("q", [b, t, h, n]), r.input("m", [h, n, c])
    s = r.state("s", [b, h, n], dense(n, c, m), inject=x)
    r.output("y", [b, t, h], reduce_sum(s * q, n))
    rec = r.build()
    xs = sample_inputs(rec, {"batch": batch, "time": 9, "heads": 3, "n": 3, "c": 3}, 0,
                       {"m": "small"})
    kn = scancc.compile(rec, target="nki")
    assert scancc.autograd.backward_target(kn, rec) == "nki"

    def grads(ker, dtype):
        ts = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in xs.items()}
        y = ker(**ts)
        (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
         ).sum().backward()
        return {k: v.grad.double().numpy() for k, v in ts.items()}
    got, want = grads(kn, torch.float32), grads(scancc.compile(rec), torch.float64)
    for k in want:
        assert_close(got[k], want[k], "float32", k)


def test_flip_of_a_state_along_an_outer_dim_is_unsupported():
    """The carry holds the current outer index only: flip(s, w) along an outer w would read
    the wrong row, so NKI refuses it (the reference runs it)."""
    r = Builder("nki_test_flip_outer")
    b, t, d, w = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan"), r.dim("w")
    x, g = r.input("x", [b, t, d, w]), r.input("g", [b, t, d, w])
    s = r.state("s", [b, d, w], diagonal(sigmoid(g)), inject=x)
    r.output("y", [b, t, d, w], flip(s, w) + x)
    with pytest.raises(UnsupportedError, match="flip along the outer dim 'w' of a state"):
        scancc.compile(r.build(), target="nki")


def test_mamba2_backward_plans_at_a_common_shape_on_trn1():
    """mamba2's backward at H=8 P=64 N=64 (the issue: 'needs 205204 B of SBUF per partition,
    the trn1 budget is 180224 B'): the preferred layout (the batch on the partitions) holds
    heads x headdim x dstate per partition and cannot fit; the plan takes the next layout that
    does, and the gradients equal the reference's."""
    from scancc.backends.nki.plan import layouts, plan_space
    entry = registry.get("mamba2")
    sizes = {"batch": 1, "time": 20, "heads": 8, "headdim": 64, "groups": 1, "dstate": 64}
    for options in ({}, BACKWARD["mamba2"]):
        b = adjoint(entry.build(**options)).backward
        if not options:  # plain mamba2: grad_x/dt/B/C share only the batch
            assert layouts(b, sizes)[0][0] == "batch"
            assert plan_space(b, sizes, chip="trn1").pd != "batch"
        x = sample_inputs(b, sizes, seed=1, hints=entry.hints)
        check_close(b, x, sample_state(b, sizes), time_tile=8)


# ---- plans that split tiles (issue 12): summed outer dims ----

REALISTIC = [  # (recurrence, dims) at the realistic shapes of shared/design PERFORMANCE.md
    ("gla", dict(batch=8, heads=16, key=128, value=128)),
    ("gated_delta_net", dict(batch=8, heads=16, key=128, value=128)),
    ("mamba2", dict(batch=8, heads=80, headdim=64, dstate=128, groups=1)),
    ("mamba2", dict(batch=1, heads=8, headdim=64, dstate=64, groups=1)),
    ("mamba2", dict(batch=8, heads=8, headdim=64, dstate=64, groups=1)),
    ("mamba", dict(batch=8, chan=5120, dstate=16, groups=1)),
]


@pytest.mark.parametrize("name, dims", REALISTIC,
                         ids=[f"{n}-" + "-".join(f"{k}{v}" for k, v in d.items())
                              for n, d in REALISTIC])
def test_backward_plans_at_realistic_shapes_on_trn1(name, dims):
    """The backward recurrence (and the states view the training path recomputes with) of
    every chunk of 64 steps plans on trn1 within its SBUF budget. mamba2 at H=80 P=64 N=128
    failed before (13 MB per partition at time tile 1): dstate on the partitions, batch and
    headdim summed outer loops."""
    from scancc.backends.nki.hardware import CHIPS
    from scancc.backends.nki.lowering import plan_and_render
    adj = adjoint(registry.get(name).build())
    for r in (adj.backward, adj.states_view):
        sizes = default_sizes(r, time=64, **dims)
        src, plan = plan_and_render(r, sizes, True, True, "trn1")
        assert plan.sbuf_bytes <= CHIPS["trn1"].sbuf_bytes
        assert "nki.jit" in src
        if name == "mamba2" and dims["heads"] == 80 and r is adj.backward:
            assert plan.summed and set(plan.summed) <= set(plan.outer)
            assert plan.tt >= 32, plan


def _tight_chip(monkeypatch, budget):
    """trn1 with ``budget`` B of SBUF per partition, for the plan and the emulator alike."""
    from scancc.backends.nki.hardware import CHIPS, Chip
    monkeypatch.setitem(CHIPS, "trn1", Chip("trn1", sbuf_bytes=budget))
    monkeypatch.setitem(E.SBUF_BYTES, "trn1", budget)
    monkeypatch.setattr(get("nki"), "_cache", {})


@pytest.mark.parametrize("budget, pd, summed, init", [
    (5000, "batch", ("headdim",), True),
    pytest.param(5000, "batch", ("headdim",), False, marks=pytest.mark.slow),
    pytest.param(3000, "batch", ("headdim", "dstate"), True, marks=pytest.mark.slow),
    pytest.param(3000, "batch", ("headdim", "dstate"), False, marks=pytest.mark.slow)])
def test_summed_outer_split_matches_reference(monkeypatch, budget, pd, summed, init):
    """A budget no layout fits as is (the smallest, dstate on the partitions at time tile 1,
    needs 5832 B): the plan loops over summed outer dims, storing the first outer index's
    part of the outputs that lack them and adding the others' (grad_dt, grad_A, grad_B and
    grad_C over headdim; grad_x, grad_dt, grad_A over dstate), and the gradients equal the
    reference's."""
    from scancc.backends.nki.lowering import plan_and_render
    entry = registry.get("mamba2")
    b = adjoint(entry.build()).backward
    sizes = default_sizes(b, time=12, batch=2, heads=2, headdim=8, dstate=16, groups=1)
    _tight_chip(monkeypatch, budget)
    src, plan = plan_and_render(b, sizes, init, True, "trn1")
    assert (plan.pd, plan.summed) == (pd, summed)
    assert "else:" in src and "nl.add)" in src
    x = sample_inputs(b, sizes, seed=7, hints=entry.hints)
    check_close(b, x, sample_state(b, sizes) if init else None)


def test_plan_error_names_the_budget_when_nothing_fits(monkeypatch):
    """Only when no layout fits, not even with every summed outer dim: a PlanError that
    names the budget and the shape."""
    from scancc.backends.nki.lowering import plan_and_render
    from scancc.backends.nki.plan import PlanError
    b = adjoint(registry.get("mamba2").build()).backward
    sizes = default_sizes(b, time=20, batch=2, heads=2, headdim=16, dstate=32, groups=1)
    _tight_chip(monkeypatch, 1000)
    with pytest.raises(PlanError, match=r"no tile plan fits.*trn1 budget is 1000 B \(shape "
                                        r"time=20, batch=2, heads=2, headdim=16"):
        plan_and_render(b, sizes, False, True, "trn1")


def test_summed_outer_split_of_a_forward_readout(monkeypatch):
    """Not only backwards: gla's readout sum(q * S, key) over a key too long for the budget
    loops over key outside the partition tile (o accumulated over it) and equals the
    reference (with an initial state, final states too)."""
    from scancc.backends.nki.lowering import plan_and_render
    entry = registry.get("gla")
    rec = entry.build()
    sizes = default_sizes(rec, time=6, batch=1, heads=2, key=256, value=8)
    _tight_chip(monkeypatch, 4000)
    _, plan = plan_and_render(rec, sizes, True, True, "trn1")
    assert (plan.pd, plan.summed) == ("value", ("key",))
    x = sample_inputs(rec, sizes, seed=2, hints=entry.hints)
    check_close(rec, x, sample_state(rec, sizes))
