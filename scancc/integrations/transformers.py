"""Hugging Face transformers models on scancc kernels: ``patch(model, target)`` / ``unpatch``.

transformers (5.x) writes each state-space mixer's scan as module-level functions with
mamba_ssm's contracts, copied verbatim into every model file that uses them:

- the Mamba (S6) family — ``mamba_selective_scan`` (prefill) and
  ``mamba_selective_state_update`` (decode) — in mamba, falcon_mamba, jamba, zamba;
- the Mamba2 (SSD) family — ``mamba2_chunk_scan`` (prefill) and
  ``mamba2_selective_state_update`` (decode) — in mamba2, bamba, granitemoehybrid, zamba2,
  nemotron_h, falcon_h1;
- the gated delta rule — ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule``
  — in qwen3_next;
- Kimi Delta Attention — ``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention``
  (fla's ``chunk_kda`` / ``fused_recurrent_kda`` contract) — in kimi_linear.

``patch`` replaces those module globals by dispatchers (once per model file) and wraps each
supported mixer's ``forward`` (an instance attribute) so that, while *that* mixer runs, the
dispatchers call scancc (``kernel(...)`` for the prefill scan, ``kernel.step(...)`` on the
model's cache tensor for decode). Everything else — projections, conv1d and its cache, the
gated norm, the cache classes, ``generate()``, weights and state-dict names — stays the
model's own code. Models not patched (or unpatched) call the original functions unchanged.
Anything that looks like a sequence mixer but is not supported is reported by name.

Packed batches: the packing keywords a model forwards to these functions (``cu_seq_lens_q``,
mamba_ssm's ``seq_idx``, fla's ``cu_seqlens``) become scancc's ``cu_seqlens`` (varlen), and
the model's ``causal_conv1d_fn`` — dispatched the same way — keeps the packed sequences apart
too (docs/integrations.md, "Packed prefill").
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import math
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["patch", "unpatch", "PatchReport", "SUPPORTED_FUNCTIONS"]

# module-level function name -> (scancc recurrence, role)
SUPPORTED_FUNCTIONS = {
    "mamba_selective_scan": ("mamba", "scan"),
    "mamba_selective_state_update": ("mamba", "step"),
    "mamba2_chunk_scan": ("mamba2", "scan"),
    "mamba2_selective_state_update": ("mamba2", "step"),
    "torch_chunk_gated_delta_rule": ("gated_delta_net", "scan"),
    "torch_recurrent_gated_delta_rule": ("gated_delta_net", "step"),
    "chunk_kimi_delta_attention": ("kda", "scan"),
    "recurrent_kimi_delta_attention": ("kda", "step"),
}

# names of module-level functions that are a sequence mixer's recurrence (for reporting what
# is *not* supported): a mixer whose forward calls one of these and none of the above
_RECURRENCE_NAME = re.compile(r"scan|delta_rule|delta_attention|recurren|selective|wkv|_gla|"
                              r"retention|linear_attn", re.I)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("scancc_transformers_patch",
                                                          default=None)


@dataclass
class PatchReport:
    """What ``patch`` did: ``patched`` (module name, class name, recurrence), ``unsupported``
    (module name, class name, reason) and ``calls``, a live Counter of the scancc calls made
    (``"mamba.scan"``, ``"mamba2.step"``, ...) and of fallbacks to the model's own function
    (``"mamba2.step.fallback"``), so a caller can check the kernels really ran."""
    target: str
    patched: list = field(default_factory=list)
    unsupported: list = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)

    def __str__(self):
        lines = [f"scancc patch (target {self.target!r}): {len(self.patched)} mixer(s) patched"]
        lines += [f"  patched {n} ({c}) -> {r}" for n, c, r in self.patched]
        lines += [f"  UNSUPPORTED {n} ({c}): {why}" for n, c, why in self.unsupported]
        return "\n".join(lines)


class _Config:
    """One patch's backend choice and its compiled kernels (keyed by recurrence options)."""

    def __init__(self, target, options, report):
        self.target, self.options, self.report = target, dict(options), report
        self.kernels = {}

    def kernel(self, name, **rec_options):
        key = (name, tuple(sorted(rec_options.items())))
        k = self.kernels.get(key)
        if k is None:
            import scancc
            k = scancc.compile(name, self.target, options=self.options or None, **rec_options)
            self.kernels[key] = k
        return k



