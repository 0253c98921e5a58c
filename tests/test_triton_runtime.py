"""The Triton backend's runtime: interpreter fixes, the kernel cache, traffic counters, and
the errors it raises."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Triton backend needs torch (scancc[triton])")
if importlib.util.find_spec("triton") is None:
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

import scancc  # noqa: E402
from scancc import backends, registry, testing  # noqa: E402
from scancc.backends import UnsupportedError  # noqa: E402
from scancc.backends.triton import runtime  # noqa: E402
from scancc.ir import diagonal, exp, flip, identity, reduce_sum  # noqa: E402

_DOT = '''
import triton
import triton.language as tl


@triton.jit
def dot_kernel(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    o_m = tl.arange(0, M)[:, None]
    o_n = tl.arange(0, N)[None, :]
    o_k = tl.arange(0, K)
    b_a = tl.load(a + o_m * K + o_k[None, :])
    b_b = tl.load(b + o_k[:, None] * N + o_n)
    tl.store(c + o_m * N + o_n, tl.dot(b_a, b_b))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter's tl.dot")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_interpreter_dot_matches_gpu_semantics(dtype, tmp_path, monkeypatch):
    # bf16 operands: triton 3.9's interpreter multiplies raw bits unless runtime's fix is in
    monkeypatch.setenv("SCANCC_CACHE_DIR", str(tmp_path))
    mod = runtime.load("test_dot_kernel_v1", _DOT)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g).to(dtype)
    b = torch.randn(32, 16, generator=g).to(dtype)
    c = torch.full((16, 16), float("nan"))
    mod.dot_kernel[(1,)](a, b, c, 16, 16, 32)
    want = a.double() @ b.double()
    testing.assert_close(c, want, "float32", f"tl.dot on {dtype}")


def test_kernel_cache_memory_and_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SCANCC_CACHE_DIR", str(tmp_path))
    for cache in ("_MODULES", "_BY_ID", "_BY_IR"):  # forget what earlier tests loaded
        monkeypatch.setattr(runtime, cache, {})
    rec = registry.get("hgrn").build()
    tb = backends.get("triton")
    f1 = tb.launcher(rec, {}, ("float32",) * 2)
    files = list((tmp_path / "triton").glob("*.py"))
    assert len(files) == 1 and files[0].read_text() == tb.render(rec, {})
    assert tb.launcher(rec, {}, ("float32",) * 2) is f1          # memory hit
    assert tb.launcher(rec, {}, ("bfloat16",) * 2) is not f1      # dtypes are in the key
    assert not list((tmp_path / "triton").glob("*.tmp"))          # atomic writes leave none


def test_traffic_counter_counts_each_element_once():
    rec = registry.get("hgrn").build()
    sizes = {"batch": 2, "time": 7, "chan": 5}
    x = testing.sample_inputs(rec, sizes, 0, hints=registry.get("hgrn").hints)
    tx = {k: torch.from_numpy(v).float() for k, v in x.items()}
    if torch.cuda.is_available():
        pytest.skip("traffic is counted by instrumenting the CPU interpreter")
    with runtime.count_traffic() as tr:
        backends.get("triton").run(rec, tx, sizes, None, False, {})
    n = 2 * 7 * 5
    assert tr.loaded == 2 * n * 4 and tr.stored == n * 4


def _reg(name, fn):
    scancc.register(name, override=True)(fn)
    return registry.get(name).build()


def test_unsupported_errors_name_backend_recurrence_and_feature():
    tb = backends.get("triton")
    rec = registry.get("mamba").build()
    ok, why = tb.supports(rec, {"algorithm": "chunked"})
    assert not ok and "'triton'" in why and "'mamba'" in why and "contraction" in why
    ok, why = tb.supports(rec, {"algorithm": "bogus"})
    assert not ok and "algorithm='bogus'" in why and "recurrent" in why
    ok, why = tb.supports(rec, {"block_sizes": {"chan": 12}})
    assert not ok and "block_sizes['chan']=12" in why and "power of two" in why
    ok, why = tb.supports(rec, {"block_sizes": {"value": 16}})
    assert not ok and "'value', not a dim" in why

    def flipped(r):
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        h = r.state("h", [b, d], identity(), inject=x)
        r.output("y", [b, t, d], flip(h, d))
    rec = _reg("triton_test_flip_state", flipped)
    ok, why = tb.supports(rec, {})
    assert not ok and "'flip'" in why and "triton_test_flip_state" in why
    with pytest.raises(UnsupportedError, match="flip"):
        scancc.compile(rec, target="triton")
    registry.unregister("triton_test_flip_state")


def test_supports_every_library_recurrence():
    tb = backends.get("triton")
    for name in registry.names():
        entry = registry.get(name)
        if entry.origin != "library":
            continue
        ok, why = tb.supports(entry.build(), {"algorithm": "recurrent"})
        assert ok, why


def test_float64_inputs_are_refused_with_a_reason():
    k = scancc.compile("hgrn", target="triton")
    x = np.zeros((1, 3, 2))
    with pytest.raises(UnsupportedError, match="float64"):
        k(x, x)


def test_diagonal_decay_not_written_as_exp_uses_its_log():
    def gated(r):
        b, t, h, kd, vd = (r.dim("batch", "batch"), r.dim("time", "time"),
                           r.dim("heads", "head"), r.dim("key"), r.dim("value"))
        q, k, v = r.input("q", [b, t, h, kd]), r.input("k", [b, t, h, kd]), r.input(
            "v", [b, t, h, vd])
        a = r.input("a", [b, t, h, kd])
        S = r.state("S", [b, h, kd, vd], diagonal(0.5 + 0.4 * exp(-a * a)), inject=k * v)
        r.output("o", [b, t, h, vd], reduce_sum(S * q, kd))
    rec = _reg("triton_test_gla_linear_decay", gated)
    tb = backends.get("triton")
    assert tb.algorithm(rec, {}) == "chunked"
    sizes = {"batch": 1, "time": 37, "heads": 2, "key": 5, "value": 6}
    x = testing.sample_inputs(rec, sizes, 2)
    ref = backends.get("reference").run(rec, x, sizes, None, True, {})
    res = tb.run(rec, {k: torch.from_numpy(v).float() for k, v in x.items()}, sizes, None,
                 True, {})
    testing.assert_close(res.outputs["o"], ref.outputs["o"], "float32")
    testing.assert_close(res.final_states["S"], ref.final_states["S"], "float32")
    registry.unregister("triton_test_gla_linear_decay")


def test_triton_backend_works_after_a_torch_call_of_another_backend():
    """torch._dynamo (imported by scancc's torch integration) imports triton: without a GPU
    scancc must have chosen interpreter mode by then. A fresh process, as a user's script."""
    import subprocess
    import sys
    code = ("import torch, scancc\n"
            "q = torch.randn(1, 5, 2, 3)\n"
            "scancc.compile('linear_attn')(q, q, q)\n"
            "y = scancc.compile('linear_attn', target='triton')(q, q, q)\n"
            "print(tuple(y.shape))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "(1, 5, 2, 3)"


def test_count_traffic_counts_atomic_adds():
    """mamba2's backward sums grad_B/grad_C over a group's heads with tl.atomic_add (one
    float32 add per element per head program), and, since its headdim is a split dim the
    outputs sum over (plan.partial), grad_dt and the per-step grad_A over headdim blocks too
    (one block of 2 here: one add per element per head)."""
    import torch
    from scancc.autograd import adjoint
    b = adjoint(registry.get("mamba2").build()).backward
    sizes = testing.default_sizes(b, batch=1, time=5, heads=4, headdim=2, groups=2, dstate=3)
    x = testing.sample_inputs(b, sizes, 0)
    k = scancc.compile(b, target="triton")
    with runtime.count_traffic() as tr:
        k(**{n: torch.from_numpy(v).float() for n, v in x.items()})
    bc = 4 * 1 * 5 * 3 * 2      # heads x batch x time x dstate x (B, C)
    dt_a = 4 * 1 * 5 * 2        # heads x batch x time x (dt, A's per-step gradient)
    assert tr.atomic == (bc + dt_a) * 4   # float32 adds, 4 B each


def test_a_repeated_call_does_not_lower_or_render_again(monkeypatch):
    """The cached run path: the second identical call (NumPy and torch) builds no lowering
    and renders nothing; a new dtype does (it is part of the cache key)."""
    from scancc.backends.triton import chunked, recurrent
    counts = {"lower": 0, "render": 0}
    for mod in (recurrent, chunked):
        init, render = mod.Lowering.__init__, mod.Lowering.render

        def spy_init(self, *a, _init=init, **kw):
            counts["lower"] += 1
            return _init(self, *a, **kw)

        def spy_render(self, *a, _render=render, **kw):
            counts["render"] += 1
            return _render(self, *a, **kw)
        monkeypatch.setattr(mod.Lowering, "__init__", spy_init)
        monkeypatch.setattr(mod.Lowering, "render", spy_render)
    for cache in ("_BY_ID", "_BY_IR"):  # what earlier tests compiled does not count
        monkeypatch.setattr(runtime, cache, {})
    monkeypatch.setattr(backends.get("triton"), "_memo", {})
    rec = registry.get("gla").build()
    sizes = testing.default_sizes(rec, time=5)
    x = {k: v.astype(np.float32) for k, v in testing.sample_inputs(
        rec, sizes, 0, hints=registry.get("gla").hints).items()}
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    k = scancc.compile("gla", target="triton")
    for args in (x, tx):
        k(**args)
        before = dict(counts)
        out = k(**args)
        assert counts == before, f"a repeated call lowered/rendered again: {before} -> {counts}"
        assert tuple(out.shape) == tuple(x["v"].shape)
    k(**{n: v.to(torch.bfloat16) for n, v in tx.items()})
    assert counts["render"] > before["render"]  # a new dtype compiles once
