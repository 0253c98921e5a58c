"""The NKI chunked form at the edges *across chunks* (issue 10 item 1): tests/test_chunked_edges.py
runs T = 64 in one NKI time tile, so the state carried from chunk to chunk (its poisoned rows
and columns, the reset-aware decay of the entering state) is exercised here: 16-step chunks,
an initial state, and the final state compared with the reference's as well as the output.

Truth is the reference backend (recurrent in time). Non-finite placements: the finite pattern
of the output and of the final state must equal the reference's exactly, the finite part within
the float32 tolerance table. Resets: everything finite and within the table.
"""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc.backends import get
from scancc.ir.passes import chunked
from scancc.testing import (assert_close, decay_operand_recurrence, default_sizes,
                            sample_inputs, sample_state)


EXTRA = ("edges_decay_scalar", "edges_decay_diagonal")  # decay_operand_recurrence


def _recurrences():
    out = {n: scancc.get(n).build() for n in scancc.names()}
    for n in EXTRA:
        out[n] = decay_operand_recurrence(n.rsplit("_", 1)[1], n)
    return out


RECS = _recurrences()
HINTS = {n: scancc.get(n).hints for n in RECS if n in scancc.names()}


def _gate(name):
    """(input, value of a hard reset) where the decay is written from one input: a log-gate
    (decay = exp(g)) takes -inf, a plain decay operand 0; None otherwise."""
    cs = chunked.analyze(RECS[name], prev=True).only()
    if cs.decay is None:
        return None
    node = cs.log_decay if cs.decay_is_exp else cs.decay
    if node.op.value != "input":
        return None
    return node.arg, (-np.inf if cs.decay_is_exp else 0.0)


T, TT = 64, 16   # four chunks
NKI_CHUNKED = sorted(n for n, rec in RECS.items()
                     if get("nki").supports(rec, {"algorithm": "chunked"})[0])


def _setup(name, seed):
    rec = RECS[name]
    sizes = default_sizes(rec, time=T)
    x = sample_inputs(rec, sizes, seed, HINTS.get(name))
    x = {k: np.asarray(v, dtype=np.float64) for k, v in x.items()}
    if name in EXTRA:  # decays in (0.5, 1)
        x["a"] = 0.5 + 0.5 * np.random.default_rng(seed).random(x["a"].shape)
    return rec, sizes, x, sample_state(rec, sizes)


def _both(name, rec, sizes, x, h0):
    ref = get("reference").run(rec, x, sizes, h0, True, {})
    be = get("nki")
    got = be.run(rec, x, sizes, h0, True, {"algorithm": "chunked", "time_tile": TT})
    assert be.last_plan.tt == TT and be.last_plan.chunked
    pairs = [(f"output {k}", got.outputs[k], r) for k, r in ref.outputs.items()]
    pairs += [(f"final state {k}", got.final_states[k], r) for k, r in ref.final_states.items()]
    return [(what, np.asarray(g, np.float64), np.asarray(r, np.float64)) for what, g, r in pairs]


def _same_placement(pairs, where):
    for what, got, ref in pairs:
        fin, fin_ref = np.isfinite(got), np.isfinite(ref)
        if not np.array_equal(fin, fin_ref):
            first = tuple(int(i) for i in np.argwhere(fin != fin_ref)[0])
            raise AssertionError(f"{what} with {where}: finite in {int(fin.sum())} elements, the "
                                 f"reference in {int(fin_ref.sum())}; first difference at "
                                 f"{first}: got {got[first]}, reference {ref[first]}")
        if fin_ref.any():
            assert_close(np.where(fin_ref, got, 0.0), np.where(fin_ref, ref, 0.0), "float32",
                         f"{what} with {where} (finite part)")


