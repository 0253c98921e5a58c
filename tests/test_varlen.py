"""Packed variable-length batches: ``kernel(*inputs, cu_seqlens=cu)`` equals N separate calls
(outputs, per-sequence final states, gradients) for every library recurrence, on the
reference, Triton (every algorithm option) and NKI (emulator); states never leak across a
boundary (NaN-poisoned sequences); bad ``cu_seqlens`` are refused naming the input.

Independent truth: N separate calls of the same kernel (each its own sequence, its own
initial state) and the reference backend in float64.
"""
import numpy as np
import pytest
import scancc
from scancc import registry
from scancc.api import InputError
from scancc.autograd import has_adjoint
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

NAMES = registry.names()


# gradients: the recurrences with a derived adjoint (all of them, bmojo included)
GRAD_NAMES = [n for n in NAMES if has_adjoint(registry.get(n).build())]
# the NKI emulator on B'MOJO's windows takes 20-45 s a case here: `-m slow`
NKI_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("bmojo") else n
             for n in NAMES]
# length 1, an empty sequence, and one crossing the 64-step chunks of the chunked Triton
# forms and of the backward's recomputation (autograd.DEFAULT_CHUNK)
LENS = (1, 70, 3, 0, 9)
SHORT = (3, 1, 5, 0, 4)


def _case(name, lens, dtype=np.float64, seed=0):
    k_ref = scancc.compile(name, "reference")
    rec = k_ref.ir
    cu = np.cumsum((0,) + tuple(lens)).astype(np.int64)
    T, N = int(cu[-1]), len(lens)
    sizes = dict(default_sizes(rec))
    sizes.update({"batch": 1, rec.time: T})
    hints = registry.get(name).hints
    x = {k: v.astype(dtype) for k, v in sample_inputs(rec, sizes, seed, hints).items()}
    sN = dict(sizes, batch=N)
    h0 = {k: v.astype(np.float32 if dtype != np.float64 else np.float64)
          for k, v in sample_state(rec, sN, seed + 1).items()}
    return rec, [x[i.name] for i in rec.inputs], h0, cu


def _one(rec, d):
    """A kernel's state/output argument: the array itself when the recurrence has one."""
    return d[next(iter(d))] if len(d) == 1 else d


def _as_dict(v, names):
    return v if isinstance(v, dict) else {names[0]: v}


def _slice_t(rec, args, t0, t1):
    return [a[(slice(None),) * i.dims.index(rec.time) + (slice(t0, t1),)]
            if rec.time in i.dims else a for i, a in zip(rec.inputs, args)]


def separate(kernel, rec, args, h0, cu):
    """(outputs by name, final states by name) of N separate calls, concatenated/stacked."""
    onames, snames = [o.name for o in rec.outputs], [s.name for s in rec.states]
    outs = {o: [] for o in onames}
    fins = {s: [] for s in snames}
    for n in range(len(cu) - 1):
        t0, t1 = int(cu[n]), int(cu[n + 1])
        init = {s: v[n:n + 1] for s, v in h0.items()}
        if t1 == t0:
            f = init
        else:
            y, f = kernel(*_slice_t(rec, args, t0, t1), initial_state=_one(rec, init),
                          output_final_state=True)
            for o, v in _as_dict(y, onames).items():
                outs[o].append(np.asarray(v))
            f = _as_dict(f, snames)
        for s in snames:
            fins[s].append(np.asarray(f[s], np.float64))
    return ({o: np.concatenate(outs[o], rec.outputs[i].dims.index(rec.time))
             for i, o in enumerate(onames)},
            {s: np.concatenate(fins[s], 0) for s in snames})


def packed(kernel, rec, args, h0, cu):
    y, f = kernel(*args, initial_state=_one(rec, h0), output_final_state=True, cu_seqlens=cu)
    return (_as_dict(y, [o.name for o in rec.outputs]),
            _as_dict(f, [s.name for s in rec.states]))


def _check(got, want, dtype, what, T):
    for k in want:
        if dtype == "float64":
            np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=1e-10,
                                       atol=1e-10, err_msg=f"{what} {k}")
        else:
            assert_close(got[k], want[k], dtype, f"{what} {k}", T=T)


# ---- reference: the semantics, every library recurrence ----

