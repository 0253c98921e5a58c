"""The NKI backend against the reference: every library recurrence, float32 and bfloat16,
awkward shapes (T = 1, 63, 64, 700; partition dims not a multiple of 128; T not a multiple of
the time tile), with and without initial/final state; the public compile() path; a user
registered recurrence; the tile plan's budget errors.

Golden files of the generated source: tests/test_golden.py (every source backend).
"""
import numpy as np
import pytest

import scancc
from scancc import registry
from scancc.backends import get
from scancc.backends.nki import PlanError, emulator
from scancc.ir import Builder, const, dense, reduce_sum
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

# the library, from the registry
LIBRARY = [n for n in registry.names() if registry.get(n).origin == "library"]
# the dim each recurrence puts on the partitions; 130 gives a full tile and a ragged one
PARTITION_DIM = {"linear_attn": "value", "retnet": "value", "simple_gla": "value",
                 "gla": "value", "hgrn": "chan", "delta_net": "value", "gated_delta_net": "value",
                 "mamba": "chan", "mamba2": "headdim", "s4d": "heads", "fir": "chan",
                 "iir": "chan", "swa": "heads",
                 "hgrn2": "value", "rwkv6": "value", "mamba3": "headdim",
                 "bmojo_f": "heads", "bmojo": "heads", "rwkv7": "value", "kda": "value"}


def test_partition_dim_table_covers_the_library():
    """PARTITION_DIM is a hand-checked expectation: a new library recurrence needs its row."""
    assert set(PARTITION_DIM) == set(LIBRARY)


def check(name, dtype="float32", T=63, init=True, final=True, options=None, algorithm="auto",
          loop_order="auto", **over):
    entry = registry.get(name)
    rec = entry.build(**(options or {}))
    sizes = default_sizes(rec, time=T, **over)
    x = sample_inputs(rec, sizes, seed=T, hints=entry.hints)
    if dtype == "bfloat16":  # the reference sees the same (rounded) inputs the kernel gets
        x = {k: emulator.DTYPES["bfloat16"].round(v).astype(np.float64) for k, v in x.items()}
    h0 = sample_state(rec, sizes) if init else None
    ref = get("reference").run(rec, x, sizes, h0, final, {})
    be = get("nki")
    got = be.run(rec, x, sizes, h0, final, {"dtype": dtype, "algorithm": algorithm,
                                             "loop_order": loop_order})
    for k, r in ref.outputs.items():
        assert_close(got.outputs[k], r, dtype, f"{name} output {k} (T={T}, {dtype})")
    if final:
        for k, r in ref.final_states.items():
            # states accumulate in float32 whatever the input dtype
            assert_close(got.final_states[k], r, "float32", f"{name} final state {k}")
    c = got.counters
    assert c["peak_sbuf_bytes_per_partition"] <= be.last_plan.sbuf_bytes
    assert c["peak_psum_banks"] <= be.last_plan.psum_banks <= emulator.PSUM_BANKS
    return got, be.last_plan


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", LIBRARY)
def test_library_against_reference(name, dtype):
    check(name, dtype, T=63)


@pytest.mark.parametrize("name", LIBRARY)
def test_single_step_no_initial_state(name):
    check(name, "float32", T=1, init=False, final=True)


@pytest.mark.parametrize("name", ["hgrn", "mamba", "linear_attn", "iir"])
def test_ragged_partitions_and_time_tiles(name):
    # T = 700: a full 512-step tile then a ragged one; 130 rows: a full and a ragged tile
    _, plan = check(name, "float32", T=700, **{PARTITION_DIM[name]: 130})
    assert plan.tt == (128 if plan.chunked else 512) and plan.pd == PARTITION_DIM[name]


@pytest.mark.parametrize("name", LIBRARY)
def test_time_tile_outermost_loop_order(name):
    # carries for every (outer index, partition tile) slot live across the time loop
    _, plan = check(name, "float32", T=150, loop_order="time", **{PARTITION_DIM[name]: 130}
                    if name in ("hgrn", "mamba", "iir", "s4d") else {})
    assert plan.loop_order == "time"


