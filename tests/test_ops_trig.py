"""The elementwise ops cos, sin, abs and tanh: the text form, every backend against NumPy
(the reference in float64 to rounding; Triton and the NKI emulator in float32), the adjoint's
VJPs against finite differences (torch.autograd.gradcheck on the reference), and
NaN-poisoned outputs and states (a kernel that leaves an element unwritten fails)."""
import numpy as np
import pytest
import scancc
from scancc.ir import Builder, Op, const, diagonal, parse_recurrence
from scancc.ir import abs as iabs
from scancc.ir import cos, sin, tanh
from scancc.testing import nan_poisoned

OPS = {"cos": (cos, np.cos), "sin": (sin, np.sin), "abs": (iabs, np.abs), "tanh": (tanh, np.tanh)}
TARGETS = ["reference", "triton", "nki"]


def _rec(name: str):
    """y_t = op(x_t) + op(2 x_t) * h_t with h = 0.5 h + op(x): the op in an inject and in a
    readout (the final state sums it over time)."""
    f = OPS[name][0]
    r = Builder(f"ops_test_{name}")
    b, t, c = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, c])
    h = r.state("h", [b, c], diagonal(const(0.5)), inject=f(x))
    r.output("y", [b, t, c], f(x) + f(x * 2.0) * h)
    return r.build()


def _truth(name: str, x: np.ndarray, h0: np.ndarray):
    """The recurrence above, written out in float64 NumPy."""
    f = OPS[name][1]
    h, ys = h0.astype(np.float64), []
    for t in range(x.shape[1]):
        h = 0.5 * h + f(x[:, t])
        ys.append(f(x[:, t]) + f(2.0 * x[:, t]) * h)
    return np.stack(ys, 1), h


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 9, 12)) * 3.0
    # edge values: tiny (tanh's cancellation, abs's sign), zero, large (cos/sin periods, tanh
    # saturation), negative
    x[0, 0] = [1e-7, -1e-7, 0.0, 3e-4, -3e-4, 20.0, -20.0, 40.0, -0.49, 0.51, 100.0, -1e-3]
    return x.astype(np.float32).astype(np.float64), rng.standard_normal((2, 12))


def test_text_form_round_trips():
    for name in OPS:
        rec = _rec(name)
        text = str(rec)
        assert f"{name}(x)" in text and f"{name}(x * 2.0)" in text
        assert parse_recurrence(text) == rec


def test_ops_are_unary_ir_ops():
    from scancc.ir.expr import FUNCTIONS, UNARY
    for name in OPS:
        assert Op(name) in UNARY and FUNCTIONS[name] is Op(name)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_on_every_backend_matches_numpy(name, target):
    x, h0 = _inputs()
    dtype = np.float64 if target == "reference" else np.float32
    xin, h0in = x.astype(dtype), h0.astype(np.float32).astype(dtype)
    want_y, want_h = _truth(name, xin.astype(np.float64), h0in.astype(np.float64))
    ker = scancc.compile(_rec(name), target=target)
    y, h = ker(x=xin, initial_state=h0in, output_final_state=True)
    y, h = np.asarray(y, np.float64), np.asarray(h, np.float64)
    # float64: rounding only; float32: a few ulps of each op (tanh on Triton is built from
    # expm1, measured <= 1.3e-7 relative) accumulated over 9 steps of a 0.5 decay
    rtol, atol = (1e-13, 1e-13) if target == "reference" else (2e-6, 2e-6)
    np.testing.assert_allclose(y, want_y, rtol=rtol, atol=atol)
    np.testing.assert_allclose(h, want_h, rtol=rtol, atol=atol)
    # the op matters: another op's truth misses
    other = {"cos": "sin", "sin": "cos", "abs": "tanh", "tanh": "abs"}[name]
    assert not np.allclose(y, _truth(other, xin.astype(np.float64), h0in.astype(np.float64))[0],
                           rtol=rtol, atol=atol)


