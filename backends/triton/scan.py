"""The scan algorithm: the recurrent kernel made parallel in time by chunks, for recurrences
whose every state has a state-independent elementwise transition (identity, scalar or
diagonal: mamba's S6, s4d, hgrn, ...). The recurrent kernel runs one program per (grid
index, block of the state), each walking all T steps: at B=1 that can be a few dozen
programs on a GPU of 132 SMs. With chunks of L steps (c = 0 .. NC-1) and the state entering
chunk c written h_in[c]:

- stage 1 (``<name>_scan_local_kernel``, programs x chunks): run chunk c's steps from a zero
  state; store its end state hloc[c] and the product of its decays P[c] (per state element,
  float32 buffers [NC, *state dims]). No outputs.
- stage 2 (``<name>_scan_carry_kernel``, sequential over chunks, parallel over blocks of the
  flattened state): h_in[0] = h0 (or 0), h_in[c + 1] = P[c] * h_in[c] + hloc[c], written in
  place of hloc[c]; h_in[NC] is the final state.
- stage 3 (``<name>_scan_fwd_kernel``, programs x chunks): rerun chunk c from h_in[c] and
  store its outputs. With one chunk (L >= T) it is the recurrent kernel, run alone.

Stages 1 and 3 are the recurrent Lowering (recurrent.py) with a time range per program
(``t_first``, ``time_loop``), the state entering the chunk (``init_states``) and, for stage 1,
the decay product instead of the outputs (``emit_transition``, ``emit_outputs``,
``final_states``): every op, optional input, group and layout is lowered by the one emitter.

Edge semantics are the reference's: a product of decays is exact about zeros (a decay of 0 at
step t makes P[c] = 0, so h_in[c + 1] = hloc[c], a hard reset) and NaN (a NaN decay or term
at step t makes hloc[c] and P[c] NaN, so every later chunk is NaN, while stage 3 reruns chunk
c from a finite h_in[c], NaN from step t on). One difference: P[c] overflows to inf when
decays > 1 compound past float32's range within a chunk, where the sequential product need
not (then inf * 0 = NaN if h_in[c] is exactly 0).

The chunk length (launcher): ``block_sizes={<time dim>: L}`` (a power of two), else
``scan_chunk_length`` in the generated module (see ``CHUNK_RULE``), with a floor of
``AUTO_MIN_STEPS`` steps when ``"auto"`` chose the scan.
"""
from __future__ import annotations

from scancc.ir import Kind, Op, Recurrence

from . import recurrent
from .emit import Env, simple
from .names import Names
from .rules import _shared

KINDS = (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL, Kind.COMPANION)

# the launcher's rule for the chunk length, emitted verbatim into the generated module (so a
# cached module runs alone) and executed here for the tests (``chunk_length``)
CHUNK_RULE = '''\
_SCAN_SMS = {}


def scan_chunk_length(programs, steps, device, min_steps=0):
    """Steps per chunk of the scan for a recurrent grid of ``programs`` programs over
    ``steps`` steps on ``device``: all steps in one chunk (the recurrent kernel alone) when
    that grid already has >= 2 programs per SM or there are fewer than ``min_steps`` steps;
    else the largest power of two in [16, 256] that still gives the chunked stages >= 8
    programs per SM (a GPU of 132 SMs is assumed without one: the CPU interpreter)."""
    sms = _SCAN_SMS.get(device)
    if sms is None:
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
        _SCAN_SMS[device] = sms
    if programs >= 2 * sms or steps < min_steps:
        return max(steps, 1)
    chunk = 256
    while chunk > 16 and programs * -(-steps // chunk) < 8 * sms:
        chunk //= 2
    return chunk
'''


# "auto" chunks only sequences this long: shorter ones (e.g. the autograd's backward
# segments) keep one launch (a guess, not measured: two extra launches cost ~10 us)
AUTO_MIN_STEPS = 1024


# warps of stages 1 and 3 (WARPS_RULE in docs/triton.md): num_warps (the option, default 4)
# at most, and at most (register tile elements) / (32 x this): no thread under this many
# elements (a tile smaller than a warp's threads replicates work across lanes: s4d's 64-element
# state ran on 128 threads). Chosen from the offline sm_90 report (docs/performance/triton.md,
# section "scan 2026-12-01"): 32 gives mamba D2048 N16 one warp per [64, 16] tile
ELEMENTS_PER_THREAD = 32

