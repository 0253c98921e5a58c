"""Time scancc's Triton kernels next to the hand-written GPU kernels they should match, in one
run, on a CUDA machine (shared/design PERFORMANCE.md "Whenever a GPU is available").

For every case (the shapes of benchmarks/bench_sm90.py that have an anchor, bf16 inputs) it
times

- scancc: ``scancc.compile(name, "triton")`` with default options (the "auto" algorithm);
- the anchor: fla's ``chunk_linear_attn`` (normalize=False) / ``chunk_retention`` /
  ``chunk_simple_gla`` / ``chunk_gla`` / ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` /
  ``chunk_gla`` with k = 1 - exp(g) (HGRN2; the op computing k is outside the timed call) /
  ``chunk_rwkv6`` / ``chunk_rwkv7`` (scale K^-1/2, scancc's default) / ``chunk_kda``,
  mamba_ssm's ``mamba_chunk_scan_combined`` (chunk 256) and ``selective_scan_fn``
  (each skipped with the printed reason when it cannot be imported),

with ``triton.testing.do_bench`` (CUDA events, warmup and repetitions given by flags, median
ms), and prints ms, the ratio scancc/anchor and the rel-RMS difference of the two outputs
(``||a - b|| / ||b||`` in float32) side by side. ``--backward`` times forward + backward
(``y.backward(dy)``, every floating input requiring grad, gradients reset between runs) and
adds the rel-RMS of the first input's gradient. Without a CUDA device it prints
"no CUDA device: nothing timed" and exits 0.

    python benchmarks/bench_gpu.py                       # every case, forward
    python benchmarks/bench_gpu.py --backward            # every case, forward + backward
    python benchmarks/bench_gpu.py --names gla mamba2 --shapes B1T32768 --rep 200

The anchors' argument conventions are checked on CPU against fla's naive (PyTorch) recurrences
by tests/test_benchmarks_gpu.py (each anchor call's exact arguments, through an adapter with
the chunk function's documented semantics).
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from dataclasses import dataclass, field

SHAPES = {"B8T2048": (8, 2048), "B1T32768": (1, 32768)}
ATTN = {  # scancc name -> (fla function, extra kwargs)
    "linear_attn": ("chunk_linear_attn", {"normalize": False}),
    "retnet": ("chunk_retention", {}),
    "simple_gla": ("chunk_simple_gla", {}),
    "gla": ("chunk_gla", {}),
    "delta_net": ("chunk_delta_rule", {}),
    "gated_delta_net": ("chunk_gated_delta_rule", {}),
}
# the modern family (issue 15): scancc name -> fla function
MODERN = {"hgrn2": "chunk_gla", "rwkv6": "chunk_rwkv6", "rwkv7": "chunk_rwkv7",
          "kda": "chunk_kda"}
_KV128 = lambda h: (f"H{h} K=V=128", {"heads": h, "key": 128, "value": 128})  # noqa: E731
CASES = [(n, *_KV128(h)) for n in ATTN for h in (16, 96)]
CASES += [("mamba2", "H80 P64 N128", {"heads": 80, "headdim": 64, "dstate": 128}),
          ("mamba", "D2048 N16", {"chan": 2048, "dstate": 16})]
CASES += [(n, *_KV128(h)) for n, hs in (("hgrn2", (16,)), ("rwkv6", (16,)), ("rwkv7", (16, 96)),
                                        ("kda", (16, 96))) for h in hs]


@dataclass
class Anchor:
    """One anchor call: ``module.fn(*args, **kwargs)``; its first output is the output."""
    module: str
    fn: str
    args: list
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    def call(self):
        f = getattr(importlib.import_module(self.module), self.fn)
        return lambda: _first(f(*self.args, **self.kwargs))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _inputs(name: str, B: int, T: int, dims: dict, dev, dtype) -> tuple[list, Anchor]:
    """(scancc positional inputs, the anchor call) with realistic value ranges; the two share
    their tensors wherever the conventions agree."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s, dt=dtype):
        return torch.randn(*s, generator=g, device=dev, dtype=torch.float32).to(dt)

    def unit(*s):  # l2-normalized rows (delta rules' keys, rwkv7's kk)
        return F.normalize(rn(*s, dt=torch.float32), dim=-1).to(dtype)
    if name in ATTN or name in MODERN:
        H, K, V = dims["heads"], dims["key"], dims["value"]
        v = rn(B, T, H, V)
    if name in ATTN:
        q, k = rn(B, T, H, K), rn(B, T, H, K)
        if name in ("delta_net", "gated_delta_net"):
            q, k = unit(B, T, H, K), unit(B, T, H, K)
        fn_name, kw = ATTN[name]
        args = [q, k, v]
        extra = {}
        if name == "simple_gla":
            extra["g"] = F.logsigmoid(rn(B, T, H, dt=torch.float32)).to(dtype)
        if name == "gla":
            extra["g"] = (F.logsigmoid(rn(B, T, H, K, dt=torch.float32)) / 16).to(dtype)
        if name == "gated_delta_net":
            extra["g"] = F.logsigmoid(rn(B, T, H, dt=torch.float32)).to(dtype)
        if name in ("delta_net", "gated_delta_net"):
            extra["beta"] = torch.sigmoid(rn(B, T, H, dt=torch.float32)).to(dtype)
        return args + list(extra.values()), Anchor("fla.ops", fn_name, args, {**extra, **kw},
                                                   f"fla.ops.{fn_name}")
    if name == "hgrn2":  # fla's HGRN2Attention: chunk_gla(q, 1 - exp(g), v, g)
        q, gk = rn(B, T, H, K), F.logsigmoid(rn(B, T, H, K, dt=torch.float32)).to(dtype)
        k = (1 - gk.float().exp()).to(dtype).detach()
        return [q, v, gk], Anchor("fla.ops", "chunk_gla", [q, k, v, gk], {},
                                  "fla.ops.chunk_gla (k = 1 - exp(g))")
    if name == "rwkv6":  # w: the log decay
        r, k = rn(B, T, H, K), rn(B, T, H, K)
        w, u = F.logsigmoid(rn(B, T, H, K, dt=torch.float32)).to(dtype), rn(H, K)
        return [r, k, v, w, u], Anchor("fla.ops", "chunk_rwkv6", [r, k, v, w, u], {},
                                       "fla.ops.chunk_rwkv6")
    if name == "rwkv7":  # fla's RWKV-7: w = -e^-1/2 sigmoid(.), a = -kk, b = kk * iclr
        r, k = rn(B, T, H, K), rn(B, T, H, K)
        w = (-math.exp(-0.5) * torch.sigmoid(rn(B, T, H, K, dt=torch.float32))).to(dtype)
        kk = unit(B, T, H, K)
        iclr = torch.sigmoid(rn(B, T, H, K, dt=torch.float32))
        a, b = (-kk), (kk.float() * iclr).to(dtype)
        return [r, w, k, v, a, b], Anchor("fla.ops", "chunk_rwkv7", [r, w, k, v, a, b],
                                          {"scale": K ** -0.5}, "fla.ops.chunk_rwkv7")
    if name == "kda":
        q, k = unit(B, T, H, K), unit(B, T, H, K)
        gk = F.logsigmoid(rn(B, T, H, K, dt=torch.float32)).to(dtype)
        beta = torch.sigmoid(rn(B, T, H, dt=torch.float32)).to(dtype)
        return [q, k, v, gk, beta], Anchor("fla.ops", "chunk_kda", [q, k, v, gk, beta], {},
                                           "fla.ops.chunk_kda")
    if name == "mamba2":
        H, P, N = dims["heads"], dims["headdim"], dims["dstate"]
        x = rn(B, T, H, P)
        dt = F.softplus(rn(B, T, H, dt=torch.float32) - 4).to(dtype)
        A = -torch.exp(rn(H, dt=torch.float32))  # float32, as mamba_ssm keeps A
        Bm, Cm = rn(B, T, 1, N), rn(B, T, 1, N)
        return [x, dt, A, Bm, Cm], Anchor(
            "mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined",
            [x, dt, A, Bm, Cm], {"chunk_size": 256},
            "mamba_ssm mamba_chunk_scan_combined (chunk 256)")
    if name == "mamba":
        D, N = dims["chan"], dims["dstate"]
        u = rn(B, D, T)
        delta = F.softplus(rn(B, D, T, dt=torch.float32) - 4).to(dtype)
        A = -torch.exp(rn(D, N, dt=torch.float32))  # float32, as mamba_ssm keeps A
        Bm, Cm = rn(B, 1, N, T), rn(B, 1, N, T)
        return [u, delta, A, Bm, Cm], Anchor(
            "mamba_ssm.ops.selective_scan_interface", "selective_scan_fn",
            [u, delta, A, Bm, Cm], {}, "mamba_ssm selective_scan_fn")
    raise KeyError(name)


