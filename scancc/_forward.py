"""The one forward path: a recurrence compiled for a backend, called with arrays.

``Kernel.__call__`` (NumPy arrays), the ``scancc::scan`` torch op and the chunks of the
derived backward (scancc/autograd.py) all run a ``Runner``. It is built once per (backend,
IR, backend options) and remembers what it derived per call structure (sizes per input
shapes, run options per dtype), so a repeated call does only the binding and the backend's
launch; the backend caches its compiled artifacts (Triton: lowering, source, launcher per
IR, options and dtypes, backends/triton/runtime.py).

This module imports only the IR and the backends: ``api`` and ``autograd`` import it, never
the other way round.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from scancc.backends.base import RunResult, freeze
from scancc.ir import Recurrence, bind_sizes

_LOCK = threading.Lock()
_MAX = 1024


class Runner:
    """``rec`` on ``backend`` with ``options``: ``runner(inputs, init, want_final)`` runs it on
    arrays the backend takes (``to_native``), inputs in the order of ``rec.inputs``."""

    def __init__(self, backend, rec: Recurrence, options: Mapping[str, Any]):
        self.backend, self.rec, self.options = backend, rec, dict(options)
        self.input_names = tuple(x.name for x in rec.inputs)
        self.state_names = tuple(s.name for s in rec.states)
        self.output_names = tuple(o.name for o in rec.outputs)
        self.last_run: RunResult | None = None
        self._sizes: dict[tuple, dict[str, int]] = {}
        self._opts: dict[str, dict] = {}
        self._slot: str | None = None

    def sizes(self, shapes: tuple) -> dict[str, int]:
        """Dim sizes bound from the inputs' shapes (in input order), cached per shapes."""
        s = self._sizes.get(shapes)
        if s is None:
            s = bind_sizes(self.rec, dict(zip(self.input_names, shapes)))
            if len(self._sizes) >= _MAX:
                self._sizes.clear()
            self._sizes[shapes] = s
        return s

    def run_options(self, dtype: str) -> dict:
        o = self._opts.get(dtype)
        if o is None:
            o = dict(self.options)
            if "dtype" in self.backend.options and dtype != "float64":
                # a backend that converts arrays learns their dtype (float64: its own default)
                o.setdefault("dtype", dtype)
            self._opts[dtype] = o
        return o

    def to_native(self, x):
        """``x`` as the backend takes arrays (NumPy float64 or a torch tensor)."""
        if self.backend.array == "numpy":
            if isinstance(x, np.ndarray):
                return x
            import torch
            return x.detach().to("cpu", torch.float64).numpy()
        if isinstance(x, np.ndarray):
            import torch
            # a size-1 axis with a negative stride (a flipped one-step chunk) is "contiguous"
            # to NumPy but not to torch: copy such an array
            x = np.ascontiguousarray(x)
            return torch.from_numpy(x if min(x.strides, default=0) >= 0 else x.copy())
        return x

    def __call__(self, inputs: Sequence[Any], init: Mapping[str, Any] | None,
                 want_final: bool, dtype: str | None = None,
                 cu_seqlens: tuple[int, ...] | None = None) -> RunResult:
        """``cu_seqlens``: a packed variable-length batch (validated plain ints, see
        scancc/ir/segments.py); ``init`` and the final states then carry N along batch."""
        # torch.Size is a tuple: equal, and hashing equal, to the tuple of the same sizes
        sizes = self.sizes(tuple([x.shape for x in inputs]))
        if dtype is None:
            dtype = str(inputs[0].dtype).replace("torch.", "")
        if cu_seqlens is not None:
            res = self.backend.run_varlen(self.rec, dict(zip(self.input_names, inputs)), sizes,
                                          init, want_final, self.run_options(dtype), cu_seqlens)
        else:
            res = self.backend.run(self.rec, dict(zip(self.input_names, inputs)), sizes, init,
                                   want_final, self.run_options(dtype))
        self.last_run = res
        return res

    @property
    def slot(self) -> str:
        """This runner's key for the ``scancc::scan`` op (stable for the same IR, backend and
        options); registers the runner under it."""
        if self._slot is None:
            text = f"{self.rec}|{self.backend.name}|{sorted(self.options.items())!r}"
            key = f"{self.rec.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
            with _LOCK:
                self._slot = key
                _SLOTS.setdefault(key, self)
        return self._slot


# (backend name, id(rec), options) -> Runner; the runner holds rec, so the id stays its own
_RUNNERS: dict[tuple, Runner] = {}
# op key -> Runner (the scancc::scan op is called with the key only)
_SLOTS: dict[str, Runner] = {}


def runner(backend, rec: Recurrence, options: Mapping[str, Any]) -> Runner:
    """The cached ``Runner`` of ``rec`` on ``backend`` with ``options``."""
    key = (backend.name, id(rec), freeze(options))
    r = _RUNNERS.get(key)
    if r is None or r.rec is not rec:
        r = Runner(backend, rec, options)
        with _LOCK:
            if len(_RUNNERS) >= _MAX:
                _RUNNERS.clear()
            _RUNNERS[key] = r
    return r


def by_slot(key: str) -> Runner:
    return _SLOTS[key]


__all__ = ["Runner", "runner", "by_slot"]
