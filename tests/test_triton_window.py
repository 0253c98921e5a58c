"""The Triton ``window`` algorithm (backends/triton/window.py): recurrences of shift registers
only (fir, swa, bmojo_f) parallel in time by blocks, each block replaying the W - 1 steps
before it. Checked against the float64 reference (on the inputs rounded to the input dtype)
with blocks of 16 steps, so most cases cross block boundaries: every dtype, T in {1, 63, 64,
257} and ragged T, windows longer than T, non-power-of-two dims, initial and final states, a
run split in two (the final state passed on) equal to one run; NaN-poisoned outputs (the
launcher fills outputs and final states with NaN, so an element no block writes fails); a NaN
input poisons exactly the outputs whose window holds it; the applicability reasons, the
"auto" rule and the launcher's block-length rule."""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc import backends, registry, testing
from scancc.backends.triton import scan, window

torch = pytest.importorskip("torch")

TB = backends.get("triton")
REF = backends.get("reference")
BLOCK = 16
TDT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# small non-power-of-two dims per recurrence (window sizes are build arguments)
SMALL = {"fir": {"chan": 5, "width": 3}, "swa": {"heads": 3, "key": 5, "value": 6},
         "bmojo_f": {"heads": 1, "key": 3, "value": 5}}
BUILD = {"fir": {}, "swa": {"window": 3}, "bmojo_f": {"window": 3}}


def _sizes(rec, T: int, over: dict) -> dict:
    sizes = dict(scancc.ir.default_sizes(rec, time=T))
    sizes.update({k: v for k, v in over.items() if k in sizes})
    return sizes


def _inputs(name: str, rec, sizes: dict, dtype: str, seed: int = 0) -> dict:
    """Sampled inputs rounded to ``dtype`` (as float32 numpy: the reference sees the same)."""
    x = testing.sample_inputs(rec, sizes, seed, registry.get(name).hints)
    return {k: torch.from_numpy(np.asarray(v, np.float32)).to(TDT[dtype]).float().numpy()
            for k, v in x.items()}


def _run(rec, x: dict, sizes: dict, h0: dict | None, dtype: str = "float32",
         algorithm: str = "window", block: int | None = BLOCK):
    opts = {"algorithm": algorithm}
    if block:
        opts["block_sizes"] = {rec.time: block}
    res = TB.run(rec, {k: torch.from_numpy(v).to(TDT[dtype]) for k, v in x.items()}, sizes,
                 {k: torch.from_numpy(v) for k, v in h0.items()} if h0 else None, True, opts)
    assert res.counters["algorithm"] == algorithm
    return ({k: v.detach().double().numpy() for k, v in res.outputs.items()},
            {k: v.detach().double().numpy() for k, v in res.final_states.items()})


def _reference(rec, x: dict, sizes: dict, h0: dict | None):
    res = REF.run(rec, {k: v.astype(np.float64) for k, v in x.items()}, sizes,
                  {k: v.astype(np.float64) for k, v in h0.items()} if h0 else None, True, {})
    return res.outputs, res.final_states


def _check(name: str, T: int, dtype: str = "float32", initial: bool = True,
           over: dict | None = None, build: dict | None = None):
    rec = registry.get(name).build(**(BUILD[name] if build is None else build))
    sizes = _sizes(rec, T, {**SMALL[name], "batch": 2, **(over or {})})
    x = _inputs(name, rec, sizes, dtype)
    h0 = ({k: v.astype(np.float32) for k, v in testing.sample_state(rec, sizes, 1).items()}
          if initial else None)
    got_y, got_h = _run(rec, x, sizes, h0, dtype)
    want_y, want_h = _reference(rec, x, sizes, h0)
    for what, got, want in [("output", got_y, want_y), ("final state", got_h, want_h)]:
        assert set(got) == set(want)
        for k, w in want.items():
            g = got[k]
            assert g.shape == w.shape
            assert np.isfinite(w).all(), f"{name} reference {what} {k} not finite"
            assert np.isfinite(g).all(), f"{name} {what} {k}: unwritten (NaN)"
            testing.assert_close(g, w, dtype, f"{name} window {what} {k} (T={T})", T=T)


# T: one step, ragged (not a multiple of the block), a block less one, exact, many blocks
TS = [1, 37, 63, 64, 257]


