"""Identifiers for generated source: every name is allocated once per module, so IR names
(already validated by ir.expr.check_ident) can never collide with each other, with Python
keywords or with the names the generator makes up."""
from __future__ import annotations

import builtins
import keyword

from scancc.ir import check_ident

# names the generated module itself uses at top level or inside kernels
_TAKEN = {"tl", "triton", "torch", "math", "i_t", "i_c", "float", "min", "max", "range", "None",
          "True", "False", "dict", "grid"}


class Names:
    def __init__(self):
        self.used: set[str] = set(_TAKEN) | set(dir(builtins))

    def new(self, base: str) -> str:
        """A fresh identifier that starts with ``base`` (itself if free)."""
        name, i = base, 1
        while name in self.used or keyword.iskeyword(name):
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def ir(self, prefix: str, name: str, upper: bool = False) -> str:
        """A fresh identifier made from a validated IR name."""
        check_ident(name, "name")
        return self.new(prefix + (name.upper() if upper else name))