# stage 2: elements of the flattened state per program, and its warps: many small programs
# (each a dependent chain over the chunks), not 256-element ones (mamba B1: 128 programs)
CARRY_BLOCK, CARRY_WARPS = 32, 1


def chunk_length(programs: int, steps: int, device=None, min_steps: int = 0) -> int:
    """The generated launcher's chunk length (``CHUNK_RULE``); ``device`` None: the CPU."""
    import torch
    env = {"torch": torch}
    exec(CHUNK_RULE, env)
    return env["scan_chunk_length"](programs, steps, device or torch.device("cpu"), min_steps)


def applies(rec: Recurrence) -> tuple[bool, str]:
    """(True, "") if every state's transition is elementwise and state independent (the
    IR's transition operands never read a state): identity, scalar or diagonal."""
    for s in rec.states:
        if s.transition.kind not in KINDS:
            return False, (f"state {s.name!r} has a {s.transition.kind.value} transition (the scan "
                           "composes identity, scalar, diagonal and companion transitions only)")
        if s.transition.kind is Kind.COMPANION and any(
                rec.uses_state(n) for _, n in s.transition.operands):
            return False, (f"state {s.name!r}: its companion feedback reads a state (the chunk's "
                           "transition product would depend on the state)")
    return True, ""


def auto(rec: Recurrence) -> bool:
    """Whether ``"auto"`` picks the scan: where it applies, on a GPU, and with no companion
    state (their chunk products amplify float32 rounding past the tolerance table on some
    filters, docs/triton.md: ``algorithm="scan"`` asks for it)."""
    return applies(rec)[0] and on_gpu() and not any(
        s.transition.kind is Kind.COMPANION for s in rec.states)


def _module_names(rec: Recurrence) -> dict[str, str]:
    """The module-level names of the scan module (reserved in every kernel's namespace)."""
    return {"local": f"{rec.name}_scan_local_kernel", "carry": f"{rec.name}_scan_carry_kernel",
            "matrix_carry": f"{rec.name}_scan_matrix_carry_kernel",
            "rule": "scan_chunk_length", "sms": "_SCAN_SMS", "exp": "scan_exp", "exp2": "scan_exp2",
            "os": "os", "libdevice": "libdevice"}


# exp in the scan's kernels: on a GPU, libdevice's fast_expf (x * log2(e), then one
# ex2.approx.ftz: tl.exp's float32 lowering is the same ex2.approx without ftz, which ptxas
# expands with a denormal rescale, 6 SASS instructions against 2); results differ only
# where exp(x) is below float32's smallest normal (1.2e-38), flushed to 0. The interpreter
# has no libdevice: tl.exp there. The other dtypes (float64): tl.exp.
EXP_HELPER = '''\
import os

from triton.language.extra.cuda import libdevice

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def scan_exp(x):
        return tl.exp(x)
else:
    @triton.jit
    def scan_exp(x):
        if x.dtype == tl.float32:
            return libdevice.fast_expf(x)
        else:
            return tl.exp(x)

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def scan_exp2(x):
        return tl.exp2(x)
else:
    @triton.jit
    def scan_exp2(x):
        if x.dtype == tl.float32:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.exp2(x)
'''
LOG2E = 1.4426950408889634


class _Chunked(recurrent.Lowering):
    """The recurrent kernel over one chunk of ``CHUNK`` steps per program: program axis 2 is
    the chunk, steps t_start .. min(t_start + CHUNK, T) - 1."""
    algorithm = "scan"

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        self.chunk = self.names.new("CHUNK")
        self.t_start = self.names.new("t_start")
        self.t_first = self.t_start  # where walking pointers start (window.py: earlier)
        self.t_last = self.names.new("t_end")

    def make_names(self) -> Names:
        n = Names()
        n.used |= set(_module_names(self.ir).values())
        return n

    def _program_ids(self) -> list[str]:
        return super()._program_ids() + [
            "i_c = tl.program_id(2).to(tl.int64)",
            f"{self.t_start} = i_c * {self.chunk}",
            f"{self.t_last} = tl.minimum({self.t_start} + {self.chunk}, "
            f"{self.size[self.rec.time]})"]

    def time_loop(self) -> str:
        return f"for i_t in range({self.t_start}, {self.t_last}):"

    def chunk_offset(self, s) -> str:
        """Offset of chunk i_c's slice of a [NC, *state dims] buffer of state ``s``."""
        return "i_c * " + " * ".join(self.size[d] for d in s.dims)

    def signature(self) -> tuple[list[str], list[str]]:
        params, consts = super().signature()
        return params + [self.chunk], consts


