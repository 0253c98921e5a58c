"""The Triton backend against the reference: every library recurrence and a user-registered
one, across dtypes, awkward shapes, initial/final states and algorithms.

Without a GPU these run the generated kernels in Triton's CPU interpreter (the backend
arranges it). Outputs are NaN-poisoned by the generated launcher (torch.full(nan)) before the
kernel writes them, so an unwritten element fails the comparison. The default run takes a
representative subset; ``pytest -m slow`` runs the full product, including T = 4096.
"""
from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Triton backend needs torch (scancc[triton])")
if importlib.util.find_spec("triton") is None:  # not imported here: the backend picks its mode
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

import scancc  # noqa: E402
from scancc import backends, registry, testing  # noqa: E402
from scancc.ir import const, dense, diagonal, exp, identity, iota, log, sigmoid  # noqa: E402
from scancc.ir import clamp, l2norm, maximum, reduce_max, reduce_sum, size, sqrt  # noqa: E402

# the library, from the registry
LIBRARY = [n for n in registry.names() if registry.get(n).origin == "library"]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
# non-powers of two everywhere a dim is free
ODD = {"key": 5, "value": 7, "chan": 6, "dstate": 3, "headdim": 5, "heads": 3, "batch": 1}


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    # the project's default run is `pytest -q` (no marker filter): long cases run only when
    # selected with `-m slow`
    if request.node.get_closest_marker("slow") and "slow" not in (
            request.config.getoption("markexpr") or ""):
        pytest.skip("slow case: run with `pytest -m slow`")


def _user_entry():
    """A user recurrence exercising what the library does not: dense transitions, log,
    sigmoid, clamp, maximum, max-reductions, l2norm, iota, size and sqrt."""
    name = "triton_test_dense_mix"
    if name not in registry.names():
        @scancc.register(name, hints={"x": "normal", "m": "small", "g": "logsigmoid"})
        def _mix(r, alpha=0.5):
            b, t, h, n, c = (r.dim("batch", "batch"), r.dim("time", "time"),
                             r.dim("heads", "head"), r.dim("n"), r.dim("c"))
            x = r.input("x", [b, t, h, n])
            m = r.input("m", [h, n, c])
            g = r.input("g", [b, t, h])
            gate = r.let("gate", sigmoid(clamp(x, -3.0, 3.0)) * exp(g))
            s = r.state("s", [b, h, n], dense(n, c, m * 0.5), inject=gate * l2norm(x, n))
            z = r.state("z", [b, h], identity(), inject=log(1.0 + exp(g)) + iota(h) * 0.1)
            r.output("y", [b, t, h, n], maximum(s, -1.0) + reduce_max(s, n) * const(alpha)
                     + sqrt(size(n)) * z + reduce_sum(x * s, n))
    return registry.get(name)


def _sizes(rec, T: int, odd: bool, overrides=None) -> dict:
    over = dict(ODD) if odd else {}
    over.update(overrides or {})
    over["time"] = T
    return testing.default_sizes(rec, **over)


def _case(name: str, dtype: str, T: int, odd: bool, state: bool, algorithm: str = "auto",
          overrides=None, seed: int = 0, options=None, backend_options=None):
    """Run one case on triton and the reference; return errors by output/state name."""
    entry = registry.get(name)
    rec = entry.build(**(options or {}))
    sizes = _sizes(rec, T, odd, overrides)
    x = testing.sample_inputs(rec, sizes, seed, hints=entry.hints)
    tx = {k: torch.from_numpy(v).to(TORCH_DTYPES[dtype]) for k, v in x.items()}
    # the reference sees exactly the (rounded) inputs the kernel sees
    x_seen = {k: v.double().numpy() for k, v in tx.items()}
    h0 = testing.sample_state(rec, sizes, seed + 1) if state else None
    th0 = {k: torch.from_numpy(v).float() for k, v in h0.items()} if state else None
    if state:
        h0 = {k: v.double().numpy() for k, v in th0.items()}
    ref = backends.get("reference").run(rec, x_seen, sizes, h0, state, {})
    res = backends.get("triton").run(rec, tx, sizes, th0, state,
                                     {"algorithm": algorithm, **(backend_options or {})})
    assert res.counters["algorithm"] == (algorithm if algorithm != "auto"
                                         else res.counters["algorithm"])
    for k, v in res.outputs.items():
        assert v.dtype == TORCH_DTYPES[dtype], f"output {k} has dtype {v.dtype}"
        testing.assert_close(v, ref.outputs[k], dtype, f"{name} output {k} (T={T}, {sizes})",
                             T=T)
    if state:
        for k, v in res.final_states.items():
            assert v.dtype == torch.float32
            testing.assert_close(v, ref.final_states[k], dtype,
                                 f"{name} final state {k} (T={T}, {sizes})", T=T)
    else:
        assert res.final_states is None


