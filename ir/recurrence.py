"""The recurrence: named dims, typed inputs, `let` bindings, states with a transition
structure, and readouts.

Semantics (defined by the reference backend, ``scancc.backends.reference``): for each time
step t, every state updates as ``h_t = A_t(h_{t-1}) + inject_t``, in declaration order, and
then every output is evaluated with ``STATE`` nodes reading h_t.

Transition operands and injected terms read inputs and lets, and may also read states in a
*cascade* (block lower-triangular composition): ``state(s)`` of a state ``s`` declared
*before* (its value h_t, already updated this step), and ``prev(s)`` of any state (its
h_{t-1}). A recurrence with no such read is block diagonal and linear in its state, which the
chunked algorithms and the adjoint rely on; a cascade is run recurrently
(``passes.chunked`` finds no chunked form for a state that reads a state, nor for the states
it reads); its adjoint is derived with the transposed coupling (ir/passes/adjoint.py,
docs/design-adjoint.md), except for a ``prev()`` read of a shift, companion or dense state.
``Recurrence.cascaded`` names the states that read states.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterator

from .errors import IRError
from .expr import Node, Op, as_expr, format_expr

ROLES = ("batch", "time", "head", "group", "feature")


@dataclass(frozen=True)
class Dim:
    """A named dimension. ``size`` is fixed at build time (a window) or None (bound by inputs)."""
    name: str
    role: str = "feature"
    size: int | None = None


class Kind(enum.Enum):
    IDENTITY = "identity"        # h + b
    SCALAR = "scalar"            # a * h + b, a constant over the state's feature dims
    DIAGONAL = "diagonal"        # a ⊙ h + b, a may vary along feature dims (broadcast elsewhere)
    SHIFT = "shift"              # drop the oldest slot along `axis`, append b as the newest
    # bounded memory of `axis` slots: if valid != 0, the incoming item b goes into the lowest
    # free slot (filled == 0), else into the lowest slot with the smallest stored score (keys)
    # if score > that score, else nowhere (nonlinear: see docs/bmojo.md)
    SELECTION = "selection"
    COMPANION = "companion"      # shift, then newest slot = sum(feedback * shifted h, axis) + b
    HOUSEHOLDER = "householder"  # alpha * (h - beta * k * sum(k * h, axis)) + b
    DENSE = "dense"              # sum(matrix[axis, col] * h[col], col) + b
    DPLR = "dplr"                # w * h + a * sum(b * h, axis) + inject: (Diag(w) + a b^T) h
    # the adjoint steps of the three non-symmetric kinds, h_t = A_t^T (h_{t-1} + b_t) with A_t
    # the matrix of the kind named (same operands): the injected term is added *before* the
    # transposed transition, and covers the whole state (derived backward recurrences use
    # these: nu_{t-1} = A_t^T (nu_t + g_t), see ir/passes/adjoint.py)
    SHIFT_ADJOINT = "shift_adjoint"          # reverse shift: slot i <- slot i-1, oldest <- 0
    COMPANION_ADJOINT = "companion_adjoint"  # x = h + b; reverse shift of x + feedback * x[newest]
    DENSE_ADJOINT = "dense_adjoint"          # sum(matrix[col, axis] * x[col], col), x = h + b


# operands each kind takes: (required, optional)
OPERANDS: dict[Kind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    Kind.IDENTITY: ((), ()),
    Kind.SCALAR: (("decay",), ()),
    Kind.DIAGONAL: (("decay",), ()),
    Kind.SHIFT: ((), ()),
    Kind.SELECTION: (("score", "valid", "keys", "filled"), ()),
    Kind.COMPANION: (("feedback",), ()),
    Kind.HOUSEHOLDER: (("k", "beta"), ("alpha",)),
    Kind.DENSE: (("matrix",), ()),
    Kind.DPLR: (("a", "b"), ("w",)),
    Kind.SHIFT_ADJOINT: ((), ()),
    Kind.COMPANION_ADJOINT: (("feedback",), ()),
    Kind.DENSE_ADJOINT: (("matrix",), ()),
}
# the adjoint step of each non-symmetric kind (the others are their own transposes)
ADJOINT_KIND = {Kind.SHIFT: Kind.SHIFT_ADJOINT, Kind.COMPANION: Kind.COMPANION_ADJOINT,
                Kind.DENSE: Kind.DENSE_ADJOINT}
AXIS_KINDS = {Kind.SHIFT, Kind.COMPANION, Kind.HOUSEHOLDER, Kind.DENSE, Kind.DPLR,
              *ADJOINT_KIND.values(), Kind.SELECTION}
# kinds whose injected term fills one slot of `axis` (so it has no `axis` dim)
SLOT_KINDS = {Kind.SHIFT, Kind.COMPANION}
# the injected term of a selection state is one item too (no `axis` dim); kept apart from
# SLOT_KINDS, which the backends read as "a ring buffer"
ITEM_KINDS = {Kind.SHIFT, Kind.COMPANION, Kind.SELECTION}
# kinds with a column dim (the matrix's second dim, the same size as the axis)
COL_KINDS = {Kind.DENSE, Kind.DENSE_ADJOINT}


@dataclass(frozen=True)
class Transition:
    kind: Kind
    axis: str | None = None
    operands: tuple[tuple[str, Node], ...] = ()
    col: str | None = None       # DENSE: the dim the matrix contracts (same size as axis)

    def operand(self, name: str) -> Node | None:
        return dict(self.operands).get(name)


def _operand(ctor: str, name: str, x) -> Node:
    """A transition operand: an expression, or a plain number lifted to a constant."""
    return as_expr(f"{ctor}({name}=...)", x)


def _axis(ctor: str, name: str, x) -> str:
    if not isinstance(x, str):
        raise IRError(f"{ctor}({name}=...): expected a dim name, got {type(x).__name__} {x!r}")
    return x


def identity() -> Transition: return Transition(Kind.IDENTITY)


def scalar(decay: Node | float) -> Transition:
    return Transition(Kind.SCALAR, None, (("decay", _operand("scalar", "decay", decay)),))


def diagonal(decay: Node | float) -> Transition:
    return Transition(Kind.DIAGONAL, None, (("decay", _operand("diagonal", "decay", decay)),))


def shift(axis: str) -> Transition: return Transition(Kind.SHIFT, _axis("shift", "axis", axis))


def companion(axis: str, feedback: Node | float) -> Transition:
    return Transition(Kind.COMPANION, _axis("companion", "axis", axis),
                      (("feedback", _operand("companion", "feedback", feedback)),))


def householder(axis: str, k: Node | float, beta: Node | float,
                alpha: Node | float | None = None) -> Transition:
    ops = (("k", _operand("householder", "k", k)),
           ("beta", _operand("householder", "beta", beta)))
    if alpha is not None:
        ops += (("alpha", _operand("householder", "alpha", alpha)),)
    return Transition(Kind.HOUSEHOLDER, _axis("householder", "axis", axis), ops)


def dense(axis: str, col: str, matrix: Node | float) -> Transition:
    return Transition(Kind.DENSE, _axis("dense", "axis", axis),
                      (("matrix", _operand("dense", "matrix", matrix)),),
                      _axis("dense", "col", col))


def dplr(axis: str, a: Node | float, b: Node | float,
         w: Node | float | None = None) -> Transition:
    """Diagonal plus rank one along ``axis``: h <- (Diag(w) + a b^T) h + inject, i.e.
    ``w * h + a * sum(b * h, axis)`` (w defaults to 1; a and b vary along the axis, w may).
    The gated Householder alpha (I - beta k k^T) Diag(d) is
    ``dplr(axis, a=-alpha * beta * k, b=d * k, w=alpha * d)``."""
    ops = (("w", _operand("dplr", "w", w)),) if w is not None else ()
    ops += (("a", _operand("dplr", "a", a)), ("b", _operand("dplr", "b", b)))
    return Transition(Kind.DPLR, _axis("dplr", "axis", axis), ops)


def transpose(t: Transition) -> Transition:
    """A dplr transition's transpose, Diag(w) + b a^T: the same kind with a and b swapped."""
    if t.kind is not Kind.DPLR:
        raise IRError(f"transpose: only a dplr transition is transposed here, not {t.kind.value}")
    ops = dict(t.operands)
    ops["a"], ops["b"] = ops["b"], ops["a"]
    return Transition(t.kind, t.axis, tuple((k, ops[k]) for k in ("w", "a", "b") if k in ops),
                      t.col)


