"""A strict NumPy emulator of the NKI subset the scancc NKI backend emits.

It mirrors the current NKI API (``import nki``, ``nki.language as nl``, ``nki.isa as nisa``,
dst-first ISA calls, ``nl.shared_hbm`` outputs returned from the kernel) and is stricter than
the official simulator: besides shapes, dtypes, memory spaces and engines it tracks SBUF bytes
per partition and PSUM banks against the trn1/trn2 budgets. Fresh buffers are NaN-filled, math
is float32, and every write is rounded to the destination dtype (bfloat16: round to nearest
even). Each run reports DMA bytes, instructions per engine and a cost-model cycle estimate.

The emulator is never installed as ``nki`` in ``sys.modules``: ``load_kernel`` executes kernel
source with its ``nki`` imports resolved to the modules built here (see ``MODULES``).
"""
from __future__ import annotations

import builtins
import math
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .hardware import CHIPS, DEFAULT_CHIP

# the limits, from the hardware table (the same on every chip in it but the SBUF size)
_HW = CHIPS[DEFAULT_CHIP]
PMAX = _HW.partitions           # partitions of SBUF and PSUM
PSUM_BANKS = _HW.psum_banks
PSUM_BANK_BYTES = _HW.psum_bank_bytes  # per partition
MATMUL_K_MAX, MATMUL_STATIONARY_MAX, MATMUL_MOVING_MAX = (
    _HW.matmul_k_max, _HW.matmul_stationary_max, _HW.matmul_moving_max)
TRANSPOSE_MAX = _HW.transpose_max
SBUF_BYTES = {name: chip.sbuf_bytes for name, chip in CHIPS.items()}
# cost-model constants: the engine costs are the Neuron SDK docs' rough NKI cost model
# (docs/nki.md, "The emulator"); the DMA rate and the clock are assumptions (about 0.4 TB/s of HBM bandwidth per NeuronCore at 1.4 GHz)
MIN_CYCLES = 64
DMA_BYTES_PER_CYCLE = 286.0
DMA_FIXED_CYCLES = 64
CLOCK_HZ = 1.4e9
ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma")


class NkiError(Exception):
    """A kernel broke an NKI rule: the message names the instruction, the rule and the shapes."""


# ---- dtypes and memory spaces ----

def _round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32).copy()
    nan = np.isnan(x)
    out[nan] = np.nan
    return out


@dataclass(frozen=True)
class Dtype:
    name: str
    itemsize: int
    round: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"nl.{self.name}"


float32 = Dtype("float32", 4, lambda x: np.asarray(x, np.float32))
bfloat16 = Dtype("bfloat16", 2, _round_bf16)
float16 = Dtype("float16", 2, lambda x: np.asarray(x, np.float32).astype(np.float16)
                .astype(np.float32))