@pytest.mark.parametrize("name", NAMES)
def test_reference_equals_separate_calls(name):
    rec, args, h0, cu = _case(name, LENS)
    k = scancc.compile(name, "reference")
    y, f = packed(k, rec, args, h0, cu)
    ys, fs = separate(k, rec, args, h0, cu)
    _check(y, ys, "float64", "output", int(cu[-1]))
    _check(f, fs, "float64", "final state", int(cu[-1]))
    # the empty sequence's final state is its initial state
    for s in fs:
        np.testing.assert_array_equal(np.asarray(f[s])[3], h0[s][3])


@pytest.mark.parametrize("name", NAMES)
def test_reference_without_initial_state_is_zero_start(name):
    """No initial_state: every sequence starts from zero (not from the previous sequence)."""
    rec, args, h0, cu = _case(name, SHORT)
    k = scancc.compile(name, "reference")
    y, f = k(*args, output_final_state=True, cu_seqlens=cu)
    zeros = {s: np.zeros_like(v) for s, v in h0.items()}
    ys, fs = separate(k, rec, args, zeros, cu)
    _check(_as_dict(y, [o.name for o in rec.outputs]), ys, "float64", "output", 13)
    _check(_as_dict(f, [s.name for s in rec.states]), fs, "float64", "final", 13)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_nan_in_one_sequence_never_leaks(target):
    """The reset is a select: a NaN (or inf) in sequence 1 leaves sequences 0 and 2 exact."""
    name = "gla"
    dt = np.float64 if target == "reference" else np.float32
    rec, args, h0, cu = _case(name, (4, 5, 6), dt)
    k = scancc.compile(name, target)
    clean = packed(k, rec, args, h0, cu)
    poisoned = [a.copy() for a in args]
    for i, a in zip(rec.inputs, poisoned):
        if rec.time in i.dims:
            a[:, 4:9] = np.nan
    h0p = {s: v.copy() for s, v in h0.items()}
    for v in h0p.values():
        v[1] = np.inf
    y, f = packed(k, rec, poisoned, h0p, cu)
    for o in y:
        yo = np.asarray(y[o])
        assert np.isfinite(yo[:, :4]).all() and np.isfinite(yo[:, 9:]).all()
        np.testing.assert_array_equal(yo[:, :4], np.asarray(clean[0][o])[:, :4])
        np.testing.assert_array_equal(yo[:, 9:], np.asarray(clean[0][o])[:, 9:])
        assert np.isnan(yo[:, 4:9]).any()
    for s in f:
        np.testing.assert_array_equal(np.asarray(f[s])[[0, 2]], np.asarray(clean[1][s])[[0, 2]])


# ---- Triton ----

def _triton_case(name, algorithm, lens):
    rec, args, h0, cu = _case(name, lens, np.float32)
    opts = {} if algorithm == "auto" else {"algorithm": algorithm}
    try:
        k = scancc.compile(name, "triton", options=opts)
    except scancc.backends.UnsupportedError as e:
        pytest.skip(f"{algorithm} does not lower {name}: {e}")
    return rec, args, h0, cu, k


def _triton_forward(name, algorithm, lens):
    rec, args, h0, cu, k = _triton_case(name, algorithm, lens)
    T = int(cu[-1])
    y, f = packed(k, rec, args, h0, cu)
    from scancc.backends.triton import chunked
    want = "chunked_varlen" if algorithm in ("auto", "chunked", "staged") and \
        chunked.applies(rec)[0] else "recurrent_varlen"
    assert k.last_run.counters["algorithm"] == want  # the packed kernel ran
    ys, fs = separate(k, rec, args, h0, cu)
    _check(y, ys, "float32", "output vs separate calls", T)
    _check(f, fs, "float32", "final state vs separate calls", T)
    # and the reference in float64 (independent of the Triton algorithms)
    kr = scancc.compile(name, "reference")
    yr, fr = packed(kr, rec, [a.astype(np.float64) for a in args],
                    {s: v.astype(np.float64) for s, v in h0.items()}, cu)
    _check(y, yr, "float32", "output vs reference", T)
    _check(f, fr, "float32", "final state vs reference", T)


@pytest.mark.parametrize("name", NAMES)
def test_triton_every_recurrence(name):
    _triton_forward(name, "auto", SHORT)


@pytest.mark.parametrize("name,algorithm", [("gla", "chunked"), ("delta_net", "staged"),
                                            ("mamba2", "auto"), ("fir", "recurrent"),
                                            ("gla", "recurrent")])