class _Arithmetic:
    """The scan's own kernels (stages 1 and 3; not window.py's, which reuses _Chunked):
    exp through the module's helpers (EXP_HELPER) and products reordered."""

    def _value(self, node, env: Env) -> str:
        tv = self.varies(node, env)
        if node.op is Op.EXP:  # EXP_HELPER: one MUFU.EX2 per element on a GPU
            x = node.src[0]
            inv = [s for s in x.src if not self.varies(s, env)] if x.op is Op.MUL else []
            if tv and len(inv) == 1 and self.parents.get(x, 0) <= 1:
                # exp(t * c), c constant in time: exp2(t * (c log2 e)), c log2 e computed once
                (t,) = [s for s in x.src if s is not inv[0]]
                k = self.bind(False, "b_log2e", f"{self.par(self.value(inv[0], env), 2)} * "
                              f"{LOG2E!r}")
                out = f"{_module_names(self.ir)['exp2']}({self.par(self.value(t, env), 2)} * {k})"
            else:
                (v,) = self._operands(node, env, "{0}")
                out = f"{_module_names(self.ir)['exp']}({v})"
            self._prec[out] = 4
            return _shared(self, node, tv, out)
        if node.op is Op.MUL and tv:
            return _shared(self, node, tv, self._product(node, env))
        return super()._value(node, env)

    def _product(self, node, env: Env) -> str:
        """A chain of products (operands read once) with the factors of fewer register dims
        multiplied first: mamba's dt * B[n] * u as (dt * u) * B[n], one multiply per state
        element instead of two (a reassociation: a different float32 rounding, not more)."""
        factors, todo = [], [node]
        while todo:
            n = todo.pop(0)
            if n.op is Op.MUL and (n is node or self.parents.get(n, 0) <= 1):
                todo[:0] = list(n.src)
            else:
                factors.append(n)
        regs = set(self.plan.regs)
        ranked = sorted(factors, key=lambda f: len(regs & set(self.rec.dims_of(f))))
        out = self.par(self.value(ranked[0], env), 2)
        for f in ranked[1:]:
            out = f"{out} * {self.par(self.value(f, env), 3)}"
        self._prec[out] = 2
        return out


