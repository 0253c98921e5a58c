"""The emitter's vocabulary: loop indices, values and scopes of generated NKI code.

Shared by the main emitter (``lowering.py``), its rules (``rules.py``) and the chunked form
(``chunked.py``), which import this module and never each other in a cycle.

An expression value is one of five kinds, chosen by whether it varies along partitions and time:

    const  a Python number (possibly a function of loop indices)
    pt     a (1, 1) tile          row   a (1, TT) tile
    col    a (P, 1) tile          full  a (P, TT) tile
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scancc.ir import IRError

NAME = "nki"
BIG = 3.0e38  # masked logits/exponents are pushed down by this much (finite in fp32)


def fmt(v: float) -> str:
    """A float literal of generated code: the exact float value in ``float.__repr__``'s
    shortest round-trip form, whatever the number's type (a subclass's ``__float__`` or
    ``__repr__`` never runs); a non-finite value is an error, never a bare ``inf``/``nan``."""
    if isinstance(v, bool):
        f = float(int(v))
    elif isinstance(v, float):
        f = float.__float__(v)
    elif isinstance(v, int):
        f = float(int.__index__(v))
    else:
        f = float(v)
    if not math.isfinite(f):
        raise IRError(f"non-finite constant {float.__repr__(f)} in generated NKI code")
    return float.__repr__(f)


@dataclass(frozen=True)
class Idx:
    """A loop index in generated code: its Python expression, the loop scopes it uses, and
    ``over``, the dim whose loop variable it is (empty for a derived index)."""
    expr: str
    deps: frozenset
    over: str = ""


@dataclass
class V:
    """A value in generated code: ``kind`` (see the module doc) and a tile name (or, for a
    const, a Python expression); ``mid`` indexes the middle dim of a 3-D tile (state rows)."""
    kind: str
    ref: str
    psum: bool = False
    mid: str = ""
    dtype: str = "nl.float32"  # rows loaded from an input keep its dtype (cheap broadcasts)
    coff: str = ""             # a column offset (a shift register's slot in its history)

    def view(self, cols: str | None = None) -> str:
        if self.kind == "const":
            return self.ref
        rows = "0:1" if self.kind in ("pt", "row") else "0:P"
        cols = cols or ("0:1" if self.kind in ("pt", "col") else "0:tw")
        if self.coff:
            lo, hi = cols.split(":")
            cols = f"{self.coff} + {lo}:{self.coff} + {hi}"
        return f"{self.ref}[{rows}, {self.mid}{cols}]"


# (varies along partitions, varies along time) -> kind
KIND = {(False, False): "pt", (False, True): "row", (True, False): "col", (True, True): "full"}


class Scope:
    """A block of generated code: the kernel body or one loop. ``var`` is the loop variable
    and ``trips`` how many times the block runs in all (its loop's and its parents'), both
    kept as data so nothing reads them back out of the generated text."""

    def __init__(self, parent: "Scope | None", header: str | None, sid: int, trips: int = 1,
                 var: str = ""):
        self.parent, self.header, self.sid, self.var = parent, header, sid, var
        self.trips = trips * (parent.trips if parent is not None else 1)  # executions
        self.lines: list = []
        self.memo: dict = {}

    def chain(self):
        s = self
        while s is not None:
            yield s
            s = s.parent


__all__ = ["BIG", "Idx", "KIND", "NAME", "Scope", "V", "fmt"]