def test_tanh_is_accurate_for_tiny_arguments_on_triton():
    """Triton's tanh is -e / (2 + e), e = expm1(-2|x|): relative accuracy near 0, where
    (1 - exp(-2|x|)) / (1 + exp(-2|x|)) keeps only a few digits in float32."""
    r = Builder("ops_test_tanh_tiny")
    b, t, c = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, c])
    h = r.state("h", [b, c], diagonal(const(0.0)), inject=x)
    r.output("y", [b, t, c], tanh(x) / x + 0.0 * h)
    vals = np.array([1e-7, -1e-7, 1e-5, -3e-4, 2e-3, -0.05, 0.3, -0.49, 0.51, -0.7, 2.0, -3.0],
                    np.float32)
    y = scancc.compile(r.build(), target="triton")(x=vals.reshape(1, 1, -1))
    v = vals.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64).ravel(), np.tanh(v) / v, rtol=5e-7)


@pytest.mark.parametrize("target", ["triton", "nki"])
def test_outputs_and_states_are_written_everywhere(target):
    """The launchers NaN-poison outputs (docs/triton.md, docs/nki.md): finite outputs and
    states mean every element was written; a NaN entering state reaches every output."""
    x, h0 = _inputs(1)
    ker = scancc.compile(_rec("cos"), target=target)
    y, h = ker(x=x.astype(np.float32), initial_state=h0.astype(np.float32),
               output_final_state=True)
    assert np.isfinite(np.asarray(y)).all() and np.isfinite(np.asarray(h)).all()
    poisoned = nan_poisoned((2, 12))
    y2, _ = ker(x=x.astype(np.float32), initial_state=poisoned.astype(np.float32),
                output_final_state=True)
    assert np.isnan(np.asarray(y2)).all()  # a NaN state propagates through every output


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradients_match_finite_differences(name):
    torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
    ker = scancc.compile(_rec(name))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 3)) * 2.0
    x = np.where(np.abs(x) < 0.05, 0.3, x)  # abs: away from its kink at 0
    xt = torch.tensor(x, requires_grad=True)
    ht = torch.tensor(rng.standard_normal((2, 3)), requires_grad=True)

    def f(xx, hh):
        y, h = ker(x=xx, initial_state=hh, output_final_state=True)
        return y, h

    assert torch.autograd.gradcheck(f, (xt, ht), atol=1e-8, rtol=1e-6)
    # and the VJP is the op's: d/dx of sum(y) against the closed form at T=1
    ker1 = scancc.compile(_rec(name))
    x1 = torch.tensor(x[:, :1], requires_grad=True)
    y, _ = ker1(x=x1, initial_state=torch.zeros(2, 3, dtype=torch.float64),
                output_final_state=True)
    y.sum().backward()
    xa = x[:, :1]
    d = {"cos": (-np.sin(xa) * (1 + np.cos(2 * xa)) - 2 * np.sin(2 * xa) * np.cos(xa)),
         "sin": (np.cos(xa) * (1 + np.sin(2 * xa)) + 2 * np.cos(2 * xa) * np.sin(xa)),
         "abs": (np.sign(xa) * (1 + np.abs(2 * xa)) + 2 * np.sign(xa) * np.abs(xa)),
         "tanh": ((1 - np.tanh(xa) ** 2) * (1 + np.tanh(2 * xa))
                  + 2 * (1 - np.tanh(2 * xa) ** 2) * np.tanh(xa))}[name]
    np.testing.assert_allclose(x1.grad.numpy(), d, rtol=1e-10, atol=1e-12)


def test_abs_gradient_at_zero_is_plus_one():
    """The documented subgradient: sign(0) = +1 (step(0) = 1)."""
    torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
    ker = scancc.compile(_rec("abs"))
    x = torch.zeros(1, 1, 1, dtype=torch.float64, requires_grad=True)
    y, _ = ker(x=x, initial_state=torch.zeros(1, 1, dtype=torch.float64),
               output_final_state=True)
    y.sum().backward()
    assert x.grad.item() == 1.0
