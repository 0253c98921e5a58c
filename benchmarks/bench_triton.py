"""Global-memory bytes and FLOPs of the generated Triton kernels, and a roofline-projected
H100 time. Not a test: prints a Markdown table (docs/performance/triton.md records one).

    python benchmarks/bench_triton.py [--dtype bfloat16] [names ...]

Without a GPU the kernels run in Triton's CPU interpreter, whose loads, stores and
arithmetic are instrumented: bytes are those of every executed load/store (masked-off lanes
excluded; "unique" counts each address once: the traffic with a cache that never evicts,
e.g. per-step reloads of a small time-invariant operand hit L1/L2 on a GPU), FLOPs those of every executed float op (padding lanes included: work a GPU does
too; tl.dot counts 2*M*N*K; reductions (tl.sum/max/cumsum) are not counted). The minimum
traffic is each input read once and each output written once.

Roofline (H100 SXM): 3.35 TB/s HBM; tl.dot at 989 TFLOP/s (dense bf16/fp16 tensor cores,
dot_precision="input" on 16-bit inputs), 165 TFLOP/s ("tf32x3": three TF32 passes at 494)
or 67 TFLOP/s (float32 "ieee", the default: no tensor cores); 67 TFLOP/s float32 for
everything else: t = max(bytes / BW, dot / peak_dot + other / 67T). Recurrent kernels run a
dependent chain of T steps, so their real time is latency-bound above this bound.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np

HBM = 3.35e12
FP32_PEAK = 67e12
DOT_PEAK = {"input": 989e12, "tf32x3": 494e12 / 3, "ieee": FP32_PEAK}

# realistic shapes (the for mamba, gla/simple_gla, mamba2; kin shapes for the rest)
ATTN = {"batch": 1, "time": 512, "heads": 4, "key": 64, "value": 64}
SHAPES = {
    "linear_attn": ATTN, "retnet": ATTN, "simple_gla": ATTN, "gla": ATTN,
    "delta_net": ATTN, "gated_delta_net": ATTN,
    "swa": ATTN,
    "bmojo_f": ATTN, "bmojo": ATTN,   # window 4 (bmojo: memory 4, predictor 2), the defaults
    "hgrn": {"batch": 1, "time": 512, "chan": 1024},
    "mamba": {"batch": 1, "chan": 256, "time": 512, "groups": 1, "dstate": 16},
    "mamba2": {"batch": 1, "time": 512, "heads": 8, "headdim": 64, "groups": 1, "dstate": 64},
    "s4d": {"batch": 1, "heads": 256, "time": 512, "dstate": 16},
    "fir": {"batch": 1, "time": 512, "chan": 1024, "width": 4},
    "iir": {"batch": 1, "time": 512, "chan": 256, "order": 3},
}


# extra rows: block choices that trade parallelism for traffic: one program holds every
# channel (mamba) or every head of a group (mamba2), so B and C are read once
VARIANTS = {"mamba": [{"block_sizes": {"chan": 256}}], "mamba2": [{"block_sizes": {"heads": 8}}]}


class Flops:
    def __init__(self):
        self.dot = 0
        self.other = 0


@contextlib.contextmanager
def count_flops():
    from triton.runtime import interpreter as it
    B = it.InterpreterBuilder
    fl = Flops()
    saved = {}

    def wrap(name, per):
        orig = getattr(B, name)
        saved[name] = orig

        def f(self, *args):
            out = orig(self, *args)
            fl.other += per * int(np.size(out.data))
            return out
        setattr(B, name, f)

    for name in ("create_fadd", "create_fsub", "create_fmul", "create_fdiv",
                 "create_precise_divf", "create_minimumf", "create_maximumf", "create_exp",
                 "create_log", "create_sqrt", "create_precise_sqrt", "create_rsqrt",
                 "create_fneg"):
        wrap(name, 1)
    wrap("create_fma", 2)
    orig_dot = B.create_dot
    saved["create_dot"] = orig_dot

    def dot(self, a, b, d, *args):
        m, k = a.data.shape[-2:]
        n = b.data.shape[-1]
        fl.dot += 2 * m * n * k * int(np.prod(a.data.shape[:-2], dtype=np.int64))
        return orig_dot(self, a, b, d, *args)
    B.create_dot = dot
    try:
        yield fl
    finally:
        for name, f in saved.items():
            setattr(B, name, f)


def measure(name: str, algo: str, dtype: str, options=None):
    import torch

    from scancc import backends, registry, testing
    from scancc.backends.triton import runtime
    entry = registry.get(name)
    rec = entry.build()
    sizes = SHAPES[name]
    x = testing.sample_inputs(rec, sizes, 0, hints=entry.hints)
    tx = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in x.items()}
    tb = backends.get("triton")
    opts = {"algorithm": algo, **(options or {})}
    tb.launcher(rec, opts, ())  # compile outside the counters
    t0 = time.time()
    with runtime.count_traffic() as tr, count_flops() as fl:
        res = tb.run(rec, tx, sizes, None, False, opts)
    wall = time.time() - t0
    item = tx[rec.inputs[0].name].element_size()
    minimum = sum(v.numel() * v.element_size() for v in tx.values())
    minimum += sum(v.numel() * item for v in res.outputs.values())
    moved = tr.loaded + tr.stored
    unique = tr.unique_loaded + tr.unique_stored
    t_mem = moved / HBM
    peak = DOT_PEAK[opts.get("dot_precision", "ieee")] if dtype != "float32" else FP32_PEAK
    t_cmp = fl.dot / peak + fl.other / FP32_PEAK
    return {"name": name, "algo": algo, "bytes": moved, "min": minimum,
            "ratio": moved / minimum, "unique": unique, "uratio": unique / minimum, "dot": fl.dot, "other": fl.other,
            "t_us": max(t_mem, t_cmp) * 1e6, "bound": "memory" if t_mem >= t_cmp else "compute",
            "wall": wall, "options": options or {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)
    from scancc.backends import get
    from scancc import registry
    tb = get("triton")
    ok, why = tb.available()
    print(f"# triton backend: {why}", file=sys.stderr)
    names = args.names or list(SHAPES)
    print("| recurrence | algorithm | shape | bytes accessed | minimum | ratio | unique bytes | "
          "unique ratio | dot FLOP | other FLOP | H100 roofline (us) | bound |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        rec = registry.get(name).build()
        for algo in ("recurrent", "chunked"):
            if not tb.supports(rec, {"algorithm": algo})[0]:
                continue
            extra = (VARIANTS.get(name, []) if algo == "recurrent"
                     else [{"dot_precision": "input"}])
            for opts in [None] + extra:
                r = measure(name, algo, args.dtype, opts)
                shape = ", ".join(f"{k}={v}" for k, v in SHAPES[name].items() if k != "groups")
                label = algo + (f" {opts}" if opts else "")
                print(f"| {name} | {label} | {shape} | {r['bytes']:,} | {r['min']:,} | "
                      f"{r['ratio']:.3f} | {r['unique']:,} | {r['uratio']:.3f} | {r['dot']:.3g} | {r['other']:.3g} | "
                      f"{r['t_us']:.2f} | {r['bound']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
