"""The decode step: one time step of a recurrence as its own kernel, the state updated in place.

``StepLowering`` is the recurrent lowering (recurrent.py) rendered without its time loop:
the same program grid, the same per-step body (input loads, transition rules, readouts),
then the state stored back where it was read (``h0`` and ``ht`` are the same buffer; every
program reads and writes only its own block of the state, so the update is in place). The
launcher takes the step's inputs with a time dim of size 1 (views the caller adds), the
float32 states, and allocates only the outputs: no initial-state dict, no final-state
buffers, no autotuning. ``Kernel.step`` (scancc/_step.py) calls it.
"""
from __future__ import annotations

from typing import Any, Mapping

from scancc.ir import Recurrence, format_recurrence

from .emit import Idx
from .recurrent import Lowering, module_header

__all__ = ["StepLowering", "step_launcher"]


class StepLowering(Lowering):
    algorithm = "step"

    def __init__(self, rec: Recurrence, options, indexed: bool = False):
        """``indexed``: the states are rows of a larger pool, picked by an int tensor
        ``state_indices`` [batch] (continuous batching): the program of batch row b reads and
        writes pool row ``state_indices[b]``."""
        super().__init__(rec, options)
        self.indexed = indexed
        # in place where the programs own disjoint parts of the state: the state has every
        # grid and split dim. Else (swa's `valid` [B, W], read by every head's program) the
        # programs write a separate buffer, copied into the state after the launch
        owned = set(self.plan.grid) | set(self.plan.split)
        self.inplace = {s.name: owned <= set(s.dims) for s in rec.states}
        if indexed:
            self.bdim = rec.states[0].dims[0]
            if self.bdim not in self.plan.grid or any(s.dims[0] != self.bdim
                                                      for s in rec.states):
                raise ValueError(f"{rec.name}: state_indices needs every state's first dim "
                                 "to be the batch dim, one program per batch row")
            self.idx_arg = self.names.new("state_indices")
            self.slot = self.names.new("i_slot")

    def _slot_env(self, env):
        """``env`` with the batch index of the state pool: ``state_indices[batch]``."""
        return env.with_(self.bdim, Idx(self.slot, None, None))

    def init_states(self, base) -> list[str]:
        if not self.indexed:
            return super().init_states(base)
        return ([f"{self.slot} = tl.load({self.idx_arg} + {self.pid[self.bdim]}).to(tl.int64)"]
                + super().init_states(self._slot_env(base)))

    def final_states(self, fenv) -> list[str]:
        """Stores of the stepped states: in place (the pool row ``state_indices[b]`` when
        indexed), or into the separate buffer ``ht`` (batch row b) of a shared state."""
        fin = [f"if {self.store_ht}:"]
        for s in self.rec.states:
            env = self._slot_env(fenv) if self.indexed and self.inplace[s.name] else fenv
            ptr, mask = self.pointer(self.ht[s.name], s.dims, env, None, block=True)
            m = f", mask={mask}" if mask else ""
            p = self.names.ir("p_", self.ht[s.name])
            fin.append(f"    {p} = {ptr}")
            fin.append(f"    tl.store({p}, {self.state_var[s.name]}{m})")
        return fin

    def signature(self) -> tuple[list[str], list[str]]:
        params, consts = super().signature()
        if self.indexed:  # after the state pointers
            at = params.index(self.ht[self.rec.states[-1].name]) + 1
            params = params[:at] + [self.idx_arg] + params[at:]
        return params, consts

    def render_kernel(self) -> list[str]:
        lines = super().render_kernel()
        loop = lines.index(self.time_loop())
        n_body, n_step = len(self.body), len(self.step)
        body = [ln[4:] for ln in lines[loop + 1:loop + 1 + n_body]]
        # one step: i_t = 0, no loop; the pointer increments of the next step are dropped
        return (lines[:loop] + ["i_t = 0  # the one step (decode): no time loop"] + body
                + lines[loop + 1 + n_body + n_step:])

    def render_launcher(self) -> str:
        rec, P, N = self.rec, self.plan, self.names
        ins = [self.arg[i.name] for i in rec.inputs]
        states = {s.name: N.ir("state_", s.name) for s in rec.states}
        blocks, warps = N.new("block_sizes"), N.new("num_warps")
        first = ins[0]
        idx = [self.idx_arg] if self.indexed else []
        lines = [f"def {self.launcher_name}({', '.join(ins)}, "
                 f"{', '.join([*states.values(), *idx])}, {blocks}=None, {warps}=4):",
                 f'    """One step of {self.kernel_name}: inputs in their declared layouts with',
                 "    a time dim of size 1; each state a contiguous float32 tensor, updated in",
                 '    place. Returns the outputs by name (time dim of size 1)."""']
        if self.indexed:
            lines[3:3] = ["    The states are pools: batch row b steps pool row state_indices[b]."]
        lines += self.launcher_prologue(ins, blocks)
        for d in P.regs:
            if d in P.split:
                lines.append(f'    {self.block[d]} = {blocks}.get("{d}", '
                             f"{self.block_default(d)})")
                for g in self.grouped.get(d, []):
                    per = f"({self.size[d]} // {self.size[g]})"
                    lines.append(f"    {self.block[d]} = min({self.block[d]}, {per} & -{per})"
                                 "  # a block never straddles two groups")
            else:
                lines.append(f"    {self.block[d]} = {self.block_default(d)}")
        dev = f"{first}.device"
        for o in rec.outputs:
            shape = ", ".join(self.size[d] for d in o.dims)
            comma = "," if len(o.dims) == 1 else ""
            if o.name in self.summed:  # summed into by several programs: zeros, float32
                lines.append(f"    {self.arg[o.name]} = torch.zeros(({shape}{comma}), "
                             f"dtype=torch.float32, device={dev})")
            else:
                lines.append(f"    {self.arg[o.name]} = torch.full(({shape}{comma}), "
                             f'float("nan"), dtype={first}.dtype, device={dev})')
        copies = []
        for s in rec.states:  # read and written in place, or written apart and copied
            if self.inplace[s.name]:
                lines.append(f"    {self.h0[s.name]} = {self.ht[s.name]} = {states[s.name]}")
                continue
            shape = ", ".join(self.size[d] for d in s.dims)
            comma = "," if len(s.dims) == 1 else ""
            lines.append(f"    {self.h0[s.name]} = {states[s.name]}")
            lines.append(f"    {self.ht[s.name]} = torch.empty(({shape}{comma}), "
                         f"dtype=torch.float32, device={dev})  # read by several programs")
            copies.append(f"    {states[s.name]}.index_copy_(0, {self.idx_arg}, "
                          f"{self.ht[s.name]})" if self.indexed else
                          f"    {states[s.name]}.copy_({self.ht[s.name]})")
        g0 = " * ".join(self.size[d] for d in P.grid) or "1"
        g1 = " * ".join(f"-(-{self.size[d]} // {self.block[d]})" for d in P.split) or "1"
        lines += self._launch_step(g0, g1, warps) + copies
        outs = ", ".join(f'"{o.name}": {self.arg[o.name]}' + (
            f".to({first}.dtype)" if o.name in self.summed else "") for o in rec.outputs)
        lines.append(f"    return {{{outs}}}")
        return "\n".join(lines) + "\n"

    def _launch_step(self, g0: str, g1: str, warps: str) -> list[str]:
        rec, P = self.rec, self.plan
        params, _ = self.signature()
        args = params[:]
        args += [self.size[d] for d in self.const_sizes()] + [self.block[d] for d in P.regs]
        args += ["True" for _ in rec.states] + ["True"]  # read the state, store it back
        return ([f"    {self.kernel_name}[({g0}, {g1})]("] + [f"        {a}," for a in args]
                + [f"        num_warps={warps},", "    )"])

    def render(self) -> str:
        if hasattr(self, "_source"):
            return self._source
        kernel = self.render_kernel_def()
        launcher = self.render_launcher()
        self._source = (module_header(self.ir, self.algorithm) + "\n\n" + kernel + "\n\n"
                        + launcher)
        return self._source


