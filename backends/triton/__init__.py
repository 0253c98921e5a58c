"""The Triton backend: renders Triton source from the IR and runs it with torch tensors, on a
GPU when there is one, else the same kernels in Triton's CPU interpreter.

Algorithms (``algorithm=`` option; ``"auto"`` picks from the transition structure):

- ``recurrent`` (recurrent.py): every transition kind and op; state in registers, a loop
  over time. The ground truth the faster forms must match.
- ``chunked`` (chunked.py): parallel in time with ``tl.dot``, for scalar/identity decays,
  key-dimension diagonal decay and householder (delta rule, UT form) transitions.
"""
from __future__ import annotations

from typing import Any, Mapping

from scancc.ir import IRError, Recurrence, format_recurrence

from ..base import Backend, Option, Problem, RunResult, UnsupportedError

ALGORITHMS = ("auto", "recurrent", "chunked")
DOT_PRECISIONS = ("ieee", "tf32x3", "input")


def _lowering(rec: Recurrence, options: Mapping[str, Any]):
    from . import chunked, recurrent
    algo = options.get("algorithm", "auto")
    if algo not in ALGORITHMS:
        raise UnsupportedError("triton", rec.name, f"option algorithm={algo!r}: expected one of "
                               f"{', '.join(ALGORITHMS)}")
    if algo == "chunked" or (algo == "auto" and chunked.applies(rec)[0]):
        ok, why = chunked.applies(rec)
        if not ok:
            raise UnsupportedError("triton", rec.name, f"algorithm='chunked': {why}")
        return chunked.Lowering(rec, options)
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
    Option("algorithm", "auto: chunked where it applies, else recurrent", "auto",
           (str,), ALGORITHMS),
    Option("block_sizes", "register block per dim, {dim: power of two} (None: the plan's)",
           None, (dict,), rule=_block_sizes_rule),
    Option("num_warps", "warps per program", 4, (int,), (1, 2, 4, 8, 16, 32)),
    Option("dot_precision", "tl.dot input precision of the chunked form", "ieee", (str,),
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

    def algorithm(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        """The algorithm ``options`` select for ``rec``."""
        return _lowering(rec, options).algorithm

    def render(self, rec: Recurrence, options: Mapping[str, Any]) -> str:
        _check_options(rec, options)
        return _lowering(rec, options).render()

    def launcher(self, rec: Recurrence, options: Mapping[str, Any], dtypes=()):
        """The generated launcher function (loads the module through the kernel cache)."""
        from . import runtime
        _check_options(rec, options)
        low = _lowering(rec, options)
        # the source depends on these (block sizes only through which dims are blocked)
        src_opts = {k: v for k, v in options.items() if k in ("algorithm", "dot_precision")}
        src_opts["blocked"] = tuple(sorted(options.get("block_sizes") or {}))
        key = runtime.cache_key(format_recurrence(rec), low.algorithm, src_opts, tuple(dtypes))
        mod = runtime.load(key, low.render())
        return getattr(mod, low.launcher_name)

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any]) -> RunResult:
        from . import runtime
        runtime.prepare()
        dev = runtime.device()
        args = []
        for inp in rec.inputs:
            x = inputs[inp.name]
            if x.dim() != len(inp.dims):  # an optional dim left out: restore it (size 1)
                for i, d in enumerate(inp.dims):
                    if d in inp.optional_dims:
                        x = x.unsqueeze(i)
            args.append(x.to(dev))
        dtypes = tuple(str(a.dtype).replace("torch.", "") for a in args)
        for inp, dt in zip(rec.inputs, dtypes):
            if dt not in self.dtypes:
                raise UnsupportedError(self.name, rec.name, f"input {inp.name!r} has dtype {dt}; "
                                       f"this backend takes {', '.join(self.dtypes)}")
        fn = self.launcher(rec, options, dtypes)
        init = {k: v.to(dev) for k, v in (initial_state or {}).items()}
        with runtime.quiet_padding():
            outs, finals = fn(*args, init, bool(output_final_state), options.get("block_sizes"),
                              options.get("num_warps") or 4)
        return RunResult(outs, finals, {"algorithm": self.algorithm(rec, options),
                                        "interpreted": not runtime.has_gpu()})


__all__ = ["TritonBackend", "ALGORITHMS"]
