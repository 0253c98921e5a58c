"""The chunked backward of householder transitions (delta_net, gated_delta_net and registered
recurrences of that structure), in the WY/UT form of the forward (``chunked.Lowering.
_householder_chunk``), as fla's chunk_(gated_)delta_rule backward -- in torch ops, batched over
(grid, chunks): the torch-glue step of docs/training.md, not Triton kernels.

Per grid index, with alpha_t = e^{g_t} (1 without a decay), beta_t, the reflection's k_t, the
injected u_t (along K) and w_t (along V), and the readout's q_t:

    S_t = alpha_t (I - beta_t k_t k_tᵀ) S_{t-1} + u_t w_tᵀ,    O_t = S_tᵀ q_t.

For a chunk of BT steps (c the in-chunk cumulative log-decays, S the state entering it,
r_tᵀ = k_tᵀ S_{t-1}, P_t = alpha_t beta_t, Γ'[t,i] = e^{c_{t-1}-c_i} (i < t),
Γ[t,i] = e^{c_t-c_i} (i <= t)):

    M = (K Kᵀ) ⊙ Γ' ⊙ 1Pᵀ,   N = (K Uᵀ) ⊙ Γ',   T⁻¹ = (I + M)⁻¹ (unit lower triangular)
    R = T⁻¹ X,               X = e^{c_{t-1}} ⊙ (K S) + N W
    O = e^{c} ⊙ (Q S) - A_qk R + A_qu W,      A_qk = (Q Kᵀ) ⊙ Γ ⊙ 1Pᵀ,  A_qu = (Q Uᵀ) ⊙ Γ
    S' = e^{c_L} S - (K ⊙ P ⊙ e^{c_L - c})ᵀ R + (U ⊙ e^{c_L - c})ᵀ W  =  Φ S + B

1. boundary states: S_{i+1} = Φ_i S_i + B_i sequentially over chunks ([G, NC, K, V]: chunk
   boundaries only; in the kernel below, Φ S as two products through Wy);
2. dh in reverse over chunks: dS_i = Φ_iᵀ dh_i + (Q ⊙ e^{c})ᵀ dO_i
   - (K ⊙ e^{c_{t-1}})ᵀ T⁻ᵀ A_qkᵀ dO_i (the constant part batched first);
3. the per-chunk gradients (dq, dk, du, dw, dbeta, dg) of <O, dO> + <S', dh> with S and dh
   fixed, derived by hand (``_local_grads``), all chunks in one batch of products:

       dR = -A_qkᵀ dO - (K ⊙ P ⊙ e^{c_L - c}) dh
       dX = (I + M)⁻ᵀ dR,   dM = -dX Rᵀ          (the triangular solve's gradient)
       dA_qk = -dO Rᵀ,  dA_qu = dO Wᵀ,  dN = dX Wᵀ

   then through the products (dq = e^{c} ⊙ dO Sᵀ + (dA_qk ⊙ Γ ⊙ 1Pᵀ) K + (dA_qu ⊙ Γ) U, ...),
   dP from the column scalings (dbeta = dP alpha), and the log-decay by the exponents: each
   tile is e^{(c_a - c_b)}, so dTile ⊙ Tile adds to c_a and takes from c_b; c_{t-1} = c_t - g_t,
   and dg is the reverse cumulative sum of dc (fla's identity) plus the alpha in P.
   Nothing per step of the state is stored: the tiles are per-chunk [BT, BT] and [BT, K|V].

What runs where: the two sequential passes (1 and 2) are Triton kernels
(``chunked_backward_kernels.hh_fwd_h`` / ``hh_bwd_dh``: S' = e^{c_L} S - kdᵀ (Wy S + Y) + udᵀ W
and dS = e^{c_L} dh - Wyᵀ (kd dh + A_qkᵀ dO) + (Q ⊙ e^{c})ᵀ dO, with Wy = T⁻¹ (K ⊙ e^{c_{t-1}})
and Y = T⁻¹ N W batched here; Φ is never formed); the rest is torch ops batched over (grid,
chunks) on the inputs' device (docs/training.md, "householder").

Resets (log-decay <= RESET_LOG_DECAY) are counted, not summed, as the forward does:
every e^{c_t - c_s} is 0 across one, alpha is 0 at one, and its dg is 0.
"""
from __future__ import annotations

