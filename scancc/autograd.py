"""Training: gradients of any recurrence through its derived backward recurrence.

``backward(rec, inputs, d_out, ...)`` runs the forward chunk by chunk keeping only the states
at chunk boundaries, then, from the last chunk to the first, recomputes the chunk's states from
its boundary state and runs the derived backward recurrence (``scancc.ir.adjoint``) over the
chunk reversed in time, carrying the adjoint state between chunks. Memory: O(T/C) boundary
states plus O(C) per-step states of one chunk (C = ``chunk``), never O(T) states or a T x T
matrix.

Kernels called with torch tensors that require grad are differentiable through this path
(``Kernel.__call__`` calls the ``scancc::scan`` custom op for torch inputs). The backward runs on
the kernel's own backend when that backend lowers the backward recurrence (``backward_target``),
else on the reference backend.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from scancc.ir import Recurrence, bind_sizes
from scancc.ir.passes.adjoint import Adjoint, derive


DEFAULT_CHUNK = 64


@lru_cache(maxsize=64)
def adjoint(rec: Recurrence) -> Adjoint:
    return derive(rec)


@lru_cache(maxsize=256)
def _kernel(rec: Recurrence, target: str):
    from .api import compile
    return compile(rec, target)


class _Arrays:
    """The few array operations the orchestrator needs, for NumPy arrays or torch tensors:
    torch tensors stay on their device from the forward to the last gradient (no host copies
    between kernel launches)."""

    def __init__(self, like):
        self.torch = not isinstance(like, np.ndarray)
        if self.torch:
            import torch
            self.t, self.device = torch, like.device

    def zeros(self, shape, dtype):
        if self.torch:
            return self.t.zeros(shape, dtype=dtype, device=self.device)
        return np.zeros(shape, dtype)

    def flip(self, x, axis: int):
        return self.t.flip(x, (axis,)) if self.torch else np.flip(x, axis=axis)

    def cat(self, xs, axis: int = 0):
        return self.t.cat(xs, axis) if self.torch else np.concatenate(xs, axis=axis)

    def cast(self, x, dtype):
        return x.to(dtype) if self.torch else x.astype(dtype)

    def float_dtype(self, bits: int):
        return getattr(self.t, f"float{bits}") if self.torch else np.dtype(f"float{bits}")


def _run(rec: Recurrence, inputs: Mapping[str, Any], init: dict | None,
         target: str = "reference"):
    """(outputs by name, final states by name) of ``rec`` on ``target``; arrays of the kind
    given (NumPy or torch), float64 where the backend computes in float64, else float32."""
    k = _kernel(rec, target)
    xp = _Arrays(next(iter(inputs.values())))
    dt = xp.float_dtype(64 if k.backend.computes_float64 else 32)  # Triton/NKI: float32
    inputs = {n: xp.cast(v, dt) for n, v in inputs.items()}
    init = {n: xp.cast(v, dt) for n, v in init.items()} if init else init
    out, fin = k(**inputs, initial_state=init, output_final_state=True)
    outs = out if isinstance(out, dict) else {rec.outputs[0].name: out}
    fins = fin if isinstance(fin, dict) else {rec.states[0].name: fin}
    return ({k: xp.cast(v, dt) for k, v in outs.items()},
            {k: xp.cast(v, dt) for k, v in fins.items()})


def backward_target(kernel, rec: Recurrence) -> str:
    """The kernel's own backend if it lowers the backward recurrence, else the reference."""
    be = kernel.backend
    if be.name == "reference":
        return "reference"
    adj = adjoint(rec)
    for r in (adj.backward, adj.states_view, rec):
        try:
            ok, _ = be.supports(r, {})
        except Exception:  # a backend that cannot even look at the IR does not lower it
            ok = False
        if not ok:
            return "reference"
    return be.name


def _time_axis(rec: Recurrence, name: str) -> int | None:
    for x in list(rec.inputs) + list(rec.outputs):
        if x.name == name:
            return x.dims.index(rec.time) if rec.time in x.dims else None
    raise KeyError(name)


def _slice(rec, arrays: Mapping[str, Any], t0: int, t1: int, flip: bool = False):
    out = {}
    for k, v in arrays.items():
        ax = _time_axis(rec, k)
        if ax is None:
            out[k] = v
            continue
        idx = [slice(None)] * v.ndim
        idx[ax] = slice(t0, t1)
        part = v[tuple(idx)]
        out[k] = _Arrays(v).flip(part, ax) if flip else part
    return out


