"""Test utilities shared by the test suite, ``scancc check`` and the benchmarks: the one
tolerance table and its long-T function, the error metrics and NaN poisoning.

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


# The base table, keyed by the input dtype: the tolerance at short T (memory L <= L0 below).
# States accumulate in float32 for every input dtype, so float32 bounds the accumulation
# error; lower precisions add output and input rounding (bfloat16 has 8 significant bits: one
# rounding is up to 2^-9 relative). Longer memories: ``tolerance(dtype, T, memory)``.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-10, 1e-9),
    "float32": Tolerance(2e-5, 1e-4),
    "float16": Tolerance(5e-4, 2e-3),
    "bfloat16": Tolerance(1e-2, 1.5e-2),
}

# unit roundoff of the accumulation: the reference (float64 inputs) runs in float64, every
# generated kernel accumulates in float32 whatever the input dtype
_UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -24,
         "bfloat16": 2.0 ** -24}
_ACCUM = {"float64": "float64", "float32": "float32", "float16": "float32",
          "bfloat16": "float32"}
# the accumulation error per step of memory, in units of u (docs/numerics.md derives them):
# rel-RMS <= u L / 2, max-abs <= u L
ACCUM_REL_RMS, ACCUM_MAX_ABS = 0.5, 1.0


def accumulation(dtype: str, L: float) -> Tolerance:
    """The modelled accumulation error of a recurrence with memory ``L`` steps (in the
    accumulation precision of ``dtype``): rel-RMS u L / 2, max-abs u L."""
    u = _UNIT[dtype]
    return Tolerance(ACCUM_REL_RMS * u * L, ACCUM_MAX_ABS * u * L)


def memory_length(decays) -> float:
    """The effective memory 1 / (1 - max |a|) of a recurrence whose decays (diagonal or scalar
    transition values) are ``decays``; inf when max |a| >= 1 (identity: the memory is T)."""
    a = float(np.max(np.abs(np.asarray(_np(decays), dtype=np.float64)), initial=0.0))
    return float("inf") if a >= 1.0 else 1.0 / (1.0 - a)


def tolerance(dtype: str, T: int | None = None, memory: float | None = None) -> Tolerance:
    """The tolerance for a run of ``T`` steps with effective memory ``memory`` steps (default
    T; 1 / (1 - max |a|) for largest decay magnitude a, see ``memory_length``).

    With L = min(T, memory) the float32 accumulation error is modelled as rel-RMS u L / 2 and
    max-abs u L (u = 2^-24; docs/numerics.md gives the error model, docs/performance/
    tolerance.md the measurements). The base table ``TOLERANCES`` is the accumulation at short
    memories, so each bound is the table's value while the model stays under the float32 row
    (L <= 671 for rel-RMS, 1678 for max-abs) and the model beyond; float16/bfloat16 add their
    output rounding (the table's excess over the float32 row) to it. float64 uses u = 2^-53.
    Without T: the base table."""
    base = TOLERANCES[dtype]
    if T is None:
        return base
    L = float(T) if memory is None else min(float(T), float(memory))
    acc, row = accumulation(dtype, L), TOLERANCES[_ACCUM[dtype]]
    return Tolerance(base.rel_rms + max(0.0, acc.rel_rms - row.rel_rms),
                     base.max_abs + max(0.0, acc.max_abs - row.max_abs))


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


def within(out, ref, dtype: str, T: int | None = None,
           memory: float | None = None) -> tuple[bool, float, float]:
    """(ok, rel-RMS, max-abs) of ``out`` against ``ref`` under ``tolerance(dtype, T, memory)``
    (without T: the base table)."""
    rel, mx = errors(out, ref)
    tol = tolerance(dtype, T, memory)
    return rel <= tol.rel_rms and mx <= tol.max_abs, rel, mx


def assert_close(out, ref, dtype: str, what: str = "output", T: int | None = None,
                 memory: float | None = None) -> None:
    ok, rel, mx = within(out, ref, dtype, T, memory)
    tol = tolerance(dtype, T, memory)
    at = "" if T is None else f", T={T}" + ("" if memory is None else f", memory={memory:.4g}")
    assert ok, (f"{what}: rel-RMS {rel:.3e} (tol {tol.rel_rms:.2e}), max-abs {mx:.3e} "
                f"(tol {tol.max_abs:.2e}) at {dtype}{at}")


def _np(x):
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x)


def nan_poisoned(shape, dtype=np.float64) -> np.ndarray:
    """A fresh output buffer filled with NaN, so an element a backend never writes fails."""
    return np.full(shape, np.nan, dtype=dtype)


def decay_operand_recurrence(kind: str, name: str | None = None) -> Recurrence:
    """``S = a_t S + k vᵀ`` (``kind="scalar"``: a [batch, time, heads]) or ``diag_K(a_t) S +
    k vᵀ`` (``"diagonal"``: a along the key dim too), read as ``sum(S * q, key)``, with the
    decay a plain input — so 0 is a hard reset and the chunked forms take ``log(a)``: the
    probe of the chunked edges (tests/test_chunked_edges.py, tests/test_nki_chunked_edges.py)."""
    from scancc.ir import Builder, diagonal, reduce_sum, scalar
    r = Builder(name or f"edges_decay_{kind}")
    b, t, h = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head")
    kd, vd = r.dim("key"), r.dim("value")
    q, k = r.input("q", [b, t, h, kd]), r.input("k", [b, t, h, kd])
    v = r.input("v", [b, t, h, vd])
    if kind == "scalar":
        a = r.input("a", [b, t, h])
        tr = scalar(a)
    elif kind == "diagonal":
        a = r.input("a", [b, t, h, kd])
        tr = diagonal(a)
    else:
        raise ValueError(f"kind {kind!r}: expected 'scalar' or 'diagonal'")
    S = r.state("S", [b, h, kd, vd], tr, inject=k * v)
    r.output("o", [b, t, h, vd], reduce_sum(S * q, kd))
    return r.build()


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
