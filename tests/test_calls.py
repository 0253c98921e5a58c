"""Kernel calls at the edges (issue 10, items 3, 4 and 8): forward-mode AD is refused, not
silently zero; keyword typos are refused whatever their value; empty problems (T=0, batch=0)
run on every backend as on the reference; builder transitions take plain numbers."""
import numpy as np
import pytest
import scancc
from scancc.ir import IRError, default_sizes
from scancc.ir.builder import Builder
from scancc.ir.expr import const
from scancc.ir.recurrence import companion, dense, diagonal, householder, scalar
from scancc.testing import sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")


def _args(k, sizes=None, seed=0, kind="numpy"):
    rec = k.ir
    x = sample_inputs(rec, {**default_sizes(rec), **(sizes or {})}, seed=seed)
    args = [x[i.name] for i in rec.inputs]
    return [torch.from_numpy(a) for a in args] if kind == "torch" else args


# ---- item 3: forward-mode AD ----

def test_jvp_through_a_kernel_raises_rather_than_returning_a_zero_tangent():
    k = scancc.compile("hgrn")
    args = tuple(_args(k, kind="torch"))
    tangents = tuple(torch.randn_like(a) for a in args)
    try:
        _, t = torch.func.jvp(lambda *a: k(*a), args, tangents)
    except NotImplementedError as e:
        assert "forward-mode AD" in str(e) and "reverse mode" in str(e)
    else:  # should it ever compute one, it must be the derivative
        eps = 1e-6
        plus = k(*[a + eps * d for a, d in zip(args, tangents)])
        minus = k(*[a - eps * d for a, d in zip(args, tangents)])
        fd = (plus - minus) / (2 * eps)
        assert fd.abs().max() > 0
        torch.testing.assert_close(t, fd, rtol=1e-4, atol=1e-6)


def test_forward_ad_dual_tensors_raise_on_the_call_and_on_the_op():
    from torch.autograd import forward_ad as fwad
    k = scancc.compile("hgrn")
    args = _args(k, kind="torch")
    with fwad.dual_level():
        duals = [fwad.make_dual(a, torch.ones_like(a)) for a in args]
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            k(*duals)
        # a dual only in the initial state
        shape = tuple(k.ir.states[0].dims)
        sizes = default_sizes(k.ir)
        z = torch.zeros(tuple(sizes[d] for d in shape), dtype=torch.float64)
        h0 = fwad.make_dual(z, torch.ones_like(z))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            k(*args, initial_state=h0)
        from scancc.autograd import torch_ops
        slot = k.runner(k.ir).slot
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch_ops()(slot, duals, [], False)


def test_reverse_mode_still_works():
    k = scancc.compile("hgrn")
    args = [a.requires_grad_() for a in _args(k, kind="torch")]
    k(*args).square().sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in args)


# ---- item 4: keyword names ----

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_misspelt_keyword_is_refused_even_when_none(kind):
    k = scancc.compile("mamba2")
    args = _args(k, kind=kind)
    for typo in ("intial_state", "ouput_final_state", "Dd"):
        for value in (None, 1):
            with pytest.raises(scancc.InputError, match=f"no input or option '{typo}'"):
                k(*args, **{typo: value})
    # None still omits an optional input, and means the default for an option
    want = k(*args)
    for ok in ({"D": None}, {"z": None, "dt_bias": None}, {"dt_softplus": None}):
        got = k(*args, **ok)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_misspelt_keyword_is_refused_under_torch_compile():
    k = scancc.compile("hgrn")
    args = _args(k, kind="torch")

    @torch.compile(backend="eager", fullgraph=True)
    def f(*a):
        return k(*a, intial_state=None)

    with pytest.raises(Exception, match="no input or option 'intial_state'"):
        f(*args)


# ---- item 8: empty problems on every backend ----