RESET_LOG_DECAY = -87.33654475055310898657  # scancc.ir.passes.chunked (test checks)
# the sequential passes' row sub-block and pipeline depth: a chunk's [BT, K] tiles taken 16
# rows at a time, unpipelined (ptxas at K=V=128, 8 warps, [128, 32] state tiles: 0 spill
# bytes, 16-28 KB shared memory; 32 rows spill 120-372 B, 2 stages take 196-221 KB:
# docs/performance/training.md)
HH_BS, HH_STAGES = 16, 1


def _chunk_terms(torch, q, k, u, w, beta, g, BT):
    """Per-chunk tiles of [G, NC, BT, ...] factors (g None: no decay)."""
    dev, f32 = q.device, q.dtype
    idx = torch.arange(BT, device=dev)
    strict = idx[:, None] > idx[None, :]
    causal = idx[:, None] >= idx[None, :]
    ninf = torch.tensor(float("-inf"), dtype=f32, device=dev)
    if g is not None:
        reset = g <= RESET_LOG_DECAY
        gz = torch.where(reset, torch.zeros_like(g), g)
        c = gz.cumsum(-1)
        n = reset.to(torch.int32).cumsum(-1)
        n_prev = n - reset.to(torch.int32)
        c_prev = c - gz
        alpha = torch.exp(torch.where(reset, ninf, gz))
        ab = alpha * beta
        seg_prev = torch.exp(torch.where(strict & (n_prev[..., :, None] == n[..., None, :]),
                                         c_prev[..., :, None] - c[..., None, :], ninf))
        seg = torch.exp(torch.where(causal & (n[..., :, None] == n[..., None, :]),
                                    c[..., :, None] - c[..., None, :], ninf))
        e_prev = torch.exp(torch.where(n_prev == 0, c_prev, ninf))
        e_now = torch.exp(torch.where(n == 0, c, ninf))
        cL, nL = c[..., -1:], n[..., -1:]
        e_last = torch.exp(torch.where(nL == 0, cL, ninf))          # [G, NC, 1]
        to_end = torch.exp(torch.where(n == nL, cL - c, ninf))
    else:
        ab = beta
        one = torch.ones((), dtype=f32, device=dev)
        seg_prev = torch.where(strict, one, 0.0).expand(q.shape[:-2] + (BT, BT))
        seg = torch.where(causal, one, 0.0).expand(q.shape[:-2] + (BT, BT))
        e_prev = e_now = to_end = torch.ones(q.shape[:-1], dtype=f32, device=dev)
        e_last = torch.ones(q.shape[:-2] + (1,), dtype=f32, device=dev)
    kt, ut = k.transpose(-1, -2), u.transpose(-1, -2)
    KK, KU, QK, QU = k @ kt, k @ ut, q @ kt, q @ ut
    M = KK * seg_prev * ab[..., None, :]
    N = KU * seg_prev
    eye = torch.eye(BT, dtype=f32, device=dev)
    A_qk = QK * seg * ab[..., None, :]
    A_qu = QU * seg
    return dict(M=M, N=N, Tm=eye + M, A_qk=A_qk, A_qu=A_qu, ab=ab, e_prev=e_prev,
                e_now=e_now, e_last=e_last, to_end=to_end, seg=seg, seg_prev=seg_prev,
                alpha=alpha if g is not None else None,
                reset=reset if g is not None else None, KK=KK, KU=KU, QK=QK, QU=QU)


def _solve(torch, Tm, X):
    return torch.linalg.solve_triangular(Tm, X, upper=False, unitriangular=True)


