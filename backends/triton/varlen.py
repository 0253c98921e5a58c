"""Packed variable-length batches on Triton: the recurrent kernel with one program per
(sequence, grid index, block of the state).

The semantics are scancc/ir/segments.py's: every state resets at each boundary of
``cu_seqlens``. Here the reset is structural, as in flash-linear-attention's varlen kernels:
program n of the batch grid axis runs steps ``[cu[n], cu[n+1])`` only, starting from zero or
``initial_state[n]`` and storing its final state to ``final[n]``, so no value of one sequence
is ever read by another (a NaN in sequence n-1 cannot reach sequence n) and the N sequences
run in parallel. Inputs and outputs are indexed at batch 0 (batch is 1); the initial and final
states at batch n. Ring buffers (shift, companion) keep the recurrent kernel's global
phase; a sequence's initial state is loaded rotated to it. Everything else, every transition kind and op, is the recurrent lowering unchanged
(this is a subclass of it: the reset is in one place, the step emitter is shared).

The chunked, staged and scan algorithms have no varlen form yet: a packed call with one of
them selected runs this kernel (docs/serving.md).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from scancc.ir import Recurrence, format_recurrence

from ..base import RunResult, UnsupportedError, run_varlen_by_sequence
from . import recurrent
from .emit import Env, Idx
from .plan import unsupported


class Lowering(recurrent.Lowering):
    algorithm = "recurrent_varlen"

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        batch = [d.name for d in self.rec.dims if d.role == "batch"]
        if not batch or not self.plan.grid or self.plan.grid[0] != batch[0]:
            raise unsupported(self.rec, "packed varlen: the batch dim is not the first grid dim")
        self.batch = batch[0]
        self.cu = self.names.new("cu_seqlens")
        self.bos, self.eos = self.names.new("bos"), self.names.new("eos")
        self.t_first = self.bos

    def _base_env(self) -> dict[str, Idx]:
        base = super()._base_env()
        base[self.batch] = Idx("0", None, None)  # inputs and outputs: batch 1
        return base

    def _seq_env(self, env: Env) -> Env:
        """``env`` with the batch dim at the program's sequence (initial and final states)."""
        return env.with_(self.batch, Idx(self.pid[self.batch], None, None))

    def _program_ids(self) -> list[str]:
        n = self.pid[self.batch]
        return super()._program_ids() + [
            f"{self.bos} = tl.load({self.cu} + {n}).to(tl.int64)  # sequence {n}: its steps",
            f"{self.eos} = tl.load({self.cu} + {n} + 1).to(tl.int64)"]

    def _ring_env(self, env: Env, count: str, tvar: bool) -> Env:
        # ring slots keep the global phase (the slot written at step t is t mod W, as in the
        # recurrent kernel): after the sequence's last step, eos insertions; its initial
        # state is loaded rotated by bos (init_states)
        if not tvar and count != self.bos:
            count = self.eos
        return super()._ring_env(env, count, tvar)

    def init_states(self, base: Env) -> list[str]:
        env = self._seq_env(base)
        if self.plan.rings:  # logical slot l of the initial state goes to physical (l+bos)%W
            env = self._ring_env(env, self.bos, False)
        return super().init_states(env)

    def final_states(self, fenv: Env) -> list[str]:
        return super().final_states(self._seq_env(fenv))

    def time_loop(self) -> str:
        return f"for i_t in range({self.bos}, {self.eos}):"

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


_COMPILED: dict = {}


def _compiled(rec: Recurrence, options: Mapping[str, Any], dtypes: tuple[str, ...]):
    """(lowering, launcher) of the varlen kernel, cached per (IR, options, dtypes); None where
    the recurrent lowering does not take packed batches (then: one run per sequence)."""
    from . import runtime
    okey = (id(rec), tuple(sorted((k, repr(v)) for k, v in options.items())), dtypes)
    hit = _COMPILED.get(okey)
    if hit is not None and hit[0] is rec:
        return hit[1]
    try:
        low = Lowering(rec, options)
        source = low.render()
    except UnsupportedError:
        val = None
    else:
        src_opts = {"blocked": tuple(sorted(options.get("block_sizes") or {}))}
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
    """``TritonBackend.run_varlen``: the varlen kernel (any algorithm option: the chunked
    forms have no varlen kernel yet), else one run per sequence."""
    import numpy as np
    import torch

    from . import runtime
    runtime.prepare()
    args = [inputs[x.name] for x in rec.inputs]
    dtypes = tuple(str(a.dtype).replace("torch.", "") for a in args)
    opts = {k: v for k, v in options.items() if k in ("block_sizes",)}
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
