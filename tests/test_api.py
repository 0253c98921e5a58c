"""The public API: compile(), Kernel calls with NumPy and torch, options, states, check."""
import numpy as np
import pytest
import scancc
from scancc import backends
from scancc.check import check_one
from scancc.testing import assert_close, default_sizes, sample_inputs

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")


def _mamba_inputs(rng, b=2, d=4, T=7, n=3):
    return dict(u=rng.standard_normal((b, d, T)), delta=rng.uniform(0.01, 0.2, (b, d, T)),
                A=-np.exp(rng.standard_normal((d, n))), B=rng.standard_normal((b, n, T)),
                C=rng.standard_normal((b, n, T)))


def test_torch_in_torch_out_with_the_input_dtype():
    rng = np.random.default_rng(0)
    x = _mamba_inputs(rng)
    want = scancc.compile("mamba")(**x)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        t = {k: torch.from_numpy(v).to(dt) for k, v in x.items()}
        y, h = scancc.compile("mamba")(**t, output_final_state=True)
        assert isinstance(y, torch.Tensor) and y.dtype == dt and y.shape == (2, 4, 7)
        assert h.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        ref = scancc.compile("mamba")(**{k: v.double().numpy() for k, v in t.items()})
        assert_close(y, ref, str(dt).replace("torch.", ""))
    assert_close(scancc.compile("mamba")(**{k: torch.from_numpy(v) for k, v in x.items()}),
                 want, "float64")


def test_mixing_numpy_and_torch_is_an_error():
    x = _mamba_inputs(np.random.default_rng(1))
    x["u"] = torch.from_numpy(x["u"])
    with pytest.raises(scancc.InputError, match="mix NumPy arrays and torch tensors"):
        scancc.compile("mamba")(**x)


def test_optional_inputs_specialize_the_kernel():
    rng = np.random.default_rng(2)
    x = _mamba_inputs(rng)
    z, D = rng.standard_normal((2, 4, 7)), rng.standard_normal(4)
    k = scancc.compile("mamba")
    base, with_z, with_dz = k(**x), k(**x, z=z), k(**x, z=z, D=D)
    silu = z / (1 + np.exp(-z))
    assert_close(with_z, base * silu, "float64")
    assert_close(with_dz, (base + D[:, None] * x["u"]) * silu, "float64")
    assert "input z" not in str(k.ir) and "input z" in str(scancc.compile("mamba", z=True).ir)


def test_positional_and_named_inputs_agree_and_duplicates_are_rejected():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 5, 2, 3)) for _ in range(3))
    g = -rng.uniform(0, 1, (1, 5, 2))
    ker = scancc.compile("simple_gla")
    np.testing.assert_array_equal(ker(q, k, v, g), ker(g=g, v=v, k=k, q=q))
    with pytest.raises(scancc.InputError, match="given twice"):
        ker(q, k, v, g, q=q)


def test_multi_state_initial_state_must_be_a_dict():
    x = np.zeros((1, 3, 1, 2))
    with pytest.raises(scancc.InputError, match="pass initial_state as a dict"):
        scancc.compile("swa")(x, x, x, initial_state=np.zeros((1, 1, 4, 2)))
    with pytest.raises(scancc.InputError, match="has no state 'S'"):
        scancc.compile("swa")(x, x, x, initial_state={"S": np.zeros(1)})


def test_unknown_target_lists_the_backends():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*reference"):
        scancc.compile("gla", target="cuda")


def test_backend_report_says_how_each_runs():
    rows = {n: (ok, why) for n, ok, why in backends.report()}
    assert rows["reference"][0] and "NumPy" in rows["reference"][1]


@pytest.mark.parametrize("name", scancc.names())
def test_check_reference_state_continuation(name):
    row = check_one(name, "reference", "float64", T=9)
    assert row.ok, row.note
    assert row.rel_rms < 1e-12


