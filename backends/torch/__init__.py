"""The torch backend: renders each recurrence to a readable, standalone PyTorch function and
runs it on the device of its input tensors (CPU, CUDA, MPS, XPU: no device-specific code),
accumulating in float32 (float64 for float64 inputs).

Algorithms (``algorithm=`` option; ``"auto"`` picks ``chunked`` where it applies):

- ``recurrent`` (recurrent.py): every transition kind and op; a Python loop over the time
  steps of each chunk, each step one vectorised torch expression over every other dim.
- ``chunked``: parallel in time within each chunk of ``chunk`` steps, carried across chunks.
  ``auto`` picks it when some state takes the matmul form, else ``recurrent``.
  States the shared chunked-form analysis (``scancc.ir.passes.chunked``) accepts become
  batched matmuls (chunked.py: SSD with log-space segment sums for identity/scalar decays,
  the pairwise decay tensor for key-diagonal decays); other identity/scalar/diagonal states
  (a state axis: mamba, s4d, hgrn) a parallel prefix scan (``_linear_scan``); any other state
  keeps the step loop.

See docs/torch.md.
"""
from __future__ import annotations

from typing import Any, Mapping

from scancc.ir import IRError, Recurrence

from ..base import Backend, Option, Problem, RunResult, UnsupportedError, freeze

ALGORITHMS = ("auto", "recurrent", "chunked")


def _chunk_rule(v, rec) -> Problem | None:
    return None if v >= 1 else Problem("chunk", v, "a positive number of time steps")


OPTIONS = {o.name: o for o in (
    Option("algorithm", "auto: chunked where some state takes the matmul form, else recurrent",
           "auto",
           (str,), ALGORITHMS),
    Option("chunk", "time steps per chunk (None: 64; 128 with a key-diagonal decay (GLA); "
           "2**22 state elements' worth where every state is a shift or companion window "
           "state; the matmul forms' chunk length, the "
           "prefix scan's length and the step loop's block of states)", None, (int,),
           rule=_chunk_rule),
)}


def _lowering(rec: Recurrence, options: Mapping[str, Any]):
    from . import chunked, recurrent
    algo = options.get("algorithm") or "auto"
    if algo not in ALGORITHMS:
        raise UnsupportedError("torch", rec.name, f"option algorithm={algo!r}: expected one of "
                               f"{', '.join(ALGORITHMS)}")
    if algo == "recurrent":
        return recurrent.Lowering(rec, options)
    ok, why = chunked.applies(rec)
    if algo == "chunked":
        if not ok:
            raise UnsupportedError("torch", rec.name, f"algorithm='chunked': {why}")
        return chunked.lowering(rec, options)
    # auto: the matmul form where some state takes it; a recurrence whose only parallel form
    # is the prefix scan keeps the step loop, which does ~3x less work per step (measured on
    # CPU: docs/performance/torch.md); algorithm="chunked" selects the scan explicitly
    if chunked.matmul_states(rec) or chunked.window_states(rec):
        return chunked.lowering(rec, options)
    return recurrent.Lowering(rec, options)


class TorchBackend(Backend):
    name = "torch"
    array = "torch"
    float64_inputs = True  # float64 inputs run (and their backward) in float64
    generates_source = True
    dtypes = ("float32", "float16", "bfloat16", "float64")
    options = OPTIONS

    def __init__(self):
        self._memo: dict = {}

    def available(self) -> tuple[bool, str]:
        try:
            import torch
        except ImportError as e:
            return False, f"needs torch: {e}"
        return True, (f"torch {torch.__version__}: generated PyTorch code on the inputs' device"
                      " (CPU here)" if not torch.cuda.is_available() else
                      f"torch {torch.__version__}: generated PyTorch code on the inputs' device")

    def supports(self, rec: Recurrence, options: Mapping[str, Any]) -> tuple[bool, str]:
        try:
            self.check_options(rec, options)
            _lowering(rec, options)
        except IRError as e:
            return False, str(e)
        return True, ""

    def algorithm(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        return _lowering(rec, options).algorithm

    def render(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        self.check_options(rec, options)
        return _lowering(rec, options).render()

    def compiled(self, rec: Recurrence, options: Mapping[str, Any]):
        """(the generated function, its algorithm) for ``rec`` and ``options``, loaded through
        the verified module cache (runtime.py) on the first call."""
        key = (id(rec), freeze({k: v for k, v in options.items() if k != "chunk"}))
        hit = self._memo.get(key)
        if hit is not None and hit[0] is rec:
            return hit[1]
        from . import runtime
        self.check_options(rec, options)
        low = _lowering(rec, options)
        mod = runtime.load(low.render())
        out = (getattr(mod, low.launcher_name), low.algorithm)
        if len(self._memo) >= 1024:
            self._memo.clear()
        self._memo[key] = (rec, out)
        return out

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any]) -> RunResult:
        import numpy as np
        import torch
        fn, algo = self.compiled(rec, options)
        args = []
        for x in rec.inputs:
            a = inputs[x.name]
            if not isinstance(a, torch.Tensor):  # NumPy (any strides, e.g. a flipped view)
                a = torch.from_numpy(np.ascontiguousarray(a))
            if a.dim() != len(x.dims):  # optional dims left out: size-1 axes
                for ax, d in enumerate(x.dims):
                    if d in x.optional_dims:
                        a = a.unsqueeze(ax)
            if str(a.dtype).replace("torch.", "") not in self.dtypes:
                raise UnsupportedError(self.name, rec.name, f"input {x.name!r} has dtype "
                                       f"{a.dtype}; this backend takes {', '.join(self.dtypes)}")
            args.append(a)
        if initial_state:
            initial_state = {k: v if isinstance(v, torch.Tensor) else
                             torch.from_numpy(np.ascontiguousarray(v))
                             for k, v in initial_state.items()}
        # no chunk option: the generated function's default (64; where every state is a window
        # state, 2**22 state elements' worth: recurrent.ScanLowering.default_chunk)
        kw = {"chunk": options["chunk"]} if options.get("chunk") else {}
        with torch.no_grad():
            outs, finals = fn(*args, dict(sizes), initial_state or None,
                              bool(output_final_state), **kw)
        return RunResult(outs, finals, {"algorithm": algo})


__all__ = ["TorchBackend", "ALGORITHMS", "OPTIONS"]
