"""The torch backend on CPU, side by side with what users run today (issue 16's table).

One run measures, per row, on the same float32 inputs:

- ``reference``: scancc's reference backend (NumPy float64 loop; skipped with --no-reference);
- ``baseline``: transformers' Mamba slow path (``mamba_selective_scan``) and Mamba2
  ``torch_forward``'s chunked SSD (``mamba2_chunk_scan``), fla's naive recurrent GLA / simple
  GLA, torch ``conv1d`` (fir), ``scipy.signal.lfilter`` per channel (iir);
- ``torch``: scancc's torch backend (``algorithm=auto``; its first call, which renders and
  loads the module, is made before timing);

and prints wall-clock seconds (best of --repeat; also the best process CPU seconds: on a
loaded machine a process waits for a core, wall > CPU), the ratios and the largest difference of the torch
backend from the baseline relative to the baseline's largest magnitude. Then the peak RSS of
mamba2 on the torch backend at two lengths (each in a fresh process): memory linear in T.

    .venv/bin/python benchmarks/bench_torch_cpu.py            # small sizes (a minute)
    .venv/bin/python benchmarks/bench_torch_cpu.py --full     # issue 16's sizes (long)
    .venv/bin/python benchmarks/bench_torch_cpu.py --rows iir,fir --compile iir,fir
                                         # + torch.compile'd generated code (compile timed apart)

torch uses --threads intra-op threads (default 1: the same for every contender).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import numpy as np
import torch

import scancc
from scancc.testing import quiet_transformers, sample_inputs

SMALL = {"mamba": [512], "mamba2": [512], "gla": [512], "simple_gla": [512], "fir": [2048],
         "iir": [2048]}
FULL = {"mamba": [2048, 8192], "mamba2": [2048], "gla": [2048], "simple_gla": [2048],
        "fir": [8192], "iir": [8192]}
SIZES = {  # issue 16's shapes (B = 1)
    "mamba": dict(batch=1, chan=1536, dstate=16, groups=1),
    "mamba2": dict(batch=1, heads=24, headdim=64, dstate=128, groups=1),
    "gla": dict(batch=1, heads=4, key=64, value=64),
    "simple_gla": dict(batch=1, heads=4, key=64, value=64),
    "fir": dict(batch=1, chan=1024, width=4),
    "iir": dict(batch=1, chan=64, order=4),   # order 3: n + 1 = 4 coefficients
}
BASELINE = {"mamba": "transformers mamba_selective_scan (slow path)",
            "mamba2": "transformers mamba2_chunk_scan (torch_forward, chunk 256)",
            "gla": "fla naive_recurrent_gla", "simple_gla": "fla naive_recurrent_simple_gla",
            "fir": "torch conv1d (depthwise)", "iir": "scipy.signal.lfilter per channel"}


def _baseline(name: str, x: dict):
    """The baseline's output for scancc's inputs ``x`` (float32 tensors), scancc's layout."""
    if name == "mamba":
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan
        with quiet_transformers():
            return mamba_selective_scan(x["u"], x["delta"], x["A"], x["B"][:, 0], x["C"][:, 0])
    if name == "mamba2":
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
        with quiet_transformers():
            return mamba2_chunk_scan(x["x"], x["dt"], x["A"], x["B"], x["C"], 256)
    if name == "gla":
        from fla.ops.gla.naive import naive_recurrent_gla
        return naive_recurrent_gla(x["q"], x["k"], x["v"], x["g"])[0]
    if name == "simple_gla":
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
        return naive_recurrent_simple_gla(x["q"], x["k"], x["v"], x["g"])[0]
    if name == "fir":
        W = x["weight"].shape[1]
        xp = torch.nn.functional.pad(x["x"].transpose(1, 2), (W - 1, 0))
        return torch.nn.functional.conv1d(xp, x["weight"][:, None, :],
                                          groups=x["weight"].shape[0]).transpose(1, 2)
    if name == "iir":
        from scipy.signal import lfilter
        xs, b, a = (x[k].numpy() for k in ("x", "b", "a"))
        y = np.empty_like(xs)
        for c in range(xs.shape[2]):
            y[:, :, c] = lfilter(b[c], a[c], xs[:, :, c], axis=1)
        return torch.from_numpy(y)
    raise KeyError(name)


def _inputs(name: str, T: int) -> dict:
    e = scancc.get(name)
    rec = e.build()
    x = sample_inputs(rec, {**SIZES[name], "time": T}, 0, e.hints)
    if name == "iir":  # a[:, 0] = 1 (lfilter's normalisation), a stable filter
        x["a"][:, 0] = 1.0
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in x.items()}


_CPU: list[float] = []  # the best process CPU time of the last _best call


def _best(fn, repeat: int) -> tuple[float, object]:
    """(best wall-clock seconds, the output); the best process CPU seconds go to _CPU[-1]
    (on a loaded machine the process waits for a core: wall > CPU)."""
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    _CPU.append(cpu)
    return best, out


def _first(y):
    return next(iter(y.values())) if isinstance(y, dict) else y


