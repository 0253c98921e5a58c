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

from scancc.ir import Kind, Node, Op, Recurrence, format_recurrence
from scancc.ir.passes.canonical import canonicalize
from scancc.ir.printer import format_expr, format_transition

from ..base import UnsupportedError
from .emit import Env, Idx, atomic, number, par, pow2, prune_dead, simple
from .names import Names
from .plan import DENSE_TILE_ELEMENTS, TILE_ELEMENTS, Plan, plan, unsupported
from .rules import NEED, OP_RULES, TRANSITION_RULES

__all__ = ["Lowering", "Env", "Idx", "atomic", "number", "par", "pow2", "module_header"]


class Sizes(dict):
    """Dim -> the kernel's size parameter name; remembers which sizes the emitted kernel
    body mentions (``used``), so the signature takes exactly those as runtime parameters."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.used: set[str] = set()

    def __getitem__(self, d: str) -> str:
        self.used.add(d)
        return super().__getitem__(d)

class Lowering:
    """Renders the recurrent kernel and its launcher for one recurrence."""
    algorithm = "recurrent"
    scalar_groups = True  # blocks of a grouped split dim stay inside one group
    _step_key = None      # the env key of a step with ring buffers (see _ring_invariant)

    def __init__(self, rec: Recurrence, options):
        # self.ir: the IR as given (printed in the header and the comments); self.rec: its
        # canonical form, which the rules lower (exp(x) - 1 written expm1(x), ...)
        self.ir, self.rec, self.options = rec, canonicalize(rec), dict(options)
        self.plan: Plan = self.make_plan()
        self.names = self.make_names()
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
        self.size = Sizes({d.name: self.names.ir("", d.name, upper=True) for d in rec.dims})
        self.block = {d: self.names.ir("BLOCK_", d, upper=True) for d in self.plan.regs}
        self.state_var = {s.name: self.names.ir("b_", s.name) for s in rec.states}
        # states a readout (or a cascade) reads as they entered the step (prev): a register
        # copy per step
        read_prev = {n.arg for _, e in rec.exprs() for n in e.walk() if n.op is Op.PREV}
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
        # outputs summed over a partial dim (plan.partial): each program adds its part, the
        # same way
        part = set(self.plan.partial)
        self.summed |= {o.name for o in rec.outputs if any(
            n.op is Op.SUM and part & set(n.arg) for n in o.expr.walk())}
        self.parents = self._count_parents()

    def make_names(self) -> Names:
        return Names()

    def make_plan(self) -> Plan:
        return plan(self.rec, hold=tuple(sorted(self.options.get("block_sizes") or {})))

    # ---- checks ----
    def _check_rules(self):
        for where, root in self.rec.exprs():
            for n in root.walk():
                if n.op is Op.UNGROUP:  # its rule lowers it only as a whole output
                    if not (n is root and where.startswith("output")):
                        raise unsupported(self.rec, f"{where}: op 'ungroup' inside an expression "
                                          "(lowered only as a whole output)")
                    self._check_ungroup(where, n)
                try:
                    OP_RULES.lookup(n.op, self.rec.name)
                except UnsupportedError as e:
                    raise unsupported(self.rec, f"{where}: {e.feature}") from None
        read_prev = {n.arg for _, e in self.rec.exprs() for n in e.walk() if n.op is Op.PREV}
        for s in self.rec.states:
            if s.name in read_prev and s.transition.kind in (Kind.SHIFT, Kind.COMPANION):
                raise unsupported(self.rec, f"prev({s.name}): the state is a ring buffer "
                                  "(its previous value would need a second ring)")
            try:
                TRANSITION_RULES.lookup(s.transition.kind, self.rec.name)
            except UnsupportedError as e:
                raise unsupported(self.rec, f"state {s.name!r}: {e.feature}") from None

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

    # the first step of this kernel's time loop (None: step 0); a walking pointer starts there
    t_first: str | None = None

    def pointer(self, arr: str, dims, env: Env, t_index: str | None,
                block: bool = False, time_env: bool = False) -> tuple[str, str | None]:
        """(offset expression of ``arr`` in its contiguous ``dims`` layout, mask). ``block``:
        a block of pointers even where no register dim indexes it (stores of blocks).
        ``t_index`` None: the time index of the loop's first step (``t_first``)."""
        terms, masks = [], []
        if block and not any(env[d].axis for d in dims if d != self.rec.time):
            ones = ", ".join("1" for _ in self.plan.regs)
            terms.append(f"tl.zeros([{ones}], dtype=tl.int32)")
        for i, d in enumerate(dims):
            if d == self.rec.time and not time_env:
                if t_index is None and self.t_first is None:
                    continue
                idx = Idx(t_index or self.t_first, None, None)
            else:
                idx = env[d]
                if idx.mask and idx.mask not in masks:
                    masks.append(idx.mask)
            stride = " * ".join(self.size[e] for e in dims[i + 1:])  # mentions those sizes
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
        if not simple(x):
            x = self.bind(False, f"b_{node.op.value}", x)
        dims = set(self.rec.dims_of(node))
        shape = ", ".join(self.block[d] if d in dims else "1" for d in self.plan.regs)
        for w in rings:
            idx = f"tl.broadcast_to({env[w].expr}, [{shape}])"
            x = self.bind(True, "b_ring", f"tl.gather({x}, {idx}, axis={self.axis_of(w)})")
        return x

    def _value(self, node: Node, env: Env) -> str:
        rule = OP_RULES.lookup(node.op, self.rec.name)
        return rule(self, node, env, self.varies(node, env))

    def _operands(self, node: Node, env: Env, template: str) -> list[str]:
        ops = []
        need = NEED.get(template, ())
        for i, s in enumerate(node.src):
            v = self.value(s, env)
            if template.count("{%d}" % i) > 1 and not simple(v):
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
        # a grid dim reduced (a partial dim of the plan): this program's one index is its part
        dims = [d for d in dims if d in self.plan.regs]
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
        init = self.init_states(base)
        # the step
        env = self._ring_env(base, "i_t + 1", True) if P.rings else base
        self._step_key = env.key if P.rings else None
        for name, v in self.prev_var.items():
            self.body.append(f"{v} = {self.state_var[name]}")
        for s in rec.states:
            given = self.ir.state(s.name)
            self.body.append(f"# {s.name}: {format_transition(given.transition)} + "
                             f"{format_expr(given.inject)}")
            self.emit_transition(s, env)
        self.emit_outputs(env)
        fenv = self._ring_env(base, self.size[rec.time], False) if P.rings else base
        fin = self.final_states(fenv)
        lines = head + self.pro + init
        lines.append(self.time_loop())
        lines += ["    " + ln for ln in self.body + self.step]
        lines += fin
        return lines

    # ---- the parts of the kernel a subclass may change (scan.py: a chunk of steps) ----
    def init_states(self, base: Env) -> list[str]:
        """The state registers before the first step: zeros, plus the initial states."""
        init: list[str] = []
        for s in self.rec.states:
            shape = ", ".join(self.block[d] if d in s.dims else "1" for d in self.plan.regs)
            v = self.state_var[s.name]
            init.append(f"{v} = tl.zeros([{shape}], dtype=tl.float32)")
            ptr, mask = self.pointer(self.initial_buffer(s), s.dims, base, None)
            m = f", mask={mask}, other=0.0" if mask else ""
            p = self.names.ir("p_", self.h0[s.name])
            init.append(f"if {self.use_h0[s.name]}:")
            init.append(f"    {p} = {ptr}")
            init.append(f"    {v} += tl.load({p}{m}).to(tl.float32)")
        return init

    def initial_buffer(self, s) -> str:
        """The pointer the initial state of ``s`` is read from, at its first element."""
        return self.h0[s.name]

    def emit_transition(self, s, env: Env) -> None:
        TRANSITION_RULES.lookup(s.transition.kind, self.rec.name)(self, s, env)

    def time_loop(self) -> str:
        return f"for i_t in range(0, {self.size[self.rec.time]}):"

    def final_states(self, fenv: Env) -> list[str]:
        """Stores of the final states (``fenv``: indices after the last step)."""
        fin = [f"if {self.store_ht}:"]
        for s in self.rec.states:
            ptr, mask = self.pointer(self.ht[s.name], s.dims, fenv, None, block=True)
            m = f", mask={mask}" if mask else ""
            p = self.names.ir("p_", self.ht[s.name])
            fin.append(f"    {p} = {ptr}")
            fin.append(f"    tl.store({p}, {self.state_var[s.name]}{m})")
        return fin

    def emit_outputs(self, env: Env) -> None:
        rec, P = self.rec, self.plan
        for o in rec.outputs:
            given = next(x for x in self.ir.outputs if x.name == o.name)
            self.body.append(f"# {o.name} = {format_expr(given.expr)}")
            oenv = env
            v = self.value(o.expr, env)
            if o.expr.op is Op.UNGROUP:  # this program's part, added into its group's element
                d, g = o.expr.arg
                first = f"{self.pid[d]} * {self.block[d]}" if d in P.split else self.pid[d]
                oenv = env.with_(g, Idx(f"{first} // ({self.size[d]} // {self.size[g]})",
                                        None, None))
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
        """Sizes passed at run time: the non-register dims the kernel body mentions (recorded
        by ``self.size`` while the body was emitted)."""
        return [d.name for d in self.rec.dims if d.name not in self.const_sizes()
                and d.name in self._body_sizes]

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
        cap = self.tile_cap()
        if d in self.plan.split and cap and sizes is not None:
            whole = 1
            for e in self.plan.regs:
                if e not in self.plan.split:
                    whole *= pow2(sizes[e])
            b = min(b, max(1, cap // whole))
        for g in self.grouped.get(d, []):
            per = n // sizes[g]
            b = min(b, per & -per)
        return b

    def block_default(self, d: str) -> str:
        """The launcher's default block size for register dim ``d`` (an expression)."""
        # plain int arithmetic: triton.next_power_of_2 / triton.cdiv are constexpr functions,
        # whose host-side call costs ~10 us each (per launch, docs/performance/host-overhead.md)
        npow = f"1 << ({self.size[d]} - 1).bit_length()"
        if d not in self.plan.split:
            return npow
        whole = [f"(1 << ({self.size[e]} - 1).bit_length())" for e in self.plan.regs
                 if e not in self.plan.split]
        cap = self.tile_cap()
        if cap and whole:  # a tile of at most TILE_ELEMENTS / DENSE_TILE_ELEMENTS elements
            return f"min({npow}, 64, max(1, {cap} // ({' * '.join(whole)})))"
        return f"min({npow}, 64)"

    def tile_cap(self) -> int | None:
        """The most elements a split dim's block may make of the register dims' blocks
        (plan.py): TILE_ELEMENTS with partial dims, DENSE_TILE_ELEMENTS with a state whose
        transition has a column dim, else None (blocks of up to 64)."""
        caps = [TILE_ELEMENTS] if self.plan.partial else []
        if any(s.transition.col is not None for s in self.rec.states):
            caps.append(DENSE_TILE_ELEMENTS)
        return min(caps) if caps else None

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
        self.size.used.clear()
        body = prune_dead(self.render_kernel())
        self._body_sizes = frozenset(self.size.used)
        params, consts = self.signature()
        out = ["@triton.jit", f"def {self.kernel_name}("]
        out += [f"    {p}," for p in params] + [f"    {c}: tl.constexpr," for c in consts]
        out += ["):"] + ["    " + ln for ln in body]
        return "\n".join(out) + "\n"


    def launcher_prologue(self, ins: list[str], blocks: str) -> list[str]:
        """The launcher's first lines: contiguous inputs, each dim's size (fixed, or read from
        the first input that has it), the block-size mapping."""
        rec, first = self.rec, ins[0]
        if len(ins) == 1:
            lines = [f"    {first} = {first}.contiguous()"]
        else:
            lines = [f"    {', '.join(ins)} = " + ", ".join(f"{x}.contiguous()" for x in ins)]
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
        return lines
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
        lines += self.launcher_prologue(ins, blocks)
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
        g1 = " * ".join(f"-(-{self.size[d]} // {self.block[d]})" for d in P.split) or "1"  # cdiv
        lines += self.launch(g0, g1, final, warps)
        outs = ", ".join(f'"{o.name}": {self.arg[o.name]}' + (
            f".to({first}.dtype)" if o.name in self.summed else "") for o in rec.outputs)
        fins = ", ".join(f'"{s.name}": {self.ht[s.name]}' for s in rec.states)
        lines.append(f"    return {{{outs}}}, ({{{fins}}} if {final} else None)")
        return "\n".join(lines) + "\n"

    def launch(self, g0: str, g1: str, final: str, warps: str) -> list[str]:
        """The launcher's lines that launch the kernel on grid (``g0``, ``g1``)."""
        rec, P = self.rec, self.plan
        lines = [f"    grid = ({g0}, {g1})"]
        params, consts = self.signature()
        args = params[:]
        args += [self.size[d] for d in self.const_sizes()] + [self.block[d] for d in P.regs]
        args += [f"{self.h0[s.name]} is not None" for s in rec.states] + [final]
        lines.append(f"    {self.kernel_name}[grid](")
        lines += [f"        {a}," for a in args]
        lines.append(f"        num_warps={warps},")
        lines.append("    )")
        return lines

    def render(self) -> str:
        """The whole generated module: header, kernel, launcher."""
        if hasattr(self, "_source"):
            return self._source
        kernel = self.render_kernel_def()
        launcher = self.render_launcher()
        self._source = (module_header(self.ir, self.algorithm) + "\n\n" + kernel + "\n\n"
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
