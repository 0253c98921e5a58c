"""Offline sm_90 report of every kernel the Triton forward launches (shared/design
PERFORMANCE.md), for any number of kernels per launcher, with a stated H100 time model.

How (no GPU needed):

1. **record**: the generated launcher (``TritonBackend().compiled(rec, {}, dtypes).launcher``)
   is called with torch tensors on the ``meta`` device (no memory; tiny zero-stride CPU
   tensors if meta fails), after every module-level ``@triton.jit`` kernel of the generated
   module is replaced by a ``Recorder`` whose ``kernel[grid](*args, **kw)`` records (kernel,
   grid, argument dtypes / ints / constexprs, num_warps) instead of running. Nothing is
   known in advance about which kernels a launcher launches.
2. **loops**: the kernel's source is parsed; ``for .. in range(..)`` / ``tl.range(..)`` bounds
   are evaluated with the recorded arguments (straight-line assignments before a loop are
   evaluated too; ``tl.program_id(i)`` = grid[i]-1, the last program: an upper bound for
   triangular loops); nested loops multiply, loops one after another add.
   ``tl.static_range`` is unrolled by the compiler and not counted.
3. **compile** (child process without TRITON_INTERPRET, which replaces the compiler in this
   one): ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with the recorded signature,
   constexprs and num_warps; ``ptxas-blackwell -v -arch=sm_90a`` (the plain ptxas shipped
   with Triton is too old for its PTX) gives registers and spill bytes; Triton's metadata the
   shared memory; the TTGIR the dots (tensor cores = ``warp_group_dot``/``nvidia_mma``) and
   elementwise float ops with their loop depth; ``nvdisasm`` of the cubin the SASS
   instruction count and loop bodies (backward branches).
4. **model** (*modelled*, not a timing; see MODEL below).
5. **anchors**: the anchors' own Triton kernels (fla's chunked forwards, mamba_ssm's SSD)
   recorded, compiled and modelled the same way (anchors_sm90.py; the autotune config with
   the lowest modelled time; ``--no-compiled-anchors`` skips them), next to the older
   throughput-only anchor models (fla_chunk_model, ssd_model, selective_scan_model) and, for
   mamba's CUDA selective scan, selective_scan_floor.

    .venv/bin/python benchmarks/bench_sm90.py                      # everything
    .venv/bin/python benchmarks/bench_sm90.py --names gla mamba2 --shapes B1T32768
    .venv/bin/python benchmarks/bench_sm90.py --list
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------
# shapes (shared/design PERFORMANCE.md "Realistic shapes")
SHAPES = {"B8T2048": {"batch": 8, "time": 2048}, "B1T32768": {"batch": 1, "time": 32768}}
ATTN = ("linear_attn", "retnet", "simple_gla", "gla", "delta_net", "gated_delta_net")
# (recurrence, label, dim sizes); dims not named take their declared size, else 1
CASES: list[tuple[str, str, dict]] = []
for _n in ATTN:
    for _h in (16, 96):
        CASES.append((_n, f"H{_h} K=V=128", {"heads": _h, "key": 128, "value": 128}))
CASES += [
    ("mamba", "D2048 N16", {"chan": 2048, "dstate": 16, "groups": 1}),
    ("mamba2", "H80 P64 N128 (2.7B)", {"heads": 80, "headdim": 64, "dstate": 128, "groups": 1}),
    ("hgrn", "D2048", {"chan": 2048}),                  # HGRN-1.3B width
    ("s4d", "H1024 N64", {"heads": 1024, "dstate": 64}),  # S4D: H=d_model, N=64
    ("fir", "D2048 W4", {"chan": 2048, "width": 4}),
    ("iir", "D2048 order3", {"chan": 2048, "order": 3}),
    ("swa", "H16 K=V=128 W4", {"heads": 16, "key": 128, "value": 128}),
    # the modern family (issue 15) and B'MOJO (issue 13)
    ("hgrn2", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("rwkv6", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("rwkv7", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("kda", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("rwkv7", "H96 K=V=128", {"heads": 96, "key": 128, "value": 128}),
    ("kda", "H96 K=V=128", {"heads": 96, "key": 128, "value": 128}),
    ("mamba3", "H16 P64 N128", {"heads": 16, "headdim": 64, "pairs": 64, "groups": 1}),
    ("bmojo_f", "H16 K=V=128 W4", {"heads": 16, "key": 128, "value": 128}),
]

# ---------------------------------------------------------------------------------------
# MODEL (H100 SXM5, NVIDIA's datasheet figures; dense, no sparsity)
SMS = 132
HBM_BPS = 3.35e12          # bytes/s
PEAK = {"bf16": 989e12, "f16": 989e12, "tf32": 495e12, "fma": 67e12}  # FLOP/s
CLOCK = 1.98e9             # boost clock, Hz
REGS_PER_SM, SMEM_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 233472, 64, 32
MODEL = f"""\
Projected H100 time per kernel (**modelled**; no GPU was used):

    occupancy  = programs per SM from registers (65536 per SM, allocated per warp in units of
                 256), shared memory (228 KiB per SM), 64 warps and 32 blocks per SM
    slots      = {SMS} SMs x occupancy;  waves = ceil(programs / slots)
    wave_q     = waves / (programs / slots)            (>= 1; 1 = the last wave is full)
    throughput = max(bytes / 3.35 TB/s,
                     dot FLOP / peak_dot + other FLOP / 67 TFLOP/s) x wave_q
                 peak_dot: 989 TFLOP/s bf16/f16 tensor cores, 495 tf32, 67 without tensor
                 cores (an fp32 "ieee" tt.dot runs on the FMA units)
    issue      = waves x instructions per program x max(1, resident warps per SM / 4) / 1.98 GHz
                 instructions per program: from the SASS (nvdisasm): each loop (a backward
                 branch) runs trips x (its own instructions + its inner loops'), the trips
                 being the source loops' (matched in pre-order; constant-bound source loops
                 the compiler unrolled are skipped); "approx" when the counts disagree (the
                 compiler split a loop into an unrolled main loop and a remainder): each
                 source iteration then costs the smallest innermost SASS loop;
                 resident warps = min(occupancy, ceil(programs / 132)) x num_warps.
                 One instruction per cycle per warp scheduler (4 per SM) with every
                 dependency hidden: the floor of the sequential iterations' latency
    time       = max(throughput, issue)
    kernels of one call run one after another: the call's time is their sum