DTYPES = {d.name: d for d in (float32, bfloat16, float16)}
# an integer dtype for predicates (nisa.tensor_copy_predicated); not a kernel input/output dtype
uint8 = Dtype("uint8", 1, lambda x: np.clip(np.rint(np.nan_to_num(
    np.asarray(x, np.float32), nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.float32))
INT_DTYPES = {"uint8": uint8}


@dataclass(frozen=True)
class Buffer:
    name: str

    @property
    def on_chip(self) -> bool:
        return self.name in ("sbuf", "psum")

    def __repr__(self) -> str:
        return f"nl.{self.name}"


sbuf, psum, hbm, shared_hbm = Buffer("sbuf"), Buffer("psum"), Buffer("hbm"), Buffer("shared_hbm")
BUFFERS = (sbuf, psum, hbm, shared_hbm)


@dataclass(frozen=True)
class AluOp:
    """An operator of nki.language usable as an ISA enum argument (``nl.add``, ``nl.exp``)."""
    name: str
    arity: int
    fn: Callable = field(repr=False, compare=False)

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def __call__(self, *a, **k):
        raise NkiError(f"nl.{self.name}: tile arithmetic is not part of the current NKI API; "
                       "use it as the op of an nisa instruction")


def _sigmoid(x):
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


_BINARY = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide,
    "maximum": np.maximum, "minimum": np.minimum,
    "not_equal": lambda a, b: np.not_equal(a, b).astype(np.float32),
    "equal": lambda a, b: np.equal(a, b).astype(np.float32),
    "greater_equal": lambda a, b: np.greater_equal(a, b).astype(np.float32),
    "less": lambda a, b: np.less(a, b).astype(np.float32),
}
_UNARY = {
    "exp": np.exp, "log": np.log, "sigmoid": _sigmoid, "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(np.float32(0.0), x), "sqrt": np.sqrt,
    "rsqrt": lambda x: np.float32(1.0) / np.sqrt(x), "tanh": np.tanh, "copy": lambda x: x,
    "square": np.square, "reciprocal": lambda x: np.float32(1.0) / x,
    "cos": np.cos, "sin": np.sin, "abs": np.abs,
}
OPS = {**{k: AluOp(k, 2, f) for k, f in _BINARY.items()},
       **{k: AluOp(k, 1, f) for k, f in _UNARY.items()}}


# ---- the machine: one per kernel run ----

@dataclass
class Counters:
    dma_bytes_in: int = 0
    dma_bytes_out: int = 0
    dma_transfers: int = 0
    instructions: dict = field(default_factory=lambda: {e: 0 for e in ENGINES})
    cycles: dict = field(default_factory=lambda: {e: 0 for e in ENGINES})
    peak_sbuf_bytes: int = 0
    peak_psum_banks: int = 0

    def as_dict(self) -> dict:
        busy = max(self.cycles.values()) if self.cycles else 0
        return {"dma_bytes_in": self.dma_bytes_in, "dma_bytes_out": self.dma_bytes_out,
                "dma_transfers": self.dma_transfers, "instructions": dict(self.instructions),
                "cycles": dict(self.cycles), "cycles_bound": busy,
                "projected_seconds": busy / CLOCK_HZ,
                "peak_sbuf_bytes_per_partition": self.peak_sbuf_bytes,
                "peak_psum_banks": self.peak_psum_banks}


class Machine:
    def __init__(self, chip: str, kernel_code=None):
        if chip not in CHIPS:
            raise NkiError(f"unknown chip {chip!r} (known: {', '.join(CHIPS)})")
        self.chip, self.kernel_code = chip, kernel_code
        self.sbuf_budget = CHIPS[chip].sbuf_bytes
        self.sbuf_live = 0
        self.psum_live = 0
        self.counters = Counters()

    def allocate(self, buffer: Buffer, per_partition: int, what: str) -> None:
        c = self.counters
        if buffer is sbuf:
            if self.sbuf_live + per_partition > self.sbuf_budget:
                raise NkiError(f"{what}: SBUF overflow: {per_partition} B per partition requested "
                               f"with {self.sbuf_live} B live; usable SBUF on {self.chip} is "
                               f"{self.sbuf_budget} B per partition")
            self.sbuf_live += per_partition
            c.peak_sbuf_bytes = max(c.peak_sbuf_bytes, self.sbuf_live)
        elif buffer is psum:
            banks = max(1, math.ceil(per_partition / PSUM_BANK_BYTES))
            if self.psum_live + banks > PSUM_BANKS:
                raise NkiError(f"{what}: PSUM overflow: {banks} bank(s) requested with "
                               f"{self.psum_live} of {PSUM_BANKS} banks live")
            self.psum_live += banks
            c.peak_psum_banks = max(c.peak_psum_banks, self.psum_live)

    def release(self, buffer: Buffer, per_partition: int) -> None:
        if buffer is sbuf:
            self.sbuf_live -= per_partition
        elif buffer is psum:
            self.psum_live -= max(1, math.ceil(per_partition / PSUM_BANK_BYTES))

    def count(self, engine: str, cycles: float) -> None:
        self.counters.instructions[engine] += 1
        self.counters.cycles[engine] += int(math.ceil(cycles))


_machine: Machine | None = None


def _m(what: str) -> Machine:
    if _machine is None:
        raise NkiError(f"{what}: called outside a kernel run (call the @nki.jit kernel)")
    return _machine


# ---- tensors ----

class _Alloc:
    """The storage of one ``nl.ndarray``; its capacity is returned when the last view dies."""
    __slots__ = ("array", "buffer", "dtype", "__weakref__")

    def __init__(self, array, buffer, dtype):
        self.array, self.buffer, self.dtype = array, buffer, dtype


class Tensor:
    """An NKI tensor or a view of one (basic slicing only: ints and step-1 slices)."""
    __slots__ = ("alloc", "view", "name", "written", "__weakref__")

    def __init__(self, alloc: _Alloc, view: np.ndarray, name: str, written=None):
        self.alloc, self.view, self.name = alloc, view, name
        self.written = written  # PSUM only: the matching view of the matmul written-mask

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.view.shape)

    @property
    def dtype(self) -> Dtype:
        return self.alloc.dtype

    @property
    def buffer(self) -> Buffer:
        return self.alloc.buffer

    def __repr__(self) -> str:
        return f"<{self.buffer.name} tensor {self.name} {self.shape} {self.dtype.name}>"

    def __getitem__(self, idx) -> "Tensor":
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) > len(self.shape):
            raise NkiError(f"{self.name}{list(self.shape)}: {len(idx)} indices for a "
                           f"{len(self.shape)}-D tensor")
        for i, ix in enumerate(idx):
            if isinstance(ix, slice):
                if ix.step not in (None, 1):
                    raise NkiError(f"{self.name}: slice step {ix.step} on dim {i}: only step-1 "
                                   "slices are supported")
                n = self.shape[i]
                lo, hi = ix.start or 0, n if ix.stop is None else ix.stop
                if not (0 <= lo < hi <= n):
                    raise NkiError(f"{self.name}{list(self.shape)}: slice {lo}:{hi} of dim {i} is "
                                   f"empty or out of bounds (size {n})")
            elif isinstance(ix, (int, np.integer)) and not isinstance(ix, bool):
                if not 0 <= ix < self.shape[i]:
                    raise NkiError(f"{self.name}{list(self.shape)}: index {ix} out of bounds on "
                                   f"dim {i} (size {self.shape[i]})")
            else:
                raise NkiError(f"{self.name}: unsupported index {ix!r} (ints and slices only)")
        if self.buffer.on_chip:
            if not isinstance(idx[0], slice):
                raise NkiError(f"{self.name}: an integer index on the partition dim: on-chip "
                               "tiles keep their partition dim (slice it, e.g. t[0:1, ...])")
            v = self.view[idx]
            if v.ndim < 2:
                raise NkiError(f"{self.name}: indexing gives a {v.ndim}-D tile {v.shape}; "
                               "on-chip tiles are at least 2-D (keep a unit dim: i:i+1)")
        else:
            v = self.view[idx]
            if not isinstance(v, np.ndarray):  # every dim indexed: keep a 0-d view
                v = self.view[idx + (Ellipsis,)]
        return Tensor(self.alloc, v, self.name,
                      None if self.written is None else self.written[idx])

    # the partition range this view covers (on-chip tiles)
    def partitions(self) -> tuple[int, int]:
        base = self.alloc.array
        off = (self.view.__array_interface__["data"][0] - base.__array_interface__["data"][0])
        start = off // base.strides[0] if base.strides[0] else 0
        return int(start), int(start + self.shape[0])

    def free_size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))


