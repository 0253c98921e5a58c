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