def _compiled_row(name: str, x: dict, repeat: int, y) -> dict:
    """torch.compile (inductor, fullgraph: a graph break fails) of the generated function:
    the first call (tracing + compiling) timed separately, then the best of ``repeat``."""
    be = scancc.backends.get("torch")
    rec = scancc.get(name).build()
    fn, _ = be.compiled(rec, {})
    sizes = {}
    for i in rec.inputs:
        sizes.update(zip(i.dims, x[i.name].shape))
    for d in rec.dims:
        sizes.setdefault(d.name, 1)
    args = [x[i.name] for i in rec.inputs]
    torch._dynamo.reset()
    cf = torch.compile(fn, fullgraph=True, dynamic=False)

    def call():
        with torch.no_grad():
            return _first(cf(*args, dict(sizes), None, False)[0])
    t0 = time.perf_counter()
    yc = call()
    first = time.perf_counter() - t0
    best, yc = _best(call, repeat)
    diff = float((yc.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
    return dict(compile_first=first, compiled=best, compiled_diff=diff)


def row(name: str, T: int, repeat: int, reference: bool, compile_: bool = False) -> dict:
    x = _inputs(name, T)
    k = scancc.compile(name, "torch")
    k(**_inputs(name, 8))  # render + load once, outside the timing
    t_torch, y = _best(lambda: _first(k(**x)), repeat)
    c_torch = _CPU[-1]
    _baseline(name, _inputs(name, 8))  # imports and first-call set-up, outside the timing
    t_base, yb = _best(lambda: _baseline(name, x), repeat)
    c_base = _CPU[-1]
    yb = yb.float()
    diff = float((y.float() - yb).abs().max() / yb.abs().max().clamp_min(1e-30))
    out = dict(name=name, T=T, torch=t_torch, baseline=t_base, diff=diff, torch_cpu=c_torch,
               baseline_cpu=c_base,
               algorithm=scancc.backends.get("torch").algorithm(k.ir, {}))
    if compile_:
        out.update(_compiled_row(name, x, repeat, y))
    if reference:
        ref = scancc.compile(name, "reference")
        xr = {a: v.double().numpy() for a, v in x.items()}
        out["reference"], _ = _best(lambda: ref(**xr), 1)
    return out


def peak_rss(T: int, chunk: int) -> float:
    """(RSS before the call, peak RSS during it, inputs, output), MiB: a fresh process runs
    mamba2 at length T on the torch backend; the peak (VmHWM) is reset just before the call
    (Linux /proc/self/clear_refs)."""
    code = f"""
import numpy as np, torch, scancc
torch.set_num_threads(1)
from scancc.testing import sample_inputs
e = scancc.get("mamba2")
sizes = dict(batch=1, heads=24, headdim=64, dstate=128, groups=1, time={T})
x = {{a: torch.from_numpy(v.astype(np.float32)) for a, v in sample_inputs(e.build(), sizes, 0, e.hints).items()}}
k = scancc.compile("mamba2", "torch", options={{"chunk": {chunk}}})
k(**{{a: v[:, :8] if v.dim() > 1 else v for a, v in x.items()}})  # render + load
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
base = hwm()
y = k(**x)
assert torch.isfinite(y).all()
print(base, hwm(), sum(v.numel() * 4 for v in x.values()) / 2**20, y.numel() * 4 / 2**20)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return [float(v) for v in res.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="issue 16's sizes (long)")
    ap.add_argument("--rows", default=",".join(SIZES), help="comma-separated recurrences")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--memory-T", default=None,
                    help="lengths for the mamba2 peak-RSS check (default 4096,16384; --full: "
                         "16384,65536)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--compile", default="",
                    help="comma-separated rows also run through torch.compile (inductor, "
                         "fullgraph) of the generated function: first call (compile) and "
                         "best-of-repeat time, in a second table")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    table = FULL if a.full else SMALL
    print(f"# {platform.processor() or platform.machine()}, {platform.system()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} intra-op thread(s), float32 inputs")
    print("| layer | T | scancc reference (s) | baseline | baseline (s) | torch backend (s) "
          "| algorithm | baseline / torch | reference / torch | max diff vs baseline "
          "| CPU s: baseline / torch (ratio) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in a.rows.split(","):
        for T in table[name]:
            r = row(name, T, a.repeat, not a.no_reference, name in a.compile.split(","))
            rows.append(r)
            ref = r.get("reference")
            ref_s = "-" if ref is None else f"{ref:.3f}"
            ref_x = "-" if ref is None else f"{ref / r['torch']:.1f}x"
            print(f"| {name} | {T} | {ref_s} | {BASELINE[name]} | {r['baseline']:.3f} | "
                  f"{r['torch']:.3f} | {r['algorithm']} | {r['baseline'] / r['torch']:.2f}x | "
                  f"{ref_x} | {r['diff']:.1e} | {r['baseline_cpu']:.3f} / {r['torch_cpu']:.3f}"
                  f" ({r['baseline_cpu'] / max(r['torch_cpu'], 1e-9):.2f}x) |", flush=True)
    if a.compile:
        print("\ntorch.compile (inductor, fullgraph) of the generated function, same inputs")
        print("| layer | T | eager torch backend (s) | first call: trace + compile (s) | "
              "compiled (s) | eager / compiled | max diff vs eager |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if "compiled" in r:
                print(f"| {r['name']} | {r['T']} | {r['torch']:.3f} | {r['compile_first']:.1f} |"
                      f" {r['compiled']:.3f} | {r['torch'] / r['compiled']:.2f}x | "
                      f"{r['compiled_diff']:.1e} |", flush=True)
    Ts = [int(t) for t in (a.memory_T or ("16384,65536" if a.full else "4096,16384")).split(",")]
    print("\nmamba2 (H24 P64 N128) on the torch backend, chunk 64: peak RSS of a fresh process")
    print("| T | RSS before the call (MiB) | peak RSS (MiB) | inputs (MiB) | output (MiB) | "
          "all T states would be (MiB) |")
    print("|---|---|---|---|---|---|")
    for T in Ts:
        base, peak, inp, out = peak_rss(T, 64)
        states = T * 24 * 64 * 128 * 4 / 2**20
        print(f"| {T} | {base:.0f} | {peak:.0f} | {inp:.0f} | {out:.0f} | {states:.0f} |",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