def test_loop_order_picked_by_dma_bytes():
    # mamba2's B and C are shared by the heads: with the time tile outermost they load once
    _, plan = check("mamba2", "float32", T=40, heads=4)
    assert plan.loop_order == "time"
    got, _ = check("mamba2", "float32", T=40, heads=4, loop_order="outer")
    moved = got.counters["dma_bytes_in"] + got.counters["dma_bytes_out"]
    got2, _ = check("mamba2", "float32", T=40, heads=4, loop_order="time")
    assert got2.counters["dma_bytes_in"] + got2.counters["dma_bytes_out"] < moved


CHUNKED = ["linear_attn", "retnet", "simple_gla", "mamba2", "gla", "hgrn2", "rwkv6"]


@pytest.mark.parametrize("T", [1, 63, 300])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_matmul_form(name, dtype, T):
    # T = 300: two full 128-step chunks (time on the partitions) and a ragged one
    _, plan = check(name, dtype, T=T, algorithm="chunked")
    assert plan.chunked and plan.tt == min(T, 128)


@pytest.mark.parametrize("name", CHUNKED)
def test_recurrent_form_where_chunked_is_the_default(name):
    _, plan = check(name, "float32", T=63, algorithm="recurrent")
    assert not plan.chunked


def test_chunked_refuses_what_it_cannot_lower():
    from scancc.backends import UnsupportedError
    rec = registry.get("delta_net").build()  # householder: no chunked form on NKI
    with pytest.raises(UnsupportedError, match="delta_net.*chunked"):
        get("nki").render(rec, {"algorithm": "chunked"})
    rec = registry.get("linear_attn").build()
    sizes = default_sizes(rec, key=130)  # K must fit the partitions: falls back to the scan
    _, plan = get("nki")._render(rec, sizes, False, False, {})
    assert not plan.chunked


@pytest.mark.parametrize("order", ["outer", "time"])
@pytest.mark.parametrize("name", ["linear_attn", "mamba2", "gla", "rwkv6"])
def test_chunked_with_partition_tiles(name, order):
    # V = 200: two V tiles, each with its own (K, V) carry slot
    _, plan = check(name, "float32", T=150, algorithm="chunked", loop_order=order,
                    **{PARTITION_DIM[name]: 200})
    assert plan.chunked and plan.loop_order == order


@pytest.mark.parametrize("name", ["mamba", "simple_gla", "delta_net", "fir", "iir", "swa"])
def test_carry_across_small_time_tiles(name):
    entry = registry.get(name)
    rec = entry.build()
    sizes = default_sizes(rec, time=40)
    x = sample_inputs(rec, sizes, seed=3, hints=entry.hints)
    h0 = sample_state(rec, sizes)
    ref = get("reference").run(rec, x, sizes, h0, True, {})
    got = get("nki").run(rec, x, sizes, h0, True, {"time_tile": 16})
    assert get("nki").last_plan.tt == 16
    for k in ref.outputs:
        assert_close(got.outputs[k], ref.outputs[k], "float32", k)
    for k in ref.final_states:
        assert_close(got.final_states[k], ref.final_states[k], "float32", k)


@pytest.mark.parametrize("name,opts,over", [("swa", {"window": 6}, {}),
                                            ("fir", {}, {"width": 5})])
def test_shift_window_longer_than_time_tile(name, opts, over):
    # slots older than the tile come from the carry: lag > tile length
    entry = registry.get(name)
    rec = entry.build(**opts)
    sizes = default_sizes(rec, time=23, **over)
    x = sample_inputs(rec, sizes, seed=8, hints=entry.hints)
    h0 = sample_state(rec, sizes)
    ref = get("reference").run(rec, x, sizes, h0, True, {})
    for tt in (1, 3, 4):
        got = get("nki").run(rec, x, sizes, h0, True, {"time_tile": tt})
        for k in ref.outputs:
            assert_close(got.outputs[k], ref.outputs[k], "float32", f"{k} (time tile {tt})")
        for k in ref.final_states:
            assert_close(got.final_states[k], ref.final_states[k], "float32", k)


