"""The staged chunked algorithm: the chunked form (chunked.py) as a parallel decomposition. With c
the in-chunk cumulative log-decays and n the reset counts (edges: ``scancc.ir.passes.chunked``),
for chunk i, identity, scalar and key-diagonal decays, two launches (fla's chunk_fwd_h and
chunk_fwd_o):

2. the state pass, sequential over chunks only, parallel over (grid, V-blocks, [BKS, BVS]
   sub-blocks of the state: ``STATE_BLOCK``): each chunk's own contribution
   dS_i = sum_s (k_s e^{c_last - c_s}) v_sᵀ computed in the loop, S_i = decay_i ⊙ S_{i-1} + dS_i
   (decay_i = e^{c_last}, 0 after a reset), storing the state entering each chunk (buffer
   ``hc`` [grid, chunks, K, V], in the input dtype for 16-bit inputs) and the final state; the
   K rows of S need only the same K columns of k and of the decay, so the split is exact;
3. outputs, parallel over (grid, V-blocks, chunks): o = intra-chunk term + (q ⊙ e^{c}) S_in;
   for a readout of prev(S) (RWKV-6) the strictly causal mask and e^{c_(t-1)} (chunked.py).

(Stage 1, the chunk states in a float32 buffer, was folded into the state pass: one pass over
k, v instead of a write and a read of every dS_i.)

Householder transitions (S = alpha (I - beta k kᵀ) S + u wᵀ; the UT form and its names M, N,
R, Kd, Ud: ``chunked.Lowering._householder_chunk``), where R = (I + M)^-1 (e^{c_(t-1)} K S + N W):

1. the factors that do not depend on the incoming state, parallel over (grid, V-blocks,
   chunks): A = (I + M)^-1 by a blocked triangular solve (``_ut_inverse``), P = A e^{c_(t-1)} K
   ([BT, K], buffer ``pc``) and Q = A N W ([BT, BV], buffer ``rc``), float32;
2. the state pass, sequential over chunks, parallel over (grid, V-blocks, V sub-blocks of
   ``HOUSEHOLDER_STATE_BV`` columns: every step acts on the columns of S independently):
   R = P S + Q (stored over Q), S = e^{c_L} S - Kdᵀ R + Udᵀ W, the state entering each chunk
   into ``hc``;
3. outputs, parallel over (grid, V-blocks, chunks): the fused kernel's output tile from the
   stored S_in and R.

With the inject's k-side the reflection's k (u = k: delta_net, gated_delta_net; the
"shared-k" form, ``Lowering.hh_shared``), -Kdᵀ R + Udᵀ W = Udᵀ X with X = W - ab ⊙ R, and the
output's -QK R + QU W = QU X, so the stages become:

1. one program per (grid, chunk) (the inverse once, a loop over the V blocks):
   A = (I + M)^-1 by recursive doubling (``_ut_inverse_doubling``), P' = ab ⊙ (A e^{c_(t-1)} K)
   (``pc``), W' = W - ab ⊙ (A N W) (``rc``), Ud = K e^{c_L - c} (``kc``) and the state's column
   factor z = e^{c_L} (``zc`` [grid, chunks, V]; NaN in every column for a non-finite k, beta or
   decay of the chunk, in the columns of a non-finite w: the state's poison);
2. X = W' - P' S (stored over W'), S = z S + Udᵀ X: two dots per chunk and no factor loads,
   sanitizing or poison reductions, the loads of the next chunk pipelined (``tl.range``
   ``num_stages``); the state entering each chunk into ``hc`` in the input dtype for 16-bit
   inputs (as the identity/scalar/key-diagonal state pass);
3. o = e^{c} q S_in + QU X.

Dplr transitions (S = (Diag(w) + a bᵀ) S + u w'ᵀ: rwkv7, kda; the names of
``chunked.Lowering._dplr_chunk``), where R = (I - M)^-1 ((b ⊙ e^{c_(t-1)}) S + N W'), the same
three stages with gla's per-K transports: stage 1 A = (I - M)^-1 (``_ut_inverse`` of -M),
P = A (b ⊙ e^{c_(t-1)}) into ``pc``, Q = A N W' into ``rc``; stage 2 R = P S + Q,
S = e^{c_L} ⊙ S + (a ⊙ e^{c_L - c})ᵀ R + (u ⊙ e^{c_L - c})ᵀ W'; stage 3 the fused kernel's
output tile from S_in and R. Chunks of 16 steps; the pair tiles M, N, QA, QU are built one
row at a time (``chunked.Lowering._dplr_pairs``: no [BT, BT, BK] transport, zero spills at
K=V=128). Under ``auto`` a dplr transition always takes the three stages (no fused branch):
the fused kernel keeps the forward substitution and the pair tiles on its sequential path
(modelled slower at every realistic shape, docs/performance/triton.md, issue 15).

The stages are the branches of one kernel on a constexpr ``STAGE`` (Triton compiles one
kernel per stage), launched in order by one launcher, which also allocates the buffers. The
launches are what make the stages wait for each other; no stage reads what a concurrent
program of its own launch writes (stage 1's V-block programs write the same P tile). Chunks of
64 steps for identity decays, 32 for scalar ones, 32 for key-diagonal ones (whose intra-chunk
term is the fused kernel's halving levels, ``chunked.Lowering._diagonal_pairs``: log2 BT tl.dot;
32 measured best on sm_90, 64 spills in stage 3, docs/performance/triton.md), 32 for householder
transitions (64 spills in every stage, ptxas: docs/performance/triton.md).
"""
from __future__ import annotations

from scancc.ir import Kind, Recurrence
from scancc.ir.printer import format_expr, format_transition

from . import chunked
from .chunked import NotChunkable
from .emit import par
from .recurrent import Env

STAGED_KINDS = (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL, Kind.HOUSEHOLDER, Kind.DPLR)


def analyze(rec: Recurrence) -> chunked.Form:
    F = chunked.analyze(rec, prev=True)
    if F.kind not in STAGED_KINDS:
        raise NotChunkable(f"transition kind {F.kind.value!r}: the staged form takes identity, "
                           "scalar, key-diagonal, householder and dplr transitions")
    return F


def applies(rec: Recurrence) -> tuple[bool, str]:
    try:
        analyze(rec)
    except NotChunkable as e:
        return False, str(e)
    return True, ""


