"""The NKI emit step: write the kernel source for a plan (``plan.py``), looking up one rule per
IR op and per transition kind (``rules.py``).

Layout (decided by the plan): one *partition dim* ``pd`` goes on the 128 partitions (tiles of
up to 128, the ragged last tile by clipped slices), time goes on the free dim in tiles of ``TT``
steps, and every other dim is a trace-time Python loop: *outer* loops (dims every state and
output has) and *inner* loops inside the time tile; the loop order is outer > partition tile >
time tile, or the time tile outermost (carries kept per slot). Every value of an expression is
one of five kinds (``values.py``): const, pt (1, 1), row (1, TT), col (P, 1), full (P, TT).

Each node is lowered by its ``OP_RULES`` entry (broadcasts across partitions are a ones-row
``nc_matmul`` into PSUM; per-partition operands use ``tensor_scalar`` / the ``activation``
scale), placed in the outermost loop its indices allow (``ANALYSIS_RULES``), so loop-invariant
loads and math are hoisted (e.g. mamba's ``u`` and ``delta`` load once per channel tile and time
tile, not once per state index), and inputs indexed by inner loops load once as slabs. Each
state is lowered by its ``TRANSITION_RULES`` entry, or by the chunked matmul form
(``chunked.py``) where the plan chose it. The emitter records what it allocates (SBUF bytes
per partition) and transfers (DMA bytes), loop trip counts and variables, and the size
constants it reads, as data: nothing reads the generated text back.
"""
from __future__ import annotations

import math
from typing import Mapping

from scancc.ir import Node, Op, Recurrence, format_recurrence

from ..base import UnsupportedError
from .chunked import ChunkedMixin
from .plan import Plan, PlanError, Resources, Space, choose, plan_spaces
from .rules import ALU, ANALYSIS_RULES, OP_RULES, PY_BINARY, TRANSITION_RULES
from .values import BIG, KIND, NAME, Idx, Scope, V, fmt