def test_mamba_options_through_compile():
    entry = registry.get("mamba")
    opts = dict(delta_softplus=True)
    rec = entry.build(D=True, z=True, delta_bias=True, **opts)
    sizes = default_sizes(rec, time=37)
    x = sample_inputs(rec, sizes, seed=5, hints=entry.hints)
    x32 = {k: v.astype(np.float32) for k, v in x.items()}
    y_ref, h_ref = scancc.compile("mamba", **opts)(**x, output_final_state=True)
    y, h = scancc.compile("mamba", target="nki", **opts)(**x32, output_final_state=True)
    assert y.dtype == np.float32 and h.shape == h_ref.shape
    assert_close(y, y_ref, "float32", "mamba y via compile()")
    assert_close(h, h_ref, "float32", "mamba final state via compile()")


def test_mamba2_via_compile_with_initial_state():
    entry = registry.get("mamba2")
    rec = entry.build()
    sizes = default_sizes(rec, time=50)
    x = {k: v.astype(np.float32) for k, v in
         sample_inputs(rec, sizes, seed=2, hints=entry.hints).items()}
    h0 = sample_state(rec, sizes)["h"].astype(np.float32)
    ref = scancc.compile("mamba2")(**x, initial_state=h0)
    got = scancc.compile("mamba2", target="nki")(**x, initial_state=h0)
    assert_close(got, ref, "float32", "mamba2 via compile()")


def test_torch_bfloat16_through_compile():
    torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
    entry = registry.get("hgrn")
    rec = entry.build()
    sizes = default_sizes(rec, time=70)
    x = {k: torch.from_numpy(v).to(torch.bfloat16)
         for k, v in sample_inputs(rec, sizes, seed=9, hints=entry.hints).items()}
    y = scancc.compile("hgrn", target="nki")(**x)
    ref = scancc.compile("hgrn")(**{k: v.double().numpy() for k, v in x.items()})
    assert y.dtype == torch.bfloat16
    assert_close(y, ref, "bfloat16", "hgrn via compile() with torch bfloat16 inputs")


@pytest.fixture
def dense_rotation():
    """A user recurrence with a dense transition (no library recurrence has one)."""
    name = "nki_test_damped_rotation"

    @scancc.register(name, hints={"m": "small"})
    def damped(r):
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        i, j = r.dim("row"), r.dim("col")
        x, m = r.input("x", [b, t, d]), r.input("m", [d, i, j])
        h = r.state("h", [b, d, i], dense(i, j, m), inject=x)
        r.output("y", [b, t, d], reduce_sum(h, i))
    yield name
    registry.unregister(name)


def test_user_registered_dense_recurrence(dense_rotation):
    check(dense_rotation, "float32", T=45, row=3, col=3)
    check(dense_rotation, "bfloat16", T=45, row=3, col=3)


def test_user_recurrence_with_shared_decay_and_two_outputs():
    r = Builder("nki_test_leaky")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x, a = r.input("x", [b, t, d]), r.input("a", [d])
    from scancc.ir import diagonal, exp, scalar, sigmoid
    h = r.state("h", [b, d], diagonal(sigmoid(a)), inject=x)
    g = r.state("g", [b, d], scalar(const(0.5)), inject=exp(-x * x))
    r.output("y", [b, t, d], h * g)
    r.output("z", [b, t, d], h - 2.0 * g)
    rec = r.build()
    sizes = {"batch": 2, "time": 33, "chan": 5}
    x = sample_inputs(rec, sizes, seed=1)
    ref = get("reference").run(rec, x, sizes, None, True, {})
    got = get("nki").run(rec, x, sizes, None, True, {})
    for k in ("y", "z"):
        assert_close(got.outputs[k], ref.outputs[k], "float32", k)
    for k in ("h", "g"):
        assert_close(got.final_states[k], ref.final_states[k], "float32", k)


@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net"])
def test_l2norm_in_kernel(name):
    check(name, "float32", T=30, options={"use_qk_l2norm_in_kernel": True})


