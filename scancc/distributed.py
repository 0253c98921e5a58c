"""Context parallelism over ``torch.distributed``: ``kernel(*local_inputs, cp_group=group)``.

Each rank of ``group`` holds a contiguous shard of the time dim, in rank order. The scan over
the whole sequence is split as a prefix fold of per-rank affine maps, one per state:

    h_end(r) = M_r h_enter(r) + F_r

where ``F_r`` is the rank's final state scanned from zero and ``M_r`` the product of its
transitions. ``M_r`` is derived from the IR, never written per recurrence: the *summary
recurrence* (``summary_recurrence``) is the homogeneous recurrence (inject 0) of each state,
kept only over the dims the transition's operands vary along, and run from the identity:

- identity: ``M = I``, nothing to compute or send;
- scalar, diagonal: started from ones, the state ends as the elementwise product of the
  decays, over the decay's dims only (a scalar per head, a vector per head, ...);
- shift, companion, householder, dense: a matrix over the transition axis, as a state with
  one extra dim ``cp_col`` (the axis' size) started from the identity over (axis, cp_col),
  over the operands' other dims only (delta nets: ``[B, H, K, K]``, not ``[B, H, K, V, K]``).

Rank 0 runs the kernel from the initial state (its outputs are final); every other rank runs
the summary recurrence with ``carry=True`` (its own states next to the summaries, no
readout) once from zero: ``F_r`` and ``M_r`` in one scan. One all-gather of every rank's
(summaries, local final states), packed in one flat tensor, then every rank folds the prefix
``E_1 = F_0``, ``E_{r+1} = M_r E_r + F_r`` and reruns its shard from its entering state
``E_r`` with the kernel (rank 0 needs no rerun). The global
final state ``E_P`` is known on every rank. Backward: every piece is differentiable (the
``scancc::scan`` op has gradients w.r.t. inputs and initial states, the fold is torch
arithmetic, ``torch.distributed.nn.functional.all_gather`` has autograd), so the reverse fold
of dh comes from autograd; inputs without the time dim (replicated, e.g. mamba's ``A``) get
per-rank partial gradients, which the caller all-reduces like any replicated parameter.

This module imports ``torch`` lazily; ``api`` imports it only when ``cp_group`` is
given.
"""
from __future__ import annotations

import string
from dataclasses import replace
from typing import Any, Mapping

from scancc.ir import Dim, Kind, Node, Op, Output, Recurrence, State, const
from scancc.ir import reduce_sum
from scancc.ir.recurrence import AXIS_KINDS
from scancc.ir.verify import verify

COL = "cp_col"            # the extra dim of a matrix summary (the axis' columns)
_PROBE_OUT = "cp_probe"   # the summary recurrence's (unused) output

# kinds whose product is the elementwise product of their decays (started from ones)
_ELEMENTWISE = (Kind.SCALAR, Kind.DIAGONAL)


def summary_dims(rec: Recurrence, s: State) -> tuple[str, ...]:
    """The state's dims the summary of its transition product varies along: the dims of the
    transition's operands (and the axis), in the state's order; others broadcast."""
    t = s.transition
    used = set()
    for _, op in t.operands:
        used |= set(rec.dims_of(op))
    if t.axis is not None:
        used.add(t.axis)
    return tuple(d for d in s.dims if d in used)


SUMMARY = "cp_M_"         # a summary state's name prefix where the states are carried too