def selection(axis: str, score: Node | float, valid: Node | float, keys: Node | float,
              filled: Node | float) -> Transition:
    """Bounded memory along ``axis`` (see Kind.SELECTION): ``score``/``valid`` are the incoming
    item's score and flag (no axis), ``keys``/``filled`` the stored scores and occupancy along
    the axis (typically ``prev`` of the states that hold them). States sharing these operands
    make the same choice, so items, scores and occupancy can live in separate states."""
    ops = tuple((k, _operand("selection", k, x)) for k, x in
                (("score", score), ("valid", valid), ("keys", keys), ("filled", filled)))
    return Transition(Kind.SELECTION, _axis("selection", "axis", axis), ops)


def adjoint_step(t: Transition) -> Transition:
    """The transition of the adjoint step of ``t`` (see Kind): symmetric kinds are their own
    transposes (and keep the inject-after form); shift, companion and dense get their
    ``*_adjoint`` kind with the same operands; dplr gets its transpose (a dplr with a and b
    swapped), in the inject-after form too."""
    if t.kind is Kind.DPLR:
        return transpose(t)
    kind = ADJOINT_KIND.get(t.kind, t.kind)
    return Transition(kind, t.axis, t.operands, t.col)


@dataclass(frozen=True)
class Input:
    """A kernel input; ``dims`` is its layout. ``optional_dims`` may be left out by the caller
    (size 1), e.g. the groups dim of mamba's B and C."""
    name: str
    dims: tuple[str, ...]
    optional_dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Let:
    name: str
    expr: Node