def test_every_elementwise_and_reduction_rule():
    """A user recurrence touching the op rules the library does not: max over a loop dim,
    iota over the partition dim, logsigmoid, sigmoid, sqrt, division, minimum, clamp, neg."""
    from scancc.ir import (clamp, diagonal, exp, iota, logsigmoid, minimum, reduce_max,
                           sigmoid, sqrt)
    r = Builder("nki_test_ops")
    b, t, d, k = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan"), r.dim("key")
    x, w = r.input("x", [b, t, d, k]), r.input("w", [d])
    g = r.let("g", logsigmoid(reduce_max(x, k) + 0.1 * iota(d)))
    soft = minimum(sqrt(1.0 + w * w), 1.5)
    h = r.state("h", [b, d], diagonal(sigmoid(w) * 0.5 + 0.4),
                inject=-clamp(g, -3.0, -0.05) / soft)
    r.output("y", [b, t, d], h * exp(g))
    rec = r.build()
    sizes = {"batch": 2, "time": 37, "chan": 130, "key": 3}
    x = sample_inputs(rec, sizes, seed=4)
    ref = get("reference").run(rec, x, sizes, None, True, {})
    got = get("nki").run(rec, x, sizes, None, True, {})
    assert_close(got.outputs["y"], ref.outputs["y"], "float32", "y")
    assert_close(got.final_states["h"], ref.final_states["h"], "float32", "h")
    src = get("nki").render(rec, {"sizes": sizes})
    for instr in ("nisa.iota", "nl.maximum", "nl.softplus", "nl.sigmoid", "nl.sqrt",
                  "nl.divide", "nl.minimum"):
        assert instr in src, instr


def test_tile_plan_picks_smaller_time_tile_then_fails_clearly():
    rec = registry.get("gla").build()
    be = get("nki")
    # a big key dim: the state trajectory (key x time tile) must shrink the time tile
    sizes = default_sizes(rec, time=1000, key=128)
    be.render(rec, {"sizes": sizes})
    src, plan = be._render(rec, sizes, False, False, {})
    assert plan.tt < 512 and plan.sbuf_bytes <= emulator.SBUF_BYTES["trn1"]
    # nothing fits: delta_net's key is the householder axis, held whole per partition (gla's
    # key, summed by the readout, would be a summed outer loop: docs/nki.md "The tile plan")
    dn = registry.get("delta_net").build()
    huge = default_sizes(dn, time=8, key=6000)
    with pytest.raises(PlanError, match=r"delta_net.*180224 B.*key=6000"):
        be.render(dn, {"sizes": huge})
    assert "nki.jit" in be.render(dn, {"sizes": huge, "chip": "trn2"})


@pytest.mark.parametrize("chan", [6, 200])
def test_groups_inside_a_partition_tile(chan):
    # groups of 3 (or 100) channels: the B/C rows are gathered per partition by a selector
    check("mamba", "float32", T=40, groups=2, chan=chan)
    check("mamba", "bfloat16", T=40, groups=2, chan=chan)


def test_unsupported_is_named():
    r = Builder("nki_test_flip")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x, w = r.input("x", [b, t, d]), r.input("w", [d])
    from scancc.ir import flip, identity
    h = r.state("h", [b, d], identity(), inject=x * flip(w, d))
    r.output("y", [b, t, d], h)
    from scancc.backends import UnsupportedError
    rec = r.build()
    with pytest.raises(UnsupportedError, match="nki_test_flip.*flip along the partition dim"):
        get("nki").render(rec, {})
    ok, why = get("nki").supports(rec, {})
    assert not ok and "flip along the partition dim 'chan'" in why
    with pytest.raises(UnsupportedError, match="nki.*nki_test_flip.*flip"):
        scancc.compile(rec, target="nki")
    assert get("nki").supports(registry.get("mamba").build(), {"bogus": 1})[0] is False


def _fake_toolchain(monkeypatch, with_simulate: bool):
    """Stand-ins for the Neuron wheels: PyPI's empty placeholder, or a 'real' nki whose
    simulate runs the emulator (so the guarded path runs the source through plain imports)."""
    import sys
    import types
    calls = []
    fake = types.ModuleType("nki")
    if with_simulate:
        def simulate(kernel):
            def run(*arrays):
                calls.append([a.dtype for a in arrays])
                return kernel(*arrays)
            return run
        fake.jit, fake.simulate, fake.__version__ = emulator.jit, simulate, "0.0-fake"
        fake.language, fake.isa = emulator.language, emulator.isa
        monkeypatch.setitem(sys.modules, "nki.language", emulator.language)
        monkeypatch.setitem(sys.modules, "nki.isa", emulator.isa)
    monkeypatch.setitem(sys.modules, "nki", fake)
    return calls


