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
else on the reference backend, with a ``BackwardFallbackWarning`` naming the piece that does
not lower and why.

Every kernel call here (forward chunks, recomputation, backward recurrence) is a
``scancc._forward.Runner``, the forward path ``Kernel.__call__`` uses too; this module never
imports ``scancc.api`` (api imports it).

A backend may instead offer a chunked backward (``backend.chunked_backward(rec, options)``;
Triton: ``scancc.backends.triton.chunked_backward``, identity and scalar decays): then, for
torch tensors, the whole backward of one call is that function -- a fixed few launches that
recompute the chunk-boundary states only, never the per-step state sequence.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from scancc import backends
from scancc.backends.base import freeze
from scancc.ir import IRError, Recurrence, bind_sizes
from scancc.ir.passes.adjoint import Adjoint, derive

from ._forward import Runner, by_slot, runner

DEFAULT_CHUNK = 64


@lru_cache(maxsize=64)
def adjoint(rec: Recurrence) -> Adjoint:
    return derive(rec)


def has_adjoint(rec: Recurrence) -> bool:
    """Whether ``rec``'s backward is derived (every library recurrence's is, bmojo's cascades
    and selection included: docs/bmojo.md); where not, ``adjoint(rec)`` raises the IRError
    that says why (e.g. a kind without an adjoint, or a read of prev() of a shift state by a
    cascade)."""
    try:
        adjoint(rec)
    except IRError:
        return False
    return True


_KERNELS: dict[tuple, Runner] = {}


class Options:
    """A forward call's backend options, carried into its backward: hashable (``key``) for
    the caches here, the mapping itself in ``given``."""
    __slots__ = ("given", "key")

    def __init__(self, given: Mapping[str, Any] | None = None):
        self.given = dict(given or {})
        self.key = freeze(self.given)


NO_OPTIONS = Options()


def applicable(backend, rec: Recurrence, options: Mapping[str, Any]) -> dict:
    """The forward call's backend options that apply to ``rec`` (the forward, its states view
    or its backward recurrence) on ``backend``: all of them where the backend lowers ``rec``
    with them; else all but ``algorithm`` (an algorithm of the forward, e.g. ``chunked``, that
    the backward's structure does not have: the backend picks one); else none."""
    options = dict(options)
    for opts in (options, {k: v for k, v in options.items() if k != "algorithm"}):
        try:
            if backend.supports(rec, opts)[0]:
                return opts
        except Exception:  # noqa: BLE001 - an option this IR cannot take: try without it
            continue
    return {}


def _kernel(rec: Recurrence, target: str, options: Options = NO_OPTIONS) -> Runner:
    """``rec`` on ``target`` with the forward call's ``options`` that apply to it
    (``.backend``, ``.last_run``)."""
    key = (id(rec), target, options.key)
    r = _KERNELS.get(key)
    if r is None or r.rec is not rec:
        if len(_KERNELS) >= 256:
            _KERNELS.clear()
        be = backends.get(target)
        r = _KERNELS[key] = runner(be, rec, applicable(be, rec, options.given))
    return r