class Lowering(_Arithmetic, _Chunked):
    """Stage 3 (the outputs) and the launcher of all three stages; ``self.local`` renders
    stage 1."""

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        self.local = _Local(rec, options)
        self.module = _module_names(rec)

    def initial_buffer(self, s) -> str:
        """The state entering chunk i_c: h_in[i_c] (h0 when the launcher runs one chunk)."""
        return f"{self.h0[s.name]} + {self.chunk_offset(s)}"

    def init_states(self, base: Env) -> list[str]:
        # ring buffers (companion): h_in[i_c] is in logical order, loaded at the physical
        # slots of step t_start (slot t % W is written at step t)
        return super().init_states(self._ring_env(base, self.t_start, False)
                                   if self.plan.rings else base)

    def launch(self, g0: str, g1: str, final: str, warps: str) -> list[str]:
        rec, P, N = self.rec, self.plan, self.names
        T = self.size[rec.time]
        params, consts = self.signature()
        sizes = [self.size[d] for d in self.const_sizes()] + [self.block[d] for d in P.regs]
        chunk, nc = N.new("chunk"), N.new("n_chunks")
        # chosen by "auto": long sequences only (an explicit "scan" chunks any T)
        auto = self.options.get("algorithm", "auto") == "auto"
        min_steps = f", {AUTO_MIN_STEPS}" if auto else ""
        # stages 1 and 3 (and the one-chunk kernel): at most num_warps, fewer where the
        # register tile would leave a thread under ELEMENTS_PER_THREAD elements (WARPS_RULE)
        tile = " * ".join(self.block[d] for d in P.regs) or "1"
        kw = N.new("scan_warps")
        lines = [f"    {kw} = max(1, min({warps}, ({tile}) // {32 * ELEMENTS_PER_THREAD}))",
                 f"    grid = ({g0}, {g1})",
                 f'    {chunk} = {self.names_blocks}.get("{rec.time}") or '
                 f"{self.module['rule']}(grid[0] * grid[1], {T}, {self.arg[rec.inputs[0].name]}"
                 f".device{min_steps})",
                 f"    {nc} = -(-{T} // {chunk})",
                 f"    if {nc} <= 1:  # one chunk: the recurrent kernel",
                 f"        {self.kernel_name}[grid + (1,)]("]
        args = params[:-1] + [f"max({T}, 1)"] + sizes
        args += [f"{self.h0[s.name]} is not None" for s in rec.states] + [final]
        lines += [f"            {a}," for a in args]
        lines += [f"            num_warps={kw},", "        )",
                  f"        return {self._returns(final)}"]
        # stage 1: chunk-local end states and decay products
        dev = f"{self.arg[rec.inputs[0].name]}.device"
        loc = self.local
        hloc = {s.name: N.ir("hloc_", s.name) for s in rec.states}
        prod = {s: N.ir("decay_", s) for s in loc.prod}
        for s in rec.states:
            shape = ", ".join([nc] + [self.size[d] for d in s.dims])
            # a companion state's transition product: [NC, W (its column), *state dims]
            pshape = ", ".join([nc, self.size[s.transition.axis]] + [
                self.size[d] for d in s.dims]) if s.transition.kind is Kind.COMPANION else shape
            for buf, sh in ((hloc[s.name], shape), (prod.get(s.name), pshape)):
                if buf:
                    lines.append(f"    {buf} = torch.empty(({sh}), dtype=torch.float32, "
                                 f"device={dev})")
        largs = [self.arg[i.name] for i in rec.inputs] + list(hloc.values()) + list(prod.values())
        largs += [self.size[d] for d in loc.runtime_sizes()] + [chunk] + sizes
        lines.append(f"    {loc.kernel_name}[grid + ({nc},)](")
        lines += [f"        {a}," for a in largs]
        lines += [f"        num_warps={kw},", "    )"]
        # stage 2: the state entering each chunk, in place of hloc; the final state
        for s in rec.states:
            numel = " * ".join(self.size[d] for d in s.dims)
            dec = prod.get(s.name, hloc[s.name])
            if s.transition.kind is Kind.COMPANION:
                lines += self._launch_matrix_carry(s, dec, hloc[s.name], numel, nc, final)
                continue
            lines.append(f"    {self.module['carry']}[(-(-{numel} // {CARRY_BLOCK}),)](")
            lines += [f"        {a}," for a in (
                dec, hloc[s.name], self.h0[s.name], self.ht[s.name], numel, nc, CARRY_BLOCK,
                s.name in prod, f"{self.h0[s.name]} is not None", final)]
            lines += [f"        num_warps={CARRY_WARPS},", "    )"]
        # stage 3: every chunk again from the state entering it, storing the outputs
        lines.append(f"    {self.kernel_name}[grid + ({nc},)](")
        args = params[:len(rec.inputs) + len(rec.outputs)]
        args += [hloc[s.name] for s in rec.states] + [self.ht[s.name] for s in rec.states]
        args += params[len(rec.inputs) + len(rec.outputs) + 2 * len(rec.states):-1]
        args += [chunk] + sizes + ["True" for _ in rec.states] + ["False"]
        lines += [f"        {a}," for a in args]
        lines += [f"        num_warps={kw},", "    )"]
        return lines

    def _launch_matrix_carry(self, s, dec: str, hloc: str, numel: str, nc: str,
                             final: str) -> list[str]:
        """Stage 2 of a companion state: ``h_in[c + 1] = M[c] h_in[c] + hloc[c]`` along its
        axis, one program per 64 of the other state elements."""
        w = s.transition.axis
        i = s.dims.index(w)
        inner = " * ".join(self.size[d] for d in s.dims[i + 1:]) or "1"
        W = self.size[w]
        lines = [f"    {self.module['matrix_carry']}[(-(-({numel} // {W}) // 64),)]("]
        lines += [f"        {a}," for a in (
            dec, hloc, self.h0[s.name], self.ht[s.name], numel, inner, nc, W, 64,
            f"1 << ({W} - 1).bit_length()", f"{self.h0[s.name]} is not None", final)]
        return lines + ["        num_warps=4,", "    )"]

    def compile_args(self, sizes: dict, dtype: str) -> tuple[dict, dict]:
        sig, const = super().compile_args(sizes, dtype)
        sig[self.chunk] = "i32"
        return sig, const

    def stages_compile_args(self, sizes: dict, dtype: str) -> list[tuple[str, dict, dict]]:
        """(kernel name, signature, constexprs) of stages 1, 2 and 3 for compiling them ahead
        of time at ``sizes`` (see recurrent.Lowering.compile_args)."""
        sig3, const3 = self.compile_args(sizes, dtype)  # renders the module
        loc = self.local
        ty = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[dtype]
        params, consts = loc.signature()
        size_of = {v: sizes[d] for d, v in loc.size.items()}
        sig1 = {p: "i32" if p in size_of or p == loc.chunk else
                "*fp32" if p in loc.hloc.values() or p in loc.prod.values() else ty
                for p in params}
        const1 = {}
        for c in consts:
            sig1[c] = "constexpr"
            d = next((d for d, b in loc.block.items() if b == c), None)
            const1[c] = size_of[c] if c in size_of else loc.block_size(d, sizes[d], sizes)
        sig2 = {"decay": "*fp32", "hloc": "*fp32", "h0": "*fp32", "ht": "*fp32", "NUMEL": "i32",
                "N_CHUNKS": "i32", "BLOCK": "constexpr", "HAS_DECAY": "constexpr",
                "USE_INITIAL_STATE": "constexpr", "STORE_FINAL_STATE": "constexpr"}
        const2 = {"BLOCK": CARRY_BLOCK, "HAS_DECAY": True, "USE_INITIAL_STATE": True,
                  "STORE_FINAL_STATE": True}
        carries = []
        kinds = {s.transition.kind for s in self.rec.states}
        if kinds - {Kind.COMPANION}:
            carries.append((self.module["carry"], sig2, const2))
        for s in self.rec.states:  # the companion states' matrix carry (its width: the axis)
            if s.transition.kind is Kind.COMPANION:
                w = sizes[s.transition.axis]
                sigm = {"decay": "*fp32", "hloc": "*fp32", "h0": "*fp32", "ht": "*fp32",
                        "NUMEL": "i32", "INNER": "i32", "N_CHUNKS": "i32", "WIDTH": "constexpr",
                        "BLOCK": "constexpr", "BLOCK_W": "constexpr",
                        "USE_INITIAL_STATE": "constexpr", "STORE_FINAL_STATE": "constexpr"}
                constm = {"WIDTH": w, "BLOCK": 64, "BLOCK_W": 1 << (w - 1).bit_length(),
                          "USE_INITIAL_STATE": True, "STORE_FINAL_STATE": True}
                carries.append((self.module["matrix_carry"], sigm, constm))
                break
        return [(loc.kernel_name, sig1, const1), *carries, (self.kernel_name, sig3, const3)]

    def _returns(self, final: str) -> str:
        rec = self.rec
        outs = ", ".join(f'"{o.name}": {self.arg[o.name]}' + (
            f".to({self.arg[rec.inputs[0].name]}.dtype)" if o.name in self.summed else "")
            for o in rec.outputs)
        fins = ", ".join(f'"{s.name}": {self.ht[s.name]}' for s in rec.states)
        return f"{{{outs}}}, ({{{fins}}} if {final} else None)"

    def render(self) -> str:
        if hasattr(self, "_source"):
            return self._source
        local = self.local.render_kernel_def()
        fwd = self.render_kernel_def()
        launcher = self.render_launcher()
        kinds = {s.transition.kind for s in self.rec.states}
        carries = [_carry_kernel(self.module["carry"])] if kinds - {Kind.COMPANION} else []
        if Kind.COMPANION in kinds:
            carries.append(_matrix_carry_kernel(self.module["matrix_carry"]))
        self._source = "\n\n".join([
            recurrent.module_header(self.ir, self.algorithm) + EXP_HELPER, local, *carries, fwd,
            CHUNK_RULE, launcher])
        return self._source


