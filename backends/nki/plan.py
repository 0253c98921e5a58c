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
from .chunked import ChunkPlan, find_chunked
from .hardware import CHIPS, DEFAULT_CHIP, Chip
from .values import NAME

TT_CANDIDATES = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
ALGORITHMS = ("auto", "recurrent", "chunked")
# per-step kinds stepped one column of the other looped dims at a time, the axis last
AXIS_LAST = (Kind.HOUSEHOLDER, Kind.COMPANION_ADJOINT, Kind.DENSE_ADJOINT)
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
        sites = [4 * tt, 4 * 128, 4] + ([512, 512] if self.chunks else [])
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


@STORAGE.register(Kind.DENSE)
def _dense_storage(sp: Space, s, tt: int) -> list[int]:
    t, n = s.transition, sp.n_inner(s)
    nm = sp.sizes[t.axis] * sp.sizes[t.col]
    return [_traj(sp, s, tt), 4, 4 * n * tt, 4 * nm * tt, 4 * n]


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


def layouts(rec: Recurrence, sizes: Mapping[str, int]) -> list[tuple[str, tuple[str, ...]]]:
    """Every admissible (partition dim, outer dims), preferred first: the partition dim in
    every output, not a per-step axis; most states, then largest, non-batch preferred (or, for
    a backward whose outputs lack a common dim, the dim in the most outputs first); the outer
    dims are the others in every state and output."""
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
    return out


def choose_layout(rec: Recurrence, sizes: Mapping[str, int]) -> tuple[str, tuple[str, ...]]:
    """The preferred layout (``layouts``' first)."""
    return layouts(rec, sizes)[0]


def plan_space(rec: Recurrence, sizes: Mapping[str, int], chip: str = DEFAULT_CHIP,
               tt: int | None = None, algorithm: str = "auto",
               loop_order: str = "auto") -> Space:
    """The static plan: layout, algorithm per state, time-tile candidates, loop orders and
    budget, from the IR, the sizes and the hardware table (nothing is emitted)."""
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
    # the preferred layout whose smallest kernel fits the chip; others when it does not (a
    # backward whose preferred partition dim is the batch holds every other dim per
    # partition: mamba2's at H=8 P=64 N=64 needs 656 KB; on heads, 49 KB)
    first, problem = None, None
    for pd, outer in layouts(rec, sizes):
        lacking = [o.name for o in rec.outputs if pd not in o.dims]
        if lacking and sizes[pd] > hw.partitions:
            problem = problem or (f"outputs {lacking} lack the partition dim {pd!r} of size "
                                  f"{sizes[pd]} > {hw.partitions} (they need it in one "
                                  "partition tile)")
            continue
        chunks = {} if algorithm == "recurrent" else find_chunked(rec, pd, outer, sizes)
        if algorithm == "chunked" and not chunks:
            problem = problem or ("the chunked (matmul) form needs a scalar/identity state "
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
        first = first or sp
        if any(sum(f) + max(f) <= hw.sbuf_bytes
               for f in (sp.storage(tiles[-1], o) for o in sp.orders)):
            return sp
    if first is None:
        fail(problem)
    return first  # nothing fits: choose() names the budget and the shape


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
                        hw.name, space.algorithms), art
    shape = ", ".join(f"{d}={space.sizes[d]}" for d in (rec.time,) + rec.canonical)
    raise PlanError(NAME, rec.name, f"no tile plan fits: at time tile {need[0]} the kernel needs "
                    f"{need[2]}{need[1]} B of SBUF per partition, the {hw.name} budget is "
                    f"{hw.sbuf_bytes} B (shape {shape})")


__all__ = ["ALGORITHMS", "LOOP_ORDERS", "Plan", "PlanError", "Resources", "Space", "choose",
           "choose_layout", "layouts", "plan_space"]
