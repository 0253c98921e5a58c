"""Where each dim of a recurrence lives in a kernel: the program grid or a register axis.

Every value in a generated kernel is a register tensor of the same rank, one axis per
*register dim* (size 1 where the value does not vary along it), so broadcasting by dim name
is plain Triton broadcasting, as in the reference interpreter.

- a dim that no op mixes (no reduction, transition axis, softmax, flip over it) is
  *parallel*: a batch/head/group dim becomes one program per index (a scalar index), a
  feature dim is split into blocks of registers across programs;
- every other dim is held whole in registers (padded to a power of two, masked), except a
  dim that only output sums mix, linearly (``partial_dims``: a backward's gradient summed
  over batch or over one of a K x V state's feature dims): it is placed as if parallel, and
  each program adds its part of those outputs atomically (``Plan.partial``).
"""
from __future__ import annotations

from dataclasses import dataclass

from scancc.ir import Kind, Op, Recurrence

from ..base import UnsupportedError

BACKEND = "triton"
SLOT_KINDS = (Kind.SHIFT, Kind.COMPANION)


@dataclass(frozen=True)
class Plan:
    grid: tuple[str, ...]    # one program per index (flattened onto program axis 0)
    split: tuple[str, ...]   # register dims split into blocks (flattened onto program axis 1)
    regs: tuple[str, ...]    # every register dim, canonical order: the axes of each value
    rings: tuple[str, ...]   # axes of shift/companion states, held as register ring buffers
    # grid or split dims that outputs reduce over (sums with coefficients constant along
    # the dim): each program adds its part of such an output atomically (``partial_dims``)
    partial: tuple[str, ...] = ()


# a split dim of a plan with partial dims gets blocks of at most this many state elements
# per program (the product of the register dims' blocks; the launcher's default, so that a
# backward recurrence's state tile, the recomputed state it loads and their products stay in
# registers: measured zero spills at the realistic shapes with ptxas, see
# docs/performance/triton.md "Backward kernels")
TILE_ELEMENTS = 2048
# a split dim of a plan with a state whose transition has a column dim (dense, dense adjoint)
# gets blocks of at most this many register elements, counted over every register dim (the
# rule materializes [state x column] products): mamba3's [headdim, pairs, comp, slot, slot_in]
# = [4, 64, 2, 4, 4] (issue 15: 19 KB of spill stores at the 64-wide block, none at 4;
# ptxas, docs/performance/triton.md)
DENSE_TILE_ELEMENTS = 8192


def unsupported(rec: Recurrence, feature: str) -> UnsupportedError:
    return UnsupportedError(BACKEND, rec.name, feature)


def visible_dims(rec: Recurrence) -> set[str]:
    """Dims some value varies along; a groups dim read only through group() is not one (its
    index is computed from the grouped dim's index when loading)."""
    used: set[str] = set()
    for s in rec.states:
        used |= set(s.dims)
    for o in rec.outputs:
        # an output ungroup(x, d, g) is summed into its group by the programs of d: g is
        # an index computed from d's, not a dim of the grid
        used |= set(o.dims) - ({o.expr.arg[1]} if o.expr.op is Op.UNGROUP else set())

    def visit(node, hidden: frozenset, seen: set):
        if (node, hidden) in seen:
            return
        seen.add((node, hidden))
        if node.op is Op.INPUT:
            used.update(d for d in rec.input(node.arg).dims if d not in hidden)
        elif node.op is Op.IOTA and node.arg not in hidden:
            used.add(node.arg)
        elif node.op is Op.PARAM:
            visit(rec.let(node.arg).expr, hidden, seen)
        elif node.op is Op.GROUP:
            used.add(node.arg[1])
            visit(node.src[0], hidden | {node.arg[0]}, seen)
        else:
            for s in node.src:
                visit(s, hidden, seen)

    seen: set = set()
    for _, root in rec.exprs():
        visit(root, frozenset(), seen)
    return used - {rec.time}


def _touches(rec: Recurrence, node, d: str) -> bool:
    """True if ``node`` reads values along ``d`` (some subexpression varies along it)."""
    return any(n.op is Op.PARAM or d in rec.dims_of(n) for n in node.walk())


def _reduces(n, d: str) -> bool:
    return (n.op in (Op.SUM, Op.MAX) and d in n.arg) or (
        n.op in (Op.L2NORM, Op.SOFTMAX, Op.FLIP) and n.arg == d) or (
        n.op in (Op.GROUP, Op.UNGROUP) and d in n.arg)


