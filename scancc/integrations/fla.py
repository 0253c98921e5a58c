"""flash-linear-attention's op functions on scancc kernels: ``patch(target)`` / ``unpatch()``.

``patch`` replaces fla's ``chunk_*`` / ``fused_recurrent_*`` functions by scancc-backed ones
with the same argument names, in every loaded ``fla`` module that holds them (``fla.ops``,
``fla.ops.gla``, ``fla.layers.gla`` and so on: the names a layer file imported are rebound
in that file too), so fla's layers and models run on the reference, torch, Triton or NKI.

Layouts are fla's time-first ones (``[B, T, H, K]``, state ``[B, H, K, V]``,
``state_v_first=False``); ``cu_seqlens`` is passed through (packed batches). Arguments scancc's
library has no recurrence for (``gv``, ``reverse=True``, ``state_v_first=True``,
``use_beta_sigmoid_in_kernel``, ``allow_neg_eigval``, ``use_gate_in_kernel``, a normalized
linear attention, ...) call fla's own function unchanged, counted in ``calls`` as a fallback.
"""
from __future__ import annotations

import functools
import importlib
import sys
from collections import Counter

__all__ = ["patch", "unpatch", "FUNCTIONS", "calls"]

# fla function -> the package it lives in
FUNCTIONS = {
    "chunk_gla": "fla.ops.gla", "fused_recurrent_gla": "fla.ops.gla",
    "chunk_simple_gla": "fla.ops.simple_gla",
    "fused_recurrent_simple_gla": "fla.ops.simple_gla",
    "chunk_gated_delta_rule": "fla.ops.gated_delta_rule",
    "fused_recurrent_gated_delta_rule": "fla.ops.gated_delta_rule",
    "chunk_delta_rule": "fla.ops.delta_rule", "fused_recurrent_delta_rule": "fla.ops.delta_rule",
    "chunk_hgrn": "fla.ops.hgrn", "fused_recurrent_hgrn": "fla.ops.hgrn",
    "chunk_retention": "fla.ops.retention", "fused_recurrent_retention": "fla.ops.retention",
    "chunk_linear_attn": "fla.ops.linear_attn",
    "fused_recurrent_linear_attn": "fla.ops.linear_attn",
    "chunk_kda": "fla.ops.kda", "fused_recurrent_kda": "fla.ops.kda",
}

calls: Counter = Counter()       # "<function>" scancc calls, "<function>.fallback" fla's own
_STATE: dict = {"target": None, "options": None, "kernels": {}, "replaced": []}


class _Fallback(Exception):
    pass


def _kernel(name, **rec_options):
    key = (name, tuple(sorted(rec_options.items())))
    k = _STATE["kernels"].get(key)
    if k is None:
        import scancc
        k = scancc.compile(name, _STATE["target"], options=_STATE["options"] or None,
                           **rec_options)
        _STATE["kernels"][key] = k
    return k


def _run(name, inputs, initial_state, output_final_state, cu_seqlens, **rec_options):
    k = _kernel(name, **rec_options)
    kw = {}
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    o, S = k(*inputs, initial_state=initial_state, output_final_state=True, **kw)
    first = inputs[0]
    return o.to(first.dtype), (S if output_final_state else None)


def _need(cond):
    if not cond:
        raise _Fallback


def _f32(*ts):
    import torch
    return [None if t is None else (t if t.dtype == torch.float64 else t.float()) for t in ts]


def _scale(scale):
    return None if scale is None else float(scale)


# each takes fla's arguments (bound by name) and returns (o, final_state)

def _gla(a):
    g = a.get("g", a.get("gk"))
    _need(g is not None and a.get("gv") is None and not a.get("reverse")
          and not a.get("state_v_first"))
    q, k, v, g = _f32(a["q"], a["k"], a["v"], g)
    return _run("gla", (q, k, v, g), a.get("initial_state"), a.get("output_final_state"),
                a.get("cu_seqlens"), scale=_scale(a.get("scale")))


def _simple_gla(a):
    import torch
    _need(not a.get("reverse") and not a.get("state_v_first"))
    q, k, v = _f32(a["q"], a["k"], a["v"])
    g, gamma = a.get("g"), a.get("g_gamma")
    if g is None and gamma is None:
        return _run("linear_attn", (q, k, v), a.get("initial_state"),
                    a.get("output_final_state"), a.get("cu_seqlens"),
                    scale=_scale(a.get("scale")))
    if g is None:
        g = gamma.to(q.dtype).expand(q.shape[0], q.shape[1], gamma.shape[-1])
    elif gamma is not None:
        g = g + gamma
    g = torch.as_tensor(g).to(q.dtype).contiguous()
    return _run("simple_gla", (q, k, v, g), a.get("initial_state"), a.get("output_final_state"),
                a.get("cu_seqlens"), scale=_scale(a.get("scale")))


def _gated_delta(a):
    _need(a.get("g") is not None and a.get("gk") is None and a.get("gv") is None
          and not a.get("use_gate_in_kernel") and not a.get("use_beta_sigmoid_in_kernel")
          and not a.get("allow_neg_eigval") and not a.get("state_v_first")
          and a.get("cp_context") is None)
    _need(a.get("beta") is not None and a["beta"].dim() == 3)   # not a headwise [B, T, HV, V]
    q, k, v, g, beta = _f32(a["q"], a["k"], a["v"], a["g"], a["beta"])
    return _run("gated_delta_net", (q, k, v, g, beta), a.get("initial_state"),
                a.get("output_final_state"), a.get("cu_seqlens"), scale=_scale(a.get("scale")),
                use_qk_l2norm_in_kernel=bool(a.get("use_qk_l2norm_in_kernel")),
                **_gva(q, v))


