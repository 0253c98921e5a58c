"""The recurrent algorithm: one program per (grid index, block of the state), every state in
float32 registers, a loop over time.

Each step loads the step's inputs once, evaluates the transition operands and injected terms
(fused: exp(dt * A), softplus, gates, B * x ... never leave registers), applies one transition
rule per state, evaluates the readouts on the new states and stores each output once.
Time-invariant values are computed before the loop. Shift and companion states are register
ring buffers: the slot written at step t is t mod W, and every other value indexed along the
ring axis is loaded at its logical position, (p - (t + 1)) mod W for physical slot p.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from scancc.ir import Kind, Node, Op, Recurrence, format_recurrence
from scancc.ir.printer import format_expr, format_transition

from .names import Names
from .plan import Plan, plan, unsupported

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


# elementwise rules, keyed by IR op: (template over operand strings, precedence of the
# result: 1 for +/-, 2 for * and /, 3 for unary minus, 4 for an atom or a call). Operands a
# template uses more than once are bound to a name first (see Lowering._operands).
UNARY_RULES: dict[Op, tuple[str, int]] = {
    Op.NEG: ("-{0}", 3),
    Op.EXP: ("tl.exp({0})", 4),
    Op.LOG: ("tl.log({0})", 4),
    # log(1 + e^x) without overflow: max(x, 0) + log(1 + e^-|x|)
    Op.SOFTPLUS: ("tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0})))", 1),
    Op.SIGMOID: ("tl.sigmoid({0})", 4),
    Op.LOGSIGMOID: ("tl.minimum({0}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({0})))", 1),
    Op.SILU: ("{0} * tl.sigmoid({0})", 2),
    Op.SQRT: ("tl.sqrt({0})", 4),
    Op.RSQRT: ("tl.rsqrt({0})", 4),
    Op.STEP: ("tl.where({0} >= 0.0, 1.0, 0.0)", 4),
}
BINARY_RULES: dict[Op, tuple[str, int]] = {
    Op.ADD: ("{0} + {1}", 1),
    Op.SUB: ("{0} - {1}", 1),
    Op.MUL: ("{0} * {1}", 2),
    Op.DIV: ("{0} / {1}", 2),
    Op.MAXIMUM: ("tl.maximum({0}, {1})", 4),
    Op.MINIMUM: ("tl.minimum({0}, {1})", 4),
}
# the precedence an operand of an infix template needs to go without parentheses
_NEED = {"-{0}": (3,), "{0} + {1}": (1, 2), "{0} - {1}": (1, 2), "{0} * {1}": (2, 3),
         "{0} / {1}": (2, 3), "{0} * tl.sigmoid({0})": (3,)}


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


class Lowering:
    """Renders the recurrent kernel and its launcher for one recurrence."""
    algorithm = "recurrent"
    scalar_groups = True  # blocks of a grouped split dim stay inside one group
    _step_key = None      # the env key of a step with ring buffers (see _ring_invariant)

    def __init__(self, rec: Recurrence, options):
        self.rec, self.options = rec, dict(options)
        self.plan: Plan = self.make_plan()
        self.names = Names()
        self.kernel_name = self.names.new(f"{rec.name}_{self.algorithm}_fwd_kernel")
        self.launcher_name = self.names.new(f"{rec.name}_{self.algorithm}_fwd")
        self._check_rules()
        # tensors first: their names are the IR's names, so the signature reads like the IR
        self.arg = {i.name: self.names.ir("", i.name) for i in rec.inputs}
        self.arg.update({o.name: self.names.ir("", o.name) for o in rec.outputs})
        one = len(rec.states) == 1
        self.h0 = {s.name: self.names.new("h0") if one else self.names.ir("h0_", s.name)
                   for s in rec.states}
        self.ht = {s.name: self.names.new("ht") if one else self.names.ir("ht_", s.name)
                   for s in rec.states}
        self.use_h0 = {s.name: self.names.new("USE_INITIAL_STATE") if one
                       else self.names.ir("USE_INITIAL_", s.name, upper=True)
                       for s in rec.states}
        self.store_ht = self.names.new("STORE_FINAL_STATE")
        self.size = {d.name: self.names.ir("", d.name, upper=True) for d in rec.dims}
        self.block = {d: self.names.ir("BLOCK_", d, upper=True) for d in self.plan.regs}
        self.state_var = {s.name: self.names.ir("b_", s.name) for s in rec.states}
        # states a readout reads as they entered the step (prev): a register copy per step
        read_prev = {n.arg for o in rec.outputs for n in o.expr.walk() if n.op is Op.PREV}
        self.prev_var = {s.name: self.names.ir("b_prev_", s.name) for s in rec.states
                         if s.name in read_prev}
        # per dim: program index, offsets and mask (allocated: IR names may look like them)
        self.pid = {d.name: self.names.ir("i_", d.name) for d in rec.dims}
        self.off = {d.name: self.names.ir("o_", d.name) for d in rec.dims}
        self.msk = {d.name: self.names.ir("m_", d.name) for d in rec.dims}
        # split dims read through group(): d -> its groups dims
        self.grouped: dict[str, list[str]] = {}
        if self.scalar_groups:
            for _, root in rec.exprs():
                for n in root.walk():
                    gd = n.arg if n.op is Op.GROUP else n.arg[::-1] if n.op is Op.UNGROUP \
                        else None
                    if gd is not None and gd[1] in self.plan.split:
                        gs = self.grouped.setdefault(gd[1], [])
                        if gd[0] not in gs:
                            gs.append(gd[0])
        # outputs ungroup(x, d, g): each program adds its sum over its d indices into its group
        # (atomically: the programs of one group add into the same elements), in float32
        self.summed = {o.name for o in rec.outputs if o.expr.op is Op.UNGROUP}
        self.parents = self._count_parents()

    def make_plan(self) -> Plan:
        return plan(self.rec, hold=tuple(sorted(self.options.get("block_sizes") or {})))

    # ---- checks ----
    def _check_rules(self):
        known = set(UNARY_RULES) | set(BINARY_RULES) | {
            Op.INPUT, Op.PARAM, Op.STATE, Op.PREV, Op.CONST, Op.IOTA, Op.SIZE, Op.CLAMP, Op.SUM,
            Op.MAX, Op.L2NORM, Op.SOFTMAX, Op.FLIP, Op.GROUP}
        for where, root in self.rec.exprs():
            for n in root.walk():
                if n.op is Op.UNGROUP and n is root and where.startswith("output"):
                    self._check_ungroup(where, n)
                elif n.op not in known:
                    raise unsupported(self.rec, f"{where}: no rule for op {n.op.value!r}"
                                      + (" (ungroup is lowered only as a whole output)"
                                         if n.op is Op.UNGROUP else ""))
        read_prev = {n.arg for o in self.rec.outputs for n in o.expr.walk() if n.op is Op.PREV}
        for s in self.rec.states:
            if s.name in read_prev and s.transition.kind in (Kind.SHIFT, Kind.COMPANION):
                raise unsupported(self.rec, f"prev({s.name}): the state is a ring buffer "
                                  "(its previous value would need a second ring)")
            if s.transition.kind not in TRANSITION_RULES:
                raise unsupported(self.rec, f"state {s.name!r}: no rule for transition "
                                  f"{s.transition.kind.value!r}")

    def _check_ungroup(self, where: str, n: Node):
        d, g = n.arg
        if d not in self.plan.grid and d not in self.plan.split:
            raise unsupported(self.rec, f"{where}: ungroup over {d!r}, which the kernel holds "
                              "whole in registers (lowered: over a grid or split dim)")

    def _count_parents(self) -> dict:
        count: dict = {}
        seen: set = set()
        for _, root in self.rec.exprs():
            for n in root.walk():
                if n in seen:
                    continue
                seen.add(n)
                for s in n.src:
                    count[s] = count.get(s, 0) + 1
        for _, root in self.rec.exprs():  # a root used from several places (e.g. the decay)
            count[root] = count.get(root, 0) + 1
        return count

    # ---- emission helpers ----
    def emit(self, tvar: bool, line: str):
        (self.body if tvar else self.pro).append(line)

    def bind(self, tvar: bool, base: str, expr: str) -> str:
        name = self.names.new(base)
        self.emit(tvar, f"{name} = {expr}")
        return name

    def axis_of(self, d: str) -> int:
        return self.plan.regs.index(d)

    # ---- indices and pointers ----
    def _base_env(self) -> dict[str, Idx]:
        base = {}
        for d in self.plan.grid:
            base[d] = Idx(self.pid[d], None, None)
        for d in self.plan.regs:
            base[d] = Idx(self.off[d], d, self.msk[d])
        return base

    def _ring_env(self, env: Env, count: str, tvar: bool) -> Env:
        """Env whose ring axes index logical slots after ``count`` insertions."""
        for w in self.plan.rings:
            W = self.size[w]
            logical = f"({self.off[w]} + {W} - {par(count)} % {W}) % {W}"
            env = env.with_(w, Idx(logical, w, self.msk[w],
                                   tvar))
        return env

    def pointer(self, arr: str, dims, env: Env, t_index: str | None,
                block: bool = False, time_env: bool = False) -> tuple[str, str | None]:
        """(offset expression of ``arr`` in its contiguous ``dims`` layout, mask). ``block``:
        a block of pointers even where no register dim indexes it (stores of blocks)."""
        sizes = [self.size[d] for d in dims]
        terms, masks = [], []
        if block and not any(env[d].axis for d in dims if d != self.rec.time):
            ones = ", ".join("1" for _ in self.plan.regs)
            terms.append(f"tl.zeros([{ones}], dtype=tl.int32)")
        for i, d in enumerate(dims):
            stride = " * ".join(sizes[i + 1:])
            if d == self.rec.time and not time_env:
                if t_index is None:
                    continue
                idx = Idx(t_index, None, None)
            else:
                idx = env[d]
                if idx.mask and idx.mask not in masks:
                    masks.append(idx.mask)
            terms.append(f"{par(idx.expr)} * {stride}" if stride else idx.expr)
        off = " + ".join(terms) if terms else "0"
        return f"{arr} + {off}", (" & ".join(masks) if masks else None)

    # ---- expressions ----
    def varies(self, node: Node, env: Env) -> bool:
        key = (node, env.key)
        if key in self._varies:
            return self._varies[key]
        op = node.op
        if op is Op.INPUT:
            dims = self.rec.input(node.arg).dims
            v = self.rec.time in dims or any(env[d].tvar for d in dims)
        elif op in (Op.STATE, Op.PREV):
            v = True
        elif op is Op.IOTA:
            v = env[node.arg].tvar
        elif op in (Op.CONST, Op.SIZE):
            v = False
        elif op is Op.PARAM:
            v = self.varies(self.rec.let(node.arg).expr, env)
        elif op in (Op.GROUP, Op.FLIP):
            v = self.varies(node.src[0], self._remap(node, env))
        else:
            v = any(self.varies(s, env) for s in node.src)
        self._varies[key] = v
        return v

    def _remap(self, node: Node, env: Env) -> Env:
        if node.op is Op.GROUP:
            g, d = node.arg
            idx = env[d]
            if d in self.grouped and idx == env.base[d]:
                # the launcher keeps a block inside one group: one group index per program
                return env.with_(g, Idx(f"{self.pid[d]} * {self.block[d]} // ({self.size[d]} // "
                                        f"{self.size[g]})", None, None))
            return env.with_(g, Idx(f"{par(idx.expr)} // ({self.size[d]} // {self.size[g]})",
                                    idx.axis, idx.mask, idx.tvar))
        d = node.arg  # FLIP
        idx = env[d]
        return env.with_(d, Idx(f"{self.size[d]} - 1 - {par(idx.expr)}", idx.axis, idx.mask,
                                idx.tvar))

    def value(self, node: Node, env: Env) -> str:
        key = (node, env.key)
        if key not in self._memo:
            rotated = self._ring_invariant(node, env)
            self._memo[key] = (self._rotate(node, env, rotated) if rotated
                               else self._value(node, env))
        return self._memo[key]

    def _ring_invariant(self, node: Node, env: Env) -> list[str]:
        """The ring axes of ``node`` if it is time-invariant but for its ring-buffer indexing:
        then it is computed once in logical order and rotated per step in registers."""
        if self._step_key is None or env.key != self._step_key or node.op is Op.CONST:
            return []
        rings = [w for w in self.plan.rings if w in self.rec.dims_of(node)]
        if not rings or self.rec.uses_state(node) or self.varies(node, Env(env.base)):
            return []
        return rings

    def _rotate(self, node: Node, env: Env, rings: list[str]) -> str:
        x = self.value(node, Env(env.base))  # logical order = physical order before step 0
        if not _ATOM.match(x):
            x = self.bind(False, f"b_{node.op.value}", x)
        dims = set(self.rec.dims_of(node))
        shape = ", ".join(self.block[d] if d in dims else "1" for d in self.plan.regs)
        for w in rings:
            idx = f"tl.broadcast_to({env[w].expr}, [{shape}])"
            x = self.bind(True, "b_ring", f"tl.gather({x}, {idx}, axis={self.axis_of(w)})")
        return x

    def _value(self, node: Node, env: Env) -> str:
        op, a = node.op, node.arg
        tv = self.varies(node, env)
        if op is Op.INPUT:
            return self.load(a, env)
        if op is Op.STATE:
            return self.state_var[a]
        if op is Op.PREV:
            return self.prev_var[a]
        if op is Op.CONST:
            return number(a)
        if op is Op.SIZE:
            return f"{self.size[a]} * 1.0"
        if op is Op.IOTA:
            return f"{par(env[a].expr)}.to(tl.float32)"
        if op is Op.PARAM:
            s = self.value(self.rec.let(a).expr, env)
            return s if _ATOM.match(s) else self.bind(tv, f"b_{a}", s)
        if op in (Op.GROUP, Op.FLIP):
            return self.value(node.src[0], self._remap(node, env))
        if op in UNARY_RULES or op in BINARY_RULES or op is Op.CLAMP:
            expr = self._elementwise(node, env, tv)
            if self.parents.get(node, 0) > 1:
                return self.bind(tv, f"b_{op.value}", expr)
            return expr
        return DIM_RULES[op](self, node, env, tv)

    def _operands(self, node: Node, env: Env, template: str) -> list[str]:
        ops = []
        need = _NEED.get(template, ())
        for i, s in enumerate(node.src):
            v = self.value(s, env)
            if template.count("{%d}" % i) > 1 and not _ATOM.match(v):
                v = self.bind(self.varies(s, env), "b_x", v)
            if i < len(need) and self.prec(v) < need[i]:
                v = f"({v})"
            ops.append(v)
        return ops

    def par(self, s: str, need: int) -> str:
        """``s`` as an operand that needs precedence ``need`` (parenthesized if lower)."""
        return s if self.prec(s) >= need else f"({s})"

    def prec(self, s: str) -> int:
        return 4 if atomic(s) else self._prec.get(s, 0)

    def _elementwise(self, node: Node, env: Env, tv: bool) -> str:
        op = node.op
        if op is Op.CLAMP:
            x = self.value(node.src[0], env)
            lo, hi = node.arg
            if lo is not None:
                x = f"tl.maximum({x}, {number(lo)})"
            if hi is not None:
                x = f"tl.minimum({x}, {number(hi)})"
            return x
        x = self._expm1_arg(node)
        if x is not None:
            return self._expm1(node, x, env, tv)
        template, p = UNARY_RULES.get(op) or BINARY_RULES[op]
        out = template.format(*self._operands(node, env, template))
        self._prec[out] = p
        return out

    def _expm1_arg(self, node: Node) -> Node | None:
        """x if ``node`` is exp(x) - 1 (looking through lets), else None."""
        if node.op is not Op.SUB or node.src[1] != Node(Op.CONST, (), 1.0):
            return None
        e = node.src[0]
        while e.op is Op.PARAM:
            e = self.rec.let(e.arg).expr
        return e.src[0] if e.op is Op.EXP else None

    def _expm1(self, node: Node, x: Node, env: Env, tv: bool) -> str:
        # exp(x) - 1 cancels for small |x| in float32 (s4d's ZOH term (exp(dt A) - 1) / A);
        # Kahan: (u - 1) x / log(u), with u = exp(x) rounded, is accurate to a few ulps
        u = self.value(node.src[0], env)
        if not _ATOM.match(u):
            u = self.bind(tv, "b_exp", u)
        xs = self.value(x, env)
        if not _ATOM.match(xs):
            xs = self.bind(tv, "b_x", xs)
        return self.bind(tv, "b_expm1", f"tl.where(({u} == 1.0) | (tl.abs({xs}) > 0.5), "
                         f"tl.where({u} == 1.0, {xs}, {u} - 1.0), ({u} - 1.0) * {xs} / tl.log({u}))")

    # ---- leaves that touch memory ----
    def load(self, name: str, env: Env) -> str:
        inp = self.rec.input(name)
        dims = inp.dims
        key = ("load", name, tuple(env[d] for d in dims if d != self.rec.time))
        if key in self._memo:
            return self._memo[key]
        has_t = self.rec.time in dims
        tv_idx = any(env[d].tvar for d in dims if d != self.rec.time)
        p = self.names.ir("p_", name)
        b = self.names.ir("b_", name)
        if has_t and not tv_idx:  # a pointer that walks along time
            ptr, mask = self.pointer(self.arg[name], dims, env, None)
            self.pro.append(f"{p} = {ptr}")
            self.step.append(f"{p} += {self._time_stride(dims)}")
        else:
            ptr, mask = self.pointer(self.arg[name], dims, env, "i_t" if has_t else None)
            self.emit(has_t or tv_idx, f"{p} = {ptr}")
        m = f", mask={mask}, other=0.0" if mask else ""
        self.emit(has_t or tv_idx, f"{b} = tl.load({p}{m}).to(tl.float32)")
        self._memo[key] = b
        return b

    def _time_stride(self, dims) -> str:
        i = dims.index(self.rec.time)
        return " * ".join(self.size[d] for d in dims[i + 1:]) or "1"

    # ---- dim-structured rules ----
    def masked(self, x: str, dims, env: Env, fill: str) -> str:
        masks = [env[d].mask for d in dims if env[d].mask]
        if not masks:
            return x
        return f"tl.where({' & '.join(masks)}, {x}, {fill})"

    def reduce(self, fn: str, x: str, dims, env: Env, fill: str) -> str:
        x = self.masked(x, dims, env, fill)
        for d in sorted(dims, key=self.axis_of):
            x = f"tl.{fn}({x}, axis={self.axis_of(d)}, keep_dims=True)"
        return x

    # ---- the kernel ----
    def render_kernel(self) -> list[str]:
        rec, P = self.rec, self.plan
        self.pro: list[str] = []
        self.body: list[str] = []
        self.step: list[str] = []
        self._memo: dict = {}
        self._varies: dict = {}
        self._prec: dict = {}
        self._step_key = None
        base = Env(self._base_env())
        head = self._program_ids()
        R = len(P.regs)
        for j, d in enumerate(P.regs):
            ar = f"tl.arange(0, {self.block[d]})"
            if R > 1:
                ar += "[" + ", ".join(":" if i == j else "None" for i in range(R)) + "]"
            start = f"{self.pid[d]} * {self.block[d]} + " if d in P.split else ""
            head.append(f"{self.off[d]} = {start}{ar}")
        head += [f"{self.msk[d]} = {self.off[d]} < {self.size[d]}" for d in P.regs]
        # states, initial states
        init: list[str] = []
        for s in rec.states:
            shape = ", ".join(self.block[d] if d in s.dims else "1" for d in P.regs)
            v = self.state_var[s.name]
            init.append(f"{v} = tl.zeros([{shape}], dtype=tl.float32)")
            ptr, mask = self.pointer(self.h0[s.name], s.dims, base, None)
            m = f", mask={mask}, other=0.0" if mask else ""
            p = self.names.ir("p_", self.h0[s.name])
            init.append(f"if {self.use_h0[s.name]}:")
            init.append(f"    {p} = {ptr}")
            init.append(f"    {v} += tl.load({p}{m}).to(tl.float32)")
        # the step
        env = self._ring_env(base, "i_t + 1", True) if P.rings else base
        self._step_key = env.key if P.rings else None
        for name, v in self.prev_var.items():
            self.body.append(f"{v} = {self.state_var[name]}")
        for s in rec.states:
            t = s.transition
            self.body.append(f"# {s.name}: {format_transition(t)} + {format_expr(s.inject)}")
            TRANSITION_RULES[t.kind](self, s, env)
        for o in rec.outputs:
            self.body.append(f"# {o.name} = {format_expr(o.expr)}")
            oenv = env
            if o.name in self.summed:
                d, g = o.expr.arg
                v = self.value(o.expr.src[0], env)
                if d in P.split:  # a block lies inside one group (see the launcher)
                    v = self.reduce("sum", v, [d], env, "0.0")
                    first = f"{self.pid[d]} * {self.block[d]}"
                else:
                    first = self.pid[d]
                oenv = env.with_(g, Idx(f"{first} // ({self.size[d]} // {self.size[g]})",
                                        None, None))
            else:
                v = self.value(o.expr, env)
            odims = [d for d in o.dims]
            tv_idx = any(oenv[d].tvar for d in odims if d != rec.time)
            p = self.names.ir("p_", o.name)
            if tv_idx:
                ptr, mask = self.pointer(self.arg[o.name], odims, oenv, "i_t", block=True)
                self.body.append(f"{p} = {ptr}")
            else:
                ptr, mask = self.pointer(self.arg[o.name], odims, oenv, None, block=True)
                self.pro.append(f"{p} = {ptr}")
                self.step.append(f"{p} += {self._time_stride(odims)}")
            m = f", mask={mask}" if mask else ""
            if o.name in self.summed:
                self.body.append(f"tl.atomic_add({p}, {v}{m})")
            else:
                self.body.append(f"tl.store({p}, {self.par(v, 4)}.to({p}.dtype.element_ty){m})")
        # final states
        fin = [f"if {self.store_ht}:"]
        fenv = self._ring_env(base, self.size[rec.time], False) if P.rings else base
        for s in rec.states:
            ptr, mask = self.pointer(self.ht[s.name], s.dims, fenv, None, block=True)
            m = f", mask={mask}" if mask else ""
            p = self.names.ir("p_", self.ht[s.name])
            fin.append(f"    {p} = {ptr}")
            fin.append(f"    tl.store({p}, {self.state_var[s.name]}{m})")
        lines = head + self.pro + init
        lines.append(f"for i_t in range(0, {self.size[rec.time]}):")
        lines += ["    " + ln for ln in self.body + self.step]
        lines += fin
        return lines

    def _program_ids(self) -> list[str]:
        """Program axis 0: the grid dims, flattened; axis 1: the blocks of the split dims."""
        P = self.plan
        head: list[str] = []
        if P.grid:
            flat = (self.names.new("i_" + "_".join(P.grid)) if len(P.grid) > 1
                    else self.pid[P.grid[0]])
            head.append(f"{flat} = tl.program_id(0).to(tl.int64)")
            if len(P.grid) > 1:
                for i, d in enumerate(P.grid):
                    inner = " * ".join(self.size[e] for e in P.grid[i + 1:])
                    e = f"{flat} // {par(inner)}" if inner else flat
                    if i > 0:
                        e = f"({e}) % {self.size[d]}" if inner else f"{e} % {self.size[d]}"
                    head.append(f"{self.pid[d]} = {e}")
        if P.split:
            nb = {d: f"tl.cdiv({self.size[d]}, {self.block[d]})" for d in P.split}
            flat = self.names.new("i_blk") if len(P.split) > 1 else self.pid[P.split[0]]
            head.append(f"{flat} = tl.program_id(1).to(tl.int64)")  # offsets past 2^31
            if len(P.split) > 1:
                for i, d in enumerate(P.split):
                    inner = " * ".join(nb[e] for e in P.split[i + 1:])
                    e = f"{flat} // ({inner})" if inner else flat
                    if i > 0:
                        e = f"({e}) % {nb[d]}"
                    head.append(f"{self.pid[d]} = {e}")
        return head

    # ---- signature and launcher ----
    def runtime_sizes(self) -> list[str]:
        """Sizes passed at run time: the non-register dims the kernel body mentions."""
        text = "\n".join(self._body_lines)
        return [d.name for d in self.rec.dims if d.name not in self.const_sizes()
                and re.search(rf"\b{self.size[d.name]}\b", text)]

    def signature(self) -> tuple[list[str], list[str]]:
        """(runtime parameters, constexpr parameters) of the kernel, in order."""
        rec = self.rec
        params = [self.arg[i.name] for i in rec.inputs] + [self.arg[o.name] for o in rec.outputs]
        params += [self.h0[s.name] for s in rec.states] + [self.ht[s.name] for s in rec.states]
        params += [self.size[d] for d in self.runtime_sizes()]
        consts = [self.size[d] for d in self.const_sizes()]
        consts += [self.block[d] for d in self.plan.regs]
        consts += [self.use_h0[s.name] for s in rec.states] + [self.store_ht]
        return params, consts

    def const_sizes(self) -> list[str]:
        """Dims whose sizes are constexpr: the register dims (they shape blocks)."""
        return list(self.plan.regs)

    def block_size(self, d: str, n: int, sizes: dict | None = None) -> int:
        """The launcher's block for register dim ``d`` of size ``n`` (``sizes``: all dims)."""
        b = min(pow2(n), 64) if d in self.plan.split else pow2(n)
        for g in self.grouped.get(d, []):
            per = n // sizes[g]
            b = min(b, per & -per)
        return b

    def block_default(self, d: str) -> str:
        """The launcher's default block size for register dim ``d`` (an expression)."""
        npow = f"triton.next_power_of_2({self.size[d]})"
        return f"min({npow}, 64)" if d in self.plan.split else npow

    def compile_args(self, sizes: dict, dtype: str) -> tuple[dict, dict]:
        """(signature, constexprs) for compiling the kernel ahead of time with
        ``triton.compile(ASTSource(...))`` at ``sizes`` with ``dtype`` inputs and outputs (a
        check that the source compiles for a GPU, which needs none)."""
        self.render()
        ty = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[dtype]
        params, consts = self.signature()
        size_of = {v: sizes[d] for d, v in self.size.items()}
        sig, const = {}, {}
        for p in params:
            sig[p] = "i32" if p in size_of else (
                "*fp32" if p in self.h0.values() or p in self.ht.values() else ty)
        for c in consts:
            sig[c] = "constexpr"
            if c in size_of:
                const[c] = size_of[c]
            elif c in self.block.values():
                d = next(d for d, b in self.block.items() if b == c)
                const[c] = self.block_size(d, sizes[d], sizes)
            else:
                const[c] = True
        return sig, const

    def render_kernel_def(self) -> str:
        body = self._body_lines = self.render_kernel()
        params, consts = self.signature()
        out = ["@triton.jit", f"def {self.kernel_name}("]
        out += [f"    {p}," for p in params] + [f"    {c}: tl.constexpr," for c in consts]
        out += ["):"] + ["    " + ln for ln in body]
        return "\n".join(out) + "\n"

    def render_launcher(self) -> str:
        rec, P, N = self.rec, self.plan, self.names
        ins = [self.arg[i.name] for i in rec.inputs]
        init, final = N.new("initial_state"), N.new("output_final_state")
        blocks, warps = N.new("block_sizes"), N.new("num_warps")
        first = ins[0]
        lines = [f"def {self.launcher_name}({', '.join(ins)}, {init}=None, {final}=False, "
                 f"{blocks}=None, {warps}=4):",
                 f'    """Run {self.kernel_name}: inputs in their declared layouts (every dim',
                 "    present), initial states by name; returns (outputs by name, final states",
                 '    by name or None)."""']
        if len(ins) == 1:
            lines.append(f"    {first} = {first}.contiguous()")
        else:
            lines.append(f"    {', '.join(ins)} = " + ", ".join(f"{x}.contiguous()" for x in ins))
        known: set[str] = set()
        for d in rec.dims:
            if d.size is not None:
                lines.append(f"    {self.size[d.name]} = {int(d.size)}")
                known.add(d.name)
        for i in rec.inputs:
            new = [d for d in i.dims if d not in known]
            if not new:
                continue
            if len(new) == len(i.dims):
                lines.append(f"    {', '.join(self.size[d] for d in i.dims)}"
                             f"{',' if len(i.dims) == 1 else ''} = {self.arg[i.name]}.shape")
            else:
                for d in new:
                    pos = i.dims.index(d)
                    lines.append(f"    {self.size[d]} = {self.arg[i.name]}.shape[{pos}]")
            known |= set(new)
        lines.append(f"    {blocks} = {blocks} or {{}}")
        self.names_blocks = blocks
        for d in P.regs:
            if d in P.split:
                lines.append(f'    {self.block[d]} = {blocks}.get("{d}", {self.block_default(d)})')
                for g in self.grouped.get(d, []):
                    per = f"({self.size[d]} // {self.size[g]})"
                    lines.append(f"    {self.block[d]} = min({self.block[d]}, {per} & -{per})"
                                 "  # a block never straddles two groups")
            else:
                lines.append(f"    {self.block[d]} = {self.block_default(d)}")
        dev = f"{first}.device"
        for o in rec.outputs:
            shape = ", ".join(self.size[d] for d in o.dims)
            comma = "," if len(o.dims) == 1 else ""
            if o.name in self.summed:  # summed into by several programs: zeros, float32
                lines.append(f"    {self.arg[o.name]} = torch.zeros(({shape}{comma}), "
                             f"dtype=torch.float32, device={dev})")
            else:
                lines.append(f"    {self.arg[o.name]} = torch.full(({shape}{comma}), "
                             f'float("nan"), dtype={first}.dtype, device={dev})')
        lines.append(f"    {init} = {init} or {{}}")
        for s in rec.states:
            h0, ht = self.h0[s.name], self.ht[s.name]
            shape = ", ".join(self.size[d] for d in s.dims)
            comma = "," if len(s.dims) == 1 else ""
            lines.append(f'    {h0} = {init}.get("{s.name}")')
            lines.append(f"    if {h0} is not None:")
            lines.append(f"        {h0} = {h0}.to(device={dev}, dtype=torch.float32).contiguous()")
            lines.append(f'    {ht} = torch.full(({shape}{comma}), float("nan"), '
                         f"dtype=torch.float32, device={dev}) if {final} else None")
        g0 = " * ".join(self.size[d] for d in P.grid) or "1"
        g1 = " * ".join(f"triton.cdiv({self.size[d]}, {self.block[d]})" for d in P.split) or "1"
        lines.append(f"    grid = ({g0}, {g1})")
        params, consts = self.signature()
        args = params[:]
        args += [self.size[d] for d in self.const_sizes()] + [self.block[d] for d in P.regs]
        args += [f"{self.h0[s.name]} is not None" for s in rec.states] + [final]
        lines.append(f"    {self.kernel_name}[grid](")
        lines += [f"        {a}," for a in args]
        lines.append(f"        num_warps={warps},")
        lines.append("    )")
        outs = ", ".join(f'"{o.name}": {self.arg[o.name]}' + (
            f".to({first}.dtype)" if o.name in self.summed else "") for o in rec.outputs)
        fins = ", ".join(f'"{s.name}": {self.ht[s.name]}' for s in rec.states)
        lines.append(f"    return {{{outs}}}, ({{{fins}}} if {final} else None)")
        return "\n".join(lines) + "\n"

    def render(self) -> str:
        """The whole generated module: header, kernel, launcher."""
        if hasattr(self, "_source"):
            return self._source
        kernel = self.render_kernel_def()
        launcher = self.render_launcher()
        self._source = (module_header(self.rec, self.algorithm) + "\n\n" + kernel + "\n\n"
                        + launcher)
        return self._source


