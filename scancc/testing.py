"""Test utilities shared by the test suite, ``scancc check`` and the benchmarks: the one
tolerance table, the error metrics and NaN poisoning.

Product code never imports this module. Input sampling (``scancc.sampling``) and default
sizes (``scancc.ir.sizes``) are product code, re-exported here so tests have one import.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from scancc.ir import DEFAULT_SIZES, ROLE_SIZES, Recurrence, default_sizes  # noqa: F401
from scancc.sampling import SAMPLERS, sample_inputs, sample_state  # noqa: F401


@dataclass(frozen=True)
class Tolerance:
    rel_rms: float   # ||out - ref||_2 / ||ref||_2
    max_abs: float   # max |out - ref| / max(1, max |ref|)


# One table, keyed by the input dtype. States accumulate in float32 for every input dtype,
# so float32 bounds the accumulation error; lower precisions add output and input rounding
# (bfloat16 has 8 significant bits: one rounding is up to 2^-9 relative).
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-10, 1e-9),
    "float32": Tolerance(2e-5, 1e-4),
    "float16": Tolerance(5e-4, 2e-3),
    "bfloat16": Tolerance(1e-2, 1.5e-2),
}


def errors(out, ref) -> tuple[float, float]:
    """(relative RMS error, scaled max-abs error) of ``out`` against ``ref`` (NaN -> inf)."""
    o = np.asarray(_np(out), dtype=np.float64)
    r = np.asarray(_np(ref), dtype=np.float64)
    if o.shape != r.shape:
        raise ValueError(f"shape mismatch: got {o.shape}, reference {r.shape}")
    if not np.all(np.isfinite(o)):
        return float("inf"), float("inf")
    d = o - r
    rel = float(np.sqrt(np.sum(d * d)) / max(np.sqrt(np.sum(r * r)), 1e-30))
    mx = float(np.max(np.abs(d), initial=0.0) / max(1.0, float(np.max(np.abs(r), initial=0.0))))
    return rel, mx


def within(out, ref, dtype: str) -> tuple[bool, float, float]:
    rel, mx = errors(out, ref)
    tol = TOLERANCES[dtype]
    return rel <= tol.rel_rms and mx <= tol.max_abs, rel, mx


def assert_close(out, ref, dtype: str, what: str = "output") -> None:
    ok, rel, mx = within(out, ref, dtype)
    tol = TOLERANCES[dtype]
    assert ok, (f"{what}: rel-RMS {rel:.3e} (tol {tol.rel_rms:.0e}), max-abs {mx:.3e} "
                f"(tol {tol.max_abs:.0e}) at {dtype}")


def _np(x):
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x)


def nan_poisoned(shape, dtype=np.float64) -> np.ndarray:
    """A fresh output buffer filled with NaN, so an element a backend never writes fails."""
    return np.full(shape, np.nan, dtype=dtype)


def adjoint_steps_recurrence() -> Recurrence:
    """Every adjoint-step kind (shift_adjoint, companion_adjoint and dense_adjoint with
    input-dependent operands), each beside another looped dim (batch: one output sums over it),
    read directly and through prev(): a probe for the backends' rules of these kinds."""
    from scancc.ir import Builder, Kind, Transition, prev, reduce_sum, sigmoid
    r = Builder("adjoint_steps")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    w, n, c = r.dim("w"), r.dim("n"), r.dim("c")
    x, f = r.input("x", [b, t, h, w]), r.input("f", [h, w])
    y, m = r.input("y", [b, t, h, n]), r.input("m", [h, n, c])
    fb = f * sigmoid(reduce_sum(x, w))
    sa = r.state("sa", [b, h, w], Transition(Kind.SHIFT_ADJOINT, "w"), inject=x)
    ca = r.state("ca", [b, h, w], Transition(Kind.COMPANION_ADJOINT, "w", (("feedback", fb),)),
                 inject=x * 0.5)
    da = r.state("da", [b, h, n], Transition(Kind.DENSE_ADJOINT, "n", (("matrix", m * sigmoid(reduce_sum(y, n))),), "c"),
                 inject=y)
    r.output("o_w", [b, t, h, w], sa + ca * 2.0 + prev("ca") - prev("sa"))
    r.output("o_n", [b, t, h, n], da - prev("da") * 0.5)
    r.output("o_sum", [t, h], reduce_sum(reduce_sum(da, n) + reduce_sum(sa * ca, w), b))
    return r.build()


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' one-time log line that it falls back to its PyTorch
    implementations (mamba_ssm not installed): a logger message, not a warning."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