def summary_recurrence(rec: Recurrence, sizes: Mapping[str, int],
                       carry: bool = False) -> Recurrence | None:
    """The homogeneous recurrence whose final state, started from the identity (``identity``),
    is the product of the transitions of every non-identity state of ``rec`` (None when every
    state is an identity). ``sizes``: the size of every non-time dim, fixed in the summary
    recurrence (the ``cp_col`` dim of a matrix summary takes the axis' size), so every dim
    stays sized in its derived backward too, whatever inputs that reads. It keeps only the
    inputs and lets the transitions read; its one output ``cp_probe[time] = 0 * sum(inputs)``
    (never read) keeps them used, and where none has the time dim it reads the smallest
    input that has (the ``probe``: iir's feedback is time-invariant).

    ``carry``: the recurrence's own states are kept too (as they are, injects included), and
    the summaries are named ``cp_M_<state>``: one scan from zero then gives a rank both its
    local final states and its summaries, without evaluating any readout (the ranks'
    first scan, ``cp_call``)."""
    states = []
    dims = [d if d.role == "time" else replace(d, size=int(sizes[d.name])) for d in rec.dims]
    for s in rec.states:
        t = s.transition
        if t.kind is Kind.IDENTITY:
            continue
        if t.kind not in _ELEMENTWISE and t.kind not in AXIS_KINDS:
            raise NotImplementedError(f"context parallelism: no summary for a {t.kind.value} "
                                      "transition")
        sd = summary_dims(rec, s)
        if t.kind in AXIS_KINDS:
            col = f"{COL}_{s.name}"
            dims.append(Dim(col, "feature", int(sizes[t.axis])))
            sd = sd + (col,)
        elif not sd:  # a constant decay: keep one batch-like dim so the state has a shape
            sd = s.dims[:1]
        states.append(State(SUMMARY + s.name if carry else s.name, sd, t, const(0.0)))
    if carry:
        states = list(rec.states) + states
    if not states:
        return None
    # only what the transitions read: their inputs and lets (a let may read earlier lets)
    need = set()

    def reads(node):
        for n in node.walk():
            if n.op is Op.INPUT:
                need.add(("input", n.arg))
            elif n.op is Op.PARAM and ("let", n.arg) not in need:
                need.add(("let", n.arg))
                reads(rec.let(n.arg).expr)
    for st in states:
        for _, op in st.transition.operands:
            reads(op)
        reads(st.inject)
    inputs = [i for i in rec.inputs if ("input", i.name) in need]
    lets = tuple(x for x in rec.lets if ("let", x.name) in need)
    if not any(rec.time in i.dims for i in inputs):  # the probe sizes the time dim
        inputs.append(min((i for i in rec.inputs if rec.time in i.dims),
                          key=lambda i: len(i.dims)))
    probe = None
    for inp in inputs:
        x = Node(Op.INPUT, (), inp.name)
        ds = tuple(d for d in inp.dims if d != rec.time)
        term = reduce_sum(x, ds) if ds else x
        probe = term if probe is None else probe + term
    out = Output(_PROBE_OUT, (rec.time,), const(0.0) * probe)
    return verify(replace(rec, name=f"{rec.name}_cp_summary", dims=tuple(dims),
                          inputs=tuple(inputs), lets=lets, states=tuple(states),
                          outputs=(out,)))


def identity_state(torch, summ: Recurrence, sizes: Mapping[str, int], dtype, device,
                   only=None) -> dict:
    """The initial state of the summary recurrence: ones (elementwise kinds), the identity
    over (axis, cp_col) broadcast over the other dims (matrix kinds); ``only``: of those
    states (the summaries of a carrying summary recurrence; its carried states start at 0)."""
    out = {}
    for s in summ.states:
        if only is not None and s.name not in only:
            continue
        shape = [sizes[d] for d in s.dims]
        if s.transition.kind in _ELEMENTWISE:
            out[s.name] = torch.ones(shape, dtype=dtype, device=device)
            continue
        ax, col = s.dims.index(s.transition.axis), len(s.dims) - 1
        n = sizes[s.transition.axis]
        view = [1] * len(shape)
        view[ax] = view[col] = n
        eye = torch.eye(n, dtype=dtype, device=device)
        if ax > col:
            eye = eye.t()
        out[s.name] = eye.reshape(view).expand(shape).contiguous()
    return out