def backward(rec: Recurrence, inputs: Mapping[str, Any], d_out: Mapping[str, Any],
             initial_state: Mapping[str, Any] | None = None,
             d_final_state: Mapping[str, Any] | None = None,
             chunk: int = DEFAULT_CHUNK, target: str = "reference") -> tuple[dict, dict]:
    """Gradients of sum(d_out[y] * y) + sum(d_final_state[s] * h_T[s]) w.r.t. every input and
    every initial state. Arrays in the declared layouts, all NumPy or all torch tensors (on one
    device, which they then never leave); the forward, the state recomputation and the
    backward recurrence run on ``target``, in float64 where it computes in float64 (the
    reference), else float32, and the gradients come back in that dtype.

    Returns:
        (grads by input name, grads by state name of the initial state)
    """
    adj = adjoint(rec)
    xp = _Arrays(next(iter(inputs.values())))
    dt = xp.float_dtype(64 if _kernel(rec, target).backend.computes_float64 else 32)
    given = {k: v.shape for k, v in inputs.items()}
    inputs = {k: xp.cast(v, dt) for k, v in _full_layouts(rec, inputs).items()}
    d_out = {k: xp.cast(v, dt) for k, v in d_out.items()}
    sizes = bind_sizes(rec, {k: tuple(v.shape) for k, v in inputs.items()})
    T = sizes[rec.time]
    zeros = {s.name: xp.zeros(tuple(sizes[d] for d in s.dims), dt) for s in rec.states}
    h = {**zeros, **{k: xp.cast(v, dt) for k, v in (initial_state or {}).items()}}
    bounds = []
    for t0 in range(0, T, chunk):  # forward: keep only the boundary states
        bounds.append(h)
        _, h = _run(rec, _slice(rec, inputs, t0, min(t0 + chunk, T)), h, target)

    bwd = adj.backward
    names = {x.name for x in bwd.inputs}
    carry = {adj.adjoint_state[s]: xp.cast(v, dt)
             for s, v in {**zeros, **(d_final_state or {})}.items()}
    grads = {x.name: xp.zeros(tuple(sizes[d] for d in x.dims), dt) for x in rec.inputs}
    for c in reversed(range(len(bounds))):
        t0, t1 = c * chunk, min((c + 1) * chunk, T)
        part = _slice(rec, inputs, t0, t1)
        seqs, _ = _run(adj.states_view, part, bounds[c], target)  # recompute the chunk's states
        feed = {k: v for k, v in _slice(rec, part, 0, t1 - t0, flip=True).items() if k in names}
        for o in rec.outputs:
            if adj.cotangent[o.name] in names:
                dy = _slice(rec, {o.name: d_out[o.name]}, t0, t1, flip=True)[o.name]
                feed[adj.cotangent[o.name]] = dy
        for s in rec.states:
            now, before = adj.state_seq[s.name]
            hs = seqs[now]                                     # [chunk, *state dims]
            hp = xp.cat([bounds[c][s.name][None], hs[:-1]], 0)
            if now in names:
                feed[now] = xp.flip(hs, 0)
            if before in names:
                feed[before] = xp.flip(hp, 0)
        outs, carry = _run(bwd, feed, carry, target)
        for x in rec.inputs:
            gx = outs[adj.grad[x.name]]
            ax = _time_axis(rec, x.name)
            if ax is None:                                     # per-step contributions
                grads[x.name] += gx.sum(0)
            else:
                idx = [slice(None)] * gx.ndim
                idx[ax] = slice(t0, t1)
                grads[x.name][tuple(idx)] = xp.flip(gx, ax)
    d_init = {s.name: carry[adj.adjoint_state[s.name]] for s in rec.states}
    return {k: v.reshape(given[k]) for k, v in grads.items()}, d_init


def _full_layouts(rec: Recurrence, inputs: Mapping[str, Any]) -> dict:
    """Inputs with optional dims left out get them back as size-1 axes."""
    out = {}
    for x in rec.inputs:
        v = inputs[x.name]
        if v.ndim < len(x.dims):  # exactly the optional dims are left out (bind_sizes)
            given = iter(v.shape)
            v = v.reshape(tuple(1 if d in x.optional_dims else next(given) for d in x.dims))
        out[x.name] = v
    return out


# ---- torch: one pair of custom ops for every compiled recurrence ----
#
# scancc::scan(key, inputs, init, want_final) runs a registered kernel variant (by key) and
# scancc::scan_backward runs the derived backward; both have fake implementations (output
# shapes from the IR), so torch.compile traces a model through them without graph breaks.

_SLOTS: dict[str, tuple[Any, Recurrence]] = {}
_OPS: Any = None


def slot(kernel, rec: Recurrence) -> str:
    """Register (kernel, rec) and return its op key (stable for the same IR and backend)."""
    import hashlib
    text = f"{rec}|{kernel.backend.name}|{sorted(kernel.backend_options.items())!r}"
    key = f"{rec.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    _SLOTS.setdefault(key, (kernel, rec))
    return key