bytes = every tensor argument the compiled kernel uses moved once per direction (read by a
tt.load, written by a tt.store, both: twice; an argument the kernel never touches, e.g. in
a staged kernel's other stages: 0), from the TTGIR: the shape's minimum; re-reads served
by L2 are free;
dot FLOP = 2*M*N*K of each tl.dot in the TTGIR x its loop multiplier x programs;
other FLOP = elements of each float add/sub/mul/div/min/max/exp/log/sqrt in the TTGIR
(fma = 2) x loop multiplier x programs (reductions not counted). A loop multiplier is the
product of the enclosing loops' trip counts (loops evaluated from the source, see 2.).
The brief suggested adding the latency term to the throughput term; it is the max here
because the issue term already contains the instructions that do the counted work.
wave_q (the issue's formula) gives a program 1/(132 x occupancy) of the machine: for a
launch that under-fills the GPU with a small-register kernel (high occupancy, few
programs) this overstates the throughput term (a lone program can pull more than that
share of bandwidth); the issue term is a floor. Neither is a measurement."""


# ---------------------------------------------------------------------------------------
# 1. recording the launches

@dataclass
class Arg:
    name: str
    kind: str                 # "tensor" | "int" | "float" | "bool" | "none" | "other"
    constexpr: bool
    value: Any = None         # ints/floats/bools/constexprs
    dtype: str = ""           # tensors
    shape: tuple = ()
    nbytes: int = 0


@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: list
    num_warps: int
    num_stages: int | None = None
    source: str = ""          # the kernel's own source (the def)
    module_source: str = ""   # the whole generated module

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def values(self) -> dict:
        return {a.name: a.value for a in self.args if a.kind != "tensor"}

    def constexprs(self) -> set:
        return {a.name for a in self.args if a.constexpr}


def _is_constexpr_annotation(ann) -> bool:
    if ann is inspect.Parameter.empty:
        return False
    if isinstance(ann, str):
        return ann.split(".")[-1] == "constexpr"
    return getattr(ann, "__name__", "") == "constexpr"


def _python_fn(k):
    """The plain function under a JITFunction / InterpretedFunction / Autotuner chain."""
    seen = 0
    while not inspect.isfunction(k) and hasattr(k, "fn") and seen < 8:
        k, seen = k.fn, seen + 1
    return k


class Recorder:
    """Stands in for a kernel object: ``rec[grid](*args, **kw)`` appends a Launch."""

    def __init__(self, name: str, kernel, log: list, module_source: str):
        self.name, self.kernel, self.log, self.module_source = name, kernel, log, module_source
        fn = _python_fn(kernel)
        self.params = list(inspect.signature(fn).parameters.values())
        try:
            self.source = inspect.getsource(fn)
        except (OSError, TypeError):
            self.source = ""
        cfgs = getattr(kernel, "configs", None)  # an Autotuner: its first config
        self.config = cfgs[0] if cfgs else None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            import torch
            bound: dict = {p.name: (p.default if p.default is not inspect.Parameter.empty else None)
                           for p in self.params}
            for p, v in zip(self.params, args):
                bound[p.name] = v
            extra = {k: v for k, v in kw.items() if k not in bound}
            bound.update({k: v for k, v in kw.items() if k in bound})
            if self.config is not None:
                bound.update({k: v for k, v in self.config.kwargs.items() if k in bound})
                extra.setdefault("num_warps", self.config.num_warps)
                extra.setdefault("num_stages", self.config.num_stages)
            g = grid(dict(bound)) if callable(grid) else grid
            g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
            out = []
            for p in self.params:
                v = bound[p.name]
                ce = _is_constexpr_annotation(p.annotation)
                if isinstance(v, torch.Tensor):
                    dt = str(v.dtype).replace("torch.", "")
                    out.append(Arg(p.name, "tensor", False, None, dt, tuple(v.shape),
                                   v.numel() * v.element_size()))
                elif v is None:
                    out.append(Arg(p.name, "none", ce))
                elif isinstance(v, bool):
                    out.append(Arg(p.name, "bool", ce, v))
                elif isinstance(v, int):
                    out.append(Arg(p.name, "int", ce, v))
                elif isinstance(v, float):
                    out.append(Arg(p.name, "float", ce, v))
                elif isinstance(v, str) and ce:  # e.g. an input_precision constexpr
                    out.append(Arg(p.name, "other", ce, v))
                else:
                    out.append(Arg(p.name, "other", ce, getattr(v, "value", repr(v))))
            self.log.append(Launch(self.name, g, out, int(extra.get("num_warps", 4)),
                                   extra.get("num_stages"), self.source, self.module_source))
        return launch


def _is_kernel(v) -> bool:
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, KernelInterface)


@contextlib.contextmanager
def recording(launcher, module_source: str = ""):
    """Inside the block, every module-level kernel of ``launcher``'s module records its
    launches into the yielded list instead of running (restored afterwards)."""
    g = launcher.__globals__
    log: list[Launch] = []
    saved = {k: v for k, v in g.items() if _is_kernel(v)}
    try:
        for k, v in saved.items():
            g[k] = Recorder(k, v, log, module_source)
        yield log
    finally:
        g.update(saved)


def input_tensors(rec, sizes: dict, dtype: str, device: str = "meta"):
    import torch
    dt = getattr(torch, dtype)
    out = []
    for x in rec.inputs:
        shape = tuple(sizes[d] for d in x.dims)
        if device == "meta":
            out.append(torch.empty(shape, dtype=dt, device="meta"))
        else:  # a tiny CPU tensor seen at the full shape through zero strides
            out.append(torch.zeros(1, dtype=dt).expand(shape))
    return out


def record(rec, sizes: dict, dtype: str = "bfloat16", options: dict | None = None):
    """(Launches of the forward launcher at ``sizes``, algorithm, device used)."""
    from scancc.backends.triton import TritonBackend
    options = options or {}
    c = TritonBackend().compiled(rec, options, tuple([dtype] * len(rec.inputs)))
    errors = []
    for dev in ("meta", "cpu"):
        with recording(c.launcher, c.source) as log:
            try:
                c.launcher(*input_tensors(rec, sizes, dtype, dev), None, False,
                           options.get("block_sizes"), options.get("num_warps") or 4)
            except Exception as e:  # noqa: BLE001 - try the next device, report both
                errors.append(f"{dev}: {type(e).__name__}: {e}")
                continue
        return list(log), c.algorithm, dev
    raise RuntimeError("; ".join(errors))


@contextlib.contextmanager
def gpu_rules():
    """Inside the block, the backend's GPU check (``backends/triton/scan.on_gpu`` where the
    backend has one) answers yes: "auto" decides as on a GPU (this machine has none)."""
    try:
        from scancc.backends.triton import scan as _scan
    except ImportError:
        _scan = None
    orig = getattr(_scan, "on_gpu", None)
    if orig is not None:
        _scan.on_gpu = lambda: True
    try:
        yield
    finally:
        if orig is not None:
            _scan.on_gpu = orig


def gpu_algorithm(rec, options: dict | None = None) -> str:
    """The algorithm ``"auto"`` picks for ``rec`` on a GPU: the backend's own rule (for the
    chunked decays ``"chunked"``, whose launcher then runs the fused kernel or the staged
    stages by its own rule)."""
    from scancc.backends.triton import TritonBackend
    with gpu_rules():
        return TritonBackend().algorithm(rec, dict(options or {}))


def time_walking(rec, sizes: dict, dtype: str, options: dict, launches: list) -> list[bool]:
    """Per launch: whether the kernel walks all of time (the state-passing / recurrent kind)
    rather than being parallel in time. Decided by recording again at twice the time: a
    kernel whose programs grow with T is parallel in time. When the launch sequence differs
    at 2T, a kernel whose loops run >= T/256 iterations counts as time-walking."""
    time_dims = [d.name for d in rec.dims if d.role == "time"]
    if not time_dims:
        return [False] * len(launches)
    try:
        twice, _, _ = record(rec, {**sizes, time_dims[0]: 2 * sizes[time_dims[0]]}, dtype, options)
    except Exception:  # noqa: BLE001 - fall back to the iteration rule below
        twice = []
    if [ln.kernel for ln in twice] == [ln.kernel for ln in launches]:
        return [b.programs <= a.programs for a, b in zip(launches, twice)]
    T = sizes[time_dims[0]]
    out = []
    for ln in launches:
        try:
            it = iterations(parse_loops(ln.source or ln.module_source, ln.kernel, ln.values(),
                                        ln.grid, ln.constexprs()))
        except (SyntaxError, ValueError):
            it = None
        out.append(it is not None and it >= max(1, T // 256))
    return out


def case_sizes(rec, dims: dict, shape: dict) -> dict:
    return {d.name: d.size or {**shape, **dims}.get(d.name, 1) for d in rec.dims}


# ---------------------------------------------------------------------------------------
# 2. sequential iterations from the kernel source

class Unknown(Exception):
    pass


def _cdiv(a, b):
    return -(-a // b)


_FUNCS = {"cdiv": _cdiv, "min": min, "max": max, "minimum": min, "maximum": max, "int": int,
          "abs": abs, "next_power_of_2": lambda n: 1 << (int(n) - 1).bit_length()}


class _Eval:
    def __init__(self, env: dict, grid: tuple):
        self.env, self.grid = env, grid

    def __call__(self, n):  # noqa: C901 - one case per node type
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float, bool)):
            return n.value
        if isinstance(n, ast.Name):
            if n.id in self.env and self.env[n.id] is not None:
                return self.env[n.id]
            raise Unknown(n.id)
        if isinstance(n, ast.BinOp):
            a, b = self(n.left), self(n.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b,
                   ast.Div: lambda: a / b, ast.LShift: lambda: a << b, ast.RShift: lambda: a >> b,
                   ast.Pow: lambda: a ** b}
            if type(n.op) in ops:
                return ops[type(n.op)]()
            raise Unknown(ast.dump(n.op))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd, ast.Not)):
            v = self(n.operand)
            return -v if isinstance(n.op, ast.USub) else (not v if isinstance(n.op, ast.Not) else v)
        if isinstance(n, ast.Compare) and len(n.ops) == 1:
            a, b = self(n.left), self(n.comparators[0])
            cmp = {ast.Lt: a < b, ast.LtE: a <= b, ast.Gt: a > b, ast.GtE: a >= b,
                   ast.Eq: a == b, ast.NotEq: a != b}
            if type(n.ops[0]) in cmp:
                return cmp[type(n.ops[0])]
            raise Unknown("compare")
        if isinstance(n, ast.BoolOp):
            vals = [self(v) for v in n.values]
            return all(vals) if isinstance(n.op, ast.And) else any(vals)
        if isinstance(n, ast.IfExp):
            return self(n.body) if self(n.test) else self(n.orelse)
        if isinstance(n, ast.Call):
            f = n.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if isinstance(f, ast.Attribute) and fname == "to":  # x.to(tl.int64)
                return self(f.value)
            if fname in ("program_id", "num_programs"):
                axis = self(n.args[0] if n.args else n.keywords[0].value)
                g = self.grid[axis] if axis < len(self.grid) else 1
                return g - 1 if fname == "program_id" else g
            if fname in _FUNCS:
                return _FUNCS[fname](*[self(a) for a in n.args])
            raise Unknown(fname)
        raise Unknown(type(n).__name__)


@dataclass
class Loop:
    line: int
    trips: int | None          # None: not evaluable
    text: str
    body: list = field(default_factory=list)
    constant: bool = False     # bounds from constexprs and literals only (may be unrolled)


_NOT_VALUES = {"tl", "triton", "math", "min", "max", "int", "abs", "range", "cdiv"}


def _free_names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - _NOT_VALUES


def _uses_program_id(node) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in ("program_id", "num_programs")
               for n in ast.walk(node))


def _range_trips(call: ast.Call, ev: _Eval) -> int:
    args = [ev(a) for a in call.args]
    kw = {k.arg: k.value for k in call.keywords}
    if "step" in kw:
        args = (args + [0, 0])[:2] if len(args) < 2 else args[:2]
        args.append(ev(kw["step"]))
    start, stop, step = {1: (0, args[0], 1)}.get(len(args)) or (
        (args[0], args[1], 1) if len(args) == 2 else tuple(args[:3]))
    return max(0, _cdiv(stop - start, step)) if step > 0 else max(0, _cdiv(start - stop, -step))


def _walk(stmts, env: dict, grid: tuple, src: str, consts: set) -> list[Loop]:
    """The loops of ``stmts``; ``env``: known values; ``consts``: names whose value comes
    from constexprs and literals only."""
    loops: list[Loop] = []
    for s in stmts:
        ev = _Eval(env, grid)
        if (isinstance(s, ast.Assign) and len(s.targets) == 1
                and isinstance(s.targets[0], ast.Tuple) and isinstance(s.value, ast.Tuple)
                and len(s.targets[0].elts) == len(s.value.elts)):
            # a, b = x, y (fla's kernels: bos, eos = ..; NT, NS = ..): element-wise
            _walk([ast.Assign([t], v, lineno=s.lineno) for t, v in
                   zip(s.targets[0].elts, s.value.elts)], env, grid, src, consts)
            continue
        if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            if isinstance(s, ast.Assign):  # other tuple targets: unknown values
                for t in targets:
                    if isinstance(t, ast.Tuple):
                        for e in t.elts:
                            if isinstance(e, ast.Name):
                                env[e.id] = None
                                consts.discard(e.id)
            for t in targets:
                if isinstance(t, ast.Name):
                    try:
                        v = ev(s.value) if not isinstance(s, ast.AugAssign) else None
                    except (Unknown, ZeroDivisionError, TypeError, IndexError):
                        v = None
                    env[t.id] = v
                    if (not isinstance(s, ast.AugAssign) and _free_names(s.value) <= consts
                            and not _uses_program_id(s.value)):
                        consts.add(t.id)
                    else:
                        consts.discard(t.id)
        elif isinstance(s, ast.For):
            it = s.iter
            fname = ""
            if isinstance(it, ast.Call):
                f = it.func
                fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            text = ast.get_source_segment(src, it) or fname
            if fname == "static_range":  # unrolled by the compiler
                loops.extend(_walk(s.body, env, grid, src, consts))
                continue
            trips = None
            if fname in ("range", "range_") or (isinstance(it, ast.Call) and fname == "range"):
                try:
                    trips = _range_trips(it, ev)
                except (Unknown, ZeroDivisionError, TypeError, IndexError, ValueError):
                    trips = None
            inner = dict(env)
            if isinstance(s.target, ast.Name):  # the last iteration's value (upper bounds)
                try:
                    args = [ev(a) for a in it.args]
                    start, stop = (0, args[0]) if len(args) == 1 else (args[0], args[1])
                    step = args[2] if len(args) > 2 else 1
                    inner[s.target.id] = start + max(0, (trips or 1) - 1) * step
                except (Unknown, ZeroDivisionError, TypeError, IndexError, AttributeError):
                    inner[s.target.id] = None
            constant = _free_names(it) <= consts and not _uses_program_id(it)
            inner_consts = set(consts) - _free_names(s.target)
            loops.append(Loop(s.lineno, trips, f"for {ast.unparse(s.target)} in {text}",
                              _walk(s.body, inner, grid, src, inner_consts), constant))
        elif isinstance(s, ast.If):
            try:
                taken = s.body if _Eval(env, grid)(s.test) else s.orelse
                loops.extend(_walk(taken, env, grid, src, consts))
            except (Unknown, ZeroDivisionError, TypeError, IndexError):
                loops.extend(_walk(s.body, dict(env), grid, src, set(consts)))
                loops.extend(_walk(s.orelse, dict(env), grid, src, set(consts)))
        elif isinstance(s, (ast.While,)):
            loops.append(Loop(s.lineno, None, "while",
                              _walk(s.body, dict(env), grid, src, set(consts))))
        elif isinstance(s, (ast.With,)):
            loops.extend(_walk(s.body, env, grid, src, consts))
    return loops


def parse_loops(source: str, kernel: str, values: dict, grid: tuple,
                constexprs=()) -> list[Loop]:
    """The loop tree of ``def kernel`` in ``source`` with trip counts evaluated from
    ``values`` (argument name -> value; tensors absent); a loop whose bounds use only
    ``constexprs`` and literals is marked ``constant``."""
    import textwrap
    src = textwrap.dedent(source)
    tree = ast.parse(src)
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == kernel),
              None)
    if fn is None:
        raise ValueError(f"no def {kernel} in the source")
    return _walk(fn.body, dict(values), tuple(grid), src, set(constexprs))


def iterations(loops: list[Loop]) -> int | None:
    """Sequential iterations of one program: nested loops multiply, siblings add (None
    when some trip count could not be evaluated)."""
    total = 0
    for lp in loops:
        if lp.trips is None:
            return None
        inner = iterations(lp.body)
        if inner is None:
            return None
        total += lp.trips * max(1, inner)
    return total


def depth_multipliers(loops: list[Loop]) -> list[int]:
    """mult[d]: the largest product of trip counts of d nested loops (mult[0] = 1)."""
    out = [1]

    def go(ls, prod, d):
        for lp in ls:
            p = prod * (lp.trips or 1)
            while len(out) <= d + 1:
                out.append(1)
            out[d + 1] = max(out[d + 1], p)
            go(lp.body, p, d + 1)
    go(loops, 1, 0)
    return out


def loop_text(loops: list[Loop]) -> str:
    return "; ".join(f"{lp.text}={lp.trips if lp.trips is not None else '?'}"
                     + (f" {{{loop_text(lp.body)}}}" if lp.body else "") for lp in loops)


# ---------------------------------------------------------------------------------------
# 3. the compile (child process)

_CHILD = r'''
import json, os, re, subprocess, sys, tempfile, importlib.util
_spec = importlib.util.spec_from_file_location("_bench_sm90_parsers", BENCH_FILE)
_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _bench
_spec.loader.exec_module(_bench)
ttgir_ops, sass_stats = _bench.ttgir_ops, _bench.sass_stats
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas, nvdisasm = os.path.join(bindir, "ptxas-blackwell"), os.path.join(bindir, "nvdisasm")
out, _preludes = {}, set()
for job in json.load(sys.stdin):
    key = job["key"]
    try:
        if job.get("prelude") and job["prelude"] not in _preludes:
            _ps = importlib.util.spec_from_file_location("_anchor_prelude", job["prelude"])
            _pm = importlib.util.module_from_spec(_ps)
            _ps.loader.exec_module(_pm)
            _pm.prelude()
            _preludes.add(job["prelude"])
        if job.get("module"):  # an installed package's kernel (the anchors)
            mod = importlib.import_module(job["module"])
        else:
            spec = importlib.util.spec_from_file_location("m_" + str(abs(hash(key))), job["path"])
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        fn = getattr(mod, job["kernel"])
        while not isinstance(fn, triton.runtime.jit.JITFunction) and hasattr(fn, "fn"):
            fn = fn.fn
        for _k, _v in list(job["const"].items()):  # a tl.dtype constexpr, recorded as its repr
            _m = isinstance(_v, str) and re.fullmatch(r"triton\.language\.(\w+)", _v)
            if _m and isinstance(getattr(triton.language, _m.group(1), None), triton.language.dtype):
                job["const"][_k] = getattr(triton.language, _m.group(1))
        attrs = {}
        if job.get("specialize"):  # as a GPU launch specializes (triton's native_specialize_impl)
            for _i, _p in enumerate(fn.params):
                _n = _p.name
                if _n not in job["sig"] or job["sig"][_n] == "constexpr":
                    continue
                if _n in job.get("ints", {}) and not _p.do_not_specialize:
                    _v = job["ints"][_n]
                    if _v == 1:   # an int argument equal to 1 becomes a constexpr 1
                        job["sig"][_n] = "constexpr"
                        job["const"][_n] = 1
                    elif _v % 16 == 0:
                        attrs[(_i,)] = [["tt.divisibility", 16]]
                elif (job["sig"][_n].startswith("*") and _n not in job.get("nones", ())
                      and not _p.do_not_specialize_on_alignment):
                    attrs[(_i,)] = [["tt.divisibility", 16]]   # torch allocations: 16-B aligned
        opts = {"num_warps": job["num_warps"]}
        if job.get("num_stages"):
            opts["num_stages"] = job["num_stages"]
        c = triton.compile(ASTSource(fn=fn, signature=job["sig"], constexprs=job["const"],
                                     attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        ttgir = c.asm["ttgir"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(c.asm["ptx"])
        r = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        os.unlink(f.name)
        log = r.stderr + r.stdout
        regs = max([int(x) for x in re.findall(r"Used (\d+) registers", log)] or [-1])
        st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
        md = c.metadata
        smem = md.shared if hasattr(md, "shared") else md["shared"]
        tc = "warp_group_dot" in ttgir or "nvidia_mma" in ttgir
        dots, ew = ttgir_ops(ttgir)
        (n_sass, spans), _ = sass_stats(c.asm["cubin"], nvdisasm)
        out[key] = {"regs": regs, "spill_st": st, "spill_ld": ld, "smem": smem, "tc": tc,
                    "dots": dots, "ew": ew, "sass": n_sass, "spans": spans,
                    "arg_use": _bench.ttgir_arg_use(ttgir)}
    except Exception as e:
        out[key] = {"error": f"{type(e).__name__}: {str(e)[-400:]}"}
    print("@@ONE@@" + json.dumps({key: out[key]}), flush=True)
print("@@JSON@@" + json.dumps(out))
'''


# parsers of the compiler's output (used by the child process; pure text functions)

_EW = {"arith.addf": 1, "arith.subf": 1, "arith.mulf": 1, "arith.divf": 1, "arith.maxnumf": 1,
       "arith.minnumf": 1, "arith.maximumf": 1, "arith.minimumf": 1, "arith.negf": 1,
       "math.exp": 1, "math.exp2": 1, "math.log": 1, "math.log2": 1, "math.sqrt": 1,
       "math.rsqrt": 1, "math.fma": 2, "math.tanh": 1}
_TY = re.compile(r"(?:tensor|!ttg\.memdesc)<((?:\d+x)+)(\w+)")


def _numel(dims):
    n = 1
    for x in dims.strip("x").split("x"):
        n *= int(x)
    return n


_PTR_OPS = ("tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape",
            "tt.trans", "ttg.convert_layout", "arith.select")


def ttgir_arg_use(ttgir: str) -> dict:
    """{pointer argument: [loaded, stored]} of a TTGIR text: which of the kernel's pointer
    arguments the compiled kernel reads (``tt.load``) and writes (``tt.store``), following
    the pointer values derived from each (addptr/splat/broadcast/..., ``scf.for`` iter_args).
    A branch pruned on a constexpr (one stage of a staged kernel) leaves its arguments unused."""
    head = re.search(r"tt\.func public @\w+\((.*?)\)\s*(?:attributes|\{)", ttgir, re.S)
    if not head:
        return {}
    args = re.findall(r"%([\w.]+):\s*!tt\.ptr", head.group(1))
    owner = {a: a for a in args}
    use = {a: [False, False] for a in args}
    tok = re.compile(r"%([\w.#]+)")
    for line in ttgir.splitlines():
        m = re.match(r"\s*(%[\w.:#]+(?:\s*,\s*%[\w.:#]+)*)\s*=\s*([\w.]+)\s+(.*)", line)
        if m:
            res, op, rest = m.groups()
            if op == "scf.for":
                for a, b in re.findall(r"%([\w.]+)\s*=\s*%([\w.]+)", rest.split("iter_args", 1)[-1]):
                    if b in owner:
                        owner[a] = owner[b]
                continue
            if op in _PTR_OPS:
                src = [t for t in tok.findall(rest) if t in owner]
                if src:
                    for r in tok.findall(res):
                        owner[r.split(":")[0]] = owner[src[0]]
                continue
            if op in ("tt.load", "ttg.async_copy_global_to_local"):  # the latter: cp.async
                t = tok.findall(rest)
                if t and t[0] in owner:
                    use[owner[t[0]]][0] = True
            continue
        m = re.match(r"\s*tt\.store\s+%([\w.]+)", line)
        if m and m.group(1) in owner:
            use[owner[m.group(1)]][1] = True
    return use


def ttgir_ops(ttgir: str):
    """(dots, elementwise) of a TTGIR text: dots [op, M, N, K, operand type, "tf32"|"",
    loop depth], elementwise [FLOP per program per execution, loop depth]; the loop depth
    counts the enclosing ``scf.for`` regions."""
    stack, dots, ew = [], [], []
    for line in ttgir.splitlines():
        depth = sum(stack)
        m = re.search(r"=\s*(tt\.dot|ttng\.warp_group_dot|[a-z]+\.[a-z0-9]+)\b", line)
        if m:
            op = m.group(1)
            tys = _TY.findall(line)
            if op in ("tt.dot", "ttng.warp_group_dot") and len(tys) >= 3:
                a, res = tys[0], tys[-1]
                M, K = [int(x) for x in a[0].strip("x").split("x")[-2:]]
                N = int(res[0].strip("x").split("x")[-1])
                tf32 = "tf32" in line or (op == "ttng.warp_group_dot" and a[1] == "f32")
                prec = "tf32" if tf32 else ""
                dots.append([op, M, N, K, a[1], prec, depth])
            elif op in _EW:
                ts = re.search(r":\s*tensor<((?:\d+x)+)(f32|f16|bf16)", line)
                if ts:
                    n = _numel(ts.group(1))
                elif re.search(r":\s*(f32|f16|bf16)\s*$", line):
                    n = 1
                else:
                    n = 0
                if n:
                    ew.append([_EW[op] * n, depth])
        last_for = ("scf.for" in line) and line.rstrip().endswith("{")
        opens = [i for i, ch in enumerate(line) if ch in "{}"]
        for j, i in enumerate(opens):
            if line[i] == "{":
                stack.append(1 if (last_for and j == len(opens) - 1) else 0)
            elif stack:
                stack.pop()
    return dots, ew


def sass_stats(cubin: bytes, nvdisasm: str):
    """sass_loops of the cubin disassembled by ``nvdisasm -c``, plus (rc, stderr tail)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    r = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    return sass_loops(r.stdout), (r.returncode, r.stderr[-300:])