@dataclass(frozen=True)
class State:
    name: str
    dims: tuple[str, ...]
    transition: Transition
    inject: Node


@dataclass(frozen=True)
class Output:
    name: str
    dims: tuple[str, ...]
    expr: Node


@dataclass(frozen=True)
class Numerics:
    accum: str = "float32"   # dtype of on-chip accumulation in generated kernels
    state: str = "float32"   # dtype states are carried (and returned) in
    input: str | None = None  # the one input dtype kernels accept; None: any float dtype


@dataclass(frozen=True)
class Recurrence:
    name: str
    dims: tuple[Dim, ...]
    inputs: tuple[Input, ...]
    lets: tuple[Let, ...]
    states: tuple[State, ...]
    outputs: tuple[Output, ...]
    numerics: Numerics = field(default_factory=Numerics)
    doc: str = ""

    # ---- lookups ----
    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise IRError(f"recurrence {self.name!r} has no dim {name!r}")

    @property
    def time(self) -> str:
        return next(d.name for d in self.dims if d.role == "time")

    @property
    def canonical(self) -> tuple[str, ...]:
        """Non-time dims in declaration order: the axis order every backend works in."""
        return tuple(d.name for d in self.dims if d.role != "time")

    def input(self, name: str) -> Input:
        return _find(self.inputs, name, "input", self.name)

    def state(self, name: str) -> State:
        return _find(self.states, name, "state", self.name)

    def let(self, name: str) -> Let:
        return _find(self.lets, name, "let", self.name)

    def order(self, dims) -> tuple[str, ...]:
        """The given dim names in canonical order."""
        s = set(dims)
        return tuple(d for d in self.canonical if d in s)

    # ---- shape inference ----
    def dims_of(self, node: Node) -> tuple[str, ...]:
        """The dims of a per-step expression value, in canonical order (time excluded)."""
        cache = self.__dict__.setdefault("_dims_cache", {})
        if node in cache:
            return cache[node]
        op, a = node.op, node.arg
        if op is Op.INPUT:
            out = self.order(d for d in self.input(a).dims if d != self.time)
        elif op is Op.PARAM:
            out = self.dims_of(self.let(a).expr)
        elif op in (Op.STATE, Op.PREV):
            out = self.order(self.state(a).dims)
        elif op in (Op.CONST, Op.SIZE):
            out = ()
        elif op is Op.IOTA:
            out = (a,)
        elif op in (Op.SUM, Op.MAX):
            out = self.order(set(self.dims_of(node.src[0])) - set(a))
        elif op is Op.GROUP:
            g, d = a
            out = self.order((set(self.dims_of(node.src[0])) - {g}) | {d})
        elif op is Op.UNGROUP:
            d, g = a
            out = self.order((set(self.dims_of(node.src[0])) - {d}) | {g})
        elif op is Op.JSOFTMAX:  # part k keeps its key dim; the other parts' are reduced
            k, ds = a
            out = self.order(set().union(*(set(self.dims_of(s)) - ({ds[i // 2]} - {ds[k]})
                                           for i, s in enumerate(node.src))))
        else:  # elementwise and dim-preserving ops: union of the operands
            out = self.order(set().union(*(self.dims_of(s) for s in node.src)))
        cache[node] = out
        return out

    def exprs(self) -> Iterator[tuple[str, Node]]:
        """(where, root expression) for every expression in the recurrence."""
        for l in self.lets:
            yield f"let {l.name}", l.expr
        for s in self.states:
            for k, n in s.transition.operands:
                yield f"state {s.name} ({s.transition.kind.value} {k})", n
            yield f"state {s.name} (inject)", s.inject
        for o in self.outputs:
            yield f"output {o.name}", o.expr

    @property
    def cascaded(self) -> tuple[str, ...]:
        """The states whose transition operands or injected term read a state (a cascade)."""
        return tuple(s.name for s in self.states
                     if any(self.uses_state(n) for _, n in s.transition.operands)
                     or self.uses_state(s.inject))

    def uses_state(self, node: Node) -> bool:
        return any(n.op in (Op.STATE, Op.PREV) for n in node.walk()) or any(
            self.uses_state(self.let(n.arg).expr) for n in node.walk() if n.op is Op.PARAM)

    def __str__(self) -> str:
        return format_recurrence(self)


def _find(items, name, what, rec):
    for it in items:
        if it.name == name:
            return it
    raise IRError(f"recurrence {rec!r} has no {what} {name!r}")


def bind_sizes(rec: Recurrence, shapes: dict[str, tuple[int, ...]],
               fixed: dict[str, int] | None = None) -> dict[str, int]:
    """Bind every dim's size from the given input shapes (layouts as declared).

    Raises ShapeMismatch naming the input, the dim and expected vs got.
    """
    sizes: dict[str, int] = {d.name: d.size for d in rec.dims if d.size is not None}
    sizes.update(fixed or {})
    source: dict[str, str] = {k: "its declaration" for k in sizes}
    for inp in rec.inputs:
        if inp.name not in shapes:
            continue
        shape = tuple(shapes[inp.name])
        dims = inp.dims
        if len(shape) != len(dims):
            short = tuple(d for d in dims if d not in inp.optional_dims)
            if inp.optional_dims and len(shape) == len(short):
                dims = short
            else:
                alt = f" or [{', '.join(short)}]" if inp.optional_dims else ""
                raise ShapeMismatch(f"input {inp.name!r}: expected {len(dims)} dims "
                                    f"[{', '.join(dims)}]{alt}, got shape {shape}")
        for d, n in zip(dims, shape):
            if d in sizes and sizes[d] != n:
                raise ShapeMismatch(f"input {inp.name!r}: dim {d!r} has size {n}, but "
                                    f"{source[d]} gives {d}={sizes[d]} (input layout "
                                    f"[{', '.join(dims)}], got shape {shape})")
            sizes[d] = n
            source.setdefault(d, f"input {inp.name!r}")
        for d in inp.optional_dims:
            if d not in dims:
                sizes.setdefault(d, 1)
                source.setdefault(d, f"input {inp.name!r} (dim left out)")
    missing = [d.name for d in rec.dims if d.name not in sizes]
    if missing:
        raise ShapeMismatch(f"cannot infer the size of dim(s) {missing}: no given input has them")
    _check_groups(rec, sizes)
    for s in rec.states:
        t = s.transition
        if t.kind in COL_KINDS and sizes[t.col] != sizes[t.axis]:
            raise ShapeMismatch(f"state {s.name!r}: dense column dim {t.col!r} has size "
                                f"{sizes[t.col]}, expected the size of {t.axis!r} ({sizes[t.axis]})")
    return sizes


def _check_groups(rec: Recurrence, sizes: dict[str, int]) -> None:
    for where, root in rec.exprs():
        for n in root.walk():
            if n.op in (Op.GROUP, Op.UNGROUP):
                g, d = n.arg if n.op is Op.GROUP else n.arg[::-1]
                if g in sizes and d in sizes and (sizes[g] == 0 or sizes[d] % sizes[g]):
                    raise ShapeMismatch(f"{where}: dim {d!r} (size {sizes[d]}) is not a multiple "
                                        f"of groups dim {g!r} (size {sizes[g]})")


class ShapeMismatch(IRError):
    """Inputs disagree with the recurrence's declared dims."""


# ---- the text form of a recurrence (printer.py parses it back) ----

def format_transition(t: Transition) -> str:
    """A transition as written in a ``state`` line: ``kind(axis=.., col=.., operand=expr)``."""
    parts = ([f"axis={t.axis}"] if t.axis is not None else []) + (
        [f"col={t.col}"] if t.col is not None else [])
    parts += [f"{k}={format_expr(v)}" for k, v in t.operands]
    return f"{t.kind.value}({', '.join(parts)})"


def _dimlist(dims, optional=()) -> str:
    return "[" + ", ".join(d + ("?" if d in optional else "") for d in dims) + "]"


def format_recurrence(rec: Recurrence) -> str:
    """Print a recurrence in the text form (``printer.parse_recurrence`` reads it back)."""
    lines = [f"recurrence {rec.name}"]
    lines += [f"  # {line}".rstrip() for line in rec.doc.strip().splitlines()] if rec.doc else []
    for d in rec.dims:
        lines.append(f"  dim {d.name}: {d.role}" + (f" = {d.size}" if d.size is not None else ""))
    for i in rec.inputs:
        lines.append(f"  input {i.name}: {_dimlist(i.dims, i.optional_dims)}")
    for l in rec.lets:
        lines.append(f"  let {l.name} = {format_expr(l.expr)}")
    for s in rec.states:
        lines.append(f"  state {s.name}: {_dimlist(s.dims)} = {format_transition(s.transition)}"
                     f" + {format_expr(s.inject)}")
    for o in rec.outputs:
        lines.append(f"  output {o.name}: {_dimlist(o.dims)} = {format_expr(o.expr)}")
    if rec.numerics != Numerics():
        n = rec.numerics
        lines.append(f"  numerics accum={n.accum} state={n.state}" +
                     (f" input={n.input}" if n.input else ""))
    lines.append("end")
    return "\n".join(lines) + "\n"
