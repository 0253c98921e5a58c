"""The decode step on NKI: a dedicated single-step kernel (``Kernel.step``, scancc/_step.py).

The recurrent kernel of the lowering (``lowering.Renderer`` with ``step=True``) rendered for
T = 1 **without its time loop**: no time-tile loop, no per-step loop, the states loaded from
the state arguments, one step of every transition and readout, the new states stored (the
recurrent form always: a chunked form has nothing to gain at one step). As every NKI kernel it
is specialized on the sizes and cached by them (``NkiBackend._render``), so a decode loop
renders it once. The emulator runs it; NKI kernels return their outputs, so the host
(scancc/_step.py) copies the new state into the caller's state (in place) and, with
``state_indices``, gathers/scatters the pool's rows around the kernel, as for the
reference. Where the step kernel cannot be rendered (``UnsupportedError``/``PlanError``),
``run_step`` raises and the host steps through the T=1 scan instead.
"""
from __future__ import annotations

from typing import Any, Mapping

from scancc.ir import Recurrence

from ..base import RunResult


def run_step(backend, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
             state: Mapping[str, Any], options: Mapping[str, Any]) -> RunResult:
    """One step: ``inputs`` with a time dim of 1, ``state`` every state (NumPy arrays);
    outputs (time dim 1) and the new states."""
    if sizes[rec.time] != 1:
        raise ValueError(f"NKI step kernel: one step (time size 1), got {sizes[rec.time]}")
    res = backend.run(rec, inputs, sizes, dict(state), True, options, None, step=True)
    res.counters = {**res.counters, "step": "dedicated kernel"}
    return res


__all__ = ["run_step"]
