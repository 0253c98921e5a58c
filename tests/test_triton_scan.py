"""The Triton ``scan`` algorithm (backends/triton/scan.py): chunks of the recurrent kernel run
in parallel (local end states and decay products, a carry across chunks, a rerun for the
outputs), checked against the float64 reference at chunk length 16 across chunk boundaries,
with initial and final states and NaN-poisoned outputs (the launcher fills them with NaN, so an
element no chunk writes fails); the edge semantics (a NaN reaches only its step and later, a
decay of 0 is a hard reset); the launcher's chunk-length rule and the "auto" rule."""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc import backends, registry, testing
from scancc.backends.triton import scan
from scancc.ir import Builder, diagonal, prev

torch = pytest.importorskip("torch")

TB = backends.get("triton")
REF = backends.get("reference")
CHUNK = 16


def _run(rec, x: dict, sizes: dict, h0: dict | None, options: dict):
    res = TB.run(rec, {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in x.items()},
                 sizes, {k: torch.from_numpy(v) for k, v in h0.items()} if h0 else None, True,
                 options)
    assert res.counters["algorithm"] == options.get("algorithm", res.counters["algorithm"])
    outs = {k: v.detach().double().numpy() for k, v in res.outputs.items()}
    fins = {k: v.detach().double().numpy() for k, v in res.final_states.items()}
    return outs, fins


def _reference(rec, x: dict, sizes: dict, h0: dict | None):
    seen = {k: np.asarray(v, np.float32).astype(np.float64) for k, v in x.items()}
    res = REF.run(rec, seen, sizes, {k: v.astype(np.float64) for k, v in h0.items()}
                  if h0 else None, True, {})
    return res.outputs, res.final_states


def _check(name: str, rec, T: int, sizes_over: dict | None = None, initial: bool = True,
           hints: dict | None = None):
    entry = registry.get(name) if name in registry.names() else None
    sizes = dict(scancc.ir.default_sizes(rec, time=T))
    sizes.update(sizes_over or {})
    x = testing.sample_inputs(rec, sizes, 0, hints or (entry.hints if entry else None))
    h0 = ({k: v.astype(np.float32) for k, v in testing.sample_state(rec, sizes, 1).items()}
          if initial else None)
    got_y, got_h = _run(rec, x, sizes, h0, {"algorithm": "scan",
                                            "block_sizes": {rec.time: CHUNK}})
    want_y, want_h = _reference(rec, x, sizes, h0)
    for what, got, want in [("output", got_y, want_y), ("final state", got_h, want_h)]:
        for k, w in want.items():
            g = got[k]
            assert g.shape == w.shape
            assert np.isfinite(g[np.isfinite(w)]).all(), f"{name} {what} {k}: unwritten (NaN)"
            testing.assert_close(g, w, "float32", f"{name} scan {what} {k} (T={T})")


# T: one step, one chunk less one, exactly one chunk, one more, ragged, exact, many chunks
TS = [1, 15, 16, 17, 63, 64, 257]


# 17 chunks of mamba and s4d are the slowest cases in the interpreter (about 5 s each)
_BOUNDARY = [pytest.param(n, T, id=f"{n}-{T}", marks=[pytest.mark.slow] if T == 257 and n in (
    "mamba", "s4d") else []) for n in ("mamba", "hgrn", "s4d", "linear_attn") for T in TS]


@pytest.mark.parametrize("name,T", _BOUNDARY)
def test_scan_matches_reference_across_chunk_boundaries(name, T):
    rec = registry.get(name).build()
    small = {"mamba": {"chan": 8, "groups": 1, "dstate": 3}, "s4d": {}, "hgrn": {"chan": 5},
             "linear_attn": {"heads": 1}}[name]
    _check(name, rec, T, {"batch": 1 if T > 64 else 2, **small}, initial=T != 15)


