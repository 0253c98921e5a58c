"""Pieces of emitted Triton text shared by the lowerings and their rules: operand
parenthesization, number formatting, and the index environment (``Idx``, ``Env``)."""
from __future__ import annotations

import re
from dataclasses import dataclass

# atomicity of an operand string the emitter built itself (a name, a number or one call):
# decides parentheses only, never what the code does
_ATOM = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.]*|\d+(?:\.\d*)?(?:e[+-]?\d+)?)$")


def atomic(s: str) -> bool:
    """True if ``s`` needs no parentheses as an operand: a name, a number or one call."""
    if _ATOM.match(s):
        return True
    m = re.match(r"^[A-Za-z_][A-Za-z0-9_.]*\(", s)
    if not m or not s.endswith(")"):
        return False
    depth = 0
    for i, c in enumerate(s[m.end() - 1:], m.end() - 1):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return i == len(s) - 1
    return False


def par(s: str) -> str:
    return s if atomic(s) else f"({s})"


def number(v: float) -> str:
    s = repr(float(v))
    return f"({s})" if s.startswith("-") else s


@dataclass(frozen=True)
class Idx:
    """The index of one dim inside a kernel."""
    expr: str                 # an int scalar (grid dim) or an int tensor along ``axis``
    axis: str | None          # the register dim whose axis it lies along; None: a scalar
    mask: str | None          # in-range mask (register dims), None where always in range
    tvar: bool = False        # depends on the time step


class Env:
    """Dim -> Idx, with overrides for remapped indices (group, flip, ring buffers)."""

    def __init__(self, base: dict[str, Idx], over: tuple = ()):
        self.base, self.over = base, over
        self._d = dict(over)

    def __getitem__(self, d: str) -> Idx:
        return self._d.get(d) or self.base[d]

    def with_(self, d: str, idx: Idx) -> "Env":
        over = dict(self.over)
        over[d] = idx
        return Env(self.base, tuple(sorted(over.items())))

    @property
    def key(self):
        return self.over


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def simple(s: str) -> bool:
    """True if ``s`` is a bare name or number (safe to repeat in emitted code unbound)."""
    return bool(_ATOM.match(s))


_DEF = re.compile(r"^(\s*)(b_\w+) = (.*)$")


def prune_dead(lines: list[str]) -> list[str]:
    """``lines`` without the value bindings (``b_x = <expr>``) nothing reads: a rule may bind
    a tile some kernel variant does not use (a staged stage reads a subset of the chunk's
    tiles). A line goes only when its name occurs nowhere else in the kernel, its expression
    stores nothing, and removing it leaves no empty block; repeated until nothing changes."""
    lines = list(lines)
    while True:
        text = "\n".join(lines)
        drop = None
        for i, ln in enumerate(lines):
            m = _DEF.match(ln)
            if not m or "tl.store" in m.group(3) or "tl.atomic" in m.group(3):
                continue
            if len(re.findall(rf"\b{m.group(2)}\b", text)) != 1:
                continue
            ind = len(m.group(1))
            prev = next((p for p in reversed(lines[:i]) if p.strip() and
                         not p.strip().startswith("#")), "")
            nxt = next((p for p in lines[i + 1:] if p.strip()), "")
            if prev.rstrip().split("#")[0].rstrip().endswith(":") and \
                    len(nxt) - len(nxt.lstrip()) < ind:
                continue  # the block's only statement
            drop = i
            break
        if drop is None:
            return lines
        del lines[drop]
