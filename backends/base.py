"""The shape every backend has: capability flags, ``supports``, ``render`` (text), ``run``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from scancc.ir import IRError, Recurrence


class UnsupportedError(IRError):
    """A backend cannot lower something: names the backend, the recurrence and the feature."""

    def __init__(self, backend: str, recurrence: str, feature: str):
        self.backend, self.recurrence, self.feature = backend, recurrence, feature
        super().__init__(f"backend {backend!r} cannot lower recurrence {recurrence!r}: {feature}")


@dataclass
class RunResult:
    """What ``Backend.run`` returns: outputs and (when asked) final states, by name, in
    their declared layouts, plus per-run counters a backend may report."""
    outputs: dict[str, Any]
    final_states: dict[str, Any] | None = None
    counters: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class. A backend imports its toolchain lazily, inside ``available`` / ``run``."""
    name: str = ""
    array: str = "numpy"               # the array kind ``run`` takes and returns: numpy | torch
    generates_source: bool = False
    dtypes: tuple[str, ...] = ("float64", "float32", "float16")
    computes_float64: bool = False     # arithmetic in float64 (else float32 accumulation)
    options: tuple[str, ...] = ()      # backend options compile() accepts (e.g. algorithm)

    def available(self) -> tuple[bool, str]:
        """(True, how it runs here) or (False, why not)."""
        return True, ""

    def supports(self, rec: Recurrence, options: Mapping[str, Any]) -> tuple[bool, str]:
        """(True, '') if this backend can lower ``rec`` with ``options``, else (False, reason)."""
        return True, ""

    def render(self, rec: Recurrence, options: Mapping[str, Any]) -> str | None:
        """Kernel source text, or None for backends that do not generate code."""
        return None

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any]) -> RunResult:
        raise UnsupportedError(self.name, rec.name, "this backend has no run stage")