@pytest.mark.parametrize("name", ["retnet", "gla", "mamba2"])
def test_scan_scalar_and_key_diagonal_decays(name):
    """Scalar decays (retnet, mamba2: one number per head) and a diagonal along the key dim
    (gla): their products are stored over the whole state."""
    rec = registry.get(name).build()
    _check(name, rec, 40, {"batch": 1})


@pytest.mark.parametrize("name", ["mamba", "hgrn"])
def test_derived_backward_recurrences(name):
    """The derived backward recurrence (scancc.autograd): prev() readouts, ungroup outputs
    (atomic adds into groups), time-first layouts ([time, ...] inputs and outputs), through
    the scan at T=40 (three chunks of 16) against the reference."""
    from scancc.autograd import adjoint
    e = registry.get(name)
    back = adjoint(e.build(**{o: True for o in e.optional_inputs})).backward
    small = {"mamba": {"chan": 4, "groups": 2, "dstate": 3}, "hgrn": {"chan": 5}}[name]
    _check(back.name, back, 40, {"batch": 2, **small}, hints=e.hints)


def _gated(with_prev: bool = False):
    """h = a ⊙ h + x (the decay an input: 0 resets, NaN poisons); y = h (and prev(h))."""
    r = Builder("scan_test_gated")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    a, x = r.input("a", [b, t, d]), r.input("x", [b, t, d])
    h = r.state("h", [b, d], diagonal(a), inject=x)
    r.output("y", [b, t, d], h)
    if with_prev:
        r.output("z", [b, t, d], prev("h") * 2.0 + h)
    return r.build()


def _edge_inputs(T: int):
    rng = np.random.default_rng(3)
    a = rng.uniform(0.5, 1.0, (2, T, 3))
    x = rng.standard_normal((2, T, 3))
    return a, x


def test_a_zero_decay_is_a_hard_reset():
    """a = 0 at step 20 (chunk 1 of 16-step chunks): the state afterwards is exactly what a
    zero state would give, the same for any initial state or earlier input (the product of
    the chunk's decays is exactly 0)."""
    rec, T = _gated(), 40
    a, x = _edge_inputs(T)
    a[:, 20, :] = 0.0
    h0 = {"h": np.full((2, 3), 1e6, np.float32)}
    sizes = {"batch": 2, "time": T, "chan": 3}
    opts = {"algorithm": "scan", "block_sizes": {"time": CHUNK}}
    y1, f1 = _run(rec, {"a": a, "x": x}, sizes, h0, opts)
    x2 = x.copy()
    x2[:, :20, :] = 1e5
    y2, f2 = _run(rec, {"a": a, "x": x2}, sizes, None, opts)
    np.testing.assert_array_equal(y1["y"][:, 20:], y2["y"][:, 20:])
    np.testing.assert_array_equal(f1["h"], f2["h"])
    want, want_f = _reference(rec, {"a": a, "x": x}, sizes, h0)
    testing.assert_close(y1["y"], want["y"], "float32", "reset output")
    testing.assert_close(f1["h"], want_f["h"], "float32", "reset final state")


@pytest.mark.parametrize("where", ["x", "a"])
def test_a_nan_reaches_its_step_and_later_only(where):
    """A NaN injected term or decay at step 21 (inside chunk 1): outputs before step 21 are
    finite and match the reference, from step 21 on NaN, like the reference's."""
    rec, T = _gated(), 57
    a, x = _edge_inputs(T)
    {"x": x, "a": a}[where][0, 21, 1] = np.nan
    sizes = {"batch": 2, "time": T, "chan": 3}
    y, f = _run(rec, {"a": a, "x": x}, sizes, None,
                {"algorithm": "scan", "block_sizes": {"time": CHUNK}})
    want, want_f = _reference(rec, {"a": a, "x": x}, sizes, None)
    np.testing.assert_array_equal(np.isnan(y["y"]), np.isnan(want["y"]))
    assert np.isnan(y["y"][0, 21:, 1]).all() and np.isfinite(y["y"][0, :21]).all()
    assert np.isfinite(y["y"][1]).all() and np.isfinite(y["y"][0, :, [0, 2]]).all()
    np.testing.assert_array_equal(np.isnan(f["h"]), np.isnan(want_f["h"]))
    ok = np.isfinite(want["y"])
    testing.assert_close(y["y"][ok], want["y"][ok], "float32", "finite outputs")