def sass_loops(txt: str) -> tuple[int, list]:
    """(instructions, loops) of nvdisasm text; a loop is a branch to an earlier address,
    given as [first, last] instruction index, sorted, without repeats (a branch to itself,
    the trap after the kernel's EXIT, is not a loop)."""
    addr, labels, branches = [], {}, []
    pending = []
    for line in txt.splitlines():
        lm = re.match(r"\s*(\.L_x_\d+):", line)
        if lm:
            pending.append(lm.group(1))
        im = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if im:
            a = int(im.group(1), 16)
            for p in pending:
                labels[p] = a
            pending = []
            addr.append(a)
            bm = re.search(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)", im.group(2))
            if bm:
                branches.append((a, bm.group(1)))
    index = {a: i for i, a in enumerate(addr)}
    spans = set()
    for a, lab in branches:
        t = labels.get(lab)
        if t is not None and t < a:
            spans.add((index[t], index[a]))
    return len(addr), [list(x) for x in sorted(spans, key=lambda x: (x[0], -x[1]))]


# compile as a GPU launch would specialize the kernel (``--specialize``): int arguments equal
# to 1 become constexprs, ints divisible by 16 and tensor pointers (torch allocations are
# 16-byte aligned) get ``tt.divisibility`` 16, unless the kernel opts out (do_not_specialize)
SPECIALIZE = False


