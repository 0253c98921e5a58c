"""Thin ``torch.nn.Module`` layers around the library recurrences (``scancc.nn``).

Each layer is the *recurrence core* of a published mixer: it owns the recurrence's learned
parameters, under the names and with the initializations of mamba_ssm / flash-linear-attention,
and calls a compiled scancc kernel. Everything around the core (input/output projections,
the short convolution, activations, normalization, output gating) is left to the user.

    core = scancc.nn.Mamba2Core(nheads=4)               # owns dt_bias, A_log, D
    y = core(x, dt, B, C)                               # x [B, L, H, P] -> y [B, L, H, P]
    y, h = core(x, dt, B, C, output_final_state=True)   # h [B, H, P, N], float32

``target`` picks the backend ("auto" by default, as ``scancc.compile``: Triton for CUDA tensors,
the generated PyTorch code of the torch backend for other tensors; "reference": NumPy, float64,
any device's tensors round-trip through the CPU; "torch"; "triton"; "nki"); other keyword arguments go to
``scancc.compile`` as backend options (e.g. Triton's ``algorithm``). Calls are differentiable
(``scancc::scan`` custom op, docs/training.md). Parameters are float32; inputs may be any float
dtype the backend takes, and the output has the dtype of the first input. See docs/layers.md.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from scancc import backends

from .api import InputError, Kernel, compile

__all__ = ["ScanLayer", "Mamba2Core", "MambaCore", "GLACore", "DeltaNetCore",
           "GatedDeltaNetCore"]
__all__ += ["BMojoF", "BMojo"]


def _f32(p: Tensor) -> Tensor:
    """A parameter as the kernel gets it: float32 for half precision (as mamba_ssm's
    ``.float()``), float64 kept as is (so ``layer.double()`` runs fully in float64)."""
    return p if p.dtype == torch.float64 else p.float()


def _no_weight_decay(*params: nn.Parameter) -> None:
    for p in params:  # the flag mamba_ssm and fla set for optimizer parameter grouping
        p._no_weight_decay = True


@torch.no_grad()
def _init_dt_bias(p: Tensor, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """mamba_ssm's time-step bias: dt log-uniform in [dt_min, dt_max], floored at
    dt_init_floor, stored as softplus^-1(dt) so that softplus(bias) = dt."""
    u = torch.rand(p.shape, device=p.device, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    p.copy_(dt + torch.log(-torch.expm1(-dt)))


class ScanLayer(nn.Module):
    """A compiled scancc recurrence as a module, with no parameters of its own.

    ``ScanLayer(recurrence, target="auto", **options)`` compiles ``recurrence`` (a library
    name such as ``"retnet"``, a YAML spec path or a ``Recurrence``) with
    ``scancc.compile(recurrence, target, **options)``; ``forward`` is the kernel call
    (inputs by position or name, ``initial_state``, ``output_final_state``). The named cores
    below subclass it and pass their parameters as the recurrence's inputs.
    """

    kernel: Kernel

    def __init__(self, recurrence: Any, target: str = "auto", **options: Any):
        super().__init__()
        self.recurrence, self.target, self.options = recurrence, target, dict(options)
        if target != "auto":
            ok, why = backends.get(target).available()  # readies its toolchain (Triton: CPU)
            if not ok:
                raise backends.UnsupportedError(target, str(recurrence), why)
        self.kernel = compile(recurrence, target=target, **options)

    def forward(self, *inputs: Tensor, initial_state: Any = None,
                output_final_state: bool = False, **named: Any):
        return self.kernel(*inputs, initial_state=initial_state,
                           output_final_state=output_final_state, **named)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.kernel.name!r}, target={self.target!r}{opts}"

    # the kernel is rebuilt, not pickled (torch.save(module), copy.deepcopy)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("kernel", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.kernel = compile(self.recurrence, target=self.target, **self.options)


class Mamba2Core(ScanLayer):
    """The SSD scan of a Mamba2 mixer (mamba_ssm's ``mamba_chunk_scan_combined`` call with
    ``dt_softplus=True``), on the ``mamba2`` recurrence.

    Owns, as in mamba_ssm's ``Mamba2``: ``dt_bias`` [H] (softplus(dt_bias) log-uniform in
    [dt_min, dt_max]), ``A_log`` [H] (A = -exp(A_log), -A uniform in ``A_init_range``), ``D`` [H]
    (ones). Per step: dt = clamp(softplus(dt + dt_bias), *dt_limit);
    h = exp(dt A) h + dt x B^T; y = h C + D x, times silu(z) when z is given.

    Shapes: x [batch, L, H, P], dt [batch, L, H], B, C [batch, L, G, N] (G divides H; head h
    reads group h // (H/G)), z [batch, L, H, P] -> y [batch, L, H, P]; state [batch, H, P, N].
    Not here: in_proj, conv1d, the gated RMSNorm, out_proj (mamba_ssm's ``rmsnorm=True`` path
    applies z in the norm rather than passing it here).
    """

    def __init__(self, nheads: int, *, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_limit: tuple[float, float] | None = (0.0, math.inf),
                 target: str = "auto", device: Any = None, **backend_options: Any):
        super().__init__("mamba2", target, dt_softplus=True,
                         dt_limit=None if dt_limit is None else tuple(dt_limit),
                         **backend_options)
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.nheads, self.A_init_range = nheads, tuple(A_init_range)
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        f32 = dict(device=device, dtype=torch.float32)
        self.dt_bias = nn.Parameter(torch.empty(nheads, **f32))
        self.A_log = nn.Parameter(torch.empty(nheads, **f32))
        self.D = nn.Parameter(torch.empty(nheads, **f32))
        _no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _init_dt_bias(self.dt_bias, *self.dt_init)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)

    def forward(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None = None,
                initial_state: Tensor | None = None, output_final_state: bool = False):
        """y [batch, L, H, P], or (y, final state [batch, H, P, N]) with output_final_state."""
        A = -torch.exp(_f32(self.A_log))
        return self.kernel(x, dt, A, B, C, D=_f32(self.D), z=z, dt_bias=_f32(self.dt_bias),
                           initial_state=initial_state, output_final_state=output_final_state)

    def extra_repr(self) -> str:
        return f"nheads={self.nheads}, target={self.target!r}"


class MambaCore(ScanLayer):
    """The selective scan (S6) of a Mamba mixer (mamba_ssm's ``selective_scan_fn`` call with
    ``delta_softplus=True``), on the ``mamba`` recurrence.

    Owns, as in mamba_ssm's ``Mamba``: ``A_log`` [D, N] (A = -exp(A_log) = -(1..N) per channel,
    S4D-real), ``D`` [D] (ones) and ``delta_bias`` [D] (softplus(delta_bias) log-uniform in
    [dt_min, dt_max]). mamba_ssm and transformers store that bias as ``dt_proj.bias`` and pass it
    to the scan as ``delta_bias``: load it under this name. Per step:
    dt = softplus(delta + delta_bias); x = exp(dt A) x + dt B u; y = C x + D u, times silu(z).

    Shapes (channel-major, as selective_scan_fn): u, delta [batch, D, L], B, C [batch, N, L] or
    [batch, G, N, L] (G divides D), z [batch, D, L] -> y [batch, D, L]; state [batch, D, N].
    Not here: in_proj, conv1d, x_proj, dt_proj's weight (delta is dt_proj.weight @ dt), out_proj.
    """

    def __init__(self, d_inner: int, d_state: int = 16, *, dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, target: str = "auto",
                 device: Any = None, **backend_options: Any):
        super().__init__("mamba", target, delta_softplus=True, **backend_options)
        self.d_inner, self.d_state = d_inner, d_state
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        f32 = dict(device=device, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state, **f32))
        self.D = nn.Parameter(torch.empty(d_inner, **f32))
        self.delta_bias = nn.Parameter(torch.empty(d_inner, **f32))
        _no_weight_decay(self.A_log, self.D, self.delta_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(n.log().expand(self.d_inner, -1))
        self.D.fill_(1.0)
        _init_dt_bias(self.delta_bias, *self.dt_init)

    def forward(self, u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None = None,
                initial_state: Tensor | None = None, output_final_state: bool = False):
        """y [batch, D, L], or (y, final state [batch, D, N]) with output_final_state."""
        A = -torch.exp(_f32(self.A_log))
        return self.kernel(u, delta, A, B, C, D=_f32(self.D), z=z,
                           delta_bias=_f32(self.delta_bias), initial_state=initial_state,
                           output_final_state=output_final_state)

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, d_state={self.d_state}, target={self.target!r}"


class GLACore(ScanLayer):
    """Gated linear attention (fla's ``chunk_gla``), on the ``gla`` recurrence. No parameters.

    S = Diag(exp(g_t)) S + k_t v_t^T; o_t = scale * S^T q_t (scale: K^-1/2 by default).
    Shapes: q, k [batch, T, H, K], v [batch, T, H, V], g [batch, T, H, K] (log-space decay, e.g.
    fla's ``logsigmoid(gk_proj(x)) / gate_logit_normalizer``) -> o [batch, T, H, V];
    state [batch, H, K, V]. Not here: the q/k/v/gk/g projections, the gated norm, o_proj.
    """

    def __init__(self, scale: float | None = None, *, target: str = "auto",
                 **backend_options: Any):
        super().__init__("gla", target, scale=scale, **backend_options)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                initial_state: Tensor | None = None, output_final_state: bool = False):
        """o [batch, T, H, V], or (o, final state [batch, H, K, V]) with output_final_state."""
        return self.kernel(q, k, v, g, initial_state=initial_state,
                           output_final_state=output_final_state)


class DeltaNetCore(ScanLayer):
    """The delta rule (fla's ``chunk_delta_rule``), on the ``delta_net`` recurrence.
    No parameters.

    S = (I - beta_t k_t k_t^T) S + beta_t k_t v_t^T; o_t = scale * S^T q_t. q and k are
    L2-normalized in the kernel by default (``use_qk_l2norm_in_kernel=True``, as fla's DeltaNet
    layer with ``qk_norm='l2'``); pass False if they are normalized already.
    Shapes: q, k [batch, T, H, K], v [batch, T, H, V], beta [batch, T, H] (in (0, 1), e.g.
    sigmoid(b_proj(x))) -> o [batch, T, H, V]; state [batch, H, K, V].
    Not here: projections, short convolutions, activations, the output norm, o_proj.
    """

    def __init__(self, scale: float | None = None, *, use_qk_l2norm_in_kernel: bool = True,
                 target: str = "auto", **backend_options: Any):
        super().__init__("delta_net", target, scale=scale,
                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **backend_options)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
                initial_state: Tensor | None = None, output_final_state: bool = False):
        """o [batch, T, H, V], or (o, final state [batch, H, K, V]) with output_final_state."""
        return self.kernel(q, k, v, beta, initial_state=initial_state,
                           output_final_state=output_final_state)


class GatedDeltaNetCore(ScanLayer):
    """The gated delta rule with its Mamba2-style decay, as in fla's ``GatedDeltaNet`` layer,
    on the ``gated_delta_net`` recurrence.

    Owns, as fla's layer: ``A_log`` [H] (A = exp(A_log) uniform in ``A_init_range``, (0, 16)) and
    ``dt_bias`` [H] (softplus(dt_bias) log-uniform in [0.001, 0.1]). The log-space decay is
    computed here, in float32: g = -exp(A_log) * softplus(a + dt_bias), from the raw gate
    ``a`` (fla: ``a_proj(x)``); then S = exp(g_t)(I - beta_t k_t k_t^T) S + beta_t k_t v_t^T,
    o_t = scale * S^T q_t, with q, k L2-normalized in the kernel (default, as fla's layer).
    Shapes: q, k [batch, T, H, K], v [batch, T, H, V], a, beta [batch, T, H] (beta in (0, 1),
    e.g. sigmoid(b_proj(x))) -> o [batch, T, H, V]; state [batch, H, K, V].
    Not here: projections, short convolutions, the output gate and norm, o_proj.
    """

    def __init__(self, num_heads: int, scale: float | None = None, *,
                 use_qk_l2norm_in_kernel: bool = True,
                 A_init_range: tuple[float, float] = (0.0, 16.0), dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, target: str = "auto",
                 device: Any = None, **backend_options: Any):
        super().__init__("gated_delta_net", target, scale=scale,
                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **backend_options)
        self.num_heads, self.A_init_range = num_heads, tuple(A_init_range)
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        f32 = dict(device=device, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.empty(num_heads, **f32))
        self.dt_bias = nn.Parameter(torch.empty(num_heads, **f32))
        _no_weight_decay(self.A_log, self.dt_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.A_init_range).log())
        _init_dt_bias(self.dt_bias, *self.dt_init)

    def gate(self, a: Tensor) -> Tensor:
        """The log-space decay g = -exp(A_log) * softplus(a + dt_bias), [batch, T, H]."""
        return -torch.exp(_f32(self.A_log)) * F.softplus(_f32(a) + _f32(self.dt_bias))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, a: Tensor, beta: Tensor,
                initial_state: Tensor | None = None, output_final_state: bool = False):
        """o [batch, T, H, V], or (o, final state [batch, H, K, V]) with output_final_state."""
        want = (*q.shape[:2], self.num_heads) if q.dim() == 4 else None
        if want is not None and tuple(a.shape) != want:  # before broadcasting against dt_bias
            raise InputError(f"GatedDeltaNetCore: input 'a': expected shape [batch, time, "
                             f"heads={self.num_heads}] = {want}, got {tuple(a.shape)}")
        return self.kernel(q, k, v, self.gate(a), beta, initial_state=initial_state,
                           output_final_state=output_final_state)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, target={self.target!r}"


# ---- B'MOJO: full layers (docs/bmojo.md) ----

class BMojoF(nn.Module):
    """A B'MOJO-F layer, as hybrid-model-factory's BMojoLayer: a Mamba2 core produces the
    fading tokens, the layer's own (tied) k/v projections map them to fading keys/values, and
    the ``bmojo_f`` kernel does one softmax attention over the window and the fading window.

    ``u`` [batch, L, d_model] -> [batch, L, d_model]::

        q, k, v = q_proj(u), k_proj(u), v_proj(u)              # [batch, L, H, K]
        x, B, C, dt = ssm_in(u)                                # Mamba2 inputs, one group
        y = Mamba2Core(x, dt, B, C)                            # [batch, L, H, K]
        kf, vf = k_proj(ssm_out(y)), v_proj(ssm_out(y))        # the fading tokens, tied
        o = bmojo_f(q, k, v, kf, vf; window)                   # [batch, L, H, K]
        out = o_proj(o)

    Layer parts beyond hybrid-model-factory's are left out (no rotary embedding, no norm, no
    short conv in the SSM branch). Gradients flow to every parameter (the kernel's backward is
    the derived adjoint of the ``bmojo_f`` recurrence)."""

    kernel_name = "bmojo_f"

    def __init__(self, d_model: int, nheads: int, headdim: int | None = None, *,
                 window: int = 64, d_state: int = 16, scale: float | None = None,
                 target: str = "auto", device: Any = None, dtype: Any = None,
                 **backend_options: Any):
        super().__init__()
        K = headdim or d_model // nheads
        if K < 1:
            raise ValueError(f"headdim must be positive, got {K}")
        self.d_model, self.nheads, self.headdim, self.d_state = d_model, nheads, K, d_state
        self.window, self.scale = window, scale
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, nheads * K, bias=False, **kw)
        self.k_proj = nn.Linear(d_model, nheads * K, bias=False, **kw)
        self.v_proj = nn.Linear(d_model, nheads * K, bias=False, **kw)
        self.ssm_in = nn.Linear(d_model, nheads * K + 2 * d_state + nheads, **kw)
        self.ssm = Mamba2Core(nheads, target=target, device=device, **backend_options)
        self.ssm_out = nn.Linear(nheads * K, d_model, bias=False, **kw)
        self.o_proj = nn.Linear(nheads * K, d_model, bias=False, **kw)
        self.attn = ScanLayer(self._recurrence(), target, **self._options(scale),
                              **backend_options)

    def _recurrence(self):
        return self.kernel_name

    def _options(self, scale):
        return dict(window=self.window, scale=scale)

    def heads(self, t: Tensor) -> Tensor:
        return t.reshape(*t.shape[:2], self.nheads, self.headdim)

    def branches(self, u: Tensor) -> dict[str, Tensor]:
        """The kernel's inputs for ``u``: q, k, v, kf, vf (and y, the SSM output)."""
        H, K, N = self.nheads, self.headdim, self.d_state
        x, B, C, dt = self.ssm_in(u).split([H * K, N, N, H], -1)
        b, L = u.shape[:2]
        y = self.ssm(self.heads(x), dt, B.reshape(b, L, 1, N), C.reshape(b, L, 1, N))
        fading = self.ssm_out(y.reshape(b, L, H * K))
        return dict(q=self.heads(self.q_proj(u)), k=self.heads(self.k_proj(u)),
                    v=self.heads(self.v_proj(u)), kf=self.heads(self.k_proj(fading)),
                    vf=self.heads(self.v_proj(fading)), y=y)

    def forward(self, u: Tensor) -> Tensor:
        x = self.branches(u)
        o = self.attn(x["q"], x["k"], x["v"], x["kf"], x["vf"])
        return self.o_proj(o.reshape(*u.shape[:2], -1))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, nheads={self.nheads}, headdim={self.headdim}, "
                f"window={self.window}")


class BMojo(BMojoF):
    """A B'MOJO layer: ``BMojoF`` plus the eidetic memory of ``memory`` tokens, chosen by the
    innovation of the SSM output y over a ``predictor`` window (the ``bmojo`` recurrence,
    ``scancc.library.bmojo``). Trains through the derived adjoint: gradients flow to the
    tokens the memory stores (their k, v) and through the windows; which tokens it stores is
    piecewise constant, so none flow through the innovation scores (y reaches the loss
    through the fading tokens kf, vf; docs/bmojo.md, "Gradients")."""

    def __init__(self, d_model: int, nheads: int, headdim: int | None = None, *,
                 window: int = 64, memory: int = 16, predictor: int = 4, **kw: Any):
        self.memory, self.predictor = memory, predictor
        super().__init__(d_model, nheads, headdim, window=window, **kw)

    def _recurrence(self):
        from .library import bmojo
        return bmojo(window=self.window, memory=self.memory, predictor=self.predictor,
                     scale=self.scale)

    def _options(self, scale):
        return {}

    def forward(self, u: Tensor) -> Tensor:
        x = self.branches(u)
        o = self.attn(x["q"], x["k"], x["v"], x["kf"], x["vf"], x["y"])
        return self.o_proj(o.reshape(*u.shape[:2], -1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", memory={self.memory}, predictor={self.predictor}"