# ---- packed batches: the model's packing keywords -> scancc's cu_seqlens ----

# the keywords a transformers model forwards to its mixer functions for a packed batch:
# mamba_ssm's ``seq_idx`` [B, L] (segment ids), flash-attention's ``cu_seq_lens_q`` [N+1]
# (what DataCollatorWithFlattening emits) and fla's ``cu_seqlens`` (Qwen3-Next passes its
# cu_seq_lens_q under that name)
_PACKING_KEYS = ("cu_seqlens", "cu_seq_lens_q", "seq_idx")


def _seq_idx_to_cu(seq_idx, T):
    """mamba_ssm's ``seq_idx`` [1, T] -> cu_seqlens [N+1] (int64, on the host), or None when
    it is not a contiguous segment id (an id that comes back after another one: mamba_ssm's
    kernels give that no clean meaning)."""
    import torch
    s = seq_idx.reshape(-1).to("cpu", torch.int64)
    if s.numel() != T:
        return None
    starts = (torch.nonzero(s[1:] != s[:-1]).reshape(-1) + 1).tolist()
    ids = [int(s[0])] + [int(s[i]) for i in starts]
    if len(set(ids)) != len(ids):
        return None
    return torch.tensor([0] + starts + [T], dtype=torch.int64)


def _packing(kwargs, T, batch):
    """(cu_seqlens or None, ok): the packed batch a mixer function was given, as scancc's
    ``cu_seqlens``; ok False when there is packing information scancc cannot take (batch > 1,
    a non-contiguous seq_idx, an inconsistent cu), which the caller routes to the model's own
    function (counted as a fallback)."""
    import torch
    given = {k: kwargs.get(k) for k in _PACKING_KEYS if kwargs.get(k) is not None}
    if not given:
        return None, True
    if batch != 1:
        return None, False
    cu = None
    for k in ("cu_seqlens", "cu_seq_lens_q"):
        if k in given:
            cu = given[k].reshape(-1).to("cpu", torch.int64)
            break
    if "seq_idx" in given:
        from_idx = _seq_idx_to_cu(given["seq_idx"], T)
        if from_idx is None or (cu is not None and not torch.equal(cu, from_idx)):
            return None, False
        cu = from_idx
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
        return None, False
    return cu, True


def _segment_ids(cu, T, device):
    """cu_seqlens [N+1] -> the segment id of each of the T positions."""
    import torch
    return torch.repeat_interleave(torch.arange(len(cu) - 1),
                                   (cu[1:] - cu[:-1]).to(torch.int64)).to(device)


def _conv(cfg, original, hidden_states, weight, bias=None, activation=None, **kwargs):
    """causal_conv1d_fn (the model's depthwise causal conv before the scan) for a packed
    batch: each tap reads only positions of the same sequence (causal_conv1d's ``seq_idx``
    semantics: zero padding at every sequence start). Without packing information, or outside
    a patched mixer, the model's own function runs unchanged. x [B, C, L], weight [C, W]."""
    import torch.nn.functional as F
    B, C, L = hidden_states.shape
    cu, ok = _packing(kwargs, L, B)
    if cu is None or not ok:
        if not ok:
            cfg.report.calls["conv.fallback"] += 1
        return original(hidden_states, weight, bias, activation=activation, **kwargs)
    W = weight.shape[-1]
    seg = _segment_ids(cu, L, hidden_states.device)
    x = F.pad(hidden_states.to(weight.dtype), (W - 1, 0))
    win = x.unfold(-1, W, 1)                                   # [B, C, L, W]
    seg_p = F.pad(seg, (W - 1, 0), value=-1).unfold(0, W, 1)   # [L, W]
    mask = (seg_p == seg[:, None]).to(weight.dtype)
    out = (win * mask * weight[None, :, None, :]).sum(-1)
    if bias is not None:
        out = out + bias[None, :, None]
    if activation is not None:
        from transformers.activations import ACT2FN
        out = ACT2FN[activation](out)
    cfg.report.calls["conv.packed"] += 1
    return out.to(hidden_states.dtype)


