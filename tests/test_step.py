"""The decode step (``Kernel.step``, scancc/_step.py; Triton: backends/triton/step.py):
stepping T times equals one scan of T steps, for every library recurrence, on the reference
(float64, through its T=1 scan) and on Triton (its dedicated step kernel, float32); the
state is updated in place; ``state_indices`` steps rows of a larger pool and leaves the
others untouched."""
import numpy as np
import pytest

import scancc
from scancc import registry
from scancc.testing import sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

LIBRARY = [n for n in registry.names() if registry.get(n).origin == "library"]
SIZES = {"batch": 2, "time": 6, "heads": 2, "key": 5, "value": 3, "chan": 3, "dstate": 3,
         "headdim": 2, "groups": 1, "width": 3, "order": 3}
OPTS = {"mamba": {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
        "mamba2": {"D": True, "z": True, "dt_bias": True, "dt_softplus": True},
        "fir": {"bias": True, "activation": "silu"}}
TOL = {"float64": 1e-10, "float32": 2e-5}


def _case(name, seed=0):
    k = scancc.compile(name, **OPTS.get(name, {}))
    rec = k.ir
    sizes = {d.name: d.size or SIZES.get(d.name, 2) for d in rec.dims}
    x = sample_inputs(rec, sizes, seed, registry.get(name).hints)
    h0 = sample_state(rec, sizes, seed + 1)
    return rec, sizes, x, h0


def _time_slice(rec, name, v, t):
    dims = rec.input(name).dims
    if rec.time not in dims:
        return v
    return v.select(dims.index(rec.time), t)


def _scan_truth(name, x, h0):
    """The reference scan in float64: outputs by name and final states by name."""
    k = scancc.compile(name, **OPTS.get(name, {}))
    out, fin = k(**{n: torch.tensor(v) for n, v in x.items()},
                 initial_state={s: torch.tensor(v) for s, v in h0.items()},
                 output_final_state=True)
    rec = k.ir
    out = out if isinstance(out, dict) else {rec.outputs[0].name: out}
    fin = fin if isinstance(fin, dict) else {rec.states[0].name: fin}
    return out, fin


def _step_all(name, target, dtype, x, h0, state_dtype, k=None):
    k = k or scancc.compile(name, target, **OPTS.get(name, {}))
    rec = k.ir
    T = next(v.shape[rec.input(n).dims.index(rec.time)] for n, v in x.items()
             if rec.time in rec.input(n).dims)
    xt = {n: torch.tensor(v, dtype=dtype) for n, v in x.items()}
    state = {s: torch.tensor(v, dtype=state_dtype) for s, v in h0.items()}
    st = state if len(state) > 1 else next(iter(state.values()))
    ptrs = {s: v.data_ptr() for s, v in state.items()}
    ys = []
    for t in range(T):
        y = k.step(**{n: _time_slice(rec, n, v, t) for n, v in xt.items()}, state=st)
        ys.append(y if isinstance(y, dict) else {rec.outputs[0].name: y})
    assert {s: v.data_ptr() for s, v in state.items()} == ptrs  # updated in place
    outs = {o.name: torch.stack([y[o.name] for y in ys], o.dims.index(rec.time))
            for o in rec.outputs}
    return outs, state


def _compare(name, got_out, got_state, out, fin, tol):
    for o, v in out.items():
        g = got_out[o].double()
        assert not torch.isnan(g).any(), (name, o)
        np.testing.assert_allclose(g.numpy(), v.double().numpy(), rtol=tol, atol=tol,
                                   err_msg=f"{name} output {o}")
    for s, v in fin.items():
        np.testing.assert_allclose(got_state[s].double().numpy(), v.double().numpy(),
                                   rtol=tol, atol=tol, err_msg=f"{name} state {s}")


@pytest.mark.parametrize("name", LIBRARY)
def test_stepping_equals_the_scan_reference(name):
    rec, sizes, x, h0 = _case(name)
    out, fin = _scan_truth(name, x, h0)
    got, state = _step_all(name, "reference", torch.float64, x, h0, torch.float64)
    _compare(name, got, state, out, fin, TOL["float64"])


@pytest.mark.parametrize("name", LIBRARY)
def test_stepping_equals_the_scan_triton_step_kernel(name):
    pytest.importorskip("triton")
    rec, sizes, x, h0 = _case(name)
    x = {n: v.astype(np.float32).astype(np.float64) for n, v in x.items()}  # exact in fp32
    out, fin = _scan_truth(name, x, h0)
    got, state = _step_all(name, "triton", torch.float32, x, h0, torch.float32)
    _compare(name, got, state, out, fin, TOL["float32"])


def test_triton_steps_through_its_dedicated_kernel():
    """The Triton step is the step kernel (no time loop), not the T=1 scan."""
    pytest.importorskip("triton")
    name = "gated_delta_net"
    rec, sizes, x, h0 = _case(name)
    k = scancc.compile(name, "triton")
    xt = {n: torch.tensor(_time_slice(rec, n, torch.tensor(v), 0).numpy(),
                          dtype=torch.float32) for n, v in x.items()}
    state = torch.tensor(h0["S"], dtype=torch.float32)
    k.step(**xt, state=state)
    plan = next(iter(k._step_plans.values()))
    assert plan.launcher is not None and plan.launcher.__name__ == f"{name}_step_fwd"
    from scancc.backends.triton.step import StepLowering
    src = StepLowering(plan.rec, {}).render()
    assert "for i_t in" not in src and " in range(" not in src  # no time loop
    assert k.last_run is None  # the scan's runner never ran


@pytest.mark.parametrize("target", ["reference", "triton"])
@pytest.mark.parametrize("name", ["gated_delta_net", "mamba", "swa"])
def test_state_indices_step_rows_of_a_pool(target, name):
    """Continuous batching: B=2 sequences step rows 3 and 0 of a pool of 5; the other rows
    stay as they were (bitwise), the stepped rows equal the scan's final states."""
    if target == "triton":
        pytest.importorskip("triton")
    rec, sizes, x, h0 = _case(name)
    x = {n: v.astype(np.float32).astype(np.float64) for n, v in x.items()}
    out, fin = _scan_truth(name, x, h0)
    dtype = torch.float64 if target == "reference" else torch.float32
    k = scancc.compile(name, target, **OPTS.get(name, {}))
    idx = torch.tensor([3, 0])
    rng = np.random.default_rng(9)
    pool = {s: torch.tensor(rng.standard_normal((5,) + v.shape[1:]), dtype=dtype)
            for s, v in h0.items()}
    for s, v in h0.items():
        pool[s][idx] = torch.tensor(v, dtype=dtype)
    before = {s: v.clone() for s, v in pool.items()}
    xt = {n: torch.tensor(v, dtype=dtype) for n, v in x.items()}
    st = pool if len(pool) > 1 else next(iter(pool.values()))
    ys = []
    for t in range(sizes[rec.time]):
        y = k.step(**{n: _time_slice(rec, n, v, t) for n, v in xt.items()}, state=st,
                   state_indices=idx)
        ys.append(y if isinstance(y, dict) else {rec.outputs[0].name: y})
    got = {o.name: torch.stack([y[o.name] for y in ys], o.dims.index(rec.time))
           for o in rec.outputs}
    tol = TOL["float64" if target == "reference" else "float32"]
    _compare(name, got, {s: v[idx] for s, v in pool.items()}, out, fin, tol)
    for s in pool:
        for r in (1, 2, 4):
            assert torch.equal(pool[s][r], before[s][r]), (s, r)


def test_step_errors_name_the_problem():
    k = scancc.compile("hgrn")
    x, g = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(scancc.api.InputError, match="without the time dim"):
        k.step(x[:, None], g[:, None], state=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(scancc.api.InputError, match="state 'h'"):
        k.step(x, g, state=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(scancc.api.InputError, match="state_indices"):
        k.step(x, g, state=torch.zeros(4, 3, dtype=torch.float64),
               state_indices=torch.tensor([0.0, 1.0]))


def _one_step(name, target, dtype, sizes_over=None, pool=False, seed=3):
    k = scancc.compile(name, target, **OPTS.get(name, {}))
    rec = k.ir
    sizes = {d.name: d.size or {**SIZES, "heads": 3, **(sizes_over or {})}.get(d.name, 2)
             for d in rec.dims}
    sizes[rec.time] = 1
    x = sample_inputs(rec, sizes, seed, registry.get(name).hints)
    x = {n: torch.tensor(v, dtype=torch.float32).to(dtype) for n, v in x.items()}
    rng = np.random.default_rng(seed)
    h = {s.name: torch.tensor(rng.standard_normal(tuple(sizes[d] for d in s.dims)),
                              dtype=torch.float32) for s in rec.states}
    xt = {n: _time_slice(rec, n, v, 0) for n, v in x.items()}
    if not pool:
        st = {s: v.clone().to(dtype) for s, v in h.items()}
        y = k.step(**xt, state=st if len(st) > 1 else next(iter(st.values())))
        return y, st
    B = sizes[rec.states[0].dims[0]]
    idx = torch.arange(B) * 2 + 1
    pools = {s: torch.full((2 * B + 1,) + tuple(v.shape[1:]), 7.0, dtype=dtype)
             for s, v in h.items()}
    for s, v in h.items():
        pools[s][idx] = v.to(dtype)
    y = k.step(**xt, state=pools if len(pools) > 1 else next(iter(pools.values())),
               state_indices=idx)
    for s, v in pools.items():  # rows not picked are untouched
        rest = torch.ones(v.shape[0], dtype=torch.bool)
        rest[idx] = False
        assert torch.all(v[rest] == 7.0), (name, s)
    return y, {s: v[idx] for s, v in pools.items()}


@pytest.mark.parametrize("pool", [False, True], ids=["state", "pool"])
@pytest.mark.parametrize("name", LIBRARY)
def test_one_triton_step_from_a_random_state(name, pool):
    """One step from a random state (every slot of a window nonzero, 3 heads): catches a
    state read by several programs being overwritten in place before all have read it
    (swa's `valid` [B, W] is read by every head's program)."""
    pytest.importorskip("triton")
    y, st = _one_step(name, "triton", torch.float32, pool=pool)
    y0, st0 = _one_step(name, "reference", torch.float64, pool=pool)
    y = y if isinstance(y, dict) else {"": y}
    y0 = y0 if isinstance(y0, dict) else {"": y0}
    _compare(name, y, st, y0, st0, TOL["float32"])


def test_one_triton_step_with_split_value_blocks():
    """value = 80: two value blocks (programs) per (batch, head)."""
    pytest.importorskip("triton")
    for pool in (False, True):
        y, st = _one_step("gated_delta_net", "triton", torch.float32, {"value": 80}, pool)
        y0, st0 = _one_step("gated_delta_net", "reference", torch.float64, {"value": 80}, pool)
        _compare("gated_delta_net", {"o": y}, st, {"o": y0}, st0, TOL["float32"])


NKI_SIZES = {"batch": 1, "time": 3, "heads": 1, "key": 3, "value": 2, "chan": 2, "dstate": 2,
             "headdim": 2, "groups": 1, "width": 2, "order": 2}  # fast shapes (emulator)


@pytest.mark.parametrize("name", LIBRARY)
def test_nki_steps_through_its_dedicated_step_kernel(name):
    """NKI (the emulator): stepping T times through the dedicated single-step kernel
    (backends/nki/step.py: no time loop in its source) equals one reference scan, for every
    library recurrence; the state is updated in place."""
    k = scancc.compile(name, **OPTS.get(name, {}))
    rec = k.ir
    sizes = {d.name: d.size or NKI_SIZES.get(d.name, 2) for d in rec.dims}
    x = sample_inputs(rec, sizes, 0, registry.get(name).hints)
    x = {n: v.astype(np.float32).astype(np.float64) for n, v in x.items()}
    h0 = {s: v.astype(np.float32).astype(np.float64)
          for s, v in sample_state(rec, sizes, 1).items()}
    out, fin = _scan_truth(name, x, h0)
    kn = scancc.compile(name, "nki", **OPTS.get(name, {}))
    got, state = _step_all(name, "nki", torch.float32, x, h0, torch.float32, kn)
    _compare(name, got, state, out, fin, TOL["float32"])
    assert kn.__dict__.get("_last_step_counters", {}).get("step") == "dedicated kernel"
    one = dict(sizes, **{rec.time: 1})
    var = next(iter(kn._step_plans.values())).rec
    src = kn.backend._render(var, one, True, True, kn.backend_options, None, step=True)[0]
    assert "for t0 in" not in src and "for t in range" not in src, src
    assert "for t0 in" in kn.backend._render(var, one, True, True, kn.backend_options)[0]


def test_nki_step_kernel_with_state_indices():
    """A state pool on NKI: the picked rows step through the step kernel, the others stay."""
    name = "gla"
    rec, sizes, x, h0 = _case(name)
    k = scancc.compile(name, "nki")
    kr = scancc.compile(name)
    B = sizes["batch"]
    pool = np.random.default_rng(5).standard_normal((5,) + h0["S"].shape[1:]).astype(np.float32)
    idx = torch.tensor([3, 1][:B])
    xt = {n: _time_slice(rec, n, torch.tensor(v, dtype=torch.float32), 0) for n, v in x.items()}
    st = torch.tensor(pool)
    y = k.step(**xt, state=st, state_indices=idx)
    assert k.__dict__["_last_step_counters"]["step"] == "dedicated kernel"
    yr, fr = kr(**{n: v.double().unsqueeze(1) for n, v in xt.items()},
                initial_state=torch.tensor(pool[idx.numpy()]).double(), output_final_state=True)
    np.testing.assert_allclose(y.double().numpy(), yr[:, 0].numpy(), rtol=2e-5, atol=2e-5)
    want = pool.copy()
    want[idx.numpy()] = fr.numpy()
    np.testing.assert_allclose(st.numpy(), want, rtol=2e-5, atol=2e-5)


def test_numpy_state_is_updated_in_place():
    """NumPy arrays (reference): the state array is written in place, outputs are NumPy."""
    name = "mamba2"
    rec, sizes, x, h0 = _case(name)
    out, fin = _scan_truth(name, x, h0)
    k = scancc.compile(name, **OPTS.get(name, {}))
    state = h0["h"].copy()
    ys = [k.step(**{n: np.take(v, t, axis=rec.input(n).dims.index(rec.time))
                    if rec.time in rec.input(n).dims else v for n, v in x.items()}, state=state)
          for t in range(sizes[rec.time])]
    assert all(isinstance(y, np.ndarray) for y in ys)
    np.testing.assert_allclose(np.stack(ys, 1), out["y"].numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(state, fin["h"].numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_step_with_an_optional_dim_left_out(target):
    """mamba's B and C without their groups dim ([B, N] per step)."""
    if target == "triton":
        pytest.importorskip("triton")
    rec, sizes, x, h0 = _case("mamba")
    x = {n: v.astype(np.float32).astype(np.float64) for n, v in x.items()}
    out, fin = _scan_truth("mamba", x, h0)
    dtype = torch.float64 if target == "reference" else torch.float32
    k = scancc.compile("mamba", target, **OPTS["mamba"])
    state = torch.tensor(h0["x"], dtype=dtype)
    ys = []
    for t in range(sizes[rec.time]):
        xt = {n: torch.tensor(v, dtype=dtype) for n, v in x.items()}
        step = {n: _time_slice(rec, n, v, t) for n, v in xt.items()}
        step["B"], step["C"] = step["B"][:, 0], step["C"][:, 0]  # groups = 1, left out
        ys.append(k.step(**step, state=state))
    _compare("mamba", {"y": torch.stack(ys, 2)}, {"x": state}, out, fin,
             TOL["float64" if target == "reference" else "float32"])
