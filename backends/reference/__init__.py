"""The reference backend: a NumPy interpreter of the IR in float64 (the semantics).

``interpreter.py`` runs the time loop; ``rules.py`` holds how each op (``OP_RULES``) and each
transition kind (``TRANSITION_RULES``) is evaluated, one function per entry.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from scancc.ir import Recurrence

from ..base import Backend, RunResult
from .interpreter import Interpreter


class ReferenceBackend(Backend):
    name = "reference"
    array = "numpy"
    generates_source = False
    dtypes = ("float64", "float32", "float16", "bfloat16")
    computes_float64 = True
    varlen = True  # takes cu_seqlens natively (the reset in Interpreter.run)

    def available(self) -> tuple[bool, str]:
        return True, f"NumPy {np.__version__} interpreter, float64"

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any]) -> RunResult:
        outs, finals = Interpreter(rec, sizes).run(inputs, initial_state)
        return RunResult(outs, finals if output_final_state else None)

    def run_varlen(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
                   initial_state: Mapping[str, Any] | None, output_final_state: bool,
                   options: Mapping[str, Any], cu: tuple[int, ...]) -> RunResult:
        outs, finals = Interpreter(rec, sizes).run(inputs, initial_state, cu)
        return RunResult(outs, finals if output_final_state else None)


__all__ = ["ReferenceBackend", "Interpreter"]