# ---- the replacements: same arguments as transformers' torch functions ----

def _float(t, ft):
    return None if t is None else t.to(ft)


def _ftype(x):
    import torch
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mamba_scan(cfg, original, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                delta_softplus=False, return_last_state=False, **kwargs):
    """mamba_selective_scan: u [B, D, L], dt [B, D, L], A [D, N], B, C [B, N, L]; always from a
    zero state (as transformers' torch path); returns y (and the final state [B, D, N])."""
    if B.dim() != 3 or C.dim() != 3 or kwargs.get("cu_seqlens") is not None \
            or kwargs.get("seq_idx") is not None:
        cfg.report.calls["mamba.scan.fallback"] += 1
        return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, return_last_state=return_last_state,
                        **kwargs)
    ft = _ftype(hidden_states)
    k = cfg.kernel("mamba", delta_softplus=bool(delta_softplus))
    f = functools.partial(_float, ft=ft)
    res = k(f(hidden_states), f(dt), f(A), f(B), f(C), D=f(D), z=f(z), delta_bias=f(delta_bias),
            output_final_state=bool(return_last_state))
    cfg.report.calls["mamba.scan"] += 1
    return res


def _step_state(kernel, state, ft, *inputs, **named):
    """kernel.step on the cache tensor ``state``, in place (through a float copy when the
    cache holds another dtype or a non-contiguous view)."""
    if state.dtype == ft and state.is_contiguous():
        return kernel.step(*inputs, state=state, **named)
    s = state.to(ft).contiguous()
    out = kernel.step(*inputs, state=s, **named)
    state.copy_(s.to(state.dtype))
    return out


def _mamba_step(cfg, original, state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                dt_softplus=False, z=None, **kwargs):
    """mamba_selective_state_update: state [B, D, N] (updated in place), x, dt, z [B, D],
    A [D, N], B, C [B, N]."""
    import torch
    if B.dim() != 2 or C.dim() != 2 or kwargs.get("state_batch_indices") is not None:
        cfg.report.calls["mamba.step.fallback"] += 1
        return original(state, hidden_states, dt, A, B, C, D=D, dt_bias=dt_bias,
                        dt_softplus=dt_softplus, z=z, **kwargs)
    ft = _ftype(hidden_states)
    k = cfg.kernel("mamba", delta_softplus=bool(dt_softplus))
    f = functools.partial(_float, ft=ft)
    with torch.no_grad():
        out = _step_state(k, state, ft, f(hidden_states), f(dt), f(A), f(B), f(C), D=f(D),
                          z=f(z), delta_bias=f(dt_bias))
    cfg.report.calls["mamba.step"] += 1
    return out.to(hidden_states.dtype)


