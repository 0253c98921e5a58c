"""The verifier: every rule a well-formed recurrence obeys, each error naming the node at fault.

Every error is a ``VerifyError`` whose ``where`` is a structured path to the declaration at
fault (see ``errors.VerifyError``), so a spec loader maps it to its own source lines.
"""
from __future__ import annotations

import math

from .errors import IRError, VerifyError
from .expr import BINARY, LEAVES, MAX_DEPTH, UNARY, Node, Op, check_ident, depth
from .recurrence import (AXIS_KINDS, COL_KINDS, ITEM_KINDS, OPERANDS, ROLES, Kind,
                         Recurrence)

_ARITY = {**{op: 1 for op in UNARY}, **{op: 2 for op in BINARY},
          Op.SUM: 1, Op.MAX: 1, Op.L2NORM: 1, Op.FLIP: 1, Op.GROUP: 1, Op.UNGROUP: 1}

# keywords of ``Kernel.__call__`` (scancc/api.py) and its ``self``: an input, state or output
# of that name could not be passed by keyword
CALL_KEYWORDS = frozenset({"self", "initial_state", "output_final_state", "cu_seqlens", "cp_group"})


def verify(rec: Recurrence) -> Recurrence:
    """Check every rule of a well-formed recurrence; return ``rec``, or raise ``VerifyError``."""
    def fail(where: tuple[str, ...], msg: str, label: str | None = None):
        raise VerifyError(rec.name, where, msg, label)

    def decl(where: tuple[str, ...]) -> str:  # "state 'h'": the label of a whole declaration
        return f"{where[0]} {where[1]!r}"

    try:
        check_ident(rec.name, "recurrence name")
    except IRError as e:
        fail(("name",), str(e))

    # one namespace for dims, inputs, lets, states and outputs
    seen: dict[str, str] = {}
    for what, items in (("dim", rec.dims), ("input", rec.inputs), ("let", rec.lets),
                        ("state", rec.states), ("output", rec.outputs)):
        for it in items:
            try:
                check_ident(it.name, what)
            except IRError as e:
                fail((what, it.name), str(e))
            if it.name in seen:
                fail((what, it.name), f"name already used by a {seen[it.name]}")
            if what != "dim" and it.name in CALL_KEYWORDS:
                fail((what, it.name), f"{what} name {it.name!r} is reserved: a kernel call "
                     f"takes it as a keyword (reserved: {', '.join(sorted(CALL_KEYWORDS))})")
            seen[it.name] = what

    dims = {d.name: d for d in rec.dims}
    for d in rec.dims:
        if d.role not in ROLES:
            fail(("dim", d.name, "role"), f"role {d.role!r} is not one of {', '.join(ROLES)}",
                 decl(("dim", d.name)))
        if d.size is not None and (not isinstance(d.size, int) or isinstance(d.size, bool)
                                   or d.size < 1):
            fail(("dim", d.name, "size"), f"size must be a positive integer, got {d.size!r}",
                 decl(("dim", d.name)))
    floats = ("float64", "float32", "float16", "bfloat16")
    for k in ("accum", "state", "input"):
        v = getattr(rec.numerics, k)
        if v is not None and v not in floats:
            fail(("numerics", k), f"{k} dtype {v!r} is not one of {', '.join(floats)}")
    if rec.numerics.accum not in ("float32", "float64"):
        fail(("numerics", "accum"),
             f"accum dtype must be float32 or float64, got {rec.numerics.accum!r}")
    times = [d.name for d in rec.dims if d.role == "time"]
    if len(times) != 1:
        fail(("dims",), f"exactly one dim must have role 'time', found {times or 'none'}")
    time = times[0]
    if not rec.outputs:
        fail(("outputs",), "a recurrence needs at least one output")
    if not rec.states:
        fail(("states",), "a recurrence needs at least one state")

    def check_dims(where: tuple[str, ...], ds, allow_time: bool):
        """``where``: the dims list of a declaration, e.g. ("input", "x", "dims")."""
        label = decl(where)
        if len(set(ds)) != len(ds):
            fail(where, f"dims {list(ds)} repeat a name", label)
        for d in ds:
            if d not in dims:
                fail(where, f"unknown dim {d!r} (declared: {', '.join(dims)})", label)
            if d == time and not allow_time:
                fail(where, f"dims {list(ds)} must not include the time dim {time!r}", label)

    for inp in rec.inputs:
        check_dims(("input", inp.name, "dims"), inp.dims, True)
        for d in inp.optional_dims:
            if d not in inp.dims:
                fail(("input", inp.name, "dims"), f"optional dim {d!r} is not one of its dims",
                     decl(("input", inp.name)))

    names = {"input": {i.name for i in rec.inputs}, "state": {s.name for s in rec.states}}
    lets_so_far: set[str] = set()

    def check_expr(where: tuple[str, ...], label: str, root: Node, allow_state):
        # allow_state: True (a readout), False (a let), or the names of the states declared
        # before (a transition operand or injected term: a cascade reads state(s) of those,
        # and prev(s) of any state)
        def fail_at(node: Node, msg: str):  # the label names the offending node's op too
            fail(where, msg, f"{label}, node {node.op.value}")

        if depth(root) > MAX_DEPTH:
            fail(where, f"expression nested too deeply (depth over {MAX_DEPTH}): split it "
                        "with lets", label)
        for n in root.walk():
            if n.op not in LEAVES and n.op not in (Op.SOFTMAX, Op.JSOFTMAX) \
                    and len(n.src) != _ARITY[n.op]:
                fail_at(n, f"takes {_ARITY[n.op]} operand(s), got {len(n.src)}")
            if n.op is Op.INPUT and n.arg not in names["input"]:
                fail_at(n, f"reads unknown input {n.arg!r}")
            elif n.op is Op.PARAM and n.arg not in lets_so_far:
                fail_at(n, f"reads {n.arg!r}, which is not a let bound earlier")
            elif n.op in (Op.STATE, Op.PREV):
                if n.arg not in names["state"]:
                    fail_at(n, f"reads unknown state {n.arg!r}")
                if allow_state is False:
                    fail_at(n, f"reads state {n.arg!r}: a let may not read states")
                elif allow_state is not True and n.op is Op.STATE \
                        and n.arg not in allow_state:
                    fail_at(n, f"reads state {n.arg!r}, which is not declared before this state "
                               "(a cascade reads the current value of earlier states only; "
                               f"prev({n.arg}) reads its value entering the step)")
            elif n.op is Op.CONST and (type(n.arg) is not float or not math.isfinite(n.arg)):
                fail_at(n, "constant must be a finite float, got "
                        + (repr(n.arg) if type(n.arg) is float else type(n.arg).__name__))
            elif n.op in (Op.IOTA, Op.SIZE, Op.L2NORM, Op.FLIP, Op.SOFTMAX):
                if n.arg not in dims or n.arg == time:
                    fail_at(n, f"dim {n.arg!r} is not a declared non-time dim")
            elif n.op in (Op.SUM, Op.MAX):
                if not n.arg:
                    fail_at(n, "reduces over no dims")
                have = rec.dims_of(n.src[0])
                for d in n.arg:
                    if d not in have:
                        fail_at(n, f"reduces over dim {d!r}, but its operand has dims "
                                   f"{list(have)}")
            elif n.op in (Op.GROUP, Op.UNGROUP):
                # group(x, g, d) turns dim g into d; ungroup(x, d, g) turns d back into g
                src, dst = n.arg
                have = rec.dims_of(n.src[0])
                if src not in dims or dst not in dims:
                    fail_at(n, f"{n.op.value}({src}, {dst}) names an undeclared dim")
                if src not in have:
                    fail_at(n, f"operand has dims {list(have)}, without the dim {src!r}")
                if dst in have:
                    fail_at(n, f"operand already has dim {dst!r}")
            elif n.op is Op.CLAMP:
                if not (isinstance(n.arg, tuple) and len(n.arg) == 2 and all(
                        b is None or (type(b) is float and math.isfinite(b)) for b in n.arg)):
                    fail_at(n, "clamp bounds must be finite floats or None (unbounded), got "
                            + ", ".join(repr(b) if b is None or type(b) is float
                                        else type(b).__name__ for b in n.arg)
                            if isinstance(n.arg, tuple) else type(n.arg).__name__)
                lo, hi = n.arg
                if lo is not None and hi is not None and lo > hi:
                    fail_at(n, f"clamp bounds lo={lo} > hi={hi}")
            elif n.op is Op.SOFTMAX:
                pass
            if n.op in (Op.L2NORM, Op.FLIP) and n.arg not in rec.dims_of(n.src[0]):
                fail_at(n, f"dim {n.arg!r} is not a dim of its operand "
                           f"{list(rec.dims_of(n.src[0]))}")
            if n.op is Op.JSOFTMAX:
                _check_joint_softmax(rec, n, fail_at, dims, time)
            if n.op is Op.SOFTMAX:
                if len(n.src) not in (1, 2):
                    fail_at(n, "takes logits and an optional mask")
                if n.arg not in rec.dims_of(n.src[0]):
                    fail_at(n, f"dim {n.arg!r} is not a dim of the logits "
                               f"{list(rec.dims_of(n.src[0]))}")

    for l in rec.lets:
        check_expr(("let", l.name, "expr"), decl(("let", l.name)), l.expr, allow_state=False)
        lets_so_far.add(l.name)

    def subset(where: tuple[str, ...], label: str, root: Node, allowed, what: str):
        have = rec.dims_of(root)
        extra = [d for d in have if d not in allowed]
        if extra:
            fail(where, f"{what} has dims {list(have)}; {extra} not among {list(allowed)}", label)

    earlier: set[str] = set()
    for s in rec.states:
        w, wl = ("state", s.name), decl(("state", s.name))
        wt = w + ("transition",)
        check_dims(w + ("dims",), s.dims, False)
        t = s.transition
        req, opt = OPERANDS[t.kind]
        given = [k for k, _ in t.operands]
        for k in req:
            if k not in given:
                fail(wt, f"{t.kind.value} transition needs operand {k!r}", wl)
        for k in given:
            if k not in req + opt:
                fail(wt, f"{t.kind.value} transition takes no operand {k!r} "
                         f"(takes: {', '.join(req + opt) or 'none'})", wl)
        if len(set(given)) != len(given):
            fail(wt, f"operands {given} repeat a name", wl)
        if (t.axis is not None) != (t.kind in AXIS_KINDS):
            fail(wt, f"{t.kind.value} transition " + ("needs an axis" if t.kind in AXIS_KINDS
                                                       else "takes no axis"), wl)
        if t.axis is not None and t.axis not in s.dims:
            fail(wt, f"transition axis {t.axis!r} is not one of the state dims {list(s.dims)}",
                 wl)
        if (t.col is not None) != (t.kind in COL_KINDS):
            fail(wt, "only a dense transition has a column dim, and it needs one", wl)
        for k, n in t.operands:
            check_expr(wt + (k,), f"{wl} ({t.kind.value} {k})", n, allow_state=frozenset(earlier))
        check_expr(w + ("inject",), f"{wl} (inject)", s.inject, allow_state=frozenset(earlier))
        earlier.add(s.name)
        sd = set(s.dims)
        feats = {d for d in s.dims if dims[d].role == "feature"}
        ops = dict(t.operands)
        if t.kind is Kind.SCALAR:
            subset(wt + ("decay",), f"{wl} (scalar decay)", ops["decay"], sd - feats,
                   "a scalar decay (constant over the state's feature dims)")
        elif t.kind is Kind.DIAGONAL:
            subset(wt + ("decay",), f"{wl} (diagonal decay)", ops["decay"], sd, "the decay")
        elif t.kind in (Kind.COMPANION, Kind.COMPANION_ADJOINT):
            subset(wt + ("feedback",), f"{wl} (companion feedback)", ops["feedback"], sd,
                   "the feedback row")
            if t.axis not in rec.dims_of(ops["feedback"]):
                fail(wt + ("feedback",), f"the feedback row must vary along the axis {t.axis!r}",
                     wl)
        elif t.kind is Kind.HOUSEHOLDER:
            subset(wt + ("k",), f"{wl} (householder k)", ops["k"], sd, "k")
            if t.axis not in rec.dims_of(ops["k"]):
                fail(wt + ("k",), f"householder k must have the axis {t.axis!r}", wl)
            for k in ("beta", "alpha"):
                if k in ops:
                    subset(wt + (k,), f"{wl} (householder {k})", ops[k], sd - {t.axis}, k)
        elif t.kind is Kind.DPLR:
            for k in ("w", "a", "b"):
                if k in ops:
                    subset(wt + (k,), f"{wl} (dplr {k})", ops[k], sd, f"dplr {k}")
            for k in ("a", "b"):
                if t.axis not in rec.dims_of(ops[k]):
                    fail(wt + (k,), f"dplr {k} must vary along the axis {t.axis!r} (the rank-1 "
                                    f"term a b^T is a {t.axis} x {t.axis} matrix); it has dims "
                                    f"{list(rec.dims_of(ops[k]))}", wl)
        elif t.kind in COL_KINDS:
            if t.col not in dims or t.col in sd or t.col == time:
                fail(wt, f"dense column dim {t.col!r} must be a declared dim not in the state",
                     wl)
            m = rec.dims_of(ops["matrix"])
            if t.axis not in m or t.col not in m:
                fail(wt + ("matrix",),
                     f"dense matrix has dims {list(m)}; it needs both {t.axis!r} and {t.col!r}",
                     wl)
            subset(wt + ("matrix",), f"{wl} (dense matrix)", ops["matrix"], sd | {t.col},
                   "the matrix")
        elif t.kind is Kind.SELECTION:
            for k in ("score", "valid"):
                subset(wt + (k,), f"{wl} (selection {k})", ops[k], sd - {t.axis},
                       f"the incoming item's {k} (one item: no axis)")
            for k in ("keys", "filled"):
                subset(wt + (k,), f"{wl} (selection {k})", ops[k], sd, f"the stored {k}")
        inj_allowed = sd - {t.axis} if t.kind in ITEM_KINDS else sd
        subset(w + ("inject",), f"{wl} (inject)", s.inject, inj_allowed,
               "the injected term" + (" (one slot of the axis)" if t.kind in ITEM_KINDS else ""))

    for o in rec.outputs:
        w, wl = ("output", o.name), decl(("output", o.name))
        check_dims(w + ("dims",), o.dims, True)
        if time not in o.dims:
            fail(w + ("dims",), f"an output must have the time dim {time!r}", wl)
        check_expr(w + ("expr",), wl, o.expr, allow_state=True)
        subset(w + ("expr",), wl, o.expr, [d for d in o.dims if d != time], "the readout")

    # every input is used somewhere, and every dim gets a size
    used = {n.arg for _, root in rec.exprs() for n in root.walk() if n.op is Op.INPUT}
    for inp in rec.inputs:
        if inp.name not in used:
            fail(("input", inp.name), "is never used")
    sized = {d.name for d in rec.dims if d.size is not None}
    for inp in rec.inputs:
        sized |= set(inp.dims)
    for d in rec.dims:
        if d.name not in sized and d.role != "time":
            fail(("dim", d.name), "has no size: give it one, or use it in an input")
    if time not in sized:
        fail(("dim", time), "the time dim must appear in at least one input")
    return rec