class _Local(_Arithmetic, _Chunked):
    """Stage 1: a chunk from a zero state; stores its end state and its decay product."""

    def __init__(self, rec: Recurrence, options):
        super().__init__(rec, options)
        self.kernel_name = _module_names(rec)["local"]
        one = len(rec.states) == 1
        self.hloc = {s.name: self.names.new("hloc") if one else self.names.ir("hloc_", s.name)
                     for s in rec.states}
        self.prod = {s.name: self.names.new("decay") if one else self.names.ir("decay_", s.name)
                     for s in rec.states if s.transition.kind is not Kind.IDENTITY}
        self.prod_var = {s: self.names.ir("b_decay_", s) for s in self.prod}
        self.prev_var = {}  # no outputs, so no state read as it entered a step

    def make_names(self) -> Names:
        n = super().make_names()
        n.used |= {f"{self.ir.name}_scan_fwd_kernel", f"{self.ir.name}_scan_fwd"}
        return n

    # a companion state's transition product M is the state's register tile with one more
    # axis, last: its column (M's row axis is the ring axis, in the ring's physical order)
    def _col(self, w: str) -> str:
        return f"tl.arange(0, {self.block[w]})[{', '.join(['None'] * len(self.plan.regs))}, :]"

    def _x3(self, v: str) -> str:
        """A register tile ``v`` with the column axis appended (size 1)."""
        return f"{self.par(v, 4)}[{', '.join([':'] * len(self.plan.regs))}, None]"

    def init_states(self, base: Env) -> list[str]:
        lines = []
        for s in self.rec.states:
            shape = ", ".join(self.block[d] if d in s.dims else "1" for d in self.plan.regs)
            lines.append(f"{self.state_var[s.name]} = tl.zeros([{shape}], dtype=tl.float32)")
            if s.name in self.prod and s.transition.kind is Kind.COMPANION:
                # the identity, in logical order at step t_start: physical slot p holds the
                # logical slot (p - t_start) mod W
                w = s.transition.axis
                logical = self._ring_env(base, self.t_start, False)[w].expr
                lines.append(f"{self.prod_var[s.name]} = tl.zeros([{shape}, {self.block[w]}], "
                             f"dtype=tl.float32) + tl.where({self._x3(logical)} == "
                             f"{self._col(w)}, 1.0, 0.0)")
            elif s.name in self.prod:
                lines.append(f"{self.prod_var[s.name]} = tl.full([{shape}], 1.0, "
                             "dtype=tl.float32)")
        return lines

    def _companion_product(self, s, env: Env) -> None:
        """M <- A_t M for the step's companion matrix A_t (the rule of recurrent.py on every
        column of M, with no injected term)."""
        w, M = s.transition.axis, self.prod_var[s.name]
        f = self.value(s.transition.operand("feedback"), env)
        slot = self.bind(True, f"m_{s.name}_slot", f"{self._x3(self.off[w])} == i_t % "
                         f"{self.size[w]}")
        fb = self.reduce("sum", f"{self._x3(f)} * tl.where({slot}, 0.0, {M})", [w],
                         env, "0.0").replace(self.msk[w], self._x3(self.msk[w]), 1)
        self.body.append(f"{M} = tl.where({slot}, {fb}, {M})")

    def emit_transition(self, s, env: Env) -> None:
        if s.transition.kind is Kind.COMPANION:
            super().emit_transition(s, env)
            return self._companion_product(s, env)
        if s.transition.kind is Kind.IDENTITY:
            return super().emit_transition(s, env)
        decay = s.transition.operand("decay")
        a = self.value(decay, env)
        if not simple(a):
            a = self.bind(self.varies(decay, env), "b_a", a)
        h, p = self.state_var[s.name], self.prod_var[s.name]
        self.body.append(f"{h} = {a} * {h} + {self.par(self.value(s.inject, env), 2)}")
        self.body.append(f"{p} = {a} * {p}")

    def emit_outputs(self, env: Env) -> None:
        pass

    def final_states(self, fenv: Env) -> list[str]:
        lines = []
        if self.plan.rings:  # stored in logical order as of the chunk's last step
            fenv = self._ring_env(Env(self._base_env()), self.t_last, False)
        for s in self.rec.states:
            for buf, v in [(self.hloc[s.name], self.state_var[s.name]),
                           (self.prod.get(s.name), self.prod_var.get(s.name))]:
                if buf is None:
                    continue
                if s.transition.kind is Kind.COMPANION and buf == self.prod.get(s.name):
                    lines += self._store_product(s, buf, v, fenv)
                    continue
                ptr, mask = self.pointer(f"{buf} + {self.chunk_offset(s)}", s.dims, fenv, None,
                                         block=True)
                p = self.names.new(f"p_{buf}")
                lines.append(f"{p} = {ptr}")
                lines.append(f"tl.store({p}, {v}{f', mask={mask}' if mask else ''})")
        return lines

    def _store_product(self, s, buf: str, v: str, fenv: Env) -> list[str]:
        """M of chunk i_c into its [NC, W (column), *state dims] buffer, rows logical."""
        w = s.transition.axis
        off, mask = self.pointer("0", s.dims, fenv, None, block=True)
        numel = " * ".join(self.size[d] for d in s.dims)
        col = self._col(w)
        p = self.names.new(f"p_{buf}")
        m = f"({col} < {self.size[w]})" + (f" & {self._x3(mask)}" if mask else "")
        return [f"{p} = {buf} + (i_c * {self.size[w]} + {col}) * {numel} + "
                f"{self._x3(off[4:])}",
                f"tl.store({p}, {v}, mask={m})"]

    def signature(self) -> tuple[list[str], list[str]]:
        rec = self.rec
        params = [self.arg[i.name] for i in rec.inputs] + list(self.hloc.values())
        params += list(self.prod.values()) + [self.size[d] for d in self.runtime_sizes()]
        consts = [self.size[d] for d in self.const_sizes()] + [self.block[d]
                                                               for d in self.plan.regs]
        return params + [self.chunk], consts