def _targets():
    return [name for name in ("reference", "triton", "nki")
            if scancc.backends.get(name).available()[0]]


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("name", ["hgrn", "gla", "mamba2"])
@pytest.mark.parametrize("empty", [{"time": 0}, {"batch": 0}])
def test_empty_problems_match_the_reference(target, name, empty):
    ref, k = scancc.compile(name), scancc.compile(name, target)
    rec = ref.ir
    sizes = {**default_sizes(rec), **empty}
    args = [a.astype(np.float32) for a in _args(ref, empty)]
    init = sample_state(rec, sizes)
    init = {s: v.astype(np.float32) for s, v in init.items()}
    if len(rec.states) == 1:
        init = next(iter(init.values()))
    want_y, want_h = ref(*args, initial_state=init, output_final_state=True)
    y, h = k(*args, initial_state=init, output_final_state=True)
    assert np.shape(y) == np.shape(want_y) and y.dtype == np.float32
    assert np.shape(h) == np.shape(want_h)
    if "time" in empty:  # no step: the final state is the initial state
        np.testing.assert_allclose(h, init, rtol=1e-6)
    np.testing.assert_allclose(h, want_h, rtol=1e-6)
    # without an initial state: zeros; and torch tensors the same way
    y0, h0 = k(*[torch.from_numpy(a) for a in args], output_final_state=True)
    assert tuple(y0.shape) == np.shape(want_y) and not h0.abs().sum()


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("empty", [{"time": 0}, {"batch": 0}])
def test_empty_problems_differentiate(target, empty):
    """The backward of an empty problem: zero-size input gradients, and at T=0 the final
    state's gradient passed to the initial state (a copy: an op's output never aliases)."""
    k = scancc.compile("gla", target)
    rec = k.ir
    sizes = {**default_sizes(rec), **empty}
    x = [torch.from_numpy(a).float().requires_grad_() for a in _args(k, empty)]
    h0 = torch.from_numpy(sample_state(rec, sizes)["S"]).float().requires_grad_()
    y, h = k(*x, initial_state=h0, output_final_state=True)
    d_h = torch.randn_like(h)
    (y.sum() + (h * d_h).sum()).backward()
    assert all(a.grad is not None and a.grad.shape == a.shape for a in x)
    if "time" in empty:
        torch.testing.assert_close(h0.grad, d_h)


# ---- item 8: builder transitions lift plain numbers ----

def _ema(transition):
    r = Builder("ema_lift")
    b, t, c = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, c])
    h = r.state("h", [b, c], transition, inject=x)
    r.output("o", [b, t, c], h)
    return r.build()


@pytest.mark.parametrize("ctor", [diagonal, scalar])
@pytest.mark.parametrize("decay", [0.9, 1, np.float32(0.5)])
def test_transitions_lift_plain_numbers(ctor, decay):
    rec = _ema(ctor(decay))
    assert rec == _ema(ctor(const(float(decay))))
    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    want, h = np.zeros((2, 5, 3)), np.zeros((2, 3))
    for t in range(5):
        h = float(decay) * h + x[:, t]
        want[:, t] = h
    np.testing.assert_allclose(scancc.compile(rec)(x), want, rtol=1e-12)
    for target in _targets()[1:]:
        got = scancc.compile(rec, target)(x.astype(np.float32))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_transitions_and_the_builder_reject_non_numbers_clearly():
    for bad in ("0.9", None, True, [0.9]):
        with pytest.raises(IRError, match=r"diagonal\(decay=...\): expected an expression or "
                                          "a number"):
            diagonal(bad)
    with pytest.raises(IRError, match=r"scalar\(decay=...\): constant inf is not finite"):
        scalar(float("inf"))
    with pytest.raises(IRError, match=r"companion\(feedback=...\)"):
        companion("w", "x")
    with pytest.raises(IRError, match=r"householder\(beta=...\)"):
        householder("k", const(1.0), "b")
    with pytest.raises(IRError, match=r"dense\(axis=...\): expected a dim name"):
        dense(3, "c", 1.0)
    r = Builder("bad")
    r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    with pytest.raises(IRError, match="state 'h': transition must be a Transition"):
        r.state("h", ["batch", "chan"], 0.9, inject=1.0)
    with pytest.raises(IRError, match="output 'o': expected an expression or a number"):
        r.output("o", ["batch", "time", "chan"], "h")
