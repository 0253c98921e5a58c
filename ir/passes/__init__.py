"""scancc.ir.passes: IR -> IR and IR -> analysis passes, shared by every backend.

- ``adjoint``: the backward (adjoint) recurrence of a recurrence (``derive``);
- ``lets``: let-inlining; ``flips``: flip-sinking; ``rewrite``: substitution and rewriting
  helpers;
- ``canonical``: canonical rewrites (``canonicalize``: exp(x) - 1 -> expm1(x);
  ``desugar_l2norm``: l2norm -> elementwise ops and a sum);
- ``chunked``: the one chunked-form analysis (which states the chunked, parallel-in-time
  algorithms apply to, and with which structure).

Passes import only ``scancc.ir``; backends import passes, never the other way round.
"""
from . import chunked
from .adjoint import Adjoint, derive
from .canonical import canonicalize, desugar_l2norm
from .flips import sink_flips
from .lets import inline_lets
from .rewrite import substitute

__all__ = ["chunked", "Adjoint", "derive", "canonicalize", "desugar_l2norm", "sink_flips",
           "inline_lets", "substitute"]