def test_prev_readouts_are_rerun_from_the_chunk_state():
    """A readout of prev(h): stage 3 reruns each chunk from the state entering it, so the
    first step of a chunk reads h_in[c] as prev."""
    rec, T = _gated(with_prev=True), 50
    a, x = _edge_inputs(T)
    sizes = {"batch": 2, "time": T, "chan": 3}
    h0 = {"h": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)}
    y, f = _run(rec, {"a": a, "x": x}, sizes, h0,
                {"algorithm": "scan", "block_sizes": {"time": CHUNK}})
    want, want_f = _reference(rec, {"a": a, "x": x}, sizes, h0)
    for k in ("y", "z"):
        testing.assert_close(y[k], want[k], "float32", k)
    testing.assert_close(f["h"], want_f["h"], "float32", "final")


class _Recorder:
    """Stands in for a kernel in the generated module: records each launch's grid, then
    launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def _launches(rec, options, T: int, sizes_over=None):
    sizes = dict(scancc.ir.default_sizes(rec, time=T))
    sizes.update(sizes_over or {})
    x = testing.sample_inputs(rec, sizes, 0, registry.get(rec.name).hints)
    c = TB.compiled(rec, options, tuple("float32" for _ in rec.inputs))
    g = c.launcher.__globals__
    names = [f"{rec.name}_scan_{k}_kernel" for k in ("local", "carry", "fwd")]
    rec_ = {n: _Recorder(g[n]) for n in names}
    old = {n: g[n] for n in names}
    g.update(rec_)
    try:
        y, _ = _run(rec, x, sizes, None, options)
    finally:
        g.update(old)
    want, _ = _reference(rec, x, sizes, None)
    for k in want:
        testing.assert_close(y[k], want[k], "float32", f"{rec.name} {k} T={T}")
    return {n.split("_scan_")[1].split("_")[0]: r.grids for n, r in rec_.items()}


def test_stages_and_grids():
    """mamba at B=1, chan 8 (one program): T=40 with chunks of 16 runs three stages on 3
    chunks; T=16 runs the fwd kernel alone (one chunk); the default rule picks 16-step
    chunks for one program (too few for 8 per SM at any length)."""
    rec = registry.get("mamba").build()
    small = {"batch": 1, "chan": 8, "groups": 1, "dstate": 3}
    got = _launches(rec, {"algorithm": "scan", "block_sizes": {"time": 16}}, 40, small)
    assert got == {"local": [(1, 1, 3)], "carry": [(1,)], "fwd": [(1, 1, 3)]}
    got = _launches(rec, {"algorithm": "scan", "block_sizes": {"time": 16}}, 16, small)
    assert got == {"local": [], "carry": [], "fwd": [(1, 1, 1)]}
    got = _launches(rec, {"algorithm": "scan"}, 33, small)
    assert got == {"local": [(1, 1, 3)], "carry": [(1,)], "fwd": [(1, 1, 3)]}


def test_chunk_length_rule():
    """The documented rule (scan.CHUNK_RULE), as the generated module runs it: one chunk
    when the recurrent grid has >= 2 programs per SM (132 SMs assumed on the CPU), else the
    largest power of two in [16, 256] giving >= 8 programs per SM over the chunks."""
    # mamba D=2048 N=16 at B1: 32 programs of 64 channels; T=32768 -> 128 chunks of 256
    assert scan.chunk_length(32, 32768) == 256
    assert scan.chunk_length(32, 4096) == 64  # 32 x 16 or 32 chunks < 8 x 132: halve twice
    assert scan.chunk_length(264, 32768) == 32768  # 2 per SM already: the recurrent kernel
    assert scan.chunk_length(263, 32768) == 256
    assert scan.chunk_length(2, 37) == 16          # floor of 16
    assert scan.chunk_length(8 * 32, 2048) == 256  # B8: 256 programs x 8 chunks
    # "auto" (on a GPU) chunks only T >= AUTO_MIN_STEPS; an explicit "scan" any T
    assert scan.chunk_length(32, 1023, min_steps=scan.AUTO_MIN_STEPS) == 1023
    assert scan.chunk_length(32, 1024, min_steps=scan.AUTO_MIN_STEPS) == 16
    rec = registry.get("mamba").build()
    src = TB.render(rec, {"algorithm": "scan"})
    assert scan.CHUNK_RULE in src                  # the module runs this very text
    assert "scan_chunk_length(grid[0] * grid[1], TIME, u.device)" in src


def test_auto_picks_scan_on_a_gpu_only(monkeypatch):
    """'auto': chunked where it applies, else scan on a GPU where it applies, else
    recurrent; without a GPU (the interpreter) the scan is never the automatic choice."""
    want_cpu = {"mamba": "recurrent", "hgrn": "recurrent", "mamba2": "chunked",
                "fir": "recurrent", "delta_net": "chunked"}
    want_gpu = {**want_cpu, "mamba": "scan", "hgrn": "scan", "fir": "window"}  # window.py
    for gpu, want in [(False, want_cpu), (True, want_gpu)]:
        monkeypatch.setattr(scan, "on_gpu", lambda g=gpu: g)
        got = {n: TB.algorithm(registry.get(n).build(), {}) for n in want}
        assert got == want, gpu
    src = TB.render(registry.get("mamba").build(), {})  # on_gpu still True: "auto" -> scan
    assert f"scan_chunk_length(grid[0] * grid[1], TIME, u.device, {scan.AUTO_MIN_STEPS})" \
        in src


@pytest.mark.parametrize("name", ["fir", "delta_net", "swa"])  # iir: test_triton_scan_companion
def test_scan_rejects_state_mixing_transitions(name):
    ok, why = TB.supports(registry.get(name).build(), {"algorithm": "scan"})
    assert not ok and "algorithm='scan'" in why and "transition" in why


def test_identity_states_store_no_decay_product():
    """linear_attn (identity): no decay buffer, the carry adds only."""
    src = TB.render(registry.get("linear_attn").build(), {"algorithm": "scan"})
    assert "decay_" not in src.split("def linear_attn_scan_fwd(")[1]
    assert "b_decay" not in src


_COMPILE = r'''
import json, sys, importlib.util
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = []
for path, kernel, sig, const in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("m", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = triton.compile(ASTSource(fn=getattr(mod, kernel), signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    out.append([kernel, len(c.asm["ptx"]) > 0])
print(json.dumps(out))
'''


@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["mamba", "every"])
def test_scan_kernels_compile_for_h100(tmp_path, every):
    """The three kernels go through Triton's GPU compiler (sm_90, to PTX) in a process
    without TRITON_INTERPRET: mamba and its derived backward recurrence (prev() readouts,
    ungroup outputs) by default; with ``-m slow`` every library recurrence the scan takes
    and hgrn's backward too."""
    import json
    import os
    import subprocess
    import sys

    from scancc.autograd import adjoint
    recs = []
    names = [n for n in registry.names() if registry.get(n).origin == "library"]
    for i, name in enumerate(names if every else ["mamba"]):
        rec = registry.get(name).build()
        if scan.applies(rec)[0]:
            recs.append((name, rec, ("bfloat16", "float32")[i % 2]))
    for name in ("mamba", "hgrn") if every else ("mamba",):
        e = registry.get(name)
        back = adjoint(e.build(**{o: True for o in e.optional_inputs})).backward
        assert scan.applies(back)[0], name
        recs.append((f"{name}_bwd", back, "float32"))
    if every:
        assert {"mamba", "s4d", "hgrn", "mamba2", "gla"} <= {n for n, _, _ in recs}
    jobs = []
    for name, rec, dtype in recs:
        low = TB._lowering_for(rec, {"algorithm": "scan"})
        path = tmp_path / f"{name}_scan.py"
        path.write_text(low.render())
        for kernel, sig, const in low.stages_compile_args(testing.default_sizes(rec), dtype):
            jobs.append([str(path), kernel, sig, const])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(jobs), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(done) == len(jobs) == 3 * len(recs) and all(ok for _, ok in done), done


