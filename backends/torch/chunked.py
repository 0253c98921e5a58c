"""The chunked lowering: states of the shared chunked-form analysis
(``scancc.ir.passes.chunked``) as batched matmuls per chunk, carried across chunks.

For a state S [grid..., K, V] with injected term k_s v_s (k along K, v along V, scale factors
folded into v), log decay g_s (per grid index, or along K) and a readout contraction
``sum(S * q, K)``, with c the in-chunk cumulative sums of g (module doc of the analysis)::

    o_t   = sum_{s<=t} (q_t . (k_s * e^{c_t - c_s})) v_s  +  (q_t * e^{c_t}) S
    S_new = e^{c_last} * S  +  sum_s (k_s * e^{c_last - c_s}) v_s^T

- identity / scalar decay (linear attention, RetNet, simple GLA, Mamba2): SSD, the decay
  matrix ``exp(c_t - c_s)`` masked to s <= t ("segsum" in log space) times ``q k^T``, then
  ``@ v``; two matmuls per chunk plus two for the state;
- key-diagonal decay (GLA): the scores ``sum_K q_t k_s exp(c_t - c_s)`` for s <= t by halving
  (rules.py ``_diag_decay_scores``: a pair across the halves of a block goes through the first
  half's last step, a batched matmul per block size; no exp of a positive cumulative sum).

Edges (the analysis' module doc): a log decay at or below ``RESET_LOG_DECAY`` is a hard reset:
it never enters a cumulative sum; the decay between s < t is 0 when a reset lies in (s, t]
(counted by a cumulative count of resets). Masks are selects (``torch.where``), never
multiplications by 0, so a non-finite factor reaches the outputs of the steps at or after it.

Other identity/scalar/diagonal states (a state axis: mamba, s4d, hgrn) use the parallel
prefix scan of recurrent.py; any other state keeps the step loop.
"""
from __future__ import annotations

from scancc.ir import Kind
from scancc.ir.passes.chunked import RESET_LOG_DECAY, analyze, product

from .recurrent import SCAN_KINDS, ScanLowering

MATMUL_KINDS = (Kind.IDENTITY, Kind.SCALAR, Kind.DIAGONAL, Kind.HOUSEHOLDER)


def matmul_states(rec) -> dict:
    """The states the matmul form takes: analysed chunkable, a supported kind, and every
    factor within the state's dims."""
    out = {}
    for name, cs in analyze(rec).states.items():
        if cs.kind not in MATMUL_KINDS:
            continue
        s = next(x for x in rec.states if x.name == name)
        dims = set(s.dims)
        if all(set(rec.dims_of(c.q)) <= dims for c in cs.contractions):
            out[name] = cs
    return out


def scan_states(rec) -> list[str]:
    """The states the prefix scan or the window forms take (identity/scalar/diagonal, shift,
    companion with time-invariant feedback)."""
    low = ScanLowering(rec, {})
    return [s.name for s in low.rec.states if low.scan_state(s)]


def window_states(rec) -> list[str]:
    """Shift states and companion states with time-invariant feedback."""
    kinds = {s.name: s.transition.kind for s in rec.states}
    return [n for n in scan_states(rec) if kinds[n] not in SCAN_KINDS[:3]]


def applies(rec) -> tuple[bool, str]:
    if matmul_states(rec) or scan_states(rec):
        return True, ""
    reasons = "; ".join(f"{k}: {v}" for k, v in analyze(rec).reasons.items())
    return False, ("no identity, scalar or diagonal state (the prefix scan) and no state the "
                   f"matmul form takes ({reasons})")


def lowering(rec, options):
    return ChunkedLowering(rec, options)


