"""Offline sm_90 report of the Triton forward kernels (shared/design PERFORMANCE.md): for each
library recurrence at a realistic shape, the default algorithm's kernel is compiled by
Triton's own compiler for an H100 (``GPUTarget("cuda", 90, 32)``, no GPU needed), then the
ptxas shipped with Triton (``ptxas-blackwell -v -arch=sm_90a``: the plain ``ptxas`` there is
too old for Triton's PTX 9.4) reports registers and spill bytes; the TTGIR
says whether a tensor-core op (``warp_group_dot`` / ``nvidia_mma``) is used; programs per
launch come from the plan (grid dims × blocks of split dims). Everything here is *measured*
by the compiler toolchain; nothing is a timing.

    .venv/bin/python benchmarks/bench_sm90.py [--dtype bfloat16] [names ...]

Runs the compile in a child process without TRITON_INTERPRET (the interpreter replaces the
compiler in this process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# B8 T2048, attention family H16 K=V=128, Mamba2-2.7B H80 P64 N128, mamba D2048 N16
SHAPE = {"batch": 8, "time": 2048, "heads": 16, "key": 128, "value": 128, "chan": 2048,
         "dstate": 16, "headdim": 64, "groups": 1}
OVERRIDE = {"mamba2": {"heads": 80, "dstate": 128}}

_CHILD = r'''
import json, re, subprocess, sys, importlib.util, os, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
out = []
for name, path, kernel, sig, const in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("m_" + name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = triton.compile(ASTSource(fn=getattr(mod, kernel), signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    ttgir = c.asm["ttgir"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                       capture_output=True, text=True)
    log = r.stderr + r.stdout
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", log)] or [-1])
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    tc = "warp_group_dot" in ttgir or "nvidia_mma" in ttgir
    dots = ttgir.count("tt.dot") + ttgir.count("warp_group_dot")
    out.append([name, regs, spill, tc, dots])
print(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--dtype", default="bfloat16")
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
        low = tb._lowering_for(rec, {})
        path = os.path.join(tmp, f"{name}.py")
        with open(path, "w") as f:
            f.write(low.render())
        sig, const = low.compile_args(sizes, a.dtype)
        programs = 1
        for d in low.plan.grid:
            programs *= sizes[d]
        for d in low.plan.split:
            b = low.block_size(d, sizes[d], sizes)
            programs *= -(-sizes[d] // b)
        meta[name] = (low.algorithm, programs, sizes[rec.time])
        jobs.append([name, path, low.kernel_name, sig, const])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(jobs), env=env,
                       capture_output=True, text=True, timeout=1200)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    print(f"sm_90 (ptxas-blackwell -v -arch=sm_90a), {a.dtype}, B8 T2048; measured by the toolchain\n")
    print("| recurrence | algorithm | programs | registers | spill stores B | tensor cores |")
    print("|---|---|---:|---:|---:|---|")
    for name, regs, spill, tc, _ in json.loads(r.stdout.strip().splitlines()[-1]):
        algo, programs, _ = meta[name]
        print(f"| {name} | {algo} | {programs} | {regs} | {spill} | {'yes' if tc else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