def module_header(rec: Recurrence, algorithm: str) -> str:
    ir = format_recurrence(rec).splitlines()
    # the IR text is printed from validated names and numbers; the doc comment is free text,
    # so anything but printable ASCII is replaced before it goes into a comment
    ir = ["".join(c if " " <= c <= "~" else "?" for c in ln) for ln in ir]
    return "\n".join(
        [f'"""{rec.name}: {algorithm} forward kernel generated by scancc (Triton backend).',
         "", "Generated code: edit the recurrence, not this file. The IR it was generated from:",
         '"""'] + [f"# {ln}".rstrip() for ln in ir]
        + ["import torch", "import triton", "import triton.language as tl"]) + "\n"


# ---- transition rules, keyed by transition kind: emit the update of one state ----

def _identity_rule(L: Lowering, s, env: Env):
    h = L.state_var[s.name]
    L.body.append(f"{h} = {h} + {L.par(L.value(s.inject, env), 2)}")


def _scalar_rule(L: Lowering, s, env: Env):
    h = L.state_var[s.name]
    a = L.par(L.value(s.transition.operand("decay"), env), 2)
    L.body.append(f"{h} = {a} * {h} + {L.par(L.value(s.inject, env), 2)}")


def _shift_rule(L: Lowering, s, env: Env):
    h, w = L.state_var[s.name], s.transition.axis
    b = L.value(s.inject, env)
    L.body.append(f"{h} = tl.where({L.off[w]} == i_t % {L.size[w]}, {b}, {h})")