def compile_job(launch: Launch, path: str, module: str | None = None,
                prelude: str | None = None) -> dict:
    """The child's job for ``launch``: the kernel is ``launch.kernel`` of the module file
    ``path``, or (``module``) of that importable module, after ``prelude()`` of the file
    ``prelude`` (the anchors: pretend H100 before fla is imported, see anchors_sm90.py)."""
    sig, const = {}, {}
    for a in launch.args:
        if a.constexpr:
            sig[a.name] = "constexpr"
            const[a.name] = a.value
        elif a.kind == "tensor":
            sig[a.name] = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                                 "int32": "i32", "int64": "i64", "bool": "i1",
                                 "int8": "i8", "uint8": "u8"}.get(a.dtype, "fp32")
        elif a.kind == "none":  # a None pointer (e.g. no initial state): a placeholder
            sig[a.name] = "*fp32"
        elif a.kind == "bool":
            sig[a.name] = "i1"
        elif a.kind == "int":
            sig[a.name] = "i32" if -2**31 <= a.value < 2**31 else "i64"
        elif a.kind == "float":
            sig[a.name] = "fp32"
        else:
            sig[a.name] = "constexpr"
            const[a.name] = a.value
    ints = {a.name: a.value for a in launch.args if not a.constexpr and a.kind == "int"}
    nones = [a.name for a in launch.args if not a.constexpr and a.kind == "none"]
    key = json.dumps([launch.kernel, launch.source, sig, const, launch.num_warps,
                      launch.num_stages] + ([module] if module else [])
                     + ([["specialize", ints, nones]] if SPECIALIZE else []),
                     sort_keys=True, default=str)
    job = {"key": key, "path": path, "kernel": launch.kernel, "sig": sig, "const": const,
           "num_warps": launch.num_warps, "num_stages": launch.num_stages,
           "specialize": SPECIALIZE, "ints": ints, "nones": nones}
    if module:
        job.update(module=module, prelude=prelude)
    return job