def _mamba2_scan(cfg, original, hidden_states, dt, A, B, C, chunk_size=None, D=None,
                 dt_bias=None, initial_states=None, dt_softplus=False,
                 dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
    """mamba2_chunk_scan: x [B, L, H, P], dt [B, L, H], A [H], B, C [B, L, G, N], D, dt_bias
    [H], initial_states [B, H, P, N]. dt = clamp(softplus(dt + dt_bias), *dt_limit). A ``z``
    keyword is ignored, as the torch function ignores it (the gated norm applies z outside)."""
    cu, ok = _packing(kwargs, hidden_states.shape[1], hidden_states.shape[0])
    if not ok or (cu is not None and initial_states is not None):
        cfg.report.calls["mamba2.scan.fallback"] += 1
        return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                        initial_states=initial_states, dt_softplus=dt_softplus,
                        dt_limit=dt_limit, return_final_states=return_final_states, **kwargs)
    ft = _ftype(hidden_states)
    lo, hi = (float(v) for v in dt_limit)
    k = cfg.kernel("mamba2", dt_softplus=bool(dt_softplus), dt_limit=(lo, hi))
    f = functools.partial(_float, ft=ft)
    if cu is not None:
        # packed: every sequence from a zero state; the final state is the last sequence's,
        # as mamba_ssm's chunk scan with seq_idx returns it
        y, S = k(f(hidden_states), f(dt), f(A), f(B), f(C), D=f(D), dt_bias=f(dt_bias),
                 cu_seqlens=cu, output_final_state=True)
        cfg.report.calls["mamba2.scan.packed"] += 1
        return (y, S[-1:]) if return_final_states else y
    res = k(f(hidden_states), f(dt), f(A), f(B), f(C), D=f(D), dt_bias=f(dt_bias),
            initial_state=f(initial_states), output_final_state=bool(return_final_states))
    cfg.report.calls["mamba2.scan"] += 1
    return res


def _broadcast_last(t, n):
    """The leading part of ``t`` if its last ``n`` dims are an expand (stride 0), else None."""
    if t is None:
        return None
    if any(t.stride(-i) != 0 and t.shape[-i] != 1 for i in range(1, n + 1)):
        return False
    return t[(Ellipsis,) + (0,) * n]


def _mamba2_step(cfg, original, state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                 dt_softplus=False, z=None, **kwargs):
    """mamba2_selective_state_update in mamba_ssm's per-(head, headdim) layout: state
    [B, H, P, N] (in place), x, dt, z [B, H, P], A [H, P, N], B, C [B, G, N], D, dt_bias [H, P].
    scancc's mamba2 has one dt, A, D, dt_bias per head: the expanded dims are read at index 0
    when they are an expand (what every transformers mixer passes), else the model's function
    runs. No dt_limit clamp here, as in the torch function."""
    import torch
    dt_h, A_h = _broadcast_last(dt, 1), _broadcast_last(A, 2)
    D_h, bias_h = _broadcast_last(D, 1), _broadcast_last(dt_bias, 1)
    if any(v is False for v in (dt_h, A_h, D_h, bias_h)) or B.dim() != 3 \
            or kwargs.get("state_batch_indices") is not None:
        cfg.report.calls["mamba2.step.fallback"] += 1
        return original(state, hidden_states, dt, A, B, C, D=D, dt_bias=dt_bias,
                        dt_softplus=dt_softplus, z=z, **kwargs)
    ft = _ftype(hidden_states)
    k = cfg.kernel("mamba2", dt_softplus=bool(dt_softplus), dt_limit=(-math.inf, math.inf))
    f = functools.partial(_float, ft=ft)
    with torch.no_grad():
        out = _step_state(k, state, ft, f(hidden_states), f(dt_h), f(A_h), f(B), f(C),
                          D=f(D_h), z=f(z), dt_bias=f(bias_h))
    cfg.report.calls["mamba2.step"] += 1
    return out.to(hidden_states.dtype)


