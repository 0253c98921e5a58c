"""Packed variable-length batches: ``kernel(*inputs, cu_seqlens=cu)``.

Batch 1, the N sequences concatenated along time, ``cu`` int64 ``[N+1]`` (0, ..., T,
non-decreasing) as flash-linear-attention takes it. Every state resets at each boundary (the
semantics: scancc/ir/segments.py); ``initial_state`` and the final state carry N in place of
the batch dim. The forward runs ``Backend.run_varlen`` (the reset inside the kernels where
the backend has it, else one run per sequence); the gradient is the derived backward
recurrence run on the time-reversed packing (its boundaries are the same, read backwards),
its adjoint state entering each reversed sequence being that sequence's d final state and
leaving it as the gradient of its initial state (``backward_varlen``).

This module imports ``_forward`` and ``autograd``, never ``api`` (api imports it).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from scancc.ir import Recurrence
from scancc.ir.segments import as_cu, reversed_cu

from .autograd import DEFAULT_CHUNK, Options, _Arrays, _full_layouts, _kernel, _to_torch, adjoint
from ._forward import by_slot


def check_cu_seqlens(cu: Any, T: int, batch: int | None, first_input: str) -> tuple[int, ...]:
    """``cu`` as plain ints, or ValueError with the message an ``InputError`` carries: names
    ``cu_seqlens``, what was expected and what came."""
    if isinstance(cu, (list, tuple)):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in cu):
            raise ValueError(f"cu_seqlens: expected integers, got {cu!r}")
        arr = np.asarray(cu, np.int64)
    elif isinstance(cu, np.ndarray) or type(cu).__module__.startswith("torch"):
        dt = str(cu.dtype).replace("torch.", "")
        if not (dt.startswith("int") or dt.startswith("uint")):
            raise ValueError(f"cu_seqlens: expected an integer array (int64, as fla), got "
                             f"dtype {dt}")
        arr = np.asarray(as_cu(cu.reshape(-1)), np.int64).reshape(tuple(cu.shape))
    else:
        raise ValueError(f"cu_seqlens: expected an int64 array or tensor [N+1], got "
                         f"{type(cu).__name__}")
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape [N+1] with N >= 1, got shape "
                         f"{tuple(arr.shape)}")
    if arr[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {int(arr[0])}")
    if arr[-1] != T:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] = T = {T} (the packed time dim "
                         f"of input {first_input!r}), got {int(arr[-1])}")
    bad = np.nonzero(np.diff(arr) < 0)[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"cu_seqlens: expected non-decreasing boundaries, got "
                         f"cu_seqlens[{i}] = {int(arr[i])} > cu_seqlens[{i + 1}] = "
                         f"{int(arr[i + 1])}")
    if batch is not None and batch != 1:
        raise ValueError(f"cu_seqlens: packed sequences take batch 1 (the sequences "
                         f"concatenated along time), got batch {batch}")
    return as_cu(arr)


def batch_axis(rec: Recurrence, dims: tuple[str, ...]) -> int | None:
    """The axis of the batch dim in ``dims`` (None: none)."""
    b = next((d.name for d in rec.dims if d.role == "batch"), None)
    return dims.index(b) if b in dims else None


def _flip(x, axis: int):
    if isinstance(x, np.ndarray):
        return np.flip(x, axis)
    return x.flip(axis)


def _take(x, axis: int, i: int):
    """x[..., i:i+1, ...] along ``axis``."""
    return x[(slice(None),) * axis + (slice(i, i + 1),)]


def backward_varlen(rec: Recurrence, inputs: Mapping[str, Any], d_out: Mapping[str, Any],
                    initial_state: Mapping[str, Any] | None,
                    d_final_state: Mapping[str, Any] | None, cu: tuple[int, ...],
                    target: str = "reference",
                    options: Mapping[str, Any] | Options | None = None,
                    chunk: int = DEFAULT_CHUNK) -> tuple[dict, dict]:
    """Gradients of a packed call (as ``autograd.backward``, chunk by chunk: memory O(T/C)
    boundary states plus O(C) per-step states): (grads by input, grads of the per-sequence
    initial states by state, N along batch).

    Each chunk [t0, t1) runs as a packed call of its *pieces* (the parts of the sequences in
    it): a piece that starts its sequence starts from its initial state, the first piece may
    continue the sequence of the previous chunk (from the state kept at the boundary). In
    reverse, the backward recurrence runs on the chunk's reversed pieces: the adjoint entering
    a piece that ends its sequence is the sequence's d final state (the cut), else the adjoint
    carried from the next chunk; leaving a piece that starts its sequence, it is the
    sequence's d initial state, else it is carried to the previous chunk."""
    adj = adjoint(rec)
    opts = options if isinstance(options, Options) else Options(options)
    xp = _Arrays(next(iter(inputs.values())))
    fwd = _kernel(rec, target, opts)
    f64 = fwd.backend.computes_float64
    dt = xp.float_dtype(64 if f64 else 32)
    dts = "float64" if f64 else "float32"
    given = {k: v.shape for k, v in inputs.items()}
    inputs = {k: xp.cast(v, dt) for k, v in _full_layouts(rec, inputs).items()}
    d_out = {k: xp.cast(v, dt) for k, v in d_out.items()}
    sizes = fwd.sizes(tuple(tuple(inputs[n].shape) for n in fwd.input_names))
    N, T = len(cu) - 1, sizes[rec.time]
    axis = {s.name: batch_axis(rec, s.dims) for s in rec.states}

    def per_seq(src: Mapping[str, Any] | None) -> dict:
        out = {}
        for s in rec.states:
            v = (src or {}).get(s.name)
            if v is None:
                shape = [sizes[d] for d in s.dims]
                ax = axis[s.name]
                shape = shape[:ax] + [N] + shape[ax + 1:] if ax is not None else [N, *shape]
                v = xp.zeros(tuple(shape), dt)
            out[s.name] = xp.cast(v, dt)
        return out
    init, d_fin = per_seq(initial_state), per_seq(d_final_state)

    def row(v, s: str, n: int):
        """Sequence n of per-sequence states ``v`` (batch 1)."""
        ax = axis[s]
        return v[n] if ax is None else _take(v, ax, n)

    def stack(rows: list, s: str):
        ax = axis[s]
        if xp.torch:
            return xp.t.stack(rows, 0) if ax is None else xp.t.cat(rows, ax)
        return np.stack(rows, 0) if ax is None else np.concatenate(rows, ax)

    def pieces(t0: int, t1: int) -> list[tuple[int, int, int, bool, bool]]:
        """(sequence, start, end, starts its sequence, ends it) of each piece of [t0, t1)."""
        out = []
        for n in range(N):
            lo, hi = max(cu[n], t0), min(cu[n + 1], t1)
            if lo < hi:
                out.append((n, lo, hi, lo == cu[n], hi == cu[n + 1]))
        return out

    def local_cu(ps, t0: int) -> tuple[int, ...]:
        return (0,) + tuple(hi - t0 for _, _, hi, _, _ in ps)

    def piece_init(ps, cont: dict | None) -> dict:
        """Each piece's initial state: its sequence's, or ``cont`` where it continues one."""
        return {s.name: stack([row(init[s.name], s.name, n) if starts_seq else cont[s.name]
                               for n, _lo, _hi, starts_seq, _e in ps], s.name)
                for s in rec.states}

    def call(r, feed: Mapping[str, Any], h0: dict, cu_: tuple[int, ...]):
        k = _kernel(r, target, opts)
        args = [k.to_native(feed[n]) for n in k.input_names]
        res = k(args, {n: k.to_native(v) for n, v in h0.items()}, True, dts, cu_seqlens=cu_)
        return ({n: xp.back(y, dt) for n, y in res.outputs.items()},
                {n: xp.back(y, dt) for n, y in res.final_states.items()})

    time_ax = {x.name: (x.dims.index(rec.time) if rec.time in x.dims else None)
               for x in list(rec.inputs) + list(rec.outputs)}

    def part(arrays: Mapping[str, Any], t0: int, t1: int) -> dict:
        return {k: v if time_ax[k] is None else v[(slice(None),) * time_ax[k] + (slice(t0, t1),)]
                for k, v in arrays.items()}

    # forward: the state of the sequence that continues into each chunk (None: none does)
    nch = -(-T // chunk)
    bounds: list = [None] * nch
    for c in range(nch - 1):
        t0, t1 = c * chunk, min(T, (c + 1) * chunk)
        ps = pieces(t0, t1)
        _, fin = call(rec, part(inputs, t0, t1), piece_init(ps, bounds[c]), local_cu(ps, t0))
        if not ps[-1][4]:
            bounds[c + 1] = {s: row(v, s, len(ps) - 1) for s, v in fin.items()}

    bwd = adj.backward
    names = {x.name for x in bwd.inputs}
    grads = {x.name: xp.zeros(tuple(sizes[d] for d in x.dims), dt) for x in rec.inputs}
    d_init_rows: dict = {n: None for n in range(N)}
    carry = None  # the adjoint of the sequence continuing from the next chunk
    for c in reversed(range(nch)):
        t0, t1 = c * chunk, min(T, (c + 1) * chunk)
        ps = pieces(t0, t1)
        x = part(inputs, t0, t1)
        lcu = local_cu(ps, t0)
        h0 = piece_init(ps, bounds[c])
        seqs, _ = call(adj.states_view, x, h0, lcu)     # recompute the chunk's states
        feed = {k: v if time_ax[k] is None else _flip(v, time_ax[k])
                for k, v in x.items() if k in names}
        for o in rec.outputs:
            if adj.cotangent[o.name] in names:
                ax = time_ax[o.name]
                feed[adj.cotangent[o.name]] = _flip(
                    d_out[o.name][(slice(None),) * ax + (slice(t0, t1),)], ax)
        for s in rec.states:
            now, before = adj.state_seq[s.name]
            hs = seqs[now]                               # [chunk, *state dims]
            if now in names:
                feed[now] = _flip(hs, 0)
            if before in names:                          # h_{t-1} as the transition saw it
                hp = xp.t.empty_like(hs) if xp.torch else np.empty_like(hs)
                hp[1:] = hs[:-1]
                for i, (n, lo, *_rest) in enumerate(ps):
                    hp[lo - t0] = row(h0[s.name], s.name, i)
                feed[before] = _flip(hp, 0)
        rps = ps[::-1]                                   # the reversed pieces, in order
        ainit = {adj.adjoint_state[s.name]: stack(
            [row(d_fin[s.name], s.name, n) if ends else carry[s.name]
             for n, _lo, _hi, _st, ends in rps], s.name) for s in rec.states}
        outs, fin = call(bwd, feed, ainit, reversed_cu(lcu))
        carry = None
        for j, (n, _lo, _hi, st, _ends) in enumerate(rps):
            got = {s.name: row(fin[adj.adjoint_state[s.name]], s.name, j) for s in rec.states}
            if st:
                d_init_rows[n] = got
            else:
                carry = got
        for xin in rec.inputs:
            gx = outs[adj.grad[xin.name]]
            ax = time_ax[xin.name]
            if ax is None:
                grads[xin.name] += gx.sum(0)
            else:
                grads[xin.name][(slice(None),) * ax + (slice(t0, t1),)] = _flip(gx, ax)
    d_init = {}
    for s in rec.states:  # an empty sequence: its d initial state is its d final state
        d_init[s.name] = stack([row(d_fin[s.name], s.name, n) if d_init_rows[n] is None
                                else d_init_rows[n][s.name] for n in range(N)], s.name)
    out = {}
    for k, v in grads.items():
        v = v.reshape(given[k])
        out[k] = np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v
    return out, d_init


# ---- torch: the scancc::scan_varlen op (cu_seqlens as an int list), differentiable ----

_OP: Any = None


def torch_varlen_op():
    """The custom op (defined on first use, so importing scancc never imports torch)."""
    global _OP
    if _OP is not None:
        return _OP
    import torch

    from .autograd import backward_target

    def state_dtype(ref):
        return torch.float64 if ref.dtype == torch.float64 else torch.float32

    @torch.library.custom_op("scancc::scan_varlen", mutates_args=(), schema=(
        "(str key, Tensor[] inputs, Tensor[] init, int[] cu, bool want_final) -> Tensor[]"))
    def scan_varlen(key: str, inputs: list[torch.Tensor], init: list[torch.Tensor],
                    cu: list[int], want_final: bool) -> list[torch.Tensor]:
        run = by_slot(key)
        native = [run.to_native(t) for t in inputs]
        ninit = {s: run.to_native(t) for s, t in zip(run.state_names, init)} if init else None
        ref = inputs[0]
        res = run(native, ninit, want_final, str(ref.dtype).replace("torch.", ""),
                  cu_seqlens=tuple(cu))
        outs = [_to_torch(res.outputs[o], ref, ref.dtype) for o in run.output_names]
        if want_final:
            sdt = state_dtype(ref)
            outs += [_to_torch(res.final_states[s], ref, sdt) for s in run.state_names]
        return [o.contiguous() for o in outs]

    @scan_varlen.register_fake
    def _(key, inputs, init, cu, want_final):
        rec = by_slot(key).rec
        from .autograd import _shapes
        sizes, ref = _shapes(rec, inputs), inputs[0]
        outs = [ref.new_empty(tuple(sizes[d] for d in o.dims)) for o in rec.outputs]
        if want_final:
            for s in rec.states:
                shape = [sizes[d] for d in s.dims]
                ax = batch_axis(rec, s.dims)
                shape = shape[:ax] + [len(cu) - 1] + shape[ax + 1:] if ax is not None \
                    else [len(cu) - 1] + shape
                outs.append(ref.new_empty(tuple(shape), dtype=state_dtype(ref)))
        return outs

    def setup_context(ctx, inputs, output):
        key, xs, init, cu, want_final = inputs
        ctx.key, ctx.want_final, ctx.n_in, ctx.n_init = key, want_final, len(xs), len(init)
        ctx.cu = tuple(cu)
        ctx.save_for_backward(*xs, *init)
        ctx.out_like = [(o.shape, o.dtype) for o in output]

    def backward_rule(ctx, grads):
        saved = ctx.saved_tensors
        run = by_slot(ctx.key)
        rec = run.rec
        xs, init = saved[:ctx.n_in], saved[ctx.n_in:]
        grads = [torch.zeros(shape, dtype=dtype, device=xs[0].device) if g is None else g
                 for g, (shape, dtype) in zip(grads, ctx.out_like)]
        no = len(rec.outputs)
        x = {i.name: t.detach() for i, t in zip(rec.inputs, xs)}
        h0 = {s.name: t.detach() for s, t in zip(rec.states, init)} if init else None
        d_out = {o.name: g.detach() for o, g in zip(rec.outputs, grads[:no])}
        d_fin = {s.name: g.detach() for s, g in zip(rec.states, grads[no:])} \
            if ctx.want_final else None
        target = backward_target(run, rec)
        gin, ginit = backward_varlen(rec, x, d_out, h0, d_fin, ctx.cu, target,
                                     run.options if target == run.backend.name else None)
        gx = [_to_torch(gin[i.name], t, t.dtype) for i, t in zip(rec.inputs, xs)]
        gi = [_to_torch(ginit[s.name], t, t.dtype) for s, t in zip(rec.states, init)]
        return None, gx, gi, None, None

    scan_varlen.register_autograd(backward_rule, setup_context=setup_context)
    _OP = scan_varlen
    return _OP


_OP_T = None


def torch_varlen_traced_op():
    """The packed call as torch.compile traces it: ``scancc::scan_varlen_cu`` takes
    ``cu_seqlens`` as a **tensor** input (its values are read, and checked, only when the op
    runs; the fake needs only its length N+1), with a backward op of the same form, so a
    compiled region (``fullgraph=True``) holds the packed scan and its gradients without a
    graph break. A bad ``cu_seqlens`` raises ValueError when the op runs."""
    global _OP_T
    if _OP_T is not None:
        return _OP_T
    import torch

    from .autograd import _shapes, backward_target

    def state_dtype(ref):
        return torch.float64 if ref.dtype == torch.float64 else torch.float32

    def cu_of(run, inputs, cu):
        rec = run.rec
        sizes = _shapes(rec, inputs)
        batch = next((d.name for d in rec.dims if d.role == "batch"), None)
        return check_cu_seqlens(cu, sizes[rec.time], sizes[batch] if batch else None,
                                rec.inputs[0].name)

    def state_shape(rec, s, sizes, n):
        shape = [sizes[d] for d in s.dims]
        ax = batch_axis(rec, s.dims)
        return tuple(shape[:ax] + [n] + shape[ax + 1:] if ax is not None else [n] + shape)

    @torch.library.custom_op("scancc::scan_varlen_cu", mutates_args=(), schema=(
        "(str key, Tensor[] inputs, Tensor[] init, Tensor cu, bool want_final) -> Tensor[]"))
    def scan_varlen_cu(key: str, inputs: list[torch.Tensor], init: list[torch.Tensor],
                       cu: torch.Tensor, want_final: bool) -> list[torch.Tensor]:
        run = by_slot(key)
        cut = cu_of(run, inputs, cu)
        native = [run.to_native(t) for t in inputs]
        ninit = {s: run.to_native(t) for s, t in zip(run.state_names, init)} if init else None
        ref = inputs[0]
        res = run(native, ninit, want_final, str(ref.dtype).replace("torch.", ""),
                  cu_seqlens=cut)
        outs = [_to_torch(res.outputs[o], ref, ref.dtype) for o in run.output_names]
        if want_final:
            sdt = state_dtype(ref)
            outs += [_to_torch(res.final_states[s], ref, sdt) for s in run.state_names]
        return [o.contiguous() for o in outs]

    @scan_varlen_cu.register_fake
    def _(key, inputs, init, cu, want_final):
        rec = by_slot(key).rec
        sizes, ref = _shapes(rec, inputs), inputs[0]
        outs = [ref.new_empty(tuple(sizes[d] for d in o.dims)) for o in rec.outputs]
        if want_final:
            outs += [ref.new_empty(state_shape(rec, s, sizes, cu.shape[0] - 1),
                                   dtype=state_dtype(ref)) for s in rec.states]
        return outs

    @torch.library.custom_op("scancc::scan_varlen_cu_backward", mutates_args=(), schema=(
        "(str key, Tensor[] inputs, Tensor[] init, Tensor cu, Tensor[] grads, "
        "bool want_final) -> Tensor[]"))
    def scan_varlen_cu_backward(key: str, inputs: list[torch.Tensor],
                                init: list[torch.Tensor], cu: torch.Tensor,
                                grads: list[torch.Tensor], want_final: bool
                                ) -> list[torch.Tensor]:
        run = by_slot(key)
        rec = run.rec
        cut = cu_of(run, inputs, cu)
        no = len(rec.outputs)
        x = {i.name: t.detach() for i, t in zip(rec.inputs, inputs)}
        h0 = {s.name: t.detach() for s, t in zip(rec.states, init)} if init else None
        d_out = {o.name: g.detach() for o, g in zip(rec.outputs, grads[:no])}
        d_fin = {s.name: g.detach() for s, g in zip(rec.states, grads[no:])} \
            if want_final else None
        target = backward_target(run, rec)
        gin, ginit = backward_varlen(rec, x, d_out, h0, d_fin, cut, target,
                                     run.options if target == run.backend.name else None)
        res = [_to_torch(gin[i.name], t, t.dtype) for i, t in zip(rec.inputs, inputs)]
        res += [_to_torch(ginit[s.name], t, t.dtype) for s, t in zip(rec.states, init)]
        given = {t.untyped_storage().data_ptr() for t in [*inputs, *init, *grads]
                 if t.numel()}
        return [r.clone(memory_format=torch.contiguous_format)
                if r.numel() and r.untyped_storage().data_ptr() in given else r.contiguous()
                for r in res]

    @scan_varlen_cu_backward.register_fake
    def _(key, inputs, init, cu, grads, want_final):
        return [t.new_empty(t.shape) for t in list(inputs) + list(init)]

    def setup_context(ctx, inputs, output):
        key, xs, init, cu, want_final = inputs
        ctx.key, ctx.want_final, ctx.n_in = key, want_final, len(xs)
        ctx.save_for_backward(*xs, *init, cu, *output)

    def backward_rule(ctx, grads):
        saved = ctx.saved_tensors
        n_init = len(saved) - ctx.n_in - 1 - len(grads)
        xs, init = saved[:ctx.n_in], saved[ctx.n_in:ctx.n_in + n_init]
        cu, outs = saved[ctx.n_in + n_init], saved[ctx.n_in + n_init + 1:]
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outs)]
        g = scan_varlen_cu_backward(ctx.key, list(xs), list(init), cu, grads, ctx.want_final)
        return None, g[:ctx.n_in], g[ctx.n_in:], None, None

    scan_varlen_cu.register_autograd(backward_rule, setup_context=setup_context)
    _OP_T = scan_varlen_cu
    return _OP_T


__all__ = ["check_cu_seqlens", "backward_varlen", "torch_varlen_op", "torch_varlen_traced_op",
           "batch_axis"]