def _carry_kernel(name: str) -> str:
    """Stage 2 for one state, over its flattened elements (NUMEL: all its dims)."""
    return f'''@triton.jit
def {name}(
    decay,
    hloc,
    h0,
    ht,
    NUMEL,
    N_CHUNKS,
    BLOCK: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    # h_in[0] = h0, h_in[c + 1] = decay[c] * h_in[c] + hloc[c]; h_in[c] replaces hloc[c]
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < NUMEL
    b_h = tl.zeros([BLOCK], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o, mask=m, other=0.0).to(tl.float32)
    p_hloc = hloc + o
    p_decay = decay + o
    for i_c in range(0, N_CHUNKS):
        b_hloc = tl.load(p_hloc, mask=m, other=0.0)
        tl.store(p_hloc, b_h, mask=m)
        if HAS_DECAY:
            b_h = tl.load(p_decay, mask=m, other=0.0) * b_h + b_hloc
        else:
            b_h = b_h + b_hloc
        p_hloc += NUMEL
        p_decay += NUMEL
    if STORE_FINAL_STATE:
        tl.store(ht + o, b_h, mask=m)
'''


def _matrix_carry_kernel(name: str) -> str:
    """Stage 2 for one companion state: per element of its other dims (``NUMEL / WIDTH`` of
    them, the axis of stride INNER), a WIDTH x WIDTH matrix-vector product per chunk."""
    return f'''@triton.jit
def {name}(
    decay,
    hloc,
    h0,
    ht,
    NUMEL,
    INNER,
    N_CHUNKS,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_W: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    # h_in[0] = h0, h_in[c + 1] = M[c] h_in[c] + hloc[c] (M[c]: [WIDTH (column), *state]);
    # h_in[c] replaces hloc[c]
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[:, None]
    o_i = tl.arange(0, BLOCK_W)[None, :]
    o_j = tl.arange(0, BLOCK_W)[None, None, :]
    m = (q < NUMEL // WIDTH) & (o_i < WIDTH)
    o = (q // INNER) * WIDTH * INNER + q % INNER + o_i * INNER
    m_mat = m[:, :, None] & (o_j < WIDTH)
    b_h = tl.zeros([BLOCK, BLOCK_W], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o, mask=m, other=0.0).to(tl.float32)
    for i_c in range(0, N_CHUNKS):
        p_hloc = hloc + i_c * NUMEL + o
        b_hloc = tl.load(p_hloc, mask=m, other=0.0)
        tl.store(p_hloc, b_h, mask=m)
        b_m = tl.load(decay + (i_c * WIDTH + o_j) * NUMEL + o[:, :, None], mask=m_mat, other=0.0)
        b_h = tl.sum(b_m * b_h[:, None, :], axis=2) + b_hloc
    if STORE_FINAL_STATE:
        tl.store(ht + o, b_h, mask=m)
'''


def on_gpu() -> bool:
    """Whether kernels run on a GPU (``"auto"`` picks the scan only there)."""
    from . import runtime
    return runtime.has_gpu()


__all__ = ["Lowering", "applies", "auto", "chunk_length", "on_gpu", "CHUNK_RULE", "KINDS"]
