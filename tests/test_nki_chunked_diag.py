"""The NKI chunked key-diagonal form (issue 15): gla, hgrn2 (a decay per K) and rwkv6 (a
readout of prev(S), with its bonus term) against the float64 reference backend, at every
dtype NKI takes, T in {1, 63, 64, 257} (one step; a chunk short, full; two full 128-step
chunks and a ragged one), non-power-of-two dims, with and without initial/final states.

The form is secondary chunking (backends/nki/chunked.py): its exponents are segment sums of
the log-decays that never run from a step back to the chunk's start, so per-K decays far
stronger than e^{-88} over a chunk stay finite. ``strong`` draws log-decays of -4 to -12 per
step on half the keys (cumulative -500 to -1500 over a 128-step chunk: a factorization
(q e^{c_t})(k e^{-c_s}) over the chunk would overflow float32 at step ~10) next to weak ones
(-0 to -0.05) on the others. Each run asserts the plan lowered the state in the chunked
form (no recurrent fallback) and that the Tensor engine ran it. NaN placement and resets
across chunks: tests/test_nki_chunked_edges.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from scancc import registry
from scancc.backends import get
from scancc.backends.nki import emulator
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

GATE = {"gla": "g", "hgrn2": "g", "rwkv6": "w"}   # the log-decay input of each
NAMES = sorted(GATE)


def run(name, T, dtype="float32", strong=False, init=True, final=True, tt=None, **over):
    entry = registry.get(name)
    rec = entry.build()
    sizes = default_sizes(rec, time=T, **over)
    x = sample_inputs(rec, sizes, seed=T + 3, hints=entry.hints)
    if strong:
        g = x[GATE[name]]
        rng = np.random.default_rng(T)
        hard = -rng.uniform(4.0, 12.0, g.shape)
        weak = -rng.uniform(0.0, 0.05, g.shape)
        x[GATE[name]] = np.where(np.arange(g.shape[-1]) % 2 == 0, hard, weak)
    if dtype in ("bfloat16", "float16"):  # the reference sees the inputs the kernel gets
        x = {k: emulator.DTYPES[dtype].round(v).astype(np.float64) for k, v in x.items()}
    h0 = sample_state(rec, sizes) if init else None
    ref = get("reference").run(rec, x, sizes, h0, final, {})
    be = get("nki")
    opts = {"dtype": dtype, "algorithm": "chunked"} | ({"time_tile": tt} if tt else {})
    got = be.run(rec, x, sizes, h0, final, opts)
    plan = be.last_plan
    assert plan.chunked == ("S",) and plan.algorithms == {"S": "chunked"}
    assert plan.tt == (tt or min(T, 128))
    assert got.counters["instructions"]["tensor"] > 0
    judged = "float32" if dtype == "float64" else dtype
    for k, r in ref.outputs.items():
        assert_close(got.outputs[k], r, judged, f"{name} output {k} (T={T}, {dtype})")
    if final:
        for k, r in ref.final_states.items():
            assert_close(got.final_states[k], r, "float32", f"{name} final state {k} (T={T})")
    else:
        assert not got.final_states
    c = got.counters
    assert c["peak_sbuf_bytes_per_partition"] <= plan.sbuf_bytes
    assert c["peak_psum_banks"] <= plan.psum_banks <= emulator.PSUM_BANKS
    return got, plan


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("T", [1, 63, 64, 257])
@pytest.mark.parametrize("name", NAMES)
def test_key_diagonal_chunked_against_the_reference(name, T, dtype):
    """Non-power-of-two K = 5, V = 7; an initial state; strong and weak decays side by side."""
    run(name, T, dtype, strong=True, key=5, value=7)


@pytest.mark.parametrize("name", NAMES)
def test_default_auto_picks_the_chunked_form(name):
    """algorithm="auto" lowers these states chunked (the fast path) where K <= 128."""
    entry = registry.get(name)
    rec = entry.build()
    sizes = default_sizes(rec, time=40)
    x = sample_inputs(rec, sizes, seed=1, hints=entry.hints)
    be = get("nki")
    be.run(rec, x, sizes, None, False, {})
    assert be.last_plan.chunked == ("S",)


@pytest.mark.parametrize("name", NAMES)
def test_without_initial_or_final_state(name):
    run(name, 63, init=False, final=False, key=6, value=9)
    run(name, 64, init=False, final=True, key=6, value=9)


@pytest.mark.parametrize("name", NAMES)
def test_full_key_tile_and_ragged_value_tiles(name):
    """K = 128 (one whole partition tile of keys), V = 130 (a full value tile and a ragged
    one), T = 257: three chunks, weak and strong decays."""
    run(name, 257, strong=True, key=128, value=130, batch=1, heads=1)


@pytest.mark.parametrize("name", NAMES)
def test_small_time_tiles_carry_the_state(name):
    """A 16-step time tile (four levels of the secondary chunking), T = 70: the ragged last
    chunk has 6 steps."""
    run(name, 70, strong=True, tt=16, key=7, value=5)


def test_strong_decays_would_overflow_a_chunk_wide_factorization():
    """The premise of ``strong``: over a 128-step chunk the cumulative log-decay of a hard key
    passes -88 (e^{-c_s} > float32's max) within the first 25 steps."""
    rng = np.random.default_rng(0)
    c = np.cumsum(-rng.uniform(4.0, 12.0, 128))
    assert (c < -88.8).nonzero()[0][0] < 25
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(-c.astype(np.float32))).all()