def _new(shape, dtype, buffer, name) -> Tensor:
    arr = np.full(shape, np.nan, dtype=np.float32)
    alloc = _Alloc(arr, buffer, dtype)
    if buffer.on_chip:
        per_part = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        mach = _m(f"nl.ndarray {name}")
        mach.allocate(buffer, per_part, f"nl.ndarray {name}{list(shape)} {dtype.name}")
        weakref.finalize(alloc, mach.release, buffer, per_part)
    return Tensor(alloc, arr, name, np.zeros(shape, dtype=bool) if buffer is psum else None)


def _reject_kwargs(what: str, kwargs: dict) -> None:
    if kwargs:
        raise NkiError(f"{what}: unknown keyword argument(s) {sorted(kwargs)}")


_anon = [0]


def ndarray(shape, dtype, buffer=None, name=None, **kwargs) -> Tensor:
    """``nl.ndarray``: a new tensor in ``buffer`` (default SBUF), filled with NaN."""
    _reject_kwargs("nl.ndarray", kwargs)
    buffer = sbuf if buffer is None else buffer
    if not isinstance(dtype, Dtype):
        raise NkiError(f"nl.ndarray: dtype must be an nl dtype (nl.float32, ...), got {dtype!r}")
    if not isinstance(buffer, Buffer):
        raise NkiError(f"nl.ndarray: buffer must be nl.sbuf, nl.psum, nl.hbm or nl.shared_hbm, "
                       f"got {buffer!r}")
    shape = tuple(shape)
    if not shape or any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1
                        for s in shape):
        raise NkiError(f"nl.ndarray: shape {shape} must be positive integers")
    shape = tuple(int(s) for s in shape)
    _anon[0] += 1
    nm = name if isinstance(name, str) else f"t{_anon[0]}"
    what = f"nl.ndarray {nm}{list(shape)}"
    if buffer.on_chip:
        if len(shape) < 2:
            raise NkiError(f"{what} in {buffer.name}: on-chip tiles are at least 2-D, e.g. (N, 1)")
        if shape[0] > PMAX:
            raise NkiError(f"{what} in {buffer.name}: partition dim {shape[0]} > {PMAX}")
        if buffer is psum and int(np.prod(shape[1:])) * dtype.itemsize > PSUM_BANK_BYTES:
            raise NkiError(f"{what} in psum: {int(np.prod(shape[1:])) * dtype.itemsize} B per "
                           f"partition exceeds one PSUM bank ({PSUM_BANK_BYTES} B)")
    mach = _m(what)
    if buffer is shared_hbm and mach.kernel_code is not None:
        caller = sys._getframe(1).f_code
        if caller is not mach.kernel_code:
            raise NkiError(f"{what}: kernel outputs (nl.shared_hbm) must be created at the "
                           f"kernel's top level, not in {caller.co_name}()")
    return _new(shape, dtype, buffer, nm)