def _quiet(fn):
    import functools

    import numpy as np

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)
    return launcher


_LAUNCHERS: dict[tuple, tuple[Recurrence, Any]] = {}


def step_launcher(rec: Recurrence, options: Mapping[str, Any], dtypes: tuple[str, ...],
                  indexed: bool = False):
    """The loaded step launcher of ``rec`` (cached per IR object, options, dtypes and
    ``indexed``: states as pools picked by ``state_indices``). Raises ValueError where
    ``indexed`` does not apply (the state's first dim not the batch grid dim)."""
    from . import runtime
    from ..base import freeze
    key = (id(rec), freeze(dict(options)), dtypes, indexed)
    hit = _LAUNCHERS.get(key)
    if hit is not None and hit[0] is rec:
        return hit[1]
    runtime.prepare()
    opts = {k: v for k, v in options.items() if k in ("block_sizes", "num_warps")}
    low = StepLowering(rec, opts, indexed)
    source = low.render()
    src_opts = {"blocked": tuple(sorted(opts.get("block_sizes") or {})), "indexed": indexed}
    mod = runtime.load(runtime.cache_key(format_recurrence(rec), low.algorithm, src_opts,
                                         tuple(dtypes)), source)
    fn = getattr(mod, low.launcher_name)
    if not runtime.has_gpu():  # padded lanes may compute 0/0 in the interpreter (as run())
        fn = _quiet(fn)
    if len(_LAUNCHERS) >= 1024:
        _LAUNCHERS.clear()
    _LAUNCHERS[key] = (rec, fn)
    return fn