def test_triton_crossing_chunks(name, algorithm):
    _triton_forward(name, algorithm, LENS)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["recurrent", "chunked", "staged"])
@pytest.mark.parametrize("name", NAMES)
def test_triton_every_recurrence_and_algorithm(name, algorithm):
    _triton_forward(name, algorithm, LENS)


def test_triton_source_of_the_packed_kernels():
    """The packed kernels read each sequence's steps from cu_seqlens and its states at n;
    the chunked one starts its chunks at bos and masks them at eos."""
    from scancc.backends.triton import varlen
    rec = registry.get("gla").build()
    for src in (varlen.Lowering(rec, {}).render(), varlen.ChunkedLowering(rec, {}).render()):
        assert "bos = tl.load(cu_seqlens + i_batch)" in src
        assert "p_h0 = h0 + i_batch * HEADS" in src and "p_ht = ht + i_batch * HEADS" in src
        assert "grid = (N_SEQ * HEADS" in src
    assert "for i_t in range(bos, eos):" in varlen.Lowering(rec, {}).render()
    src = varlen.ChunkedLowering(rec, {}).render()
    assert "for i_c in range(0, tl.cdiv(eos - bos, BLOCK_TIME)):" in src
    assert "o_time = bos + i_c * BLOCK_TIME" in src and "m_time = o_time < eos" in src


def test_triton_goldens_unchanged_by_varlen():
    """A call without cu_seqlens renders exactly as before (the packed kernels are
    subclasses; the plain lowerings have no varlen branch)."""
    from scancc.backends.triton import chunked, recurrent
    rec = registry.get("gla").build()
    assert "cu_seqlens" not in recurrent.Lowering(rec, {}).render()
    assert "cu_seqlens" not in chunked.Lowering(rec, {}).render()


# ---- NKI (emulator) ----

@pytest.mark.parametrize("order", ["outer", "time"])
@pytest.mark.parametrize("name", NKI_NAMES)
def test_nki_emulator(name, order):
    """One kernel (time tiles of 4 end at the boundaries, carries reset there), both loop
    orders, vs N separate calls and the float64 reference."""
    rec, args, h0, cu = _case(name, (3, 1, 9, 0, 6), np.float32)
    k = scancc.compile(name, "nki", options={"time_tile": 4, "loop_order": order})
    y, f = packed(k, rec, args, h0, cu)
    assert k.last_run.counters["varlen"] == "one kernel"
    ys, fs = separate(k, rec, args, h0, cu)
    _check(y, ys, "float32", "output", 19)
    _check(f, fs, "float32", "final", 19)
    kr = scancc.compile(name, "reference")
    yr, fr = packed(kr, rec, [a.astype(np.float64) for a in args],
                    {s: v.astype(np.float64) for s, v in h0.items()}, cu)
    _check(y, yr, "float32", "output vs reference", 19)
    _check(f, fr, "float32", "final vs reference", 19)


@pytest.mark.parametrize("name", ["gla", "fir", "mamba2"])
def test_nki_emulator_zero_start(name):
    """Without initial_state the carries are zeroed at each boundary (memset)."""
    rec, args, h0, cu = _case(name, SHORT, np.float32)
    k = scancc.compile(name, "nki", options={"time_tile": 2})
    y, f = k(*args, output_final_state=True, cu_seqlens=cu)
    zeros = {s: np.zeros_like(v) for s, v in h0.items()}
    ys, fs = separate(k, rec, args, zeros, cu)
    _check(_as_dict(y, [o.name for o in rec.outputs]), ys, "float32", "output", 13)
    _check(_as_dict(f, [s.name for s in rec.states]), fs, "float32", "final", 13)


def test_nki_kernel_source():
    from scancc.backends.nki.lowering import plan_and_render
    rec = registry.get("gla").build()
    src, _ = plan_and_render(rec, {"batch": 1, "time": 13, "heads": 2, "key": 8, "value": 8},
                             True, True, tt=4, algorithm="recurrent", cu=(0, 3, 4, 9, 9, 13))
    assert "TILES = ((0, 3, 0, 0), (3, 4, 1, 1), (4, 8, 2, -1), (8, 9, -1, 2), " \
           "(9, 13, 4, 4))" in src
    assert "init_S[n_start, i_heads" in src and "final_S[n_end, i_heads" in src
    assert "final_S = nl.ndarray((5, N_heads" in src


# ---- gradients ----