def test_real_toolchain_path_is_guarded(monkeypatch):
    from scancc.backends import UnsupportedError
    from scancc.backends.nki import NkiBackend
    rec = registry.get("hgrn").build()
    sizes = default_sizes(rec, time=20)
    x = sample_inputs(rec, sizes, seed=1, hints=registry.get("hgrn").hints)
    ref = get("reference").run(rec, x, sizes, None, False, {})
    _fake_toolchain(monkeypatch, with_simulate=False)  # the PyPI placeholder: use the emulator
    be = NkiBackend()
    assert be.available() == (True, "NKI emulator (nki not importable)")
    got = be.run(rec, x, sizes, None, False, {})
    assert got.counters["instructions"]["vector"] > 0
    with pytest.raises(UnsupportedError, match="runner='simulate' needs the real nki"):
        be.run(rec, x, sizes, None, False, {"runner": "simulate"})
    calls = _fake_toolchain(monkeypatch, with_simulate=True)
    assert be.available() == (True, "nki 0.0-fake (nki.simulate)")
    got = be.run(rec, x, sizes, None, False, {})
    assert len(calls) == 1 and got.counters == {}
    assert_close(got.outputs["o"], ref.outputs["o"], "float32", "via nki.simulate")
    got = be.run(rec, x, sizes, None, False, {"runner": "emulator"})
    assert len(calls) == 1 and got.counters["dma_transfers"] > 0
    with pytest.raises(UnsupportedError, match="unknown runner 'gpu'"):
        be.run(rec, x, sizes, None, False, {"runner": "gpu"})


def test_available_and_generated_source_is_safe():
    ok, how = get("nki").available()
    assert ok and ("emulator" in how or "nki" in how)
    r = Builder("nki_test_doc", 'evil """ doc\nimport os\x0bos.system("x")')
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, d])
    from scancc.ir import identity
    h = r.state("h", [b, d], identity(), inject=x)
    r.output("y", [b, t, d], h)
    src = get("nki").render(r.build(), {})
    body = [ln for ln in src.splitlines() if not ln.startswith("#")]
    assert not any("os.system" in ln or ln.startswith("import os") for ln in body)
    compile(src, "<nki>", "exec")


@pytest.mark.slow
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", [1, 63, 64, 700])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", LIBRARY)
def test_full_product(name, dtype, T, init):
    over = {PARTITION_DIM[name]: 130} if T == 700 else {}
    check(name, dtype, T=T, init=init, final=init, **over)


@pytest.mark.parametrize("name,sizes", [
    ("mamba", dict(batch=1, time=512, chan=256, dstate=16)),       # the S6 tutorial shape
    ("mamba2", dict(batch=1, time=1024, heads=4, headdim=64, dstate=64)),
    ("linear_attn", dict(batch=1, time=1024, heads=2, key=64, value=64)),
    ("hgrn", dict(batch=1, time=2048, chan=300)),
    ("swa", dict(batch=1, time=256, heads=4, key=32, value=32)),
])
def test_benchmark_shapes_against_reference(name, sizes):
    """The kernels the benchmark costs are also correct at its (scaled-down) shapes."""
    entry = registry.get(name)
    rec = entry.build()
    sz = default_sizes(rec, **sizes)
    x = sample_inputs(rec, sz, seed=0, hints=entry.hints)
    ref = get("reference").run(rec, x, sz, None, True, {})
    got = get("nki").run(rec, x, sz, None, True, {})
    for k in ref.outputs:
        assert_close(got.outputs[k], ref.outputs[k], "float32", f"{name} {k}")
    for k in ref.final_states:
        assert_close(got.final_states[k], ref.final_states[k], "float32", f"{name} {k}")