def apply_summary(torch, s: State, sdims: tuple[str, ...], m, h):
    """``M h`` for state ``s`` (dims ``s.dims``) and its summary ``m`` (dims ``sdims``)."""
    if s.transition.kind in _ELEMENTWISE:
        view = [m.shape[sdims.index(d)] if d in sdims else 1 for d in s.dims]
        perm = [sdims.index(d) for d in s.dims if d in sdims]
        return m.permute(perm).reshape(view) * h
    # matrix: out[.., i, ..] = sum_j m[.., i, .., j] h[.., j, ..]
    letters = dict(zip(s.dims, string.ascii_letters))
    j = string.ascii_letters[len(s.dims)]
    ax = s.transition.axis
    ms = "".join(letters[d] for d in sdims[:-1]) + j
    hs = "".join(j if d == ax else letters[d] for d in s.dims)
    os_ = "".join(letters[d] for d in s.dims)
    return torch.einsum(f"{ms},{hs}->{os_}", m, h)


class _Plan:
    """What a context-parallel call of one variant needs: its summary kernel and shapes."""

    def __init__(self, kernel, rec: Recurrence, sizes: Mapping[str, int]):
        Kernel = type(kernel)  # api.Kernel (this module never imports api, which imports it)
        self.rec = rec
        # the ranks' first scan: the states from zero and the summaries, no readout
        self.summ = summary_recurrence(rec, sizes, carry=True)
        self.ssizes = dict(sizes)
        self.ssizes.update({d.name: d.size for d in self.summ.dims if d.size is not None})
        backend = kernel.backend
        ok, _ = backend.supports(self.summ, kernel.backend_options)
        if ok:
            self.skernel = Kernel(None, self.summ, backend, {}, kernel.backend_options)
        else:  # the reference interprets every IR
            from scancc import backends
            self.skernel = Kernel(None, self.summ, backends.get("reference"), {}, {})
        self.s_inputs = [i.name for i in self.summ.inputs]
        names = {s.name for s in rec.states}
        # summaries by the state they summarize (identity states have none)
        summaries = [s for s in self.summ.states if s.name not in names]
        self.sname = {s.name[len(SUMMARY):]: s.name for s in summaries}
        self.sdims = {s.name[len(SUMMARY):]: s.dims for s in summaries}
        self.state_shapes = {s.name: tuple(sizes[d] for d in s.dims) for s in rec.states}
        self.summary_shapes = {s.name[len(SUMMARY):]: tuple(self.ssizes[d] for d in s.dims)
                               for s in summaries}
        # the flat tensor each rank contributes: summaries, then final states, by state
        self.offsets, at = {}, 0
        for what, shapes in (("summary", self.summary_shapes), ("final", self.state_shapes)):
            for k, shape in shapes.items():
                self.offsets[what, k] = (at, shape)
                at += _prod(shape)

    def unpack(self, flat, what: str, state: str):
        """The ``what`` ("summary" or "final") of ``state`` in a rank's flat tensor."""
        at, shape = self.offsets[what, state]
        return flat[at:at + _prod(shape)].reshape(shape)

    def summary_numel(self) -> int:
        """Elements of this rank's summaries (what the all-gather adds to the final states)."""
        return sum(_prod(v) for v in self.summary_shapes.values())


def _prod(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _gather(torch, dist, flat, group):
    """All-gather one flat tensor per rank (differentiable when grad is on)."""
    if torch.is_grad_enabled():  # the same branch on every rank: the backward is collective
        from torch.distributed.nn.functional import all_gather
        return list(all_gather(flat, group=group))
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, flat.contiguous(), group=group)
    return out


def _cached_plan(kernel, rec: Recurrence, sizes: Mapping[str, int]) -> _Plan:
    cache = kernel.__dict__.setdefault("_cp_plans", {})
    key = (id(rec), tuple(sorted((k, v) for k, v in sizes.items() if k != rec.time)))
    cp = cache.get(key)
    if cp is None:
        cp = cache[key] = _Plan(kernel, rec, sizes)
    return cp


_TIE = None