def algorithms(name: str) -> list[str]:
    rec = registry.get(name).build()
    tb = backends.get("triton")
    return [a for a in ("recurrent", "chunked") if tb.supports(rec, {"algorithm": a})[0]]


# the default run: every recurrence in each dtype, on a different awkward shape per dtype
DEFAULT = [("float32", 63, True, True), ("bfloat16", 40, False, False),
           ("float16", 1, True, True)]


@pytest.mark.parametrize("dtype,T,odd,state", DEFAULT, ids=lambda v: str(v))
@pytest.mark.parametrize("name", LIBRARY + ["user"])
def test_matrix_default(name, dtype, T, odd, state):
    name = _user_entry().name if name == "user" else name
    for algo in algorithms(name):
        _case(name, dtype, T, odd, state, algo)


@pytest.mark.parametrize("name,dtype,algo", [
    ("linear_attn", "float32", "chunked"), ("mamba2", "bfloat16", "chunked"),
    ("gla", "float16", "chunked"), ("retnet", "float32", "recurrent"),
    ("hgrn", "bfloat16", "recurrent"), ("delta_net", "float32", "chunked"),
    ("gated_delta_net", "bfloat16", "chunked")])
def test_longer_sequences(name, dtype, algo):
    # T = 257: many chunks and a ragged last one; one head, one batch keeps it quick
    _case(name, dtype, 257, True, True, algo, overrides={"heads": 1, "batch": 1})


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 63, 64, 257])
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("name", LIBRARY + ["user"])
def test_matrix_full(name, dtype, T):
    name = _user_entry().name if name == "user" else name
    for algo, odd, state in itertools.product(algorithms(name), (False, True), (False, True)):
        _case(name, dtype, T, odd, state, algo)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", LIBRARY)
def test_long_T(name, dtype):
    for algo in algorithms(name):
        _case(name, dtype, 4096, False, True, algo, overrides={"batch": 1})


def test_groups_shared_across_heads_and_channels():
    # mamba2: 4 heads reading 2 groups of B/C; mamba: 6 channels reading 3 groups
    _case("mamba2", "float32", 17, True, True, overrides={"heads": 4, "groups": 2})
    _case("mamba", "float32", 17, False, True, overrides={"chan": 6, "groups": 3})
    # heads held in registers, 2 per program: each program reads one group's B and C
    _case("mamba2", "float32", 17, True, True, "recurrent", overrides={"heads": 4, "groups": 2},
          backend_options={"block_sizes": {"heads": 2}})


def test_options_of_library_recurrences():
    _case("mamba", "float32", 9, True, True,
          options={"delta_softplus": True, "D": True, "z": True, "delta_bias": True})
    _case("mamba2", "bfloat16", 9, True, True,
          options={"dt_softplus": True, "dt_limit": (0.01, 0.5), "D": True, "z": True,
                   "dt_bias": True})
    _case("fir", "float32", 9, True, True, options={"activation": "silu", "bias": True})
    _case("gated_delta_net", "float32", 9, True, True,
          options={"use_qk_l2norm_in_kernel": True})
    _case("swa", "float32", 11, True, True, options={"window": 5})


@pytest.mark.parametrize("name,dtype", [("simple_gla", "bfloat16"), ("gla", "float16"),
                                        ("mamba2", "bfloat16")])
def test_chunked_dots_in_the_input_dtype(name, dtype):
    # dot_precision="input": 16-bit tl.dot operands (on CPU this runs the interpreter's
    # bf16 dot through runtime.install_interpreter_fixes)
    entry = registry.get(name)
    rec = entry.build()
    sizes = _sizes(rec, 45, True, {"heads": 1})
    x = testing.sample_inputs(rec, sizes, 4, hints=entry.hints)
    tx = {k: torch.from_numpy(v).to(TORCH_DTYPES[dtype]) for k, v in x.items()}
    ref = backends.get("reference").run(rec, {k: v.double().numpy() for k, v in tx.items()},
                                        sizes, None, False, {})
    res = backends.get("triton").run(rec, tx, sizes, None, False,
                                     {"algorithm": "chunked", "dot_precision": "input"})
    out = rec.outputs[0].name
    testing.assert_close(res.outputs[out], ref.outputs[out], dtype, f"{name} chunked, 16-bit dots")


def test_block_split_over_programs():
    # value split into blocks of 4 over programs (7 = 4 + a masked 3)
    entry = registry.get("gla")
    rec = entry.build()
    sizes = _sizes(rec, 20, True)
    x = testing.sample_inputs(rec, sizes, 3, hints=entry.hints)
    ref = backends.get("reference").run(rec, x, sizes, None, True, {})
    res = backends.get("triton").run(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                                     sizes, None, True, {"algorithm": "recurrent",
                                                         "block_sizes": {"value": 4}})
    testing.assert_close(res.outputs["o"], ref.outputs["o"], "float32")
    testing.assert_close(res.final_states["S"], ref.final_states["S"], "float32")