class ChunkedLowering(ScanLowering):
    algorithm = "chunked"
    DIAG_CHUNK = 128  # default chunk where a state has a key-diagonal decay (GLA): its scores
    # cost O(n K log n) elementwise work per chunk (halving), so longer chunks mostly save
    # per-chunk Python overhead (measured: docs/performance/torch.md)

    def __init__(self, rec, options):
        super().__init__(rec, options)
        self.mm = matmul_states(self.rec)
        self.S = {s: self.names.ir("S_", s) for s in self.mm}

    def default_chunk(self) -> int | None:
        if any(cs.kind is Kind.DIAGONAL for cs in self.mm.values()):
            return self.DIAG_CHUNK
        return super().default_chunk()

    # ---- layouts: canonical [n|1, canon...] <-> matmul [grid..., n, feature] ----
    def _split(self, cs):
        state = next(x for x in self.rec.states if x.name == cs.state)
        G = [self.ax(d) for d in cs.grid]
        X = [self.ax(d) for d in self.canon if d not in state.dims]
        return G, X

    def rows(self, cs, v: str, feat: str, other: str | None, time: bool = True) -> str:
        """A canonical chunk value as [grid..., n, |feat|] (``other`` dropped: size 1), or
        [grid..., n] when ``feat`` is None."""
        G, X = self._split(cs)
        drop = [self.ax(d) for d in (cs.K, cs.V) if d != feat]
        perm = G + X + [0] + ([self.ax(feat)] if feat else []) + drop
        idx = [":"] * len(G) + ["0"] * len(X) + [":"] + ([":"] if feat else []) + \
            ["0"] * len(drop)
        sizes = ["-1"] * len(G) + [self.n] + ([self.size[feat]] if feat else [])
        return (f"{self.par(self.tensor(v))}.permute({', '.join(map(str, perm))})"
                f"[{', '.join(idx)}].expand({', '.join(sizes)})")

    def state_to_mm(self, cs, h: str) -> str:
        G, X = self._split(cs)
        perm = [g - 1 for g in G] + [x - 1 for x in X] + [self.ax(cs.K) - 1, self.ax(cs.V) - 1]
        idx = [":"] * len(G) + ["0"] * len(X) + [":", ":"]
        if perm != sorted(perm):
            h = f"{h}.permute({', '.join(map(str, perm))})"
        if X:
            h = f"{h}[{', '.join(idx)}]"
        return f"{h}.contiguous()"

    def state_from_mm(self, cs, S: str) -> str:
        G, X = self._split(cs)
        labels = [a - 1 for a in G] + [self.ax(cs.K) - 1, self.ax(cs.V) - 1] + \
            [a - 1 for a in X]
        idx = ", ".join(["..."] + ["None"] * len(X))
        perm = [labels.index(a) for a in range(len(self.canon))]
        v = f"{S}[{idx}]" if X else S
        return v if perm == sorted(perm) else f"{v}.permute({', '.join(map(str, perm))})"

    def out_to_canon(self, cs, o: str) -> str:
        """[grid..., n, V] -> canonical [n, canon...] (K and the other dims of size 1)."""
        G, X = self._split(cs)
        labels = G + [0, self.ax(cs.V), self.ax(cs.K)] + X
        idx = ", ".join(["..."] + ["None"] * (1 + len(X)))
        perm = [labels.index(a) for a in range(len(self.canon) + 1)]
        return f"{o}[{idx}].permute({', '.join(map(str, perm))})"

    # ---- the states over a chunk ----
    def state_chunk(self, s) -> None:
        cs = self.mm.get(s.name)
        if cs is None:
            return super().state_chunk(s)
        B, nm, S = self._body, self.names.new, self.S[s.name]
        kv = self.emit(product(cs.k_side))
        vv = self.emit(product(cs.v_side + cs.scale_side))
        k, v = nm("k"), nm("v")
        B.append(f"        # {s.name}: {cs.kind.value} decay, chunked as matmuls "
                 f"(K={cs.K}, V={cs.V}, grid {', '.join(cs.grid) or '-'})")
        B.append(f"        {k} = {self.rows(cs, kv, cs.K, cs.V)}")
        B.append(f"        {v} = {self.rows(cs, vv, cs.V, cs.K)}")
        # non-finite factors: the matmuls see 0, the poison is added back where the
        # recurrence puts it (steps at or after the factor; its rows / columns of the state)
        kbad, vbad = nm("k_bad"), nm("v_bad")
        B.append(f"        {kbad}, {vbad} = ~torch.isfinite({k}), ~torch.isfinite({v})")
        B.append(f"        {k} = torch.where({kbad}, 0.0, {k})")
        B.append(f"        {v} = torch.where({vbad}, 0.0, {v})")
        qs, qbads = [], []
        for c in cs.contractions:
            q, qbad = nm("q"), nm("q_bad")
            B.append(f"        {q} = {self.rows(cs, self.emit(c.q), cs.K, cs.V)}")
            B.append(f"        {qbad} = (~torch.isfinite({q})).any(-1)")
            B.append(f"        {q} = torch.where(torch.isfinite({q}), {q}, 0.0)")
            qs.append(q)
            qbads.append(qbad)
        hh = cs.kind is Kind.HOUSEHOLDER
        if hh:  # the reflections h_s (along K) and beta_s: sanitized, poison added back below
            hk, beta, hbad = nm("hk"), nm("beta"), nm("h_bad")
            B.append(f"        {hk} = {self.rows(cs, self.emit(cs.hk), cs.K, cs.V)}")
            B.append(f"        {beta} = {self.rows(cs, self.emit(cs.beta), None, cs.V)}")
            B.append(f"        {hbad} = (~torch.isfinite({hk})).any(-1) | "
                     f"~torch.isfinite({beta})")
            B.append(f"        {hk} = torch.where(torch.isfinite({hk}), {hk}, 0.0)")
            B.append(f"        {beta} = torch.where(torch.isfinite({beta}), {beta}, 0.0)")
        diag = cs.kind is Kind.DIAGONAL
        causal = nm("causal")
        if not diag:
            B.append(f"        {causal} = torch.ones({self.n}, {self.n}, dtype=torch.bool, "
                     "device=dev).tril()")
        if cs.decay is None and hh:  # no alpha: the decays are 1
            D, w_in, w_end, decay_S = nm("D"), nm("w_in"), nm("w_end"), nm("decay_S")
            B.append(f"        {D} = {causal}.to(acc)")
            B.append(f"        {w_in} = torch.ones_like({beta})")
            B.append(f"        {w_end}, {decay_S} = {w_in}, {w_in}[..., -1:]")
            gbad = None
        elif cs.kind is Kind.IDENTITY:
            w_in = w_end = decay_S = None
            D = nm("D")
            B.append(f"        {D} = {causal}.to(acc)")
        else:
            g, r, c, R = nm("g"), nm("reset"), nm("c"), nm("R")
            gv = self.emit(cs.log_decay)
            B.append(f"        {g} = {self.rows(cs, gv, cs.K if diag else None, cs.V)}")
            B.append(f"        {r} = {g} <= {RESET_LOG_DECAY!r}  # hard resets")
            gbad = nm("g_bad")
            B.append(f"        {gbad} = torch.isnan({g}) | ({g} == float(\"inf\"))")
            B.append(f"        {g} = torch.where({gbad}, 0.0, {g})")
            tax = -2 if diag else -1
            B.append(f"        {c} = torch.where({r}, 0.0, {g}).cumsum({tax})  "
                     "# log-space cumulative decay")
            B.append(f"        {R} = {r}.to(torch.int32).cumsum({tax})  # resets up to t")
            last = "[..., -1:, :]" if diag else "[..., -1:]"
            D, keep, seg = nm("D"), nm("keep"), nm("seg")
            if diag:  # the decays of each pair of steps: inside _diag_decay_scores
                self.helper("diag_scores")
            else:
                B.append(f"        {keep} = {causal} & ({R}[..., :, None] == {R}[..., None, :])")
                B.append(f"        {seg} = {c}[..., :, None] - {c}[..., None, :]")
                B.append(f"        {D} = torch.where({keep}, torch.exp(torch.where({keep}, "
                         f"{seg}, 0.0)), 0.0)  # decay from s to t")
            w_in, w_end, decay_S = nm("w_in"), nm("w_end"), nm("decay_S")
            B.append(f"        {w_in} = torch.where({R} == 0, torch.exp({c}), 0.0)  "
                     "# decay of the entering state to t")
            B.append(f"        {w_end} = torch.where({R}{last} == {R}, torch.exp({c}{last} - "
                     f"{c}), 0.0)  # decay from s to the chunk's end")
            B.append(f"        {decay_S} = {w_in}{last}")
        rows_bad, cols_bad = nm("rows_bad"), nm("cols_bad")
        if hh:  # a non-finite k, reflection, beta or alpha poisons the whole state
            all_bad = f"{kbad}.any(-1) | {hbad}" + ("" if gbad is None else f" | {gbad}")
            B.append(f"        {rows_bad} = (({all_bad}).cumsum(-1) > 0)[..., None]  "
                     "# [grid, n, 1]: poisoned rows (all)")
        elif cs.kind is Kind.IDENTITY:
            B.append(f"        {rows_bad} = {kbad}.cumsum(-2) > 0  # [grid, n, K]: poisoned rows")
        elif diag:
            B.append(f"        {rows_bad} = ({kbad} | {gbad}).cumsum(-2) > 0  "
                     "# [grid, n, K]: poisoned rows")
        else:
            B.append(f"        {rows_bad} = ({kbad} | {gbad}[..., None]).cumsum(-2) > 0  "
                     "# [grid, n, K]: poisoned rows")
            B.append(f"        {rows_bad} = {rows_bad} | ({gbad}.cumsum(-1) > 0)[..., None]")
        B.append(f"        {cols_bad} = {vbad}.cumsum(-2) > 0  # [grid, n, V]: poisoned columns")
        if hh:
            strict, M, N, rho = nm("strict"), nm("M"), nm("N"), nm("rho")
            B.append("        # the UT form: rho_t = beta_t h_t . S_(t-1) (times alpha_t) for all t "
                     "of the chunk at once,")
            B.append("        # (I + M) rho = beta (e^c_t h_t S_0 + N v), M and N strictly lower (UT)")
            B.append(f"        {strict} = torch.where({causal}, {D}, 0.0).tril(-1)")
            B.append(f"        {M} = {beta}[..., None] * ({hk} @ {hk}.transpose(-1, -2)) * {strict}")
            B.append(f"        {N} = ({hk} @ {k}.transpose(-1, -2)) * {strict}")
            B.append(f"        {rho} = torch.linalg.solve_triangular({M}, {beta}[..., None] * "
                     f"({w_in}[..., None] * ({hk} @ {S}) + {N} @ {v}), upper=False, "
                     "unitriangular=True)")
        for cn, q, qbad in zip(cs.contractions, qs, qbads):
            o = nm("o")
            if hh:
                B.append(f"        {o} = ({q} @ {k}.transpose(-1, -2) * {D}) @ {v} - "
                         f"({q} @ {hk}.transpose(-1, -2) * {D}) @ {rho} + "
                         f"{w_in}[..., None] * ({q} @ {S})")
            elif diag:
                B.append(f"        {o} = _diag_decay_scores({q}, {k}, {c}, {R}) @ {v}"
                         f" + ({q} * {w_in}) @ {S}")
            elif w_in is None:
                B.append(f"        {o} = ({q} @ {k}.transpose(-1, -2) * {D}) @ {v} + {q} @ {S}")
            else:
                B.append(f"        {o} = ({q} @ {k}.transpose(-1, -2) * {D}) @ {v} + "
                         f"{w_in}[..., None] * ({q} @ {S})")
            B.append(f"        {o} = torch.where({rows_bad}.any(-1, keepdim=True) | {cols_bad} | "
                     f"{qbad}[..., None], float(\"nan\"), {o})")
            out = nm("y_" + s.name)
            B.append(f"        {out} = {self.out_to_canon(cs, o)}")
            self._memo[cn.node] = out
        if hh:
            B.append(f"        {S} = {decay_S}[..., None] * {S} + ({k} * {w_end}[..., None])"
                     f".transpose(-1, -2) @ {v} - ({hk} * {w_end}[..., None]).transpose(-1, -2)"
                     f" @ {rho}")
        elif w_in is None:
            B.append(f"        {S} = {S} + {k}.transpose(-1, -2) @ {v}")
        elif diag:
            B.append(f"        {S} = {decay_S}.transpose(-1, -2) * {S} + "
                     f"({k} * {w_end}).transpose(-1, -2) @ {v}")
        else:
            B.append(f"        {S} = {decay_S}[..., None] * {S} + "
                     f"({k} * {w_end}[..., None]).transpose(-1, -2) @ {v}")
        B.append(self._poison_state(S, rows_bad, cols_bad))

    def _poison_state(self, S: str, rows_bad: str, cols_bad: str) -> str:
        return (f"        {S} = torch.where({rows_bad}[..., -1, :, None] | "
                f"{cols_bad}[..., -1, None, :], float(\"nan\"), {S})")

    def render_function(self) -> str:
        for name, cs in self.mm.items():  # the state lives in the matmul layout in the loop
            self._before_loop.append(f"    {self.S[name]} = "
                                     f"{self.state_to_mm(cs, self.state_var[name])}  "
                                     "# [grid..., K, V]")
            self._after_loop.append(f"    {self.state_var[name]} = "
                                    f"{self.state_from_mm(cs, self.S[name])}")
        return super().render_function()


__all__ = ["ChunkedLowering", "applies", "lowering", "matmul_states", "scan_states",
           "window_states", "MATMUL_KINDS"]