# ---- instruction checks ----

def _tile(x, instr: str, arg: str, allow_psum: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise NkiError(f"{instr}: {arg} must be a tile, got {type(x).__name__}")
    if not x.buffer.on_chip:
        raise NkiError(f"{instr}: {arg} {x.name}{list(x.shape)} is in {x.buffer.name}; compute "
                       "instructions work on SBUF/PSUM tiles (dma_copy it first)")
    if x.buffer is psum and not allow_psum:
        raise NkiError(f"{instr}: {arg} {x.name} is in PSUM, which this engine cannot access")
    lo, hi = x.partitions()
    n = hi - lo
    ok = lo == 0 if n > 64 else (lo in (0, 64) if n > 32 else lo in (0, 32, 64, 96))
    if not ok:
        raise NkiError(f"{instr}: {arg} {x.name} starts at partition {lo} with {n} partitions; "
                       "partition starts must be 0 (>64), 0/64 (33-64) or 0/32/64/96 (1-32)")
    return x


def _same_layout(instr: str, a: Tensor, an: str, b: Tensor, bn: str) -> None:
    if a.shape[0] != b.shape[0] or a.free_size() != b.free_size():
        raise NkiError(f"{instr}: {an} {list(a.shape)} and {bn} {list(b.shape)} must have the same "
                       "partitions and elements per partition")


def _op(x, instr: str, arg: str, arity: int) -> AluOp:
    if not isinstance(x, AluOp):
        raise NkiError(f"{instr}: {arg} must be an nl operator (e.g. nl.add), got {x!r}")
    if x.arity != arity:
        kind = "binary" if arity == 2 else "unary (an activation function)"
        raise NkiError(f"{instr}: {arg}={x!r} is not {kind}")
    return x


def _read(x: Tensor) -> np.ndarray:
    return np.asarray(x.view, dtype=np.float32)


def _write(dst: Tensor, value: np.ndarray) -> None:
    dst.view[...] = dst.dtype.round(np.asarray(value, np.float32).reshape(dst.shape))


def _vector(x, instr: str, arg: str, p: int) -> Any:
    """A scalar immediate or an fp32 (P, 1) tile (per-partition operand)."""
    if isinstance(x, Tensor):
        _tile(x, instr, arg)
        if x.shape != (p, 1) or x.dtype is not float32:
            raise NkiError(f"{instr}: {arg} must be a number or an fp32 ({p}, 1) tile, got "
                           f"{x.name}{list(x.shape)} {x.dtype.name}")
        return _read(x)
    if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        return np.float32(x)
    raise NkiError(f"{instr}: {arg} must be a number or an fp32 (P, 1) tile, got {x!r}")


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


def _vec_cost(dst: Tensor) -> int:
    return max(MIN_CYCLES, dst.free_size())


# ---- nki.isa ----

def tensor_tensor(dst, data1, data2, op, **kwargs):
    """dst = op(data1, data2), elementwise (Vector engine)."""
    I = "nisa.tensor_tensor"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst"), _tile(data1, I, "data1"), _tile(data2, I, "data2")
    _op(op, I, "op", 2)
    if data1.buffer is psum and data2.buffer is psum:
        raise NkiError(f"{I}: data1 and data2 are both in PSUM; at most one operand may be")
    _same_layout(I, data1, "data1", data2, "data2")
    _same_layout(I, dst, "dst", data1, "data1")
    with np.errstate(all="ignore"):
        r = op.fn(_flat(_read(data1)), _flat(_read(data2)))
    _write(dst, r)
    _m(I).count("vector", _vec_cost(dst))


def tensor_scalar(dst, data, op0, operand0, reverse0=False, op1=None, operand1=None,
                  reverse1=False, **kwargs):
    """dst = op1(op0(data, operand0), operand1); operands are numbers or fp32 (P, 1) tiles."""
    I = "nisa.tensor_scalar"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst"), _tile(data, I, "data")
    _same_layout(I, dst, "dst", data, "data")
    p = data.shape[0]
    _op(op0, I, "op0", 2)
    v0 = _vector(operand0, I, "operand0", p)
    x = _flat(_read(data))
    with np.errstate(all="ignore"):
        x = op0.fn(v0, x) if reverse0 else op0.fn(x, v0)
        if op1 is not None:
            _op(op1, I, "op1", 2)
            v1 = _vector(operand1, I, "operand1", p)
            x = op1.fn(v1, x) if reverse1 else op1.fn(x, v1)
        elif operand1 is not None:
            raise NkiError(f"{I}: operand1 given without op1")
    _write(dst, x)
    _m(I).count("vector", _vec_cost(dst))


def activation(dst, op, data, bias=None, scale=1.0, **kwargs):
    """dst = op(data * scale + bias) on the Scalar engine; scale a number or (P, 1), bias (P, 1)."""
    I = "nisa.activation"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst"), _tile(data, I, "data")
    _op(op, I, "op", 1)
    _same_layout(I, dst, "dst", data, "data")
    p = data.shape[0]
    s = _vector(scale, I, "scale", p)
    x = _flat(_read(data)) * s
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise NkiError(f"{I}: bias must be an fp32 ({p}, 1) tile or None, got {bias!r}")
        x = x + _vector(bias, I, "bias", p)
    with np.errstate(all="ignore"):
        _write(dst, op.fn(x.astype(np.float32)))
    _m(I).count("scalar", _vec_cost(dst))


def tensor_reduce(dst, op, data, axis, keepdims=False, **kwargs):
    """dst = reduce(op, data, axis) over free axes only (the last contiguous ones)."""
    I = "nisa.tensor_reduce"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst"), _tile(data, I, "data")
    _op(op, I, "op", 2)
    if op.name not in ("add", "maximum", "minimum", "multiply"):
        raise NkiError(f"{I}: op {op!r} is not a reduction operator")
    nd = len(data.shape)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(a + nd if a < 0 else a for a in axes))
    if not axes or 0 in axes or any(a >= nd for a in axes):
        raise NkiError(f"{I}: axis {axis} of a {nd}-D tile: reductions run over free axes only "
                       "(reduce over partitions with a transpose or a matmul)")
    if axes != tuple(range(nd - len(axes), nd)):
        raise NkiError(f"{I}: axis {axis} must be the last contiguous free axes of {data.shape}")
    red = {"add": np.sum, "maximum": np.max, "minimum": np.min, "multiply": np.prod}[op.name]
    r = red(_read(data), axis=axes, keepdims=keepdims)
    if dst.shape[0] != r.shape[0] or dst.free_size() != int(np.prod(r.shape[1:])):
        raise NkiError(f"{I}: dst {list(dst.shape)} does not hold the result {list(r.shape)}")
    _write(dst, r)
    _m(I).count("vector", max(MIN_CYCLES, data.free_size()))


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False,
                       **kwargs):
    """r[:, i] = op1(op0(data0[:, i], r[:, i-1]), data1[:, i]) with r[:, -1] = initial."""
    I = "nisa.tensor_tensor_scan"
    _reject_kwargs(I, kwargs)
    if reverse0 or reverse1:
        raise NkiError(f"{I}: reverse0/reverse1 are not emulated")
    _tile(dst, I, "dst"), _tile(data0, I, "data0"), _tile(data1, I, "data1")
    _op(op0, I, "op0", 2), _op(op1, I, "op1", 2)
    if data0.buffer is psum and data1.buffer is psum:
        raise NkiError(f"{I}: data0 and data1 are both in PSUM; at most one operand may be")
    _same_layout(I, data0, "data0", data1, "data1")
    _same_layout(I, dst, "dst", data0, "data0")
    p = data0.shape[0]
    r = _vector(initial, I, "initial", p)
    r = np.broadcast_to(np.asarray(r, np.float32).reshape(-1), (p,)).copy()
    a, b = _flat(_read(data0)), _flat(_read(data1))
    out = np.empty_like(a)
    with np.errstate(all="ignore"):
        for i in range(a.shape[1]):
            r = op1.fn(op0.fn(a[:, i], r), b[:, i]).astype(np.float32)
            out[:, i] = r
    _write(dst, out)
    _m(I).count("vector", _vec_cost(dst))


