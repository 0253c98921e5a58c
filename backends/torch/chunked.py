"""The chunked lowering (placeholder: the prefix scan only)."""
from __future__ import annotations

from .recurrent import SCAN_KINDS, ScanLowering


def applies(rec):
    if any(s.transition.kind in SCAN_KINDS for s in rec.states):
        return True, ""
    return False, "no identity, scalar or diagonal state (the prefix scan) and no state the " \
                  "chunked-form analysis accepts"


def lowering(rec, options):
    return ScanLowering(rec, options)