# the attention windows at T >= 63 take 15-90 s each in the interpreter (2 shared cores)
_MATRIX = [pytest.param(n, T, id=f"{n}-{T}", marks=[pytest.mark.slow] if T in (63, 257) and
                        n != "fir" else []) for n in ("fir", "swa", "bmojo_f") for T in TS]


@pytest.mark.parametrize("name,T", _MATRIX)
def test_window_matches_reference_across_blocks(name, T):
    _check(name, T, initial=T != 63)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["fir", "swa", "bmojo_f"])
def test_window_16bit_inputs(name, dtype):
    _check(name, 21, dtype)


@pytest.mark.parametrize("name,build,over,T", [
    ("fir", {}, {"width": 6}, 3),           # W - 1 = 5 > T: every step reads h0
    ("fir", {}, {"width": 20}, 37),         # halo 19 > the block of 16
    ("swa", {"window": 8}, {}, 5),
    ("swa", {"window": 20}, {}, 40),
    ("bmojo_f", {"window": 5}, {}, 7),      # fading register of 10 > T
])
def test_window_longer_than_t_or_block(name, build, over, T):
    _check(name, T, build=build, over=over)


def test_window_fir_with_bias_and_silu():
    rec = registry.get("fir").build(activation="silu", bias=True)
    sizes = _sizes(rec, 37, {"chan": 7, "width": 4, "batch": 1})
    x = _inputs("fir", rec, sizes, "float32")
    got, gh = _run(rec, x, sizes, None)
    want, wh = _reference(rec, x, sizes, None)
    testing.assert_close(got["y"], want["y"], "float32", "fir silu bias")
    testing.assert_close(gh["win"], wh["win"], "float32", "fir silu bias final")


@pytest.mark.parametrize("name", ["fir", "swa"])
def test_window_split_run_equals_one_run(name):
    """Two calls, the first's final state passed as the second's initial state, equal one
    call over the whole sequence (outputs and final state), with block boundaries inside both
    calls and the split not on one."""
    rec = registry.get(name).build(**BUILD[name])
    T1, T2 = 21, 30
    sizes = _sizes(rec, T1 + T2, {**SMALL[name], "batch": 1})
    x = _inputs(name, rec, sizes, "float32")
    h0 = {k: v.astype(np.float32) for k, v in testing.sample_state(rec, sizes, 1).items()}
    tdim = {i.name: i.dims.index(rec.time) for i in rec.inputs if rec.time in i.dims}

    def part(lo, hi):
        return {k: (np.take(v, range(lo, hi), axis=tdim[k]).copy() if k in tdim else v)
                for k, v in x.items()}

    y_all, h_all = _run(rec, x, sizes, h0)
    y1, h1 = _run(rec, part(0, T1), {**sizes, rec.time: T1}, h0)
    y2, h2 = _run(rec, part(T1, T1 + T2), {**sizes, rec.time: T2},
                  {k: v.astype(np.float32) for k, v in h1.items()})
    out = rec.outputs[0]
    ax = out.dims.index(rec.time)
    np.testing.assert_allclose(np.concatenate([y1[out.name], y2[out.name]], axis=ax),
                               y_all[out.name], rtol=1e-6, atol=1e-6)
    for k in h_all:
        np.testing.assert_array_equal(h2[k], h_all[k])  # states are copies of the inputs


@pytest.mark.parametrize("s", [0, 14, 16, 30])
def test_window_nan_input_poisons_its_window_only(s):
    """fir: a NaN x[b, s, c] makes y[b, t, c] NaN exactly for s <= t < s + W (the steps whose
    window holds it, also across a block boundary and in a later block's halo), every other
    output finite and equal to the reference; the final state holds it iff s >= T - W."""
    rec = registry.get("fir").build()
    T, W, b, c = 40, 4, 1, 2
    sizes = _sizes(rec, T, {"chan": 5, "width": W, "batch": 2})
    x = _inputs("fir", rec, sizes, "float32")
    x["x"][b, s, c] = np.nan
    got, gh = _run(rec, x, sizes, None)
    want, wh = _reference(rec, x, sizes, None)
    expect = np.zeros_like(want["y"], dtype=bool)
    expect[b, s:s + W, c] = True
    np.testing.assert_array_equal(np.isnan(want["y"]), expect)  # the semantics, independently
    np.testing.assert_array_equal(np.isnan(got["y"]), expect)
    testing.assert_close(got["y"][~expect], want["y"][~expect], "float32", "fir finite part")
    assert np.isnan(gh["win"]).any() == (s >= T - W)


