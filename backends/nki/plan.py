"""The NKI plan step: what the kernel will look like, decided before any code is written.

Static (from the IR, the sizes and the hardware table, ``hardware.py``):

- the **IR the emitter lowers**: the recurrence after the canonical passes
  (``scancc.ir.passes.canonicalize``, so ``exp(x) - 1`` is one ``expm1`` node with its own
  rule; ``l2norm`` has a rule that lowers its expansion);
- the **layout**: the partition dim ``pd`` (on the 128 partitions, tiled by 128) and the outer
  dims (trace-time loops outside the partition tile); every other dim loops inside the time tile;
- the **algorithm per state**: ``"chunked"`` (the matmul form, ``chunked.find_chunked``) or
  ``"recurrent"`` (a scan or a per-step loop, by transition kind);
- the **time-tile candidates** (512, 256, ..., 1; at most 128 with a chunked state; at most T)
  and the **loop orders** to consider;
- the chip's **budget**: usable SBUF bytes per partition and PSUM banks.

The choice among the candidates (``choose``): the largest time tile whose kernel fits the
budget, and at that tile the loop order that moves the fewest DMA bytes. A candidate's
resources (SBUF bytes per partition, PSUM banks, DMA bytes) are counted from the emitter's
allocation and transfer records (data, never the generated text), passed in as ``measure``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from scancc.ir import Kind, Op, Recurrence
from scancc.ir.passes import canonicalize

from ..base import UnsupportedError
from ..rules import Rules
from .chunked import ChunkPlan, constant_sites, find_chunked
from .hardware import CHIPS, DEFAULT_CHIP, Chip
from .values import NAME

TT_CANDIDATES = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
ALGORITHMS = ("auto", "recurrent", "chunked")
# per-step kinds stepped one column of the other looped dims at a time, the axis last
AXIS_LAST = (Kind.HOUSEHOLDER, Kind.COMPANION_ADJOINT, Kind.DENSE_ADJOINT, Kind.DENSE,
             Kind.DPLR)
# loop_order option -> the orders tried (False: outer dims > partition tile > time tile;
# True: the time tile outermost)
LOOP_ORDERS = {"auto": (False, True), "outer": (False,), "time": (True,)}


class PlanError(UnsupportedError):
    """No tile plan fits the on-chip budget."""


@dataclass
class Plan:
    """The plan the kernel was emitted with."""
    pd: str
    outer: tuple[str, ...]
    tt: int
    sbuf_bytes: int = 0
    psum_banks: int = 0
    chunked: tuple[str, ...] = ()   # states lowered in the chunked (matmul) form
    loop_order: str = "outer"       # "outer": outer dims > partition tile > time tile; "time"
    dma_bytes: int = 0              # the count the loop order was chosen by
    chip: str = DEFAULT_CHIP
    algorithms: dict = field(default_factory=dict)  # state -> "recurrent" | "chunked"
    summed: tuple[str, ...] = ()    # outer dims some outputs are summed over (Space.summed)


@dataclass
class Space:
    """The static part of the plan: everything but the choice of time tile and loop order.
    ``rec`` is the canonical IR the emitter lowers, ``source`` the recurrence as given (the
    kernel's header comment)."""
    rec: Recurrence
    sizes: dict
    chip: Chip
    pd: str
    outer: tuple[str, ...]
    chunks: dict[str, ChunkPlan]    # the states in the chunked form, by name
    tiles: tuple[int, ...]          # time-tile candidates, largest first
    orders: tuple[bool, ...]        # loop orders (time tile outermost?)
    source: Recurrence | None = None
    # outer dims that some outputs lack and sum over (``summed_candidates``): each outer
    # iteration adds its part into those outputs (the first stores, the others accumulate)
    summed: tuple[str, ...] = ()

    @property
    def algorithms(self) -> dict[str, str]:
        return {s.name: "chunked" if s.name in self.chunks else "recurrent"
                for s in self.rec.states}

    @property
    def prevs(self) -> set[str]:
        """States read through prev(S): their trajectory keeps the entering state in column 0."""
        exprs = [o.expr for o in self.rec.outputs] + [lt.expr for lt in self.rec.lets]
        exprs += [e for _, e in self.rec.exprs()]  # a cascade's prev() reads too
        return {n.arg for e in exprs for n in e.walk() if n.op is Op.PREV}

    def inner_dims(self, s) -> tuple[str, ...]:
        """A state's looped dims (not the partition dim, not outer); a shift/companion axis
        first, so a shift is a flat offset; the axis last for the kinds in AXIS_LAST."""
        ds = tuple(d for d in self.rec.canonical if d in s.dims and d != self.pd
                   and d not in self.outer)
        ax = s.transition.axis
        if s.transition.kind in AXIS_LAST and ax in ds:        # the axis last: each
            return tuple(d for d in ds if d != ax) + (ax,)       # column is contiguous
        return ((ax,) + tuple(d for d in ds if d != ax)) if ax in ds else ds

    def n_inner(self, s) -> int:
        return math.prod(self.sizes[d] for d in self.inner_dims(s))

    def slots(self, time_outer: bool) -> int:
        """Carry slots: one per (outer index, partition tile) with the time tile outermost."""
        if not time_outer:
            return 1
        return math.prod(self.sizes[d] for d in self.outer) * -(-self.sizes[self.pd] //
                                                                 self.chip.partitions)

    def storage(self, tt: int, time_outer: bool) -> list[int]:
        """SBUF bytes per partition of the kernel's fixed tiles, one entry per allocation
        site: the constants, every state's carry and its per-kind tiles (trajectory, history,
        materialized operands; ``STORAGE``). The emitter's expression temporaries come on
        top; ``tests/test_nki_rules.py`` checks these equal what the emitter allocates."""
        sites = [4 * tt, 4 * 128, 4] + constant_sites(self.chunks, min(tt, self.sizes[self.rec.time]))
        nslots = self.slots(time_outer)
        pe = min(self.sizes[self.pd], self.chip.partitions)
        for s in self.rec.states:
            if s.name in self.chunks:  # a (K, V) carry; the chunk's tiles are temporaries
                sites.append(4 * nslots * pe)
                continue
            sites.append(4 * nslots * self.n_inner(s))
            sites += STORAGE.lookup(s.transition.kind, self.rec.name)(self, s, tt)
        return sites


@dataclass
class Resources:
    """What one emitted candidate needs: SBUF bytes per partition, PSUM banks, DMA bytes."""
    sbuf_bytes: int
    psum_banks: int
    dma_bytes: int


# ---- per-kind storage: the tiles a transition rule allocates (rules.py), in bytes ----

STORAGE = Rules("nki", "storage")


def _traj(sp: Space, s, tt: int) -> int:
    return 4 * sp.n_inner(s) * (tt + (s.name in sp.prevs))


@STORAGE.register(Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL)
def _scan_storage(sp: Space, s, tt: int) -> list[int]:
    return [_traj(sp, s, tt)]


@STORAGE.register(Kind.SHIFT)
def _shift_storage(sp: Space, s, tt: int) -> list[int]:
    na = sp.sizes[s.transition.axis]
    return [4 * (sp.n_inner(s) // na) * (na - 1 + tt)]


@STORAGE.register(Kind.COMPANION)
def _companion_storage(sp: Space, s, tt: int) -> list[int]:
    n = sp.n_inner(s)
    return [_traj(sp, s, tt), 4, 4 * n * tt, 4 * n * tt, 4 * n]


@STORAGE.register(Kind.SELECTION)
def _selection_storage(sp: Space, s, tt: int) -> list[int]:
    m = sp.sizes[s.transition.axis]
    rest = sp.n_inner(s) // m
    return [_traj(sp, s, tt)] + [4 * rest * tt] * 3 + [4 * m] * 4 + [4] * 7 + [4 * rest]


@STORAGE.register(Kind.HOUSEHOLDER)
def _householder_storage(sp: Space, s, tt: int) -> list[int]:
    t, n = s.transition, sp.n_inner(s)
    na = sp.sizes[t.axis]
    ops = [4 * n * tt, 4 * n * tt] if sp.inner_dims(s) == (t.axis,) else \
        [4 * n * tt, 4 * na * tt]
    scal = [4 * tt] * (1 + (t.operand("alpha") is not None))
    return [_traj(sp, s, tt), 4] + ops + scal + [4 * na]


@STORAGE.register(Kind.DPLR)
def _dplr_storage(sp: Space, s, tt: int) -> list[int]:
    t, n = s.transition, sp.n_inner(s)
    na = sp.sizes[t.axis]
    nops = sum(t.operand(k) is not None for k in ("w", "a", "b"))
    ops = [4 * n * tt] * (1 + nops) if sp.inner_dims(s) == (t.axis,) else \
        [4 * n * tt] + [4 * na * tt] * nops
    return [_traj(sp, s, tt), 4] + ops + [4 * na]


@STORAGE.register(Kind.DENSE)
def _dense_storage(sp: Space, s, tt: int) -> list[int]:
    t, n = s.transition, sp.n_inner(s)
    nm = sp.sizes[t.axis] * sp.sizes[t.col]
    dims = sp.inner_dims(s)  # the axis last; the matrix per column where it varies along them
    if set(dims[:-1]) & set(sp.rec.dims_of(t.operand("matrix"))):
        nm *= n // sp.sizes[t.axis]
    return [_traj(sp, s, tt), 4 * n * tt, 4 * nm * tt, 4 * n]


@STORAGE.register(Kind.SHIFT_ADJOINT, Kind.COMPANION_ADJOINT, Kind.DENSE_ADJOINT)
def _adjoint_storage(sp: Space, s, tt: int) -> list[int]:
    t, n = s.transition, sp.n_inner(s)
    sites = [_traj(sp, s, tt), 4 * n * tt, 4 * n]
    if t.kind is Kind.SHIFT_ADJOINT:
        return sites
    dims = sp.inner_dims(s)
    opn = t.operand("feedback") if t.kind is Kind.COMPANION_ADJOINT else t.operand("matrix")
    lead = dims[:-1] if set(dims[:-1]) & set(sp.rec.dims_of(opn)) else ()
    own = (t.axis,) if t.kind is Kind.COMPANION_ADJOINT else (t.col, t.axis)
    na = sp.sizes[t.axis]
    return sites + [4 * math.prod(sp.sizes[d] for d in lead + own) * tt, 4 * na]


# ---- per-kind layout requirements: what a transition rule (rules.py) needs of the layout ----

LAYOUT = Rules("nki", "layout")  # a kind without an entry lowers under any layout


@LAYOUT.register(Kind.SELECTION)
def _selection_layout(rec: Recurrence, s, pd: str, outer: tuple[str, ...]) -> str | None:
    """The selection rule (``rules.selection_reads``) steps on (rows, m) tiles: the states its
    ``keys`` and ``filled`` read through prev() must hold the selection axis alone per
    partition (their other dims on the partitions or outer loops), with the partition dim
    in both or in neither. Why not, else None."""
    t = s.transition
    for k in ("keys", "filled"):
        n = t.operand(k)
        if n is None or n.op is not Op.PREV:
            continue  # not a layout question: the rule names what is wrong
        x = rec.state(n.arg)
        rest = [d for d in x.dims if d != t.axis and d != pd and d not in outer]
        if rest:
            return (f"selection state {s.name!r} reads its {k} from {x.name!r}, which would "
                    f"hold {rest} besides {t.axis!r} per partition")
        if (pd in x.dims) != (pd in s.dims):
            return (f"selection state {s.name!r} and its {k} {x.name!r} differ in the "
                    f"partition dim {pd!r}")
    return None


def layout_problem(rec: Recurrence, pd: str, outer: tuple[str, ...]) -> str | None:
    """Why a transition rule cannot lower ``rec`` with ``pd`` on the partitions and ``outer``
    as outer loops (``LAYOUT``), or None."""
    for s in rec.states:
        if s.transition.kind in LAYOUT:
            why = LAYOUT.lookup(s.transition.kind, rec.name)(rec, s, pd, outer)
            if why:
                return why
    return None


def layouts(rec: Recurrence, sizes: Mapping[str, int]) -> list[tuple[str, tuple[str, ...]]]:
    """Every admissible (partition dim, outer dims), preferred first: the partition dim in
    every output, not a per-step axis; most states, then largest, non-batch preferred (or, for
    a backward whose outputs lack a common dim, the dim in the most outputs first); the outer
    dims are the others in every state and output. A layout a transition rule cannot lower
    under (``layout_problem``: a selection state's keys with a dim besides the memory axis per
    partition) is left out, unless every layout is (then the rule names the problem)."""
    axes = {s.transition.axis for s in rec.states} | {s.transition.col for s in rec.states}
    role = {d.name: d.role for d in rec.dims}

    def pref(d):
        return (role[d] != "batch", sum(d in s.dims for s in rec.states), sizes[d],
                -rec.canonical.index(d))
    every = [d for d in rec.canonical if d not in axes
             and all(d in o.dims for o in rec.outputs)]
    # outputs without the partition dim (a backward's grad_B = ungroup(.., chan, groups)):
    # they are rows (reduced over one partition tile), so such a dim must fit in one tile
    some = [d for d in rec.canonical if d not in axes and d not in every
            and any(d in o.dims for o in rec.outputs)]
    if not every and not some:
        raise UnsupportedError(NAME, rec.name, "no dim can go on the partitions: a partition dim "
                               "must be in every output and not be a shift/companion/householder/"
                               "dense axis")
    count = {d: sum(d in o.dims for o in rec.outputs) for d in some}
    order = sorted(every, key=pref, reverse=True) + \
        sorted(some, key=lambda d: (count[d],) + pref(d), reverse=True)
    out = []
    for pd in order:
        # a transition axis is never an outer loop: a step mixes its indices
        outer = tuple(d for d in rec.canonical if d != pd and d not in axes
                      and all(d in s.dims for s in rec.states)
                      and all(d in o.dims for o in rec.outputs))
        out.append((pd, outer))
    admitted = [(pd, outer) for pd, outer in out if layout_problem(rec, pd, outer) is None]
    return admitted or out


def _touches(rec: Recurrence, node, d: str) -> bool:
    return any(n.op is Op.PARAM or d in rec.dims_of(n) for n in node.walk())


def _linear_sum(rec: Recurrence, node, d: str) -> bool:
    """True if ``node`` is a linear combination of sums over ``d`` with coefficients that do
    not vary along ``d``: the parts computed at each index of ``d`` add up to it."""
    op = node.op
    if op is Op.SUM and d in node.arg:
        return not any(n.op is Op.PARAM or (n.op in (Op.SUM, Op.MAX) and d in n.arg)
                       or (n.op in (Op.L2NORM, Op.SOFTMAX, Op.FLIP) and n.arg == d)
                       or (n.op is Op.UNGROUP and d in n.arg) for n in node.src[0].walk())
    if op in (Op.SUM, Op.NEG) or (op is Op.UNGROUP and d not in node.arg):
        return _linear_sum(rec, node.src[0], d)
    if op in (Op.ADD, Op.SUB):
        return all(_linear_sum(rec, x, d) for x in node.src)
    if op is Op.MUL:
        a, b = node.src
        return ((_linear_sum(rec, a, d) and not _touches(rec, b, d))
                or (_linear_sum(rec, b, d) and not _touches(rec, a, d)))
    if op is Op.DIV:
        return _linear_sum(rec, node.src[0], d) and not _touches(rec, node.src[1], d)
    return False


def summed_candidates(rec: Recurrence, sizes: Mapping[str, int], pd: str,
                      outer: tuple[str, ...], costs: bool = False) -> list:
    """Dims that could be outer loops although some outputs lack them: in every state, not
    the partition dim, a transition axis or an ungroup's dim, and every output that lacks one
    sums over it linearly (``_linear_sum``; a backward's gradient of a time-invariant input
    summed over batch, grad_x summed over dstate). Cheapest first: the elements of the
    outputs that accumulate over the dim, times its size (``costs``: (dim, cost) pairs)."""
    axes = {s.transition.axis for s in rec.states} | {s.transition.col for s in rec.states}
    ungrouped = {a for _, r in rec.exprs() for n in r.walk() if n.op is Op.UNGROUP
                 for a in n.arg}
    out = []
    for d in rec.canonical:
        if d == pd or d in outer or d in axes or d in ungrouped:
            continue
        if not all(d in s.dims for s in rec.states):
            continue
        lacking = [o for o in rec.outputs if d not in o.dims]
        if all(_linear_sum(rec, o.expr, d) for o in lacking):
            cost = sizes[d] * sum(math.prod(sizes[e] for e in o.dims) for o in lacking)
            out.append((cost, rec.canonical.index(d), d))
    return [(d, c) if costs else d for c, _, d in sorted(out)]


def choose_layout(rec: Recurrence, sizes: Mapping[str, int]) -> tuple[str, tuple[str, ...]]:
    """The preferred layout (``layouts``' first)."""
    return layouts(rec, sizes)[0]


def plan_space(rec: Recurrence, sizes: Mapping[str, int], chip: str = DEFAULT_CHIP,
               tt: int | None = None, algorithm: str = "auto",
               loop_order: str = "auto") -> Space:
    """The static plan: layout, algorithm per state, time-tile candidates, loop orders and
    budget, from the IR, the sizes and the hardware table (nothing is emitted). The first of
    ``plan_spaces``."""
    return plan_spaces(rec, sizes, chip, tt, algorithm, loop_order)[0]


def plan_spaces(rec: Recurrence, sizes: Mapping[str, int], chip: str = DEFAULT_CHIP,
                tt: int | None = None, algorithm: str = "auto",
                loop_order: str = "auto") -> list[Space]:
    """The static plans worth emitting, preferred first (``plan_and_render`` takes the first
    that ``choose`` fits):

    1. the layouts (``layouts``) whose fixed tiles fit the chip at some time tile, in order
       (a backward whose preferred partition dim is the batch holds every other dim per
       partition: mamba2's at H=8 P=64 N=64 needs 656 KB; on heads, 49 KB);
    2. the layouts with summed outer dims (``summed_candidates``, cheapest first, as few as
       give a time tile of GOOD_TILE steps), cheapest accumulation first: mamba2's backward
       at H=80 P=64 N=128 holds batch x headdim x dstate per partition, 13 MB at time tile 1;
       with one batch and one headdim at a time, dstate on the partitions, 140 KB at 64;
    3. the same with as few summed dims as fit at time tile 1.

    Nothing fits: the preferred layout alone (``choose`` names the budget and the shape)."""
    def fail(what: str, cls=UnsupportedError):
        raise cls(NAME, rec.name, what)

    if chip not in CHIPS:
        fail(f"unknown chip {chip!r} (known: {', '.join(CHIPS)})")
    if loop_order not in LOOP_ORDERS:
        fail(f"unknown loop_order {loop_order!r} (known: {', '.join(LOOP_ORDERS)})")
    if algorithm not in ALGORITHMS:
        fail(f"unknown algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    hw = CHIPS[chip]
    sizes = dict(sizes)
    source, rec = rec, canonicalize(rec)
    fitting, spaces, problem = [], [], None
    for pd, outer in layouts(rec, sizes):
        lacking = [o.name for o in rec.outputs if pd not in o.dims]
        if lacking and sizes[pd] > hw.partitions:
            problem = problem or (f"outputs {lacking} lack the partition dim {pd!r} of size "
                                  f"{sizes[pd]} > {hw.partitions} (they need it in one "
                                  "partition tile)")
            continue
        chunks = {} if algorithm == "recurrent" else find_chunked(rec, pd, outer, sizes)
        if algorithm == "chunked" and not chunks:
            problem = problem or ("the chunked (matmul) form needs an identity, scalar or "
                                  "key-diagonal state "
                                  "[..., K, V] with V on the partitions, K <= 128, an inject "
                                  "k * v and readouts sum(S * q, K), all read with time before "
                                  "the feature dim")
            continue
        # the chunked form puts a time tile on the partitions; a matmul's moving free dim <= 512
        top = hw.partitions if chunks else hw.matmul_moving_max
        T = sizes[rec.time]
        if tt is not None:
            if not 1 <= tt <= top:
                fail(f"time tile {tt} must be in 1..{top}")
            tiles = (tt,)
        else:
            tiles = tuple(sorted({min(c, T, top) for c in TT_CANDIDATES}, reverse=True))
        sp = Space(rec, sizes, hw, pd, outer, chunks, tiles, LOOP_ORDERS[loop_order], source)
        spaces.append(sp)
        if _fits(sp, tiles[-1]):
            fitting.append(sp)
    if not spaces:
        fail(problem)
    good, small = [], []
    for sp in spaces if algorithm != "chunked" else ():
        if not all(sp.pd in s.dims for s in rec.states):
            continue  # a state without the partition dim is one row: not split further
        extra, cost, found = [], 0, False
        for d, c in summed_candidates(sp.rec, sizes, sp.pd, sp.outer, costs=True):
            extra.append(d)
            cost += c
            outer = tuple(e for e in rec.canonical if e in sp.outer or e in extra)
            ss = Space(rec, sizes, hw, sp.pd, outer, {}, sp.tiles, sp.orders, source,
                       tuple(e for e in rec.canonical if e in extra))
            key = (cost, -min(sizes[sp.pd], hw.partitions))  # then the most partitions
            if not found and _fits(ss, sp.tiles[-1]):
                small.append((key, len(small), ss))
                found = True
            if _fits(ss, min(sp.tiles[0], GOOD_TILE)):
                good.append((key, len(good), ss))
                break
    # past the first fitting layout (the one plan before candidates were tried in turn),
    # only layouts with the partition dim in every state
    out = fitting[:1] + [sp for sp in fitting[1:] if all(sp.pd in s.dims for s in rec.states)]
    out += [x[2] for x in sorted(good)] + [x[2] for x in sorted(small)]
    return out or spaces[:1]


# with summed outer dims, add them until the fixed tiles fit at a time tile of this many steps
GOOD_TILE = 32


def _fits(sp: Space, tile: int) -> bool:
    """The fixed tiles of ``sp`` fit the chip at time tile ``tile`` in some loop order."""
    return any(sum(f) + max(f) <= sp.chip.sbuf_bytes
               for f in (sp.storage(tile, o) for o in sp.orders))


def choose(space: Space, measure: Callable[[int, bool], tuple[Resources, Any]]
           ) -> tuple[Plan, Any]:
    """The largest time tile with a candidate that fits the chip, and at that tile the loop
    order with the fewest DMA bytes. ``measure(tt, time_outer)`` emits one candidate and
    returns its resources and the emitted artifact."""
    hw, rec = space.chip, space.rec
    need = None
    for c in space.tiles:
        fits = []
        for time_outer in space.orders:
            fixed = space.storage(c, time_outer)
            if sum(fixed) + max(fixed) > hw.sbuf_bytes:  # cannot fit: skip without emitting
                if need is None or need[0] != c or sum(fixed) + max(fixed) < need[1]:
                    need = (c, sum(fixed) + max(fixed), "at least ")
                continue
            res, art = measure(c, time_outer)
            if res.sbuf_bytes <= hw.sbuf_bytes and res.psum_banks <= hw.psum_banks:
                fits.append((res.dma_bytes, time_outer, res, art))
            elif need is None or res.sbuf_bytes < need[1] or need[0] != c:
                need = (c, res.sbuf_bytes, "")
        if fits:
            dma, time_outer, res, art = min(fits, key=lambda f: (f[0], f[1]))
            return Plan(space.pd, space.outer, c, res.sbuf_bytes, res.psum_banks,
                        tuple(space.chunks), "time" if time_outer else "outer", dma,
                        hw.name, space.algorithms, space.summed), art
    shape = ", ".join(f"{d}={space.sizes[d]}" for d in (rec.time,) + rec.canonical)
    raise PlanError(NAME, rec.name, f"no tile plan fits: at time tile {need[0]} the kernel needs "
                    f"{need[2]}{need[1]} B of SBUF per partition, the {hw.name} budget is "
                    f"{hw.sbuf_bytes} B (shape {shape})")


__all__ = ["ALGORITHMS", "LOOP_ORDERS", "Plan", "PlanError", "Resources", "Space", "choose",
           "choose_layout", "layout_problem", "layouts", "plan_space", "plan_spaces",
           "summed_candidates"]
