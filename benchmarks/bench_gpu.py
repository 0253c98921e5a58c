"""Time scancc's Triton forward next to the hand-written GPU kernels it should match, in one
run, on a CUDA machine (shared/design PERFORMANCE.md "Whenever a GPU is available").

For every case (the shapes of benchmarks/bench_sm90.py, bf16 inputs) it times

- scancc: ``scancc.compile(name, "triton")`` with default options (the "auto" algorithm);
- the anchor: fla's ``chunk_linear_attn`` (normalize=False) / ``chunk_retention`` /
  ``chunk_simple_gla`` / ``chunk_gla`` / ``chunk_delta_rule`` / ``chunk_gated_delta_rule``,
  mamba_ssm's ``mamba_chunk_scan_combined`` (chunk 256) and ``selective_scan_fn``
  (each skipped with the printed reason when it cannot be imported),

with ``triton.testing.do_bench`` (CUDA events, warmup and repetitions given by flags, median
ms), and prints ms, the ratio scancc/anchor and the rel-RMS difference of the two outputs
(``||a - b|| / ||b||`` in float32) side by side. Without a CUDA device it prints
"no CUDA device: nothing timed" and exits 0.

    python benchmarks/bench_gpu.py                       # every case
    python benchmarks/bench_gpu.py --names gla mamba2 --shapes B1T32768 --rep 200
"""
from __future__ import annotations

import argparse
import math
import sys

SHAPES = {"B8T2048": (8, 2048), "B1T32768": (1, 32768)}
ATTN = {  # scancc name -> (fla function, extra kwargs)
    "linear_attn": ("chunk_linear_attn", {"normalize": False}),
    "retnet": ("chunk_retention", {}),
    "simple_gla": ("chunk_simple_gla", {}),
    "gla": ("chunk_gla", {}),
    "delta_net": ("chunk_delta_rule", {}),
    "gated_delta_net": ("chunk_gated_delta_rule", {}),
}
CASES = [(n, f"H{h} K=V=128", {"heads": h, "key": 128, "value": 128})
         for n in ATTN for h in (16, 96)]
CASES += [("mamba2", "H80 P64 N128", {"heads": 80, "headdim": 64, "dstate": 128}),
          ("mamba", "D2048 N16", {"chan": 2048, "dstate": 16})]


def _inputs(name: str, B: int, T: int, dims: dict, dev, dtype):
    """(scancc positional inputs, anchor call) with realistic value ranges."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s, dt=dtype):
        return torch.randn(*s, generator=g, device=dev, dtype=torch.float32).to(dt)
    if name in ATTN:
        H, K, V = dims["heads"], dims["key"], dims["value"]
        q, k, v = rn(B, T, H, K), rn(B, T, H, K), rn(B, T, H, V)
        if name in ("delta_net", "gated_delta_net"):
            q = F.normalize(q.float(), dim=-1).to(dtype)
            k = F.normalize(k.float(), dim=-1).to(dtype)
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
        sc_args = args + list(extra.values())

        def anchor():
            import fla.ops as ops
            f = getattr(ops, fn_name)
            return lambda: f(*args, **extra, **kw)[0]
        return sc_args, anchor, f"fla.ops.{fn_name}"
    if name == "mamba2":
        H, P, N = dims["heads"], dims["headdim"], dims["dstate"]
        x = rn(B, T, H, P)
        dt = F.softplus(rn(B, T, H, dt=torch.float32) - 4).to(dtype)
        A = -torch.exp(rn(H, dt=torch.float32))  # float32, as mamba_ssm keeps A
        Bm, Cm = rn(B, T, 1, N), rn(B, T, 1, N)

        def anchor():
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
            return lambda: mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=256)
        return [x, dt, A, Bm, Cm], anchor, "mamba_ssm mamba_chunk_scan_combined (chunk 256)"
    if name == "mamba":
        D, N = dims["chan"], dims["dstate"]
        u = rn(B, D, T)
        delta = F.softplus(rn(B, D, T, dt=torch.float32) - 4).to(dtype)
        A = -torch.exp(rn(D, N, dt=torch.float32))  # float32, as mamba_ssm keeps A
        Bm, Cm = rn(B, 1, N, T), rn(B, 1, N, T)

        def anchor():
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            return lambda: selective_scan_fn(u, delta, A, Bm, Cm)
        return [u, delta, A, Bm, Cm], anchor, "mamba_ssm selective_scan_fn"
    raise KeyError(name)


def rel_rms(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time scancc's Triton forward against fla and "
                                 "mamba_ssm on a CUDA GPU (bf16), with a rel-RMS check of each "
                                 "pair. Without a CUDA device: prints 'no CUDA device: nothing "
                                 "timed' and exits 0.")
    ap.add_argument("--names", nargs="*", help="recurrences (default: every case)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
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
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
          f"{triton.__version__} | bf16 inputs | do_bench median ms (warmup {a.warmup} ms, "
          f"rep {a.rep} ms) | measured\n")
    print("| recurrence | shape | B,T | scancc algorithm | scancc ms | anchor | anchor ms "
          "| scancc/anchor | rel-RMS vs anchor |")
    print("|---|---|---|---|---:|---|---:|---:|---:|")
    for name, label, dims in CASES:
        if a.names and name not in a.names:
            continue
        kern = scancc.compile(name, "triton")
        for sh in a.shapes:
            B, T = SHAPES[sh]
            try:
                sc_args, make_anchor, anchor_name = _inputs(name, B, T, dims, dev, dtype)
                sc = lambda: kern(*sc_args)  # noqa: E731
                y = sc()
                torch.cuda.synchronize()
                algo = dict(getattr(kern.last_run, "counters", None) or {}).get("algorithm", "?")
                t_sc = do_bench(sc, warmup=a.warmup, rep=a.rep, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a row that says why
                print(f"| {name} | {label} | {sh} | failed: {type(e).__name__}: "
                      f"{str(e)[:150]} | | | | | |")
                continue
            try:
                an = make_anchor()
            except Exception as e:  # noqa: BLE001 - not installed: skip with the reason
                print(f"| {name} | {label} | {sh} | {algo} | {t_sc:.3f} | {anchor_name}: "
                      f"skipped ({type(e).__name__}: {str(e)[:100]}) | | | |")
                continue
            try:
                ya = an()
                torch.cuda.synchronize()
                t_an = do_bench(an, warmup=a.warmup, rep=a.rep, return_mode="median")
                err = rel_rms(y, ya)
            except Exception as e:  # noqa: BLE001
                print(f"| {name} | {label} | {sh} | {algo} | {t_sc:.3f} | {anchor_name}: "
                      f"failed ({type(e).__name__}: {str(e)[:100]}) | | | |")
                continue
            ratio = t_sc / t_an if t_an > 0 else math.inf
            print(f"| {name} | {label} | {sh} | {algo} | {t_sc:.3f} | {anchor_name} | "
                  f"{t_an:.3f} | {ratio:.2f} | {err:.2e} |")
            sc_args = y = ya = None  # free before the next case
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