def _grads(kernel, rec, args, h0, cu, torch, dtype, weights=None, packed_call=True):
    xs = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in args]
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    hs = {s: torch.tensor(v, dtype=sdt, requires_grad=True) for s, v in h0.items()}
    onames, snames = [o.name for o in rec.outputs], [s.name for s in rec.states]
    terms = []
    if packed_call:
        y, f = kernel(*xs, initial_state=_one(rec, hs), output_final_state=True,
                      cu_seqlens=torch.tensor(cu))
        terms = list(_as_dict(y, onames).items()) + list(_as_dict(f, snames).items())
        loss = sum((v * weights[k]).sum() for k, v in terms)
    else:
        loss = 0
        for n in range(len(cu) - 1):
            t0, t1 = int(cu[n]), int(cu[n + 1])
            init = {s: v[n:n + 1] for s, v in hs.items()}
            if t1 > t0:
                y, f = kernel(*_slice_t(rec, xs, t0, t1), initial_state=_one(rec, init),
                              output_final_state=True)
                for o, v in _as_dict(y, onames).items():
                    ax = rec.outputs[onames.index(o)].dims.index(rec.time)
                    loss = loss + (v * weights[o].narrow(ax, t0, t1 - t0)).sum()
                f = _as_dict(f, snames)
            else:
                f = init
            for s in snames:
                loss = loss + (f[s] * weights[s][n:n + 1]).sum()
    loss.backward()
    return [x.grad.double().numpy() for x in xs], {s: v.grad.double().numpy()
                                                  for s, v in hs.items()}


def _grad_check(name, target, lens):
    torch = pytest.importorskip("torch")
    dt = np.float64 if target == "reference" else np.float32
    tdt = torch.float64 if target == "reference" else torch.float32
    rec, args, h0, cu = _case(name, lens, dt)
    k = scancc.compile(name, target)
    g = torch.Generator().manual_seed(0)
    y, f = packed(k, rec, args, h0, cu)
    weights = {kk: torch.randn(np.asarray(v).shape, generator=g, dtype=tdt)
               for kk, v in {**y, **f}.items()}
    gp, hp = _grads(k, rec, args, h0, cu, torch, tdt, weights, True)
    gs, hsep = _grads(k, rec, args, h0, cu, torch, tdt, weights, False)
    T = int(cu[-1])
    dts = "float64" if target == "reference" else "float32"
    assert any(np.abs(a).max() > 0 for a in gp)  # gradients flow
    for i, a, b in zip(rec.inputs, gp, gs):
        _check({i.name: a}, {i.name: b}, dts, "d input", T)
    for s in hp:
        assert np.abs(hp[s]).max() > 0
        _check({s: hp[s]}, {s: hsep[s]}, dts, "d initial_state", T)
        np.testing.assert_array_equal(hp[s][3], weights[s].double().numpy()[3])  # empty seq


@pytest.mark.parametrize("name", GRAD_NAMES)
def test_reference_gradients(name):
    _grad_check(name, "reference", LENS)


@pytest.mark.parametrize("name", ["gla", "fir", "delta_net", "mamba2"])
def test_triton_gradients(name):
    _grad_check(name, "triton", SHORT)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_triton_gradients_every_recurrence(name):
    _grad_check(name, "triton", LENS)


# ---- bad cu_seqlens ----