def _shapes(rec: Recurrence, inputs) -> dict[str, int]:
    return bind_sizes(rec, {x.name: tuple(t.shape) for x, t in zip(rec.inputs, inputs)})


def torch_ops():
    """The custom ops (defined on first use, so importing scancc never imports torch)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    import torch

    def state_dtype(ref):
        return torch.float64 if ref.dtype == torch.float64 else torch.float32

    # explicit schemas: this module's annotations are strings (from __future__ import annotations)
    @torch.library.custom_op("scancc::scan", mutates_args=(), schema=(
        "(str key, Tensor[] inputs, Tensor[] init, bool want_final) -> Tensor[]"))
    def scan(key: str, inputs: list[torch.Tensor], init: list[torch.Tensor],
             want_final: bool) -> list[torch.Tensor]:
        kernel, rec = _SLOTS[key]
        sizes = _shapes(rec, inputs)
        native = {x.name: kernel._native(t) for x, t in zip(rec.inputs, inputs)}
        ninit = {s.name: kernel._native(t) for s, t in zip(rec.states, init)} if init else None
        opts = dict(kernel.backend_options)
        dt = str(inputs[0].dtype).replace("torch.", "")
        if "dtype" in kernel.backend.options and dt != "float64":
            opts.setdefault("dtype", dt)
        res = kernel.backend.run(rec, native, sizes, ninit, want_final, opts)
        kernel.last_run = res
        ref = inputs[0]
        outs = [_to_torch(res.outputs[o.name], ref, ref.dtype) for o in rec.outputs]
        if want_final:
            outs += [_to_torch(res.final_states[s.name], ref, state_dtype(ref))
                     for s in rec.states]
        return outs

    @scan.register_fake
    def _(key, inputs, init, want_final):
        _, rec = _SLOTS[key]
        sizes, ref = _shapes(rec, inputs), inputs[0]
        outs = [ref.new_empty(tuple(sizes[d] for d in o.dims)) for o in rec.outputs]
        if want_final:
            outs += [ref.new_empty(tuple(sizes[d] for d in s.dims), dtype=state_dtype(ref))
                     for s in rec.states]
        return outs

    @torch.library.custom_op("scancc::scan_backward", mutates_args=(), schema=(
        "(str key, Tensor[] inputs, Tensor[] init, Tensor[] grads, int chunk) -> Tensor[]"))
    def scan_backward(key: str, inputs: list[torch.Tensor], init: list[torch.Tensor],
                      grads: list[torch.Tensor], chunk: int) -> list[torch.Tensor]:
        kernel, rec = _SLOTS[key]
        # tensors stay on their device; backward() computes in the backend's dtype
        x = {i.name: t.detach() for i, t in zip(rec.inputs, inputs)}
        h0 = {s.name: t.detach() for s, t in zip(rec.states, init)} if init else None
        no = len(rec.outputs)
        d_out = {o.name: g.detach() for o, g in zip(rec.outputs, grads[:no])}
        d_fin = {s.name: g.detach() for s, g in zip(rec.states, grads[no:])}
        gin, ginit = backward(rec, x, d_out, h0, d_fin, chunk, backward_target(kernel, rec))
        res = [_to_torch(gin[i.name], t, t.dtype) for i, t in zip(rec.inputs, inputs)]
        return res + [_to_torch(ginit[s.name], t, t.dtype) for s, t in zip(rec.states, init)]

    @scan_backward.register_fake
    def _(key, inputs, init, grads, chunk):
        return [torch.empty_like(t) for t in list(inputs) + list(init)]

    def setup_context(ctx, inputs, output):
        key, xs, init, want_final = inputs
        ctx.key, ctx.want_final, ctx.n_in = key, want_final, len(xs)
        ctx.save_for_backward(*xs, *init, *output)

    def backward_rule(ctx, grads):
        saved = ctx.saved_tensors
        _, rec = _SLOTS[ctx.key]
        n_init = len(saved) - ctx.n_in - len(grads)
        xs, init = saved[:ctx.n_in], saved[ctx.n_in:ctx.n_in + n_init]
        outs = saved[ctx.n_in + n_init:]
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outs)]
        if not ctx.want_final:
            _shape = _shapes(rec, xs)
            grads += [torch.zeros(tuple(_shape[d] for d in s.dims), dtype=state_dtype(xs[0]),
                                  device=xs[0].device) for s in rec.states]
        g = scan_backward(ctx.key, list(xs), list(init), grads, DEFAULT_CHUNK)
        return None, g[:ctx.n_in], g[ctx.n_in:], None

    scan.register_autograd(backward_rule, setup_context=setup_context)
    _OPS = scan
    return _OPS


def _to_torch(a, like, dtype):
    import torch
    t = torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a
    return t.to(device=like.device, dtype=dtype)