class Renderer(ChunkedMixin):
    """The emit step: writes the kernel for a static plan (``plan.Space``), one time tile
    ``tt`` and loop order, recording what it allocates and transfers as data."""

    def __init__(self, space: Space, tt: int, initial_state: bool, final_state: bool,
                 time_outer: bool = False, cu: tuple[int, ...] | None = None,
                 step: bool = False):
        rec = space.rec
        # a decode step (step.py): one time step, no time loop (T must be 1)
        self.step = step
        # a packed variable-length batch (scancc/ir/segments.py): time tiles end at the
        # boundaries; every state resets at a sequence's first tile (varlen_reset)
        self.cu = cu
        self.space, self.rec, self.sizes, self.tt = space, rec, dict(space.sizes), tt
        # loop order: outer dims > partition tile > time tile, or time tile outermost (then
        # inputs shared by heads or channel tiles load once per time tile; carries for every
        # outer index and partition tile stay in SBUF)
        self.time_outer = time_outer
        self.dma_bytes = 0
        self.slot = "0"
        self.init, self.final = initial_state, final_state
        self.time = rec.time
        self.T = self.sizes[self.time]
        self.pd, self.outer = space.pd, space.outer
        self.summed = set(space.summed)  # outer dims the outputs that lack them sum over
        self.npd = self.sizes[self.pd]
        self.npt = -(-self.npd // 128)
        self.pe = min(self.npd, 128)                    # partitions of a typical tile
        self.twe = min(self.T, tt)                      # steps of a typical time tile
        self.n = 0
        self.sbuf_sites: list[int] = []
        self.storage_sites: list[int] = []  # the fixed tiles (plan.Space.storage): a subset
        self.used_sizes: set[str] = set()
        self.uses_math = False  # a trace-time constant calls math.*: the kernel imports it
        self.psum_next = 0
        self.PSUM_POOL = 4
        self.root = Scope(None, None, 0)
        self.sids = 1
        self.pd_scope = self.time_scope = None
        self.lets = {l.name: l.expr for l in rec.lets}
        # states read through prev(S): their trajectory keeps the entering state in column 0
        self.prevs = space.prevs
        self._an: dict = {}
        self._ones: set = set()
        self.chunks = space.chunks

    # ---- emission helpers ----
    def loop_var(self, name: str, sc: Scope) -> str:
        """``name``, or a fresh variant when an enclosing loop already binds it (a sum over
        a dim nested in a sum over the same dim must not clobber the outer index)."""
        bound = {s.var for s in sc.chain() if s.var}
        if name not in bound:
            return name
        k = 2
        while f"{name}{k}" in bound:
            k += 1
        return f"{name}{k}"

    def size_ref(self, d: str) -> str:
        """The kernel's name for the size of ``d`` (its ``N_d = ...`` line is emitted)."""
        self.used_sizes.add(d)
        return f"N_{d}"

    def fail(self, feature: str):
        raise UnsupportedError(NAME, self.rec.name, feature)

    def name(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, scope: Scope, line: str) -> None:
        scope.lines.append(line)

    def open(self, scope: Scope, header: str, trips: int, var: str) -> Scope:
        """A loop block ``header`` binding ``var``, run ``trips`` times per run of ``scope``."""
        s = Scope(scope, header, self.sids, trips, var)
        self.sids += 1
        return s

    def loop(self, scope: Scope, var: str, n: int) -> Scope:
        """``for var in range(n):`` inside ``scope``."""
        return self.open(scope, f"for {var} in range({n}):", n, var)

    def step_loop(self, scope: Scope) -> Scope:
        """The loop over the steps of the time tile (per-step transitions)."""
        if self.step:  # one decode step: no loop
            sc = self.open(scope, "if True:  # the one step", 1, "t")
            self.emit(sc, "t = 0")
            return sc
        return self.open(scope, "for t in range(tw):", 1, "t")

    def dma(self, scope: Scope, line: str, elems: int) -> None:
        """Emit a DMA; count its (fp32-sized) bytes times the loops around it for the plan."""
        self.dma_bytes += 4 * elems * scope.trips
        self.emit(scope, line)

    def close(self, s: Scope) -> None:
        s.parent.lines.append((s.header, s.lines))

    def alloc(self, scope: Scope, shape: tuple, per_partition: int, prefix: str = "v",
              dtype: str = "nl.float32", storage: bool = False) -> str:
        """A new SBUF tile; ``storage``: one of the fixed tiles the plan counts statically."""
        nm = self.name(prefix)
        self.sbuf_sites.append(per_partition)
        if storage:
            self.storage_sites.append(per_partition)
        self.emit(scope, f"{nm} = nl.ndarray(({', '.join(map(str, shape))}), dtype={dtype}, "
                         f"buffer=nl.sbuf)")
        return nm

    def fixed(self, *sites: int) -> None:
        """Allocation sites of fixed tiles (constants, carries, trajectories): the bytes per
        partition the plan also counts statically (``plan.Space.storage``)."""
        self.sbuf_sites += sites
        self.storage_sites += sites

    def alloc_named(self, scope: Scope, name: str, shape: tuple) -> None:
        """An fp32 SBUF tile named ``name`` (a state's trajectory, history or carry)."""
        self.fixed(4 * math.prod(shape[1:]))
        self.emit(scope, f"{name} = nl.ndarray(({', '.join(map(str, shape))}), "
                         "dtype=nl.float32, buffer=nl.sbuf)")

    def trajectory(self, s, scope: Scope) -> None:
        """``traj_S``: the state at every step of the tile, (rows, n, TT), one more column
        in front when prev(S) is read (the state entering the tile)."""
        rows = 128 if self.rows(s) == "P" else 1
        self.alloc_named(scope, f"traj_{s.name}",
                         (rows, self.n_inner(s), self.tt + (s.name in self.prevs)))

    def tile(self, scope: Scope, kind: str) -> V:
        shape = {"pt": (1, 1), "row": (1, self.tt), "col": (128, 1), "full": (128, self.tt)}[kind]
        return V(kind, self.alloc(scope, shape, 4 * shape[1]))

    def ones(self, dtype: str) -> str:
        """A (1, 128) ones row in ``dtype`` (the stationary of a partition broadcast, whose
        dtype must match the moving row's), made once at the kernel's top."""
        if dtype == "nl.float32":
            return "ones_row"
        name = "ones_" + dtype.split(".")[0].removeprefix("in_")
        if name not in self._ones:
            self._ones.add(name)
            self.sbuf_sites.append(4 * 128)
            self.emit(self.root, f"{name} = nl.ndarray((1, 128), dtype={dtype}, buffer=nl.sbuf)")
            self.emit(self.root, f"nisa.memset({name}, 1.0)")
        return name

    def psum_tile(self, scope: Scope, shape: tuple) -> str:
        nm = f"ps{self.psum_next % self.PSUM_POOL}"
        self.psum_next += 1
        self.emit(scope, f"{nm} = nl.ndarray(({', '.join(map(str, shape))}), dtype=nl.float32, "
                         f"buffer=nl.psum)")
        return nm

    # ---- analysis: kind and loop dependencies of a node under an env ----
    def env_key(self, node: Node, env: dict) -> tuple:
        ds = self.rec.dims_of(node)
        return (node, tuple((d, env[d]) for d in ds if d in env))

    def analyze(self, node: Node, env: dict) -> tuple[bool, bool, bool, frozenset]:
        """(varies along partitions, varies along time, is a trace-time constant, scopes)."""
        key = self.env_key(node, env)
        if key in self._an:
            return self._an[key]
        r = self._analyze(node, env)
        self._an[key] = r
        return r

    def _analyze(self, node: Node, env: dict):
        if node.op is Op.SUM and self.summed & set(node.arg):
            # a sum over a summed outer dim is this outer index's part (``reduce``)
            rest = tuple(d for d in node.arg if d not in self.summed)
            if not rest:
                return self.analyze(node.src[0], env)
            node = Node(Op.SUM, node.src, rest)
        return ANALYSIS_RULES.lookup(node.op, self.rec.name)(self, node, env)

    def gathers(self, node: Node, env: dict) -> bool:
        """A group whose index varies along the partitions (groups split a partition tile)."""
        g, d = node.arg
        rep = self.sizes[d] // self.sizes[g]
        return d == self.pd and self.sizes[g] > 1 and rep % 128 != 0

    def group_env(self, node: Node, env: dict) -> dict:
        g, d = node.arg
        rep = self.sizes[d] // self.sizes[g]
        sub = dict(env)
        if self.sizes[g] == 1:
            sub[g] = Idx("0", frozenset())
        elif d in env:
            sub[g] = Idx(f"({env[d].expr}) // {rep}", env[d].deps)
        elif d == self.pd and rep % 128 == 0:
            sub[g] = Idx(f"p0 // {rep}", frozenset({self.pd_scope.sid}))
        else:
            sub[g] = Idx("?", frozenset())  # gathered per group (see `gather`)
        return sub

    def gather(self, node: Node, env: dict, sc: Scope, info) -> V:
        """group(x, g, pd) with groups inside a partition tile: sum over g of a 0/1 partition
        selector (from iota) times x at group g, broadcast across partitions."""
        g, d = node.arg
        rep = self.sizes[d] // self.sizes[g]
        p, t, c, _ = info
        kind = KIND[(True, t)]
        acc = self.tile(sc, kind)
        self.emit(sc, f"nisa.memset({acc.view()}, 0.0)")
        loop = self.loop(sc, f"g_{g}", self.sizes[g])
        sub = {**env, g: Idx(f"g_{g}", frozenset({loop.sid}))}
        v = self.value(node.src[0], sub, loop)
        lo = self.selector(loop, f"g_{g}", rep)
        part = self.binary(Op.MUL, v, lo, loop)
        self.emit(loop, f"nisa.tensor_tensor({acc.view()}, {acc.view()}, "
                        f"{self.to_kind(part, kind, loop).view()}, nl.add)")
        self.close(loop)
        return acc

    def ungroup(self, node: Node, env: dict, sc: Scope, info) -> V:
        """ungroup(x, d, g): group j sums x over the rep = |d| / |g| elements of d that read
        group j (i // rep == j): a loop over them accumulating with tensor_tensor, or, with
        a single group and d on the partitions, the ones-column matmul of a sum over d."""
        d, g = node.arg
        rep = self.sizes[d] // self.sizes[g]
        if d == self.pd and self.sizes[g] == 1:
            return self.reduce(Node(Op.SUM, node.src, (d,)), env, sc, info)
        if d == self.pd and self.npd <= 128:
            return self.ungroup_partitions(node, env, sc)
        if d == self.pd or g == self.pd:
            self.fail(f"ungroup of {d!r} into {g!r} across the partition dim {self.pd!r}")
        j = env[g] if self.sizes[g] > 1 else Idx("0", frozenset())
        if rep == 1:
            return self.value(node.src[0], {**env, d: j}, sc)
        p, t, c, _ = info
        kind = "const" if c else KIND[(p, t)]
        if kind == "const":
            self.fail(f"ungroup of the constant expression over {d!r}")
        acc = self.tile(sc, kind)
        self.emit(sc, f"nisa.memset({acc.view()}, 0.0)")
        iv = self.loop_var(f"u_{d}", sc)
        loop = self.loop(sc, iv, rep)
        sub = {**env, d: Idx(f"({j.expr}) * {rep} + {iv}", j.deps | {loop.sid})}
        v = self.value(node.src[0], sub, loop)
        v = self.to_kind(v, kind, loop)
        self.emit(loop, f"nisa.tensor_tensor({acc.view()}, {acc.view()}, {v.view()}, nl.add)")
        self.close(loop)
        return acc

    def ungroup_partitions(self, node: Node, env: dict, sc: Scope) -> V:
        """ungroup(x, pd, g) at group j = env[g]: a matmul of x with the 0/1 column selecting
        the partitions p of group j ((p0 + p) // rep == j, from iota) sums them into a row."""
        d, g = node.arg
        rep = self.sizes[d] // self.sizes[g]
        j = env[g].expr
        x = self.value(node.src[0], env, sc)
        x = self.sbuf(self.to_kind(x, "full" if x.kind in ("row", "full") else "col", sc), sc)
        sel = self.selector(sc, f"({j})", rep)
        cols = "0:tw" if x.kind == "full" else "0:1"
        ps = self.psum_tile(sc, (1, self.tt if x.kind == "full" else 1))
        self.emit(sc, f"nisa.nc_matmul({ps}[0:1, {cols}], {sel.view()}, {x.view()})")
        out = self.tile(sc, "row" if x.kind == "full" else "pt")
        self.emit(sc, f"nisa.tensor_copy({out.view()}, {ps}[0:1, {cols}])")
        return out

    def selector(self, sc: Scope, group: str, rep: int) -> V:
        """A (P, 1) column, 1 on the partitions of group ``group`` (``rep`` elements each):
        where p0 + p - rep * group lies in [0, rep)."""
        pos, sel, hi = self.tile(sc, "col"), self.tile(sc, "col"), self.tile(sc, "col")
        self.emit(sc, f"nisa.iota({pos.view()}, [[0, 1]], offset=p0 - {rep} * {group}, "
                      "channel_multiplier=1)")
        self.emit(sc, f"nisa.tensor_scalar({sel.view()}, {pos.view()}, nl.greater_equal, 0.0)")
        self.emit(sc, f"nisa.tensor_scalar({hi.view()}, {pos.view()}, nl.greater_equal, "
                      f"{fmt(rep)})")
        self.emit(sc, f"nisa.tensor_tensor({sel.view()}, {sel.view()}, {hi.view()}, "
                      "nl.subtract)")
        return sel

    def flip_env(self, node: Node, env: dict) -> dict:
        d = node.arg
        if d == self.pd:
            self.fail(f"flip along the partition dim {d!r}")
        if d in self.outer and self.rec.uses_state(node.src[0]):
            # the carry and trajectory hold the current outer index only
            self.fail(f"flip along the outer dim {d!r} of a state-dependent value")
        sub = dict(env)
        sub[d] = Idx(f"{self.sizes[d] - 1} - ({env[d].expr})", env[d].deps)
        return sub

    def target(self, deps: frozenset, cur: Scope) -> Scope:
        for s in cur.chain():
            if s.sid in deps or s.parent is None:
                return s
        return self.root

    # ---- values ----
    def value(self, node: Node, env: dict, cur: Scope) -> V:
        p, t, c, deps = self.analyze(node, env)
        scope = self.target(deps, cur)
        key = self.env_key(node, env)
        for s in scope.chain():
            if key in s.memo:
                return s.memo[key]
        v = self._value(node, env, scope, (p, t, c, deps))
        if not v.psum:
            scope.memo[key] = v
        return v

    def _value(self, node: Node, env: dict, sc: Scope, info) -> V:
        return OP_RULES.lookup(node.op, self.rec.name)(self, node, env, sc, info)

    # kinds ordered by what they vary along
    def to_kind(self, v: V, kind: str, sc: Scope) -> V:
        """Broadcast ``v`` to ``kind`` (a superset of what it varies along)."""
        if v.kind == kind:
            return v
        if v.kind == "const":
            out = self.tile(sc, kind)
            self.emit(sc, f"nisa.memset({out.view()}, {v.ref})")
            return out
        if v.kind == "pt" and kind == "row":
            out = self.tile(sc, "row")
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, zeros[0:1, 0:tw], nl.add, "
                          f"{v.view()})")
            return out
        if v.kind == "pt":  # -> col (-> full): a ones-row matmul broadcasts across partitions
            ps = self.psum_tile(sc, (128, 1))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:P, 0:1], ones_row[0:1, 0:P], {v.view()})")
            col = self.tile(sc, "col")
            self.emit(sc, f"nisa.tensor_copy({col.view()}, {ps}[0:P, 0:1])")
            return self.to_kind(col, kind, sc)
        if v.kind == "row":  # -> full, in PSUM (consumed by the next instruction)
            ps = self.psum_tile(sc, (128, self.tt))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:P, 0:tw], {self.ones(v.dtype)}[0:1, 0:P], "
                          f"{v.view()})")
            return V("full", ps, psum=True)
        if v.kind == "col":
            out = self.tile(sc, "full")
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, zeros[0:P, 0:tw], nl.add, "
                          f"{v.view()})")
            return out
        raise AssertionError((v.kind, kind))

    def sbuf(self, v: V, sc: Scope) -> V:
        if not v.psum:
            return v
        out = self.tile(sc, v.kind)
        self.emit(sc, f"nisa.tensor_copy({out.view()}, {v.view()})")
        return out

    def binary(self, op: Op, a: V, b: V, sc: Scope, node: Node | None = None) -> V:
        alu = ALU[op]
        if a.kind == "const" and b.kind == "const":
            return V("const", PY_BINARY[op].format(a.ref, b.ref))
        if a.kind == "const" or b.kind == "const":
            c, x, rev = (a, b, True) if a.kind == "const" else (b, a, False)
            out = self.tile(sc, x.kind)
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, {x.view()}, nl.{alu}, {c.ref}"
                          + (", reverse0=True)" if rev else ")"))
            return out
        pa, ta = a.kind in ("col", "full"), a.kind in ("row", "full")
        pb, tb = b.kind in ("col", "full"), b.kind in ("row", "full")
        kind = KIND[(pa or pb, ta or tb)]
        # a per-partition operand of a time-varying tile: tensor_scalar with a (P, 1) vector
        for x, s, rev in ((a, b, False), (b, a, True)):
            if s.kind == "pt" and x.kind == "row" or s.kind == "col" and x.kind in ("row", "full"):
                x = self.to_kind(x, "full", sc) if s.kind == "col" else x
                out = self.tile(sc, kind)
                self.emit(sc, f"nisa.tensor_scalar({out.view()}, {x.view()}, nl.{alu}, "
                              f"{s.view()}" + (", reverse0=True)" if rev else ")"))
                return out
        a, b = self.to_kind(a, kind, sc), self.to_kind(b, kind, sc)
        if a.psum and b.psum:
            a = self.sbuf(a, sc)
        out = self.tile(sc, kind)
        self.emit(sc, f"nisa.tensor_tensor({out.view()}, {a.view()}, {b.view()}, nl.{alu})")
        return out

    def reduce(self, node: Node, env: dict, sc: Scope, info) -> V:
        op, dims = node.op, node.arg
        alu = "add" if op is Op.SUM else "maximum"
        if op is Op.SUM:  # over a summed outer dim: this outer index's part, added in store()
            dims = tuple(d for d in dims if d not in self.summed)
        loop_dims = [d for d in dims if d != self.pd]
        p, t, c, _ = info
        src_info = self.analyze(node.src[0], {**env, **{d: Idx("?", frozenset())
                                                        for d in loop_dims}})
        kind = "const" if src_info[2] else KIND[(src_info[0], src_info[1])]
        if loop_dims:
            if kind == "const":
                self.fail(f"{op.value} over {loop_dims} of a constant expression")
            acc = self.tile(sc, kind)
            self.emit(sc, f"nisa.memset({acc.view()}, {'0.0' if alu == 'add' else fmt(-BIG)})")
            inner, sub = sc, dict(env)
            for d in loop_dims:
                iv = self.loop_var(f"r_{d}", inner)
                inner = self.loop(inner, iv, self.sizes[d])
                sub[d] = Idx(iv, frozenset({inner.sid}), over=d)
            scopes = list(inner.chain())[:len(loop_dims)]
            v = self.value(node.src[0], sub, inner)
            if v.kind != kind:
                v = self.to_kind(v, kind, inner)
            self.emit(inner, f"nisa.tensor_tensor({acc.view()}, {acc.view()}, {v.view()}, "
                             f"nl.{alu})")
            for s in scopes:
                self.close(s)
        else:
            acc = self.value(node.src[0], env, sc)
        if self.pd in dims:
            if op is Op.MAX:
                self.fail(f"max over the partition dim {self.pd!r}")
            if self.npd > 128:
                self.fail(f"sum over the partition dim {self.pd!r} of size {self.npd} > 128")
            acc = self.sbuf(self.to_kind(acc, "full" if acc.kind in ("row", "full") else "col",
                                         sc), sc)
            cols = "0:tw" if acc.kind == "full" else "0:1"
            ps = self.psum_tile(sc, (1, self.tt if acc.kind == "full" else 1))
            self.emit(sc, f"nisa.nc_matmul({ps}[0:1, {cols}], ones_col[0:P, 0:1], {acc.view()})")
            out = self.tile(sc, "row" if acc.kind == "full" else "pt")
            self.emit(sc, f"nisa.tensor_copy({out.view()}, {ps}[0:1, {cols}])")
            return out
        return acc

    def softmax(self, node: Node, env: dict, sc: Scope) -> V:
        """softmax over a loop dim w at index env[w]; weight 0 where mask == 0."""
        w = node.arg
        if w == self.pd:
            self.fail(f"softmax over the partition dim {w!r}")
        logits, mask = node.src[0], (node.src[1] if len(node.src) > 1 else None)

        def masked(sub, scope):
            lv = self.value(logits, sub, scope)
            if mask is None:
                return lv, None
            mv = self.value(mask, sub, scope)
            keep = self.unary_keep(mv, scope)
            # masked logits: l + (keep - 1) * BIG, finite in fp32
            pen = self.binary(Op.MUL, self.binary(Op.SUB, keep, V("const", "1.0"), scope),
                              V("const", fmt(BIG)), scope)
            return self.binary(Op.ADD, lv, pen, scope), keep

        # the max and the sum do not depend on env[w]: place them outside the w loop
        base = {d: i for d, i in env.items() if d != w}
        p, t, c, deps = self.analyze(node, {**base, w: Idx("?", frozenset())})
        home = self.target(deps, sc)
        key = ("softmax", self.env_key(node, base))
        wts = None
        for s in home.chain():
            wts = s.memo.get(key, wts)
        if wts is None:
            # all the weights at once, outside any loop over w: (rows, |w|, cols)
            kind = KIND[(p, t)] if not c else "pt"
            m, tot = self.tile(home, kind), self.tile(home, kind)
            rows = 128 if kind in ("col", "full") else 1
            cols = self.tt if kind in ("row", "full") else 1
            nw = self.sizes[w]
            wname = self.alloc(home, (rows, nw, cols), 4 * nw * cols, "wts")
            self.emit(home, f"nisa.memset({m.view()}, {fmt(-BIG)})")
            self.emit(home, f"nisa.memset({tot.view()}, 0.0)")
            loop = self.loop(home, f"j_{w}", nw)
            sub = {**base, w: Idx(f"j_{w}", frozenset({loop.sid}), over=w)}
            x, _ = masked(sub, loop)
            self.emit(loop, f"nisa.tensor_tensor({m.view()}, {m.view()}, "
                            f"{self.to_kind(x, kind, loop).view()}, nl.maximum)")
            self.close(loop)
            loop = self.loop(home, f"j_{w}", nw)
            sub = {**base, w: Idx(f"j_{w}", frozenset({loop.sid}), over=w)}
            x, keep = masked(sub, loop)
            e = self.to_kind(self.exp_shift(x, m, keep, loop), kind, loop)
            slot = V(kind, wname, mid=f"j_{w}, ")
            self.emit(loop, f"nisa.tensor_copy({slot.view()}, {e.view()})")
            self.emit(loop, f"nisa.tensor_tensor({tot.view()}, {tot.view()}, {e.view()}, nl.add)")
            self.close(loop)
            self.emit(home, f"nisa.tensor_scalar({tot.view()}, {tot.view()}, nl.maximum, 1e-30)")
            loop = self.loop(home, f"j_{w}", nw)
            slot = V(kind, wname, mid=f"j_{w}, ")
            self.emit(loop, f"nisa.tensor_tensor({slot.view()}, {slot.view()}, {tot.view()}, "
                            "nl.divide)")
            self.close(loop)
            wts = (kind, wname)
            home.memo[key] = wts
        return V(wts[0], wts[1], mid=f"{env[w].expr}, ")

    def unary_keep(self, mv: V, sc: Scope) -> V:
        if mv.kind == "const":
            return V("const", f"(1.0 if {mv.ref} != 0.0 else 0.0)")
        out = self.tile(sc, mv.kind)
        self.emit(sc, f"nisa.tensor_scalar({out.view()}, {mv.view()}, nl.not_equal, 0.0)")
        return out

    def exp_shift(self, x: V, m: V, keep: V | None, sc: Scope) -> V:
        d = self.binary(Op.SUB, x, m, sc)
        e = self.tile(sc, d.kind) if d.kind != "const" else None
        if e is None:
            self.uses_math = True
            e = V("const", f"math.exp({d.ref})")
        else:
            self.emit(sc, f"nisa.activation({e.view()}, nl.exp, {d.view()})")
        return self.binary(Op.MUL, e, keep, sc) if keep is not None else e

    # ---- loads and stores ----
    def hbm_index(self, layout, env: dict, pd_slice: str, t_slice: str) -> str:
        parts = []
        for d in layout:
            if d == self.time:
                parts.append(t_slice)
            elif d == self.pd:
                parts.append(pd_slice)
            else:
                parts.append(env[d].expr)
        return ", ".join(parts)

    def load(self, node: Node, env: dict, sc: Scope) -> V:
        inp = self.rec.input(node.arg)
        haspd, hast = self.pd in inp.dims, self.time in inp.dims
        kind = KIND[(haspd, hast)]
        v = self.slab(inp, kind, env, sc)
        if v is not None:
            return v
        src = f"in_{inp.name}[{self.hbm_index(inp.dims, env, 'p0:p1', 't0:t1')}]"
        if kind == "row":  # in the input's dtype: a bf16 row broadcasts at bf16 matmul speed
            dt = f"in_{inp.name}.dtype"
            out = V("row", self.alloc(sc, (1, self.tt), 4 * self.tt, dtype=dt), dtype=dt)
        else:
            out = self.tile(sc, kind)
        if haspd and hast and inp.dims.index(self.time) < inp.dims.index(self.pd):
            self.transpose_load(inp, env, out, sc)
        else:
            elems = {"pt": 1, "row": self.twe, "col": self.pe, "full": self.pe * self.twe}[kind]
            self.dma(sc, f"nisa.dma_copy({out.view()}, {src})", elems)
        return out

    def slab(self, inp, kind: str, env: dict, sc: Scope) -> V | None:
        """Load an input over the dims its inner loops index, once, in an outer scope (e.g.
        mamba's A[:, n] for every n once per channel tile, not once per time tile); the value
        is then a view of the slab. None when that would not move the load out of a loop."""
        loops = {}
        for d in inp.dims:
            if d in (self.pd, self.time):
                continue
            ix = env[d]
            if len(ix.deps) == 1 and ix.over == d:  # the loop variable of a loop over d
                loops[d] = ix
        rest = frozenset().union(*(env[d].deps for d in inp.dims if d in env and d not in loops))
        rest |= frozenset({self.pd_scope.sid} if self.pd in inp.dims else ())
        rest |= frozenset({self.time_scope.sid} if self.time in inp.dims else ())
        home = self.target(rest, sc)
        inside = {s.sid for s in sc.chain()} - {s.sid for s in home.chain()}
        slab_dims = tuple(d for d in inp.dims if d in loops and loops[d].deps & inside)
        if not slab_dims:
            return None
        order = [d for d in inp.dims if d == self.pd or d in slab_dims or d == self.time]
        want = ([self.pd] if self.pd in inp.dims else []) + list(slab_dims) + \
            ([self.time] if self.time in inp.dims else [])
        n = math.prod(self.sizes[d] for d in slab_dims)
        cols = self.tt if kind in ("row", "full") else 1
        if 4 * n * cols > 32768:
            return None
        key = ("slab", inp.name, tuple((d, env[d]) for d in inp.dims
                                       if d in env and d not in slab_dims))
        name = None
        for s in home.chain():
            name = s.memo.get(key, name)
        if name is None:
            rows = 128 if kind in ("col", "full") else 1
            dims = tuple(self.sizes[d] for d in slab_dims)
            dt = f"in_{inp.name}.dtype" if kind == "row" else "nl.float32"
            name = self.alloc(home, (rows,) + dims + (cols,), 4 * n * cols, "slab", dtype=dt)
            per = (self.pe if rows == 128 else 1) * (self.twe if cols > 1 else 1)
            if order == want:  # one DMA for the whole slab
                full = {**env, **{d: Idx(f"0:{self.sizes[d]}", frozenset()) for d in slab_dims}}
                src = f"in_{inp.name}[{self.hbm_index(inp.dims, full, 'p0:p1', 't0:t1')}]"
                r = "0:P" if rows == 128 else "0:1"
                c = "0:tw" if cols > 1 else "0:1"
                mid = "".join(f"0:{k}, " for k in dims)
                self.dma(home, f"nisa.dma_copy({name}[{r}, {mid}{c}], {src})", n * per)
            else:  # one load per slab index (transposed on the Tensor engine if time-major)
                inner, sub, scopes = self.inner_loops(home, slab_dims, env, "l")
                slot = V(kind, name, mid="".join(f"l_{d}, " for d in slab_dims))
                if kind == "full" and inp.dims.index(self.time) < inp.dims.index(self.pd):
                    self.transpose_load(inp, sub, slot, inner)
                else:
                    src = f"in_{inp.name}[{self.hbm_index(inp.dims, sub, 'p0:p1', 't0:t1')}]"
                    self.dma(inner, f"nisa.dma_copy({slot.view()}, {src})", per)
                self.closeall(scopes)
            home.memo[key] = name
        return V(kind, name, mid="".join(f"{env[d].expr}, " for d in slab_dims),
                 dtype=f"in_{inp.name}.dtype" if kind == "row" else "nl.float32")

    def transpose_load(self, inp, env: dict, out: V, sc: Scope) -> None:
        """[time, pd] in HBM -> (P, tw): DMA 128-step chunks, transpose on the Tensor engine."""
        loop = self.open(sc, "for c0 in range(0, tw, 128):", -(-self.twe // 128), "c0")
        self.emit(loop, "c1 = min(c0 + 128, tw)")
        # staged in the input's dtype: a bf16 transpose runs at bf16 speed, into fp32 PSUM
        stage = self.alloc(loop, (128, 128), 512, "stage", dtype=f"in_{inp.name}.dtype")
        src = f"in_{inp.name}[{self.hbm_index(inp.dims, env, 'p0:p1', 't0 + c0:t0 + c1')}]"
        self.dma(loop, f"nisa.dma_copy({stage}[0:c1 - c0, 0:P], {src})",
                 self.pe * min(128, self.twe))
        ps = self.psum_tile(loop, (128, 128))
        self.emit(loop, f"nisa.nc_transpose({ps}[0:P, 0:c1 - c0], {stage}[0:c1 - c0, 0:P])")
        self.emit(loop, f"nisa.tensor_copy({out.view('c0:c1')}, {ps}[0:P, 0:c1 - c0])")
        self.close(loop)

    def accumulate(self, o, env: dict, src: str, dst: str, sc: Scope, elems: int,
                   shape: tuple, sl: str) -> None:
        """Store the tile view ``src`` into ``dst``; when ``o`` lacks a summed outer dim,
        only the first outer index stores, the others add their part to what is there (a DMA
        back into a ``shape`` tile, viewed ``[sl]``, one add)."""
        acc = [d for d in self.rec.canonical if d in self.summed and d not in o.dims]
        if not acc:
            self.dma(sc, f"nisa.dma_copy({dst}, {src})", elems)
            return
        first = " and ".join(f"{env[d].expr} == 0" for d in acc)
        yes = self.open(sc, f"if {first}:", 1, "")
        self.dma(yes, f"nisa.dma_copy({dst}, {src})", elems)
        self.close(yes)
        no = self.open(sc, "else:", 1, "")
        part = f"{self.alloc(no, shape, 4 * shape[1], 'part')}[{sl}]"
        self.dma(no, f"nisa.dma_copy({part}, {dst})", elems)
        self.emit(no, f"nisa.tensor_tensor({part}, {part}, {src}, nl.add)")
        self.dma(no, f"nisa.dma_copy({dst}, {part})", elems)
        self.close(no)

    def store(self, o, env: dict, v: V, sc: Scope) -> None:
        if self.pd not in o.dims:  # a row: the partition dim was reduced in this one tile
            if v.kind in ("col", "full"):
                self.fail(f"output {o.name!r} varies along the partition dim {self.pd!r}")
            v = self.sbuf(self.to_kind(v, "row", sc), sc)
            dst = f"out_{o.name}[{self.hbm_index(o.dims, env, '', 't0:t1')}]"
            self.accumulate(o, env, v.view(), dst, sc, self.twe, (1, self.tt), "0:1, 0:tw")
            return
        v = self.sbuf(self.to_kind(v, "full", sc), sc)
        dst = f"out_{o.name}[{self.hbm_index(o.dims, env, 'p0:p1', 't0:t1')}]"
        if o.dims.index(self.time) < o.dims.index(self.pd):
            loop = self.open(sc, "for c0 in range(0, tw, 128):", -(-self.twe // 128), "c0")
            self.emit(loop, "c1 = min(c0 + 128, tw)")
            ps = self.psum_tile(loop, (128, 128))
            self.emit(loop, f"nisa.nc_transpose({ps}[0:c1 - c0, 0:P], {v.view('c0:c1')})")
            stage = self.alloc(loop, (128, 128), 512, "stage")
            self.emit(loop, f"nisa.tensor_copy({stage}[0:c1 - c0, 0:P], {ps}[0:c1 - c0, 0:P])")
            dst = f"out_{o.name}[{self.hbm_index(o.dims, env, 'p0:p1', 't0 + c0:t0 + c1')}]"
            self.accumulate(o, env, f"{stage}[0:c1 - c0, 0:P]", dst, loop,
                            self.pe * min(128, self.twe), (128, 128), "0:c1 - c0, 0:P")
            self.close(loop)
        else:
            self.accumulate(o, env, v.view(), dst, sc, self.pe * self.twe, (128, self.tt),
                            "0:P, 0:tw")

    # ---- states ----
    def inner_dims(self, s) -> tuple[str, ...]:
        return self.space.inner_dims(s)

    def flat_index(self, s, env: dict) -> str:
        terms, stride = [], 1
        for d in reversed(self.inner_dims(s)):
            terms.append(env[d].expr if stride == 1 else f"({env[d].expr}) * {stride}")
            stride *= self.sizes[d]
        return " + ".join(reversed(terms)) if terms else "0"

    def flat_of(self, dims, env: dict) -> str:
        terms, stride = [], 1
        for d in reversed(dims):
            terms.append(env[d].expr if stride == 1 else f"({env[d].expr}) * {stride}")
            stride *= self.sizes[d]
        return " + ".join(reversed(terms)) if terms else "0"

    def n_inner(self, s) -> int:
        return math.prod(self.sizes[d] for d in self.inner_dims(s))

    def rows(self, s) -> str:
        return "P" if self.pd in s.dims else "1"

    def inner_loops(self, sc: Scope, dims, env: dict, prefix: str = "i"):
        scopes, sub = [], dict(env)
        for d in dims:
            sc = self.loop(sc, f"{prefix}_{d}", self.sizes[d])
            scopes.append(sc)
            sub[d] = Idx(f"{prefix}_{d}", frozenset({sc.sid}), over=d)
        return sc, sub, scopes

    def closeall(self, scopes) -> None:
        for s in reversed(scopes):
            self.close(s)

    def materialize(self, nodes, dims, env: dict, sc: Scope, rows: str,
                    into=None) -> list[str]:
        """Operands as (128, prod(dims), TT) fp32 tiles, broadcast over what they lack; one
        loop nest for all, so what they share (e.g. k in k and beta * k * v) loads once.
        ``into``: [(tile, columns)] to write instead of new tiles."""
        n = math.prod(self.sizes[d] for d in dims)
        names = [nm for nm, _ in into] if into else [
            self.alloc(sc, (128 if rows == "P" else 1, n, self.tt), 4 * n * self.tt, "op",
                       storage=True)
            for _ in nodes]
        cols = [c for _, c in into] if into else ["0:tw"] * len(nodes)
        inner, sub, scopes = self.inner_loops(sc, dims, env, "m")
        terms, stride = [], 1
        for d in reversed(dims):
            terms.append(sub[d].expr if stride == 1 else f"{sub[d].expr} * {stride}")
            stride *= self.sizes[d]
        f = " + ".join(reversed(terms)) if terms else "0"
        for nm, node, c in zip(names, nodes, cols):
            v = self.value(node, sub, inner)
            v = self.to_kind(v, "full" if rows == "P" else "row", inner)
            self.emit(inner, f"nisa.tensor_copy({nm}[0:{rows}, {f}, {c}], {v.view()})")
        self.closeall(scopes)
        return names

    # ---- the kernel ----
    def render(self) -> str:
        rec = self.rec
        top = self.root
        args = [f"in_{i.name}" for i in rec.inputs]
        if self.init:
            args += [f"init_{s.name}" for s in rec.states]
        sz = self.sizes
        # the IR as comments: splitlines() leaves no way out of a comment line; the doc is free
        # text, so anything but printable ASCII is replaced (as Triton's module header does)
        hdr = ["".join(c if " " <= c <= "~" else "?" for c in h)
               for h in format_recurrence(self.space.source or rec).rstrip().splitlines()]
        lines = ["# NKI kernel generated by scancc, for the fixed sizes listed below, from this "
                 "recurrence:", "#"]
        lines += [("#   " + h).rstrip() for h in hdr]
        lines += ["#",
                  f"# Layout: {self.pd} on the partitions (tiles of 128), time on the free dim "
                  f"(tiles of {self.tt}),",
                  f"# loops over [{', '.join(self.outer)}] outside the partition tile, the other "
                  "dims inside the time tile.",
                  "# Sizes (fixed in this kernel; other sizes render another): "
                  + ", ".join(f"{d}={sz[d]}" for d in (rec.time,) + rec.canonical),
                  "import nki", "import nki.isa as nisa",
                  "import nki.language as nl", "", "",
                  "@nki.jit", f"def {self.kernel_name()}({', '.join(args)}):"]
        for o in rec.outputs:
            shape = ", ".join(self.size_ref(d) for d in o.dims)
            self.emit(top, f"out_{o.name} = nl.ndarray(({shape},), dtype=in_{rec.inputs[0].name}"
                           ".dtype, buffer=nl.shared_hbm)")
        if self.cu is not None:
            self.varlen_check()
        if self.final:
            for s in rec.states:
                shape = ", ".join(str(len(self.cu) - 1) if self.cu is not None
                                  and d == self.varlen_batch() else self.size_ref(d)
                                  for d in s.dims)
                self.emit(top, f"final_{s.name} = nl.ndarray(({shape},), dtype=nl.float32, "
                               "buffer=nl.shared_hbm)")
        self.emit(top, "# constants: zeros (broadcast source), ones (partition broadcast/sum)")
        self.fixed(4 * self.tt, 4 * 128, 4)
        self.emit(top, f"zeros = nl.ndarray((128, {self.tt}), dtype=nl.float32, buffer=nl.sbuf)")
        self.emit(top, "nisa.memset(zeros, 0.0)")
        self.emit(top, "ones_row = nl.ndarray((1, 128), dtype=nl.float32, buffer=nl.sbuf)")
        self.emit(top, "nisa.memset(ones_row, 1.0)")
        self.emit(top, "ones_col = nl.ndarray((128, 1), dtype=nl.float32, buffer=nl.sbuf)")
        self.emit(top, "nisa.memset(ones_col, 1.0)")
        if self.chunks:
            self.chunk_constants(top)
        nslots = math.prod(self.sizes[d] for d in self.outer) * self.npt \
            if self.time_outer else 1
        if self.time_outer:  # carries for every outer index and partition tile, up front
            self.alloc_carries(top, nslots)
            if self.init and self.cu is None:
                pdl, env, scopes = self.pd_loops(top)
                self.init_carries(pdl, env)
                self.closeall(scopes)
            tl = self.time_loop(top)
            pdl, env, scopes = self.pd_loops(tl)
            body = pdl
        else:
            pdl, env, scopes = self.pd_loops(top)
            self.alloc_carries(pdl, nslots)
            if self.cu is None:
                self.init_carries(pdl, env)
            tl = self.time_loop(pdl)
            body = tl
        self.time_scope, self.pd_scope = tl, pdl
        if self.cu is not None:
            self.varlen_reset(body, env)
        for s in rec.states:
            if s.name in self.chunks:
                self.chunk_state(s, self.chunks[s.name], env, body)
                continue
            TRANSITION_RULES.lookup(s.transition.kind, rec.name)(self, s, env, body)
        for o in rec.outputs:
            dims = tuple(d for d in rec.canonical if d in o.dims and d != self.pd
                         and d not in self.outer)
            inner, sub, oscopes = self.inner_loops(body, dims, env, "o")
            self.store(o, sub, self.value(o.expr, sub, inner), inner)
            self.closeall(oscopes)
        if self.cu is not None and self.final:
            self.varlen_final(body, env)
        if self.time_outer:
            self.closeall(scopes)
            self.close(tl)
            if self.final and self.cu is None:
                pdl, env, scopes = self.pd_loops(top)
                self.final_carries(pdl, env)
                self.closeall(scopes)
        else:
            self.close(tl)
            if self.final and self.cu is None:
                self.final_carries(pdl, env)
            self.closeall(scopes)
        rets = [f"out_{o.name}" for o in rec.outputs]
        if self.final:
            rets += [f"final_{s.name}" for s in rec.states]
        self.emit(top, f"return {', '.join(rets)}" + ("," if len(rets) == 1 else ""))
        # the size constants the kernel reads, first (recorded as data while emitting)
        top.lines[0:0] = [f"N_{d} = {sz[d]}" for d in (rec.time,) + rec.canonical
                          if d in self.used_sizes]
        body = []
        self.flatten(top.lines, 1, body)
        if self.uses_math:  # constants folded at trace time
            lines.insert(lines.index("import nki"), "import math\n")
        return "\n".join(lines + body) + "\n"

    def pd_loops(self, sc: Scope):
        """The outer loops and the partition-tile loop: (innermost scope, env, scopes)."""
        inner, env, scopes = self.inner_loops(sc, self.outer, {}, "i")
        pdl = self.open(inner, f"for p0 in range(0, {self.size_ref(self.pd)}, 128):", self.npt,
                        "p0")
        scopes.append(pdl)
        self.emit(pdl, f"p1 = min(p0 + 128, {self.size_ref(self.pd)})")
        self.emit(pdl, "P = p1 - p0")
        if self.time_outer:
            flat, stride = [], self.npt
            for d in reversed(self.outer):
                flat.append(f"{env[d].expr} * {stride}")
                stride *= self.sizes[d]
            self.slot = "slot"
            self.emit(pdl, "slot = " + " + ".join(reversed(flat + ["p0 // 128"]))
                      if flat else "slot = p0 // 128")
        return pdl, env, scopes

    def time_loop(self, sc: Scope) -> Scope:
        if self.step:  # a decode step: one step, no time loop
            tl = self.open(sc, "if True:  # one decode step: no time loop", 1, "t0")
            self.emit(tl, "t0 = 0")
            self.emit(tl, "t1 = 1")
            self.emit(tl, "tw = 1")
            return tl
        if self.cu is not None:  # tiles of at most tt steps that never cross a boundary
            tiles = self.varlen_tiles()
            self.emit(self.root, f"TILES = {tiles!r}  # (t0, t1, sequence starting at t0 or "
                                 "-1, sequence ending at t1 or -1)")
            tl = self.open(sc, "for t0, t1, n_start, n_end in TILES:", len(tiles), "t0")
            self.emit(tl, "tw = t1 - t0")
            return tl
        tl = self.open(sc, f"for t0 in range(0, {self.size_ref(self.time)}, {self.tt}):",
                       -(-self.T // self.tt), "t0")
        self.emit(tl, f"t1 = min(t0 + {self.tt}, {self.size_ref(self.time)})")
        self.emit(tl, "tw = t1 - t0")
        return tl

    def alloc_carries(self, sc: Scope, nslots: int) -> None:
        for s in self.rec.states:
            if s.name in self.chunks:  # a (K, V) tile: K on the partitions
                shape, rows = (128, nslots, self.pe), f"0:{self.sizes[self.chunks[s.name].kd]}"
            else:
                r = self.rows(s)
                shape, rows = (128 if r == "P" else 1, nslots, self.n_inner(s)), f"0:{r}"
            self.fixed(4 * shape[1] * shape[2])
            self.emit(sc, f"carry_{s.name} = nl.ndarray({shape}, dtype=nl.float32, "
                          "buffer=nl.sbuf)")
            if not self.init:
                full = rows.replace("0:P", "0:128") if self.time_outer else rows
                self.emit(sc, f"nisa.memset(carry_{s.name}[{full}, 0:{nslots}, 0:{shape[2]}], "
                              "0.0)")

    def init_carries(self, sc: Scope, env: dict) -> None:
        if not self.init:
            return
        for s in self.rec.states:
            if s.name in self.chunks:
                self.chunk_state_dma(s, self.chunks[s.name], env, sc, load=True)
            else:
                self.state_dma(s, env, sc, load=True)

    def final_carries(self, sc: Scope, env: dict) -> None:
        for s in self.rec.states:
            if s.name in self.chunks:
                self.chunk_state_dma(s, self.chunks[s.name], env, sc, load=False)
            else:
                self.state_dma(s, env, sc, load=False)

    def state_dma(self, s, env: dict, sc: Scope, load: bool) -> None:
        """initial state HBM -> carry, or carry -> final state HBM, one DMA per state row."""
        inner, sub, scopes = self.inner_loops(sc, self.inner_dims(s), env, "s")
        f = self.flat_index(s, sub)
        r = self.rows(s)
        hbm = f"{'init' if load else 'final'}_{s.name}[{self.hbm_index(s.dims, sub, 'p0:p1', '')}]"
        tile = f"carry_{s.name}[0:{r}, {self.slot}, {f}:{f} + 1]"
        self.emit(inner, f"nisa.dma_copy({tile}, {hbm})" if load
                  else f"nisa.dma_copy({hbm}, {tile})")
        self.closeall(scopes)

    # ---- packed variable-length batches: the reset, in one place for every kind ----
    def varlen_batch(self) -> str | None:
        return next((d.name for d in self.rec.dims if d.role == "batch"), None)

    def varlen_check(self) -> None:
        b = self.varlen_batch()
        if b is None or b not in self.outer:
            self.fail("packed varlen: needs the batch dim as an outer loop")

    def varlen_tiles(self) -> tuple:
        tiles = []
        for n in range(len(self.cu) - 1):
            a, e = self.cu[n], self.cu[n + 1]
            for t0 in range(a, e, self.tt):
                t1 = min(t0 + self.tt, e)
                tiles.append((t0, t1, n if t0 == a else -1, n if t1 == e else -1))
        return tuple(tiles)

    def varlen_env(self, env: dict, var: str) -> dict:
        """``env`` with the batch dim at sequence ``var`` (initial and final states: N rows)."""
        return {**env, self.varlen_batch(): Idx(var, frozenset())}

    def varlen_reset(self, body: Scope, env: dict) -> None:
        """Before a sequence's first step, every carry is *replaced* (a DMA or a memset, never
        a multiply) by the sequence's initial state or zeros."""
        sc = self.open(body, "if n_start >= 0:  # a sequence starts: reset every state", 1, "")
        for s in self.rec.states:
            cp = self.chunks.get(s.name)  # a chunked state's carry: (K, V), K on partitions
            if self.init and cp is not None:
                self.chunk_state_dma(s, cp, self.varlen_env(env, "n_start"), sc, load=True)
            elif self.init:
                self.state_dma(s, self.varlen_env(env, "n_start"), sc, load=True)
            elif cp is not None:
                self.emit(sc, f"nisa.memset(carry_{s.name}[0:{self.sizes[cp.kd]}, "
                              f"{self.slot}, 0:P], 0.0)")
            else:
                r = self.rows(s)
                self.emit(sc, f"nisa.memset(carry_{s.name}[0:{r}, {self.slot}, "
                              f"0:{self.n_inner(s)}], 0.0)")
        self.close(sc)

    def varlen_final(self, body: Scope, env: dict) -> None:
        sc = self.open(body, "if n_end >= 0:  # a sequence ends: its final state", 1, "")
        for s in self.rec.states:
            cp = self.chunks.get(s.name)
            if cp is not None:
                self.chunk_state_dma(s, cp, self.varlen_env(env, "n_end"), sc, load=False)
            else:
                self.state_dma(s, self.varlen_env(env, "n_end"), sc, load=False)
        self.close(sc)

    def kernel_name(self) -> str:
        return f"{self.rec.name}_kernel"

    def flatten(self, items, depth: int, out: list) -> None:
        for it in items:
            if isinstance(it, tuple):
                out.append("    " * depth + it[0])
                self.flatten(it[1], depth + 1, out)
            else:
                out.append("    " * depth + it)

    def resources(self) -> Resources:
        """SBUF bytes per partition the kernel may hold at once (every allocation site's
        bytes, plus the largest, which briefly lives twice when its variable is rebound),
        PSUM banks (the rotating pool, plus one for the rebinding) and DMA bytes."""
        return Resources(sum(self.sbuf_sites) + max(self.sbuf_sites), self.PSUM_POOL + 1,
                         self.dma_bytes)


def plan_and_render(rec: Recurrence, sizes: Mapping[str, int], initial_state: bool,
                    final_state: bool, chip: str = "trn1", tt: int | None = None,
                    algorithm: str = "auto", loop_order: str = "auto",
                    cu: tuple[int, ...] | None = None, step: bool = False
                    ) -> tuple[str, Plan]:
    """The plan (``plan.plan_spaces``: layout, algorithm per state, tile candidates, budget),
    then the kernel: the largest time tile that fits the chip and, at that tile, the loop
    order that moves the fewest DMA bytes (``plan.choose``), for the first candidate layout
    where something fits; else the first candidate's PlanError (it names the budget)."""
    error = None
    for space in plan_spaces(rec, sizes, chip, tt, algorithm, loop_order):
        def measure(c: int, time_outer: bool, space=space):
            r = Renderer(space, c, initial_state, final_state, time_outer, cu, step)
            src = r.render()
            return r.resources(), src

        try:
            plan, src = choose(space, measure)
        except PlanError as e:  # the temporaries do not fit either: the next candidate
            error = error or e
            continue
        return src, plan
    raise error