class Lowering(chunked.Lowering):
    algorithm = "staged"
    # warps per program of each stage, as a multiple of the num_warps option (default 4):
    # stages 1 and 3 hold [64, K] chunk tiles, stage 2 two [K, BV] states (ptxas: see
    # docs/performance/triton.md)
    WARPS = {1: 2, 2: 2, 3: 2}

    def stage_warps(self, stage: int, num_warps: int) -> int:
        if stage == 2 and not self.hh:
            return min(self.STATE_WARPS * num_warps, 32)
        return min(self.WARPS[stage] * num_warps, 32)

    # the launcher's rule with ``choose`` (algorithm="auto"): the fused kernel (chunked.py) when
    # the (grid, V-block) programs alone fill the GPU (B·H·⌈V/BV⌉ >= SMS, H100/H200: 132
    # SMs), else the three stages, which add ⌈T/BT⌉ programs per (grid, V-block)
    SMS = 132
    # key-diagonal chunks (the pair tile by halving levels: chunked.Lowering._diagonal_pairs)
    DIAGONAL_BT = 32
    # householder chunks (the [BT, BT] triangular inverse of stage 1): see the module doc
    HOUSEHOLDER_BT = 32
    # scalar-decay chunks of the stages (``block_size``)
    SCALAR_BT = 32
    # identity/scalar/key-diagonal state pass: [K, V] sub-blocks of the state per program
    # (fla's chunk_fwd_h grid (K/BK, V/BV, B·H)); modelled in docs/performance/triton.md
    STATE_BLOCK = (32, 64)
    # and its warps, as a multiple of num_warps: 4 warps on a [32, 64] sub-block, 255
    # registers, no spills (8 warps: 153 registers, modelled 15% slower: more instructions)
    STATE_WARPS = 1
    # the state pass's chunk-relative addressing (``_split_rows``) for these kinds: identity
    # only (sm_90, K=V=128: 749K -> 671K instructions per program, no spills); for scalar
    # decays the hoisted 32-bit offsets spill (retnet 8 B, simple_gla 244 B, mamba2 640 B)
    STATE_SPLIT = (Kind.IDENTITY,)
    # householder state pass: V sub-blocks of this width per program (exact: column-wise)
    HOUSEHOLDER_STATE_BV = 16

    def __init__(self, rec: Recurrence, options, choose: bool = False):
        F = analyze(rec)  # NotChunkable before any name is allocated
        # dplr: no fused branch under auto, always the stages (the module doc: issue 15)
        self.choose = choose and F.kind is not Kind.DPLR
        if choose:  # the chunked form, fused or staged as the launcher decides
            self.algorithm = "chunked"
        super().__init__(rec, options)
        self.hc = self.names.new("hc")          # per-chunk states (float32)
        self.hh = self.form.kind in (Kind.HOUSEHOLDER, Kind.DPLR)  # the UT form's buffers
        # householder with the inject's k-side the reflection's k (u = k: delta_net,
        # gated_delta_net): the shared-k form (``_hh_shared_stage_states``), two dots per chunk
        self.hh_shared = (self.form.kind is Kind.HOUSEHOLDER
                          and self.form.k_side == (self.form.hk,))
        if self.hh:
            self.pc = self.names.new("pc")      # per-chunk P = A e^{c_(t-1)} K (float32)
            self.rc = self.names.new("rc")      # per-chunk Q = A N W, then R (float32)
            self.buffers = [self.hc, self.pc, self.rc]
            if self.form.kind is Kind.HOUSEHOLDER:  # stage 2 split over V sub-blocks only
                self.bvs = self.names.new(f"{self.block[self.form.V]}_STATE")
            if self.hh_shared:  # the shared-k form: Ud and the state's column factor z
                self.kc = self.names.new("kc")  # per-chunk Ud = u e^{c_L - c} (float32)
                self.zc = self.names.new("zc")  # per-chunk z: e^{c_L} (1), NaN where poisoned
                self.buffers += [self.kc, self.zc]
        else:  # the state pass computes each chunk's contribution: no per-chunk buffer but hc
            self.buffers = [self.hc]
            # the state pass's [BKS, BVS] sub-blocks of the [BK, BV] state (constexprs)
            self.bks = self.names.new(f"{self.block[self.form.K]}_STATE")
            self.bvs = self.names.new(f"{self.block[self.form.V]}_STATE")
        self.stage = self.names.new("STAGE")

    def block_size(self, d: str, n: int, sizes: dict | None = None) -> int:
        if d == self.rec.time:
            # scalar decays: 32 (sm_90, K=V=128, 8-warp stage 3: 64 spilled 64-116 B, 32
            # spills none, modelled -2.7 % (mamba2) to +8.8 % (simple_gla) for both stages:
            # docs/performance/triton.md, "scalar" section)
            return {Kind.IDENTITY: 64, Kind.SCALAR: self.SCALAR_BT, Kind.DIAGONAL: self.DIAGONAL_BT,
                    Kind.HOUSEHOLDER: self.HOUSEHOLDER_BT}.get(self.form.kind, 16)  # dplr: 16
        return super().block_size(d, n, sizes)

    def signature(self) -> tuple[list[str], list[str]]:
        params, consts = super().signature()
        return params + self.buffers, consts + [self.stage] + self._split_consts()

    def _split_consts(self) -> list[str]:
        """The state pass's sub-block constexprs: K and V (identity/scalar/key-diagonal), V
        (householder: R = P S + Q and the update are column-wise in V, not in K), none (dplr)."""
        if not self.hh:
            return [self.bks, self.bvs]
        return [self.bvs] if self.form.kind is Kind.HOUSEHOLDER else []

    def compile_args(self, sizes: dict, dtype: str, stage: int = 1) -> tuple[dict, dict]:
        sig, const = super().compile_args(sizes, dtype)
        for buf in self.buffers:
            sig[buf] = "*fp32"
        const[self.stage] = stage
        if not self.hh or self.hh_shared:  # hc in the input dtype for 16-bit inputs
            sig[self.hc] = {"bfloat16": "*bf16", "float16": "*fp16"}.get(dtype, "*fp32")
        if not self.hh:  # (the launcher's rule)
            sig[self.hc] = {"bfloat16": "*bf16", "float16": "*fp16"}.get(dtype, "*fp32")
            const[self.bks] = min(const[self.block[self.form.K]], self.STATE_BLOCK[0])
            const[self.bvs] = min(const[self.block[self.form.V]], self.STATE_BLOCK[1])
        elif self.form.kind is Kind.HOUSEHOLDER:
            const[self.bvs] = min(const[self.block[self.form.V]], self.HOUSEHOLDER_STATE_BV)
        return sig, const

    # ---- the kernel ----
    def render_kernel(self) -> list[str]:
        rec, F = self.rec, self.form
        T, K, V = rec.time, F.K, F.V
        BT, BK, BV = self.block[T], self.block[K], self.block[V]
        s = rec.states[0]
        if self.choose:  # the fused kernel is branch 0; its head is every branch's head
            fused = chunked.Lowering.render_kernel(self)
            n = next(i for i, ln in enumerate(fused) if ln.startswith(f"{self.msk[V]} = ")) + 1
            head, fused = fused[:n], fused[n:]
        else:
            head = self._program_ids()
            head += [f"{self.off[K]} = tl.arange(0, {BK})[None, :]",
                     f"{self.off[V]} = {self.pid[V]} * {BV} + tl.arange(0, {BV})[None, :]",
                     f"{self.msk[K]} = {self.off[K]} < {self.size[K]}",
                     f"{self.msk[V]} = {self.off[V]} < {self.size[V]}"]
        flat = self.pid[self.plan.grid[0]]
        for d in self.plan.grid[1:]:
            flat = f"{flat} * {self.size[d]} + {self.pid[d]}"
        self.i_g, self.nc = self.names.new("i_g"), self.names.new("n_chunks")
        head += [f"{self.i_g} = {flat}  # the grid index, flattened",
                 f"{self.nc} = tl.cdiv({self.size[T]}, {BT})"]
        lines = list(head)
        lines.append(f"# {s.name}: {format_transition(s.transition)} + {format_expr(s.inject)}")
        if self.choose:
            lines.append(f"if {self.stage} == 0:  # fused: each program walks every chunk")
            lines += ["    " + ln for ln in fused]
        stages = ((None, None),  # no stage 1: the state pass computes each chunk's dS_i
                  ("the state pass: S_i = decay_i S_(i-1) + dS_i with dS_i computed in the "
                   "loop, sequential over chunks", self._stage_states),
                  ("outputs, one program per chunk", self._stage_outputs))
        if self.form.kind is Kind.DPLR:
            stages = (("the factors P = A (b e^c_(t-1)), Q = A N W' with A = (I - M)^-1, one "
                       "program per chunk", self._dplr_stage_factors),
                      ("the state pass: R_i = P_i S + Q_i, S = e^c S + Ad^T R_i + Ud^T W', "
                       "sequential over chunks", self._dplr_stage_states),
                      ("outputs, one program per chunk", self._dplr_stage_outputs))
        elif self.hh_shared:
            stages = (("the UT factors P' = ab A e^c K, W' = W - ab A N W with A = (I + M)^-1, "
                       "Ud = K e^(c_L - c), z = e^c_L (NaN where poisoned), one program per chunk",
                       self._hhs_stage_factors),
                      ("the state pass: X_i = W'_i - P'_i S, S = z S + Ud^T X_i, sequential "
                       "over chunks", self._hhs_stage_states),
                      ("outputs, one program per chunk", self._hhs_stage_outputs))
        elif self.hh:
            stages = (("the UT factors P = A e^c K, Q = A N W with A = (I + M)^-1, one program "
                       "per chunk", self._hh_stage_factors),
                      ("the state pass: R_i = P_i S + Q_i, S = e^c S - Kd^T R_i + Ud^T W, "
                       "sequential over chunks", self._hh_stage_states),
                      ("outputs, one program per chunk", self._hh_stage_outputs))
        first = not self.choose
        for i, (what, fn) in enumerate(stages, 1):
            if fn is None:
                continue
            lines.append(f"{'if' if first else 'elif'} {self.stage} == {i}:  # {what}")
            lines += ["    " + ln for ln in fn()]
            first = False
        return lines

    # ---- identity/scalar decays: chunk-relative addressing ----
    # The stages of identity and scalar decays address a chunk's tiles as a 64-bit scalar base
    # (the program's grid indices, the chunk's first step, the V block's first column) plus
    # 32-bit in-tile offsets (rows of the chunk times the time stride, K and V columns): the
    # int64 per-element products of ``o_time * stride`` (a chunk's rows as absolute steps) are
    # what filled the state pass's loop (sm_90 SASS: docs/performance/triton.md,
    # "scalar" section). The in-tile offsets are < BT times the time stride: a [BT, ...] tile
    # of a tensor with under 2^31 / BT elements per step (2^25 at BT = 64).
    def _splits(self) -> bool:
        return self.form.kind in (Kind.IDENTITY, Kind.SCALAR)

    def pointer(self, arr: str, dims, env: Env, t_index, block: bool = False,
                time_env: bool = False):
        sp = getattr(self, "_split", None)
        if not sp or not time_env or self.rec.time not in dims:
            return super().pointer(arr, dims, env, t_index, block, time_env)
        scal, tile, masks = [], [], []
        for i, d in enumerate(dims):
            idx = env[d]
            if idx.mask and idx.mask not in masks:
                masks.append(idx.mask)
            stride = " * ".join(self.size[e] for e in dims[i + 1:])
            # scalars: left to right from the 64-bit index (no 32-bit product of sizes); tiles:
            # the stride's product first, one 32-bit multiplication per element
            smul = (lambda x: f"{par(x)} * {stride}") if stride else (lambda x: x)  # noqa: E731
            tmul = (lambda x: f"{par(x)} * {par(stride)}") if stride else (lambda x: x)  # noqa: E731
            if d in sp and idx.expr == sp[d][0]:  # (the offsets' name, scalar, in-tile)
                scal.append(smul(sp[d][1]))
                tile.append(tmul(sp[d][2]))
            elif idx.axis is None:
                scal.append(smul(idx.expr))
            else:
                tile.append(tmul(idx.expr))
        off = f"({' + '.join(scal) or '0'}) + ({' + '.join(tile) or '0'})"
        return f"{arr} + {off}", (" & ".join(masks) if masks else None)

    def _split_rows(self, i_c: str) -> list[str]:
        """The chunk's time offsets as its first step ``t0`` (32-bit, a scalar: i_c * BT <=
        T; 64-bit in the pointers' bases) and 32-bit rows; sets ``_split`` (time, and V when
        its offsets are ``pid * BV + {_vrel}``). The row mask compares 32-bit rows."""
        T, V, BT = self.rec.time, self.form.V, self.block[self.rec.time]
        t0, rows = self.names.new("t0"), self.names.new("r_time")
        self._split = {T: (self.off[T], f"tl.cast({t0}, tl.int64)", rows)}
        if self._vrel is not None:
            self._split[V] = (self.off[V], f"{self.pid[V]} * {self.block[V]}", self._vrel)
        return [f"{t0} = {i_c} * {BT}  # the chunk's first step",
                f"{rows} = tl.arange(0, {BT})[:, None]",
                f"{self.off[T]} = {t0} + {rows}.to(tl.int64)",
                f"{self.msk[T]} = {rows} < {self.size[T]} - {t0}"]

    def _begin(self) -> Env:
        self.pro, self.body, self.step = [], [], []
        self._memo, self._varies, self._prec = {}, {}, {}
        self._split, self._vrel = None, None
        return Env(self._base_env())

    def _chunk_rows(self) -> list[str]:
        T, BT = self.rec.time, self.block[self.rec.time]
        i_c = self.names.new("i_c")
        self.i_c = i_c
        return [f"{i_c} = tl.program_id(2).to(tl.int64)",
                f"{self.off[T]} = {i_c} * {BT} + tl.arange(0, {BT})[:, None].to(tl.int64)",
                f"{self.msk[T]} = {self.off[T]} < {self.size[T]}"]

    def _hc(self, i_c: str) -> tuple[str, str]:
        """(pointers, mask) of chunk ``i_c``'s [BK, BV] tile of the per-chunk state buffer."""
        K, V = self.form.K, self.form.V
        sp = getattr(self, "_split", None)
        if sp and V in sp:  # a 64-bit base and 32-bit in-tile offsets (``_split_rows``)
            return (f"{self.hc} + (({self.i_g} * {self.nc} + {i_c}) * {self.size[K]} * "
                    f"{self.size[V]} + {sp[V][1]}) + (tl.trans({self.off[K]}) * {self.size[V]} + "
                    f"{sp[V][2]})", f"tl.trans({self.msk[K]}) & {self.msk[V]}")
        ptr = (f"{self.hc} + ({self.i_g} * {self.nc} + {i_c}) * {self.size[K]} * {self.size[V]}"
               f" + tl.trans({self.off[K]}) * {self.size[V]} + {self.off[V]}")
        return ptr, f"tl.trans({self.msk[K]}) & {self.msk[V]}"

    def _stage_states(self) -> list[str]:
        """Identity, scalar and key-diagonal decays: the state pass with each chunk's own
        contribution computed in the loop (fla's chunk_fwd_h), one program per (grid, V-block,
        [BKS, BVS] sub-block of the state): S_i = decay_i ⊙ S_(i-1) + dS_i with
        dS_i = (k ⊙ e^{c_last - c})ᵀ v, the state entering each chunk stored into ``hc`` (in
        the input dtype for 16-bit inputs). The K rows of S only need the same K columns of k
        and of the decay, so the split over K is exact."""
        F, env = self.form, self._begin()
        rec, b, dot = self.rec, self.body, self._dot
        T, K, V = rec.time, F.K, F.V
        s = rec.states[0]
        h = self.state_var[s.name]
        BT, BV, KS, VS = self.block[T], self.block[V], self.bks, self.bvs
        i_s, nvs = self.names.new("i_s"), f"({BV} // {VS})"
        out = [f"{i_s} = tl.program_id(2)  # the [{KS}, {VS}] sub-block of the state",
               f"{self.off[K]} = ({i_s} // {nvs}) * {KS} + tl.arange(0, {KS})[None, :]"]
        vcols = f"({i_s} % {nvs}) * {VS} + tl.arange(0, {VS})[None, :]"
        split = self._splits() and F.kind in self.STATE_SPLIT
        if split:  # the V columns in the block (32-bit) and the block's first column
            self._vrel = self.names.new(f"{self.off[V]}_in")
            out.append(f"{self._vrel} = {vcols}")
            vcols = self._vrel
        out += [f"{self.off[V]} = {self.pid[V]} * {BV} + {vcols}",
                f"{self.msk[K]} = {self.off[K]} < {self.size[K]}",
                f"{self.msk[V]} = {self.off[V]} < {self.size[V]}"]
        kv_env = self._kv_env(Env(env.base))
        out.append(f"{h} = tl.zeros([{KS}, {VS}], dtype=tl.float32)")
        ptr, mask = self.pointer(self.h0[s.name], s.dims, kv_env, None)
        p0 = self.names.ir("p_", self.h0[s.name])
        out += [f"if {self.use_h0[s.name]}:", f"    {p0} = {ptr}",
                f"    {h} += tl.load({p0}, mask={mask}, other=0.0).to(tl.float32)"]
        i_c = self.names.new("i_c")
        if split:
            b += self._split_rows(i_c)
        else:
            b += [f"{self.off[T]} = {i_c} * {BT} + tl.arange(0, {BT})[:, None].to(tl.int64)",
                  f"{self.msk[T]} = {self.off[T]} < {self.size[T]}"]
        ptr, mask = self._hc(i_c)
        p = self.names.new("p_hc")
        b += [f"{p} = {ptr}", f"tl.store({p}, {h}.to({p}.dtype.element_ty), mask={mask})  "
              f"# the state entering chunk {i_c}"]
        qk, tv = f"{self.msk[T]} & {self.msk[K]}", f"{self.msk[T]} & {self.msk[V]}"
        kf, k_ok = self._factor("b_kf", self.product(F.k_side, env), qk)
        vf, v_ok = self._factor("b_vf", self.product(F.v_side, env), tv)
        krows, whole = [self._bad(k_ok, 0)], []
        ds = self.names.new("b_dS")
        if F.kind is Kind.IDENTITY:
            b.append(f"{ds} = {dot(f'tl.trans({kf})', vf, 'update')}")
            dec = None
        else:
            gm = qk if F.kind is Kind.DIAGONAL else self.msk[T]
            g, g_ok, gc, gn, gl, gnl = self._log_decay(env, gm)
            if F.kind is Kind.SCALAR:
                whole.append(self._bad(g_ok, 0))
            else:
                krows.append(self._bad(g_ok, 0))
            kd = f"({kf} * tl.where({gn} == {gnl}, tl.exp({gl} - {gc}), 0.0))"
            b.append(f"{ds} = {dot(f'tl.trans{kd}', vf, 'update')}")
            # the chunk's total decay, 0 after a reset
            dec = f"tl.trans(tl.where({gnl} == 0, tl.exp({gl}), 0.0))"
        self._poison_state(ds, krows, whole, "", self._bad(v_ok, 0))
        # a multiplication, never a select: a NaN state stays NaN through a reset
        b.append(f"{h} = {h} + {ds}" if dec is None else f"{h} = {h} * {dec} + {ds}")
        return self._state_pass(out, b, f"for {i_c} in range(0, {self.nc}):", s, kv_env, h)

    def _state_pass(self, out: list[str], body: list[str], loop: str, s, kv_env: Env,
                    h: str) -> list[str]:
        """A state pass's kernel text: ``out`` (its set-up), the prologue, ``loop`` over the
        chunks with ``body`` inside, and the final state stored when asked."""
        ptr, mask = self.pointer(self.ht[s.name], s.dims, kv_env, None)
        pt = self.names.ir("p_", self.ht[s.name])
        return (out + self.pro + [loop] + ["    " + ln for ln in body]
                + [f"if {self.store_ht}:", f"    {pt} = {ptr}",
                   f"    tl.store({pt}, {h}, mask={mask})"])

    def _stage_outputs(self) -> list[str]:
        rec, F, env = self.rec, self.form, self._begin()
        T, K, V = rec.time, F.K, F.V
        b, dot = self.body, self._dot
        if self._splits():  # the head's V offsets: pid * BV + tl.arange (render_kernel)
            self._vrel = f"tl.arange(0, {self.block[V]})[None, :]"
            self.i_c = self.names.new("i_c")
            rows = [f"{self.i_c} = tl.program_id(2)"] + self._split_rows(self.i_c)
        else:
            rows = self._chunk_rows()
        qk, tv = f"{self.msk[T]} & {self.msk[K]}", f"{self.msk[T]} & {self.msk[V]}"
        kf, k_ok = self._factor("b_kf", self.product(F.k_side, env), qk)
        vf, v_ok = self._factor("b_vf", self.product(F.v_side, env), tv)
        b.append(f"# {format_expr(F.contraction)}")
        qf, q_ok = self._factor("b_qf", self.product(F.q_side, env), qk)
        steps = [self._bad(k_ok, 1)]
        ptr, mask = self._hc(self.i_c)
        p, h = self.names.new("p_hc"), self.names.new("b_S_in")
        b += [f"{p} = {ptr}", f"{h} = tl.load({p}, mask={mask}, other=0.0)"]
        # q S_in with S_in in hc's dtype (16-bit for 16-bit inputs: q, exact in it, meets it on
        # bf16/f16 tensor cores; float32: the "read" precision); a scalar decay scales the rows
        # after the dot, a key-diagonal one scales q first (float32 S_in, "read")
        hdt = f"{self.hc}.dtype.element_ty"
        mode = self.options.get("dot_precision", "auto")
        prec = self.dot_f32 or ('"ieee"' if mode == "input" else f'"{mode}"')
        qs = f"tl.dot({qf}.to({hdt}), {h}, input_precision={prec})"
        causal = f"({self.off[T]} >= tl.trans({self.off[T]}))"
        rmask = self._readout_mask(causal)  # t > s for a readout of prev(S)
        if F.kind is Kind.IDENTITY:
            a = self.bind(True, "b_A", f"tl.where({rmask}, {dot(qf, f'tl.trans({kf})')}, 0.0)")
            o = self.bind(True, "b_o", f"{dot(a, vf)} + {qs}")
        else:
            gm = qk if F.kind is Kind.DIAGONAL else self.msk[T]
            g, g_ok, gc, gn, gl, gnl = self._log_decay(env, gm)
            steps.append(self._bad(g_ok, 1))
            gq, nq = self._readout_cumsums(g, gc, gn)  # c_t, n_t (prev(S): c_{t-1}, n_{t-1})
            if F.kind is Kind.SCALAR:
                seg = (f"tl.exp(tl.where({rmask} & ({nq} == tl.trans({gn})), "
                       f"{gq} - tl.trans({gc}), float(\"-inf\")))")
                a = self.bind(True, "b_A", f"{dot(qf, f'tl.trans({kf})')} * {seg}")
            else:  # sub-chunks: off-diagonal blocks as tl.dot (chunked.py)
                a = self._diagonal_pairs(qf, kf, gq, nq, gc, gn)
            e_now = f"tl.where({nq} == 0, tl.exp({gq}), 0.0)"
            if F.kind is Kind.SCALAR:
                o = self.bind(True, "b_o", f"{dot(a, vf)} + {qs} * {e_now}")
            else:
                o = self.bind(True, "b_o", f"{dot(a, vf)} + "
                              f"{dot(f'({qf} * {e_now})', f'{h}.to(tl.float32)', 'read')}")
        vbad = self.bind(True, "b_bad_v", self._bad(v_ok, None))
        self._poison_output(o, steps, self._bad(q_ok, 1), vbad)
        self._memo[(F.contraction, env.key)] = o
        for out in rec.outputs:
            b.append(f"# {out.name} = {format_expr(out.expr)}")
            v = self.value(out.expr, env)
            ptr, mask = self.pointer(self.arg[out.name], out.dims, env, None, time_env=True)
            po = self.names.ir("p_", out.name)
            b.append(f"{po} = {ptr}")
            b.append(f"tl.store({po}, {self.par(v, 4)}.to({po}.dtype.element_ty), mask={mask})")
        return self.pro + rows + self.body

    # ---- householder transitions ----
    def _buf_rows(self, buf: str, i_c: str, d: str) -> tuple[str, str]:
        """(pointers, mask) of chunk ``i_c``'s [BT, B(d)] tile of the per-chunk buffer ``buf``
        ([grid, chunks, BT, size(d)])."""
        BT = self.block[self.rec.time]
        rows = f"tl.arange(0, {BT})[:, None]"
        return (f"{buf} + (({self.i_g} * {self.nc} + {i_c}) * {BT} + {rows}) * {self.size[d]} + "
                f"{self.off[d]}", self.msk[d])

    def _dot_inv(self, a: str, b: str) -> str:
        """The dots of the triangular inverse and of A's products (stage 1): float32 operands
        at tf32x3 under "auto" (about float32: A multiplies every R), exact float32 under
        "input" (the inverse is no 16-bit product), else the option's precision."""
        mode = self.options.get("dot_precision", "auto")
        prec = {"auto": "tf32x3", "input": "ieee"}.get(mode, mode)
        return f'tl.dot({a}, {b}, input_precision="{prec}")'

    def _hh_factors(self, env: Env, q: bool, pairs: bool = True):
        """The chunk's factor tiles (as the fused kernel takes them) and householder tiles."""
        F, T, K, V = self.form, self.rec.time, self.form.K, self.form.V
        qk, tv = f"{self.msk[T]} & {self.msk[K]}", f"{self.msk[T]} & {self.msk[V]}"
        uf, u_ok = self._factor("b_kf", self.product(F.k_side, env), qk)
        wf, w_ok = self._factor("b_vf", self.product(F.v_side, env), tv)
        qf = q_ok = None
        if q:
            self.body.append(f"# {format_expr(F.contraction)}")
            qf, q_ok = self._factor("b_qf", self.product(F.q_side, env), qk)
        causal = f"({self.off[T]} >= tl.trans({self.off[T]}))"
        t = self._householder_tiles(env, qk, causal, pairs)
        return uf, u_ok, wf, w_ok, qf, q_ok, t

    def _ut_inverse(self, m: str) -> str:
        """A = (I + M)^-1 for the strictly lower triangular [BT, BT] tile M, blocked: the 16x16
        diagonal blocks D_jj = I + M_jj inverted by forward substitution (16 row steps, every
        block at once), then block forward substitution over the block rows j = 1, 2, ...:
        A_j = D_jj^-1 - D_jj^-1 (M_j,<j A_<j), each a pair of tl.dot (the 2x2 case is
        [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]])."""
        b, BT = self.body, self.block[self.rec.time]
        row = self.bind(True, "o_row", f"tl.arange(0, {BT})[:, None]")
        col = f"tl.arange(0, {BT})[None, :]"
        blk = self.bind(True, "b_blk", f"({row} // 16) == ({col} // 16)  # in a diagonal block")
        md = self.bind(True, "b_Md", f"tl.where({blk}, {m}, 0.0)")
        a = self.bind(True, "b_A", f"tl.where({row} == {col}, 1.0, 0.0)")
        i = self.names.new("i_r")
        b.append(f"for {i} in range(1, 16):  # row {i} of every diagonal block")
        b.append(f"    {a} = tl.where({row} % 16 == {i}, {a} - "
                 f"{self._dot_inv(f'tl.where({row} % 16 == {i}, {md}, 0.0)', a)}, {a})")
        ad = self.bind(True, "b_Ad", a)
        mo = self.bind(True, "b_Mo", f"tl.where({blk}, 0.0, {m})")
        j = self.names.new("i_b")
        inner = self._dot_inv(f"tl.where({row} // 16 == {j}, {mo}, 0.0)", a)
        b.append(f"for {j} in tl.static_range(1, {BT} // 16):  # block row {j} (unrolled)")
        b.append(f"    {a} = {a} - {self._dot_inv(ad, inner)}")
        return a

    # the largest chunk the doubling inverse below handles (levels up to half of it)
    MAX_BT = 128

    def _ut_inverse_doubling(self, m: str) -> str:
        """A = (I + M)^-1 for the strictly lower triangular [BT, BT] tile M by recursive
        doubling of the diagonal blocks: with A_s the inverse of the block diagonal of I + M in
        s x s blocks (A_1 = I), A_2s = A_s - A_s M_s A_s, M_s the part of M inside the 2s x 2s
        diagonal blocks and outside the s x s ones (the 2x2 block inverse [[A11, 0],
        [-A22 L21 A11, A22]] of every 2s block at once). log2(BT) levels, the first without a
        dot (A_2 = I - M_1), two tf32x3 dots each after it: at BT 32 eight [BT, BT] dots where
        ``_ut_inverse`` takes 17 (15 row steps and a block row)."""
        b, BT = self.body, self.block[self.rec.time]
        row = self.bind(True, "o_row", f"tl.arange(0, {BT})[:, None]")
        col = self.bind(True, "o_col", f"tl.arange(0, {BT})[None, :]")
        a = self.bind(True, "b_A", f"tl.where({row} == {col}, 1.0, 0.0) - "
                      f"tl.where(({row} // 2) == ({col} // 2), {m}, 0.0)")
        ms = self.names.new("b_Ms")
        size = 2
        while size < self.MAX_BT:
            b.append(f"if {BT} > {size}:  # level {size} -> {2 * size}")
            b.append(f"    {ms} = tl.where((({row} // {2 * size}) == ({col} // {2 * size})) & "
                     f"(({row} // {size}) != ({col} // {size})), {m}, 0.0)")
            b.append(f"    {a} = {a} - {self._dot_inv(a, self._dot_inv(ms, a))}")
            size *= 2
        return a

    def _hh_stage_factors(self) -> list[str]:
        env = self._begin()
        F, dot, b = self.form, self._dot, self.body
        rows = self._chunk_rows()
        uf, _, wf, _, _, _, t = self._hh_factors(env, False)
        kh = t["kh"]
        m = self.bind(True, "b_M", f"{dot(kh, f'tl.trans({kh})')} * {t['seg_prev']} * "
                      f"tl.trans({t['ab']})")
        n = self.bind(True, "b_N", f"{dot(kh, f'tl.trans({uf})')} * {t['seg_prev']}")
        a = self._ut_inverse(m)
        p = self.bind(True, "b_P", self._dot_inv(a, self._scaled(kh, t["e_prev"])))
        q = self.bind(True, "b_Q", self._dot_inv(a, dot(n, wf, "solve")))
        for buf, d, x in ((self.pc, F.K, p), (self.rc, F.V, q)):
            ptr, mask = self._buf_rows(buf, self.i_c, d)
            pp = self.names.new(f"p_{buf}")
            b += [f"{pp} = {ptr}", f"tl.store({pp}, {x}, mask={mask})"]
        return self.pro + rows + self.body

    def _hh_stage_states(self) -> list[str]:
        F, env = self.form, self._begin()
        T, b, dot = self.rec.time, self.body, self._dot
        s = self.rec.states[0]
        h = self.state_var[s.name]
        BT, BK, BV, VS = self.block[T], self.block[F.K], self.block[F.V], self.bvs
        V = F.V
        i_s = self.names.new("i_s")
        # one program per [BK, VS] column block of the state: R = P S + Q and the update act on
        # the columns (V) independently
        out = [f"{i_s} = tl.program_id(2)  # the [{BK}, {VS}] column block of the state",
               f"{self.off[V]} = {self.pid[V]} * {BV} + {i_s} * {VS} + "
               f"tl.arange(0, {VS})[None, :]",
               f"{self.msk[V]} = {self.off[V]} < {self.size[V]}"]
        kv_env = self._kv_env(Env(env.base))
        out.append(f"{h} = tl.zeros([{BK}, {VS}], dtype=tl.float32)")
        ptr, mask = self.pointer(self.h0[s.name], s.dims, kv_env, None)
        p0 = self.names.ir("p_", self.h0[s.name])
        out += [f"if {self.use_h0[s.name]}:", f"    {p0} = {ptr}",
                f"    {h} += tl.load({p0}, mask={mask}, other=0.0).to(tl.float32)"]
        i_c = self.names.new("i_c")
        b += [f"{self.off[T]} = {i_c} * {BT} + tl.arange(0, {BT})[:, None].to(tl.int64)",
              f"{self.msk[T]} = {self.off[T]} < {self.size[T]}"]
        uf, u_ok, wf, w_ok, _, _, t = self._hh_factors(env, False, pairs=False)
        ptr, mask = self._hc(i_c)
        p = self.names.new("p_hc")
        b += [f"{p} = {ptr}", f"tl.store({p}, {h}, mask={mask})  # the state entering chunk {i_c}"]
        pp, pr = self.names.new("p_pc"), self.names.new("p_rc")
        ptr, mask = self._buf_rows(self.pc, i_c, F.K)
        b.append(f"{pp} = {ptr}")
        pt = self.bind(True, "b_P", f"tl.load({pp}, mask={mask}, other=0.0)")
        ptr, mask = self._buf_rows(self.rc, i_c, F.V)
        b.append(f"{pr} = {ptr}")
        r = self.bind(True, "b_R", f"{dot(pt, h, 'read')} + tl.load({pr}, mask={mask}, "
                      "other=0.0)")
        b.append(f"tl.store({pr}, {r}, mask={mask})  # R of chunk {i_c}, over its Q")
        kh, ab, to_end = t["kh"], t["ab"], t["to_end"]
        kd = f"({kh} * {ab})" if to_end is None else f"({kh} * {ab} * {to_end})"
        ud = uf if to_end is None else f"({uf} * {to_end})"
        b.append(f"{h} = {self._scaled(h, t['e_last'])} - {dot(f'tl.trans{kd}', r, 'update')} + "
                 f"{dot(f'tl.trans({ud})', wf, 'update')}")
        step = self.bind(True, "b_bad_step", " + ".join([self._bad(u_ok, 1)] + t["bad"]))
        vbad = self.bind(True, "b_bad_v", self._bad(w_ok, None))
        # a reflection mixes the rows: any non-finite step poisons the whole state
        self._poison_state(h, [self._bad(u_ok, 0)], ["step"], step, vbad)
        return self._state_pass(out, b, f"for {i_c} in range(0, {self.nc}):", s, kv_env, h)

    def _hh_stage_outputs(self) -> list[str]:
        rec, F, env = self.rec, self.form, self._begin()
        b, dot = self.body, self._dot
        rows = self._chunk_rows()
        uf, u_ok, wf, w_ok, qf, q_ok, t = self._hh_factors(env, True)
        kh, seg, ab = t["kh"], t["seg"], t["ab"]
        ptr, mask = self._hc(self.i_c)
        p, h = self.names.new("p_hc"), self.names.new("b_S_in")
        b += [f"{p} = {ptr}", f"{h} = tl.load({p}, mask={mask}, other=0.0)"]
        ptr, mask = self._buf_rows(self.rc, self.i_c, F.V)
        pr = self.names.new("p_rc")
        b.append(f"{pr} = {ptr}")
        r = self.bind(True, "b_R", f"tl.load({pr}, mask={mask}, other=0.0)")
        qkm = self.bind(True, "b_QK", f"{dot(qf, f'tl.trans({kh})')} * {seg} * tl.trans({ab})")
        qum = self.bind(True, "b_QU", f"{dot(qf, f'tl.trans({uf})')} * {seg}")
        # R = Kᵀ S-like rows read at the state's precision ("read"; the fused kernel rounds them
        # to the input dtype, "solve"): bf16 T=257 delta_net 9.50e-3 -> 8.53e-3 (docs/triton.md)
        o = self.bind(True, "b_o", f"{self._scaled(dot(qf, h, 'read'), t['e_now'])} - "
                      f"{dot(qkm, r, 'read')} + {dot(qum, wf)}")
        vbad = self.bind(True, "b_bad_v", self._bad(w_ok, None))
        self._poison_output(o, [self._bad(u_ok, 1)] + t["bad"], self._bad(q_ok, 1), vbad)
        self._memo[(F.contraction, env.key)] = o
        for out in rec.outputs:
            b.append(f"# {out.name} = {format_expr(out.expr)}")
            v = self.value(out.expr, env)
            ptr, mask = self.pointer(self.arg[out.name], out.dims, env, None, time_env=True)
            po = self.names.ir("p_", out.name)
            b.append(f"{po} = {ptr}")
            b.append(f"tl.store({po}, {self.par(v, 4)}.to({po}.dtype.element_ty), mask={mask})")
        return self.pro + rows + self.body

    # ---- householder transitions with u = k (the shared-k form) ----
    # With the inject's k-side the reflection's k (delta_net, gated_delta_net: u = k), N = the
    # pair tile of M without ab (M = N abᵀ), Ud = Kd / ab row-wise, and
    #   -Kdᵀ R + Udᵀ W = Udᵀ (W - ab ⊙ R) = Udᵀ X,  X = W' - P' S,
    #   P' = ab ⊙ (A e^{c_(t-1)} K),  W' = W - ab ⊙ (A N W),
    # and the output's -QK R + QU W = QU X (QK = QU abᵀ): stage 2 is two dots per chunk on
    # factors stage 1 stored (no factor loads, no sanitizing, no poison reductions: the
    # state's poison rides in z, NaN in the columns the chunk poisons), stage 3 one pair tile.
    # stage 2 warps as a multiple of num_warps when its programs fit in one wave (else
    # num_warps): sm_90 modelled, docs/performance/triton.md
    HH_SHARED_STATE_WARPS = 2
    # stage 3 warps as a multiple of num_warps (4 warps: 140-176 B spilled, sm_90)
    HH_SHARED_OUT_WARPS = 2
    HH_SHARED_FACTOR_WARPS = 2  # stage 1 warps as a multiple of num_warps
    HH_SHARED_STAGES = 2  # stage 2's software pipeline depth (tl.range num_stages)

    def _hhs_factors(self, env: Env, q: bool, pairs: bool = True):
        """The shared-k form's tiles: w (v-side), q, the householder tiles (u = kh)."""
        F, T, K, V = self.form, self.rec.time, self.form.K, self.form.V
        qk, tv = f"{self.msk[T]} & {self.msk[K]}", f"{self.msk[T]} & {self.msk[V]}"
        wf, w_ok = self._factor("b_vf", self.product(F.v_side, env), tv)
        qf = q_ok = None
        if q:
            self.body.append(f"# {format_expr(F.contraction)}")
            qf, q_ok = self._factor("b_qf", self.product(F.q_side, env), qk)
        causal = f"({self.off[T]} >= tl.trans({self.off[T]}))"
        t = self._householder_tiles(env, qk, causal, pairs)
        return wf, w_ok, qf, q_ok, t

    def _zc(self, i_c: str) -> tuple[str, str]:
        """(pointers, mask) of chunk ``i_c``'s [1, BV] row of ``zc`` ([grid, chunks, V])."""
        V = self.form.V
        return (f"{self.zc} + ({self.i_g} * {self.nc} + {i_c}) * {self.size[V]} + {self.off[V]}",
                self.msk[V])

    def _hhs_stage_factors(self) -> list[str]:
        """Stage 1 of the shared-k form, one program per (grid, chunk) (the launcher's grid has
        one V-block): the K-side tiles, Ud and the inverse once, then a loop over the V blocks
        for W' and z (the inverse is not recomputed per V block)."""
        env = self._begin()
        F, T, K, V, dot, b = self.form, self.rec.time, self.form.K, self.form.V, self._dot, \
            self.body
        BV = self.block[V]
        rows = self._chunk_rows()
        qk = f"{self.msk[T]} & {self.msk[K]}"
        causal = f"({self.off[T]} >= tl.trans({self.off[T]}))"
        t = self._householder_tiles(env, qk, causal)
        kh, ab = t["kh"], t["ab"]
        to_end = t["to_end"]
        ud = kh if to_end is None else self.bind(True, "b_Ud", f"{kh} * {to_end}")
        ptr, mask = self._buf_rows(self.kc, self.i_c, F.K)
        pk = self.names.new("p_kc")
        b += [f"{pk} = {ptr}", f"tl.store({pk}, {ud}, mask={mask})"]
        step = self.bind(True, "b_bad_chunk", f"tl.sum({' + '.join(t['bad'])})")
        n = self.bind(True, "b_N", f"{dot(kh, f'tl.trans({kh})')} * {t['seg_prev']}")
        m = self.bind(True, "b_M", f"{n} * tl.trans({ab})")
        a = self._ut_inverse_doubling(m)
        # A e^{c_(t-1)} K as (A scaled by columns) K: no scaled [BT, K] copy of K
        ae = a if t["e_prev"] is None else f"({a} * tl.trans({t['e_prev']}))"
        p = self.bind(True, "b_P", f"{ab} * {self._dot_inv(ae, kh)}")
        ptr, mask = self._buf_rows(self.pc, self.i_c, F.K)
        pp = self.names.new("p_pc")
        b += [f"{pp} = {ptr}", f"tl.store({pp}, {p}, mask={mask})"]
        # per V block: W' and z
        at = len(b)
        tv = f"{self.msk[T]} & {self.msk[V]}"
        wf, w_ok = self._factor("b_vf", self.product(F.v_side, env), tv)
        w2 = self.bind(True, "b_W2", f"{wf} - {ab} * {self._dot_inv(a, dot(n, wf, 'solve'))}")
        # z: the state's column factor e^{c_L} (1 without a decay, 0 after a reset), NaN in
        # every column for a non-finite k, beta or decay in the chunk (a reflection mixes the
        # rows), and in the columns of a non-finite w: S = z S + ... puts the NaN where the
        # fused kernel's poison does (a multiplication: NaN * 0 is NaN)
        e_last = "1.0" if t["e_last"] is None else t["e_last"]
        z = self.bind(True, "b_z", f"tl.where(({step} > 0) | "
                      f"(tl.sum({self._bad(w_ok, None)}, axis=0, keep_dims=True) > 0), "
                      f"float(\"nan\"), {e_last} + tl.zeros([1, {BV}], dtype=tl.float32))")
        ptr, mask = self._buf_rows(self.rc, self.i_c, F.V)
        pr = self.names.new("p_rc")
        b += [f"{pr} = {ptr}", f"tl.store({pr}, {w2}, mask={mask})"]
        ptr, mask = self._zc(self.i_c)
        pz = self.names.new("p_zc")
        b += [f"{pz} = {ptr}", f"tl.store({pz}, {z}, mask={mask})"]
        loop, b[at:] = b[at:], []
        iv = self.names.new("i_v")
        b += [f"for {iv} in range(0, tl.cdiv({self.size[V]}, {BV})):  # the V blocks",
              f"    {self.off[V]} = {iv} * {BV} + tl.arange(0, {BV})[None, :].to(tl.int64)",
              f"    {self.msk[V]} = {self.off[V]} < {self.size[V]}"]
        b += ["    " + ln for ln in loop]
        return self.pro + rows + self.body

    def _hhs_stage_states(self) -> list[str]:
        F, env = self.form, self._begin()
        b, dot = self.body, self._dot
        s = self.rec.states[0]
        h = self.state_var[s.name]
        BK, BV, VS = self.block[F.K], self.block[F.V], self.bvs
        V = F.V
        i_s = self.names.new("i_s")
        out = [f"{i_s} = tl.program_id(2)  # the [{BK}, {VS}] column block of the state",
               f"{self.off[V]} = {self.pid[V]} * {BV} + {i_s} * {VS} + "
               f"tl.arange(0, {VS})[None, :]",
               f"{self.msk[V]} = {self.off[V]} < {self.size[V]}"]
        kv_env = self._kv_env(Env(env.base))
        out.append(f"{h} = tl.zeros([{BK}, {VS}], dtype=tl.float32)")
        ptr, mask = self.pointer(self.h0[s.name], s.dims, kv_env, None)
        p0 = self.names.ir("p_", self.h0[s.name])
        out += [f"if {self.use_h0[s.name]}:", f"    {p0} = {ptr}",
                f"    {h} += tl.load({p0}, mask={mask}, other=0.0).to(tl.float32)"]
        i_c = self.names.new("i_c")
        ptr, mask = self._hc(i_c)
        p = self.names.new("p_hc")
        b += [f"{p} = {ptr}", f"tl.store({p}, {h}.to({p}.dtype.element_ty), mask={mask})  "
              f"# the state entering chunk {i_c}"]
        loads = {}
        for buf, d, nm in ((self.pc, F.K, "b_P"), (self.rc, F.V, "b_W2"), (self.kc, F.K, "b_Ud")):
            ptr, mask = self._buf_rows(buf, i_c, d)
            pp = self.names.new(f"p_{buf}")
            b.append(f"{pp} = {ptr}")
            loads[buf] = (pp, self.bind(True, nm, f"tl.load({pp}, mask={mask}, other=0.0)"))
        ptr, mask = self._zc(i_c)
        pz = self.names.new("p_zc")
        b.append(f"{pz} = {ptr}")
        z = self.bind(True, "b_z", f"tl.load({pz}, mask={mask}, other=0.0)")
        pr, w2 = loads[self.rc]
        x = self.bind(True, "b_X", f"{w2} - {dot(loads[self.pc][1], h, 'read')}")
        b.append(f"tl.store({pr}, {x}, mask={self.msk[V]})  # X of chunk {i_c}, over its W'")
        b.append(f"{h} = {z} * {h} + {dot(f'tl.trans({loads[self.kc][1]})', x, 'update')}")
        # the loads of chunk i + 1 (no dependence on S) issued while chunk i computes
        loop = f"for {i_c} in tl.range(0, {self.nc}, num_stages={self.HH_SHARED_STAGES}):"
        return self._state_pass(out, b, loop, s, kv_env, h)

    def _hhs_stage_outputs(self) -> list[str]:
        rec, F, env = self.rec, self.form, self._begin()
        b, dot = self.body, self._dot
        rows = self._chunk_rows()
        wf, w_ok, qf, q_ok, t = self._hhs_factors(env, True)
        kh, seg = t["kh"], t["seg"]
        ptr, mask = self._hc(self.i_c)
        p, h = self.names.new("p_hc"), self.names.new("b_S_in")
        b += [f"{p} = {ptr}", f"{h} = tl.load({p}, mask={mask}, other=0.0)"]
        ptr, mask = self._buf_rows(self.rc, self.i_c, F.V)
        pr = self.names.new("p_rc")
        b.append(f"{pr} = {ptr}")
        x = self.bind(True, "b_X", f"tl.load({pr}, mask={mask}, other=0.0)")
        qum = self.bind(True, "b_QU", f"{dot(qf, f'tl.trans({kh})')} * {seg}")
        # q S_in with S_in in hc's dtype (as ``_stage_outputs``: 16-bit for 16-bit inputs, q
        # exact in it; float32: the "read" precision); X (rows of W - ab Kᵀ S) read at the
        # state's precision, as R in ``_hh_stage_outputs``
        mode = self.options.get("dot_precision", "auto")
        prec = self.dot_f32 or ('"ieee"' if mode == "input" else f'"{mode}"')
        qs = f"tl.dot({qf}.to({self.hc}.dtype.element_ty), {h}, input_precision={prec})"
        o = self.bind(True, "b_o", f"{self._scaled(qs, t['e_now'])} + "
                      f"{dot(qum, x, 'read')}")
        vbad = self.bind(True, "b_bad_v", self._bad(w_ok, None))
        self._poison_output(o, t["bad"], self._bad(q_ok, 1), vbad)
        self._memo[(F.contraction, env.key)] = o
        for out in rec.outputs:
            b.append(f"# {out.name} = {format_expr(out.expr)}")
            v = self.value(out.expr, env)
            ptr, mask = self.pointer(self.arg[out.name], out.dims, env, None, time_env=True)
            po = self.names.ir("p_", out.name)
            b.append(f"{po} = {ptr}")
            b.append(f"tl.store({po}, {self.par(v, 4)}.to({po}.dtype.element_ty), mask={mask})")
        return self.pro + rows + self.body

    # ---- dplr transitions ----
    def _dplr_tiles(self, env: Env, q: bool):
        """The chunk's dplr tiles as ``chunked.Lowering._dplr_chunk`` takes them: factor tiles
        u (k-side), w' (v-side), a, b (and q) and the log-decay tiles (gc, gn: c_t, n_t;
        gc_prev, gn_prev: c_(t-1), n_(t-1)), for the pair tiles of ``_dplr_pairs``. Returns a
        dict; ``bad``: the per-step non-finite counts of a, b and the decay (``_dplr_chunk``'s)."""
        F, T, K, V = self.form, self.rec.time, self.form.K, self.form.V
        qk, tv = f"{self.msk[T]} & {self.msk[K]}", f"{self.msk[T]} & {self.msk[V]}"
        t = {}
        t["uf"], t["u_ok"] = self._factor("b_kf", self.product(F.k_side, env), qk)
        t["wf"], t["w_ok"] = self._factor("b_vf", self.product(F.v_side, env), tv)
        if q:
            self.body.append(f"# {format_expr(F.contraction)}")
            t["qf"], t["q_ok"] = self._factor("b_qf", self.product(F.q_side, env), qk)
        t["af"], a_ok = self._factor("b_la", self.value(F.la, env), qk)
        t["bf"], b_ok = self._factor("b_lb", self.value(F.lb, env), qk)
        g, g_ok, gc, gn, gl, gnl = self._log_decay(env, qk)
        t["bad"] = [self._bad(a_ok, 1), self._bad(b_ok, 1), self._bad(g_ok, 1)]
        gn_prev = self.bind(True, "b_gn_prev", f"{gn} - {g}_reset.to(tl.int32)")
        gc_prev = f"({gc} - {g})"
        t.update(gc=gc, gn=gn, gc_prev=gc_prev, gn_prev=gn_prev)
        t["e_prev"] = f"tl.where({gn_prev} == 0, tl.exp({gc_prev}), 0.0)"
        t["e_now"] = f"tl.where({gn} == 0, tl.exp({gc}), 0.0)"
        t["e_last"] = f"tl.trans(tl.where({gnl} == 0, tl.exp({gl}), 0.0))"
        t["to_end"] = f"tl.where({gn} == {gnl}, tl.exp({gl} - {gc}), 0.0)"
        return t

    def _dplr_stage_factors(self) -> list[str]:
        env = self._begin()
        F, dot, b = self.form, self._dot, self.body
        rows = self._chunk_rows()
        t = self._dplr_tiles(env, False)
        bf, af, uf = t["bf"], t["af"], t["uf"]
        # (I - M) R = (b e^{c_(t-1)}) S + N W': A = (I + (-M))^-1 by the blocked solve;
        # M[t, i] = sum_k b_t a_i e^{c_(t-1) - c_i}, N the same with u (i < t)
        m, n = self._dplr_pairs(bf, [af, uf], t["gc_prev"], t["gn_prev"], t["gc"], t["gn"],
                                True, ["b_M", "b_N"])
        a = self._ut_inverse(f"(-{m})")
        p = self.bind(True, "b_P", self._dot_inv(a, f"({bf} * {t['e_prev']})"))
        q = self.bind(True, "b_Q", self._dot_inv(a, dot(n, t["wf"], "solve")))
        for buf, dd, x in ((self.pc, F.K, p), (self.rc, F.V, q)):
            ptr, mask = self._buf_rows(buf, self.i_c, dd)
            pp = self.names.new(f"p_{buf}")
            b += [f"{pp} = {ptr}", f"tl.store({pp}, {x}, mask={mask})"]
        return self.pro + rows + self.body

    def _dplr_stage_states(self) -> list[str]:
        F, env = self.form, self._begin()
        T, b, dot = self.rec.time, self.body, self._dot
        s = self.rec.states[0]
        h = self.state_var[s.name]
        BT, BK, BV = self.block[T], self.block[F.K], self.block[F.V]
        kv_env = self._kv_env(Env(env.base))
        out = [f"{h} = tl.zeros([{BK}, {BV}], dtype=tl.float32)"]
        ptr, mask = self.pointer(self.h0[s.name], s.dims, kv_env, None)
        p0 = self.names.ir("p_", self.h0[s.name])
        out += [f"if {self.use_h0[s.name]}:", f"    {p0} = {ptr}",
                f"    {h} += tl.load({p0}, mask={mask}, other=0.0).to(tl.float32)"]
        i_c = self.names.new("i_c")
        b += [f"{self.off[T]} = {i_c} * {BT} + tl.arange(0, {BT})[:, None].to(tl.int64)",
              f"{self.msk[T]} = {self.off[T]} < {self.size[T]}"]
        t = self._dplr_tiles(env, False)
        ptr, mask = self._hc(i_c)
        p = self.names.new("p_hc")
        b += [f"{p} = {ptr}", f"tl.store({p}, {h}, mask={mask})  # the state entering chunk {i_c}"]
        pp, pr = self.names.new("p_pc"), self.names.new("p_rc")
        ptr, mask = self._buf_rows(self.pc, i_c, F.K)
        b.append(f"{pp} = {ptr}")
        pt = self.bind(True, "b_P", f"tl.load({pp}, mask={mask}, other=0.0)")
        ptr, mask = self._buf_rows(self.rc, i_c, F.V)
        b.append(f"{pr} = {ptr}")
        r = self.bind(True, "b_R", f"{dot(pt, h, 'read')} + tl.load({pr}, mask={mask}, "
                      "other=0.0)")
        b.append(f"tl.store({pr}, {r}, mask={mask})  # R of chunk {i_c}, over its Q")
        af, uf, wf = t["af"], t["uf"], t["wf"]
        to_end = self.bind(True, "b_to_end", t["to_end"])
        b.append(f"{h} = {h} * {t['e_last']} + {dot(f'tl.trans({af} * {to_end})', r, 'update')} + "
                 f"{dot(f'tl.trans({uf} * {to_end})', wf, 'update')}")
        step = self.bind(True, "b_bad_step", " + ".join([self._bad(t["u_ok"], 1)] + t["bad"]))
        vbad = self.bind(True, "b_bad_v", self._bad(t["w_ok"], None))
        # the rank-1 term mixes the rows: any non-finite step poisons the whole state
        self._poison_state(h, [self._bad(t["u_ok"], 0)], ["step"], step, vbad)
        return self._state_pass(out, b, f"for {i_c} in range(0, {self.nc}):", s, kv_env, h)

    def _dplr_stage_outputs(self) -> list[str]:
        rec, F, env = self.rec, self.form, self._begin()
        b, dot = self.body, self._dot
        rows = self._chunk_rows()
        t = self._dplr_tiles(env, True)
        qf, af, uf = t["qf"], t["af"], t["uf"]
        ptr, mask = self._hc(self.i_c)
        p, h = self.names.new("p_hc"), self.names.new("b_S_in")
        b += [f"{p} = {ptr}", f"{h} = tl.load({p}, mask={mask}, other=0.0)"]
        ptr, mask = self._buf_rows(self.rc, self.i_c, F.V)
        pr = self.names.new("p_rc")
        b.append(f"{pr} = {ptr}")
        r = self.bind(True, "b_R", f"tl.load({pr}, mask={mask}, other=0.0)")
        # QA[t, i] = sum_k q_t a_i e^{c_t - c_i}, QU the same with u (i <= t)
        qa, qu = self._dplr_pairs(qf, [af, uf], t["gc"], t["gn"], t["gc"], t["gn"], False,
                                  ["b_QA", "b_QU"])
        # R read at the state's precision, as householder's stage 3
        e_now = t["e_now"]
        o = self.bind(True, "b_o", f"{dot(f'({qf} * {e_now})', h, 'read')} + "
                      f"{dot(qa, r, 'read')} + {dot(qu, t['wf'])}")
        vbad = self.bind(True, "b_bad_v", self._bad(t["w_ok"], None))
        self._poison_output(o, [self._bad(t["u_ok"], 1)] + t["bad"], self._bad(t["q_ok"], 1),
                            vbad)
        self._memo[(F.contraction, env.key)] = o
        for out in rec.outputs:
            b.append(f"# {out.name} = {format_expr(out.expr)}")
            v = self.value(out.expr, env)
            ptr, mask = self.pointer(self.arg[out.name], out.dims, env, None, time_env=True)
            po = self.names.ir("p_", out.name)
            b.append(f"{po} = {ptr}")
            b.append(f"tl.store({po}, {self.par(v, 4)}.to({po}.dtype.element_ty), mask={mask})")
        return self.pro + rows + self.body

    # ---- the launcher ----
    def render_launcher(self) -> str:
        """The recurrent launcher up to its grid, then the buffers and the three launches."""
        lines = super().render_launcher().splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith("    grid = ("))
        end = next(i for i, ln in enumerate(lines) if ln.startswith("    return "))
        grid_line, launch = lines[at], lines[at + 1:end]
        g0, g1 = grid_line[len("    grid = ("):-1].split(", ", 1)
        F, T = self.form, self.rec.time
        first = self.arg[self.rec.inputs[0].name]
        dev = f"{first}.device"
        nc, warps = self.names.new("n_chunks"), self.names.new("warps")
        nw = launch[-2].strip()[len("num_warps="):-1]  # the launcher's num_warps parameter
        call = launch
        # the recurrent launcher's arguments (the buffers among them: ``signature``), STAGE last
        call_args = [ln.strip().rstrip(",") for ln in call[1:-2]] + [self.stage]
        new = []
        call_args += self._split_consts()  # the state pass's sub-blocks (constexprs after STAGE)
        if not self.hh:
            ks, vs = self.STATE_BLOCK
            new += [f"    {self.bks} = min({self.block[F.K]}, {ks})  # the state pass's sub-blocks",
                    f"    {self.bvs} = min({self.block[F.V]}, {vs})"]
        elif self.form.kind is Kind.HOUSEHOLDER:
            new += [f"    {self.bvs} = min({self.block[F.V]}, {self.HOUSEHOLDER_STATE_BV})  "
                    "# the state pass's V sub-blocks"]
        if self.choose:
            bt = self.block[T]
            fbt = self.names.new("BLOCK_TIME_FUSED")
            fargs = [fbt if a == bt else "None" if a in self.buffers else
                     "0" if a == self.stage else a for a in call_args]
            new += [f"    if {g0} * {g1} >= {self.SMS}:  # enough programs: the fused kernel",
                    f'        {fbt} = {self.names_blocks}.get("{T}", '
                    f"{chunked.Lowering.block_size(self, T, 0)})",
                    f"        {call[0].strip()[:-len('[grid](')]}[({g0}, {g1}, 1)]("]
            new += [f"            {a}," for a in fargs]
            new += [f"            num_warps={self.fused_warps(nw)},", "        )", "    " + lines[end]]
        new += [f"    {nc} = -(-{self.size[T]} // {self.block[T]})"]
        w = [f"min({self.WARPS[i]} * {nw}, 32)" for i in (1, 2, 3)]
        if self.hh:
            # the shared-k form keeps hc in the input dtype for 16-bit inputs (as the
            # identity/scalar/key-diagonal state pass)
            hdt = (f"{first}.dtype if {first}.dtype in (torch.bfloat16, torch.float16) else "
                   "torch.float32") if self.hh_shared else "torch.float32"
            split = (f"{self.block[F.V]} // {self.bvs}" if self.form.kind is Kind.HOUSEHOLDER
                     else "1")
            new += ["    # per chunk: P, Q (stage 1), then R over Q and the state entering it "
                    "(stage 2)",
                    f"    {self.hc} = torch.empty(({g0}, {nc}, {self.size[F.K]}, "
                    f"{self.size[F.V]}), dtype={hdt}, device={dev})",
                    f"    {self.pc} = torch.empty(({g0}, {nc}, {self.block[T]}, "
                    f"{self.size[F.K]}), dtype=torch.float32, device={dev})",
                    f"    {self.rc} = torch.empty(({g0}, {nc}, {self.block[T]}, "
                    f"{self.size[F.V]}), dtype=torch.float32, device={dev})"]
            if self.hh_shared:
                new += [f"    {self.kc} = torch.empty(({g0}, {nc}, {self.block[T]}, "
                        f"{self.size[F.K]}), dtype=torch.float32, device={dev})",
                        f"    {self.zc} = torch.empty(({g0}, {nc}, {self.size[F.V]}), "
                        f"dtype=torch.float32, device={dev})"]
                # stage 2 (one wave when its programs fit the SMs: then more warps per
                # program, else num_warps and more programs per SM): docs/performance/triton.md
                w[1] = (f"(min({self.HH_SHARED_STATE_WARPS} * {nw}, 32) if {g0} * {g1} * "
                        f"({split}) <= {self.SMS} else {nw})")
                w[2] = f"min({self.HH_SHARED_OUT_WARPS} * {nw}, 32)"
                w[0] = f"min({self.HH_SHARED_FACTOR_WARPS} * {nw}, 32)"
            g1s = "1" if self.hh_shared else g1  # shared-k stage 1 loops over the V blocks
            new += [f"    for {self.stage}, grid, {warps} in "
                    f"((1, ({g0}, {g1s}, {nc}), {w[0]}), (2, ({g0}, {g1}, {split}), {w[1]}), "
                    f"(3, ({g0}, {g1}, {nc}), {w[2]})):"]
        else:
            BV = self.block[F.V]
            new += ["    # the state entering each chunk (stage 2), in the input dtype for "
                    "16-bit inputs (float32 sums in registers)",
                    f"    {self.hc} = torch.empty(({g0}, {nc}, {self.size[F.K]}, "
                    f"{self.size[F.V]}), dtype={first}.dtype if {first}.dtype in "
                    f"(torch.bfloat16, torch.float16) else torch.float32, device={dev})",
                    f"    for {self.stage}, grid, {warps} in "
                    f"((2, ({g0}, {g1}, -(-{self.size[F.K]} // {self.bks}) * ({BV} // {self.bvs})), "
                    f"min({self.STATE_WARPS} * {nw}, 32)), (3, ({g0}, {g1}, {nc}), {w[2]})):"]
        new.append("    " + call[0])
        new += [f"            {a}," for a in call_args]
        new += [f"            num_warps={warps},", "    " + call[-1]]
        return "\n".join(lines[:at] + new + lines[end:]) + "\n"
