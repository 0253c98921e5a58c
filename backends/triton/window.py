"""The window algorithm: parallel in time for recurrences whose every state is a shift
register (``shift`` transitions whose injected term reads no state: fir, swa, bmojo_f). Such
a state has no feedback: after step t its slot j holds the injected term of step
t - W + 1 + j (or, for the first W - 1 steps, a slot of the initial state), so every output
depends only on the last W steps' inputs and the state can be rebuilt anywhere from W - 1
steps of inputs.

One launch, programs over (grid index, block of the state, time block): the program of time
block c runs the recurrent kernel's step (recurrent.py, every op and layout by the one
emitter) over steps t_start .. t_end - 1, t_start = c * CHUNK, after a **warm-up** loop that
replays the ``halo`` = max(W) - 1 steps before the block (t_warm = max(t_start - halo, 0) ..
t_start - 1) with the transitions only (no readout, no store). From a zero state those
steps fill every slot the block's first readout reads (the one slot they leave is the oldest,
dropped by the block's first step); the block starting at t_warm = 0 starts from the initial
state instead, as the recurrent kernel does. So every program computes exactly the recurrent
kernel's states for its block: outputs, NaN propagation (a NaN input is in the slots of the
W steps whose window holds it, nowhere else) and the final state (stored by the program of
the last block, t_end = T) are the recurrent kernel's. Inside a block the steps run in order
(the state is W slots in registers); the blocks, the grid and the state blocks run in
parallel.

Cost: each block reads halo extra steps of the injected inputs: a fraction halo / CHUNK, at
most 1/4 by the launcher's rule (``BLOCK_RULE``): one block (the recurrent kernel, no warm-up)
when the recurrent grid already has >= 2 programs per SM; else the largest power of two in
[max(16, 4 * halo), max(1024, 4 * halo)] that still gives >= 4 programs per SM (fewer,
longer blocks than the scan's 8 per SM: no carry stage to shorten, and wave quantization
costs more than it gains in sm_90's offline model, docs/performance/triton.md).
``block_sizes={<time dim>: L}`` fixes the block length.

``applies`` needs every state a shift (no feedback: a companion, selection or decayed state
carries information from all of the past) whose injected term reads no state (a cascade of
windows would widen the halo) — the reason string says which state fails.
"""
from __future__ import annotations

from scancc.ir import Kind, Recurrence

from . import scan
from .emit import Env

BLOCK_RULE = '''\
_WINDOW_SMS = {}


def window_block_length(programs, steps, halo, device):
    """Steps per time block of the window form for a grid of ``programs`` programs per
    block over ``steps`` steps, each block replaying the ``halo`` steps before it: all steps
    in one block (the recurrent kernel) when that grid already has >= 2 programs per SM;
    else the largest power of two in [max(16, 4 * halo), max(1024, 4 * halo)] that still
    gives >= 4 programs per SM (132 SMs assumed without a GPU: the CPU interpreter)."""
    sms = _WINDOW_SMS.get(device)
    if sms is None:
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
        _WINDOW_SMS[device] = sms
    if programs >= 2 * sms:
        return max(steps, 1)
    low = max(16, 1 << (4 * halo - 1).bit_length()) if halo > 0 else 16
    block = max(1024, low)
    while block > low and programs * -(-steps // block) < 4 * sms:
        block //= 2
    return block
'''


def block_length(programs: int, steps: int, halo: int, device=None) -> int:
    """The generated launcher's time block (``BLOCK_RULE``); ``device`` None: the CPU."""
    import torch
    env = {"torch": torch}
    exec(BLOCK_RULE, env)
    return env["window_block_length"](programs, steps, halo, device or torch.device("cpu"))


def applies(rec: Recurrence) -> tuple[bool, str]:
    """(True, "") if every state is a shift register fed by no state (each output then
    depends on a bounded window of inputs); else (False, the first state that is not)."""
    if not rec.states:
        return False, "no state (nothing to window)"
    for s in rec.states:
        if s.transition.kind is not Kind.SHIFT:
            return False, (f"state {s.name!r} has a {s.transition.kind.value} transition (the "
                           "window form needs shift registers only: no feedback)")
        if rec.uses_state(s.inject):
            return False, (f"state {s.name!r}: its injected term reads a state (the window "
                           "form needs inputs-only shift registers)")
    return True, ""


def auto(rec: Recurrence) -> bool:
    """Whether ``"auto"`` picks the window form: where it applies, on a GPU (the launcher
    still runs one block, the recurrent kernel, when the grid fills the GPU without time
    blocks: decode and large batches)."""
    return applies(rec)[0] and scan.on_gpu()