def tensor_copy(dst, src, **kwargs):
    """dst = src (cast to dst's dtype), e.g. PSUM -> SBUF (Vector engine)."""
    I = "nisa.tensor_copy"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst"), _tile(src, I, "src")
    _same_layout(I, dst, "dst", src, "src")
    _write(dst, _read(src))
    _m(I).count("vector", _vec_cost(dst))


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, **kwargs):
    """dst = src where predicate (an integer tile) is nonzero, else dst unchanged (Vector
    engine); src a tile of dst's dtype or a number. Either src or predicate may be in PSUM,
    not both (NKI ``nki.isa.tensor_copy_predicated``)."""
    I = "nisa.tensor_copy_predicated"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst"), _tile(predicate, I, "predicate")
    if predicate.dtype.name not in INT_DTYPES:
        raise NkiError(f"{I}: predicate {predicate.name} must have an integer dtype (nl.uint8), "
                       f"got {predicate.dtype.name}")
    _same_layout(I, dst, "dst", predicate, "predicate")
    if isinstance(src, Tensor):
        _tile(src, I, "src")
        if src.buffer is psum and predicate.buffer is psum:
            raise NkiError(f"{I}: src and predicate are both in PSUM; at most one may be")
        if src.dtype is not dst.dtype:
            raise NkiError(f"{I}: src ({src.dtype.name}) and dst ({dst.dtype.name}) must have "
                           "the same dtype")
        _same_layout(I, dst, "dst", src, "src")
        value = _flat(_read(src))
    elif isinstance(src, (int, float, np.floating, np.integer)) and not isinstance(src, bool):
        value = np.float32(src)
    else:
        raise NkiError(f"{I}: src must be a tile or a number, got {src!r}")
    if not isinstance(reverse_pred, bool):
        raise NkiError(f"{I}: reverse_pred must be a bool, got {reverse_pred!r}")
    take = (_flat(_read(predicate)) != 0) != reverse_pred
    _write(dst, np.where(take, value, _flat(_read(dst))))
    _m(I).count("vector", _vec_cost(dst))