class _WarpsRecorder(_Recorder):
    """Records (grid, num_warps) of each launch."""

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.grids.append((tuple(grid), kw.get("num_warps")))
            return launch(*args, **kw)
        return run


def test_warps_rule_and_carry_programs():
    """Stages 1 and 3 run at most num_warps, and no more warps than leave every thread
    ELEMENTS_PER_THREAD elements of the register tile (mamba's [64 chan, 16 dstate] tile:
    1 warp; a [4, 4] tile: 1 warp; linear_attn's 4096-element tile: num_warps); the carry
    runs CARRY_BLOCK state elements per program on CARRY_WARPS warps. Outputs checked
    against the float64 reference."""
    assert scan.ELEMENTS_PER_THREAD == 32 and (scan.CARRY_BLOCK, scan.CARRY_WARPS) == (32, 1)
    rec = registry.get("mamba").build()
    for sizes, warps in [({"batch": 1, "chan": 64, "groups": 1, "dstate": 16}, 1),
                         ({"batch": 2, "chan": 4, "groups": 1, "dstate": 3}, 1)]:
        T = 40
        full = dict(scancc.ir.default_sizes(rec, time=T))
        full.update(sizes)
        x = testing.sample_inputs(rec, full, 0, registry.get(rec.name).hints)
        options = {"algorithm": "scan", "block_sizes": {"time": 16}}
        c = TB.compiled(rec, options, tuple("float32" for _ in rec.inputs))
        g = c.launcher.__globals__
        names = [f"mamba_scan_{k}_kernel" for k in ("local", "carry", "fwd")]
        old = {n: g[n] for n in names}
        got = {n: _WarpsRecorder(g[n]) for n in names}
        g.update(got)
        try:
            y, _ = _run(rec, x, full, None, options)
        finally:
            g.update(old)
        want, _ = _reference(rec, x, full, None)
        testing.assert_close(y["y"], want["y"], "float32", f"mamba {sizes}")
        numel = full["batch"] * full["chan"] * full["dstate"]
        carry = -(-numel // scan.CARRY_BLOCK)
        assert got["mamba_scan_local_kernel"].grids == [((full["batch"], 1, 3), warps)]
        assert got["mamba_scan_fwd_kernel"].grids == [((full["batch"], 1, 3), warps)]
        assert got["mamba_scan_carry_kernel"].grids == [((carry,), scan.CARRY_WARPS)]
    src = TB.render(registry.get("linear_attn").build(), {"algorithm": "scan"})
    assert f"scan_warps = max(1, min(num_warps, (BLOCK_KEY * BLOCK_VALUE) // " \
        f"{32 * scan.ELEMENTS_PER_THREAD}))" in src


def test_exp_of_a_time_constant_product_is_prescaled():
    """mamba's exp(dt * A): A log2(e) once before the loop, exp2 per step (scan_exp2: the
    interpreter's tl.exp2, ex2.approx.ftz on a GPU); dt * B[n] * u multiplied as
    (dt * u) * B[n]. Numerics: the reference tests above (chunk boundaries, NaN, resets)."""
    src = TB.render(registry.get("mamba").build(), {"algorithm": "scan"})
    fwd = src.split("def mamba_scan_fwd_kernel(")[1].split("\n\n\n")[0]
    head, loop = fwd.split("for i_t in range(")
    assert "b_log2e = b_A * 1.4426950408889634" in head
    assert "scan_exp2(b_delta * b_log2e)" in loop and "b_delta * b_u * b_B" in loop
    assert "tl.exp(" not in loop
    assert 'if os.environ.get("TRITON_INTERPRET") == "1":' in src
