"""Offline sm_90 report of the Triton ``scan`` algorithm's three kernels next to the recurrent
kernel (shared/design PERFORMANCE.md): each kernel is compiled by Triton's own compiler for
an H100 (``GPUTarget("cuda", 90, 32)``, no GPU needed), then the ptxas shipped with Triton
(``ptxas-blackwell -v -arch=sm_90a``) reports registers and spill bytes. Programs per launch
and sequential iterations per program come from the launcher's rule (grid of the recurrent
plan × chunks; ``scan.chunk_length`` with 132 SMs). Measured by the toolchain; no timing.

    .venv/bin/python benchmarks/bench_scan_sm90.py [--dtype bfloat16] [--batch 1] [--time 32768] [names ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPE = {"chan": 2048, "dstate": 16, "heads": 2048, "groups": 1}

_CHILD = r'''
import json, re, subprocess, sys, importlib.util, os, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
out = []
for label, path, kernel, sig, const in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("m_" + label.replace(" ", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = triton.compile(ASTSource(fn=getattr(mod, kernel), signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                       capture_output=True, text=True)
    log = r.stderr + r.stdout
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", log)] or [-1])
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    out.append([label, regs, spill])
print(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=["mamba", "s4d", "hgrn"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--time", type=int, default=32768)
    a = ap.parse_args()
    from scancc import backends, registry
    from scancc.backends.triton import scan
    tb = backends.get("triton")
    jobs, meta = [], {}
    tmp = tempfile.mkdtemp(prefix="scancc_scan_sm90_")
    for name in a.names:
        rec = registry.get(name).build()
        sizes = {d.name: d.size or {**SHAPE, "batch": a.batch, "time": a.time}.get(d.name, 4)
                 for d in rec.dims}
        rl = tb._lowering_for(rec, {"algorithm": "recurrent"})
        sl = tb._lowering_for(rec, {"algorithm": "scan"})
        programs = 1
        for d in rl.plan.grid:
            programs *= sizes[d]
        for d in rl.plan.split:
            programs *= -(-sizes[d] // rl.block_size(d, sizes[d], sizes))
        T = sizes[rec.time]
        L = scan.chunk_length(programs, T)
        nc = -(-T // L)
        numel = max(1, sum(_numel(s, sizes) for s in rec.states))
        for low, tag in [(rl, "recurrent")]:
            path = os.path.join(tmp, f"{name}_{tag}.py")
            with open(path, "w") as f:
                f.write(low.render())
            sig, const = low.compile_args(sizes, a.dtype)
            jobs.append([f"{name} recurrent", path, low.kernel_name, sig, const])
            meta[f"{name} recurrent"] = (programs, T)
        path = os.path.join(tmp, f"{name}_scan.py")
        stages = sl.stages_compile_args(sizes, a.dtype)
        with open(path, "w") as f:
            f.write(sl.render())
        for (kernel, sig, const), tag, progs, iters in zip(
                stages, ["scan stage 1 (local)", "scan stage 2 (carry)", "scan stage 3 (fwd)"],
                [programs * nc, -(-numel // 256), programs * nc], [L, nc, L]):
            jobs.append([f"{name} {tag}", path, kernel, sig, const])
            meta[f"{name} {tag}"] = (progs, iters)
        meta[name] = (T, L, nc)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(jobs), env=env,
                       capture_output=True, text=True, timeout=1200)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    print(f"sm_90 (ptxas-blackwell -v -arch=sm_90a), {a.dtype} inputs, B{a.batch} T{a.time}; "
          "registers/spills measured by the toolchain, programs/iterations from the launcher's "
          "rule (132 SMs)\n")
    for name in a.names:
        T, L, nc = meta[name]
        print(f"{name}: chunk {L}, {nc} chunks")
    print("\n| kernel | programs | sequential iterations / program | registers | spill stores B |")
    print("|---|---:|---:|---:|---:|")
    for label, regs, spill in json.loads(r.stdout.strip().splitlines()[-1]):
        progs, iters = meta[label]
        if "stage 1" in label or "stage 2" in label:
            if meta[label.split()[0]][2] == 1:
                progs, iters = "not launched (one chunk)", "-"
        print(f"| {label} | {progs} | {iters} | {regs} | {spill} |")
    return 0


def _numel(s, sizes) -> int:
    n = 1
    for d in s.dims:
        n *= sizes[d]
    return n


if __name__ == "__main__":
    sys.exit(main())