def _gva(q, v):
    """fla's grouped value attention: v with HV = G * H heads while q, k have H (fla raises
    unless H divides HV; scancc's shape check does too). The option only when HV != H, so an
    ungrouped call compiles the same kernel as before."""
    return {"grouped_value_heads": True} if v.shape[2] != q.shape[2] else {}


def _delta(a):
    import torch
    q, k, v = _f32(a["q"], a["k"], a["v"])
    beta = a.get("beta")
    beta = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device) if beta is None \
        else _f32(beta)[0]
    return _run("delta_net", (q, k, v, beta), a.get("initial_state"),
                a.get("output_final_state"), a.get("cu_seqlens"), scale=_scale(a.get("scale")),
                use_qk_l2norm_in_kernel=bool(a.get("use_qk_l2norm_in_kernel")))


def _hgrn(a):
    x, g = _f32(a["x"], a["g"])
    return _run("hgrn", (x, g), a.get("initial_state"), a.get("output_final_state"),
                a.get("cu_seqlens"))


def _retention(a):
    _need(not a.get("reverse") and not a.get("state_v_first"))
    q, k, v = _f32(a["q"], a["k"], a["v"])
    return _run("retnet", (q, k, v), a.get("initial_state"), a.get("output_final_state"),
                a.get("cu_seqlens"), scale=_scale(a.get("scale")))


def _linear_attn(a, normalize_default):
    _need(not a.get("normalize", normalize_default) and not a.get("reverse")
          and not isinstance(a.get("initial_state"), tuple))
    q, k, v = _f32(a["q"], a["k"], a["v"])
    return _run("linear_attn", (q, k, v), a.get("initial_state"), a.get("output_final_state"),
                a.get("cu_seqlens"), scale=_scale(a.get("scale")))


def _kda(a):
    """chunk_kda / fused_recurrent_kda: g the per-key log decay, beta already a sigmoid [B, T,
    HV], grouped value heads (HV = G * H) or not (the in-kernel gate / beta sigmoid, a headwise
    beta, negative eigenvalues, the safe-gate lower bound and v-first states fall back)."""
    q, v = a["q"], a["v"]
    _need(a["beta"].dim() == 3 and not a.get("use_gate_in_kernel")
          and not a.get("use_beta_sigmoid_in_kernel") and not a.get("allow_neg_eigval")
          and not a.get("safe_gate") and a.get("lower_bound") is None
          and a.get("A_log") is None and not a.get("state_v_first")
          and not a.get("return_intermediate_states") and a.get("cp_context") is None)
    q, k, v, g, beta = _f32(q, a["k"], v, a["g"], a["beta"])
    return _run("kda", (q, k, v, g, beta), a.get("initial_state"), a.get("output_final_state"),
                a.get("cu_seqlens"), scale=_scale(a.get("scale")),
                use_qk_l2norm_in_kernel=bool(a.get("use_qk_l2norm_in_kernel")), **_gva(q, v))


_IMPLS = {
    "chunk_kda": _kda, "fused_recurrent_kda": _kda,
    "chunk_gla": _gla, "fused_recurrent_gla": _gla,
    "chunk_simple_gla": _simple_gla, "fused_recurrent_simple_gla": _simple_gla,
    "chunk_gated_delta_rule": _gated_delta, "fused_recurrent_gated_delta_rule": _gated_delta,
    "chunk_delta_rule": _delta, "fused_recurrent_delta_rule": _delta,
    "chunk_hgrn": _hgrn, "fused_recurrent_hgrn": _hgrn,
    "chunk_retention": _retention, "fused_recurrent_retention": _retention,
    "chunk_linear_attn": functools.partial(_linear_attn, normalize_default=True),
    "fused_recurrent_linear_attn": functools.partial(_linear_attn, normalize_default=False),
}


def _make(name, original):
    import inspect
    sig = inspect.signature(original)
    impl = _IMPLS[name]

    @functools.wraps(original)
    def replacement(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}) or {})
        try:
            out = impl(a)
        except _Fallback:
            calls[f"{name}.fallback"] += 1
            return original(*args, **kwargs)
        calls[name] += 1
        return out

    replacement._scancc_original = original
    return replacement


def patch(target="triton", **options):
    """Route fla's functions (``FUNCTIONS``) to scancc on ``target`` (backend ``options`` as
    for ``scancc.compile``), in every loaded fla module that holds them. Returns the list of
    (module, name) rebound. Calling it again re-targets (the previous patch is undone)."""
    import scancc.backends
    scancc.backends.get(target)
    if _STATE["replaced"]:
        unpatch()
    _STATE.update(target=target, options=dict(options), kernels={})
    originals = {}
    for name, pkg in FUNCTIONS.items():
        try:
            mod = importlib.import_module(pkg)
        except Exception:      # noqa: BLE001 - an fla without this op: nothing to route
            continue
        fn = getattr(mod, name, None)
        if fn is not None:
            originals[name] = (fn, _make(name, fn))
    for modname, mod in list(sys.modules.items()):
        if mod is None or not (modname == "fla" or modname.startswith("fla.")):
            continue
        for name, (orig, repl) in originals.items():
            if getattr(mod, name, None) is orig:
                setattr(mod, name, repl)
                _STATE["replaced"].append((mod, name, orig))
    return [(m.__name__, n) for m, n, _ in _STATE["replaced"]]


def unpatch():
    """Give every rebound name its fla function back."""
    for mod, name, orig in _STATE["replaced"]:
        setattr(mod, name, orig)
    _STATE["replaced"] = []
    _STATE.update(target=None, options=None, kernels={})
