"""The NKI backend: render NKI kernel source (current API) and run it.

Running: when the real ``nki`` package is importable (it ships only on AWS's package index),
the kernel source is imported as is and run through ``nki.simulate(kernel)``; otherwise it
runs in the project's strict NumPy emulator (``emulator.py``), which resolves the source's
``nki`` imports to itself without touching ``sys.modules``. Backend options:

- ``chip``: ``"trn1"`` (default) or ``"trn2"``: the row of the hardware table
  (``hardware.py``) the tile plan and the emulator check against. (Named ``chip``, not
  ``target``: ``compile``'s ``target`` is the backend.)
- ``time_tile``: force the time-tile size (default: the largest that fits).
- ``dtype``: the NKI dtype of the inputs (``"float32"``, ``"bfloat16"``, ``"float16"``);
  default from the arrays (float64 arrays run as float32: NKI has no float64).
- ``runner``: ``"auto"`` (default), ``"emulator"`` or ``"simulate"`` (needs real ``nki``).
- ``loop_order``: ``"auto"`` (default: the order with fewer DMA bytes), ``"outer"`` (outer
  dims, then the partition tile, then the time tile) or ``"time"`` (time tile outermost).
- ``algorithm``: ``"auto"`` (default: the chunked matmul form where it applies, else the
  recurrent form), ``"recurrent"`` (a scan or per-step loop in time) or ``"chunked"`` (an
  error where it does not apply).

Modules: ``plan.py`` (the static plan: layout, algorithm per state, tile candidates, budget),
``lowering.py`` (the emit step), ``rules.py`` (``OP_RULES`` / ``TRANSITION_RULES``),
``chunked.py`` (the chunked form), ``values.py`` (the emitter's vocabulary), ``hardware.py``
(the chip table), ``emulator.py`` (the NumPy emulator).

``OPTIONS`` declares them (types, choices, defaults); ``check_options`` is their one check.
"""
from __future__ import annotations

import importlib
import threading
from typing import Any, Mapping

import numpy as np

from scancc.ir import Recurrence

from ..base import Backend, Option, OptionError, Problem, RunResult, UnsupportedError
from . import emulator
from .hardware import CHIPS as HARDWARE_CHIPS
from .hardware import DEFAULT_CHIP
from .lowering import plan_and_render
from .plan import Plan, PlanError
from .values import NAME

RUNNERS = ("auto", "emulator", "simulate")
# The emulator keeps one machine per process (it refuses nested runs): kernel runs from
# several threads take turns under this lock (docs/security.md, thread safety).
EMULATOR_LOCK = threading.RLock()
CHIPS = tuple(HARDWARE_CHIPS)


def _positive_int(v: int, rec: Recurrence | None) -> Problem | None:
    return None if v >= 1 else Problem("time_tile", v, "a positive integer")


def _sizes_rule(sizes, rec: Recurrence | None) -> Problem | None:
    dims = [x.name for x in rec.dims] if rec is not None else list(sizes)
    for d, n in sizes.items():
        if d not in dims:
            return Problem("sizes", dict(sizes), f"a dim of {rec.name!r} as each key "
                           f"(dims: {', '.join(dims)})", f"{d!r}, not a dim")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return Problem(f"sizes[{d!r}]", n, "a positive integer")
    missing = [d for d in dims if d not in sizes]
    if missing:
        return Problem("sizes", dict(sizes), f"a size for every dim of {rec.name!r}",
                       f"none for {', '.join(missing)}")
    return None


OPTIONS = {o.name: o for o in (
    Option("chip", "the Trainium generation whose SBUF budget the plan checks", "trn1", (str,),
           CHIPS),
    Option("time_tile", "force the time-tile size (None: the largest that fits)", None,
           (int,), rule=_positive_int),
    Option("dtype", "NKI dtype of the inputs (None: from the arrays)", None, (str,),
           tuple(emulator.DTYPES)),
    Option("runner", "emulator, nki.simulate (needs real nki), or auto", "auto", (str,),
           RUNNERS),
    Option("sizes", "render() only: {dim: size} (None: scancc.ir.default_sizes)",
           None, (dict,), rule=_sizes_rule),
    Option("initial_state", "render() only: the kernel takes initial states", False, (bool,)),
    Option("final_state", "render() only: the kernel returns final states", False, (bool,)),
    Option("algorithm", "auto: the chunked matmul form where it applies, else recurrent",
           "auto", (str,), ("auto", "recurrent", "chunked")),
    Option("loop_order", "auto (fewer DMA bytes), outer or time (time tile outermost)", "auto",
           (str,), ("auto", "outer", "time")),
)}



