"""Offline sm_90 report of the chunked Triton kernels per algorithm and dot precision, one row
per compiled kernel (the staged form: one per stage). Same toolchain as bench_sm90.py
(Triton's compiler for ``GPUTarget("cuda", 90, 32)``, ``ptxas-blackwell -v -arch=sm_90a``,
tensor cores = ``warp_group_dot``/``nvidia_mma`` in the TTGIR); everything *measured* by the
compiler toolchain, nothing is a timing. A quick per-stage view: it compiles each stage with
the Lowering's compile arguments (not the launcher's recorded ones) and its "programs" column
is the plan's grid x blocks (x chunks for stages 1 and 3; the state pass's K/V sub-blocks are
not counted); ``bench_sm90.py`` records the real launches and is the report of record.

    .venv/bin/python benchmarks/bench_sm90_stages.py [--dtype bfloat16] \
        [--algorithms chunked,staged] [--precisions auto,ieee] [--shape B1T32768] [names ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sm90 import SHAPES, compile_all  # noqa: E402

# dims not named take their declared size, else these (H16 K=V=128; mamba2 as bench_sm90)
DIMS = {"heads": 16, "key": 128, "value": 128}
OVERRIDE = {"mamba2": {"heads": 80, "headdim": 64, "dstate": 128, "groups": 1}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--algorithms", default="chunked,staged")
    ap.add_argument("--precisions", default="auto,ieee")
    ap.add_argument("--shape", default="B8T2048", choices=list(SHAPES))
    a = ap.parse_args()
    from scancc import backends, registry
    tb = backends.get("triton")
    names = a.names or [n for n in registry.names() if registry.get(n).origin == "library"]
    jobs, meta = [], {}
    tmp = tempfile.mkdtemp(prefix="scancc_sm90_")
    for name in names:
        rec = registry.get(name).build()
        shape = {**SHAPES[a.shape], **DIMS, **OVERRIDE.get(name, {})}
        sizes = {d.name: d.size or shape.get(d.name, 1) for d in rec.dims}
        for algo in a.algorithms.split(","):
            for prec in a.precisions.split(","):
                opts = {"algorithm": algo, "dot_precision": prec}
                if not tb.supports(rec, opts)[0]:
                    continue
                low = tb._lowering_for(rec, opts)
                path = os.path.join(tmp, f"{name}_{algo}_{prec}.py")
                src = low.render()
                with open(path, "w") as f:
                    f.write(src)
                progs = 1
                for d in low.plan.grid:
                    progs *= sizes[d]
                for d in low.plan.split:
                    progs *= -(-sizes[d] // low.block_size(d, sizes[d], sizes))
                chunks = -(-sizes[rec.time] // low.block_size(rec.time, sizes[rec.time]))
                # the stages the kernel has (identity/scalar/key-diagonal kinds: no stage 1,
                # the state pass computes each chunk's contribution itself)
                stages = (tuple(st for st in (1, 2, 3) if f"== {st}:  # " in src)
                          if algo == "staged" else (None,))
                for st in stages:
                    sig, const = (low.compile_args(sizes, a.dtype, st) if st
                                  else low.compile_args(sizes, a.dtype))
                    key = f"{name}|{algo}|{prec}|{st or ''}"
                    meta[key] = progs * (chunks if st in (1, 3) else 1)
                    nw = low.stage_warps(st, 4) if st else 4
                    meta[key] = (meta[key], nw)
                    sig = {**sig, **{c: "constexpr" for c in const}}
                    jobs.append({"key": key, "path": path, "kernel": low.kernel_name,
                                 "sig": sig, "const": const, "num_warps": nw})
    res = compile_all(jobs)
    print(f"sm_90 (ptxas-blackwell -v -arch=sm_90a), {a.dtype}, {a.shape} H16 K=V=128; "
          "measured by the toolchain\n")
    print("| recurrence | algorithm | dot_precision | stage | programs | warps | registers | "
          "spill stores B | tensor cores |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for key, r in res.items():
        name, algo, prec, st = key.split("|")
        progs, nw = meta[key]
        if "error" in r:
            print(f"| {name} | {algo} | {prec} | {st or '-'} | {progs} | {nw} | "
                  f"error: {r['error'][:80]} | | |")
            continue
        print(f"| {name} | {algo} | {prec} | {st or '-'} | {progs} | {nw} | {r['regs']} | "
              f"{r['spill_st']} | {'yes' if r['tc'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