def _partial(rec: Recurrence, node, d: str) -> bool:
    """True if ``node`` is a linear combination of sums over ``d`` whose coefficients do not
    vary along ``d``: programs holding disjoint parts of ``d`` each compute the combination
    of their partial sums, and the parts add up to the whole."""
    op = node.op
    if op is Op.SUM and d in node.arg:
        return not any(_reduces(n, d) or n.op is Op.PARAM for n in node.src[0].walk())
    if op in (Op.SUM, Op.NEG) or (op is Op.UNGROUP and d not in node.arg):
        return _partial(rec, node.src[0], d)
    if op in (Op.ADD, Op.SUB):
        return all(_partial(rec, x, d) for x in node.src)
    if op is Op.MUL:
        a, b = node.src
        return ((_partial(rec, a, d) and not _touches(rec, b, d))
                or (_partial(rec, b, d) and not _touches(rec, a, d)))
    if op is Op.DIV:
        return _partial(rec, node.src[0], d) and not _touches(rec, node.src[1], d)
    return False


def partial_dims(rec: Recurrence, mixed_by_outputs: set[str], mixed: set[str]) -> set[str]:
    """Dims only output sums mix (``mixed_by_outputs`` - ``mixed``, the dims states and other
    ops mix) whose every output reduction is ``_partial``: a program can hold a part of them."""
    out = set()
    for d in mixed_by_outputs - mixed:
        roots = [o.expr for o in rec.outputs
                 if any(n.op is Op.SUM and d in n.arg for n in o.expr.walk())]
        if all(_partial(rec, r, d) for r in roots):
            out.add(d)
    return out


def _newly_atomic(rec: Recurrence, d: str) -> int:
    """Outputs that splitting ``d`` makes atomic (an ungroup output already is)."""
    return sum(1 for o in rec.outputs if o.expr.op is not Op.UNGROUP
               and any(n.op is Op.SUM and d in n.arg for n in o.expr.walk()))


def plan(rec: Recurrence, hold: tuple[str, ...] = ()) -> Plan:
    """Place every dim. ``hold``: parallel batch/head/group dims to hold in blocks of
    registers instead of one program per index (e.g. mamba2's heads, so the B and C a group
    of heads shares are loaded once per program).

    A dim that only output sums mix, linearly (``partial_dims``; e.g. the backward's
    gradient of a time-invariant input summed over batch, or of q summed over value), need
    not be held whole: a batch/head/group dim is then a grid dim, and a feature dim of a
    state that would otherwise hold two whole feature dims (the backward's K x V state) is
    split; the outputs that reduce over such a dim are added into atomically."""
    mixed: set[str] = set()
    by_outputs: set[str] = set()
    for where, root in rec.exprs():
        for n in root.walk():
            if n.op is Op.SUM and where.startswith("output "):
                by_outputs |= set(n.arg)
            elif n.op in (Op.SUM, Op.MAX):
                mixed |= set(n.arg)
            elif n.op in (Op.L2NORM, Op.SOFTMAX, Op.FLIP):
                mixed.add(n.arg)
            if n.op in (Op.GROUP, Op.FLIP) and rec.uses_state(n.src[0]):
                raise unsupported(rec, f"{where}: op {n.op.value!r} of a state-dependent value "
                                  "(the recurrent kernel remaps indices only when loading inputs)")
    rings = []
    for s in rec.states:
        t = s.transition
        if t.axis is not None:
            mixed.add(t.axis)
        if t.col is not None:
            mixed.add(t.col)
        if t.kind in SLOT_KINDS and t.axis not in rings:
            rings.append(t.axis)
    for s in rec.states:
        t = s.transition
        for w in rings:
            if w in s.dims and not (t.kind in SLOT_KINDS and t.axis == w):
                raise unsupported(rec, f"state {s.name!r} ({t.kind.value}) has dim {w!r}, which "
                                  "is the axis of a shift/companion state (a ring buffer); every "
                                  f"state along {w!r} must be a shift/companion along it")
    used = visible_dims(rec)
    roles = {d.name: d.role for d in rec.dims}
    cand = partial_dims(rec, by_outputs, mixed) & used
    partial = {d for d in cand if roles[d] != "feature"}
    mixed |= by_outputs - partial
    canon_all = list(rec.canonical)
    while True:  # split one partial feature dim of each state holding two whole ones
        pick = None
        for s in rec.states:
            whole = [d for d in s.dims if d in mixed and roles[d] == "feature"]
            free = [d for d in whole if d in cand]
            if len(whole) >= 2 and free:
                pick = min(free, key=lambda d: (_newly_atomic(rec, d), -canon_all.index(d)))
                break
        if pick is None:
            break
        mixed.discard(pick)
        partial.add(pick)
    canon = [d for d in rec.canonical if d in used]
    grid = [d for d in canon if d not in mixed and roles[d] != "feature" and d not in hold]
    split = [d for d in canon if d not in mixed and d not in grid]
    if not split and not any(d in mixed for d in canon):
        if not grid:
            raise unsupported(rec, "no non-time dims: nothing to hold in registers")
        split.append(grid.pop())  # at least one register axis
    regs = tuple(d for d in canon if d in split or d in mixed)
    return Plan(tuple(grid), tuple(split), regs, tuple(rings),
                tuple(d for d in canon if d in partial))