def real_nki():
    """The real ``nki`` module if it is installed (not PyPI's empty placeholder), else None."""
    try:
        mod = importlib.import_module("nki")
    except ImportError:
        return None
    ok = callable(getattr(mod, "simulate", None)) and callable(getattr(mod, "jit", None))
    return mod if ok else None


class NkiBackend(Backend):
    name = NAME
    array = "numpy"
    generates_source = True
    dtypes = ("float64", "float32", "float16", "bfloat16")
    options = OPTIONS

    def __init__(self):
        self._cache: dict = {}
        self._varlen_cache: dict = {}
        self.last_counters: dict | None = None
        self.last_plan: Plan | None = None

    def available(self) -> tuple[bool, str]:
        mod = real_nki()
        if mod is not None:
            return True, f"nki {getattr(mod, '__version__', '?')} (nki.simulate)"
        return True, "NKI emulator (nki not importable)"

    def supports(self, rec: Recurrence, options: Mapping[str, Any]) -> tuple[bool, str]:
        try:
            self.check_options(rec, options)
        except OptionError as e:
            return False, str(e)
        from scancc.ir import default_sizes
        try:  # rendering at the default sizes finds every unsupported feature early
            self._render(rec, default_sizes(rec), False, False, options)
        except PlanError:
            pass  # a budget problem depends on the actual sizes: reported at run time
        except UnsupportedError as e:
            return False, e.feature
        return True, ""

    def render(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        """Kernel source for ``options['sizes']`` (default: scancc.ir.default_sizes)."""
        from scancc.ir import default_sizes
        self.check_options(rec, options)
        sizes = options.get("sizes") or default_sizes(rec)
        return self._render(rec, sizes, bool(options.get("initial_state", False)),
                            bool(options.get("final_state", False)), options)[0]

    def _render(self, rec, sizes, init: bool, final: bool, options,
                cu: tuple[int, ...] | None = None, step: bool = False) -> tuple[str, Plan]:
        chip = options.get("chip") or DEFAULT_CHIP
        tt = options.get("time_tile")
        algo = options.get("algorithm") or "auto"
        order = options.get("loop_order", "auto")
        if step:  # the decode step kernel (step.py): one step, the recurrent form
            tt, algo = 1, "recurrent"
        key = (rec, tuple(sorted(sizes.items())), init, final, chip, tt, algo, order, cu, step)
        # packed kernels are specialized on cu_seqlens: a serving loop renders many, so
        # they are kept apart, at most VARLEN_CACHE of them
        cache = self._cache if cu is None else self._varlen_cache
        if key not in cache:
            if cu is not None and len(cache) >= self.VARLEN_CACHE:
                cache.clear()
            cache[key] = plan_and_render(rec, sizes, init, final, chip, tt, algo, order, cu,
                                         step)
        return cache[key]

    VARLEN_CACHE = 64

    def run_step(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
                 state: Mapping[str, Any], options: Mapping[str, Any]) -> RunResult:
        """The decode step's dedicated kernel (step.py): one step, no time loop."""
        from .step import run_step
        return run_step(self, rec, inputs, sizes, state, options)

    varlen = True  # packed batches: time tiles end at the boundaries, carries reset there

    def run_varlen(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
                   initial_state: Mapping[str, Any] | None, output_final_state: bool,
                   options: Mapping[str, Any], cu: tuple[int, ...]) -> RunResult:
        """A packed batch in one kernel, specialized on ``cu`` as every NKI kernel is on its
        sizes (lowering.Renderer.varlen_*); where that kernel cannot be rendered (the batch dim
        on the partitions, a dim of size 0), one run per sequence."""
        from ..base import run_varlen_by_sequence
        try:
            if 0 in sizes.values():
                raise UnsupportedError(NAME, rec.name, "a dim of size 0")
            self._render(rec, dict(sizes), initial_state is not None, output_final_state,
                         options, cu)
        except UnsupportedError:
            return run_varlen_by_sequence(self, rec, inputs, sizes, initial_state,
                                          output_final_state, options, cu)
        res = self.run(rec, inputs, sizes, initial_state, output_final_state, options, cu)
        res.counters = {**res.counters, "varlen": "one kernel"}
        if output_final_state:  # an empty sequence's final state is its initial state
            for n in range(len(cu) - 1):
                if cu[n + 1] == cu[n]:
                    for s in rec.states:
                        ax = s.dims.index(next(d.name for d in rec.dims if d.role == "batch"))
                        f = res.final_states[s.name]
                        idx = (slice(None),) * ax + (n,)
                        h = (initial_state or {}).get(s.name)
                        f[idx] = 0.0 if h is None else np.asarray(h)[idx]
        return res

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any], cu: tuple[int, ...] | None = None,
            step: bool = False) -> RunResult:
        if 0 in sizes.values():
            return self._run_empty(rec, inputs, sizes, initial_state, output_final_state)
        init = initial_state is not None
        src, plan = self._render(rec, dict(sizes), init, output_final_state, options, cu, step)
        self.last_plan = plan
        dtype = options.get("dtype") or (rec.numerics.input if rec.numerics.input
                                          in emulator.DTYPES else None)
        if dtype == "float64":  # NKI has no float64: float64 arrays run as float32
            dtype = "float32"
        if dtype is not None and dtype not in emulator.DTYPES:
            raise UnsupportedError(NAME, rec.name, f"dtype {dtype!r}: NKI inputs are one of "
                                   f"{', '.join(emulator.DTYPES)}")
        arrays, dtypes = [], []
        for inp in rec.inputs:
            a = np.asarray(inputs[inp.name])
            if a.ndim != len(inp.dims):  # an optional dim left out: put it back (size 1)
                a = a.reshape(tuple(sizes[d] for d in inp.dims))
            arrays.append(a)
            dtypes.append(dtype or ("float16" if a.dtype == np.float16 else "float32"))
        if init:
            for s in rec.states:
                h = initial_state.get(s.name)
                shape = tuple(len(cu) - 1 if cu is not None and rec.dim(d).role == "batch"
                              else sizes[d] for d in s.dims)
                h = np.zeros(shape) if h is None else np.asarray(h)
                arrays.append(h)
                dtypes.append("float32")
        runner = options.get("runner", "auto")
        if runner not in RUNNERS:
            raise UnsupportedError(NAME, rec.name, f"unknown runner {runner!r} "
                                   f"(known: {', '.join(RUNNERS)})")
        mod = real_nki() if runner in ("auto", "simulate") else None
        kname = f"{rec.name}_kernel"
        if runner == "simulate" and mod is None:
            raise UnsupportedError(NAME, rec.name, "runner='simulate' needs the real nki package "
                                   "(from AWS's Neuron package index); it is not importable")
        if mod is not None:  # the official simulator; cannot run on this machine
            ns: dict = {"__name__": f"scancc_nki_{rec.name}"}
            exec(compile(src, f"<nki kernel {rec.name}>", "exec"), ns)  # noqa: S102
            res = mod.simulate(ns[kname])(*[_to_np(a, d) for a, d in zip(arrays, dtypes)])
            counters: dict = {}
        else:
            kernel = emulator.load_kernel(src, kname, f"<nki kernel {rec.name}>")
            kernel.chip = options.get("chip") or DEFAULT_CHIP
            with EMULATOR_LOCK:
                res = kernel(*arrays, dtypes=dtypes)
                counters = kernel.counters
        res = res if isinstance(res, tuple) else (res,)
        outs = {o.name: np.asarray(r) for o, r in zip(rec.outputs, res)}
        finals = None
        if output_final_state:
            finals = {s.name: np.asarray(r) for s, r in zip(rec.states, res[len(rec.outputs):])}
        self.last_counters = counters
        return RunResult(outs, finals, counters)

    def _run_empty(self, rec, inputs, sizes, initial_state, output_final_state) -> RunResult:
        """A problem with a dim of size 0 (T=0, batch=0, ...): no kernel is rendered (a tile
        of 0 rows is not an NKI shape); the reference interpreter's result, in float32 as the
        kernel's: empty outputs, and the initial state (or zeros) as the final state at T=0."""
        from ..reference.interpreter import Interpreter
        outs, finals = Interpreter(rec, dict(sizes)).run(
            {k: np.asarray(v) for k, v in inputs.items()},
            None if initial_state is None else {k: np.asarray(v)
                                                for k, v in initial_state.items()})
        outs = {k: np.asarray(v, np.float32) for k, v in outs.items()}
        finals = ({k: np.asarray(v, np.float32) for k, v in finals.items()}
                  if output_final_state else None)
        self.last_plan, self.last_counters = None, {}
        return RunResult(outs, finals, {})


def _to_np(a: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes  # the real toolchain's NumPy bfloat16
        return a.astype(ml_dtypes.bfloat16)
    return a.astype(np.float16 if dtype == "float16" else np.float32)


__all__ = ["NkiBackend", "PlanError", "emulator", "real_nki"]