def memset(dst, value, **kwargs):
    """dst = value everywhere (Vector engine)."""
    I = "nisa.memset"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst")
    if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool):
        raise NkiError(f"{I}: value must be a number, got {value!r}")
    _write(dst, np.full(dst.shape, value, np.float32))
    _m(I).count("vector", _vec_cost(dst))


def iota(dst, pattern, offset=0, channel_multiplier=0, **kwargs):
    """dst[p, i...] = offset + channel_multiplier * p + sum(step_k * i_k) (GpSimd engine);
    ``pattern`` is [[step, num], ...], one pair per free dim."""
    I = "nisa.iota"
    _reject_kwargs(I, kwargs)
    _tile(dst, I, "dst", allow_psum=False)
    try:
        pat = [(int(s), int(n)) for s, n in pattern]
    except (TypeError, ValueError):
        raise NkiError(f"{I}: pattern must be [[step, num], ...], got {pattern!r}") from None
    if tuple(n for _, n in pat) != dst.shape[1:] and int(np.prod([n for _, n in pat])) \
            != dst.free_size():
        raise NkiError(f"{I}: pattern {pattern} does not cover dst {list(dst.shape)}")
    v = np.zeros((dst.shape[0],) + tuple(n for _, n in pat), np.float32)
    v += offset + channel_multiplier * np.arange(dst.shape[0]).reshape((-1,) + (1,) * len(pat))
    for k, (s, n) in enumerate(pat):
        shape = [1] * (len(pat) + 1)
        shape[k + 1] = n
        v += s * np.arange(n).reshape(shape)
    _write(dst, v)
    _m(I).count("gpsimd", _vec_cost(dst))


