"""Expression nodes: one flat op enum and one immutable node type.

A node is ``(op, src, arg)``. Expressions describe the per-time-step parameters of a
recurrence (decays, injected terms, readouts); they are broadcast by *dimension name*,
never by position, so a node's dims are a set of names in the recurrence's canonical order
(see ``Recurrence.dims_of``).
"""
from __future__ import annotations

import builtins
import enum
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import IRError

IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # used with fullmatch: no "\n" slips by $
# names a spec may not take: they would shadow the IR text form's keywords or functions
RESERVED = frozenset(
    "recurrence dim input let state output numerics end initial_state final_state "
    "identity scalar diagonal shift companion householder dense "
    "shift_adjoint companion_adjoint dense_adjoint".split()) | {"selection"}


def check_ident(name: Any, what: str) -> str:
    """Return ``name`` if it is a safe identifier for generated code, else raise."""
    if not isinstance(name, str) or not IDENT.fullmatch(name):
        raise IRError(f"{what} {name!r} is not a valid name: expected letters, digits and '_', "
                      f"starting with a letter, at most 64 characters")
    if name in RESERVED or name in FUNCTIONS:
        raise IRError(f"{what} {name!r} is a reserved word of the IR")
    return name


# the deepest expression tree accepted (parser and verifier): the printers, backends and
# node hashing recurse over the tree, so deeper trees would hit Python's recursion limit;
# a long sum or chain is written with lets instead
MAX_DEPTH = 100


def depth(root: "Node") -> int:
    """The depth of an expression tree (a leaf has depth 1), computed without recursion."""
    d: dict[int, int] = {}
    for n in root.walk():
        d[id(n)] = 1 + builtins.max((d[id(s)] for s in n.src), default=0)
    return d[id(root)]


