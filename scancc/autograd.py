"""Training: gradients of any recurrence through its derived backward recurrence.

``backward(rec, inputs, d_out, ...)`` runs the forward chunk by chunk keeping only the states
at chunk boundaries, then, from the last chunk to the first, recomputes the chunk's states from
its boundary state and runs the derived backward recurrence (``scancc.ir.adjoint``) over the
chunk reversed in time, carrying the adjoint state between chunks. Memory: O(T/C) boundary
states plus O(C) per-step states of one chunk (C = ``chunk``), never O(T) states or a T x T
matrix.

Kernels called with torch tensors that require grad are differentiable through this path
(``Kernel.__call__`` wraps them in ``ScanFunction``). Status: the backward recurrence runs on
the reference backend (float64, CPU) whatever the forward target; lowering it to Triton and
NKI needs their support of ``prev``/``step``/``ungroup``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from scancc.ir import Recurrence, bind_sizes
from scancc.ir.adjoint import Adjoint, derive

from . import backends

DEFAULT_CHUNK = 64


@lru_cache(maxsize=64)
def adjoint(rec: Recurrence) -> Adjoint:
    return derive(rec)


def _run(rec: Recurrence, inputs: Mapping[str, np.ndarray], init: dict | None):
    be = backends.get("reference")
    sizes = bind_sizes(rec, {k: v.shape for k, v in inputs.items()})
    res = be.run(rec, inputs, sizes, init, True, {})
    return res.outputs, res.final_states


def _time_axis(rec: Recurrence, name: str) -> int | None:
    for x in list(rec.inputs) + list(rec.outputs):
        if x.name == name:
            return x.dims.index(rec.time) if rec.time in x.dims else None
    raise KeyError(name)


def _slice(rec, arrays: Mapping[str, np.ndarray], t0: int, t1: int, flip: bool = False):
    out = {}
    for k, v in arrays.items():
        ax = _time_axis(rec, k)
        if ax is None:
            out[k] = v
            continue
        idx = [slice(None)] * v.ndim
        idx[ax] = slice(t0, t1)
        part = v[tuple(idx)]
        out[k] = np.flip(part, axis=ax) if flip else part
    return out


def backward(rec: Recurrence, inputs: Mapping[str, np.ndarray], d_out: Mapping[str, np.ndarray],
             initial_state: Mapping[str, np.ndarray] | None = None,
             d_final_state: Mapping[str, np.ndarray] | None = None,
             chunk: int = DEFAULT_CHUNK) -> tuple[dict, dict]:
    """Gradients of sum(d_out[y] * y) + sum(d_final_state[s] * h_T[s]) w.r.t. every input and
    every initial state. Arrays are float64 NumPy in the declared layouts.

    Returns:
        (grads by input name, grads by state name of the initial state)
    """
    adj = adjoint(rec)
    given = {k: v.shape for k, v in inputs.items()}
    inputs = _full_layouts(rec, inputs)
    sizes = bind_sizes(rec, {k: v.shape for k, v in inputs.items()})
    T = sizes[rec.time]
    zeros = {s.name: np.zeros(tuple(sizes[d] for d in s.dims)) for s in rec.states}
    h = {**zeros, **(initial_state or {})}
    bounds = []
    for t0 in range(0, T, chunk):  # forward: keep only the boundary states
        bounds.append(h)
        _, h = _run(rec, _slice(rec, inputs, t0, min(t0 + chunk, T)), h)

    bwd = adj.backward
    names = {x.name for x in bwd.inputs}
    carry = {adj.adjoint_state[s]: v for s, v in {**zeros, **(d_final_state or {})}.items()}
    grads = {x.name: np.zeros(tuple(sizes[d] for d in x.dims)) for x in rec.inputs}
    for c in reversed(range(len(bounds))):
        t0, t1 = c * chunk, min((c + 1) * chunk, T)
        part = _slice(rec, inputs, t0, t1)
        seqs, _ = _run(adj.states_view, part, bounds[c])    # recompute this chunk's states
        feed = {k: v for k, v in _slice(rec, part, 0, t1 - t0, flip=True).items() if k in names}
        for o in rec.outputs:
            if adj.cotangent[o.name] in names:
                dy = _slice(rec, {o.name: d_out[o.name]}, t0, t1, flip=True)[o.name]
                feed[adj.cotangent[o.name]] = dy
        for s in rec.states:
            now, before = adj.state_seq[s.name]
            hs = seqs[now]                                     # [chunk, *state dims]
            hp = np.concatenate([bounds[c][s.name][None], hs[:-1]], axis=0)
            if now in names:
                feed[now] = hs[::-1]
            if before in names:
                feed[before] = hp[::-1]
        outs, carry = _run(bwd, feed, carry)
        for x in rec.inputs:
            gx = outs[adj.grad[x.name]]
            ax = _time_axis(rec, x.name)
            if ax is None:                                     # per-step contributions
                grads[x.name] += gx.sum(axis=0)
            else:
                idx = [slice(None)] * gx.ndim
                idx[ax] = slice(t0, t1)
                grads[x.name][tuple(idx)] = np.flip(gx, axis=ax)
    d_init = {s.name: carry[adj.adjoint_state[s.name]] for s in rec.states}
    return {k: v.reshape(given[k]) for k, v in grads.items()}, d_init


def _full_layouts(rec: Recurrence, inputs: Mapping[str, np.ndarray]) -> dict:
    """Inputs with optional dims left out get them back as size-1 axes."""
    out = {}
    for x in rec.inputs:
        v = inputs[x.name]
        if v.ndim < len(x.dims):
            v = np.expand_dims(v, tuple(i for i, d in enumerate(x.dims) if d in x.optional_dims))
        out[x.name] = v
    return out


def _torch_function():
    import torch

    class ScanFunction(torch.autograd.Function):
        """Differentiable call of a compiled recurrence: the forward runs the kernel's
        backend, the backward the derived backward recurrence (see module docstring)."""

        @staticmethod
        def forward(ctx, kernel, rec, names, snames, want_final, chunk, *tensors):
            n = len(names)
            inputs = dict(zip(names, tensors[:n]))
            init = dict(zip(snames, tensors[n:])) if len(tensors) > n else None
            sizes = bind_sizes(rec, {k: tuple(v.shape) for k, v in inputs.items()})
            native = {k: kernel._native(v) for k, v in inputs.items()}
            ninit = {k: kernel._native(v) for k, v in init.items()} if init else None
            res = kernel.backend.run(rec, native, sizes, ninit, True, kernel.backend_options)
            ctx.kernel, ctx.rec, ctx.names, ctx.snames, ctx.chunk = kernel, rec, names, snames, chunk
            ctx.has_init = init is not None
            ctx.save_for_backward(*tensors)
            ref = tensors[0]
            outs = [_to_torch(res.outputs[o.name], ref, ref.dtype) for o in rec.outputs]
            finals = [_to_torch(res.final_states[s], ref,
                                torch.float64 if ref.dtype == torch.float64 else torch.float32)
                      for s in snames] if want_final else []
            return tuple(outs + finals)

        @staticmethod
        def backward(ctx, *grads_out):
            rec, names, snames = ctx.rec, ctx.names, ctx.snames
            tensors = ctx.saved_tensors
            f64 = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
            inputs = {k: f64(v) for k, v in zip(names, tensors)}
            init = {k: f64(v) for k, v in zip(snames, tensors[len(names):])} \
                if ctx.has_init else None
            no = len(rec.outputs)
            d_out = {o.name: (f64(g) if g is not None else np.zeros(inputs_shape(rec, o, inputs)))
                     for o, g in zip(rec.outputs, grads_out[:no])}
            d_fin = {s: f64(g) for s, g in zip(snames, grads_out[no:]) if g is not None}
            gin, ginit = backward(rec, inputs, d_out, init, d_fin, ctx.chunk)
            res = [_to_torch(gin[k], t, t.dtype) for k, t in zip(names, tensors)]
            if ctx.has_init:
                res += [_to_torch(ginit[k], t, t.dtype)
                        for k, t in zip(snames, tensors[len(names):])]
            return (None,) * 6 + tuple(res)

    return ScanFunction


def inputs_shape(rec: Recurrence, o, inputs) -> tuple[int, ...]:
    sizes = bind_sizes(rec, {k: v.shape for k, v in inputs.items()})
    return tuple(sizes[d] for d in o.dims)


def _to_torch(a, like, dtype):
    import torch
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a
    return t.to(device=like.device, dtype=dtype)


_FN: Any = None


def scan_function():
    global _FN
    if _FN is None:
        _FN = _torch_function()
    return _FN