def _leaves(*groups) -> list:
    """The distinct floating tensors of the argument lists, made leaves requiring grad."""
    seen = {}
    for grp in groups:
        for t in grp:
            if hasattr(t, "is_floating_point") and t.is_floating_point():
                seen.setdefault(id(t), t)
    for t in seen.values():
        t.requires_grad_(True)
    return list(seen.values())


def rel_rms(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time scancc's Triton kernels against fla and "
                                 "mamba_ssm on a CUDA GPU (bf16), with a rel-RMS check of each "
                                 "pair. Without a CUDA device: prints 'no CUDA device: nothing "
                                 "timed' and exits 0.")
    ap.add_argument("--names", nargs="*", help="recurrences (default: every case)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--backward", action="store_true",
                    help="time forward + backward (y.backward(dy)) instead of the forward")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"no CUDA device: nothing timed (torch not importable: {e})")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing timed")
        return 0
    import scancc
    import triton
    from triton.testing import do_bench
    dev, dtype = torch.device("cuda"), torch.bfloat16
    what = "forward + backward" if a.backward else "forward"
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
          f"{triton.__version__} | bf16 inputs | {what} | do_bench median ms (warmup "
          f"{a.warmup} ms, rep {a.rep} ms) | measured\n")
    grad_col = " rel-RMS d(first input) |" if a.backward else ""
    print("| recurrence | shape | B,T | scancc algorithm | scancc ms | anchor | anchor ms "
          f"| scancc/anchor | rel-RMS vs anchor |{grad_col}")
    print("|---|---|---|---|---:|---|---:|---:|---:|" + ("---:|" if a.backward else ""))
    blank = " | | | |" + (" |" if a.backward else "")

    def timed(f, leaves, dy):
        """(output, first input's gradient or None, ms) of f (forward, or forward + backward)."""
        if not a.backward:
            y = f()
            torch.cuda.synchronize()
            return y, None, do_bench(f, warmup=a.warmup, rep=a.rep, return_mode="median")

        def step():
            f().backward(dy)
        for t in leaves:
            t.grad = None
        y = f()
        y.backward(dy)
        torch.cuda.synchronize()
        g0 = leaves[0].grad.detach().clone()
        ms = do_bench(step, warmup=a.warmup, rep=a.rep, grad_to_none=leaves,
                      return_mode="median")
        return y.detach(), g0, ms

    for name, label, dims in CASES:
        if a.names and name not in a.names:
            continue
        kern = scancc.compile(name, "triton")
        for sh in a.shapes:
            B, T = SHAPES[sh]
            try:
                sc_args, anchor = _inputs(name, B, T, dims, dev, dtype)
                leaves = _leaves(sc_args, anchor.args) if a.backward else []
                dy = None
                if a.backward:
                    with torch.no_grad():
                        dy = torch.randn_like(kern(*sc_args))
                y, gy, t_sc = timed(lambda: kern(*sc_args), leaves, dy)
                algo = dict(getattr(kern.last_run, "counters", None) or {}).get("algorithm", "?")
            except Exception as e:  # noqa: BLE001 - a row that says why
                print(f"| {name} | {label} | {sh} | failed: {type(e).__name__}: "
                      f"{str(e)[:150]} | | | | |" + (" |" if a.backward else ""))
                continue
            try:
                an = anchor.call()
            except Exception as e:  # noqa: BLE001 - not installed: skip with the reason
                print(f"| {name} | {label} | {sh} | {algo} | {t_sc:.3f} | {anchor.label}: "
                      f"skipped ({type(e).__name__}: {str(e)[:100]}){blank}")
                continue
            try:
                ya, ga, t_an = timed(an, leaves, dy)
                err = rel_rms(y, ya)
            except Exception as e:  # noqa: BLE001
                print(f"| {name} | {label} | {sh} | {algo} | {t_sc:.3f} | {anchor.label}: "
                      f"failed ({type(e).__name__}: {str(e)[:100]}){blank}")
                continue
            ratio = t_sc / t_an if t_an > 0 else math.inf
            gcol = f" {rel_rms(gy, ga):.2e} |" if a.backward else ""
            print(f"| {name} | {label} | {sh} | {algo} | {t_sc:.3f} | {anchor.label} | "
                  f"{t_an:.3f} | {ratio:.2f} | {err:.2e} |{gcol}")
            sc_args = anchor = leaves = dy = y = ya = gy = ga = None  # free before the next
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