def _companion_rule(L: Lowering, s, env: Env):
    h, w = L.state_var[s.name], s.transition.axis
    slot = L.bind(True, f"m_{s.name}_new", f"{L.off[w]} == i_t % {L.size[w]}")
    f = L.par(L.value(s.transition.operand("feedback"), env), 2)
    shifted = f"tl.where({slot}, 0.0, {h})"
    fb = L.reduce("sum", f"{f} * {shifted}", [w], env, "0.0")
    new = L.bind(True, f"b_{s.name}_new", f"{fb} + {L.par(L.value(s.inject, env), 2)}")
    L.body.append(f"{h} = tl.where({slot}, {new}, {h})")


def _householder_rule(L: Lowering, s, env: Env):
    h, ax = L.state_var[s.name], s.transition.axis
    t = s.transition
    k = L.value(t.operand("k"), env)
    if not _ATOM.match(k):
        k = L.bind(True, "b_hk", k)
    beta = L.par(L.value(t.operand("beta"), env), 2)
    kh = L.bind(True, f"b_{s.name}_k", L.reduce("sum", f"{k} * {h}", [ax], env, "0.0"))
    upd = f"{h} - {beta} * {k} * {kh}"
    if t.operand("alpha") is not None:
        upd = f"{L.par(L.value(t.operand('alpha'), env), 2)} * ({upd})"
    L.body.append(f"{h} = {upd} + {L.par(L.value(s.inject, env), 2)}")


