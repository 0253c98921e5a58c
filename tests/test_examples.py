"""The documented custom recurrence (examples/gated_iir.py) against a hand-written loop."""

import numpy as np
import pytest
import scancc
from scancc.check import check_one
from scancc.testing import assert_close



@pytest.mark.parametrize("T", [1, 2, 63])
def test_gated_iir_matches_a_hand_loop(gated_iir, T):
    rng = np.random.default_rng(T)
    B, D, n = 2, 3, 2
    x, g = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    a = np.stack([np.poly(rng.uniform(-0.8, 0.8, n)) for _ in range(D)])
    b = rng.standard_normal((D, n + 1))
    w = np.zeros((B, T + n, D))                       # n zeros of history, then w_0..w_{T-1}
    y = np.zeros((B, T, D))
    sg = 1 / (1 + np.exp(-g))
    for t in range(T):
        past = sum(a[:, k] * w[:, n + t - k] for k in range(1, n + 1))
        w[:, n + t] = x[:, t] - sg[:, t] * past
        y[:, t] = sum(b[:, k] * w[:, n + t - k] for k in range(n + 1))
    got, state = scancc.compile("gated_iir")(x, g, b, a, output_final_state=True)
    assert_close(got, y, "float64")
    hist = np.concatenate([np.zeros((B, 1, D)), w], axis=1)[:, -(n + 1):]   # last n+1 w's
    assert_close(state, hist.transpose(0, 2, 1), "float64", "final state")


def test_gated_iir_goes_through_check_like_a_builtin(gated_iir):
    assert "gated_iir" in scancc.names()
    assert check_one("gated_iir", "reference", "float64").ok