def check_const(v: Any) -> float:
    """``v`` as a finite float constant, else ``IRError`` (never runs a subclass's methods)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise IRError(f"cannot use {type(v).__name__} as a constant: expected a number")
    try:
        f = float.__float__(v) if isinstance(v, float) else float(int.__index__(v))
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise IRError(f"constant {f!r} is not finite: expected a finite number")
    return f


class Op(enum.Enum):
    # leaves
    INPUT = "input"      # arg: input name
    PARAM = "param"      # arg: name of a `let` binding
    STATE = "state"      # arg: state name; in readouts, the state after this step's update
    PREV = "prev"        # arg: state name; in readouts, the state entering this step (h_{t-1})
    CONST = "const"      # arg: float
    IOTA = "iota"        # arg: dim name; the index along that dim (0, 1, ...)
    SIZE = "size"        # arg: dim name; the size of that dim, a scalar
    # unary elementwise
    NEG = "neg"
    EXP = "exp"
    EXPM1 = "expm1"      # exp(x) - 1, accurate for small |x| (canonicalize writes exp(x) - 1 so)
    LOG = "log"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    LOGSIGMOID = "logsigmoid"
    SILU = "silu"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    CLAMP = "clamp"      # arg: (lo, hi), either may be None
    STEP = "step"        # 1 where x >= 0, else 0 (the derivative masks of clamp/maximum/max)
    COS = "cos"          # radians (rotary states: cos/sin of a per-step angle, no host precompute)
    SIN = "sin"
    ABS = "abs"          # |x|; its derivative is taken as sign(x) with sign(0) = +1
    TANH = "tanh"
    # binary elementwise
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    MAXIMUM = "maximum"
    MINIMUM = "minimum"
    # dim-structured
    SUM = "sum"          # arg: tuple of dims reduced
    MAX = "max"          # arg: tuple of dims reduced
    L2NORM = "l2norm"    # arg: dim; x / sqrt(sum(x^2, dim) + L2NORM_EPS)
    SOFTMAX = "softmax"  # arg: dim; src (logits,) or (logits, mask): weight 0 where mask == 0
    FLIP = "flip"        # arg: dim; reverse the order along dim
    GROUP = "group"      # arg: (group_dim, dim); element i of dim reads group i // (|dim|/|groups|)
    UNGROUP = "ungroup"  # arg: (dim, group_dim); group j sums the elements of dim that read it
    # one softmax over the union of several key dims (several windows/states): src
    # (logits_0, mask_0, logits_1, mask_1, ...), arg (part, (dim_0, dim_1, ...)); the node is
    # the weights of part ``part`` (along dim_part): exp(l_part) / (sum over every part's keys
    # of exp(l)), weight 0 where a mask == 0 (see joint_softmax below)
    JSOFTMAX = "joint_softmax"


LEAVES = {Op.INPUT, Op.PARAM, Op.STATE, Op.PREV, Op.CONST, Op.IOTA, Op.SIZE}
UNARY = {Op.NEG, Op.EXP, Op.EXPM1, Op.LOG, Op.SOFTPLUS, Op.SIGMOID, Op.LOGSIGMOID, Op.SILU, Op.SQRT,
         Op.RSQRT, Op.CLAMP, Op.STEP, Op.COS, Op.SIN, Op.ABS, Op.TANH}
BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAXIMUM, Op.MINIMUM}
REDUCE = {Op.SUM, Op.MAX}
L2NORM_EPS = 1e-6  # the epsilon of l2norm, one number for every backend and the adjoint

# the function-call spelling of ops in the text form: name -> op
FUNCTIONS = {op.value: op for op in (UNARY | {Op.MAXIMUM, Op.MINIMUM} | REDUCE
                                     | {Op.L2NORM, Op.SOFTMAX, Op.JSOFTMAX, Op.FLIP, Op.GROUP,
                                        Op.UNGROUP,
                                        Op.IOTA, Op.SIZE, Op.PREV})
             if op is not Op.NEG}
INFIX = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/"}


@dataclass(frozen=True, eq=True)
class Node:
    """An immutable expression node. Build with the helpers below or Python operators."""
    op: Op
    src: tuple["Node", ...] = ()
    arg: Any = None

    # python operators build nodes, so library code reads like the math
    def __add__(self, o): return Node(Op.ADD, (self, lift(o)))
    def __radd__(self, o): return Node(Op.ADD, (lift(o), self))
    def __sub__(self, o): return Node(Op.SUB, (self, lift(o)))
    def __rsub__(self, o): return Node(Op.SUB, (lift(o), self))
    def __mul__(self, o): return Node(Op.MUL, (self, lift(o)))
    def __rmul__(self, o): return Node(Op.MUL, (lift(o), self))
    def __truediv__(self, o): return Node(Op.DIV, (self, lift(o)))
    def __rtruediv__(self, o): return Node(Op.DIV, (lift(o), self))
    def __neg__(self): return Node(Op.NEG, (self,))

    # Nodes are dict keys all over the passes and backends, and derived expressions (a
    # backward's softmax VJP) are large DAGs sharing subtrees: the dataclass hash would walk
    # the whole tree on every lookup (exponential in the sharing). The hash is computed once
    # per node (children's hashes are cached in turn) and kept out of pickles, because str
    # hashes differ between processes.
    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.op, self.src, self.arg))
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, o) -> bool:
        if self is o:
            return True
        if not isinstance(o, Node):
            return NotImplemented
        if hash(self) != hash(o) or self.op is not o.op:
            return False
        # structural equality, each pair of nodes compared once (no recursion per path)
        same: set[tuple[int, int]] = set()
        stack = [(self, o)]
        while stack:
            a, b = stack.pop()
            if a is b or (id(a), id(b)) in same:
                continue
            if (hash(a) != hash(b) or a.op is not b.op or len(a.src) != len(b.src)
                    or a.arg != b.arg):
                return False
            same.add((id(a), id(b)))
            stack.extend(zip(a.src, b.src))
        return True

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __repr__(self) -> str:
        return f"Node<{format_expr(self)}>"

    def walk(self) -> Iterator["Node"]:
        """Every node of the expression once, sources before users."""
        seen: set[int] = set()
        stack: list[tuple[Node, bool]] = [(self, False)]
        while stack:
            n, expanded = stack.pop()
            if id(n) in seen:
                continue
            if expanded:
                seen.add(id(n))
                yield n
            else:
                stack.append((n, True))
                stack.extend((s, False) for s in reversed(n.src))


# ---- the text form of an expression (printer.py parses it back; recurrence.py prints
# whole recurrences with it) ----

_PREC = {Op.ADD: 1, Op.SUB: 1, Op.MUL: 2, Op.DIV: 2, Op.NEG: 3}


def _prec(n: Node) -> int:
    if n.op is Op.CONST and n.arg < 0:
        return 3
    return _PREC.get(n.op, 4)


def _num(v: float) -> str:
    return repr(float(v))


def format_expr(n: Node, names: Callable[[Node], str] | None = None) -> str:
    """Print an expression in the text form (fully determined by the tree: stable)."""
    f = lambda m: format_expr(m, names)  # noqa: E731
    op = n.op
    if op in (Op.INPUT, Op.PARAM, Op.STATE):
        return names(n) if names else n.arg
    if op is Op.CONST:
        return _num(n.arg)
    if op in INFIX:
        a, b = n.src
        p = _PREC[op]
        left = f(a) if _prec(a) >= p else f"({f(a)})"
        right = f(b) if _prec(b) > p else f"({f(b)})"
        return f"{left} {INFIX[op]} {right}"
    if op is Op.NEG:
        a = n.src[0]
        return f"-{f(a)}" if _prec(a) == 4 and a.op is not Op.CONST else f"-({f(a)})"
    if op in (Op.IOTA, Op.SIZE, Op.PREV):
        return f"{op.value}({n.arg})"
    if op is Op.CLAMP:
        lo, hi = n.arg
        kw = ([f"lo={_num(lo)}"] if lo is not None else []) + (
            [f"hi={_num(hi)}"] if hi is not None else [])
        return f"clamp({', '.join([f(n.src[0])] + kw)})"
    if op in (Op.SUM, Op.MAX):
        return f"{op.value}({f(n.src[0])}, {', '.join(n.arg)})"
    if op in (Op.L2NORM, Op.FLIP):
        return f"{op.value}({f(n.src[0])}, {n.arg})"
    if op in (Op.GROUP, Op.UNGROUP):
        return f"{op.value}({f(n.src[0])}, {n.arg[0]}, {n.arg[1]})"
    if op is Op.SOFTMAX:
        mask = f", mask={f(n.src[1])}" if len(n.src) > 1 else ""
        return f"softmax({f(n.src[0])}, {n.arg}{mask})"
    if op is Op.JSOFTMAX:  # joint_softmax(part, logits_0, dim_0, mask_0, logits_1, ...)
        part, ds = n.arg
        parts = [f"{f(n.src[2 * i])}, {d}, {f(n.src[2 * i + 1])}" for i, d in enumerate(ds)]
        return f"joint_softmax({part}, {', '.join(parts)})"
    return f"{op.value}({', '.join(f(s) for s in n.src)})"


def lift(x: Any) -> Node:
    if isinstance(x, Node):
        return x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"cannot use {x!r} ({type(x).__name__}) in an expression")
    return Node(Op.CONST, (), check_const(x))


def as_expr(where: str, x: Any) -> Node:
    """``x`` as an expression where a builder or constructor takes one: a Node as is, a plain
    real number lifted to a constant; anything else an ``IRError`` naming ``where``."""
    if isinstance(x, Node):
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise IRError(f"{where}: expected an expression or a number, got {type(x).__name__} "
                      f"{x!r}")
    try:
        return lift(float(x))
    except ValueError as e:
        raise IRError(f"{where}: {e}") from None


def _dims(dims) -> tuple[str, ...]:
    if isinstance(dims, str):
        return (dims,)
    return tuple(dims)


# ---- constructors (the Python API for writing expressions) ----

def const(v: float) -> Node: return lift(v)
def iota(dim: str) -> Node: return Node(Op.IOTA, (), dim)
def size(dim: str) -> Node: return Node(Op.SIZE, (), dim)
def exp(x) -> Node: return Node(Op.EXP, (lift(x),))
def expm1(x) -> Node: return Node(Op.EXPM1, (lift(x),))
def log(x) -> Node: return Node(Op.LOG, (lift(x),))
def softplus(x) -> Node: return Node(Op.SOFTPLUS, (lift(x),))
def sigmoid(x) -> Node: return Node(Op.SIGMOID, (lift(x),))
def logsigmoid(x) -> Node: return Node(Op.LOGSIGMOID, (lift(x),))
def silu(x) -> Node: return Node(Op.SILU, (lift(x),))
def sqrt(x) -> Node: return Node(Op.SQRT, (lift(x),))
def rsqrt(x) -> Node: return Node(Op.RSQRT, (lift(x),))
def cos(x) -> Node: return Node(Op.COS, (lift(x),))
def sin(x) -> Node: return Node(Op.SIN, (lift(x),))
def abs(x) -> Node: return Node(Op.ABS, (lift(x),))  # noqa: A001 - the IR op is called abs
def tanh(x) -> Node: return Node(Op.TANH, (lift(x),))
def maximum(a, b) -> Node: return Node(Op.MAXIMUM, (lift(a), lift(b)))
def minimum(a, b) -> Node: return Node(Op.MINIMUM, (lift(a), lift(b)))


def clamp(x, lo: float | None = None, hi: float | None = None) -> Node:
    """``x`` limited to [lo, hi]; ``None`` leaves that side unbounded (bounds must be finite)."""
    return Node(Op.CLAMP, (lift(x),), (None if lo is None else check_const(lo),
                                       None if hi is None else check_const(hi)))


def sum(x, dims) -> Node:  # noqa: A001 - the IR op is called sum
    return Node(Op.SUM, (lift(x),), _dims(dims))


def max(x, dims) -> Node:  # noqa: A001
    return Node(Op.MAX, (lift(x),), _dims(dims))


def l2norm(x, dim: str) -> Node: return Node(Op.L2NORM, (lift(x),), dim)
def flip(x, dim: str) -> Node: return Node(Op.FLIP, (lift(x),), dim)
def group(x, groups: str, dim: str) -> Node: return Node(Op.GROUP, (lift(x),), (groups, dim))
def ungroup(x, dim: str, groups: str) -> Node: return Node(Op.UNGROUP, (lift(x),), (dim, groups))
def step(x) -> Node: return Node(Op.STEP, (lift(x),))
def prev(state: str) -> Node: return Node(Op.PREV, (), state)


def softmax(logits, dim: str, mask=None) -> Node:
    src = (lift(logits),) if mask is None else (lift(logits), lift(mask))
    return Node(Op.SOFTMAX, src, dim)


def joint_softmax(parts) -> list[Node]:
    """One softmax over the union of the keys of several parts: ``parts`` is a sequence of
    ``(logits, dim)`` or ``(logits, dim, mask)``; returns the weights of each part (along its
    dim), which sum to 1 over all parts together (0 where a mask == 0; all 0 when every key is
    masked). ``sum_i dot(w_i, v_i, dim_i)`` is attention over the union of the parts' keys."""
    parts = [tuple(p) for p in parts]
    if not parts or any(len(p) not in (2, 3) for p in parts):
        raise IRError("joint_softmax: expected (logits, dim) or (logits, dim, mask) parts, got "
                      f"{parts!r}")
    src = tuple(x for p in parts for x in (lift(p[0]), lift(p[2] if len(p) == 3 else 1.0)))
    dims = tuple(p[1] for p in parts)
    return [Node(Op.JSOFTMAX, src, (i, dims)) for i in range(len(parts))]


def dot(a, b, dims) -> Node:
    """Contraction of a and b over dims (sum of the broadcast product)."""
    return sum(lift(a) * lift(b), dims)