def _dense_rule(L: Lowering, s, env: Env):
    h, ax, col = L.state_var[s.name], s.transition.axis, s.transition.col
    m = L.par(L.value(s.transition.operand("matrix"), env), 2)
    # h re-indexed along the column dim: a masked one-hot contraction over the axis
    one_hot = f"tl.where({L.off[ax]} == {L.off[col]}, {h}, 0.0)"
    hc = L.bind(True, f"b_{s.name}_col", L.reduce("sum", one_hot,
                                                   [ax], env, "0.0"))
    new = L.reduce("sum", f"{m} * {hc}", [col], env, "0.0")
    L.body.append(f"{h} = {new} + {L.par(L.value(s.inject, env), 2)}")


# adjoint steps, h = A^T (h + b): plain registers (no ring), the reverse shift a gather

def _plus_inject(L: Lowering, s, env: Env) -> str:
    h = L.state_var[s.name]
    return L.bind(True, f"b_{s.name}_in", f"{h} + {L.par(L.value(s.inject, env), 2)}")


def _reverse_shift(L: Lowering, s, x: str) -> str:
    """Slot i <- slot i - 1, slot 0 <- 0 (padding slots stay 0)."""
    w = s.transition.axis
    shape = ", ".join(L.block[d] if d in s.dims else "1" for d in L.plan.regs)
    idx = f"tl.broadcast_to(tl.maximum({L.off[w]} - 1, 0), [{shape}])"
    moved = f"tl.gather({x}, {idx}, axis={L.axis_of(w)})"
    return f"tl.where(({L.off[w]} == 0) | ({L.off[w]} >= {L.size[w]}), 0.0, {moved})"