def nc_matmul(dst, stationary, moving, accumulate=None, **kwargs):
    """dst (PSUM, fp32) = stationary.T @ moving; contraction over the partition dim (K).
    ``accumulate=None``: the first write to an element overwrites, later ones accumulate."""
    I = "nisa.nc_matmul"
    _reject_kwargs(I, kwargs)
    _tile(stationary, I, "stationary"), _tile(moving, I, "moving")
    for x, nm in ((stationary, "stationary"), (moving, "moving")):
        if x.buffer is not sbuf:
            raise NkiError(f"{I}: {nm} {x.name} must be in SBUF (the Tensor engine reads SBUF)")
        if len(x.shape) != 2:
            raise NkiError(f"{I}: {nm} {x.name}{list(x.shape)} must be 2-D")
    if not isinstance(dst, Tensor) or dst.buffer is not psum or dst.dtype is not float32:
        raise NkiError(f"{I}: dst must be an fp32 PSUM tile, got {dst!r}")
    _tile(dst, I, "dst")
    (k, m), (k2, n) = stationary.shape, moving.shape
    if k != k2:
        raise NkiError(f"{I}: contraction (partition) dims differ: stationary {[k, m]}, "
                       f"moving {[k2, n]}")
    if k > MATMUL_K_MAX or m > MATMUL_STATIONARY_MAX or n > MATMUL_MOVING_MAX:
        raise NkiError(f"{I}: stationary {[k, m]}, moving {[k2, n]}: limits are K <= "
                       f"{MATMUL_K_MAX}, stationary free <= {MATMUL_STATIONARY_MAX}, moving free "
                       f"<= {MATMUL_MOVING_MAX}")
    if dst.shape != (m, n):
        raise NkiError(f"{I}: dst {list(dst.shape)} must be {[m, n]} (stationary.T @ moving)")
    if stationary.dtype.name in INT_DTYPES:
        raise NkiError(f"{I}: integer operands ({stationary.dtype.name}): the Tensor engine "
                       "multiplies float types only")
    if stationary.dtype is not moving.dtype:
        raise NkiError(f"{I}: stationary ({stationary.dtype.name}) and moving "
                       f"({moving.dtype.name}) must have the same dtype")
    if accumulate not in (None, True, False):
        raise NkiError(f"{I}: accumulate must be None, True or False, got {accumulate!r}")
    r = _read(stationary).astype(np.float64).T @ _read(moving).astype(np.float64)
    r = r.astype(np.float32)
    written = dst.written
    old = _read(dst)
    if accumulate is True or accumulate is None:
        acc = written if accumulate is None else np.ones_like(written)
        r = np.where(acc, old + r, r)
    _write(dst, r)
    written[...] = True
    cyc = max(min(MIN_CYCLES, m), n) * (4 if moving.dtype is float32 else 1)
    _m(I).count("tensor", cyc)


def nc_transpose(dst, data, **kwargs):
    """dst (PSUM) = data.T on the Tensor engine; data at most 128 x 128."""
    I = "nisa.nc_transpose"
    _reject_kwargs(I, kwargs)
    _tile(data, I, "data")
    if data.buffer is not sbuf:
        raise NkiError(f"{I}: data {data.name} must be in SBUF")
    if not isinstance(dst, Tensor) or dst.buffer is not psum:
        raise NkiError(f"{I}: dst must be a PSUM tile (Tensor-engine transpose), got {dst!r}")
    _tile(dst, I, "dst")
    if len(data.shape) != 2 or max(data.shape) > TRANSPOSE_MAX:
        raise NkiError(f"{I}: data {list(data.shape)} must be 2-D and at most "
                       f"{TRANSPOSE_MAX} x {TRANSPOSE_MAX}")
    if dst.shape != data.shape[::-1]:
        raise NkiError(f"{I}: dst {list(dst.shape)} must be {list(data.shape[::-1])}")
    if dst.dtype is not float32 and dst.dtype is not data.dtype:
        raise NkiError(f"{I}: dst dtype {dst.dtype.name} must be float32 or {data.dtype.name}")
    _write(dst, _read(data).T)
    p, f = data.shape
    _m(I).count("tensor", max(min(MIN_CYCLES, f), p) * (4 if data.dtype is float32 else 1))


def dma_copy(dst, src, **kwargs):
    """dst = src between HBM and SBUF (casts to dst's dtype); never reads or writes PSUM."""
    I = "nisa.dma_copy"
    _reject_kwargs(I, kwargs)
    for x, nm in ((dst, "dst"), (src, "src")):
        if not isinstance(x, Tensor):
            raise NkiError(f"{I}: {nm} must be a tensor, got {type(x).__name__}")
        if x.buffer is psum:
            raise NkiError(f"{I}: {nm} {x.name} is in PSUM; DMA cannot access PSUM "
                           "(tensor_copy to SBUF first)")
    if dst.buffer.on_chip and src.buffer.on_chip:
        raise NkiError(f"{I}: SBUF -> SBUF copies are tensor_copy's job")
    if dst.buffer is hbm:
        raise NkiError(f"{I}: dst {dst.name} is a kernel input (read-only HBM)")
    sq = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    if sq(dst.shape) != sq(src.shape):
        raise NkiError(f"{I}: dst {list(dst.shape)} and src {list(src.shape)} differ (beyond "
                       "unit dims); a DMA does not reshape or transpose")
    for x, nm in ((dst, "dst"), (src, "src")):
        if x.buffer is sbuf:
            _tile(x, I, nm)
    _write(dst, _read(src))
    n = int(np.prod(src.shape))
    mach = _m(I)
    c = mach.counters
    if not src.buffer.on_chip:
        c.dma_bytes_in += n * src.dtype.itemsize
    if not dst.buffer.on_chip:
        c.dma_bytes_out += n * dst.dtype.itemsize
    c.dma_transfers += 1
    mach.count("dma", DMA_FIXED_CYCLES + n * src.dtype.itemsize / DMA_BYTES_PER_CYCLE)


