"""Packed variable-length batches on Triton: the recurrent and the fused chunked kernels
with one program per (sequence, grid index, block of the state).

The semantics are scancc/ir/segments.py's: every state resets at each boundary of
``cu_seqlens``. Here the reset is structural, as in flash-linear-attention's varlen kernels:
program n of the batch grid axis runs steps ``[cu[n], cu[n+1])`` only, starting from zero or
``initial_state[n]`` and storing its final state to ``final[n]``, so no value of one sequence
is ever read by another (a NaN in sequence n-1 cannot reach sequence n) and the N sequences
run in parallel. Inputs and outputs are indexed at batch 0 (batch is 1); the initial and final
states at batch n (``VarlenMixin``, shared by both kernels).

- ``Lowering``: the recurrent lowering (every transition kind and op, the same step emitter)
  looping ``for i_t in range(bos, eos)``. Ring buffers (shift, companion) keep the recurrent
  kernel's global phase; a sequence's initial state is loaded rotated to it.
- ``ChunkedLowering``: the fused chunked kernel (chunked.py) with each sequence's chunks
  starting at its ``bos``, so no chunk straddles a boundary, and its ragged last chunk masked
  at ``eos`` exactly as a call's last chunk is masked at T.

The staged form (three launches) and the scan form have no packed variant: a packed call with
``algorithm="staged"`` runs the fused chunked one, ``"scan"`` the recurrent one
(docs/serving.md).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from scancc.ir import Recurrence, format_recurrence

from ..base import RunResult, UnsupportedError, run_varlen_by_sequence
from . import chunked, recurrent
from .emit import Env, Idx
from .plan import unsupported


class VarlenMixin:
    """What every packed kernel shares: the batch grid axis over the N sequences (``bos``,
    ``eos`` read from ``cu_seqlens``), inputs and outputs at batch 0, the initial and final
    states at the program's sequence, and the launcher's ``cu_seqlens`` argument."""

    def _varlen_init(self):
        batch = [d.name for d in self.rec.dims if d.role == "batch"]
        if not batch or not self.plan.grid or self.plan.grid[0] != batch[0]:
            raise unsupported(self.rec, "packed varlen: the batch dim is not the first grid dim")
        self.batch = batch[0]
        self.cu = self.names.new("cu_seqlens")
        self.bos, self.eos = self.names.new("bos"), self.names.new("eos")

    def _base_env(self) -> dict[str, Idx]:
        base = super()._base_env()
        base[self.batch] = Idx("0", None, None)  # inputs and outputs: batch 1
        return base

    def pointer(self, arr: str, dims, env: Env, t_index, block: bool = False,
                time_env: bool = False):
        if arr in self.h0.values() or arr in self.ht.values():  # states: at the sequence
            env = env.with_(self.batch, Idx(self.pid[self.batch], None, None))
        return super().pointer(arr, dims, env, t_index, block, time_env)

    def _program_ids(self) -> list[str]:
        n = self.pid[self.batch]
        return super()._program_ids() + [
            f"{self.bos} = tl.load({self.cu} + {n}).to(tl.int64)  # sequence {n}: its steps",
            f"{self.eos} = tl.load({self.cu} + {n} + 1).to(tl.int64)"]

    def signature(self) -> tuple[list[str], list[str]]:
        params, consts = super().signature()
        return params + [self.cu], consts

    def render_launcher(self) -> str:
        text = super().render_launcher()
        lines = text.split("\n")
        # the launcher takes cu_seqlens; the batch grid axis and the final states have N
        lines[0] = re.sub(r"\):$", f", {self.cu}=None):", lines[0])
        at = next(i for i, ln in enumerate(lines)
                  if re.fullmatch(r"    (\w*initial_state\w*) = \1 or \{\}", ln))
        B = self.size[self.batch]
        n_seq = self.names.new("N_SEQ")
        for i in range(at, len(lines)):  # the final states and the grid: N, not batch 1
            if "torch.full(" in lines[i] or lines[i].startswith("    grid = ("):
                lines[i] = re.sub(rf"\b{B}\b", n_seq, lines[i])
        lines[at:at] = [f"    {n_seq} = {self.cu}.shape[0] - 1  # N sequences: the final "
                        "states' batch and the grid's",
                        f"    {self.cu} = {self.cu}.to(device={self.arg[self.rec.inputs[0].name]}"
                        ".device, dtype=torch.int64).contiguous()"]
        return "\n".join(lines)


class Lowering(VarlenMixin, recurrent.Lowering):
    """The recurrent kernel, packed: program n loops over ``range(bos, eos)``."""
    algorithm = "recurrent_varlen"

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        self._varlen_init()
        self.t_first = self.bos

    def _ring_env(self, env: Env, count: str, tvar: bool) -> Env:
        # ring slots keep the global phase (the slot written at step t is t mod W, as in the
        # recurrent kernel): after the sequence's last step, eos insertions; its initial
        # state is loaded rotated by bos (init_states)
        if not tvar and count != self.bos:
            count = self.eos
        return super()._ring_env(env, count, tvar)

    def init_states(self, base: Env) -> list[str]:
        if self.plan.rings:  # logical slot l of the initial state goes to physical (l+bos)%W
            base = self._ring_env(base, self.bos, False)
        return super().init_states(base)

    def time_loop(self) -> str:
        return f"for i_t in range({self.bos}, {self.eos}):"


class ChunkedLowering(VarlenMixin, chunked.Lowering):
    """The fused chunked kernel, packed: program n's chunks start at its ``bos`` (as fla's
    varlen chunked kernels), so no chunk straddles a boundary; the ragged last chunk of each
    sequence is masked at ``eos`` as the last chunk of a call is masked at T (padded rows:
    no decay, zero factors)."""
    algorithm = "chunked_varlen"

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        self._varlen_init()

    def render_kernel(self) -> list[str]:
        lines = super().render_kernel()
        T, BT = self.rec.time, self.block[self.rec.time]
        size_t = dict.__getitem__(self.size, T)
        subs = {
            f"{self.off[T]} = i_c * {BT} + ": f"{self.off[T]} = {self.bos} + i_c * {BT} + ",
            f"{self.msk[T]} = {self.off[T]} < {size_t}": f"{self.msk[T]} = {self.off[T]} < "
                                                         f"{self.eos}",
            f"for i_c in range(0, tl.cdiv({size_t}, {BT})):":
                f"for i_c in range(0, tl.cdiv({self.eos} - {self.bos}, {BT})):",
        }
        out, hit = [], set()
        for ln in lines:
            for a, b in subs.items():
                if a in ln:
                    ln = ln.replace(a, b)
                    hit.add(a)
            out.append(ln)
        if len(hit) != len(subs):  # the chunked kernel changed shape: not packed here
            raise unsupported(self.rec, "packed varlen: the chunked kernel's time loop")
        return out


_COMPILED: dict = {}


def choose(rec: Recurrence, options: Mapping[str, Any]) -> list[type]:
    """The packed lowerings to try, in order, for the ``algorithm`` option: the fused chunked
    kernel for chunked/staged/auto where the chunked form applies, else the recurrent one."""
    algo = options.get("algorithm", "auto")
    if algo in ("chunked", "staged", "auto") and chunked.applies(rec)[0]:
        return [ChunkedLowering, Lowering]
    return [Lowering]


def _compiled(rec: Recurrence, options: Mapping[str, Any], dtypes: tuple[str, ...]):
    """(lowering, launcher) of the packed kernel, cached per (IR, options, dtypes); None where
    no packed lowering takes the recurrence (then: one run per sequence)."""
    from . import runtime
    okey = (id(rec), tuple(sorted((k, repr(v)) for k, v in options.items())), dtypes)
    hit = _COMPILED.get(okey)
    if hit is not None and hit[0] is rec:
        return hit[1]
    low = None
    for cls in choose(rec, options):
        try:
            low = cls(rec, options)
            source = low.render()
            break
        except UnsupportedError:
            low = None
    if low is None:
        val = None
    else:
        src_opts = {k: v for k, v in options.items() if k in ("dot_precision",)}
        src_opts["blocked"] = tuple(sorted(options.get("block_sizes") or {}))
        key = runtime.cache_key(format_recurrence(rec), low.algorithm, src_opts, dtypes)
        mod = runtime.load(key, source)
        val = (low, getattr(mod, low.launcher_name))
    if len(_COMPILED) >= 256:
        _COMPILED.clear()
    _COMPILED[okey] = (rec, val)
    return val


def run(backend, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
        initial_state: Mapping[str, Any] | None, output_final_state: bool,
        options: Mapping[str, Any], cu: tuple[int, ...]) -> RunResult:
    """``TritonBackend.run_varlen``: the packed chunked kernel (algorithm chunked, staged or
    auto, where the chunked form applies) or the packed recurrent kernel (any other), else
    one run per sequence."""
    import numpy as np
    import torch

    from . import runtime
    runtime.prepare()
    args = [inputs[x.name] for x in rec.inputs]
    dtypes = tuple(str(a.dtype).replace("torch.", "") for a in args)
    opts = {k: v for k, v in options.items()
            if k in ("block_sizes", "algorithm", "dot_precision")}
    got = _compiled(rec, opts, dtypes)
    if got is None:
        return run_varlen_by_sequence(backend, rec, inputs, sizes, initial_state,
                                      output_final_state, options, cu)
    low, launcher = got
    for i, x in enumerate(rec.inputs):  # restore optional dims left out (size 1)
        if args[i].dim() != len(x.dims):
            a = args[i]
            for ax, d in enumerate(x.dims):
                if d in x.optional_dims:
                    a = a.unsqueeze(ax)
            args[i] = a
    if runtime.has_gpu():
        dev = runtime.device()
        args = [a.to(dev) for a in args]
        if initial_state:
            initial_state = {k: v.to(dev) for k, v in initial_state.items()}
    cu_t = torch.tensor(cu, dtype=torch.int64, device=args[0].device)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        outs, finals = launcher(*args, initial_state or None, bool(output_final_state),
                                options.get("block_sizes"), options.get("num_warps") or 4,
                                cu_t)
    return RunResult(outs, finals, {"algorithm": low.algorithm,
                                    "interpreted": not runtime.has_gpu()})