def lowering(rec: Recurrence, options):
    """The window Lowering for ``rec`` (raises UnsupportedError where it does not apply)."""
    from ..base import UnsupportedError
    ok, why = applies(rec)
    if not ok:
        raise UnsupportedError("triton", rec.name, f"algorithm='window': {why}")
    return Lowering(rec, options)


def _guard(lines: list[str], header: str, cond: str) -> list[str]:
    """``lines`` with the block under the line ``header`` (indented 4) nested in ``if cond:``."""
    out, inside = [], False
    for ln in lines:
        if inside and ln.startswith("    "):
            out.append("    " + ln)
            continue
        inside = ln == header
        out.append(ln)
        if inside:
            out.append(f"    if {cond}:")
    return out


class Lowering(scan._Chunked):
    """The window kernel (program axis 2: the time block) and its one-launch launcher."""
    algorithm = "window"

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        self.t_warm = self.names.new("t_warm")
        self.t_first = self.t_warm  # walking pointers start at the warm-up's first step
        self.rings = [s.transition.axis for s in self.rec.states]
        self.rings = list(dict.fromkeys(self.rings))

    def make_names(self):
        n = super().make_names()
        n.used |= {"window_block_length", "_WINDOW_SMS"}
        return n

    def _halo(self, size) -> str:
        """max(W) - 1 over the shift axes, with ``size`` naming each axis's size."""
        ws = [size[w] for w in self.rings]
        return f"{ws[0]} - 1" if len(ws) == 1 else f"max({', '.join(ws)}) - 1"

    def _program_ids(self) -> list[str]:
        head = super()._program_ids()
        starts = [f"{self.t_start} - ({self.size[w]} - 1)" for w in self.rings]
        first = starts[0]
        for s in starts[1:]:
            first = f"tl.minimum({first}, {s})"
        return head + [f"{self.t_warm} = tl.maximum({first}, 0)"]

    def emit_outputs(self, env: Env) -> None:
        self._n_transition = len(self.body)  # the warm-up replays the body up to here
        super().emit_outputs(env)

    def render_kernel(self) -> list[str]:
        lines = super().render_kernel()
        i = lines.index(self.time_loop())
        warm = ["# warm-up: the halo steps before the block, states only (from h0 at t = 0)",
                f"for i_t in range({self.t_warm}, {self.t_start}):"]
        warm += ["    " + ln for ln in self.body[:self._n_transition] + self.step]
        return lines[:i] + warm + ["# the block: states and outputs"] + lines[i:]

    def init_states(self, base: Env) -> list[str]:
        lines = super().init_states(base)
        for s in self.rec.states:  # only the block that starts at step 0 reads h0
            lines = _guard(lines, f"if {self.use_h0[s.name]}:", f"{self.t_warm} == 0")
        return lines

    def final_states(self, fenv: Env) -> list[str]:
        # the program of the last block holds the final state
        return _guard(super().final_states(fenv), f"if {self.store_ht}:",
                      f"{self.t_last} == {self.size[self.rec.time]}")

    def launch(self, g0: str, g1: str, final: str, warps: str) -> list[str]:
        rec, N = self.rec, self.names
        T = self.size[rec.time]
        params, consts = self.signature()
        sizes = [self.size[d] for d in self.const_sizes()] + [self.block[d]
                                                               for d in self.plan.regs]
        chunk, nc = N.new("chunk"), N.new("n_blocks")
        lines = [f"    grid = ({g0}, {g1})",
                 f'    {chunk} = {self.names_blocks}.get("{rec.time}") or '
                 f"window_block_length(grid[0] * grid[1], {T}, {self._halo(self.size)}, "
                 f"{self.arg[rec.inputs[0].name]}.device)",
                 f"    {nc} = max(-(-{T} // {chunk}), 1)",
                 f"    {self.kernel_name}[grid + ({nc},)]("]
        args = params[:-1] + [chunk] + sizes
        args += [f"{self.h0[s.name]} is not None" for s in rec.states] + [final]
        lines += [f"        {a}," for a in args]
        lines += [f"        num_warps={warps},", "    )"]
        return lines

    def compile_args(self, sizes: dict, dtype: str) -> tuple[dict, dict]:
        sig, const = super().compile_args(sizes, dtype)
        sig[self.chunk] = "i32"
        return sig, const

    def render(self) -> str:
        if hasattr(self, "_source"):
            return self._source
        from . import recurrent
        kernel = self.render_kernel_def()
        launcher = self.render_launcher()
        self._source = "\n\n".join([recurrent.module_header(self.ir, self.algorithm), kernel,
                                    BLOCK_RULE, launcher])
        return self._source


__all__ = ["Lowering", "applies", "auto", "lowering", "block_length", "BLOCK_RULE"]
