"""Offline sm_90 report of the chunked Triton kernels per algorithm and dot precision, one row
per compiled kernel (the staged form: one per stage). Same toolchain as bench_sm90.py
(Triton's compiler for ``GPUTarget("cuda", 90, 32)``, ``ptxas-blackwell -v -arch=sm_90a``,
tensor cores = ``warp_group_dot``/``nvidia_mma`` in the TTGIR); everything *measured* by the
compiler toolchain, nothing is a timing.

    .venv/bin/python benchmarks/bench_sm90_stages.py [--dtype bfloat16] \
        [--algorithms chunked,staged] [--precisions auto,ieee] [names ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sm90 import _CHILD, OVERRIDE, SHAPE  # noqa: E402

# bench_sm90's child, with the launcher's num_warps per kernel (a sixth field of each job)
_CHILD = _CHILD.replace("for name, path, kernel, sig, const in json.load(sys.stdin):",
                        "for name, path, kernel, sig, const, nw in json.load(sys.stdin):")
_CHILD = _CHILD.replace('target=GPUTarget("cuda", 90, 32))',
                        'target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})')
assert "nw}" in _CHILD and ", nw in" in _CHILD


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--algorithms", default="chunked,staged")
    ap.add_argument("--precisions", default="auto,ieee")
    a = ap.parse_args()
    from scancc import backends, registry
    tb = backends.get("triton")
    names = a.names or [n for n in registry.names() if registry.get(n).origin == "library"]
    jobs, meta = [], {}
    tmp = tempfile.mkdtemp(prefix="scancc_sm90_")
    for name in names:
        rec = registry.get(name).build()
        sizes = {d.name: d.size or {**SHAPE, **OVERRIDE.get(name, {})}.get(d.name, 4)
                 for d in rec.dims}
        for algo in a.algorithms.split(","):
            for prec in a.precisions.split(","):
                opts = {"algorithm": algo, "dot_precision": prec}
                if not tb.supports(rec, opts)[0]:
                    continue
                low = tb._lowering_for(rec, opts)
                path = os.path.join(tmp, f"{name}_{algo}_{prec}.py")
                with open(path, "w") as f:
                    f.write(low.render())
                progs = 1
                for d in low.plan.grid:
                    progs *= sizes[d]
                for d in low.plan.split:
                    progs *= -(-sizes[d] // low.block_size(d, sizes[d], sizes))
                chunks = -(-sizes[rec.time] // low.block_size(rec.time, sizes[rec.time]))
                stages = (1, 2, 3) if algo == "staged" else (None,)
                for st in stages:
                    sig, const = (low.compile_args(sizes, a.dtype, st) if st
                                  else low.compile_args(sizes, a.dtype))
                    key = f"{name}|{algo}|{prec}|{st or ''}"
                    meta[key] = progs * (chunks if st in (1, 3) else 1)
                    nw = low.stage_warps(st, 4) if st else 4
                    meta[key] = (meta[key], nw)
                    jobs.append([key, path, low.kernel_name, sig, const, nw])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(jobs), env=env,
                       capture_output=True, text=True, timeout=3000)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    print(f"sm_90 (ptxas-blackwell -v -arch=sm_90a), {a.dtype}, B8 T2048; measured by the "
          "toolchain\n")
    print("| recurrence | algorithm | dot_precision | stage | programs | warps | registers | "
          "spill stores B | tensor cores |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for key, regs, spill, tc, _ in json.loads(r.stdout.strip().splitlines()[-1]):
        name, algo, prec, st = key.split("|")
        progs, nw = meta[key]
        print(f"| {name} | {algo} | {prec} | {st or '-'} | {progs} | {nw} | {regs} | {spill} | "
              f"{'yes' if tc else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