def _check_joint_softmax(rec: Recurrence, n: Node, fail_at, dims, time) -> None:
    """joint_softmax(part, (logits_i, dim_i, mask_i)...): well-formed parts (see expr.py)."""
    arg = n.arg
    if not (isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[1], tuple)
            and type(arg[0]) is int):
        fail_at(n, "joint_softmax takes (part, (dim, ...)) as its argument")
    k, ds = arg
    if not ds or len(n.src) != 2 * len(ds):
        fail_at(n, f"joint_softmax takes a (logits, dim, mask) triple per part: {len(ds)} "
                   f"dim(s) but {len(n.src)} logits/masks")
    if not 0 <= k < len(ds):
        fail_at(n, f"joint_softmax part {k} out of range (it has {len(ds)} parts)")
    if len(set(ds)) != len(ds):
        fail_at(n, f"joint_softmax key dims {list(ds)} repeat a dim: each part needs its own")
    for i, d in enumerate(ds):
        if d not in dims or d == time:
            fail_at(n, f"joint_softmax part {i}: dim {d!r} is not a declared non-time dim")
        if d not in rec.dims_of(n.src[2 * i]):
            fail_at(n, f"joint_softmax part {i}: dim {d!r} is not a dim of its logits "
                       f"{list(rec.dims_of(n.src[2 * i]))}")
        for j, s in enumerate(n.src):
            if j // 2 != i and d in rec.dims_of(s):
                fail_at(n, f"joint_softmax part {i}'s key dim {d!r} appears in part {j // 2} "
                           f"({'mask' if j % 2 else 'logits'} dims "
                           f"{list(rec.dims_of(s))}): a key dim belongs to one part")
