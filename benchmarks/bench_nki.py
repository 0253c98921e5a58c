"""NKI backend benchmark (cost model, no hardware): per library recurrence at realistic
shapes, run the generated kernel in the emulator and report DMA bytes against the minimum
(every input read once, every output written once), instructions per engine and the cost
model's cycles and projected time.

    .venv/bin/python benchmarks/bench_nki.py [--only mamba,hgrn] [--dtype bfloat16] [--markdown]

The cost model is the Neuron SDK documentation's rough one (docs/nki.md; Vector/Scalar ~max(64, N) cycles per instruction, nc_matmul
~max(min(64, stationary free), moving free) x4 for fp32 inputs) plus an assumed DMA rate;
the projected time is the busiest engine's cycles at 1.4 GHz (engines overlap perfectly),
so it is a lower bound on a real run, not a measurement.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from scancc import registry
from scancc.backends import get
from scancc.testing import default_sizes, sample_inputs

# (name, options, sizes): shapes in the range the layers are used at
CASES = [
    ("mamba", {}, dict(batch=1, time=512, chan=256, dstate=16)),      # AWS tutorial shape
    ("mamba", {}, dict(batch=1, time=512, chan=4096, dstate=16)),
    ("mamba", {}, dict(batch=1, time=8192, chan=256, dstate=16)),
    ("mamba2", {}, dict(batch=1, time=2048, heads=8, headdim=64, dstate=64)),
    ("s4d", {}, dict(batch=1, time=2048, heads=256, dstate=64)),
    ("hgrn", {}, dict(batch=1, time=2048, chan=1024)),
    ("linear_attn", {}, dict(batch=1, time=2048, heads=8, key=64, value=64)),
    ("retnet", {}, dict(batch=1, time=2048, heads=8, key=64, value=64)),
    ("simple_gla", {}, dict(batch=1, time=2048, heads=8, key=64, value=64)),
    ("gla", {}, dict(batch=1, time=2048, heads=8, key=64, value=64)),
    # issue 15: the key-diagonal chunked form (the default) against the scan form
    ("gla", {}, dict(batch=1, time=2048, heads=8, key=64, value=64), {"algorithm": "recurrent"}),
    ("hgrn2", {}, dict(batch=1, time=2048, heads=8, key=64, value=64)),
    ("hgrn2", {}, dict(batch=1, time=2048, heads=8, key=64, value=64),
     {"algorithm": "recurrent"}),
    ("rwkv6", {}, dict(batch=1, time=2048, heads=8, key=64, value=64)),
    ("rwkv6", {}, dict(batch=1, time=2048, heads=8, key=64, value=64),
     {"algorithm": "recurrent"}),
    ("delta_net", {}, dict(batch=1, time=512, heads=4, key=64, value=64)),
    ("gated_delta_net", {}, dict(batch=1, time=512, heads=4, key=64, value=64)),
    ("fir", {}, dict(batch=1, time=2048, chan=1024, width=4)),
    ("iir", {}, dict(batch=1, time=2048, chan=1024, order=3)),
    ("swa", {"window": 8}, dict(batch=1, time=512, heads=8, key=64, value=64)),
    # B'MOJO (docs/bmojo.md): the Triton rows' widths (docs/performance/triton.md), T = 128
    # (at T = 512 the two did not finish within 15 min on this shared 2-core machine)
    ("bmojo_f", {"window": 4}, dict(batch=1, time=128, heads=4, key=64, value=64)),
    ("bmojo", {"window": 4, "memory": 4, "predictor": 2},
     dict(batch=1, time=128, heads=4, key=64, value=64)),
]
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def run_case(name, options, sizes, dtype, backend=None):
    entry = registry.get(name)
    rec = entry.build(**options)
    sz = default_sizes(rec, **sizes)
    x = {k: v.astype(np.float32) for k, v in sample_inputs(rec, sz, 0, entry.hints).items()}
    be = get("nki")
    t = time.time()
    res = be.run(rec, x, sz, None, False, {"dtype": dtype, **(backend or {})})
    wall = time.time() - t
    c = res.counters
    isz = ITEMSIZE[dtype]
    minimum = sum(v.size for v in x.values()) * isz + \
        sum(v.size for v in res.outputs.values()) * isz
    moved = c["dma_bytes_in"] + c["dma_bytes_out"]
    algo = "chunked" if be.last_plan.chunked else "recurrent"
    return {"name": f"{name} ({algo})", "shape": ", ".join(f"{k}={v}" for k, v in sizes.items()),
            "plan": f"{be.last_plan.pd}/{be.last_plan.tt}", "dma_ratio": moved / minimum,
            "dma_mb": moved / 1e6, "instr": c["instructions"], "cycles": c["cycles"],
            "bound": c["cycles_bound"], "us": c["projected_seconds"] * 1e6, "wall": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated recurrence names")
    ap.add_argument("--dtype", default="float32", choices=sorted(ITEMSIZE))
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    eng = ("tensor", "vector", "scalar", "gpsimd", "dma")
    rows = []
    for n, o, s, *b in CASES:
        if only and n not in only:
            continue
        r = run_case(n, o, s, args.dtype, b[0] if b else None)
        rows.append(r)
        if not args.markdown:
            print(f"{r['name']:28s} {r['shape']:48s} {r['plan']:12s} DMA {r['dma_mb']:8.2f} MB "
                  f"x{r['dma_ratio']:.3f} instr {r['instr']} cycles {r['cycles']} "
                  f"-> {r['us']:.1f} us (emulated in {r['wall']:.1f} s)", flush=True)
    if args.markdown:
        print("| recurrence | shape | pd/TT | DMA MB | DMA / min | instructions T/V/S/G/DMA "
              "| cycles T/V/S/G/DMA | projected µs |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['shape']} | {r['plan']} | {r['dma_mb']:.2f} | "
                  f"{r['dma_ratio']:.3f} | {'/'.join(str(r['instr'][e]) for e in eng)} | "
                  f"{'/'.join(str(r['cycles'][e]) for e in eng)} | {r['us']:.1f} |")


if __name__ == "__main__":
    main()
