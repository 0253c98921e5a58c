"""Sampling inputs that keep a recurrence stable: the samplers a registration's ``hints``
name (``register(hints={"A": "negative"})``, a spec's ``hints:``), and random inputs and
initial states drawn with them (used by ``scancc check``, the tests and the benchmarks)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from scancc.ir import Recurrence


def _stable_poly(rng, shape):
    """Rows of monic polynomial coefficients (a[..., 0] = 1) with roots inside |z| < 0.9."""
    *lead, n1 = shape
    roots = rng.uniform(-0.9, 0.9, size=(*lead, n1 - 1))
    out = np.empty(shape)
    for idx in np.ndindex(*lead):
        out[idx] = np.poly(roots[idx]) if n1 > 1 else [1.0]
    return out


def _unit_rows(rng, shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# how to sample an input: by hint name
SAMPLERS = {
    "normal": lambda rng, s: rng.standard_normal(s),
    "small": lambda rng, s: 0.3 * rng.standard_normal(s),
    "logsigmoid": lambda rng, s: -np.logaddexp(0.0, -(rng.standard_normal(s) + 2.0)),
    "unit_interval": lambda rng, s: rng.uniform(0.05, 0.95, s),
    "negative": lambda rng, s: -np.exp(0.5 * rng.standard_normal(s)),
    "positive": lambda rng, s: rng.uniform(0.01, 0.2, s),
    "log_dt": lambda rng, s: rng.uniform(np.log(1e-3), np.log(1e-1), s),
    "binary": lambda rng, s: (rng.uniform(size=s) < 0.2).astype(np.float64),  # 0/1 flags
    "unit_rows": _unit_rows,
    "stable_poly": _stable_poly,
}


def sample_inputs(rec: Recurrence, sizes: Mapping[str, int], seed: int = 0,
                  hints: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Random float64 inputs for ``rec`` at ``sizes``; ``hints`` (input -> a SAMPLERS name,
    as given to ``register``) keep the scan stable (log-space gates negative, A < 0, ...)."""
    rng = np.random.default_rng(seed)
    hints = hints or {}
    out = {}
    for inp in rec.inputs:
        shape = tuple(sizes[d] for d in inp.dims)
        out[inp.name] = SAMPLERS[hints.get(inp.name, "normal")](rng, shape)
    return out


def sample_state(rec: Recurrence, sizes: Mapping[str, int], seed: int = 1) -> dict:
    """Random float64 initial states (scaled by 0.5) for ``rec`` at ``sizes``."""
    rng = np.random.default_rng(seed)
    return {s.name: 0.5 * rng.standard_normal(tuple(sizes[d] for d in s.dims))
            for s in rec.states}
