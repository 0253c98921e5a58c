"""Errors of the IR layer. Every message names the node or declaration at fault."""


class IRError(ValueError):
    """A recurrence or expression is malformed (raised by the builder, verifier and parser)."""


class VerifyError(IRError):
    """The verifier rejected a recurrence; ``where`` names the declaration at fault."""

    def __init__(self, recurrence: str, where: str, message: str):
        self.recurrence, self.where, self.message = recurrence, where, message
        super().__init__(f"recurrence {recurrence!r}, {where}: {message}")


class ParseError(IRError):
    """The IR text form (or a spec expression) could not be parsed."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None,
                 source: str | None = None):
        self.message, self.line, self.col, self.source = message, line, col, source
        loc = ""
        if line is not None:
            loc = f"line {line}" + (f", col {col}" if col is not None else "") + ": "
        super().__init__(f"{loc}{message}")