def test_window_nan_key_poisons_swa_window_only():
    """swa: a NaN key at (b, s, h) poisons o[b, t, h] for s <= t < s + W only (its softmax)."""
    rec = registry.get("swa").build(window=3)
    T, W, b, h, s = 40, 3, 0, 1, 15
    sizes = _sizes(rec, T, {"heads": 3, "key": 5, "value": 6, "batch": 2})
    x = _inputs("swa", rec, sizes, "float32")
    x["k"][b, s, h, 0] = np.nan
    got, _ = _run(rec, x, sizes, None)
    want, _ = _reference(rec, x, sizes, None)
    expect = np.zeros_like(want["o"], dtype=bool)
    expect[b, s:s + W, h, :] = True
    np.testing.assert_array_equal(np.isnan(want["o"]), expect)
    np.testing.assert_array_equal(np.isnan(got["o"]), expect)
    testing.assert_close(got["o"][~expect], want["o"][~expect], "float32", "swa finite part")


@pytest.mark.parametrize("name", ["fir", pytest.param("swa", marks=pytest.mark.slow)])
def test_window_default_block_rule_matches_recurrent(name):
    """Without block_sizes the launcher's rule picks the block (a small grid here: several
    blocks of at least 16 steps); equal to the recurrent kernel bit for bit up to summation
    order (same ops per step)."""
    rec = registry.get(name).build(**BUILD[name])
    sizes = _sizes(rec, 100, {**SMALL[name], "batch": 1})
    x = _inputs(name, rec, sizes, "float32")
    h0 = {k: v.astype(np.float32) for k, v in testing.sample_state(rec, sizes, 1).items()}
    got, gh = _run(rec, x, sizes, h0, block=None)
    want, wh = _run(rec, x, sizes, h0, algorithm="recurrent", block=None)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
    for k in wh:
        np.testing.assert_array_equal(gh[k], wh[k])


def test_applies_reasons():
    for name in ("fir", "swa", "bmojo_f"):
        assert window.applies(registry.get(name).build()) == (True, "")
    ok, why = window.applies(registry.get("iir").build())
    assert not ok and "'w'" in why and "companion" in why
    ok, why = window.applies(registry.get("mamba").build())
    assert not ok and "diagonal" in why
    ok, why = window.applies(registry.get("bmojo").build())
    assert not ok and "selection" in why or "shift" in why
    ok, why = TB.supports(registry.get("gla").build(), {"algorithm": "window"})
    assert not ok and "algorithm='window'" in why


def test_auto_picks_window_on_a_gpu_only(monkeypatch):
    rec = registry.get("fir").build()
    monkeypatch.setattr(scan, "on_gpu", lambda: True)
    assert TB.algorithm(rec, {}) == "window"
    assert TB.algorithm(registry.get("bmojo_f").build(), {}) == "window"
    assert TB.algorithm(registry.get("iir").build(), {}) == "recurrent"
    monkeypatch.setattr(scan, "on_gpu", lambda: False)
    assert TB.algorithm(rec, {}) == "recurrent"


def test_block_length_rule():
    # B1 D2048 fir: 32 programs per block; 4 x 132 programs need >= 17 blocks: 1024 steps
    assert window.block_length(32, 32768, 3) == 1024
    assert 32 * (32768 // window.block_length(32, 32768, 3)) >= 4 * 132
    assert window.block_length(256, 2048, 3) == 512  # B8 D2048: 4 blocks, 1024 programs
    # a grid that fills the GPU (decode, large batch): one block, the recurrent kernel
    assert window.block_length(264, 32768, 3) == 32768
    assert window.block_length(264, 1, 3) == 1
    # the halo is at most a quarter of a block
    assert window.block_length(32, 32768, 300) == 2048
    assert window.block_length(32, 4096, 3) == 128
    assert window.block_length(1, 40, 3) == 16
    assert window.block_length(32, 64, 0) == 16