@pytest.mark.parametrize("cu,match", [
    ([0, 5, 3, 13], r"non-decreasing.*cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
    ([1, 5, 13], r"cu_seqlens\[0\] = 0, got 1"),
    ([0, 5, 12], r"cu_seqlens\[-1\] = T = 13 .*input 'q'.*got 12"),
    (np.array([0.0, 5.0, 13.0]), r"integer array.*got dtype float64"),
    (np.array([[0, 13]]), r"shape \[N\+1\].*got shape \(1, 2\)"),
    ("0,13", r"cu_seqlens: expected an int64 array"),
])
def test_bad_cu_seqlens(cu, match):
    rec, args, h0, _ = _case("gla", SHORT)
    k = scancc.compile("gla", "reference")
    with pytest.raises(InputError, match=match):
        k(*args, cu_seqlens=cu)


def test_bad_cu_seqlens_torch_float():
    torch = pytest.importorskip("torch")
    rec, args, h0, _ = _case("gla", SHORT)
    k = scancc.compile("gla", "reference")
    with pytest.raises(InputError, match=r"cu_seqlens: expected an integer array.*float32"):
        k(*[torch.tensor(a) for a in args], cu_seqlens=torch.tensor([0.0, 13.0]))


def test_batch_not_one():
    rec, args, h0, _ = _case("gla", SHORT)
    k = scancc.compile("gla", "reference")
    two = [np.concatenate([a, a], 0) for a in args]
    with pytest.raises(InputError, match=r"cu_seqlens: packed sequences take batch 1.*got "
                                         r"batch 2"):
        k(*two, cu_seqlens=np.array([0, 13]))


def test_initial_state_needs_one_per_sequence():
    rec, args, h0, cu = _case("gla", SHORT)
    k = scancc.compile("gla", "reference")
    with pytest.raises(InputError, match=r"initial_state 'S': expected shape \[sequences=5, "
                                         r"heads=.*got \(4,"):
        k(*args, initial_state=h0["S"][:4], cu_seqlens=cu)


def test_plan_reuse_rechecks_values():
    """A second call with a cu_seqlens of the same length reuses the plan but is still
    checked, and takes the new boundaries."""
    rec, args, h0, cu = _case("hgrn", SHORT)
    k = scancc.compile("hgrn", "reference")
    a = k(*args, cu_seqlens=cu)
    cu2 = np.array([0, 1, 2, 3, 4, 13])
    b = k(*args, cu_seqlens=cu2)
    assert not np.array_equal(a, b)
    ys, _ = separate(k, rec, args, {"h": np.zeros((5, *h0["h"].shape[1:]))}, cu2)
    np.testing.assert_allclose(b, ys["y"] if "y" in ys else next(iter(ys.values())),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="non-decreasing"):
        k(*args, cu_seqlens=np.array([0, 5, 4, 6, 7, 13]))


@pytest.mark.parametrize("name", ["gla", "fir", "swa", "mamba", "iir"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_backward_chunks_cut_sequences_anywhere(name, chunk):
    """The packed backward runs chunk by chunk (O(T/C) kept states): chunks of 1, 3 and 4
    steps cut sequences anywhere (a chunk of pieces, a piece continuing over several chunks,
    a boundary on a chunk edge); the gradients equal the unchunked ones."""
    from scancc.varlen import backward_varlen
    rec, args, h0, cu = _case(name, (1, 7, 3, 0, 5, 2))
    x = dict(zip([i.name for i in rec.inputs], args))
    rng = np.random.default_rng(3)
    k = scancc.compile(name, "reference")
    y, f = packed(k, rec, args, h0, cu)
    dy = {o: rng.standard_normal(np.asarray(v).shape) for o, v in y.items()}
    dfin = {s: rng.standard_normal(np.asarray(v).shape) for s, v in f.items()}
    cu = tuple(int(c) for c in cu)
    g1, h1 = backward_varlen(rec, x, dy, h0, dfin, cu, chunk=chunk)
    g2, h2 = backward_varlen(rec, x, dy, h0, dfin, cu, chunk=10 ** 6)
    for kk in g2:
        assert np.abs(g2[kk]).max() > 0
        np.testing.assert_allclose(g1[kk], g2[kk], rtol=1e-10, atol=1e-10, err_msg=kk)
    for s in h2:
        np.testing.assert_allclose(h1[s], h2[s], rtol=1e-10, atol=1e-10, err_msg=s)
        np.testing.assert_array_equal(h1[s][3], dfin[s][3])  # the empty sequence


@pytest.mark.parametrize("target", ["reference", "triton", "nki"])
def test_yaml_spec_and_registered_recurrence(target, gated_iir):
    """Not only the library: a YAML spec and a registered recurrence take cu_seqlens too."""
    import pathlib
    spec = pathlib.Path(__file__).resolve().parents[1] / "specs" / "gated_iir.yaml"
    dt = np.float64 if target == "reference" else np.float32
    for what in (str(spec), "gated_iir"):
        k = scancc.compile(what, target)
        rec = k.ir
        cu = np.array([0, 2, 7, 8])
        sizes = dict(default_sizes(rec), batch=1, **{rec.time: 8})
        x = sample_inputs(rec, sizes, 0, {"a": "stable_poly", "b": "small"})
        args = [x[i.name].astype(dt) for i in rec.inputs]
        h0 = {s: v.astype(dt) for s, v in sample_state(rec, dict(sizes, batch=3)).items()}
        y, f = packed(k, rec, args, h0, cu)
        ys, fs = separate(scancc.compile(what, "reference"), rec,
                          [a.astype(np.float64) for a in args],
                          {s: v.astype(np.float64) for s, v in h0.items()}, cu)
        _check(y, ys, "float64" if target == "reference" else "float32", "output", 8)
        _check(f, fs, "float64" if target == "reference" else "float32", "final", 8)


def _dense_recurrence():
    """A dense transition (no library recurrence has one) and a nonlinear readout."""
    from scancc.ir import Builder, dense, reduce_sum, sigmoid, silu
    r = Builder("varlen_test_dense")
    b, t, h, n, c = (r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head"),
                     r.dim("n"), r.dim("c"))
    x, g = r.input("x", [b, t, h, n]), r.input("g", [b, t, h])
    m = r.input("m", [h, n, c])
    s = r.state("s", [b, h, n], dense(n, c, m * sigmoid(g)), inject=silu(x))
    r.output("y", [b, t, h, n], s * x + reduce_sum(s * s, n))
    return r.build()


@pytest.mark.parametrize("target", ["reference", "triton", "nki"])
def test_dense_transition(target):
    """Every kind, not only the library's: a dense state, forward and (reference, Triton)
    gradients, packed vs separate calls."""
    rec = _dense_recurrence()
    try:
        k = scancc.compile(rec, target)
    except scancc.backends.UnsupportedError as e:
        pytest.skip(str(e))
    dt = np.float64 if target == "reference" else np.float32
    cu = np.array([0, 1, 6, 6, 10])
    sizes = dict(default_sizes(rec), batch=1, time=10)
    x = sample_inputs(rec, sizes, 0, {"m": "small"})
    args = [x[i.name].astype(dt) for i in rec.inputs]
    h0 = {s: v.astype(dt) for s, v in sample_state(rec, dict(sizes, batch=4)).items()}
    y, f = packed(k, rec, args, h0, cu)
    kr = scancc.compile(rec, "reference")
    ys, fs = separate(kr, rec, [a.astype(np.float64) for a in args],
                      {s: v.astype(np.float64) for s, v in h0.items()}, cu)
    tol = "float64" if target == "reference" else "float32"
    _check(y, ys, tol, "output", 10)
    _check(f, fs, tol, "final", 10)
    if target != "nki":
        torch = pytest.importorskip("torch")
        tdt = torch.float64 if target == "reference" else torch.float32
        g = torch.Generator().manual_seed(0)
        w = {kk: torch.randn(np.asarray(v).shape, generator=g, dtype=tdt)
             for kk, v in {**y, **f}.items()}
        gp, hp = _grads(k, rec, args, h0, cu, torch, tdt, w, True)
        gs, hsep = _grads(k, rec, args, h0, cu, torch, tdt, w, False)
        for i, a, b in zip(rec.inputs, gp, gs):
            assert np.abs(a).max() > 0
            _check({i.name: a}, {i.name: b}, tol, "d input", 10)
        _check(hp, hsep, tol, "d initial_state", 10)


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("name", ["linear_attn", "retnet", "simple_gla", "mamba2"])
def test_nki_chunked_form_packed(name, init):
    """The NKI chunked (matmul) form, packed: its time tiles end at the boundaries too and the
    (K, V) carry is replaced (DMA) or zeroed (memset) at a sequence's first tile."""
    rec, args, h0, cu = _case(name, (3, 1, 9, 0, 6), np.float32)
    k = scancc.compile(name, "nki", options={"time_tile": 4, "algorithm": "chunked"})
    h = h0 if init else {s: np.zeros_like(v) for s, v in h0.items()}
    y, f = k(*args, initial_state=_one(rec, h0) if init else None, output_final_state=True,
             cu_seqlens=cu)
    assert set(k.backend.last_plan.algorithms.values()) == {"chunked"}
    kr = scancc.compile(name, "reference")
    yr, fr = packed(kr, rec, [a.astype(np.float64) for a in args],
                    {s: v.astype(np.float64) for s, v in h.items()}, cu)
    _check(_as_dict(y, [o.name for o in rec.outputs]), yr, "float32", "output", 19)
    _check(_as_dict(f, [s.name for s in rec.states]), fr, "float32", "final", 19)


@pytest.mark.parametrize("name", ["gla", "fir", "mamba2"])
def test_nki_gradients(name):
    """Gradients of a packed call on NKI (its packed kernels run the states view and the
    backward recurrence where NKI lowers them) vs N separate calls."""
    _grad_check(name, "nki", SHORT)


def test_cu_seqlens_kinds_accepted():
    """int64 and int32 arrays, torch tensors and plain lists of ints give the same result."""
    torch = pytest.importorskip("torch")
    rec, args, h0, cu = _case("hgrn", SHORT)
    k = scancc.compile("hgrn", "reference")
    want = k(*args, cu_seqlens=cu)
    for c in (cu.astype(np.int32), torch.tensor(cu), torch.tensor(cu, dtype=torch.int32),
              [int(v) for v in cu]):
        np.testing.assert_array_equal(k(*args, cu_seqlens=c), want)


# ---- torch.compile of packed calls: cu_seqlens a tensor input of the traced op ----------
@pytest.mark.parametrize("name,target", [("gla", "reference"), ("mamba2", "reference"),
                                         ("simple_gla", "triton")])
def test_packed_call_under_torch_compile_fullgraph(name, target):
    """kernel(..., cu_seqlens=cu) inside torch.compile(fullgraph=True): one graph, no break;
    outputs and final states equal N separate calls (reference, float64 truth), gradients
    equal the eager packed call's; a second cu with the same N but other lengths runs through
    the same compiled graph (cu is a tensor input, not a baked constant) and is right too."""
    torch = pytest.importorskip("torch")
    if target == "triton":
        pytest.importorskip("triton")
    dt = torch.float64 if target == "reference" else torch.float32
    tol = 1e-9 if target == "reference" else 2e-4
    k = scancc.compile(name, target)
    kr = scancc.compile(name, "reference")
    rec = k.ir
    snames = [s.name for s in rec.states]
    onames = [o.name for o in rec.outputs]

    def fn(cu, h0, *xs):
        y, f = k(*xs, cu_seqlens=cu, initial_state=h0, output_final_state=True)
        return y, f

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for lens in ((3, 1, 5, 4), (6, 2, 1, 4)):  # same N and T, other boundaries
        _, args, h0, cu = _case(name, lens)
        want_y, want_f = separate(kr, rec, args, h0, cu)
        xs = [torch.tensor(a, dtype=dt, requires_grad=True) for a in args]
        h = {s: torch.tensor(v, dtype=dt, requires_grad=True) for s, v in h0.items()}
        cut = torch.tensor(cu)
        y, f = compiled(cut, _one(rec, h), *xs)
        for o, v in _as_dict(y, onames).items():
            np.testing.assert_allclose(v.detach().double().numpy(), want_y[o], rtol=tol,
                                       atol=tol, err_msg=f"{name} {o} {lens}")
        for s, v in _as_dict(f, snames).items():
            np.testing.assert_allclose(v.detach().double().numpy(), want_f[s], rtol=tol,
                                       atol=tol, err_msg=f"{name} final {s} {lens}")
        wy = [torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(1))
              for v in _as_dict(y, onames).values()]
        loss = sum((v * w).sum() for v, w in zip(_as_dict(y, onames).values(), wy)) + \
            sum(v.sum() for v in _as_dict(f, snames).values())
        got = torch.autograd.grad(loss, [*xs, *h.values()], allow_unused=True)
        xe = [x.detach().requires_grad_() for x in xs]
        he = {s: v.detach().requires_grad_() for s, v in h.items()}
        ye, fe = fn(cut, _one(rec, he), *xe)
        le = sum((v * w).sum() for v, w in zip(_as_dict(ye, onames).values(), wy)) + \
            sum(v.sum() for v in _as_dict(fe, snames).values())
        want = torch.autograd.grad(le, [*xe, *he.values()], allow_unused=True)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.isfinite(a).all()
                np.testing.assert_allclose(a.double().numpy(), b.double().numpy(), rtol=tol,
                                           atol=tol)
    explain = torch._dynamo.explain(fn)(cut, _one(rec, h), *xs)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


def test_packed_call_under_torch_compile_refuses_float_cu_seqlens():
    torch = pytest.importorskip("torch")
    k = scancc.compile("hgrn")
    _, args, _, cu = _case("hgrn", (2, 3))

    @torch.compile(fullgraph=True, backend="eager")
    def fn(cu, *xs):
        return k(*xs, cu_seqlens=cu)
    with pytest.raises(Exception, match="cu_seqlens"):
        fn(torch.tensor(cu, dtype=torch.float32), *map(torch.tensor, args))