class _Arrays:
    """The few array operations the orchestrator needs, for NumPy arrays or torch tensors:
    torch tensors stay on their device from the forward to the last gradient (no host copies
    between kernel launches)."""

    def __init__(self, like):
        self.torch = not isinstance(like, np.ndarray)
        if self.torch:
            import torch
            self.t, self.device = torch, like.device
        self._rev: dict = {}  # chunk length -> its reversed time indices (torch)
        self._bufs: dict = {}  # (state, chunk length) -> reversed_states' buffer views

    @staticmethod
    def like(x) -> "_Arrays":
        """The ``_Arrays`` for ``x``'s kind and device (one per device, reused)."""
        key = None if isinstance(x, np.ndarray) else x.device
        xp = _XP.get(key)
        if xp is None:
            xp = _XP[key] = _Arrays(x)
        return xp

    def zeros(self, shape, dtype):
        if self.torch:
            return self.t.zeros(shape, dtype=dtype, device=self.device)
        return np.zeros(shape, dtype)

    def reversed_chunks(self, T: int, chunk: int):
        """torch: per chunk, last first, the time indices t1-1, ..., t0 of chunk [t0, t1) (a
        chunk's reads and writes reversed in time are one indexing op each), from one
        ``arange`` and one ``split``; NumPy: None per chunk (its flips are views)."""
        n = -(-T // chunk)
        if not self.torch:
            return [None] * n
        sizes = [min(chunk, T - c * chunk) for c in reversed(range(n))]
        return list(self.t.arange(T - 1, -1, -1, device=self.device).split(sizes))

    def reversed_states(self, seq, bound, before: bool, key=None):
        """(seq reversed in time, and if ``before`` the states one step earlier: seq reversed
        and shifted by one, ``bound`` last) from a chunk's per-step states ``seq`` and its
        boundary state ``bound``: one copy (torch: one ``index_select`` into a buffer of
        C + 1 steps whose first C and last C rows are the two). torch: the buffer is kept
        under ``key`` (a state's name) and reused by the next chunk of the same length, whose
        copy into it is ordered after this chunk's kernels (one stream)."""
        n = seq.shape[0]
        if self.torch:
            rev = self._rev.get(n)
            if rev is None:
                rev = self._rev[n] = self.t.arange(n - 1, -1, -1, device=self.device)
            if not before:
                return seq.index_select(0, rev), None
            views = self._bufs.get((key, n))
            if views is None or views[0].dtype != seq.dtype or views[0].shape[1:] != seq.shape[1:]:
                buf = self.t.empty((n + 1, *seq.shape[1:]), dtype=seq.dtype, device=seq.device)
                views = self._bufs[(key, n)] = (buf[:n], buf[1:], buf[n])
            hs, hp, last = views
            self.t.index_select(seq, 0, rev, out=hs)
            last.copy_(bound)
            return hs, hp
        hs = np.flip(seq, 0)
        if not before:
            return hs, None
        buf = np.empty((n + 1, *seq.shape[1:]), seq.dtype)
        buf[:n] = hs
        buf[n] = bound
        return buf[:n], buf[1:]

    def take_reversed(self, v, axis: int, t0: int, t1: int, ri):
        """``v[t0:t1]`` along ``axis``, reversed in time (``ri``: its ``reversed_chunks`` entry)."""
        if self.torch:
            return v.index_select(axis, ri)
        return np.flip(v[(slice(None),) * axis + (slice(t0, t1),)], axis)

    def put_reversed(self, dst, axis: int, t0: int, t1: int, src, ri):
        """``dst[t0:t1] = src`` reversed in time, along ``axis``."""
        if self.torch:
            dst.index_copy_(axis, ri, src)
        else:
            dst[(slice(None),) * axis + (slice(t0, t1),)] = np.flip(src, axis)

    def cast(self, x, dtype):
        if x.dtype == dtype:  # a no-op cast still costs a dispatch per call
            return x
        return x.to(dtype) if self.torch else x.astype(dtype)

    def float_dtype(self, bits: int):
        return getattr(self.t, f"float{bits}") if self.torch else np.dtype(f"float{bits}")

    def back(self, y, dtype):
        """A backend's result as this kind of array, in ``dtype``."""
        if self.torch:
            if isinstance(y, np.ndarray):  # torch needs a writable array to share
                y = self.t.from_numpy(y if y.flags.writeable else np.array(y))
            if y.dtype == dtype and y.device == self.device:
                return y
            return y.to(device=self.device, dtype=dtype)
        if not isinstance(y, np.ndarray):
            y = y.detach().cpu().numpy()
        return y.astype(dtype, copy=False)


class _Call:
    """``rec`` on ``target`` for one kind of array (NumPy, or torch tensors on one device):
    what ``_run`` derives once rather than per call (the runner, the compute dtype, whether
    the backend takes these arrays as they are, so that ``to_native``/``cast``/``back`` are
    skipped where they would return their argument)."""

    __slots__ = ("dt", "dts", "k", "plain", "xp")

    def __init__(self, rec: Recurrence, target: str, xp: _Arrays,
                 options: Options = NO_OPTIONS, f64_inputs: bool = False):
        k = self.k = _kernel(rec, target, options)
        f64 = computes_float64(k.backend, f64_inputs)
        self.xp, self.dt = xp, xp.float_dtype(64 if f64 else 32)  # Triton/NKI: float32
        self.dts = "float64" if f64 else "float32"
        # Runner.to_native is the identity for the backend's own kind of array
        self.plain = (k.backend.array == "numpy") != xp.torch

    def __call__(self, inputs: Mapping[str, Any], init: dict | None):
        k, xp, dt = self.k, self.xp, self.dt
        if self.plain:
            args = [inputs[n] for n in k.input_names]
            for a in args:
                if a.dtype != dt:
                    args = [k.to_native(xp.cast(a, dt)) for a in args]
                    break
            if init:
                init = {n: v if v.dtype == dt else k.to_native(xp.cast(v, dt))
                        for n, v in init.items()}
        else:
            args = [k.to_native(xp.cast(inputs[n], dt)) for n in k.input_names]
            if init:
                init = {n: k.to_native(xp.cast(v, dt)) for n, v in init.items()}
        res = k(args, init or None, True, self.dts)
        return self._back(res.outputs), self._back(res.final_states)

    def _back(self, ys: Mapping[str, Any]) -> dict:
        xp, dt = self.xp, self.dt
        if xp.torch:  # a NumPy result's dtype never equals a torch dtype: back() converts it
            dev = xp.device
            return {n: y if y.dtype == dt and y.device == dev else xp.back(y, dt)
                    for n, y in ys.items()}
        return {n: y if type(y) is np.ndarray and y.dtype == dt else xp.back(y, dt)
                for n, y in ys.items()}


_CALLS: dict[tuple, _Call] = {}  # (id(rec), target, device or None for NumPy) -> _Call


def _run(rec: Recurrence, inputs: Mapping[str, Any], init: dict | None,
         target: str = "reference", options: Options = NO_OPTIONS):
    """(outputs by name, final states by name) of ``rec`` on ``target``; arrays of the kind
    given (NumPy or torch), float64 where the backend computes in float64, else float32."""
    first = next(iter(inputs.values()))
    f64 = _is_float64(first)
    key = (id(rec), target, None if isinstance(first, np.ndarray) else first.device,
           options.key, f64)
    c = _CALLS.get(key)
    if c is None or c.k.rec is not rec:
        if len(_CALLS) >= 256:
            _CALLS.clear()
        c = _CALLS[key] = _Call(rec, target, _Arrays.like(first), options, f64)
    return c(inputs, init)


def _is_float64(x) -> bool:
    return str(x.dtype) in ("float64", "torch.float64")


def computes_float64(backend, f64_inputs: bool) -> bool:
    """Whether ``backend`` computes in float64: always (the reference), or for float64 inputs
    where it follows them (the torch backend); else float32 accumulation."""
    return backend.computes_float64 or (backend.float64_inputs and f64_inputs)


_XP: dict = {}  # device (None: NumPy) -> _Arrays


_TARGETS: dict[tuple, tuple[Recurrence, str]] = {}  # (backend, id(rec), algo) -> (rec, target)


def backward_target(kernel, rec: Recurrence) -> str:
    """The backend of ``kernel`` (anything with a ``.backend``: a Kernel, a Runner) if it has a
    chunked backward of ``rec`` under the kernel's ``algorithm`` or lowers the backward
    recurrence, else the reference."""
    be = kernel.backend
    if be.name == "reference":
        return "reference"
    algo = (getattr(kernel, "options", None) or {}).get("algorithm", "auto")
    key = (be.name, id(rec), algo)
    hit = _TARGETS.get(key)
    if hit is not None and hit[0] is rec:
        return hit[1]
    target = be.name
    # a chunked backward under the kernel's algorithm: no backward recurrence needed
    if _chunked_hook(be, rec, {"algorithm": algo}) is not None:
        _TARGETS[key] = (rec, target)
        return target
    adj = adjoint(rec)
    for r in (adj.backward, adj.states_view, rec):
        try:
            ok, why = be.supports(r, {})
        except Exception as e:  # a backend that cannot even look at the IR does not lower it
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            target = "reference"
            # never silent: say which piece does not lower and why (once per recurrence)
            warnings.warn(BackwardFallbackWarning(
                f"the gradients of {rec.name!r} through a {be.name} kernel run on the "
                f"reference backend: {be.name} does not lower {r.name!r} ({why})"),
                stacklevel=2)
            break
    _TARGETS[key] = (rec, target)
    return target


class BackwardFallbackWarning(UserWarning):
    """A kernel's gradients run on the reference backend because its own backend does not
    lower a piece of the backward (``backward_target``); the message names the piece."""


def _chunked_hook(be, rec: Recurrence, options: Mapping[str, Any]):
    """The backend's chunked backward of ``rec`` under ``options`` (a function, see
    ``scancc.backends.triton.chunked_backward.backward``), or None: the backend has none, the
    options rule the chunked form out, or ``rec``'s structure is not one it takes."""
    hook = getattr(be, "chunked_backward", None)
    if hook is None:
        return None
    try:
        return hook(rec, options)
    except Exception:  # noqa: BLE001 - a backend that cannot look at the IR has none
        return None


_AXES: dict[int, tuple[Recurrence, dict[str, int | None]]] = {}


def _time_axes(rec: Recurrence) -> dict[str, int | None]:
    """The time axis of each input and output of ``rec`` (None: no time dim), cached."""
    hit = _AXES.get(id(rec))
    if hit is None or hit[0] is not rec:
        t = rec.time
        hit = _AXES[id(rec)] = (rec, {x.name: x.dims.index(t) if t in x.dims else None
                                      for x in list(rec.inputs) + list(rec.outputs)})
    return hit[1]


def _chunks(axes: Mapping[str, int | None], arrays: Mapping[str, Any], T: int,
            chunk: int) -> list[dict]:
    """Per chunk [t0, t1), ``arrays[:, t0:t1]`` along each one's time axis (views: one torch
    ``split`` per array; time-invariant ones as given)."""
    cols = {}
    for k, v in arrays.items():
        ax = axes[k]
        if ax is None:
            cols[k] = None
        elif isinstance(v, np.ndarray):
            cols[k] = [v[(slice(None),) * ax + (slice(t0, min(t0 + chunk, T)),)]
                       for t0 in range(0, T, chunk)]
        else:
            cols[k] = v.split(chunk, ax)
    return [{k: arrays[k] if col is None else col[c] for k, col in cols.items()}
            for c in range(-(-T // chunk))]


def backward(rec: Recurrence, inputs: Mapping[str, Any], d_out: Mapping[str, Any],
             initial_state: Mapping[str, Any] | None = None,
             d_final_state: Mapping[str, Any] | None = None,
             chunk: int = DEFAULT_CHUNK, target: str = "reference",
             options: Mapping[str, Any] | Options | None = None) -> tuple[dict, dict]:
    """Gradients of sum(d_out[y] * y) + sum(d_final_state[s] * h_T[s]) w.r.t. every input and
    every initial state. Arrays in the declared layouts, all NumPy or all torch tensors (on one
    device, which they then never leave); the forward, the state recomputation and the
    backward recurrence run on ``target``, in float64 where it computes in float64 (the
    reference), else float32, and the gradients come back in that dtype.

    Returns:
        (grads by input name, grads by state name of the initial state)
    """
    adj = adjoint(rec)
    opts = options if isinstance(options, Options) else Options(options)
    xp = _Arrays(next(iter(inputs.values())))
    fwd = _kernel(rec, target, opts)
    f64 = computes_float64(fwd.backend, any(_is_float64(v) for v in inputs.values()))
    dt = xp.float_dtype(64 if f64 else 32)
    given = {k: v.shape for k, v in inputs.items()}
    low = xp.torch and any(v.dtype in (xp.t.bfloat16, xp.t.float16) for v in inputs.values())
    full = _full_layouts(rec, inputs)
    sizes = fwd.sizes(tuple(tuple(full[n].shape) for n in fwd.input_names))
    T = sizes[rec.time]
    chunked = _chunked_hook(fwd.backend, rec, opts.given)
    if chunked is not None:  # a fixed few launches, chunk-boundary states only
        # the backend takes torch tensors in their dtype (its kernels convert on load): NumPy
        # arrays (scancc check) go through CPU tensors
        tt = (lambda a: a) if xp.torch else (lambda a: _torch_of(xp.cast(a, dt)))
        g, d_init = chunked(rec, {k: tt(v) for k, v in full.items()},
                            {k: tt(v) for k, v in d_out.items()}, sizes,
                            {k: tt(v) for k, v in (initial_state or {}).items()},
                            {k: tt(v) for k, v in (d_final_state or {}).items()},
                            {**opts.given, "_inputs_16bit": low})
        return {k: xp.back(v, dt).reshape(given[k]) for k, v in g.items()}, \
            {k: xp.back(v, dt) for k, v in d_init.items()}
    inputs = {k: xp.cast(v, dt) for k, v in full.items()}
    d_out = {k: xp.cast(v, dt) for k, v in d_out.items()}
    axes = _time_axes(rec)
    zeros = {s.name: xp.zeros(tuple(sizes[d] for d in s.dims), dt) for s in rec.states}
    h = {**zeros, **{k: xp.cast(v, dt) for k, v in (initial_state or {}).items()}}
    # forward: keep only the boundary states (the last chunk's final state is not needed);
    # the chunks' input slices are views, kept for the recomputation
    parts = _chunks(axes, inputs, T, chunk)
    bounds = [h] if parts else []
    for part in parts[:-1]:
        _, h = _run(rec, part, h, target, opts)
        bounds.append(h)

    # the backward recurrence runs in reverse time: its chunk's inputs are flipped per chunk
    # (a torch flip copies: flipping whole inputs once would hold a second copy of them).
    # What each chunk feeds it is worked out once here: (name, array, time axis) read
    # reversed (axis None: as is), the states (state, seq name if read, before name if read)
    bwd = adj.backward
    names = {x.name for x in bwd.inputs}
    reads = [(k, v, axes[k]) for k, v in inputs.items() if k in names]
    reads += [(adj.cotangent[o.name], d_out[o.name], axes[o.name]) for o in rec.outputs
              if adj.cotangent[o.name] in names]
    fixed = {k: v for k, v, ax in reads if ax is None}
    reads = [(k, v, ax) for k, v, ax in reads if ax is not None]
    seq = []
    for s in rec.states:
        now, before = adj.state_seq[s.name]
        if now in names or before in names:
            seq.append((s.name, now, now in names, before if before in names else None))
    carry = {adj.adjoint_state[s]: xp.cast(v, dt)
             for s, v in {**zeros, **(d_final_state or {})}.items()}
    grads = {x.name: xp.zeros(tuple(sizes[d] for d in x.dims), dt) for x in rec.inputs}
    gnames = [(grads[x.name], adj.grad[x.name], axes[x.name]) for x in rec.inputs]
    take, put = xp.take_reversed, xp.put_reversed
    for c, ri in zip(reversed(range(len(bounds))), xp.reversed_chunks(T, chunk)):
        t0, t1 = c * chunk, min((c + 1) * chunk, T)
        seqs, _ = _run(adj.states_view, parts[c], bounds[c], target, opts)  # recompute states
        feed = dict(fixed)
        for k, v, ax in reads:
            feed[k] = take(v, ax, t0, t1, ri)
        for s, now, read_now, before in seq:                   # [chunk, *state dims], reversed;
            hs, hp = xp.reversed_states(seqs[now], bounds[c][s], before is not None, s)
            if read_now:
                feed[now] = hs
            if before is not None:                             # h_{t-1}: shifted by one step
                feed[before] = hp
        outs, carry = _run(bwd, feed, carry, target, opts)
        for g, gname, ax in gnames:
            gx = outs[gname]
            if ax is None:                                     # per-step contributions
                g += gx.sum(0)
            else:
                put(g, ax, t0, t1, gx, ri)
    d_init = {s.name: carry[adj.adjoint_state[s.name]] for s in rec.states}
    return {k: v.reshape(given[k]) for k, v in grads.items()}, d_init


def _torch_of(a):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a))


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
# scancc::scan(key, inputs, init, want_final) runs a Runner (scancc/_forward.py, by its slot
# key) and scancc::scan_backward runs the derived backward; both have fake implementations
# (output shapes from the IR), so torch.compile traces a model through them without graph
# breaks.

_OPS: Any = None


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
        check_no_forward_ad([*inputs, *init])  # a direct call of the op with dual tensors
        run = by_slot(key)
        native = [run.to_native(t) for t in inputs]
        ninit = {s: run.to_native(t) for s, t in zip(run.state_names, init)} if init else None
        ref = inputs[0]
        res = run(native, ninit, want_final, str(ref.dtype).replace("torch.", ""))
        outs = [_to_torch(res.outputs[o], ref, ref.dtype) for o in run.output_names]
        if want_final:
            sdt = state_dtype(ref)
            outs += [_to_torch(res.final_states[s], ref, sdt) for s in run.state_names]
        return outs

    @scan.register_fake
    def _(key, inputs, init, want_final):
        rec = by_slot(key).rec
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
        run = by_slot(key)
        rec = run.rec
        # tensors stay on their device; backward() computes in the backend's dtype
        x = {i.name: t.detach() for i, t in zip(rec.inputs, inputs)}
        h0 = {s.name: t.detach() for s, t in zip(rec.states, init)} if init else None
        no = len(rec.outputs)
        d_out = {o.name: g.detach() for o, g in zip(rec.outputs, grads[:no])}
        d_fin = {s.name: g.detach() for s, g in zip(rec.states, grads[no:])}
        target = backward_target(run, rec)
        gin, ginit = backward(rec, x, d_out, h0, d_fin, chunk, target,
                              run.options if target == run.backend.name else None)
        res = [_to_torch(gin[i.name], t, t.dtype) for i, t in zip(rec.inputs, inputs)]
        res += [_to_torch(ginit[s.name], t, t.dtype) for s, t in zip(rec.states, init)]
        # T=0: no step ran, so d_init is d_final_state itself; an op's output may not alias
        # its inputs
        given = {t.untyped_storage().data_ptr() for t in [*inputs, *init, *grads]
                 if t.numel()}
        # contiguous, as the fake below says (an input may be a strided view)
        return [r.clone(memory_format=torch.contiguous_format)
                if r.numel() and r.untyped_storage().data_ptr() in given else r.contiguous()
                for r in res]

    @scan_backward.register_fake
    def _(key, inputs, init, grads, chunk):
        # contiguous whatever the inputs' strides (torch.empty_like would keep a view's)
        return [t.new_empty(t.shape) for t in list(inputs) + list(init)]

    def setup_context(ctx, inputs, output):
        key, xs, init, want_final = inputs
        ctx.key, ctx.want_final, ctx.n_in = key, want_final, len(xs)
        ctx.save_for_backward(*xs, *init, *output)

    def backward_rule(ctx, grads):
        saved = ctx.saved_tensors
        rec = by_slot(ctx.key).rec
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


FORWARD_AD_UNSUPPORTED = (
    "forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported through "
    "scancc kernels: the scancc::scan op has a reverse-mode formula only (the derived backward "
    "recurrence), and without this error its tangent would silently be zero. Use reverse "
    "mode: loss.backward(), torch.autograd.grad, torch.func.vjp or torch.func.grad")


def check_no_forward_ad(tensors) -> None:
    """Refuse tensors that carry a forward-mode tangent (a ``forward_ad`` dual tensor, or one
    under ``torch.func.jvp``): the custom op would run below autograd and drop the tangent.
    Cheap when no forward-mode level or functorch transform is active (one check each)."""
    import torch
    from torch.autograd import forward_ad as fwad
    if fwad._current_level < 0 and torch._C._functorch.peek_interpreter_stack() is None:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and fwad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(FORWARD_AD_UNSUPPORTED)


def _to_torch(a, like, dtype):
    if isinstance(a, np.ndarray):
        import torch
        a = torch.from_numpy(np.array(a))
    return a.to(device=like.device, dtype=dtype)
