"""compile()'s default target "auto": the reference for NumPy arrays (the definition), the
torch backend for CPU torch tensors (no GPU here), per call, with gradients."""
import numpy as np
import pytest

import scancc
from scancc.api import AutoKernel, InputError, default_target
from scancc.sampling import sample_inputs

torch = pytest.importorskip("torch")

SIZES = {"batch": 2, "time": 37, "heads": 2, "key": 8, "value": 4}


def test_default_target_by_input_kind():
    assert default_target(np.zeros(3)) == "reference"
    assert default_target(torch.zeros(3)) == "torch"      # no CUDA device here
    assert default_target([1.0]) == "reference"           # the reference reports the error


def test_auto_runs_numpy_on_the_reference_and_torch_on_the_torch_backend():
    k = scancc.compile("simple_gla")
    assert isinstance(k, AutoKernel) and k.target == "reference"
    x = sample_inputs(k.ir, SIZES, seed=3)
    y = k(*x.values())                                    # float64, the reference's loop
    assert k.target == "reference" and k.source is None and y.dtype == np.float64
    xt = {n: torch.tensor(v, dtype=torch.float32) for n, v in x.items()}
    yt = k(**xt)
    assert k.target == "torch" and "torch" in k.source    # generated PyTorch code ran
    assert yt.dtype == torch.float32 and torch.isfinite(yt).all()
    # the independent truth: the float64 loop of the reference on the same values
    err = np.sqrt(np.mean((yt.double().numpy() - y) ** 2) / np.mean(y ** 2))
    assert err < 1e-5, err
    # and per call: NumPy again goes back to the reference
    k(*x.values())
    assert k.target == "reference"


def test_auto_gradients_match_the_reference():
    k = scancc.compile("simple_gla")
    x = sample_inputs(k.ir, SIZES, seed=4)
    grads = {}
    for target in ("auto", "reference"):
        kk = k if target == "auto" else scancc.compile("simple_gla", "reference")
        xt = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in x.items()}
        kk(**xt).square().sum().backward()
        grads[target] = {n: t.grad for n, t in xt.items()}
    assert k.target == "torch"
    for n in x:   # the torch backend's backward accumulates in float32 (docs/torch.md)
        a, r = grads["auto"][n].double(), grads["reference"][n]
        assert torch.isfinite(a).all()
        err = float(((a - r).square().mean() / r.square().mean()).sqrt())
        assert err < 1e-5, (n, err)


def test_auto_backend_options_by_name_only():
    k = scancc.compile("simple_gla", options={"torch": {"chunk": 16}})
    assert k.kernel_for(torch.zeros(1)).backend_options["chunk"] == 16
    with pytest.raises(InputError, match="by backend name"):
        scancc.compile("simple_gla", options={"chunk": 16})