def _local_grads(torch, q, k, u, w, beta, g, S, dh, dO, t, wy, Y):
    """The per-chunk gradients of <O, dO> + <S', dh> (S, dh fixed), derived by hand (module
    doc; every product batched over grid and chunks); wy, Y: the passes' T⁻¹ (K ⊙ e^{c_{t-1}})
    and T⁻¹ N w, so R = T⁻¹ X = wy S + Y. Returns [dq, dk, du, dw, dbeta, dg]
    (dg None without a decay)."""
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    Tm, ab, seg, segp = t["Tm"], t["ab"], t["seg"], t["seg_prev"]
    e_prev, e_now, e_last, to_end = t["e_prev"], t["e_now"], t["e_last"], t["to_end"]
    kS, qS = k @ S, q @ S
    R = wy @ S + Y
    kd_s = ab * to_end                                   # kd = k ⊙ kd_s
    # through O = e_now ⊙ (q S) - A_qk R + A_qu w and S' = e_last S - kdᵀ R + udᵀ w
    dR = -tr(t["A_qk"]) @ dO - (k * kd_s[..., None]) @ dh
    # the triangular solve R = (I + M)⁻¹ X: dX = (I + M)⁻ᵀ dR, dM = -dX Rᵀ
    dX = torch.linalg.solve_triangular(tr(Tm), dR, upper=True, unitriangular=True)
    dM = -(dX @ tr(R))
    dA_qk, dA_qu, dN = -(dO @ tr(R)), dO @ tr(w), dX @ tr(w)
    dkd, dud = -(R @ tr(dh)), w @ tr(dh)                 # [BT, K]
    # the products' gradients before the masks/decays
    abT = ab[..., None, :]
    dKK = dM * segp * abT
    dKU = dN * segp
    dQK = dA_qk * seg * abT
    dQU = dA_qu * seg
    dq = e_now[..., None] * (dO @ tr(S)) + dQK @ k + dQU @ u
    dk = (dKK + tr(dKK)) @ k + dKU @ u + e_prev[..., None] * (dX @ tr(S)) + tr(dQK) @ q \
        + dkd * kd_s[..., None]
    du = tr(dKU) @ k + tr(dQU) @ q + dud * to_end[..., None]
    dw = tr(t["A_qu"]) @ dO + tr(t["N"]) @ dX + (u * to_end[..., None]) @ dh
    KK, KU, QK, QU = t["KK"], t["KU"], t["QK"], t["QU"]
    kdk = (dkd * k).sum(-1)
    dab = (dM * KK * segp).sum(-2) + (dA_qk * QK * seg).sum(-2) + kdk * to_end
    O = e_now[..., None] * qS - t["A_qk"] @ R + t["A_qu"] @ w
    if t["alpha"] is None:
        return [dq, dk, du, dw, dab, None, O]
    alpha = t["alpha"]
    dbeta = dab * alpha
    # the log-decay: every tile is e^{(difference of c)}; P = dTile ⊙ Tile is its exponent's
    # gradient, 0 wherever a mask (causality, a reset between) made the tile 0
    dsegp = dM * KK * abT + dN * KU
    dseg = dA_qk * QK * abT + dA_qu * QU
    Pp, P = dsegp * segp, dseg * seg
    de_prev = (dX * kS).sum(-1) * e_prev
    de_now = (dO * qS).sum(-1) * e_now
    dto = (kdk * ab + (dud * u).sum(-1)) * to_end
    de_last = (dh * S).sum((-1, -2)) * e_last[..., 0]
    dc_prev = Pp.sum(-1) + de_prev
    dc = -Pp.sum(-2) + P.sum(-1) - P.sum(-2) + de_now - dto + dc_prev
    dc[..., -1] += de_last + dto.sum(-1)
    dgz = dc.flip(-1).cumsum(-1).flip(-1) - dc_prev + dab * beta * alpha
    dg = torch.where(t["reset"], torch.zeros_like(dgz), dgz)
    return [dq, dk, du, dw, dbeta, dg, O]


