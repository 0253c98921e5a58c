"""The chunked algorithm (parallel in time, tl.dot): not written yet."""
from __future__ import annotations

from scancc.ir import Recurrence


def applies(rec: Recurrence) -> tuple[bool, str]:
    return False, "the chunked algorithm is not implemented yet"


Lowering = None