def _time_axis(rec, name):
    dims = rec.input(name).dims
    return dims.index(rec.time) if rec.time in dims else None


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("name", NKI_CHUNKED)
def test_nonfinite_across_chunks(name, value):
    """One non-finite element of each input in turn, at a step inside the second chunk (and for
    inputs without time, anywhere): output and final state keep the reference's placement."""
    rec, sizes, x0, h0 = _setup(name, seed=4)
    for inp in rec.inputs:
        x = {k: v.copy() for k, v in x0.items()}
        idx = [n // 2 for n in x[inp.name].shape]
        ta = _time_axis(rec, inp.name)
        if ta is not None:
            idx[ta] = 21
        x[inp.name][tuple(idx)] = value
        _same_placement(_both(name, rec, sizes, x, h0), f"{inp.name}{idx} = {value}")


@pytest.mark.parametrize("name", NKI_CHUNKED)
def test_nan_initial_state_survives_resets(name):
    """A NaN in the initial state stays NaN through the chunks' decays, resets included
    (multiplied, never selected), exactly where the reference's does."""
    rec, sizes, x, h0 = _setup(name, seed=5)
    g = _gate(name)
    if g is not None:   # resets at a chunk's first step and inside one
        inp, val = g
        ta = _time_axis(rec, inp)
        for s in (16, 37):
            sl = [slice(None)] * x[inp].ndim
            sl[ta] = s
            x[inp][tuple(sl)] = val
    h0 = {k: v.copy() for k, v in h0.items()}
    k0 = next(iter(h0))
    h0[k0][(0,) * h0[k0].ndim] = np.nan
    _same_placement(_both(name, rec, sizes, x, h0), f"{k0}[0, ...] = nan initially")


RESETTABLE = [n for n in NKI_CHUNKED if _gate(n) is not None]


@pytest.mark.parametrize("steps", [(0,), (15, 16), (17, 40, 63), (31, 32, 33, 47)])
@pytest.mark.parametrize("name", RESETTABLE)
def test_resets_across_chunks(name, steps):
    """Hard resets (log-gate -inf, decay 0) at chunk edges and inside chunks, for every element
    of the step and for one element: output and final state finite and within tolerance."""
    rec, sizes, x0, h0 = _setup(name, seed=6)
    inp, val = _gate(name)
    ta = _time_axis(rec, inp)
    for whole in (True, False):
        x = {k: v.copy() for k, v in x0.items()}
        for s in steps:
            sl = [slice(None) if whole else 0] * x[inp].ndim
            sl[ta] = s
            x[inp][tuple(sl)] = val
        for what, got, ref in _both(name, rec, sizes, x, h0):
            assert np.isfinite(ref).all()
            assert np.isfinite(got).all(), f"{what}: a reset at {steps} gave non-finite values"
            assert_close(got, ref, "float32", f"{what} with resets at {steps} (whole={whole})")


@pytest.mark.parametrize("name", RESETTABLE)
def test_a_reset_is_a_log_decay_at_or_below_the_threshold(name):
    """RESET_LOG_DECAY is the boundary: a log-decay at or just below it is a reset (the
    reference's result to float32: what it drops is below 2**-126 of the state); one of -7.3
    (a decay of 6.6e-4) is an ordinary decay: treating it as a reset would miss the 6.6e-4
    of the state it keeps (checked: a threshold of -5 fails here)."""
    rec, sizes, x0, h0 = _setup(name, seed=7)
    inp, val = _gate(name)
    ta = _time_axis(rec, inp)
    for g in (chunked.RESET_LOG_DECAY, chunked.RESET_LOG_DECAY - 1.0,
              chunked.RESET_LOG_DECAY + 80.0):
        x = {k: v.copy() for k, v in x0.items()}
        sl = [slice(None)] * x[inp].ndim
        sl[ta] = 20
        x[inp][tuple(sl)] = g if val == -np.inf else np.exp(g)
        for what, got, ref in _both(name, rec, sizes, x, h0):
            assert_close(got, ref, "float32", f"{what} with a log-decay of {g} at step 20")
