"""Render NKI kernel source (current API) from a recurrence.

Layout: one *partition dim* ``pd`` of the recurrence goes on the 128 partitions (tiles of up to
128, the ragged last tile by clipped slices), time goes on the free dim in tiles of ``TT``
steps, and every other dim is a trace-time Python loop: *outer* loops (dims every state and
output has) and *inner* loops inside the time tile. The loop order is outer > partition tile >
time tile, or the time tile outermost (carries kept per slot), whichever moves fewer DMA
bytes; the time tile is the largest whose kernel fits SBUF (``plan_and_render``). Every value of
an expression is then one of five kinds, chosen by whether it varies along partitions and time:

    const  a Python number (possibly a function of loop indices)
    pt     a (1, 1) tile          row   a (1, TT) tile
    col    a (P, 1) tile          full  a (P, TT) tile

Rules keyed by IR op emit one instruction per node (broadcasts across partitions are a
ones-row ``nc_matmul`` into PSUM; per-partition operands use ``tensor_scalar`` / the
``activation`` scale). Code is placed in the outermost loop its indices allow, so loop-invariant
loads and math are hoisted (e.g. mamba's ``u`` and ``delta`` load once per channel tile and time
tile, not once per state index), and inputs indexed by inner loops load once as slabs.
Diagonal/scalar/identity states are one ``tensor_tensor_scan`` per state row and time tile with
the carry passed as ``initial`` (or the chunked matmul form, ``chunked.py``); a shift register
is a window on its injects; companion, householder and dense states step through the tile.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

from scancc.ir import Kind, Node, Op, Recurrence, format_recurrence

from ..base import UnsupportedError
from . import emulator as E
from .chunked import ChunkedMixin, find_chunked

NAME = "nki"
TT_CANDIDATES = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
BIG = 3.0e38  # masked softmax logits are pushed down by this much (finite in fp32)


class PlanError(UnsupportedError):
    """No tile plan fits the on-chip budget."""


@dataclass(frozen=True)
class Idx:
    """A loop index in generated code: its Python expression and the loop scopes it uses."""
    expr: str
    deps: frozenset


@dataclass
class V:
    """A value in generated code: ``kind`` (see the module doc) and a tile name (or, for a
    const, a Python expression); ``mid`` indexes the middle dim of a 3-D tile (state rows)."""
    kind: str
    ref: str
    psum: bool = False
    mid: str = ""
    dtype: str = "nl.float32"  # rows loaded from an input keep its dtype (cheap broadcasts)
    coff: str = ""             # a column offset (a shift register's slot in its history)

    def view(self, cols: str | None = None) -> str:
        if self.kind == "const":
            return self.ref
        rows = "0:1" if self.kind in ("pt", "row") else "0:P"
        cols = cols or ("0:1" if self.kind in ("pt", "col") else "0:tw")
        if self.coff:
            lo, hi = cols.split(":")
            cols = f"{self.coff} + {lo}:{self.coff} + {hi}"
        return f"{self.ref}[{rows}, {self.mid}{cols}]"


KIND = {(False, False): "pt", (False, True): "row", (True, False): "col", (True, True): "full"}


class Scope:
    def __init__(self, parent: "Scope | None", header: str | None, sid: int, trips: int = 1):
        self.parent, self.header, self.sid = parent, header, sid
        self.trips = trips * (parent.trips if parent is not None else 1)  # executions
        self.lines: list = []
        self.memo: dict = {}

    def chain(self):
        s = self
        while s is not None:
            yield s
            s = s.parent


# IR unary op -> (activation function, scale) ; NEG/CLAMP/LOGSIGMOID are composed below
_ACT = {Op.EXP: "exp", Op.LOG: "log", Op.SOFTPLUS: "softplus", Op.SIGMOID: "sigmoid",
        Op.SILU: "silu", Op.SQRT: "sqrt", Op.RSQRT: "rsqrt"}
_ALU = {Op.ADD: "add", Op.SUB: "subtract", Op.MUL: "multiply", Op.DIV: "divide",
        Op.MAXIMUM: "maximum", Op.MINIMUM: "minimum"}
# the same ops on trace-time constants (Python expressions)
_PY_UNARY = {Op.NEG: "(-{0})", Op.EXP: "math.exp({0})", Op.LOG: "math.log({0})",
             Op.SOFTPLUS: "math.log1p(math.exp({0}))", Op.SIGMOID: "(1.0 / (1.0 + math.exp(-{0})))",
             Op.LOGSIGMOID: "(-math.log1p(math.exp(-{0})))",
             Op.SILU: "({0} / (1.0 + math.exp(-{0})))", Op.SQRT: "math.sqrt({0})",
             Op.RSQRT: "(1.0 / math.sqrt({0}))", Op.STEP: "(1.0 if {0} >= 0.0 else 0.0)"}
_PY_BINARY = {Op.ADD: "({0} + {1})", Op.SUB: "({0} - {1})", Op.MUL: "({0} * {1})",
              Op.DIV: "({0} / {1})", Op.MAXIMUM: "max({0}, {1})", Op.MINIMUM: "min({0}, {1})"}
ELEMENTWISE_KINDS = (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL)
ADJOINT_KINDS = (Kind.SHIFT_ADJOINT, Kind.COMPANION_ADJOINT, Kind.DENSE_ADJOINT)
# per-step kinds stepped one column of the other looped dims at a time, the axis last
AXIS_LAST = (Kind.HOUSEHOLDER, Kind.COMPANION_ADJOINT, Kind.DENSE_ADJOINT)
ALGORITHMS = ("auto", "scan", "chunked")


def _fmt(v: float) -> str:
    return repr(float(v))


@dataclass
class Plan:
    pd: str
    outer: tuple[str, ...]
    tt: int
    sbuf_bytes: int = 0
    psum_banks: int = 0
    chunked: tuple[str, ...] = ()   # states lowered in the chunked (matmul) form
    loop_order: str = "outer"       # "outer": outer dims > partition tile > time tile; "time"
    dma_bytes: int = 0              # the static estimate the loop order was chosen by


def choose_layout(rec: Recurrence, sizes: Mapping[str, int]) -> tuple[str, tuple[str, ...]]:
    """The partition dim (in every output, not a per-step axis; most states, then largest,
    non-batch preferred) and the outer dims (in every state and output)."""
    axes = {s.transition.axis for s in rec.states} | {s.transition.col for s in rec.states}
    cands = [d for d in rec.canonical if d not in axes
             and all(d in o.dims for o in rec.outputs)]
    if not cands:
        # outputs without the partition dim (a backward's grad_B = ungroup(.., chan, groups)):
        # the dim in the most outputs; they are rows (reduced over one partition tile)
        cands = [d for d in rec.canonical if d not in axes and any(d in o.dims
                                                                      for o in rec.outputs)]
        most = max((sum(d in o.dims for o in rec.outputs) for d in cands), default=0)
        cands = [d for d in cands if sum(d in o.dims for o in rec.outputs) == most]
    if not cands:
        raise UnsupportedError(NAME, rec.name, "no dim can go on the partitions: a partition dim "
                               "must be in every output and not be a shift/companion/householder/"
                               "dense axis")
    role = {d.name: d.role for d in rec.dims}
    pd = max(cands, key=lambda d: (role[d] != "batch", sum(d in s.dims for s in rec.states),
                                   sizes[d], -rec.canonical.index(d)))
    # a transition axis is never an outer loop: a step mixes its indices
    outer = tuple(d for d in rec.canonical if d != pd and d not in axes
                  and all(d in s.dims for s in rec.states)
                  and all(d in o.dims for o in rec.outputs))
    return pd, outer


class Renderer(ChunkedMixin):
    def __init__(self, rec: Recurrence, sizes: Mapping[str, int], tt: int,
                 initial_state: bool, final_state: bool, algorithm: str = "auto",
                 time_outer: bool = False):
        self.rec, self.sizes, self.tt = rec, dict(sizes), tt
        # loop order: outer dims > partition tile > time tile, or time tile outermost (then
        # inputs shared by heads or channel tiles load once per time tile; carries for every
        # outer index and partition tile stay in SBUF)
        self.time_outer = time_outer
        self.dma_bytes = 0
        self.slot = "0"
        self.init, self.final = initial_state, final_state
        self.time = rec.time
        self.T = self.sizes[self.time]
        self.pd, self.outer = choose_layout(rec, self.sizes)
        self.npd = self.sizes[self.pd]
        lacking = [o.name for o in rec.outputs if self.pd not in o.dims]
        if lacking and self.npd > 128:
            self.fail(f"outputs {lacking} lack the partition dim {self.pd!r} of size "
                      f"{self.npd} > 128 (they need it in one partition tile)")
        self.npt = -(-self.npd // 128)
        self.pe = min(self.npd, 128)                    # partitions of a typical tile
        self.twe = min(self.T, tt)                      # steps of a typical time tile
        self.n = 0
        self.sbuf_sites: list[int] = []
        self.psum_next = 0
        self.PSUM_POOL = 4
        self.root = Scope(None, None, 0)
        self.sids = 1
        self.pd_scope = self.time_scope = None
        self.lets = {l.name: l.expr for l in rec.lets}
        # states read through prev(S): their trajectory keeps the entering state in column 0
        self.prevs = {n.arg for e in [o.expr for o in rec.outputs] + list(self.lets.values())
                      for n in e.walk() if n.op is Op.PREV}
        self._an: dict = {}
        self._ones: set = set()
        if algorithm not in ALGORITHMS:
            self.fail(f"unknown algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
        self.chunks = {} if algorithm == "scan" else find_chunked(rec, self.pd, self.outer,
                                                                   self.sizes)
        if algorithm == "chunked" and not self.chunks:
            self.fail("the chunked (matmul) form needs a scalar/identity state [..., K, V] with "
                      "V on the partitions, K <= 128, an inject k * v and readouts "
                      "sum(S * q, K), all read with time before the feature dim")

    # ---- emission helpers ----
    def loop_var(self, name: str, sc: Scope) -> str:
        """``name``, or a fresh variant when an enclosing loop already binds it (a sum over
        a dim nested in a sum over the same dim must not clobber the outer index)."""
        bound = {s.header.split()[1] for s in sc.chain() if s.header and
                 s.header.startswith("for ")}
        if name not in bound:
            return name
        k = 2
        while f"{name}{k}" in bound:
            k += 1
        return f"{name}{k}"

    def fail(self, feature: str):
        raise UnsupportedError(NAME, self.rec.name, feature)

    def name(self, prefix: str = "v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, scope: Scope, line: str) -> None:
        scope.lines.append(line)

    def open(self, scope: Scope, header: str, trips: int | None = None) -> Scope:
        if trips is None:
            m = re.fullmatch(r"for \w+ in range\((\d+)\):", header)
            trips = int(m.group(1)) if m else 1
        s = Scope(scope, header, self.sids, trips)
        self.sids += 1
        return s

    def dma(self, scope: Scope, line: str, elems: int) -> None:
        """Emit a DMA; count its (fp32-sized) bytes times the loops around it for the plan."""
        self.dma_bytes += 4 * elems * scope.trips
        self.emit(scope, line)

    def close(self, s: Scope) -> None:
        s.parent.lines.append((s.header, s.lines))

    def alloc(self, scope: Scope, shape: tuple, per_partition: int, prefix: str = "v",
              dtype: str = "nl.float32") -> str:
        nm = self.name(prefix)
        self.sbuf_sites.append(per_partition)
        self.emit(scope, f"{nm} = nl.ndarray(({', '.join(map(str, shape))}), dtype={dtype}, "
                         f"buffer=nl.sbuf)")
        return nm

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
        op, a = node.op, node.arg
        pds, ts = frozenset({self.pd_scope.sid}), frozenset({self.time_scope.sid})
        if op in (Op.CONST, Op.SIZE):
            return False, False, True, frozenset()
        if op is Op.IOTA:
            if a == self.pd:
                return True, False, False, pds
            return False, False, True, env[a].deps
        if op in (Op.INPUT, Op.STATE, Op.PREV):
            dims = self.rec.input(a).dims if op is Op.INPUT else self.rec.state(a).dims
            deps = frozenset().union(*(env[d].deps for d in dims if d in env))
            haspd, hast = self.pd in dims, op is not Op.INPUT or self.time in dims
            return haspd, hast, False, deps | (pds if haspd else frozenset()) | \
                (ts if hast else frozenset())
        if op is Op.PARAM:
            return self.analyze(self.lets[a], env)
        if op in (Op.SUM, Op.MAX):
            sub = dict(env)
            for d in a:
                if d != self.pd:
                    sub[d] = Idx("?", frozenset())
            p, t, c, deps = self.analyze(node.src[0], sub)
            if self.pd in a:
                p = False
            return p, t, c, deps
        if op is Op.GROUP:
            p, t, c, deps = self.analyze(node.src[0], self.group_env(node, env))
            if self.gathers(node, env):
                return True, t, False, deps | pds
            return p, t, c, deps
        if op is Op.FLIP:
            return self.analyze(node.src[0], self.flip_env(node, env))
        if op is Op.UNGROUP:
            d, g = a
            sub = {**env, d: Idx("?", frozenset())}
            p, t, c, deps = self.analyze(node.src[0], sub)
            if d == self.pd:
                p = False
            return p, t, c, deps | (env[g].deps if g in env else frozenset())
        if op is Op.L2NORM:
            return self.analyze(self.l2norm_expr(node), env)
        rs = [self.analyze(s, env) for s in node.src]
        return (any(r[0] for r in rs), any(r[1] for r in rs), all(r[2] for r in rs),
                frozenset().union(*(r[3] for r in rs)))

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
        loop = self.open(sc, f"for g_{g} in range({self.sizes[g]}):")
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
        loop = self.open(sc, f"for {iv} in range({rep}):")
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
                      f"{_fmt(rep)})")
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

    def l2norm_expr(self, node: Node) -> Node:
        x, d = node.src[0], node.arg
        return Node(Op.MUL, (x, Node(Op.RSQRT, (Node(Op.ADD, (
            Node(Op.SUM, (Node(Op.MUL, (x, x)),), (d,)), Node(Op.CONST, (), 1e-6))),))))

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
        op, a = node.op, node.arg
        if op is Op.CONST:
            return V("const", _fmt(a))
        if op is Op.SIZE:
            return V("const", _fmt(self.sizes[a]))
        if op is Op.IOTA:
            if a != self.pd:
                return V("const", f"float({env[a].expr})")
            v = self.tile(sc, "col")
            self.emit(sc, f"nisa.iota({v.view()}, [[0, 1]], offset=p0, channel_multiplier=1)")
            return v
        if op is Op.INPUT:
            return self.load(node, env, sc)
        if op is Op.STATE:
            s = self.rec.state(a)
            kind = "full" if self.pd in s.dims else "row"
            if s.transition.kind is Kind.SHIFT:  # slot j at step t is hist[:, rest, t + j]
                dims = self.inner_dims(s)
                rest = self.flat_of(dims[1:], env)
                return V(kind, f"hist_{a}", mid=f"{rest}, ", coff=f"({env[dims[0]].expr})")
            # with prev(S) read, column 0 of the trajectory is the state entering the tile
            return V(kind, f"traj_{a}", mid=f"{self.flat_index(s, env)}, ",
                     coff="1" if a in self.prevs else "")
        if op is Op.PREV:  # the state entering each step: the trajectory one column back
            s = self.rec.state(a)
            if s.transition.kind is Kind.SHIFT or a in self.chunks:
                self.fail(f"prev({a}) of a {s.transition.kind.value} state")
            kind = "full" if self.pd in s.dims else "row"
            return V(kind, f"traj_{a}", mid=f"{self.flat_index(s, env)}, ")
        if op is Op.PARAM:
            return self.value(self.lets[a], env, sc)
        if op is Op.GROUP:
            if self.gathers(node, env):
                return self.gather(node, env, sc, info)
            return self.value(node.src[0], self.group_env(node, env), sc)
        if op is Op.FLIP:
            return self.value(node.src[0], self.flip_env(node, env), sc)
        if op is Op.UNGROUP:
            return self.ungroup(node, env, sc, info)
        if op is Op.L2NORM:
            return self.value(self.l2norm_expr(node), env, sc)
        if op in (Op.SUM, Op.MAX):
            return self.reduce(node, env, sc, info)
        if op is Op.SOFTMAX:
            return self.softmax(node, env, sc)
        if op is Op.SUB and self.expm1_arg(node) is not None:
            return self.expm1(node, env, sc)
        if op in _ALU:
            return self.binary(op, self.value(node.src[0], env, sc),
                               self.value(node.src[1], env, sc), sc, node)
        return self.unary(op, a, node, env, sc)

    def expm1_arg(self, node: Node) -> Node | None:
        """x when ``node`` is exp(x) - 1 (through lets), else None."""
        if node.src[1] != Node(Op.CONST, (), 1.0):
            return None
        e = node.src[0]
        while e.op is Op.PARAM:
            e = self.lets[e.arg]
        return e.src[0] if e.op is Op.EXP else None

    def expm1(self, node: Node, env: dict, sc: Scope) -> V:
        """exp(x) - 1 without float32 cancellation for small |x| (s4d's (exp(dt A) - 1) / A
        and its derivative): Kahan's (u - 1) x / log(u) with u = exp(x), on x and u clamped
        to |x| <= 0.5 so it stays finite (u == 1 gives x), and u - 1 where |x| > 0.5."""
        u = self.value(node.src[0], env, sc)
        x = self.value(self.expm1_arg(node), env, sc)
        if u.kind == "const" or x.kind == "const":
            return self.binary(Op.SUB, u, V("const", "1.0"), sc, node)
        u = self.sbuf(u, sc)
        x = self.sbuf(self.to_kind(x, u.kind, sc), sc)

        def ts(src: V, op0: str, c0: float, op1: str | None = None, c1: float = 0.0) -> V:
            out = self.tile(sc, u.kind)
            extra = f", op1=nl.{op1}, operand1={_fmt(c1)}" if op1 else ""
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, {src.view()}, nl.{op0}, "
                          f"{_fmt(c0)}{extra})")
            return out

        def tt(a: V, b: V, alu: str, out: V | None = None) -> V:
            out = out or self.tile(sc, u.kind)
            self.emit(sc, f"nisa.tensor_tensor({out.view()}, {a.view()}, {b.view()}, nl.{alu})")
            return out

        um1 = ts(u, "subtract", 1.0)
        xc = ts(x, "maximum", -0.5, "minimum", 0.5)
        uc = ts(u, "maximum", math.exp(-0.5), "minimum", math.exp(0.5))
        one = ts(uc, "equal", 1.0)
        den = self.tile(sc, u.kind)
        self.emit(sc, f"nisa.activation({den.view()}, nl.log, {uc.view()})")
        tt(den, one, "add", den)                      # log(u) + [u == 1]: never 0
        k = ts(uc, "subtract", 1.0)
        tt(k, xc, "multiply", k)
        tt(k, den, "divide", k)
        tt(tt(one, xc, "multiply"), k, "add", k)      # u == 1: x
        big = ts(x, "greater_equal", 0.5)
        tt(big, ts(x, "less", -0.5), "add", big)      # |x| > 0.5: u - 1
        tt(big, tt(um1, k, "subtract"), "multiply", big)
        return tt(k, big, "add", k)

    def unary(self, op: Op, arg, node: Node, env: dict, sc: Scope) -> V:
        src = node.src[0]
        if op is Op.EXP and src.op is Op.MUL:
            # exp(x * s) with s per partition: one activation with a (P, 1) scale
            va, vb = self.value(src.src[0], env, sc), self.value(src.src[1], env, sc)
            for x, s in ((va, vb), (vb, va)):
                if s.kind in ("col", "const") and x.kind in ("row", "full"):
                    x = self.to_kind(x, "full", sc) if s.kind == "col" else x
                    out = self.tile(sc, x.kind)
                    self.emit(sc, f"nisa.activation({out.view()}, nl.exp, {x.view()}, "
                                  f"scale={s.view()})")
                    return out
        x = self.value(src, env, sc)
        if x.kind == "const":
            if op is Op.CLAMP:
                lo, hi = arg
                e = x.ref
                e = f"max({e}, {_fmt(lo)})" if lo is not None else e
                return V("const", f"min({e}, {_fmt(hi)})" if hi is not None else e)
            return V("const", _PY_UNARY[op].format(x.ref))
        out = self.tile(sc, x.kind)
        if op is Op.NEG:
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, {x.view()}, nl.multiply, -1.0)")
        elif op is Op.CLAMP:
            lo, hi = arg
            ops = [(o, b) for o, b in (("maximum", lo), ("minimum", hi)) if b is not None]
            extra = f", op1=nl.{ops[1][0]}, operand1={_fmt(ops[1][1])}" if len(ops) > 1 else ""
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, {x.view()}, nl.{ops[0][0]}, "
                          f"{_fmt(ops[0][1])}{extra})")
        elif op is Op.LOGSIGMOID:
            # logsigmoid(x) = -softplus(-x)
            self.emit(sc, f"nisa.activation({out.view()}, nl.softplus, {x.view()}, scale=-1.0)")
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, {out.view()}, nl.multiply, -1.0)")
        elif op is Op.STEP:  # 1.0 where x >= 0 else 0.0: an ALU compare
            self.emit(sc, f"nisa.tensor_scalar({out.view()}, {x.view()}, nl.greater_equal, 0.0)")
        elif op in _ACT:
            self.emit(sc, f"nisa.activation({out.view()}, nl.{_ACT[op]}, {x.view()})")
        else:
            self.fail(f"no NKI rule for op {op.value!r}")
        return out

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
        alu = _ALU[op]
        if a.kind == "const" and b.kind == "const":
            return V("const", _PY_BINARY[op].format(a.ref, b.ref))
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
        loop_dims = [d for d in dims if d != self.pd]
        p, t, c, _ = info
        src_info = self.analyze(node.src[0], {**env, **{d: Idx("?", frozenset())
                                                        for d in loop_dims}})
        kind = "const" if src_info[2] else KIND[(src_info[0], src_info[1])]
        if loop_dims:
            if kind == "const":
                self.fail(f"{op.value} over {loop_dims} of a constant expression")
            acc = self.tile(sc, kind)
            self.emit(sc, f"nisa.memset({acc.view()}, {'0.0' if alu == 'add' else _fmt(-BIG)})")
            inner, sub = sc, dict(env)
            for d in loop_dims:
                iv = self.loop_var(f"r_{d}", inner)
                inner = self.open(inner, f"for {iv} in range({self.sizes[d]}):")
                sub[d] = Idx(iv, frozenset({inner.sid}))
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
                              V("const", _fmt(BIG)), scope)
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
            self.emit(home, f"nisa.memset({m.view()}, {_fmt(-BIG)})")
            self.emit(home, f"nisa.memset({tot.view()}, 0.0)")
            loop = self.open(home, f"for j_{w} in range({nw}):")
            sub = {**base, w: Idx(f"j_{w}", frozenset({loop.sid}))}
            x, _ = masked(sub, loop)
            self.emit(loop, f"nisa.tensor_tensor({m.view()}, {m.view()}, "
                            f"{self.to_kind(x, kind, loop).view()}, nl.maximum)")
            self.close(loop)
            loop = self.open(home, f"for j_{w} in range({nw}):")
            sub = {**base, w: Idx(f"j_{w}", frozenset({loop.sid}))}
            x, keep = masked(sub, loop)
            e = self.to_kind(self.exp_shift(x, m, keep, loop), kind, loop)
            slot = V(kind, wname, mid=f"j_{w}, ")
            self.emit(loop, f"nisa.tensor_copy({slot.view()}, {e.view()})")
            self.emit(loop, f"nisa.tensor_tensor({tot.view()}, {tot.view()}, {e.view()}, nl.add)")
            self.close(loop)
            self.emit(home, f"nisa.tensor_scalar({tot.view()}, {tot.view()}, nl.maximum, 1e-30)")
            loop = self.open(home, f"for j_{w} in range({nw}):")
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
            # a loop over d (loop_var may have renamed a nested one: r_key2 inside r_key; a
            # name that is another dim's, say key2, is that dim's loop)
            if len(ix.deps) == 1 and re.fullmatch(rf"[iromsj]_{re.escape(d)}\d*", ix.expr) \
                    and (ix.expr[2:] == d or ix.expr[2:] not in self.sizes):
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
        loop = self.open(sc, "for c0 in range(0, tw, 128):", -(-self.twe // 128))
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

    def store(self, o, env: dict, v: V, sc: Scope) -> None:
        if self.pd not in o.dims:  # a row: the partition dim was reduced in this one tile
            if v.kind in ("col", "full"):
                self.fail(f"output {o.name!r} varies along the partition dim {self.pd!r}")
            v = self.sbuf(self.to_kind(v, "row", sc), sc)
            dst = f"out_{o.name}[{self.hbm_index(o.dims, env, '', 't0:t1')}]"
            self.dma(sc, f"nisa.dma_copy({dst}, {v.view()})", self.twe)
            return
        v = self.sbuf(self.to_kind(v, "full", sc), sc)
        dst = f"out_{o.name}[{self.hbm_index(o.dims, env, 'p0:p1', 't0:t1')}]"
        if o.dims.index(self.time) < o.dims.index(self.pd):
            loop = self.open(sc, "for c0 in range(0, tw, 128):", -(-self.twe // 128))
            self.emit(loop, "c1 = min(c0 + 128, tw)")
            ps = self.psum_tile(loop, (128, 128))
            self.emit(loop, f"nisa.nc_transpose({ps}[0:c1 - c0, 0:P], {v.view('c0:c1')})")
            stage = self.alloc(loop, (128, 128), 512, "stage")
            self.emit(loop, f"nisa.tensor_copy({stage}[0:c1 - c0, 0:P], {ps}[0:c1 - c0, 0:P])")
            dst = f"out_{o.name}[{self.hbm_index(o.dims, env, 'p0:p1', 't0 + c0:t0 + c1')}]"
            self.dma(loop, f"nisa.dma_copy({dst}, {stage}[0:c1 - c0, 0:P])",
                     self.pe * min(128, self.twe))
            self.close(loop)
        else:
            self.dma(sc, f"nisa.dma_copy({dst}, {v.view()})", self.pe * self.twe)

    # ---- states ----
    def inner_dims(self, s) -> tuple[str, ...]:
        """The state's looped dims; a shift/companion axis first, so a shift is a flat offset."""
        ds = tuple(d for d in self.rec.canonical if d in s.dims and d != self.pd
                   and d not in self.outer)
        ax = s.transition.axis
        if s.transition.kind in AXIS_LAST and ax in ds:        # the axis last: each
            return tuple(d for d in ds if d != ax) + (ax,)       # column is contiguous
        return ((ax,) + tuple(d for d in ds if d != ax)) if ax in ds else ds

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
            sc = self.open(sc, f"for {prefix}_{d} in range({self.sizes[d]}):")
            scopes.append(sc)
            sub[d] = Idx(f"{prefix}_{d}", frozenset({sc.sid}))
        return sc, sub, scopes

    def closeall(self, scopes) -> None:
        for s in reversed(scopes):
            self.close(s)

    def scan_state(self, s, env: dict, sc: Scope) -> None:
        t = s.transition
        self.emit(sc, f"# state {s.name}: {t.kind.value}, one tensor_tensor_scan per row, the "
                      "carry as initial")
        inner, sub, scopes = self.inner_loops(sc, self.inner_dims(s), env)
        f = self.flat_index(s, sub)
        full = "full" if self.pd in s.dims else "row"
        b = self.value(s.inject, sub, inner)
        b = self.to_kind(b, full, inner)
        r = self.rows(s)
        init = f"carry_{s.name}[0:{r}, {self.slot}, {f}:{f} + 1]"
        c0 = 0
        if s.name in self.prevs:  # column 0: the state entering the tile (for prev(S))
            c0 = 1
            self.emit(inner, f"nisa.tensor_copy(traj_{s.name}[0:{r}, {f}, 0:1], {init})")
        dst = f"traj_{s.name}[0:{r}, {f}, {c0}:tw + {c0}]" if c0 else \
            f"traj_{s.name}[0:{r}, {f}, 0:tw]"
        if t.kind is Kind.IDENTITY:
            self.emit(inner, f"nisa.tensor_tensor_scan({dst}, zeros[0:{r}, 0:tw], {b.view()}, "
                             f"{init}, nl.add, nl.add)")
        else:
            a = self.to_kind(self.value(t.operand("decay"), sub, inner), full, inner)
            if a.psum and b.psum:
                b = self.sbuf(b, inner)
            self.emit(inner, f"nisa.tensor_tensor_scan({dst}, {a.view()}, {b.view()}, {init}, "
                             "nl.multiply, nl.add)")
        last = f"tw - 1 + {c0}:tw + {c0}" if c0 else "tw - 1:tw"
        self.emit(inner, f"nisa.tensor_copy({init}, traj_{s.name}[0:{r}, {f}, {last}])")
        self.closeall(scopes)

    def materialize(self, nodes, dims, env: dict, sc: Scope, rows: str,
                    into=None) -> list[str]:
        """Operands as (128, prod(dims), TT) fp32 tiles, broadcast over what they lack; one
        loop nest for all, so what they share (e.g. k in k and beta * k * v) loads once.
        ``into``: [(tile, columns)] to write instead of new tiles."""
        n = math.prod(self.sizes[d] for d in dims)
        names = [nm for nm, _ in into] if into else [
            self.alloc(sc, (128 if rows == "P" else 1, n, self.tt), 4 * n * self.tt, "op")
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

    def adjoint_state(self, s, env: dict, sc: Scope) -> None:
        """h_t = A_t^T (h_{t-1} + b_t), stepped through the tile: x = carry + inject, then the
        transposed transition into the trajectory column. Shift/companion: a reverse shift (a
        copy one slot up, the oldest slot zeroed; companion first adds feedback * x[newest]);
        dense: slot a = sum(M[:, a] * x), with M materialized column-major."""
        t = s.transition
        self.emit(sc, f"# state {s.name}: {t.kind.value} along {t.axis}, h = A^T (h + b), "
                      "stepped through time")
        dims, r, n = self.inner_dims(s), self.rows(s), self.n_inner(s)
        first = t.kind is Kind.SHIFT_ADJOINT
        if not dims or dims[0 if first else -1] != t.axis:
            self.fail(f"{t.kind.value} state {s.name!r}: the axis {t.axis!r} must be the "
                      f"{'first' if first else 'last'} of its looped dims {list(dims)}")
        na = self.sizes[t.axis]
        rest = n // na
        tc = "t + 1" if s.name in self.prevs else "t"
        traj, cy = f"traj_{s.name}", f"carry_{s.name}"
        if s.name in self.prevs:
            self.emit(sc, f"nisa.tensor_copy({traj}[0:{r}, 0:{n}, 0], {cy}[0:{r}, {self.slot}, "
                          f"0:{n}])")
        inj, = self.materialize([s.inject], dims, env, sc, r)
        x = self.alloc(sc, (128, n), 4 * n, "x")
        # the operand per column hm of the other looped dims where it varies along them
        opn = t.operand("feedback") if t.kind is Kind.COMPANION_ADJOINT else t.operand("matrix")
        per_col = opn is not None and bool(set(dims[:-1]) & set(self.rec.dims_of(opn)))
        lead = dims[:-1] if per_col else ()
        if t.kind is Kind.COMPANION_ADJOINT:
            op, = self.materialize([opn], lead + (t.axis,), env, sc, r)
        elif t.kind is Kind.DENSE_ADJOINT:  # flat col * na + axis: column a of M is a row
            op, = self.materialize([opn], lead + (t.col, t.axis), env, sc, r)
        prod = self.alloc(sc, (128, na), 4 * na, "prod") if t.kind is not Kind.SHIFT_ADJOINT \
            else None
        step = self.open(sc, "for t in range(tw):")
        self.emit(step, f"nisa.tensor_tensor({x}[0:{r}, 0:{n}], {cy}[0:{r}, {self.slot}, 0:{n}], "
                        f"{inj}[0:{r}, 0:{n}, t], nl.add)")
        if t.kind is Kind.SHIFT_ADJOINT:  # the axis first: slot j is columns j*rest:(j+1)*rest
            self.emit(step, f"nisa.memset({traj}[0:{r}, 0:{rest}, {tc}], 0.0)")
            if na > 1:
                self.emit(step, f"nisa.tensor_copy({traj}[0:{r}, {rest}:{n}, {tc}], "
                                f"{x}[0:{r}, 0:{n - rest}])")
        else:                             # the axis last: column hm is hm*na:(hm+1)*na
            col = self.open(step, f"for hm in range({rest}):", rest) if rest > 1 else step
            c0 = f"hm * {na}" if rest > 1 else "0"
            xs = f"{x}[0:{r}, {c0}:{c0} + {na}]" if rest > 1 else f"{x}[0:{r}, 0:{na}]"
            if t.kind is Kind.COMPANION_ADJOINT:
                last = f"{c0} + {na - 1}" if rest > 1 else f"{na - 1}"
                fcols = f"{c0}:{c0} + {na}" if per_col else f"0:{na}"
                self.emit(col, f"nisa.tensor_scalar({prod}[0:{r}, 0:{na}], {op}[0:{r}, {fcols}, t], "
                               f"nl.multiply, {x}[0:{r}, {last}:{last} + 1])")
                self.emit(col, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], {prod}[0:{r}, 0:{na}], "
                               f"{xs}, nl.add)")
                self.emit(col, f"nisa.memset({traj}[0:{r}, {c0}:{c0} + 1, {tc}], 0.0)")
                if na > 1:
                    self.emit(col, f"nisa.tensor_copy({traj}[0:{r}, {c0} + 1:{c0} + {na}, {tc}], "
                                   f"{prod}[0:{r}, 0:{na - 1}])")
            else:
                row = self.open(col, f"for a in range({na}):", na)
                m0 = f"hm * {na * na} + a * {na}" if per_col and rest > 1 else f"a * {na}"
                self.emit(row, f"nisa.tensor_tensor({prod}[0:{r}, 0:{na}], "
                               f"{op}[0:{r}, {m0}:{m0} + {na}, t], {xs}, nl.multiply)")
                self.emit(row, f"nisa.tensor_reduce({traj}[0:{r}, {c0} + a:{c0} + a + 1, {tc}], "
                               f"nl.add, {prod}[0:{r}, 0:{na}], axis=1, keepdims=True)")
                self.close(row)
            if rest > 1:
                self.close(col)
        self.emit(step, f"nisa.tensor_copy({cy}[0:{r}, {self.slot}, 0:{n}], "
                        f"{traj}[0:{r}, 0:{n}, {tc}])")
        self.close(step)

    def step_state(self, s, env: dict, sc: Scope) -> None:
        t = s.transition
        if t.kind in ADJOINT_KINDS:
            return self.adjoint_state(s, env, sc)
        self.emit(sc, f"# state {s.name}: {t.kind.value} along {t.axis}, "
                      + ("copied per slot" if t.kind is Kind.SHIFT else "stepped through time"))
        dims = self.inner_dims(s)
        r = self.rows(s)
        n = self.n_inner(s)
        if t.kind is Kind.SHIFT:
            if not dims or dims[0] != t.axis:
                self.fail(f"shift state {s.name!r}: the axis {t.axis!r} must be the first of its "
                          f"looped dims {list(dims)}")
            # a shift register is a window on its injects: hist[:, rest, u] is the inject of
            # step t0 - (A - 1) + u, so slot j at step t is hist[:, rest, t + j]; the first A - 1
            # columns come from the carry, the rest is this tile's inject
            rest, na = n // self.sizes[t.axis], self.sizes[t.axis]
            hist, cy = f"hist_{s.name}", f"carry_{s.name}"
            rows = 128 if r == "P" else 1
            self.sbuf_sites.append(4 * rest * (na - 1 + self.tt))
            self.emit(sc, f"{hist} = nl.ndarray(({rows}, {rest}, {na - 1 + self.tt}), "
                          "dtype=nl.float32, buffer=nl.sbuf)")
            if na > 1:
                back = self.open(sc, f"for u in range({na - 1}):", na - 1)
                self.emit(back, f"nisa.tensor_copy({hist}[0:{r}, 0:{rest}, u], "
                                f"{cy}[0:{r}, {self.slot}, (u + 1) * {rest}:(u + 2) * {rest}])")
                self.close(back)
            self.materialize([s.inject], dims[1:], env, sc, r,
                             into=[(hist, f"{na - 1}:{na - 1} + tw")])
            # the new carry: every slot at the tile's last step
            last = self.open(sc, f"for j in range({na}):", na)
            self.emit(last, f"nisa.tensor_copy({cy}[0:{r}, {self.slot}, j * {rest}:(j + 1) * "
                            f"{rest}], {hist}[0:{r}, 0:{rest}, tw - 1 + j])")
            self.close(last)
            return
        else:
            hh = t.kind is Kind.HOUSEHOLDER and dims and dims[-1] == t.axis
            if dims != (t.axis,) and not hh:
                self.fail(f"{t.kind.value} state {s.name!r}: its looped dims {list(dims)} must "
                          f"be exactly the axis {t.axis!r} (partition dim {self.pd!r})")
            # with prev(S) read, column 0 of the trajectory is the state entering the tile
            tc = "t + 1" if s.name in self.prevs else "t"
            if s.name in self.prevs:
                self.emit(sc, f"nisa.tensor_copy(traj_{s.name}[0:{r}, 0:{n}, 0], "
                              f"carry_{s.name}[0:{r}, {self.slot}, 0:{n}])")
            cur = f"carry_{s.name}[0:{r}, {self.slot}, 0:{n}]"
            new = f"traj_{s.name}[0:{r}, 0:{n}, {tc}]"
            col = self.alloc(sc, (128, 1), 4, "acc")
            if t.kind is Kind.COMPANION:
                inj, fb = self.materialize([s.inject, t.operand("feedback")], dims, env, sc, r)
                prod = self.alloc(sc, (128, n), 4 * n, "prod")
                step = self.open(sc, "for t in range(tw):")
                if n > 1:
                    self.emit(step, f"nisa.tensor_tensor({prod}[0:{r}, 0:{n - 1}], "
                                    f"{fb}[0:{r}, 0:{n - 1}, t], "
                                    f"carry_{s.name}[0:{r}, {self.slot}, 1:{n}], nl.multiply)")
                    self.emit(step, f"nisa.tensor_reduce({col}[0:{r}, 0:1], nl.add, "
                                    f"{prod}[0:{r}, 0:{n - 1}], axis=1, keepdims=True)")
                    self.emit(step, f"nisa.tensor_copy(traj_{s.name}[0:{r}, 0:{n - 1}, {tc}], "
                                    f"carry_{s.name}[0:{r}, {self.slot}, 1:{n}])")
                else:
                    self.emit(step, f"nisa.memset({col}[0:{r}, 0:1], 0.0)")
                self.emit(step, f"nisa.tensor_tensor(traj_{s.name}[0:{r}, {n - 1}:{n}, {tc}], "
                                f"{col}[0:{r}, 0:1], {inj}[0:{r}, {n - 1}:{n}, t], nl.add)")
            elif t.kind is Kind.HOUSEHOLDER:
                # one reflection per column of the other looped dims (hm), the axis last
                na = self.sizes[t.axis]
                if dims == (t.axis,):  # one loop nest for both (what they share loads once)
                    inj, k = self.materialize([s.inject, t.operand("k")], dims, env, sc, r)
                else:
                    inj, = self.materialize([s.inject], dims, env, sc, r)
                    k, = self.materialize([t.operand("k")], (t.axis,), env, sc, r)
                scal = [t.operand("beta")] + ([t.operand("alpha")] if t.operand("alpha") else [])
                beta, *alpha = self.materialize(scal, (), env, sc, r)
                alpha = alpha[0] if alpha else None
                prod = self.alloc(sc, (128, na), 4 * na, "prod")
                step = self.open(sc, "for t in range(tw):")
                outer_step, nk = step, n // na
                if nk > 1:
                    step = self.open(step, f"for hm in range({nk}):")
                cs = f"hm * {na}:(hm + 1) * {na}" if nk > 1 else f"0:{na}"
                cur = f"carry_{s.name}[0:{r}, {self.slot}, {cs}]"
                new = f"traj_{s.name}[0:{r}, {cs}, {tc}]"
                n, injv = na, f"{inj}[0:{r}, {cs}, t]"
                self.emit(step, f"nisa.tensor_tensor({prod}[0:{r}, 0:{n}], {k}[0:{r}, 0:{n}, t], "
                                f"{cur}, nl.multiply)")
                self.emit(step, f"nisa.tensor_reduce({col}[0:{r}, 0:1], nl.add, "
                                f"{prod}[0:{r}, 0:{n}], axis=1, keepdims=True)")
                self.emit(step, f"nisa.tensor_tensor({col}[0:{r}, 0:1], {col}[0:{r}, 0:1], "
                                f"{beta}[0:{r}, 0:1, t], nl.multiply)")
                self.emit(step, f"nisa.tensor_scalar({prod}[0:{r}, 0:{n}], {k}[0:{r}, 0:{n}, t], "
                                f"nl.multiply, {col}[0:{r}, 0:1])")
                self.emit(step, f"nisa.tensor_tensor({new}, {cur}, {prod}[0:{r}, 0:{n}], "
                                "nl.subtract)")
                if alpha is not None:
                    self.emit(step, f"nisa.tensor_copy({col}[0:{r}, 0:1], {alpha}[0:{r}, 0:1, t])")
                    self.emit(step, f"nisa.tensor_scalar({new}, {new}, nl.multiply, "
                                    f"{col}[0:{r}, 0:1])")
                self.emit(step, f"nisa.tensor_tensor({new}, {new}, {injv}, nl.add)")
                if nk > 1:
                    self.close(step)
                step, n = outer_step, n * nk
            elif t.kind is Kind.DENSE:
                inj, = self.materialize([s.inject], dims, env, sc, r)
                m, = self.materialize([t.operand("matrix")], (t.axis, t.col), env, sc, r)
                prod = self.alloc(sc, (128, n), 4 * n, "prod")
                step = self.open(sc, "for t in range(tw):")
                row = self.open(step, f"for a in range({n}):")
                self.emit(row, f"nisa.tensor_tensor({prod}[0:{r}, 0:{n}], "
                               f"{m}[0:{r}, a * {n}:(a + 1) * {n}, t], {cur}, nl.multiply)")
                self.emit(row, f"nisa.tensor_reduce(traj_{s.name}[0:{r}, a:a + 1, {tc}], nl.add, "
                               f"{prod}[0:{r}, 0:{n}], axis=1, keepdims=True)")
                self.close(row)
                self.emit(step, f"nisa.tensor_tensor({new}, {new}, {inj}[0:{r}, 0:{n}, t], "
                                "nl.add)")
            else:
                self.fail(f"no NKI rule for transition {t.kind.value!r}")
        self.emit(step, f"nisa.tensor_copy(carry_{s.name}[0:{r}, {self.slot}, 0:{n}], "
                        f"traj_{s.name}[0:{r}, 0:{n}, {tc}])")
        self.close(step)

    # ---- the kernel ----
    def render(self) -> str:
        rec = self.rec
        top = self.root
        args = [f"in_{i.name}" for i in rec.inputs]
        if self.init:
            args += [f"init_{s.name}" for s in rec.states]
        sz = self.sizes
        # the IR as comments: splitlines() leaves no way out of a comment line
        hdr = format_recurrence(rec).rstrip().splitlines()
        lines = ["# NKI kernel generated by scancc from this recurrence:", "#"]
        lines += [("#   " + h).rstrip() for h in hdr]
        lines += ["#",
                  f"# Layout: {self.pd} on the partitions (tiles of 128), time on the free dim "
                  f"(tiles of {self.tt}),",
                  f"# loops over [{', '.join(self.outer)}] outside the partition tile, the other "
                  "dims inside the time tile.",
                  "# Sizes: " + ", ".join(f"{d}={sz[d]}" for d in (rec.time,) + rec.canonical),
                  "import nki", "import nki.isa as nisa",
                  "import nki.language as nl", "", "",
                  "@nki.jit", f"def {self.kernel_name()}({', '.join(args)}):"]
        for d in (rec.time,) + rec.canonical:
            self.emit(top, f"N_{d} = {sz[d]}")
        for o in rec.outputs:
            shape = ", ".join(f"N_{d}" for d in o.dims)
            self.emit(top, f"out_{o.name} = nl.ndarray(({shape},), dtype=in_{rec.inputs[0].name}"
                           ".dtype, buffer=nl.shared_hbm)")
        if self.final:
            for s in rec.states:
                shape = ", ".join(f"N_{d}" for d in s.dims)
                self.emit(top, f"final_{s.name} = nl.ndarray(({shape},), dtype=nl.float32, "
                               "buffer=nl.shared_hbm)")
        self.emit(top, "# constants: zeros (broadcast source), ones (partition broadcast/sum)")
        self.sbuf_sites += [4 * self.tt, 4 * 128, 4]
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
            if self.init:
                pdl, env, scopes = self.pd_loops(top)
                self.init_carries(pdl, env)
                self.closeall(scopes)
            tl = self.time_loop(top)
            pdl, env, scopes = self.pd_loops(tl)
            body = pdl
        else:
            pdl, env, scopes = self.pd_loops(top)
            self.alloc_carries(pdl, nslots)
            self.init_carries(pdl, env)
            tl = self.time_loop(pdl)
            body = tl
        self.time_scope, self.pd_scope = tl, pdl
        for s in rec.states:
            if s.name in self.chunks:
                self.chunk_state(s, self.chunks[s.name], env, body)
                continue
            n, r = self.n_inner(s), self.rows(s)
            if s.transition.kind is not Kind.SHIFT:
                cols = self.tt + (s.name in self.prevs)
                self.sbuf_sites.append(4 * n * cols)
                self.emit(body, f"traj_{s.name} = nl.ndarray(({128 if r == 'P' else 1}, {n}, "
                                f"{cols}), dtype=nl.float32, buffer=nl.sbuf)")
            if s.transition.kind in ELEMENTWISE_KINDS:
                self.scan_state(s, env, body)
            else:
                self.step_state(s, env, body)
        for o in rec.outputs:
            dims = tuple(d for d in rec.canonical if d in o.dims and d != self.pd
                         and d not in self.outer)
            inner, sub, oscopes = self.inner_loops(body, dims, env, "o")
            self.store(o, sub, self.value(o.expr, sub, inner), inner)
            self.closeall(oscopes)
        if self.time_outer:
            self.closeall(scopes)
            self.close(tl)
            if self.final:
                pdl, env, scopes = self.pd_loops(top)
                self.final_carries(pdl, env)
                self.closeall(scopes)
        else:
            self.close(tl)
            if self.final:
                self.final_carries(pdl, env)
            self.closeall(scopes)
        rets = [f"out_{o.name}" for o in rec.outputs]
        if self.final:
            rets += [f"final_{s.name}" for s in rec.states]
        self.emit(top, f"return {', '.join(rets)}" + ("," if len(rets) == 1 else ""))
        body = []
        self.flatten(top.lines, 1, body)
        # size constants the kernel never reads are dead lines: drop them
        text = "\n".join(body)
        body = [ln for ln in body if not (m := re.match(r"\s*(N_\w+) = \d+$", ln))
                or len(re.findall(rf"\b{m.group(1)}\b", text)) > 1]
        if any("math." in ln for ln in body):  # constants folded at trace time
            lines.insert(lines.index("import nki"), "import math\n")
        return "\n".join(lines + body) + "\n"

    def pd_loops(self, sc: Scope):
        """The outer loops and the partition-tile loop: (innermost scope, env, scopes)."""
        inner, env, scopes = self.inner_loops(sc, self.outer, {}, "i")
        pdl = self.open(inner, f"for p0 in range(0, N_{self.pd}, 128):", self.npt)
        scopes.append(pdl)
        self.emit(pdl, f"p1 = min(p0 + 128, N_{self.pd})")
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
        tl = self.open(sc, f"for t0 in range(0, N_{self.time}, {self.tt}):",
                       -(-self.T // self.tt))
        self.emit(tl, f"t1 = min(t0 + {self.tt}, N_{self.time})")
        self.emit(tl, "tw = t1 - t0")
        return tl

    def alloc_carries(self, sc: Scope, nslots: int) -> None:
        for s in self.rec.states:
            if s.name in self.chunks:  # a (K, V) tile: K on the partitions
                shape, rows = (128, nslots, self.pe), f"0:{self.sizes[self.chunks[s.name].kd]}"
            else:
                r = self.rows(s)
                shape, rows = (128 if r == "P" else 1, nslots, self.n_inner(s)), f"0:{r}"
            self.sbuf_sites.append(4 * shape[1] * shape[2])
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

    def kernel_name(self) -> str:
        return f"{self.rec.name}_kernel"

    def flatten(self, items, depth: int, out: list) -> None:
        for it in items:
            if isinstance(it, tuple):
                out.append("    " * depth + it[0])
                self.flatten(it[1], depth + 1, out)
            else:
                out.append("    " * depth + it)

    def budget(self) -> tuple[int, int]:
        """(SBUF bytes per partition the kernel may hold at once, PSUM banks)."""
        return sum(self.sbuf_sites) + max(self.sbuf_sites), self.PSUM_POOL + 1


LOOP_ORDERS = {"auto": (False, True), "outer": (False,), "time": (True,)}


def plan_and_render(rec: Recurrence, sizes: Mapping[str, int], initial_state: bool,
                    final_state: bool, target: str = "trn1", tt: int | None = None,
                    algorithm: str = "auto", loop_order: str = "auto") -> tuple[str, Plan]:
    """Choose the time tile and loop order, and render the kernel: the largest time tile
    with a kernel that fits SBUF/PSUM, and at that tile the loop order that moves the fewest
    DMA bytes (a static count: each DMA's bytes times its loops' trip counts). The chunked
    form puts a time tile on the partitions, so it caps the tile at 128 steps."""
    if target not in E.SBUF_BYTES:
        raise UnsupportedError(NAME, rec.name, f"unknown target {target!r} "
                               f"(known: {', '.join(E.SBUF_BYTES)})")
    if loop_order not in LOOP_ORDERS:
        raise UnsupportedError(NAME, rec.name, f"unknown loop_order {loop_order!r} "
                               f"(known: {', '.join(LOOP_ORDERS)})")
    budget = E.SBUF_BYTES[target]
    T = sizes[rec.time]
    probe = Renderer(rec, sizes, 1, initial_state, final_state, algorithm)
    top = 128 if probe.chunks else E.MATMUL_MOVING_MAX
    cands = [tt] if tt is not None else sorted({min(c, T, top) for c in TT_CANDIDATES},
                                               reverse=True)
    if tt is not None and not 1 <= tt <= top:
        raise UnsupportedError(NAME, rec.name, f"time tile {tt} must be in 1..{top}")
    need = None
    for c in cands:
        fits = []
        for time_outer in LOOP_ORDERS[loop_order]:
            r = Renderer(rec, sizes, c, initial_state, final_state, algorithm, time_outer)
            src = r.render()
            sb, banks = r.budget()
            if sb <= budget and banks <= E.PSUM_BANKS:
                fits.append((r.dma_bytes, time_outer, src, r))
            elif need is None or sb < need[1] or need[0] != c:
                need = (c, sb)
        if fits:
            dma, time_outer, src, r = min(fits, key=lambda f: (f[0], f[1]))
            sb, banks = r.budget()
            return src, Plan(r.pd, r.outer, c, sb, banks, tuple(r.chunks),
                             "time" if time_outer else "outer", dma)
    shape = ", ".join(f"{d}={sizes[d]}" for d in (rec.time,) + rec.canonical)
    raise PlanError(NAME, rec.name, f"no tile plan fits: at time tile {need[0]} the kernel needs "
                    f"{need[1]} B of SBUF per partition, the {target} budget is {budget} B "
                    f"(shape {shape})")