def compile_all(jobs: list[dict], timeout: int = 3000, cache: str | None = None) -> dict:
    """Compile every distinct job in one child process. ``cache``: a JSON file of earlier
    results by job key (the anchors' many autotune configs: a re-run compiles only what is
    new); each result is added as the child reports it, so an interrupted run keeps them."""
    uniq = list({j["key"]: j for j in jobs}.values())
    done: dict = {}
    if cache and os.path.exists(cache):
        try:
            with open(cache) as f:
                done = json.load(f)
        except (OSError, ValueError):
            done = {}
    todo = [j for j in uniq if j["key"] not in done or "error" in done[j["key"]]]
    results = {j["key"]: done[j["key"]] for j in uniq if j["key"] in done}
    if not todo:
        return results
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = _CHILD.replace("BENCH_FILE", repr(os.path.abspath(__file__)))
    t_end = time.time() + timeout

    def save():
        if cache:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            with open(cache + ".tmp", "w") as f:
                json.dump({**done, **results}, f)
            os.replace(cache + ".tmp", cache)
    with tempfile.TemporaryFile("w+") as err:
        pr = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        pr.stdin.write(json.dumps(todo))
        pr.stdin.close()
        final = None
        for n, line in enumerate(pr.stdout):
            if line.startswith("@@ONE@@"):
                results.update(json.loads(line[len("@@ONE@@"):]))
                if n % 10 == 9:
                    save()
            elif line.startswith("@@JSON@@"):
                final = json.loads(line[len("@@JSON@@"):])
            if time.time() > t_end:
                pr.kill()
                break
        rc = pr.wait()
        save()
        if rc or final is None:
            err.seek(0)
            raise RuntimeError(f"compile child failed (rc {rc}): {err.read()[-3000:]}")
    results.update(final)
    return results


# ---------------------------------------------------------------------------------------
# 4. the model

