"""scancc.ir: the small intermediate representation of canonical-form recurrences."""
if __name__ != "scancc.ir":  # the folder ir/ is installed as scancc.ir, never as a bare 'ir'
    raise ImportError(f"import this package as scancc.ir, not {__name__!r} "
                      "(install the project with `pip install -e .`)")

from .builder import Builder
from .errors import IRError, ParseError, VerifyError
from .expr import (Node, Op, check_ident, clamp, const, dot, exp, expm1, flip, group, iota, l2norm,
                   log, logsigmoid, maximum, minimum, prev, rsqrt, sigmoid, silu, size,
                   softmax, softplus, sqrt, step, ungroup)
from .expr import abs, cos, sin, tanh  # noqa: A004 - the IR ops are called so
from .expr import joint_softmax
from .expr import max as reduce_max
from .expr import sum as reduce_sum
from .printer import ExprParser, format_expr, format_recurrence, parse_recurrence
from .recurrence import (Dim, Input, Kind, Let, Numerics, Output, Recurrence, ShapeMismatch,
                         State, Transition, bind_sizes, companion, dense, diagonal, dplr,
                         householder, identity, scalar, shift)
from .sizes import DEFAULT_SIZES, ROLE_SIZES, default_sizes

__all__ = [
    "Builder", "IRError", "ParseError", "VerifyError", "Node", "Op", "check_ident", "clamp",
    "const", "dot", "exp", "expm1", "flip", "group", "iota", "l2norm", "log", "logsigmoid", "maximum",
    "minimum", "prev", "step", "ungroup", "rsqrt", "sigmoid", "silu", "size", "softmax",
    "softplus", "sqrt", "reduce_max", "reduce_sum", "ExprParser", "format_expr",
    "format_recurrence", "parse_recurrence", "Dim", "Input", "Kind", "Let", "Numerics",
    "Output", "Recurrence", "ShapeMismatch", "State", "Transition", "bind_sizes", "companion",
    "dense", "diagonal", "dplr", "householder", "identity", "scalar", "shift", "DEFAULT_SIZES",
    "ROLE_SIZES", "default_sizes", "abs", "cos", "sin", "tanh",
]
__all__ += ["joint_softmax"]