def _tie(torch, x, deps):
    """``x`` unchanged, with ``deps`` (gathered tensors) in its autograd graph: their
    backward (a collective) then runs on every rank, even where ``x`` does not read them
    (rank 0 never folds), and after every use of ``x``'s own graph. A zero gradient."""
    global _TIE
    if not torch.is_grad_enabled() or not any(d.requires_grad for d in deps):
        return x
    if _TIE is None:
        class Tie(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, *deps):
                ctx.shapes = [(d.shape, d.dtype, d.device) for d in deps]
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                return (g, *(torch.zeros(s, dtype=t, device=v) for s, t, v in ctx.shapes))
        _TIE = Tie
    return _TIE.apply(x, *deps)


def _tie_out(torch, out, deps):
    if isinstance(out, Mapping):
        return {k: _tie(torch, v, deps) for k, v in out.items()}
    return _tie(torch, out, deps)


def cp_call(kernel, args: tuple, kwargs: dict, initial_state: Any, output_final_state: bool,
            group, error=ValueError) -> Any:
    """``kernel(*args, **kwargs)`` over the time shards of ``group`` (see the module doc);
    ``error``: the exception class of input errors (api.InputError)."""
    import torch
    import torch.distributed as dist

    InputError = error
    plan = kernel._plan_call(args, {k: v for k, v in kwargs.items()}, initial_state)
    if plan.kind != "torch":
        raise InputError("cp_group: context parallelism takes torch tensors")
    rec = plan.rec
    run = plan.runner
    inputs = dict(zip(run.input_names, plan._inputs(args, kwargs)))
    sizes = run.sizes(tuple(tuple(v.shape) for v in inputs.values()))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = inputs[rec.inputs[0].name]
    sdt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    names = [s.name for s in rec.states]
    init = None
    if initial_state is not None:
        init = initial_state if isinstance(initial_state, Mapping) else {names[0]: initial_state}
        init = {k: torch.as_tensor(v).to(device=ref.device, dtype=sdt) for k, v in init.items()}
    if not has_summary(rec):
        return _relay(kernel, args, kwargs, init, output_final_state, group, rec, sizes, sdt,
                      ref.device)
    cp = _cached_plan(kernel, rec, sizes)

    # 1. the local scan. Rank 0: the kernel from the initial state (its outputs are final).
    # 2. Others: the carrying summary recurrence from zero states and identity summaries:
    # the local final states F_r and the summaries M_r in one scan, no readout
    if rank == 0:
        out0, fin0 = kernel(*args, initial_state=init, output_final_state=True, **kwargs)
        fin0 = fin0 if isinstance(fin0, Mapping) else {names[0]: fin0}
        summ = {k: torch.zeros(v, dtype=sdt, device=ref.device)
                for k, v in cp.summary_shapes.items()}
    else:
        ident = identity_state(torch, cp.summ, cp.ssizes, sdt, ref.device,
                               only=set(cp.sname.values()))
        _, fin = cp.skernel(**{k: inputs[k] for k in cp.s_inputs},
                            initial_state=ident or None, output_final_state=True)
        fin = fin if isinstance(fin, Mapping) else {cp.summ.states[0].name: fin}
        fin0 = {k: fin[k] for k in names}
        summ = {k: fin[m].to(sdt) for k, m in cp.sname.items()}
    # 3. one all-gather of (summaries, final states), packed flat
    parts = [summ[k].reshape(-1) for k in cp.summary_shapes] + \
        [fin0[k].to(sdt).reshape(-1) for k in names]
    flat = torch.cat(parts)
    gathered = _gather(torch, dist, flat, group)
    # 4. fold the prefix: E_{r+1} = M_r E_r + F_r, E_1 = F_0 (rank 0 scanned from E_0)
    enter, final = {}, {}
    for k in names:
        s = rec.state(k)
        e = None
        for r in range(world):
            if r == rank:
                enter[k] = e
            f = cp.unpack(gathered[r], "final", k)
            if e is None:
                e = f
            elif k in cp.summary_shapes:
                e = apply_summary(torch, s, cp.sdims[k], cp.unpack(gathered[r], "summary", k),
                                  e) + f
            else:  # identity: M = I
                e = e + f
        final[k] = e
    # 5. rerun this shard from its entering state (rank 0's first scan is already right)
    if rank == 0:  # tied: the gather's backward (collective) runs on rank 0 too
        out = _tie_out(torch, out0, gathered)
    else:
        out = kernel(*args, initial_state=enter, output_final_state=False, **kwargs)
    if not output_final_state:
        return out
    return out, (final[names[0]] if len(names) == 1 else final)


