"""Where each dim of a recurrence lives in a kernel: the program grid or a register axis.

Every value in a generated kernel is a register tensor of the same rank, one axis per
*register dim* (size 1 where the value does not vary along it), so broadcasting by dim name
is plain Triton broadcasting, as in the reference interpreter.

- a dim that no op mixes (no reduction, transition axis, softmax, flip over it) is
  *parallel*: a batch/head/group dim becomes one program per index (a scalar index), a
  feature dim is split into blocks of registers across programs;
- every other dim is held whole in registers (padded to a power of two, masked).
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


def plan(rec: Recurrence, hold: tuple[str, ...] = ()) -> Plan:
    """Place every dim. ``hold``: parallel batch/head/group dims to hold in blocks of
    registers instead of one program per index (e.g. mamba2's heads, so the B and C a group
    of heads shares are loaded once per program)."""
    mixed: set[str] = set()
    for where, root in rec.exprs():
        for n in root.walk():
            if n.op in (Op.SUM, Op.MAX):
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
    canon = [d for d in rec.canonical if d in used]
    grid = [d for d in canon if d not in mixed and roles[d] != "feature" and d not in hold]
    split = [d for d in canon if d not in mixed and d not in grid]
    if not split and not any(d in mixed for d in canon):
        if not grid:
            raise unsupported(rec, "no non-time dims: nothing to hold in registers")
        split.append(grid.pop())  # at least one register axis
    regs = tuple(d for d in canon if d in split or d in mixed)
    return Plan(tuple(grid), tuple(split), regs, tuple(rings))