def occupancy(regs: int, smem: int, num_warps: int) -> int:
    per_warp = _cdiv(max(regs, 1) * 32, 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_smem = SMEM_PER_SM // smem if smem else BLOCKS_PER_SM
    return max(0, min(by_regs, by_smem, WARPS_PER_SM // num_warps, BLOCKS_PER_SM))


def _preorder(loops):
    for lp in loops:
        yield lp
        yield from _preorder(lp.body)


def sass_instructions(n: int, spans: list, loops: list) -> tuple[float, str]:
    """Instructions one program executes: the SASS loops (nested by containment) get the
    trip counts of the source loops, matched in pre-order: one to one when the counts agree,
    else to the source loops with runtime bounds (the compiler unrolled the constant ones);
    otherwise ("approx": the compiler runtime-unrolled a loop into a main loop and a
    remainder loop, or pipelined it) each iteration of the runtime source loops costs the
    smallest innermost SASS loop (a remainder loop runs one source iteration per trip): an
    estimate (an unrolled main loop shares address arithmetic between its iterations and
    is cheaper per iteration: hgrn's 4-step main loop is 74 instructions, its remainder 28
    for one step). A loop executes trips x (its own instructions + its inner loops')."""
    roots, stack = [], []
    for a, b in spans:
        node = {"s": (a, b), "kids": [], "trips": 1}
        while stack and not (stack[-1]["s"][0] <= a and b <= stack[-1]["s"][1]):
            stack.pop()
        (stack[-1]["kids"] if stack else roots).append(node)
        stack.append(node)

    def nodes(ns):
        for x in ns:
            yield x
            yield from nodes(x["kids"])
    flat = list(nodes(roots))
    src = list(_preorder(loops))
    runtime = [lp for lp in src if not lp.constant]
    how = "matched"
    if len(flat) == len(src):
        pick = src
    elif len(flat) == len(runtime):
        pick = runtime
    else:
        pick, how = None, "approx"
    if pick is not None:
        for x, lp in zip(flat, pick):
            x["trips"] = lp.trips if lp.trips is not None else 1
    else:
        def rt_iters(ls):
            tot = 0
            for lp in ls:
                inner = rt_iters(lp.body)
                tot += (lp.trips or 1) * max(1, inner) if not lp.constant else inner
            return tot
        inner = [x for x in flat if not x["kids"]]
        per = min(x["s"][1] - x["s"][0] + 1 for x in inner)
        outside = n - sum(x["s"][1] - x["s"][0] + 1 for x in roots)
        return outside + rt_iters(loops) * per, how

    def length(x):
        return x["s"][1] - x["s"][0] + 1

    def execd(x):
        own = length(x) - sum(length(k) for k in x["kids"])
        return x["trips"] * (own + sum(execd(k) for k in x["kids"]))
    return n - sum(length(x) for x in roots) + sum(execd(x) for x in roots), how


def model(launch: Launch, c: dict, iters: int | None, mult: list[int],
          loops: list | None = None) -> dict:
    P = launch.programs
    occ = occupancy(c["regs"], c["smem"], launch.num_warps)
    use = c.get("arg_use") or {}
    # each tensor argument moved once per direction the compiled kernel uses it (read, write,
    # both: twice); unused (a pruned stage's): 0; pointer arguments not found: once
    nbytes = sum(a.nbytes * (sum(use[a.name]) if a.name in use else 1)
                 for a in launch.args if a.kind == "tensor")
    dot_flop = {"bf16": 0.0, "tf32": 0.0, "fma": 0.0}
    for op, M, N, K, ety, prec, depth in c["dots"]:
        f = 2.0 * M * N * K * mult[min(depth, len(mult) - 1)] * P
        kind = ("bf16" if ety in ("bf16", "f16") else "tf32") if (
            op == "ttng.warp_group_dot" or prec == "tf32" or ety in ("bf16", "f16")) else "fma"
        dot_flop[kind] += f
    other = sum(n * mult[min(d, len(mult) - 1)] for n, d in c["ew"]) * P
    out = {"programs": P, "occ": occ, "bytes": nbytes, "dot_flop": sum(dot_flop.values()),
           "other_flop": other}
    if occ == 0:
        out.update(time=float("inf"), bound="does not fit")
        return out
    slots = SMS * occ
    waves = _cdiv(P, slots)
    wq = waves / (P / slots)
    t_mem = nbytes / HBM_BPS
    t_cmp = (dot_flop["bf16"] / PEAK["bf16"] + dot_flop["tf32"] / PEAK["tf32"]
             + dot_flop["fma"] / PEAK["fma"] + other / PEAK["fma"])
    thr = max(t_mem, t_cmp) * wq
    instr, how = sass_instructions(c["sass"], c.get("spans", []), loops or [])
    resident = min(occ, _cdiv(P, SMS)) * launch.num_warps
    issue = waves * instr * max(1.0, resident / 4) / CLOCK
    bound = "issue/latency" if issue > thr else ("memory" if t_mem >= t_cmp else "compute")
    out.update(waves=waves, wq=wq, t_mem=t_mem, t_cmp=t_cmp, thr=thr, issue=issue,
               time=max(thr, issue), bound=bound, instr=instr, match=how)
    return out


# ---------------------------------------------------------------------------------------
# anchors (see docs/performance/triton.md for the sources)

def fla_chunk_model(name: str, B: int, T: int, H: int, K: int, V: int) -> float:
    """fla's chunked forward, modelled with the throughput part of MODEL (no SASS for fla's
    kernels here): chunk 64, bf16 dots; stages (a) chunk_fwd_h: reads k, v (+gates), writes
    h [B, T/64, H, K, V] bf16, dots 2*64*K*V per chunk; (b) chunk_fwd_o: reads q, k, v, h,
    writes o, dots 2*64*64*K + 2*64*64*V + 2*64*K*V per chunk; delta rules add the WY/UT
    stage (reads k, v, beta; writes w, u; ~2*64*64*(K+V) + 64^3/3 per chunk) and one more
    K*V state dot per chunk in chunk_fwd_h. Latency: the sequential chunk_fwd_h walks T/64
    chunks on B*H*(K/64)*(V/64) programs. Returns seconds (throughput part only)."""
    NT = _cdiv(T, 64)
    e = 2  # bf16
    gate = {"gla": B * T * H * K * 4, "simple_gla": B * T * H * 4, "retnet": 0,
            "linear_attn": 0, "delta_net": B * T * H * e,
            "gated_delta_net": B * T * H * (4 + e)}[name]
    io = B * T * H * (2 * K + V) * e
    h_bytes = B * NT * H * K * V * e
    total_bytes = io + gate + 2 * h_bytes + B * T * H * V * e  # h written and read, o written
    flop = B * H * NT * (2 * 64 * K * V + 2 * 64 * 64 * K + 2 * 64 * 64 * V + 2 * 64 * K * V)
    if name in ("delta_net", "gated_delta_net"):
        total_bytes += 2 * B * T * H * (K + V) * e  # w, u written and read
        flop += B * H * NT * (2 * 64 * 64 * (K + V) + 64 ** 3 // 3 + 2 * 64 * K * V)
    return max(total_bytes / HBM_BPS, flop / PEAK["bf16"])


def ssd_model(B: int, T: int, H: int, P: int, N: int, G: int = 1, Q: int = 256) -> float:
    """mamba_ssm's mamba_chunk_scan_combined forward (five kernels, chunk Q=256), modelled
    stage by stage with the throughput part of MODEL, bf16 inputs, fp32 intermediates as
    mamba_ssm allocates them: chunk_cumsum (dt -> dA_cumsum, dt fp32 [B,H,nc,Q]); bmm_chunk
    (C B^T per chunk and group -> CB fp32 [B,nc,G,Q,Q]); chunk_state (states fp32
    [B,nc,H,P,N], 2QPN per chunk-head); state_passing (states read and written); chunk_scan
    (reads CB, x, C, dt, dA_cumsum, states; writes y; 2Q^2P + 2QNP per chunk-head).
    Returns seconds (sum of the stages)."""
    nc, e = _cdiv(T, Q), 2
    st = B * nc * H * P * N * 4
    stages = [
        (B * T * H * (e + 4 + 4), 0),
        (2 * B * T * G * N * e + B * nc * G * Q * Q * 4, B * nc * G * 2 * Q * Q * N),
        (B * T * H * P * e + B * T * G * N * e + 2 * B * T * H * 4 + st,
         B * nc * H * 2 * Q * P * N),
        (2 * st, 0),
        (B * nc * G * Q * Q * 4 + 2 * B * T * H * P * e + B * T * G * N * e
         + 2 * B * T * H * 4 + st,
         B * nc * H * (2 * Q * Q * P + 2 * Q * N * P)),
    ]
    return sum(max(b / HBM_BPS, f / PEAK["bf16"]) for b, f in stages)


def selective_scan_model(B: int, D: int, T: int, N: int) -> float:
    """mamba_ssm's selective_scan_fn forward (one CUDA kernel), modelled: reads u, delta
    [B,D,T] bf16, A [D,N] fp32, B, C [B,N,T] bf16, writes y [B,D,T] bf16; ~8 FLOP per
    (b, d, t, n) on the FMA units (exp(delta A), delta B u, a h + b, C h). Seconds."""
    nbytes = 3 * B * D * T * 2 + D * N * 4 + 2 * B * N * T * 2
    return max(nbytes / HBM_BPS, 8.0 * B * D * T * N / PEAK["fma"])


SFU_PER_SM_CLK = 16     # MUFU (exp2/log2/rcp/rsqrt/sin/cos) results per SM per clock, cc 9.0
SELECTIVE_SCAN_ISSUE = 5  # warp instructions per (b, d, t, n): FMUL dt*A, MUFU.EX2, FMUL B*(dt*u),
#                           FFMA h = dA*h + dBu, FFMA y += C*h


def selective_scan_floor(B: int, D: int, T: int, N: int) -> float:
    """selective_scan_model plus the floors its own algorithm needs (the old anchor had
    neither): one exp per state element per step on the SFU, B*T*D*N / (132 SMs x 16 per
    clock x 1.98 GHz), and the issue of SELECTIVE_SCAN_ISSUE warp instructions per element,
    5*B*T*D*N / (132 x 4 schedulers x 32 lanes x 1.98 GHz) (the cross-thread part of the
    block scan, shuffles and the prefix combine, not counted: a floor). Seconds."""
    n = B * D * T * N
    sfu = n / (SMS * SFU_PER_SM_CLK * CLOCK)
    issue = SELECTIVE_SCAN_ISSUE * n / (SMS * 4 * 32 * CLOCK)
    return max(selective_scan_model(B, D, T, N), sfu, issue)


# ---------------------------------------------------------------------------------------

# --backward: the kernels the training path (scancc/autograd.py) launches per chunk of
# BACKWARD_CHUNK steps: the states view (recomputes a chunk's per-step states) and the derived
# backward recurrence, in float32 (the backward's compute dtype on Triton)
BACKWARD_CHUNK = 64
# every library recurrence of CASES at its forward shape (the attention family at H16 only),
# mamba at D5120 (Mamba-2.8B's inner width) instead of D2048
BACKWARD_CASES: list[tuple[str, str, dict]] = [
    c if c[0] != "mamba" else ("mamba", "D5120 N16", {"chan": 5120, "dstate": 16, "groups": 1})
    for c in CASES if not (c[0] in ATTN and c[2]["heads"] != 16)]


def backward_recs(name: str, backward: bool) -> list:
    """(row name, recurrence) of the kernels a case compiles: the forward, or (``backward``)
    the states view and the backward recurrence the training path launches."""
    from scancc import registry
    rec = registry.get(name).build()
    if not backward:
        return [(name, rec)]
    from scancc.autograd import adjoint
    adj = adjoint(rec)
    return [(f"{name} states", adj.states_view), (f"{name} bwd", adj.backward)]


def _anchors_module():
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    if "anchors_sm90" in sys.modules:
        return sys.modules["anchors_sm90"]
    spec = importlib.util.spec_from_file_location("anchors_sm90",
                                                  os.path.join(here, "anchors_sm90.py"))
    m = importlib.util.module_from_spec(spec)
    sys.modules["anchors_sm90"] = m
    sys.modules.setdefault("bench_sm90", sys.modules.get(__name__))
    spec.loader.exec_module(m)
    return m


def _record_anchors(rows):
    """The compiled anchors of the report's rows (anchors_sm90.py): recorded in a child,
    returned with their compile jobs (compiled together with ours)."""
    A = _anchors_module()
    want, why = [], {}
    for name, label, sh, algo, _dev, _per, sizes in rows:
        if name not in A.ANCHORS:
            continue
        reason = A.available(name)
        if reason:
            why[name] = reason
            continue
        want.append(((name, label, sh), sizes))
    out = {}
    if want:
        res = A.record([[k[0], s] for k, s in want])
        jobs = A.jobs_for(res)
        out = {k: r for (k, _), r in zip(want, res)}
    else:
        jobs = []
    note = "; ".join(f"{n}: {w}" for n, w in why.items())
    return out, note, jobs


def run(names: list[str] | None, shapes: list[str], dtype: str, out=sys.stdout,
        algorithm: str = "auto", backward: bool = False, options: dict | None = None,
        compiled_anchors: bool = True) -> int:
    """``options``: extra Triton options for every call (``block_sizes``, ``num_warps``: the
    launcher's arguments; anything else the backend's compile options), for config sweeps.
    ``compiled_anchors``: also record, compile and model the anchors' own kernels
    (anchors_sm90.py; forward only)."""
    options = dict(options or {})
    from scancc import registry
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="scancc_sm90_")
    rows, jobs = [], []
    cases = [(n, lab, d, r) for n, lab, d in (BACKWARD_CASES if backward else CASES)
             for r in backward_recs(n, backward) if not names or n in names]
    for _, label, dims, (name, rec) in cases:
        for sh in shapes:
            shape = dict(SHAPES[sh])
            if backward:  # one chunk of the training path: registers do not depend on T
                shape["time"] = BACKWARD_CHUNK
            sizes = case_sizes(rec, dims, shape)
            try:
                alg = gpu_algorithm(rec) if algorithm == "auto" else algorithm
                with gpu_rules():  # "auto" itself: the launcher's own fused/staged rule
                    launches, algo, dev = record(rec, sizes, dtype,
                                                 {**options, "algorithm": algorithm})
            except Exception as e:  # noqa: BLE001 - a row that says why
                rows.append((name, label, sh, None, str(e)[:200], [], sizes))
                continue
            tag = abs(hash(launches[0].module_source)) if launches else 0
            path = os.path.join(tmp, f"{name}_{tag}.py")
            if launches and not os.path.exists(path):
                with open(path, "w") as f:
                    f.write(launches[0].module_source)
            per = []
            walks = time_walking(rec, sizes, dtype, {**options, "algorithm": alg}, launches)
            for ln, walk in zip(launches, walks):
                try:
                    loops = parse_loops(ln.source or ln.module_source, ln.kernel, ln.values(),
                                        ln.grid, ln.constexprs())
                except (SyntaxError, ValueError) as e:
                    loops = [Loop(0, None, f"parse failed: {e}")]
                job = compile_job(ln, path)
                jobs.append(job)
                per.append((ln, loops, job["key"], walk))
            rows.append((name, label, sh, algo, dev, per, sizes))
    anchor_rows = {}  # (name, label, shape) -> recorded anchor call (compiled_anchors)
    anchor_note = ""
    if compiled_anchors and not backward:
        try:
            anchor_rows, anchor_note, ajobs = _record_anchors(rows)
            jobs += ajobs
        except Exception as e:  # noqa: BLE001 - the report says why, ours still runs
            anchor_note = f"compiled anchors failed: {type(e).__name__}: {str(e)[-300:]}"
    t_rec = time.time() - t0
    ours = [j for j in jobs if "module" not in j]
    theirs = [j for j in jobs if "module" in j]
    compiled = compile_all(ours) if ours else {}
    if theirs:  # the anchors' configs: kept between runs (anchors_sm90.CACHE)
        try:
            compiled.update(compile_all(theirs, timeout=7200,
                                        cache=_anchors_module().compile_cache()))
        except Exception as e:  # noqa: BLE001 - ours stand; the anchor rows say why
            anchor_note = (anchor_note + "; " if anchor_note else "") + f"compile: {str(e)[-300:]}"
    t_all = time.time() - t0

    print(f"sm_90 report: {dtype} inputs, "
          f"{'options ' + json.dumps(options) if options else 'default options'}, algorithm {algorithm!r} (auto: as "
          f"resolved on a GPU), "
          f"{'launch specialization as on a GPU (--specialize)' if SPECIALIZE else 'no launch specialization (ints and pointers unspecialized: pessimistic)'}; toolchain figures *measured* "
          f"(triton.compile + ptxas-blackwell -v -arch=sm_90a + nvdisasm), times *modelled* "
          f"(MODEL below). Record {t_rec:.0f} s, total {t_all:.0f} s.\n", file=out)
    print("| recurrence | shape | B,T | algorithm | kernel | grid | programs | iterations/program "
          "| regs | spill st+ld B | smem B | tensor cores | occ | waves | GB | dot GFLOP "
          "| other GFLOP | SASS instr/program | modelled us | bound |", file=out)
    print("|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
          file=out)
    summary = []
    for name, label, sh, algo, dev, per, sizes in rows:
        if algo is None:
            print(f"| {name} | {label} | {sh} | record failed: {dev} |" + " |" * 16, file=out)
            summary.append((name, label, sh, None, None, None, None, None))
            continue
        tot, spills, tc_all, errs = 0.0, 0, True, []
        par, seq = [], []  # programs of the parallel / time-walking (state passing) kernels
        any_dot = False
        for ln, loops, key, walk in per:
            c = compiled.get(key, {"error": "not compiled"})
            it = iterations(loops)
            if "error" in c:
                errs.append(c["error"])
                print(f"| {name} | {label} | {sh} | {algo} | {ln.kernel} | {ln.grid} "
                      f"| {ln.programs} | {it} | compile failed: {c['error'][:120]} |"
                      + " |" * 11, file=out)
                continue
            m = model(ln, c, it, depth_multipliers(loops), loops)
            tot += m["time"]
            spills += c["spill_st"] + c["spill_ld"]
            if c["dots"]:
                any_dot = True
                tc_all &= c["tc"]
            (seq if walk else par).append(ln.programs)
            print(f"| {name} | {label} | {sh} | {algo} | {ln.kernel} | {ln.grid} | {ln.programs} "
                  f"| {it if it is not None else '?'} | {c['regs']} "
                  f"| {c['spill_st']}+{c['spill_ld']} "
                  f"| {c['smem']} | {'yes' if c['tc'] else ('no' if c['dots'] else '-')} "
                  f"| {m['occ']} | {m.get('waves', '-')} | {m['bytes'] / 1e9:.3f} "
                  f"| {m['dot_flop'] / 1e9:.1f} | {m['other_flop'] / 1e9:.1f} "
                  f"| {m.get('instr', 0):,.0f}{' approx' if m.get('match') == 'approx' else ''} "
                  f"| {m['time'] * 1e6:.1f} "
                  f"| {m['bound']} |", file=out)
        # every parallel stage >= 132 programs; a time-walking stage may be smaller only
        # when the call has a parallel stage (the state passing of a chunked form)
        par_ok = all(p >= SMS for p in par) and (bool(par) or all(p >= SMS for p in seq))
        summary.append((name, label, sh, algo, tot, spills, (tc_all if any_dot else None),
                        par_ok, len(per), errs))
    print("\nLoops (source, evaluated; `?` = not evaluable):\n", file=out)
    seen = set()
    for name, label, sh, algo, dev, per, sizes in rows:
        for ln, loops, key, walk in per or []:
            k = (name, label, sh, ln.kernel)
            if k not in seen:
                seen.add(k)
                kind = "walks all of time" if walk else "parallel in time"
                print(f"- {name} {label} {sh} `{ln.kernel}` ({kind}): "
                      f"{loop_text(loops) or 'no loop'}", file=out)
    A = _anchors_module() if anchor_rows else None
    amod = {k: A.modelled(r, compiled) for k, r in anchor_rows.items()} if A else {}
    if amod:
        print("\n## Compiled anchors (the anchors' own Triton kernels, same pipeline)\n",
              file=out)
        print("Recorded under a pretend-H100 driver (anchors_sm90.py), compiled and modelled "
              "like ours; per launch the autotune config with the lowest *modelled* time "
              f"among at most {A.MAX_CONFIGS} tried (`tried/total`; autotune on a GPU times "
              "them instead). `?` iterations: a loop bound the source evaluation could not "
              "resolve (its SASS loop then counts one trip: the issue term is low).\n", file=out)
        print("| recurrence | shape | B,T | anchor op | kernel | grid | warps | stages "
              "| block constexprs | configs tried/total | iterations | regs | spill B "
              "| smem B | occ | modelled us | bound |", file=out)
        print("|---|---|---|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
              file=out)
        for (name, label, sh), m in amod.items():
            op = A.ANCHORS[name][0] + "." + A.ANCHORS[name][1]
            if m.get("error") and not m["kernels"]:
                print(f"| {name} | {label} | {sh} | {op} | failed: {m['error'][:150]} |"
                      + " |" * 12, file=out)
                continue
            for kern, ln, mm, tried, total, errs in m["kernels"]:
                if ln is None:
                    print(f"| {name} | {label} | {sh} | {op} | {kern} | compile failed: "
                          f"{(errs or ['?'])[0][:120]} |" + " |" * 11, file=out)
                    continue
                blocks = ", ".join(f"{x.name}={x.value}" for x in ln.args
                                   if x.constexpr and x.name.startswith("B")
                                   and isinstance(x.value, int) and not isinstance(x.value, bool))
                print(f"| {name} | {label} | {sh} | {op} | {kern} | {ln.grid} | {ln.num_warps} "
                      f"| {ln.num_stages or '-'} | {blocks} | {tried}/{total or 1} "
                      f"| {mm['iters'] if mm['iters'] is not None else '?'} | {mm['regs']} "
                      f"| {mm['spill']} | {mm['smem']} | {mm['occ']} | {mm['time'] * 1e6:.1f} "
                      f"| {mm['bound']} |", file=out)
    print("\n## Targets (issue 11)\n", file=out)
    print("anchors: `anchor thr-only us` = the older column, the throughput part of the model "
          "applied to the anchor's published decomposition (fla_chunk_model, ssd_model, "
          "selective_scan_model; no issue term). `anchor us` = the anchor's own kernels "
          "compiled for sm_90 and modelled with the full model (fla 0.6.0 / mamba_ssm "
          "2.3.2.post1 Triton, see the table above; source `compiled`), or for mamba "
          "(selective_scan_fn, CUDA C++, not compilable here) selective_scan_floor (source "
          "`model+floor`: the throughput model plus its SFU exp and FMA-issue floors). "
          "All *modelled*.", file=out)
    if anchor_note:
        print(f"Compiled anchors not available: {anchor_note}.", file=out)
    print("\n| recurrence | shape | B,T | algorithm | kernels | zero spills | tensor cores (chunked) "
          "| >=132 programs (parallel stages, B1T32768) | modelled us | anchor thr-only us "
          "| vs thr-only | anchor us | anchor source | vs anchor (target <= 1.5x) |", file=out)
    print("|---|---|---|---|---:|---|---|---|---:|---:|---|---:|---|---|", file=out)
    for s in summary:
        name, label, sh = s[0], s[1], s[2]
        if s[3] is None:
            print(f"| {name} | {label} | {sh} | failed | | | | | | | | | | |", file=out)
            continue
        _, _, _, algo, tot, spills, tc, par_ok, nk, errs = s
        anchor, anchor2, src2 = None, None, "-"
        if not backward:  # anchors model the forward only
            dims = next(c[2] for c in CASES if c[0] == name and c[1] == label)
            sizes = case_sizes(registry.get(name).build(), dict(dims), SHAPES[sh])
        if backward:
            pass
        elif name in ATTN:
            anchor = fla_chunk_model(name, sizes["batch"], sizes["time"], sizes["heads"],
                                     sizes["key"], sizes["value"])
        elif name == "mamba2":
            anchor = ssd_model(sizes["batch"], sizes["time"], sizes["heads"], sizes["headdim"],
                               sizes["dstate"], sizes["groups"])
        elif name == "mamba":
            anchor = selective_scan_model(sizes["batch"], sizes["chan"], sizes["time"],
                                          sizes["dstate"])
            anchor2 = selective_scan_floor(sizes["batch"], sizes["chan"], sizes["time"],
                                           sizes["dstate"])
            src2 = "model+floor"
        m = amod.get((name, label, sh))
        if m is not None:
            if m["time"] is not None:
                anchor2, src2 = m["time"], "compiled"
            else:
                src2 = f"failed: {str(m.get('error'))[:60]}"
        pf = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
        tcs = "n/a" if algo == "recurrent" else ("no dot" if tc is None else pf(tc))
        par = pf(par_ok) if sh == "B1T32768" else "n/a"
        vs = "n/a" if anchor is None else f"{pf(tot <= anchor)} ({tot / anchor:.1f}x)"
        vs2 = "n/a" if anchor2 is None else f"{pf(tot <= 1.5 * anchor2)} ({tot / anchor2:.2f}x)"
        print(f"| {name} | {label} | {sh} | {algo} | {nk} | {pf(spills == 0)} | {tcs} | {par} "
              f"| {tot * 1e6:.1f}{' (errors)' if errs else ''} "
              f"| {'-' if anchor is None else f'{anchor * 1e6:.1f}'} | {vs} "
              f"| {'-' if anchor2 is None else f'{anchor2 * 1e6:.1f}'} | {src2} | {vs2} |",
              file=out)
    print("\n" + MODEL, file=out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Offline sm_90 report of every kernel the Triton "
                                 "forward launches (registers, spills, tensor cores, programs, "
                                 "iterations) with a modelled H100 time.")
    ap.add_argument("--names", nargs="*", help="recurrences (default: all library ones)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtype", default=None,
                    help="input dtype (default bfloat16; float32 with --backward, the "
                    "backward's compute dtype)")
    ap.add_argument("--backward", action="store_true",
                    help="the training path's kernels instead: per library recurrence of "
                    "BACKWARD_CASES, the states view and the derived backward recurrence, "
                    f"at time={BACKWARD_CHUNK} (one chunk) and the shapes' batch")
    ap.add_argument("--algorithm", default="auto",
                    help="the Triton algorithm option (auto: what auto picks on a GPU)")
    ap.add_argument("--options", default=None, metavar="JSON",
                    help='extra options for every call, e.g. \'{"num_warps": 8, "block_sizes": '
                    '{"value": 32, "time": 64}}\' (block_sizes and num_warps go to the launcher)')
    ap.add_argument("--no-compiled-anchors", action="store_true",
                    help="skip recording/compiling the anchors' own kernels (fla, mamba_ssm; "
                    "anchors_sm90.py): the compiled-anchor column then says '-'")
    ap.add_argument("--specialize", action="store_true",
                    help="compile as a GPU launch specializes: ints == 1 as constexprs, ints "
                         "divisible by 16 and tensor pointers with tt.divisibility 16 (for ours "
                         "and the compiled anchors alike)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    a = ap.parse_args(argv)
    global SPECIALIZE
    SPECIALIZE = a.specialize
    if a.list:
        for n, label, dims in (BACKWARD_CASES if a.backward else CASES):
            print(n, label, dims)
        return 0
    dtype = a.dtype or ("float32" if a.backward else "bfloat16")
    return run(a.names, a.shapes, dtype, algorithm=a.algorithm, backward=a.backward,
               options=json.loads(a.options) if a.options else None,
               compiled_anchors=not a.no_compiled_anchors)


if __name__ == "__main__":
    sys.exit(main())