def backward(q, k, u, w, beta, g, dO, h0, dht, BT, new, cfg, kernels):
    """Gradients of the householder chunked form. Factors [G, T, K|V] (beta, g: [G, T]; g
    None without a decay), float32; h0, dht [G, K, V] or None; ``new`` allocates the boundary
    buffers (NaN-poisoned under test); ``cfg`` the kernels' ``chunked_backward.Config`` (its
    V block, warps and dot precision; K whole per program), ``kernels`` (hh_fwd_h, hh_bwd_dh)
    from ``chunked_backward.householder_kernels``. Returns (dq, dk, du, dw, dbeta, dg or None,
    dh0, O), O the contraction (recomputed per chunk, for gradients that read it)."""
    import torch
    G, T, K = q.shape
    V = w.shape[-1]
    NC = -(-T // BT)
    pad = NC * BT - T

    def chunks(x):   # zero padding: beta = u = 0, g = 0 -- identity steps after the end
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad))
        return x.reshape((G, NC, BT) + tuple(x.shape[2:]))
    cq, ck, cu, cw, cb, cdo = (chunks(x) for x in (q, k, u, w, beta, dO))
    cg = chunks(g) if g is not None else None
    hc, dhc, dh0 = new(G, NC, K, V), new(G, NC, K, V), new(G, K, V)
    with torch.no_grad():
        t = _chunk_terms(torch, cq, ck, cu, cw, cb, cg, BT)
        # the WY/UT terms of the two sequential passes (kernels' module doc), batched
        ke = ck * t["e_prev"][..., None]                                       # [G,NC,BT,K]
        wy = _solve(torch, t["Tm"], ke)                                        # T⁻¹ ke
        Y = _solve(torch, t["Tm"], t["N"] @ cw)                                # T⁻¹ N w
        kd = ck * (t["ab"] * t["to_end"])[..., None]
        ud = cu * t["to_end"][..., None]
        qe = cq * t["e_now"][..., None]
        el = t["e_last"][..., 0].contiguous()                                  # [G, NC]
        c = lambda x: x.contiguous()  # noqa: E731 - [G, NC, BT, F]: [G, NC * BT, F] rows
        wy, Y, kd, ud, qe, A_qk, cw_, cdo_ = (c(x) for x in (wy, Y, kd, ud, qe, t["A_qk"],
                                                              cw, cdo))
        fwd_h, bwd_dh = kernels
        BK = max(16, 1 << max(0, (K - 1).bit_length()))
        BV = cfg.BVH or cfg.BV
        kw = dict(BT=BT, BS=min(BT, HH_BS), BK=BK, BV=BV, PREC=cfg.precision,
                  num_warps=cfg.num_warps, num_stages=HH_STAGES)
        grid = (G, -(-V // BV))
        import numpy as np
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            fwd_h[grid](wy, kd, ud, Y, cw_, el, h0 if h0 is not None else wy, hc, K, V, NC,
                        HAS_H0=h0 is not None, **kw)
            bwd_dh[grid](wy, kd, qe, A_qk, cdo_, el, dht if dht is not None else wy, dhc, dh0,
                         K, V, NC, HAS_DHT=dht is not None, **kw)
        gr = _local_grads(torch, cq, ck, cu, cw, cb, cg, hc, dhc, cdo, t, wy, Y)
    def unchunk(x):
        return x.reshape((G, NC * BT) + tuple(x.shape[3:]))[:, :T].contiguous()
    dq, dk, du, dw, dbeta = (unchunk(x) for x in gr[:5])
    dg = unchunk(gr[5]) if cg is not None else None
    return dq, dk, du, dw, dbeta, dg, dh0, unchunk(gr[6])


__all__ = ["backward", "RESET_LOG_DECAY"]