# ---- nki: jit / simulate, and loading kernel source ----

class Kernel:
    """What ``@nki.jit`` returns here: call it with NumPy arrays to run it in the emulator."""

    def __init__(self, fn: Callable, chip: str = DEFAULT_CHIP):
        self.fn, self.chip = fn, chip
        self.counters: dict | None = None

    def __call__(self, *arrays, dtypes=None):
        return run(self, arrays, dtypes, self.chip)


def jit(fn=None, **kwargs):
    _reject_kwargs("nki.jit", {k: v for k, v in kwargs.items() if k not in ("mode",)})
    if fn is None:
        return lambda f: Kernel(f)
    return Kernel(fn)


def simulate(kernel):
    """``nki.simulate(kernel)(*arrays)``: the emulator's stand-in for the official simulator."""
    k = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    return k


def run(kernel: Kernel, arrays, dtypes=None, chip: str = DEFAULT_CHIP):
    """Run ``kernel`` on NumPy arrays (HBM inputs); ``dtypes`` names each input's NKI dtype
    (default from the array: float32/float16; pass "bfloat16" for bf16 values held in float32).
    Returns NumPy copies of the returned tensors (float32 storage); counters on ``kernel``."""
    global _machine
    if _machine is not None:
        raise NkiError("nested kernel runs are not supported")
    dtypes = list(dtypes) if dtypes is not None else [None] * len(arrays)
    mach = Machine(chip, kernel.fn.__code__)
    _machine = mach
    try:
        args = []
        for i, (a, dn) in enumerate(zip(arrays, dtypes)):
            a = np.asarray(a)
            dn = dn or {"float32": "float32", "float16": "float16"}.get(a.dtype.name)
            if dn not in DTYPES:
                raise NkiError(f"kernel input {i}: dtype {a.dtype} is not an NKI dtype "
                               f"(float32, bfloat16, float16)")
            dt = DTYPES[dn]
            arr = dt.round(a.astype(np.float32))
            args.append(Tensor(_Alloc(arr, hbm, dt), arr, f"in{i}"))
        result = kernel.fn(*args)
        outs = result if isinstance(result, tuple) else (result,)
        for o in outs:
            if not isinstance(o, Tensor) or o.buffer is not shared_hbm:
                raise NkiError(f"kernel returned {o!r}: kernel outputs must be nl.shared_hbm "
                               "tensors created with nl.ndarray")
        res = tuple(np.array(o.view, dtype=np.float32) for o in outs)
        kernel.counters = mach.counters.as_dict()
        return res if isinstance(result, tuple) else res[0]
    finally:
        _machine = None


def _module(name: str, attrs: dict) -> types.ModuleType:
    m = types.ModuleType(name, f"scancc NKI emulator: {name}")
    m.__dict__.update(attrs)
    return m


language = _module("nki.language", {
    "ndarray": ndarray, "sbuf": sbuf, "psum": psum, "hbm": hbm, "shared_hbm": shared_hbm,
    **DTYPES, **INT_DTYPES, **OPS,
})
isa = _module("nki.isa", {
    f.__name__: f for f in (tensor_tensor, tensor_scalar, activation, tensor_reduce,
                            tensor_tensor_scan, tensor_copy, tensor_copy_predicated, memset,
                            iota, nc_matmul, nc_transpose, dma_copy)
})
nki = _module("nki", {"jit": jit, "simulate": simulate, "language": language, "isa": isa,
                      "__version__": "emulator", "emulated": True})
MODULES = {"nki": nki, "nki.language": language, "nki.isa": isa}


def _import_hook(real_import):
    def hook(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "nki" or name.startswith("nki.")):
            if name not in MODULES:
                raise ImportError(f"the NKI emulator has no module {name!r}")
            return MODULES[name] if fromlist else nki
        return real_import(name, globals, locals, fromlist, level)
    return hook


def load_kernel(source: str, name: str, filename: str = "<nki kernel>") -> Kernel:
    """Execute kernel ``source`` with its ``nki`` imports resolved to the emulator and return
    the ``@nki.jit`` function ``name``; nothing is added to ``sys.modules``."""
    bdict = dict(builtins.__dict__)
    bdict["__import__"] = _import_hook(builtins.__import__)
    ns: dict = {"__builtins__": bdict, "__name__": f"scancc_nki_kernel_{name}"}
    exec(compile(source, filename, "exec"), ns)  # noqa: S102 - source rendered by scancc
    k = ns.get(name)
    if not isinstance(k, Kernel):
        raise NkiError(f"kernel source defines no @nki.jit function {name!r}")
    return k
