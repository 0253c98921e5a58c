"""Errors of the IR layer. Every message names the node or declaration at fault."""


class IRError(ValueError):
    """A recurrence or expression is malformed (raised by the builder, verifier and parser)."""


class VerifyError(IRError):
    """The verifier rejected a recurrence.

    ``where`` locates the fault as a path: the declaration kind, its name, then the part of
    it (and for a transition, the operand), e.g. ``("state", "h", "inject")``,
    ``("state", "h", "transition", "decay")``, ``("state", "h", "dims")``,
    ``("output", "y", "expr")``, ``("input", "x", "dims")``, ``("input", "x")``,
    ``("let", "a", "expr")``, ``("dim", "key", "size")``, ``("numerics", "accum")``, or one
    word for the recurrence as a whole: ``("name",)``, ``("dims",)``, ``("states",)``,
    ``("outputs",)``. Tools map it back to their source (YAML specs: file and line).
    ``label`` says the same in words for the message (default: made from ``where``).
    """

    def __init__(self, recurrence: str, where: tuple[str, ...], message: str,
                 label: str | None = None):
        self.recurrence, self.where, self.message = recurrence, tuple(where), message
        self.label = label if label is not None else _label(self.where)
        super().__init__(f"recurrence {recurrence!r}, {self.label}: {message}")


def _label(where: tuple[str, ...]) -> str:
    """``("state", "h", "inject")`` -> ``state 'h' (inject)``."""
    if len(where) < 2 or where[0] == "numerics":
        return where[0] if where else "recurrence"
    head = f"{where[0]} {where[1]!r}"
    return head + (f" ({' '.join(where[2:])})" if len(where) > 2 else "")


class ParseError(IRError):
    """The IR text form (or a spec expression) could not be parsed."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None,
                 source: str | None = None):
        self.message, self.line, self.col, self.source = message, line, col, source
        loc = ""
        if line is not None:
            loc = f"line {line}" + (f", col {col}" if col is not None else "") + ": "
        super().__init__(f"{loc}{message}")