def has_summary(rec: Recurrence) -> bool:
    """Whether the states' transition product over a shard is a linear map (a summary the
    fold composes): not for a selection (bounded memory: the choice depends on the stored
    scores) nor a cascade (a state's update reads another state)."""
    return not rec.cascaded and all(s.transition.kind is not Kind.SELECTION for s in rec.states)


def _relay(kernel, args, kwargs, init, output_final_state, group, rec, sizes, sdt, device):
    """Context parallel for a recurrence without a linear summary (``has_summary``): the
    shards run one after another, each from the state the rank before it ended with (P
    all-gathers of the final states, P sequential scans: exact for any recurrence, no
    parallel speed-up)."""
    import torch
    import torch.distributed as dist
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    names = [s.name for s in rec.states]
    shapes = {s.name: tuple(sizes[d] for d in s.dims) for s in rec.states}
    numel = sum(_prod(v) for v in shapes.values())
    entering, out, gathered = init, None, []
    for r in range(world):
        if r == rank:
            out, fin = kernel(*args, initial_state=entering, output_final_state=True, **kwargs)
            fin = fin if isinstance(fin, Mapping) else {names[0]: fin}
            flat = torch.cat([fin[k].to(sdt).reshape(-1) for k in names])
        else:
            flat = torch.zeros(numel, dtype=sdt, device=device)
        g = _gather(torch, dist, flat, group)
        gathered += g
        parts, at = {}, 0
        for k in names:
            n = _prod(shapes[k])
            parts[k] = g[r][at:at + n].reshape(shapes[k])
            at += n
        entering = parts
    out = _tie_out(torch, out, gathered)
    if not output_final_state:
        return out
    return out, (entering[names[0]] if len(names) == 1 else entering)


def _fold_one(torch, s: State, cp: _Plan, m, e, f):
    """``M e + f`` for state ``s`` (``m`` None: an identity transition)."""
    if m is None:
        return e + f
    return apply_summary(torch, s, cp.sdims[s.name], m, e) + f