def _shift_adjoint_rule(L: Lowering, s, env: Env):
    x = _plus_inject(L, s, env)
    L.body.append(f"{L.state_var[s.name]} = {_reverse_shift(L, s, x)}")


def _companion_adjoint_rule(L: Lowering, s, env: Env):
    w = s.transition.axis
    x = _plus_inject(L, s, env)
    f = L.par(L.value(s.transition.operand("feedback"), env), 2)
    last = L.reduce("sum", f"tl.where({L.off[w]} == {L.size[w]} - 1, {x}, 0.0)", [w], env, "0.0")
    z = L.bind(True, f"b_{s.name}_fb", f"{x} + {f} * {last}")
    L.body.append(f"{L.state_var[s.name]} = {_reverse_shift(L, s, z)}")


def _dense_adjoint_rule(L: Lowering, s, env: Env):
    ax, col = s.transition.axis, s.transition.col
    x = _plus_inject(L, s, env)
    m = L.par(L.value(s.transition.operand("matrix"), env), 2)
    # sum over the axis gives the new state indexed by the column dim; a one-hot contraction
    # re-indexes it along the axis
    by_col = L.bind(True, f"b_{s.name}_col", L.reduce("sum", f"{m} * {x}", [ax], env, "0.0"))
    one_hot = f"tl.where({L.off[ax]} == {L.off[col]}, {by_col}, 0.0)"
    L.body.append(f"{L.state_var[s.name]} = {L.reduce('sum', one_hot, [col], env, '0.0')}")