def test_check_flags_a_wrong_backend():
    """A backend that is off by a little is reported over tolerance, not passed."""
    from scancc.backends import Backend, RunResult
    from scancc.backends.reference import ReferenceBackend

    class Skewed(ReferenceBackend):
        name = "skewed"

        def run(self, *a, **kw):
            res = super().run(*a, **kw)
            return RunResult({k: v * (1 + 1e-3) for k, v in res.outputs.items()},
                             res.final_states)

    backends._BACKENDS["skewed"] = ("scancc.backends.reference", "ReferenceBackend")
    backends._instances["skewed"] = Skewed()
    try:
        row = check_one("gla", "skewed", "float32", T=5)
        assert not row.ok and "over tolerance" in row.note and 5e-4 < row.rel_rms < 2e-3
    finally:
        backends._BACKENDS.pop("skewed")
        backends._instances.pop("skewed")
    assert isinstance(Skewed(), Backend)


def test_sampled_inputs_keep_every_library_recurrence_finite_at_long_T():
    for name in scancc.names():
        e = scancc.get(name)
        rec = e.build(**{o: True for o in e.optional_inputs})
        sizes = default_sizes(rec, time=300)
        y = scancc.compile(rec)(**sample_inputs(rec, sizes, 0, e.hints))
        assert np.all(np.isfinite(y)) and np.abs(y).max() < 1e4, name


def test_backends_that_convert_arrays_are_told_the_callers_dtype():
    """torch bfloat16 reaches the NKI backend as a NumPy array; the kernel must still run
    (and move bytes) as bfloat16: half the input DMA of a float32 call."""
    e = scancc.get("hgrn")
    rec = e.build()
    x = sample_inputs(rec, default_sizes(rec, time=70), 1, e.hints)
    k = scancc.compile("hgrn", target="nki")
    k(**{n: torch.from_numpy(v).float() for n, v in x.items()})
    f32 = k.last_run.counters["dma_bytes_in"]
    k(**{n: torch.from_numpy(v).to(torch.bfloat16) for n, v in x.items()})
    assert k.last_run.counters["dma_bytes_in"] * 2 == f32


def test_backend_options_pass_through_compile():
    k = scancc.compile("hgrn", target="nki", time_tile=32)
    assert k.backend_options == {"time_tile": 32}
    with pytest.raises(scancc.InputError, match="nki backend options: .*time_tile"):
        scancc.compile("hgrn", target="nki", time_tiles=32)


@pytest.mark.parametrize("target", [n for n, ok, _ in backends.report() if ok])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_check_runs_every_available_backend_at_each_dtype(target, dtype):
    """What the README's main job runs (`scancc check --all --dtypes float32,bfloat16`)."""
    row = check_one("hgrn", target, "float64" if target == "reference" else dtype, T=17)
    assert row.ok, row.note


def test_a_repeated_call_structure_reuses_its_plan_and_a_new_one_is_checked():
    """Kernel.__call__ plans once per call structure (which inputs, how given, options,
    kinds, dtypes, shapes): a repeat reuses the plan, anything new is bound and checked."""
    rng = np.random.default_rng(3)
    x = _mamba_inputs(rng)
    k = scancc.compile("mamba")
    y1 = k(**x)
    assert len(k._plans) == 1
    y2 = k(**{n: v + 0.0 for n, v in x.items()})           # same structure, new arrays
    assert len(k._plans) == 1 and np.array_equal(y1, y2)
    assert not np.array_equal(k(**{**x, "u": 2 * x["u"]}), y1)  # the plan binds the new values
    with pytest.raises(scancc.InputError, match="u"):       # a new shape: planned, so checked
        k(**{**x, "u": x["u"][:, :-1]})
    with pytest.raises(scancc.InputError, match="floating dtype"):
        k(**{**x, "u": x["u"].astype(np.int64)})
    y3, h = k(*x.values(), output_final_state=True)        # positional: another structure
    np.testing.assert_array_equal(y3, y1)
    assert len(k._plans) == 2                               # failed plans are not kept
