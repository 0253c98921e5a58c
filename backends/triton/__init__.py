"""The Triton backend: renders Triton source from the IR and runs it with torch tensors, on a
GPU when there is one, else the same kernels in Triton's CPU interpreter.

Algorithms (``algorithm=`` option; ``"auto"`` picks from the transition structure):

- ``recurrent`` (recurrent.py): every transition kind and op; state in registers, a loop
  over time. The ground truth the faster forms must match.
- ``chunked`` (chunked.py): parallel in time with ``tl.dot``, for scalar/identity decays,
  key-dimension diagonal decay and householder (delta rule, UT form) transitions.
- ``staged`` (staged.py): the chunked form in three launches (chunk states in parallel, a
  sequential pass over chunks only, outputs in parallel) for every chunked kind
  (householder: the UT factors in parallel). ``auto`` renders both forms in one module; the
  launcher picks the fused kernel when the (grid, V-block) programs fill the GPU
  (``staged.Lowering.SMS``).
- ``scan`` (scan.py): the recurrent kernel parallel in time by chunks, for identity/scalar/
  diagonal transitions; ``"auto"`` picks it only on a GPU where chunked does not apply, and
  its launcher may still run one chunk (scan.CHUNK_RULE, scan.AUTO_MIN_STEPS).
- ``window`` (window.py): parallel in time for recurrences of shift registers only (fir, swa,
  bmojo_f): time blocks that replay a halo of W - 1 steps; ``"auto"`` picks it on a GPU, and
  its launcher runs one block when the grid already fills the GPU (window.BLOCK_RULE).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as _np
from scancc.ir import IRError, Recurrence, format_recurrence

from ..base import Backend, Option, Problem, RunResult, UnsupportedError

if TYPE_CHECKING:  # the runtime imports torch: only when a kernel runs
    from .runtime import Compiled

ALGORITHMS = ("auto", "recurrent", "chunked", "staged", "scan", "window")
DOT_PRECISIONS = ("auto", "ieee", "tf32x3", "tf32", "input")


def _lowering(rec: Recurrence, options: Mapping[str, Any]):
    from . import chunked, recurrent, scan, staged, window
    algo = options.get("algorithm", "auto")
    if algo not in ALGORITHMS:
        raise UnsupportedError("triton", rec.name, f"option algorithm={algo!r}: expected one of "
                               f"{', '.join(ALGORITHMS)}")
    if algo == "staged":
        ok, why = staged.applies(rec)
        if not ok:
            raise UnsupportedError("triton", rec.name, f"algorithm='staged': {why}")
        return staged.Lowering(rec, options)
    if algo == "auto" and staged.applies(rec)[0]:  # fused or staged: the launcher's rule
        return staged.Lowering(rec, options, choose=True)
    if algo == "chunked" or (algo == "auto" and chunked.applies(rec)[0]):
        ok, why = chunked.applies(rec)
        if not ok:
            raise UnsupportedError("triton", rec.name, f"algorithm='chunked': {why}")
        return chunked.Lowering(rec, options)
    if algo == "window" or (algo == "auto" and window.auto(rec)):  # shift registers only
        return window.lowering(rec, options)
    if algo == "scan" or (algo == "auto" and scan.auto(rec)):
        ok, why = scan.applies(rec)
        if not ok:
            raise UnsupportedError("triton", rec.name, f"algorithm='scan': {why}")
        return scan.Lowering(rec, options)
    return recurrent.Lowering(rec, options)


def _block_sizes_rule(bs: Mapping, rec: Recurrence | None) -> Problem | None:
    dims = {x.name for x in rec.dims} if rec is not None else None
    for d, v in bs.items():
        if dims is not None and d not in dims:
            return Problem("block_sizes", dict(bs), f"a dim of {rec.name!r} as each key "
                           f"(dims: {', '.join(sorted(dims))})", f"{d!r}, not a dim")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
            return Problem(f"block_sizes[{d!r}]", v, "a power of two")
    return None


OPTIONS = {o.name: o for o in (
    Option("algorithm", "auto: chunked where it applies, else window or scan on a GPU where "
           "they apply, else recurrent", "auto",
           (str,), ALGORITHMS),
    Option("block_sizes", "register block per dim, {dim: power of two} (None: the plan's)",
           None, (dict,), rule=_block_sizes_rule),
    Option("num_warps", "warps per program", 4, (int,), (1, 2, 4, 8, 16, 32)),
    Option("autotune", "on a GPU, time a few block sizes x num_warps on the first call per "
           "shape class (T and batch excluded) and keep the fastest, cached on disk "
           "(autotune.py); off, or block_sizes/num_warps given: the defaults", True, (bool,)),
    Option("dot_precision", "tl.dot operands of the chunked form (auto: tensor cores; 16-bit "
           "inputs: 16-bit intra-chunk operands, tf32 state dots; float32 inputs: tf32x3; "
           "ieee: exact float32)", "auto", (str,),
           DOT_PRECISIONS),
)}


def _check_options(rec: Recurrence, options: Mapping[str, Any]) -> None:
    TritonBackend.check_options(rec, options)


class TritonBackend(Backend):
    name = "triton"
    array = "torch"
    generates_source = True
    dtypes = ("float32", "float16", "bfloat16")
    options = OPTIONS

    def __init__(self):
        self._memo: dict = {}

    def available(self) -> tuple[bool, str]:
        try:
            import torch

            from . import runtime
            runtime.prepare()
            import triton
        except ImportError as e:
            return False, f"needs triton and torch (pip install 'scancc[triton]'): {e}"
        if torch.cuda.is_available():
            return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        return True, (f"triton {triton.__version__}, no GPU: runs the same kernels in Triton's "
                      "CPU interpreter (TRITON_INTERPRET=1) on torch CPU tensors")

    def supports(self, rec: Recurrence, options: Mapping[str, Any]) -> tuple[bool, str]:
        try:
            _check_options(rec, options)
            _lowering(rec, options)
        except IRError as e:
            return False, str(e)
        return True, ""

    def _lowering_for(self, rec: Recurrence, options: Mapping[str, Any]):
        _check_options(rec, options)
        return _lowering(rec, options)

    def compiled(self, rec: Recurrence, options: Mapping[str, Any],
                 dtypes: tuple[str, ...] = ()) -> "Compiled":
        """The lowering, source and loaded launcher of ``rec`` for ``options`` and input
        ``dtypes``: built on the first call, then one dict lookup (runtime.compiled)."""
        from . import runtime
        return runtime.compiled(rec, options, dtypes, lambda: self._compile(rec, options, dtypes))

    def _compile(self, rec: Recurrence, options: Mapping[str, Any], dtypes: tuple[str, ...]):
        from . import runtime
        for inp, dt in zip(rec.inputs, dtypes):
            if dt not in self.dtypes:
                raise UnsupportedError(self.name, rec.name, f"input {inp.name!r} has dtype {dt}; "
                                       f"this backend takes {', '.join(self.dtypes)}")
        _check_options(rec, options)
        low = _lowering(rec, options)
        source = low.render()
        # the source depends on these (block sizes only through which dims are blocked)
        src_opts = {k: v for k, v in options.items() if k in ("algorithm", "dot_precision")}
        src_opts["blocked"] = tuple(sorted(options.get("block_sizes") or {}))
        key = runtime.cache_key(format_recurrence(rec), low.algorithm, src_opts, tuple(dtypes))
        mod = runtime.load(key, source)
        # restores the optional dims a caller left out (size-1 axes), per input
        unsqueeze = tuple(tuple(i for i, d in enumerate(x.dims) if d in x.optional_dims)
                          for x in rec.inputs)
        return runtime.Compiled(low, source, getattr(mod, low.launcher_name), low.algorithm,
                                tuple(len(x.dims) for x in rec.inputs), unsqueeze,
                                {"algorithm": low.algorithm, "interpreted": not runtime.has_gpu()})

    def algorithm(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        """The algorithm ``options`` select for ``rec``."""
        return _lowering(rec, options).algorithm

    def render(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        _check_options(rec, options)
        return _lowering(rec, options).render()

    def launcher(self, rec: Recurrence, options: Mapping[str, Any], dtypes=()):
        """The generated launcher function (loads the module through the kernel cache)."""
        return self.compiled(rec, options, tuple(dtypes)).launcher

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any]) -> RunResult:
        runtime = _RUNTIME or _runtime()
        runtime.prepare()  # once per process, then a flag check
        args = [inputs[x.name] for x in rec.inputs]
        c = self._last_compiled(rec, options, args)
        if c.optional:  # some input has optional dims: restore those left out (size 1)
            for i, (a, n, axes) in enumerate(zip(args, c.ranks, c.unsqueeze)):
                if a.dim() != n:
                    for ax in axes:
                        a = a.unsqueeze(ax)
                    args[i] = a
        bs, nw = options.get("block_sizes"), options.get("num_warps") or 4
        if runtime.has_gpu():  # inputs go to the GPU; without one everything is on the CPU
            dev = runtime.device()
            args = [a if a.device == dev else a.to(dev) for a in args]
            if initial_state:
                initial_state = {k: v.to(dev) for k, v in initial_state.items()}
        h0, keep = initial_state or None, bool(output_final_state)
        if _autotune().enabled(options):  # the first call per shape class times a few configs
            cfg = _autotune().choose(c, sizes, lambda b, w: c.launcher(*args, h0, keep, b, w))
            bs, nw = cfg["block_sizes"], cfg["num_warps"]
        # padded lanes may compute 0/0 or log(0) in the interpreter (runtime.quiet_padding)
        with _np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            outs, finals = c.launcher(*args, h0, keep, bs, nw)
        return RunResult(outs, finals, dict(c.counters))

    varlen = True  # packed batches: the recurrent kernel, one program per sequence (varlen.py)

    def run_varlen(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
                   initial_state: Mapping[str, Any] | None, output_final_state: bool,
                   options: Mapping[str, Any], cu: tuple[int, ...]) -> RunResult:
        from . import varlen
        return varlen.run(self, rec, inputs, sizes, initial_state, output_final_state,
                          options, cu)

    def chunked_backward(self, rec: Recurrence, options: Mapping[str, Any]):
        """The chunked backward of ``rec`` (chunked_backward.py: no per-step states) when the
        ``algorithm`` option allows the chunked form (auto, chunked, staged) and its structure
        is supported (identity, scalar, key-diagonal and householder decays), else None
        (``scancc.autograd`` then runs the derived backward recurrence)."""
        algorithm = options.get("algorithm", "auto")
        if algorithm not in ("auto", "chunked", "staged"):
            return None
        from . import chunked_backward
        plan = chunked_backward._plan(rec)
        if isinstance(plan, str):
            return None
        # householder decays too (chunked_backward_householder.py): the derived backward
        # recurrence would write every step's state (per-chunk states_view), which the chunked
        # form never does (docs/training.md)
        return chunked_backward.backward

    def step_launcher(self, rec: Recurrence, options: Mapping[str, Any], dtypes=(),
                      indexed: bool = False):
        """The decode step's launcher (step.py): one step, the states updated in place
        (``indexed``: rows of state pools picked by ``state_indices``)."""
        from .step import step_launcher
        return step_launcher(rec, options, tuple(dtypes), indexed)

    def _last_compiled(self, rec: Recurrence, options: Mapping[str, Any], args: list):
        """``compiled`` for a call, through a last-hit memo keyed by the identity of the IR
        and of the options dict (a caller reusing both, as scancc's Runner does, skips even
        freezing the options) and the inputs' torch dtypes."""
        tdt = tuple([a.dtype for a in args])
        key = (id(rec), id(options), tdt)
        memo = self._memo.get(key)
        if memo is not None and memo[0] is rec and memo[1] is options and memo[2] == options:
            return memo[3]
        c = self.compiled(rec, options, tuple(str(d).replace("torch.", "") for d in tdt))
        if len(self._memo) >= 1024:
            self._memo.clear()
        snapshot = {k: dict(v) if isinstance(v, Mapping) else v for k, v in options.items()}
        self._memo[key] = (rec, options, snapshot, c)
        return c


_RUNTIME = None


def _autotune():
    from . import autotune
    return autotune


def _runtime():
    """The runtime module, imported on the first run (it is where torch gets imported)."""
    global _RUNTIME
    from . import runtime
    _RUNTIME = runtime
    return runtime


__all__ = ["TritonBackend", "ALGORITHMS"]