TRANSITION_RULES = {
    Kind.IDENTITY: _identity_rule,
    Kind.SCALAR: _scalar_rule,
    Kind.DIAGONAL: _scalar_rule,
    Kind.SHIFT: _shift_rule,
    Kind.COMPANION: _companion_rule,
    Kind.HOUSEHOLDER: _householder_rule,
    Kind.DENSE: _dense_rule,
    Kind.SHIFT_ADJOINT: _shift_adjoint_rule,
    Kind.COMPANION_ADJOINT: _companion_adjoint_rule,
    Kind.DENSE_ADJOINT: _dense_adjoint_rule,
}


# ---- rules for ops over a dim, keyed by IR op: return the value's name ----

def _sum_rule(L: Lowering, node: Node, env: Env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    return L.bind(tv, "b_sum", L.reduce("sum", x, node.arg, env, "0.0"))


def _max_rule(L: Lowering, node: Node, env: Env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    return L.bind(tv, "b_max", L.reduce("max", x, node.arg, env, 'float("-inf")'))


def _l2norm_rule(L: Lowering, node: Node, env: Env, tv: bool) -> str:
    x = L.value(node.src[0], env)
    if not _ATOM.match(x):
        x = L.bind(tv, "b_x", x)
    ss = L.reduce("sum", f"{x} * {x}", [node.arg], env, "0.0")
    return L.bind(tv, "b_l2norm", f"{x} / tl.sqrt({ss} + 1e-06)")


def _softmax_rule(L: Lowering, node: Node, env: Env, tv: bool) -> str:
    d = node.arg
    logits = L.value(node.src[0], env)
    keep = [m for m in [env[d].mask] if m]
    if len(node.src) > 1:
        keep.append(f"({L.par(L.value(node.src[1], env), 1)} != 0.0)")
    keep_s = " & ".join(keep) if keep else None
    z = f"tl.where({keep_s}, {logits}, float(\"-inf\"))" if keep_s else logits
    z = L.bind(tv, "b_logits", z)
    ax = L.axis_of(d)
    # a fully masked row has max -inf: shift by 0 there, and read nothing (weights 0)
    mx = L.bind(tv, "b_max", f"tl.max({z}, axis={ax}, keep_dims=True)")
    L.emit(tv, f"{mx} = tl.where({mx} == float(\"-inf\"), 0.0, {mx})")
    p = f"tl.exp({z} - {mx})"
    p = L.bind(tv, "b_p", f"tl.where({keep_s}, {p}, 0.0)" if keep_s else p)
    den = L.bind(tv, "b_den", f"tl.sum({p}, axis={ax}, keep_dims=True)")
    return L.bind(tv, "b_softmax", f"{p} / tl.where({den} == 0.0, 1.0, {den})")


DIM_RULES = {
    Op.SUM: _sum_rule,
    Op.MAX: _max_rule,
    Op.L2NORM: _l2norm_rule,
    Op.SOFTMAX: _softmax_rule,
}