def test_several_grid_and_split_dims():
    # three grid dims flattened on program axis 0, two split dims on axis 1 (blocks of 2)
    from scancc.ir import diagonal, sigmoid as sg

    @scancc.register("triton_test_many_dims", override=True)
    def many(r):
        b, t = r.dim("batch", "batch"), r.dim("time", "time")
        h1, h2 = r.dim("h1", "head"), r.dim("h2", "head")
        c1, c2 = r.dim("c1"), r.dim("c2")
        x = r.input("x", [b, h1, t, h2, c1, c2])
        a = r.input("a", [h1, c1, c2])
        s = r.state("s", [b, h1, h2, c1, c2], diagonal(sg(a)), inject=x)
        r.output("y", [b, t, h1, h2, c1, c2], s * 2.0)

    rec = registry.get("triton_test_many_dims").build()
    sizes = {"batch": 2, "time": 6, "h1": 3, "h2": 2, "c1": 3, "c2": 5}
    x = testing.sample_inputs(rec, sizes, 7)
    h0 = testing.sample_state(rec, sizes, 8)
    ref = backends.get("reference").run(rec, x, sizes, h0, True, {})
    res = backends.get("triton").run(
        rec, {k: torch.from_numpy(v).float() for k, v in x.items()}, sizes,
        {k: torch.from_numpy(v).float() for k, v in h0.items()}, True,
        {"block_sizes": {"c1": 2, "c2": 2}})
    testing.assert_close(res.outputs["y"], ref.outputs["y"], "float32")
    testing.assert_close(res.final_states["s"], ref.final_states["s"], "float32")
    registry.unregister("triton_test_many_dims")


def test_group_onto_a_register_dim():
    # group() onto a dim held whole in registers (summed in the readout): the grouped input
    # is loaded along that dim's axis with index i // (|n| / |groups|)
    from scancc.ir import group as grp

    @scancc.register("triton_test_group_regs", override=True)
    def gr(r):
        b, t, g, n = (r.dim("batch", "batch"), r.dim("time", "time"), r.dim("groups", "group"),
                      r.dim("n"))
        x = r.input("x", [b, t, g])
        w = r.input("w", [n])
        s = r.state("s", [b, n], diagonal(const(0.9)), inject=grp(x, g, n) * (w + iota(n)))
        r.output("y", [b, t], reduce_sum(s, n))

    rec = registry.get("triton_test_group_regs").build()
    sizes = {"batch": 2, "time": 9, "groups": 3, "n": 6}
    x = testing.sample_inputs(rec, sizes, 1)
    ref = backends.get("reference").run(rec, x, sizes, None, True, {})
    res = backends.get("triton").run(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                                     sizes, None, True, {})
    testing.assert_close(res.outputs["y"], ref.outputs["y"], "float32")
    testing.assert_close(res.final_states["s"], ref.final_states["s"], "float32")
    registry.unregister("triton_test_group_regs")


def test_public_compile_path():
    entry = registry.get("mamba2")
    rec = entry.build(D=True)
    sizes = _sizes(rec, 33, True)
    x = testing.sample_inputs(rec, sizes, 5, hints=entry.hints)
    h0 = testing.sample_state(rec, sizes, 6)
    ref = scancc.compile("mamba2", target="reference")(**x, initial_state=h0["h"],
                                                       output_final_state=True)
    k = scancc.compile("mamba2", target="triton")
    y, h = k(**{n: torch.from_numpy(v).to(torch.bfloat16) for n, v in x.items()},
             initial_state=torch.from_numpy(h0["h"]).float(), output_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # inputs rounded to bf16 here but not in the reference: bf16 tolerance covers both
    testing.assert_close(y, ref[0], "bfloat16", "y")
    testing.assert_close(h, ref[1], "bfloat16", "final state")
    # numpy in, numpy out
    y32 = scancc.compile("linear_attn", target="triton")(
        *[np.asarray(v, np.float32) for v in testing.sample_inputs(
            registry.get("linear_attn").build(), {"batch": 1, "time": 9, "heads": 2, "key": 3,
                                                  "value": 5}, 1).values()])
    assert isinstance(y32, np.ndarray) and y32.dtype == np.float32 and np.isfinite(y32).all()
    assert "linear_attn_recurrent_fwd_kernel" in scancc.compile(
        "linear_attn", target="triton", algorithm="recurrent").source


def test_available_says_how_it_runs():
    ok, why = backends.get("triton").available()
    assert ok
    assert ("TRITON_INTERPRET=1" in why) != torch.cuda.is_available()