def cp_varlen_call(kernel, args: tuple, kwargs: dict, cu_seqlens: Any, initial_state: Any,
                   output_final_state: bool, group, error=ValueError) -> Any:
    """``kernel(*args, cu_seqlens=cu, **kwargs)`` over the time shards of ``group``: a packed
    batch (batch 1) whose sequences may span ranks. ``cu_seqlens`` is the **global** one
    (boundaries on the whole packed time axis, the same on every rank); ``initial_state``
    the global ``[N, ...]`` one, passed on every rank (each rank reads the rows of the
    sequences it starts). Per rank (docs/distributed.md, "Packed sequences"):

    - the shard starts at a boundary (rank 0 always): one local packed call from the
      sequences' initial states is exact; its tail does not depend on earlier ranks;
    - it has a boundary inside: the entering state stops at the first boundary (a zero
      transition for the fold); its tail segment's final state comes from a scan of that
      segment alone; after the fold, a local packed rerun with the head from the entering
      state;
    - no boundary: as the unpacked case (the carrying summary scan gives ``F_r`` and
      ``M_r``; after the fold, a rerun from the entering state).

    One small all-gather of the shard lengths (the offsets), one of (summaries, tail final
    states) and, with ``output_final_state``, one of the ``[N, ...]`` final states (each
    sequence's placed by the rank where it ends; summed)."""
    import bisect

    import torch
    import torch.distributed as dist
    rec = kernel.ir
    if not has_summary(rec):
        raise error(f"cp_group with cu_seqlens: recurrence {rec.name!r} has no linear summary "
                    "(a selection or cascaded state): packed context parallel is not built for "
                    "it yet; pass one of the two")

    from .varlen import batch_axis, check_cu_seqlens

    InputError = error
    plan = kernel._plan_call(args, dict(kwargs), None)
    if plan.kind != "torch":
        raise InputError("cp_group: context parallelism takes torch tensors")
    rec, run = plan.rec, plan.runner
    inputs = dict(zip(run.input_names, plan._inputs(args, kwargs)))
    opts = {k: v for k, v in kwargs.items() if k not in inputs}
    sizes = run.sizes(tuple(tuple(v.shape) for v in inputs.values()))
    batch = next((d.name for d in rec.dims if d.role == "batch"), None)
    if batch is not None and sizes[batch] != 1:
        raise InputError(f"recurrence {rec.name!r}: cu_seqlens: packed sequences take batch 1 "
                         f"(the sequences concatenated along time), got batch {sizes[batch]}")
    cp = _cached_plan(kernel, rec, sizes)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = inputs[rec.inputs[0].name]
    sdt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    names = [s.name for s in rec.states]

    # the offsets: one all-gather of the shard lengths
    n_loc = int(sizes[rec.time])
    lens = [torch.zeros(1, dtype=torch.int64, device=ref.device) for _ in range(world)]
    dist.all_gather(lens, torch.tensor([n_loc], dtype=torch.int64, device=ref.device),
                    group=group)
    lens = [int(v.item()) for v in lens]
    if min(lens) < 1:
        raise InputError("cu_seqlens with cp_group: every rank's shard must hold at least "
                         f"one step, got shard lengths {lens}")
    offs = [sum(lens[:r]) for r in range(world)]
    try:
        cu = check_cu_seqlens(cu_seqlens, sum(lens), None, rec.inputs[0].name)
    except ValueError as e:
        raise InputError(f"recurrence {rec.name!r}: {e} (with cp_group: the global "
                         f"cu_seqlens over the {world} ranks' shards)") from None
    n_seq, cuset = len(cu) - 1, set(cu)

    def seq_at(p):  # the sequence global step p belongs to
        return bisect.bisect_right(cu, p) - 1

    def inner(r):  # boundaries strictly inside rank r's shard, local
        return sorted({b - offs[r] for b in cu if offs[r] < b < offs[r] + lens[r]})

    # does rank r's entering state reach its end (no boundary at its start or inside)?
    prop = [offs[r] not in cuset and not inner(r) for r in range(world)]

    init = None
    if initial_state is not None:
        init = initial_state if isinstance(initial_state, Mapping) else {names[0]: initial_state}
        init = {k: torch.as_tensor(v).to(device=ref.device, dtype=sdt) for k, v in init.items()}

    def row(k, x, i):  # sequence i's state (batch 1) of a packed [N, ...] state
        ax = batch_axis(rec, rec.state(k).dims)
        return x[i] if ax is None else x.narrow(ax, i, 1)

    def stack(k, rows):  # rows (batch 1) -> a packed [N, ...] state
        ax = batch_axis(rec, rec.state(k).dims)
        return torch.stack(rows) if ax is None else torch.cat(rows, ax)

    def zero(k):
        return torch.zeros(cp.state_shapes[k], dtype=sdt, device=ref.device)

    def init_row(k, i):
        return row(k, init[k], i) if init is not None and k in init else zero(k)

    def sliced(t0, t1):  # the named inputs over local steps [t0, t1)
        out = {}
        for n, v in inputs.items():
            dims = rec.input(n).dims
            out[n] = v.narrow(dims.index(rec.time), t0, t1 - t0) if rec.time in dims else v
        return out

    def as_dict(fin):
        return fin if isinstance(fin, Mapping) else {names[0]: fin}

    bounds = [0] + inner(rank) + [n_loc]
    segs = [seq_at(offs[rank] + b) for b in bounds[:-1]]  # each local segment's sequence
    local_cu = torch.tensor(bounds, dtype=torch.int64)

    def packed_call(head):  # the local packed call, the head segment from ``head``
        st = {k: stack(k, [head[k]] + [init_row(k, i) for i in segs[1:]]) for k in names}
        out, fin = kernel(**inputs, **opts, cu_seqlens=local_cu, initial_state=st,
                          output_final_state=True)
        fin = as_dict(fin)
        return out, [{k: row(k, fin[k], j) for k in names} for j in range(len(segs))]

    summ = {k: torch.zeros(v, dtype=sdt, device=ref.device)
            for k, v in cp.summary_shapes.items()}
    out = local = None
    if offs[rank] in cuset:  # exact from the start: no rerun
        out, local = packed_call({k: init_row(k, segs[0]) for k in names})
        tail = local[-1]
    elif len(segs) > 1:  # the tail segment alone, from its sequence's initial state
        _, fin = kernel(**sliced(bounds[-2], n_loc), **opts,
                        initial_state={k: init_row(k, segs[-1]) for k in names},
                        output_final_state=True)
        tail = as_dict(fin)
    else:  # one segment continuing the previous rank's: F_r and M_r in one scan
        ident = identity_state(torch, cp.summ, cp.ssizes, sdt, ref.device,
                               only=set(cp.sname.values()))
        _, fin = cp.skernel(**{k: inputs[k] for k in cp.s_inputs},
                            initial_state=ident or None, output_final_state=True)
        fin = as_dict(fin)
        tail = {k: fin[k] for k in names}
        summ = {k: fin[m].to(sdt) for k, m in cp.sname.items()}
    parts = [summ[k].reshape(-1) for k in cp.summary_shapes] + \
        [tail[k].to(sdt).reshape(-1) for k in names]
    gathered = _gather(torch, dist, torch.cat(parts), group)
    # the fold up to this rank: E_r = init (a start) or M'_{r-1} E_{r-1} + F_{r-1}
    enter = None  # E_r of the rank r the loop is at (E_{r-1} when it starts rank r)
    for r in range(rank + 1):
        if offs[r] in cuset:
            e = None  # not needed: rank r's tail is exact (M'_r = 0)
        else:
            e = {}
            for k in names:
                f = cp.unpack(gathered[r - 1], "final", k)
                if prop[r - 1]:
                    m = cp.unpack(gathered[r - 1], "summary", k) \
                        if k in cp.summary_shapes else None
                    e[k] = _fold_one(torch, rec.state(k), cp, m, enter[k], f)
                else:
                    e[k] = f
        enter = e
    if out is None:  # rerun from the entering state
        if len(segs) > 1:
            out, local = packed_call(enter)
        else:
            out, fin = kernel(**inputs, **opts, initial_state=enter, output_final_state=True)
            local = [as_dict(fin)]
    if not output_final_state:  # tied: the gather's backward runs on every rank
        return _tie_out(torch, out, gathered)
    # each sequence's final state from the rank where it ends; zero-length ones on rank 0
    ends = {segs[j]: j for j in range(len(segs))
            if offs[rank] + bounds[j + 1] in cuset}
    rows = {k: [] for k in names}
    for i in range(n_seq):
        for k in names:
            if i in ends:
                rows[k].append(local[ends[i]][k].to(sdt))
            elif rank == 0 and cu[i] == cu[i + 1]:
                rows[k].append(init_row(k, i))
            else:
                rows[k].append(zero(k))
    # tied to the first gather: its backward (collective) runs after this one's, everywhere
    flat = _tie(torch, torch.cat([stack(k, rows[k]).reshape(-1) for k in names]), gathered)
    gathered2 = _gather(torch, dist, flat, group)
    total = sum(gathered2)
    # the outputs tied to the second gather: on every rank, whichever of the outputs and
    # final states the loss reads, both backward collectives run, the second's first
    out = _tie_out(torch, out, gathered2)
    final, at = {}, 0
    for k in names:
        shape = stack(k, [zero(k)] * n_seq).shape
        n = _prod(shape)
        final[k] = total[at:at + n].reshape(shape)
        at += n
    return out, (final[names[0]] if len(names) == 1 else final)


__all__ = ["cp_call", "cp_varlen_call", "summary_recurrence", "summary_dims", "identity_state", "apply_summary"]
