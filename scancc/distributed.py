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
    cache = kernel.__dict__.setdefault("_cp_plans", {})
    key = (id(rec), tuple(sorted((k, v) for k, v in sizes.items() if k != rec.time)))
    cp = cache.get(key)
    if cp is None:
        cp = cache[key] = _Plan(kernel, rec, sizes)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = inputs[rec.inputs[0].name]
    sdt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    names = [s.name for s in rec.states]
    init = None
    if initial_state is not None:
        init = initial_state if isinstance(initial_state, Mapping) else {names[0]: initial_state}
        init = {k: torch.as_tensor(v).to(device=ref.device, dtype=sdt) for k, v in init.items()}

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
    if rank == 0:
        out = out0
    else:
        out = kernel(*args, initial_state=enter, output_final_state=False, **kwargs)
    if not output_final_state:
        return out
    return out, (final[names[0]] if len(names) == 1 else final)


__all__ = ["cp_call", "summary_recurrence", "summary_dims", "identity_state", "apply_summary"]