def _gdn_inputs(query, key, value, g, beta):
    """fla layout [B, T, H, K]; grouped value heads: each q/k head serves Hv / Hk consecutive
    value heads (repeat_interleave, as transformers' torch functions)."""
    import torch
    hk, hv = key.shape[2], value.shape[2]
    if hk != hv:
        query = query.repeat_interleave(hv // hk, dim=2)
        key = key.repeat_interleave(hv // hk, dim=2)
    ft = torch.float64 if value.dtype == torch.float64 else torch.float32
    return [t.to(ft).contiguous() for t in (query, key, value, g, beta)], ft


def _gdn_scan(cfg, original, query, key, value, g, beta, chunk_size=64, initial_state=None,
              output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    """torch_chunk_gated_delta_rule (Qwen3-Next): q, k [B, T, Hk, K], v [B, T, Hv, V],
    g, beta [B, T, Hv]; scale K^-1/2; returns (o, final state [B, Hv, K, V] or None)."""
    cu, ok = _packing(kwargs, query.shape[1], query.shape[0])
    if not ok:
        cfg.report.calls["gated_delta_net.scan.fallback"] += 1
        return original(query, key, value, g, beta, chunk_size=chunk_size,
                        initial_state=initial_state, output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
    ins, ft = _gdn_inputs(query, key, value, g, beta)
    k = cfg.kernel("gated_delta_net", use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel))
    extra = {} if cu is None else {"cu_seqlens": cu}
    h0 = None if initial_state is None else initial_state.to(ft)
    o, S = k(*ins, initial_state=h0, output_final_state=True, **extra)
    cfg.report.calls["gated_delta_net.scan" + (".packed" if cu is not None else "")] += 1
    return o.to(query.dtype), (S if output_final_state else None)


def _gdn_step(cfg, original, query, key, value, g, beta, initial_state=None,
              output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    """torch_recurrent_gated_delta_rule at T = 1 (decode): kernel.step on a float copy of the
    cache's state, returned as the new state (transformers stores it with
    update_recurrent_state)."""
    import torch
    if query.shape[1] != 1 or any(kwargs.get(n) is not None for n in _PACKING_KEYS):
        return _gdn_scan(cfg, original, query, key, value, g, beta, initial_state=initial_state,
                         output_final_state=output_final_state,
                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
    ins, ft = _gdn_inputs(query, key, value, g, beta)
    B, _, H, K = ins[0].shape
    V = ins[2].shape[-1]
    state = torch.zeros(B, H, K, V, dtype=ft, device=value.device) if initial_state is None \
        else initial_state.to(ft).clone().contiguous()
    k = cfg.kernel("gated_delta_net", use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel))
    with torch.no_grad():
        o = k.step(*(t[:, 0] for t in ins), state=state)
    cfg.report.calls["gated_delta_net.step"] += 1
    return o[:, None].to(query.dtype), (state if output_final_state else None)


def _kda_inputs(query, key, value, g, beta):
    """fla's KDA layout, as transformers' torch functions take it: q, k, g [B, T, H, K] (g a
    per-key log decay), v [B, T, H, V], beta [B, T, H] (already a sigmoid); float32 compute
    (float64 for float64 inputs), as the torch functions cast to float32 first."""
    import torch
    if not (query.shape == key.shape == g.shape and value.shape[:3] == query.shape[:3]
            and beta.shape == query.shape[:3]):
        return None, None
    ft = torch.float64 if value.dtype == torch.float64 else torch.float32
    return [t.to(ft).contiguous() for t in (query, key, value, g, beta)], ft


def _kda_scan(cfg, original, query, key, value, g, beta, chunk_size=64, initial_state=None,
              output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    """chunk_kimi_delta_attention (Kimi-Linear; fla's chunk_kda): returns (o [B, T, H, V] in
    the query's dtype, final state [B, H, K, V] or None). Scale K^-1/2 (the torch function's and
    the library's default); l2norm x / sqrt(sum x^2 + 1e-6), the same in both. ``cu_seqlens``
    (fla's packed batch) goes to scancc's varlen path."""
    ins, ft = _kda_inputs(query, key, value, g, beta)
    scale = kwargs.get("scale")
    if ins is None or kwargs.get("A_log") is not None or kwargs.get("use_gate_in_kernel"):
        cfg.report.calls["kda.scan.fallback"] += 1
        return original(query, key, value, g, beta, chunk_size=chunk_size,
                        initial_state=initial_state, output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
    cu, ok = _packing(kwargs, query.shape[1], query.shape[0])
    if not ok:
        cfg.report.calls["kda.scan.fallback"] += 1
        return original(query, key, value, g, beta, chunk_size=chunk_size,
                        initial_state=initial_state, output_final_state=output_final_state,
                        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
    k = cfg.kernel("kda", use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel),
                   **({} if scale is None else {"scale": float(scale)}))
    extra = {} if cu is None else {"cu_seqlens": cu}
    h0 = None if initial_state is None else initial_state.to(ft)
    o, S = k(*ins, initial_state=h0, output_final_state=True, **extra)
    cfg.report.calls["kda.scan" + (".packed" if cu is not None else "")] += 1
    return o.to(query.dtype), (S if output_final_state else None)


def _kda_step(cfg, original, query, key, value, g, beta, initial_state=None,
              output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    """recurrent_kimi_delta_attention at T = 1 (decode): ``kernel.step`` on the cache's
    recurrent state itself, in place (a float32 contiguous tensor, as the cache keeps it; else
    through a float copy written back), which is also returned as the new state: the model's
    ``update_recurrent_state`` then copies it onto itself. Longer calls go through the scan."""
    import torch
    ins, ft = _kda_inputs(query, key, value, g, beta)
    if ins is None or query.shape[1] != 1 or kwargs.get("scale") is not None \
            or any(kwargs.get(n) is not None for n in _PACKING_KEYS):
        if ins is None:
            cfg.report.calls["kda.step.fallback"] += 1
            return original(query, key, value, g, beta, initial_state=initial_state,
                            output_final_state=output_final_state,
                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
        return _kda_scan(cfg, original, query, key, value, g, beta,
                         initial_state=initial_state, output_final_state=output_final_state,
                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
    B, _, H, K = ins[0].shape
    k = cfg.kernel("kda", use_qk_l2norm_in_kernel=bool(use_qk_l2norm_in_kernel))
    step_in = [t[:, 0] for t in ins]
    with torch.no_grad():
        if initial_state is None:
            state = torch.zeros(B, H, K, ins[2].shape[-1], dtype=ft, device=value.device)
            o = k.step(*step_in, state=state)
        else:
            state = initial_state
            o = _step_state(k, state, ft, *step_in)
    cfg.report.calls["kda.step"] += 1
    return o[:, None].to(query.dtype), (state if output_final_state else None)


# the model's own functions around the scan that a packed batch also needs scancc's help with
# (installed in the same files; not what makes a mixer "supported")
HELPER_FUNCTIONS = {"causal_conv1d_fn": "conv"}

_IMPLS = {"causal_conv1d_fn": _conv,
          "chunk_kimi_delta_attention": _kda_scan,
          "recurrent_kimi_delta_attention": _kda_step,
"torch_chunk_gated_delta_rule": _gdn_scan,
          "torch_recurrent_gated_delta_rule": _gdn_step,
          "mamba_selective_scan": _mamba_scan, "mamba_selective_state_update": _mamba_step,
          "mamba2_chunk_scan": _mamba2_scan, "mamba2_selective_state_update": _mamba2_step}


# ---- installing the dispatchers in a model file ----

_INSTALLED: dict = {}     # module name -> {"count": n, "originals": {fn name: function}}


def _make_dispatcher(name, original):
    impl = _IMPLS[name]

    @functools.wraps(original)
    def dispatch(*args, **kwargs):
        cfg = _ACTIVE.get()
        if cfg is None:
            return original(*args, **kwargs)
        return impl(cfg, original, *args, **kwargs)

    dispatch._scancc_original = original
    return dispatch


def _install(modname):
    entry = _INSTALLED.get(modname)
    if entry is None:
        mod = sys.modules[modname]
        originals = {}
        for fn in (*SUPPORTED_FUNCTIONS, *HELPER_FUNCTIONS):
            cur = getattr(mod, fn, None)
            if cur is not None and callable(cur):
                originals[fn] = cur
                setattr(mod, fn, _make_dispatcher(fn, cur))
        entry = _INSTALLED[modname] = {"count": 0, "originals": originals}
    entry["count"] += 1


def _uninstall(modname):
    entry = _INSTALLED.get(modname)
    if entry is None:
        return
    entry["count"] -= 1
    if entry["count"] <= 0:
        mod = sys.modules.get(modname)
        for fn, orig in entry["originals"].items():
            if mod is not None:
                setattr(mod, fn, orig)
        del _INSTALLED[modname]


def _forward_names(module):
    """Global names the class's forward refers to (through decorators)."""
    fwd = inspect.unwrap(type(module).forward)
    code = getattr(fwd, "__code__", None)
    return set(code.co_names) if code is not None else set()


def _classify(module):
    """('supported', recurrence) | ('unsupported', reason) | None (not a sequence mixer)."""
    names = _forward_names(module)
    modglobals = vars(sys.modules.get(type(module).__module__, object()))
    used = {n for n in names if n in SUPPORTED_FUNCTIONS and n in modglobals}
    if used:
        recs = sorted({SUPPORTED_FUNCTIONS[n][0] for n in used})
        roles = {SUPPORTED_FUNCTIONS[n][1] for n in used}
        if len(recs) == 1 and roles == {"scan", "step"}:
            return ("supported", recs[0])
        return ("unsupported", f"calls {sorted(used)}: expected one family's scan and step")
    rec_fns = sorted(n for n in names if _RECURRENCE_NAME.search(n) and "mask" not in n
                     and callable(modglobals.get(n)) and not isinstance(modglobals.get(n), type))
    if rec_fns:
        return ("unsupported", f"its recurrence {rec_fns} has no scancc mapping yet")
    if type(module).__name__.endswith("Mixer"):
        return ("unsupported", "a mixer whose forward calls no known scan function")
    return None


def patch(model, target="triton", *, warn=True, **options):
    """Route every supported mixer of ``model`` to scancc kernels on ``target``; ``options``
    are the backend's options (``num_warps=8``, ``chip="trn2"``, ``algorithm="recurrent"``).
    Returns a :class:`PatchReport`; unsupported mixers are listed there and warned about
    (``warn=False`` silences the warning, not the report). Patching a patched model re-patches
    it (the previous patch is undone first)."""
    import scancc
    import scancc.backends
    scancc.backends.get(target)          # an unknown target fails here, before any change
    if getattr(model, "_scancc_patch", None) is not None:
        unpatch(model)
    report = PatchReport(target=target)
    cfg = _Config(target, options, report)
    wrapped = []
    for name, module in model.named_modules():
        kind = _classify(module)
        if kind is None:
            continue
        qual = name or type(model).__name__
        if kind[0] == "unsupported":
            report.unsupported.append((qual, type(module).__name__, kind[1]))
            continue
        modname = type(module).__module__
        _install(modname)
        previous = module.__dict__.get("forward", None)
        original_forward = module.forward

        def forward(*args, __fwd=original_forward, **kwargs):
            token = _ACTIVE.set(cfg)
            try:
                return __fwd(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)

        module.forward = forward
        wrapped.append((module, modname, previous))
        report.patched.append((qual, type(module).__name__, kind[1]))
    if not report.patched:
        report.unsupported.insert(0, (type(model).__name__, type(model).__name__,
                                      "no supported mixer in this model"))
    if report.unsupported and warn:
        names = ", ".join(f"{n} ({c})" for n, c, _ in report.unsupported)
        warnings.warn(f"scancc.integrations.transformers.patch: not patched (unsupported): "
                      f"{names}", stacklevel=2)
    model._scancc_patch = (wrapped, report)
    return report


def unpatch(model):
    """Undo :func:`patch`: the mixers' own forward and the model files' own functions come
    back (the latter once no patched model uses that file). Returns the patch's report, or
    None if the model was not patched."""
    state = getattr(model, "_scancc_patch", None)
    if state is None:
        return None
    wrapped, report = state
    for module, modname, previous in wrapped:
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
        _uninstall(modname)
    model._scancc_patch = None
    return report


def ensure_imported(model_type):
    """Import transformers' modeling file for ``model_type`` (e.g. ``"mamba2"``)."""
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
