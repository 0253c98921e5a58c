"""Offline sm_90 report of the Triton chunked backward's kernels (backends/triton/
chunked_backward.py) and its whole-pass bytes, no GPU needed.

1. **compile** (measured, by the compiler): each of the four kernels (``fwd_h``, ``bwd_dh``,
   ``bwd_dv``, ``bwd_dqk``) for ``GPUTarget("cuda", 90, 32)`` with the signature and constexprs the
   launcher passes at the shape (``chunked_backward.config``), through
   ``bench_sm90.compile_all`` (ptxas-blackwell -v: registers, spill bytes; TTGIR: tensor
   cores = warp_group_dot / nvidia_mma).
2. **bytes** of the whole training backward of one call (the chunk-boundary recompute + the
   backward), split into the torch glue (the factors the kernels cannot read from the inputs
   where they lie, the chain rule's ops the kernels do not do; counted on CPU with the
   kernels stubbed, ``glue_bytes``, plus autograd's float32 casts of a 16-bit call) and the
   kernels (modelled: every tile each program loads or stores), against the fused minimum:
   read the inputs and the output cotangents once, write the input gradients once (at the
   inputs' dtype, bf16 here).

    .venv/bin/python benchmarks/bench_chunked_backward.py            # all cases, B8 T2048
    .venv/bin/python benchmarks/bench_chunked_backward.py --no-compile
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# (recurrence, label, dims); B8 T2048 (shared/design PERFORMANCE.md "Realistic shapes")
CASES = [
    ("linear_attn", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("simple_gla", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("retnet", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("gla", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("mamba2", "H80 P64 N128 (2.7B)", {"heads": 80, "headdim": 64, "dstate": 128,
                                        "groups": 1}),
]
SHAPE = {"batch": 8, "time": 2048}
KERNELS = os.path.join(os.path.dirname(HERE), "backends", "triton",
                       "chunked_backward_kernels.py")


def sizes_of(rec, dims):
    from scancc.ir import default_sizes
    s = default_sizes(rec)
    s.update({d: v for d, v in {**SHAPE, **dims}.items() if d in s})
    return s


def _params(kernel: str) -> list[tuple[str, bool]]:
    """(name, is constexpr) of ``kernel``'s parameters, read from KERNELS' source (no import:
    the runtime would choose the interpreter for this process and its compile child)."""
    import ast
    tree = ast.parse(open(KERNELS).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == kernel)
    return [(a.arg, a.annotation is not None) for a in fn.args.args]


def capture(rec, sizes, options=None):
    """The launches (kernel name, positional args, keyword args) ``chunked_backward.backward``
    makes for ``rec`` on a 16-bit call (bfloat16 inputs and cotangents; the chunk-boundary
    states in bfloat16), the kernels
    stubbed, at ``sizes`` with batch 2 and two chunks of time (the strides and flags are
    those of the realistic shape; only which integers are 1 matters to the compile)."""
    import torch

    from scancc.backends.triton import chunked_backward as cb
    from scancc.testing import sample_inputs, sample_state
    small = dict(sizes, batch=2, time=2 * cb.config(1, 1, {}, False).BT)
    bf = torch.bfloat16         # a 16-bit call: autograd hands the inputs over as they are
    x = {k: torch.from_numpy(v).to(bf) for k, v in sample_inputs(rec, small, 0).items()}
    h0 = {k: torch.from_numpy(v).float() for k, v in sample_state(rec, small, 1).items()}
    dy = {o.name: torch.zeros(tuple(small[d] for d in o.dims), dtype=bf) for o in rec.outputs}
    names = ["fwd_h", "bwd_dh", "bwd_dv", "bwd_dqk", "bwd_dv_diag", "bwd_dqk_diag"]
    seen = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append((self.name, a, kw))
    orig, orig_hh = cb.kernels, cb.householder_kernels
    cb.kernels = lambda: tuple(Stub(n) for n in names)  # noqa: E731 - this process only
    cb.householder_kernels = lambda: (Stub("hh_fwd_h"), Stub("hh_bwd_dh"))  # noqa: E731
    try:
        cb.backward(rec, x, dy, small, h0, h0, {"_inputs_16bit": True, **(options or {})})
    finally:
        cb.kernels, cb.householder_kernels = orig, orig_hh
    return seen


def jobs_for(rec, sizes, options=None):
    """The compile jobs of the four launches at ``sizes`` (bench_sm90.compile_all's format):
    the signature from the arguments the launcher passes (``capture``), integers equal to 1
    as constexprs (as Triton specialises them: a contiguous feature dim, a group ratio of
    1), the block sizes of ``chunked_backward.config`` at ``sizes``."""
    import json

    import torch

    from scancc.backends.triton import chunked_backward as cb
    p = cb.plan(rec)
    F = p.form
    K, V = sizes[F.K], sizes[F.V]
    diag = F.kind.value == "diagonal"
    cfg = cb.config(K, V, {"_inputs_16bit": True, **(options or {})}, diag)
    dtypes = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    jobs = []
    for name, args, kw in capture(rec, sizes, options):
        params = _params(name)
        sig, const = {}, {}
        for (a, _), v in zip(params, args):
            if isinstance(v, torch.Tensor):
                sig[a] = dtypes[v.dtype]
            elif isinstance(v, float):
                sig[a] = "fp32"
            elif v == 1:
                sig[a], const[a] = "constexpr", 1
            else:
                sig[a] = "i32" if -2**31 <= v < 2**31 else "i64"
        for a, _ in params[len(args):]:
            if a in kw:                  # the flags and the block sizes the launcher chose
                sig[a], const[a] = "constexpr", kw[a]
        key = json.dumps([name, sig, const, kw["num_warps"], kw.get("num_stages")],
                         sort_keys=True, default=str)
        jobs.append({"key": key, "path": KERNELS, "kernel": name, "sig": sig, "const": const,
                     "num_warps": kw["num_warps"], "num_stages": kw.get("num_stages"), "label": name,
                     "blocks": f"{kw['BT']} {kw['BK']} {kw['BV']} {kw['num_warps']}"})
    return jobs, cfg


def glue_bytes(rec, sizes) -> tuple[int, dict]:
    """Bytes the torch glue of one ``chunked_backward.backward`` call moves at ``sizes``,
    counted (every aten op's inputs read and outputs written, ``_Count``) on CPU with the
    kernels stubbed, bfloat16 inputs and cotangents (as ``scancc.autograd`` hands a 16-bit
    call's over), at batch 1 and scaled by the batch (the glue is elementwise over batch, its
    reductions too); and the element size of each factor the kernels read (bwd_dqk's q, k,
    v, g, w, do: 2 where read from the bfloat16 inputs, 4 where materialised)."""
    import torch

    from scancc.backends.triton import chunked_backward as cb
    from scancc.testing import sample_inputs, sample_state
    one = dict(sizes, batch=1)
    bf = torch.bfloat16
    x = {k: torch.from_numpy(v).to(bf) for k, v in sample_inputs(rec, one, 0).items()}
    h0 = {k: torch.from_numpy(v).float() for k, v in sample_state(rec, one, 1).items()}
    dy = {o.name: torch.zeros(tuple(one[d] for d in o.dims), dtype=bf) for o in rec.outputs}
    seen = {}

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: seen.setdefault(self.name, a)
    names = ["fwd_h", "bwd_dh", "bwd_dv", "bwd_dqk", "bwd_dv_diag", "bwd_dqk_diag"]
    orig = cb.kernels
    cb.kernels = lambda: tuple(Stub(n) for n in names)  # noqa: E731 - this process only
    try:
        with _Count() as c:
            cb.backward(rec, x, dy, one, h0, h0, {"_inputs_16bit": True})
    finally:
        cb.kernels = orig
    name = "bwd_dqk" if "bwd_dqk" in seen else "bwd_dqk_diag"
    args = dict(zip([a for a, _ in _params(name)], seen[name]))
    return c.moved * sizes.get("batch", 1), \
        {f: args[f].element_size() for f in ("q", "k", "v", "g", "w", "do")}


def whole_pass_bytes(rec, sizes, in_bytes=2):
    """(fused minimum, glue, kernels) bytes of one backward call: the glue counted
    (``glue_bytes``) plus the float32 -> bfloat16 cast of the gradients ``scancc.autograd``
    makes; the kernels modelled (every tile each program loads or stores)."""
    from scancc.backends.triton import chunked_backward as cb
    p = cb.plan(rec)
    F = p.form
    T, K, V = sizes[rec.time], sizes[F.K], sizes[F.V]
    G = math.prod(sizes[d] for d in F.grid)
    numel = lambda dims: math.prod(sizes[d] for d in dims)  # noqa: E731
    ins = sum(numel(x.dims) for x in rec.inputs)
    outs = sum(numel(o.dims) for o in rec.outputs)
    states = sum(numel(s.dims) for s in rec.states)
    # fused minimum: inputs and output cotangents read, input gradients written (bf16); the
    # initial state / its gradient and the final-state cotangent in float32
    fused = in_bytes * (2 * ins + outs) + 4 * 3 * states
    f4 = 4
    diag = F.kind.value == "diagonal"
    ng = 0 if p.g is None else G * T * (K if diag else 1)
    nw = 0 if p.w is None else G * T
    counted, e = glue_bytes(rec, sizes)
    glue = counted + ins * (f4 + in_bytes)   # the float32 gradients cast to the inputs' dtype
    NC = -(-T // (16 if diag else 64))
    cfg = cb.config(K, V, {"_inputs_16bit": True}, diag)
    nk, nv, nvs = -(-K // cfg.BK), -(-V // cfg.BV), -(-V // cfg.BVS)
    # every tile each program loads or stores (chunked_backward_kernels.py), each factor at
    # its element size e[...]; the gradients written float32:
    # fwd_h / bwd_dh over (G, nk, nvs): k (q) read once per V-block, v (dO) once per K-block;
    # bwd_dv over (G, NC, nv): q, k once per V-block, dO (and v if O is recomputed or v is
    # w * x) once; bwd_dqk over (G, NC, nk): v, dO once per K-block, q, k, S, dh once
    tk, tv = G * T * K, G * T * V
    o = p.needs_o
    rv = o or p.w is not None
    kern = (e["k"] * nvs * tk + e["v"] * nk * tv) + (e["q"] * nvs * tk + e["do"] * nk * tv) \
        + ((e["q"] + e["k"]) * nv * tk + e["do"] * tv + (e["v"] * tv if rv else 0)) \
        + (f4 * tv if o else 0) \
        + ((e["v"] + e["do"]) * nk * tv + (e["q"] + e["k"]) * tk) + f4 * (tv + 2 * tk)
    hbytes = G * NC * K * V * in_bytes  # bfloat16 for 16-bit calls
    kern += hbytes * (2 + 1 + 2 + (1 if o else 0))  # hc, dhc written; hc, dhc x2 (+hc) read
    # g read (fwd_h, bwd_dh per K x V-block, bwd_dv per V-, bwd_dqk per K-block), dg written
    kern += ng * (e["g"] * ((2 * nk * nvs + nv + 2 * nk) if not diag else 2 * nvs + nv + 1)
                  + f4 * (nk if not diag else 1))
    # w read (fwd_h, bwd_dv, bwd_dqk), dw written
    kern += nw * (e["w"] * (nk * nvs + nv + nk * nv) + f4 * nv)
    return fused, glue, kern


class _Count:
    """Bytes every aten op reads and writes (its tensor inputs and outputs), views and
    allocations not counted: a TorchDispatchMode, ``moved`` after the ``with``."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        skip = {"empty", "empty_strided", "zeros", "full", "empty_like", "new_empty"}
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.__name__.split(".")[0] in skip:
                    return out
                leaves = torch.utils._pytree.tree_leaves
                ins = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                outs = [a for a in leaves(out) if isinstance(a, torch.Tensor)]
                ptrs = {a.untyped_storage().data_ptr() for a in ins}
                if outs and all(o.untyped_storage().data_ptr() in ptrs for o in outs):
                    return out  # a view
                outer.moved += sum(a.numel() * a.element_size() for a in ins + outs)
                return out
        self.moved = 0
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


MEASURE = [  # interpreter-sized shapes (bench_backward_bytes.py's table 1), float32
    ("linear_attn", {"batch": 1, "time": 512, "heads": 4, "key": 16, "value": 16}),
    ("simple_gla", {"batch": 1, "time": 512, "heads": 4, "key": 16, "value": 16}),
    ("gla", {"batch": 1, "time": 512, "heads": 4, "key": 16, "value": 16}),
    ("mamba2", {"batch": 1, "time": 512, "heads": 4, "headdim": 16, "dstate": 16,
                "groups": 1}),
    # bench_backward_bytes.py's table 2 shapes
    ("linear_attn", {"batch": 1, "time": 512, "heads": 4, "key": 64, "value": 64}),
    ("gla", {"batch": 1, "time": 512, "heads": 4, "key": 64, "value": 64}),
    ("mamba2", {"batch": 1, "time": 512, "heads": 8, "headdim": 64, "dstate": 64,
                "groups": 1}),
    # householder (chunked_backward_householder.py: torch glue + the two sequential passes)
    ("delta_net", {"batch": 1, "time": 512, "heads": 4, "key": 16, "value": 16}),
    ("gated_delta_net", {"batch": 1, "time": 512, "heads": 4, "key": 16, "value": 16}),
    ("gated_delta_net", {"batch": 1, "time": 512, "heads": 4, "key": 64, "value": 64}),
    # one (batch, head) of the realistic shape: everything is linear in B·H (--householder
    # scales it to B8 H16)
    ("gated_delta_net", {"batch": 1, "time": 2048, "heads": 1, "key": 128, "value": 128}),
]
# householder decays at the realistic attention shape (B8 T2048 H16 K=V=128): the compile
# table (hh_fwd_h, hh_bwd_dh) and the measured bytes of one head scaled by B·H
HH_CASES = [
    ("delta_net", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
    ("gated_delta_net", "H16 K=V=128", {"heads": 16, "key": 128, "value": 128}),
]


def measure_bytes(name: str, dims: dict) -> dict:
    """Measured bytes of one ``scancc.autograd.backward`` call on the chunked path: the
    kernels' every executed load/store (``runtime.count_traffic``, Triton's interpreter) and
    the torch glue's every aten op (inputs read + outputs written, views and allocations not
    counted, a TorchDispatchMode), float32 inputs; and the fused minimum (float32: inputs, dy,
    h0, dh_T read, input gradients and dh0 written)."""
    import numpy as np
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    import scancc
    from scancc import autograd as ag
    from scancc.backends.triton import chunked_backward as cb
    from scancc.backends.triton import runtime
    from scancc.testing import sample_inputs, sample_state
    e = scancc.get(name)
    rec = e.build(**({"D": True} if name == "mamba2" else {}))
    sizes = sizes_of(rec, dims)
    x = {k: torch.from_numpy(v).float() for k, v in sample_inputs(rec, sizes, 0, e.hints).items()}
    h0 = {k: torch.from_numpy(v).float() for k, v in sample_state(rec, sizes, 1).items()}
    rng = np.random.default_rng(2)
    dy = {o.name: torch.from_numpy(rng.standard_normal(tuple(sizes[d] for d in o.dims))).float()
          for o in rec.outputs}
    dh = {s.name: torch.randn(tuple(sizes[d] for d in s.dims)) for s in rec.states}
    real = cb.kernels()

    class Launch:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def call(*a, **kw):
                with _disable_current_modes():
                    return self.k[grid](*a, **kw)
            return call
    orig, orig_hh = cb.kernels, cb.householder_kernels
    real_hh = cb.householder_kernels()
    cb.kernels = lambda: tuple(Launch(k) for k in real)  # noqa: E731 - this process only
    cb.householder_kernels = lambda: tuple(Launch(k) for k in real_hh)  # noqa: E731
    try:
        with runtime.count_traffic() as tr, _Count() as count:
            ag.backward(rec, x, dy, h0, dh, target="triton")
    finally:
        cb.kernels, cb.householder_kernels = orig, orig_hh
    numel = lambda dims_: math.prod(sizes[d] for d in dims_)  # noqa: E731
    ins = sum(numel(i.dims) for i in rec.inputs)
    fused = 4 * (2 * ins + sum(numel(o.dims) for o in rec.outputs) +
                 3 * sum(numel(s.dims) for s in rec.states))
    return {"kernels": tr.loaded + tr.stored, "glue": count.moved, "fused": fused,
            "sizes": {d: sizes[d] for d in dims}}


def bf16_states_error(T: int = 200) -> list[str]:
    """Measured: the rel-RMS error (vs the float64 reference on the same bf16-rounded inputs)
    of the gradients with the chunk-boundary states kept in float32 and in bfloat16 (what a
    16-bit call gets), dot_precision='ieee' so the states' rounding is all that differs."""
    import numpy as np
    import torch

    import scancc
    from scancc import autograd as ag
    from scancc.backends.triton import chunked_backward as cb
    from scancc.testing import default_sizes, sample_inputs, within
    rows = []
    for name in ("simple_gla", "gla"):
        e = scancc.get(name)
        rec = e.build()
        sizes = default_sizes(rec, time=T, key=32, value=32, heads=2)
        x = sample_inputs(rec, sizes, 7, e.hints)
        dy = np.random.default_rng(1).standard_normal(tuple(sizes[d]
                                                            for d in rec.outputs[0].dims))
        bf = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in x.items()}
        want, _ = ag.backward(rec, {k: v.double().numpy() for k, v in bf.items()}, {"o": dy})
        for low in (False, True):
            got, _ = cb.backward(rec, {k: v.float() for k, v in bf.items()},
                                 {"o": torch.from_numpy(dy).float()}, sizes, None, None,
                                 {"_inputs_16bit": low, "dot_precision": "ieee",
                                  "block_sizes": {"time": 16}})
            rel = {k: within(got[k].double().numpy(), want[k], "bfloat16", T)[1] for k in want}
            errs = ", ".join(f"d{k} {r:.2e}" for k, r in rel.items())
            rows.append(f"{name} T={T} K=V=32, states in {'bfloat16' if low else 'float32'}: "
                        f"rel-RMS {errs}")
    return rows


def householder_report(args) -> int:
    """The sm_90 compile of the householder passes (measured) and the whole pass's bytes at
    B8 T2048 H16 K=V=128: one (batch, head) measured in the interpreter (kernels: every
    load/store; glue: every aten op), times B·H = 128 (every op is per grid index)."""
    import scancc
    rows = []
    for name, label, dims in HH_CASES:
        if args.names and name not in args.names:
            continue
        rec = scancc.get(name).build()
        sizes = sizes_of(rec, dims)
        jobs, cfg = jobs_for(rec, sizes, {"num_warps": args.num_warps}
                             if args.num_warps else {})
        rows.append((name, label, jobs))
    res = {}
    if not args.no_compile:
        import bench_sm90
        res = bench_sm90.compile_all([j for r in rows for j in r[2]])
    print("| recurrence | shape | kernel | BT BK BV warps | registers | spill st/ld B | "
          "tensor cores | smem B |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, jobs in rows:
        for j in jobs:
            c = res.get(j["key"], {})
            if "error" in c:
                print(f"| {name} | {label} | {j['kernel']} | error: {c['error'][:120]} |")
                continue
            print(f"| {name} | {label} | {j['kernel']} | {j['blocks']} "
                  f"| {c.get('regs', '-')} | {c.get('spill_st', '-')}/"
                  f"{c.get('spill_ld', '-')} | {c.get('tc', '-')} | {c.get('smem', '-')} |")
    print()
    print("| recurrence | shape (B8 T2048) | fused minimum GB | glue GB | kernels GB | "
          "whole pass GB | × minimum |")
    print("|---|---|---|---|---|---|---|")
    bh = SHAPE["batch"] * 16
    for name, label, dims in HH_CASES:
        if args.names and name not in args.names:
            continue
        m = measure_bytes(name, {"batch": 1, "time": SHAPE["time"], "heads": 1,
                                 "key": dims["key"], "value": dims["value"]})
        f, gl, k = (m[x] * bh / 1e9 for x in ("fused", "glue", "kernels"))
        print(f"| {name} | {label} | {f:.3f} | {gl:.3f} | {k:.3f} | {gl + k:.3f} | "
              f"{(gl + k) / f:.1f} |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true", help="bytes only")
    ap.add_argument("--measure", action="store_true", help="only the interpreter-measured bytes")
    ap.add_argument("--names", nargs="*", help="only these recurrences")
    ap.add_argument("--bf16-states", action="store_true",
                    help="only the gradient error of bfloat16 chunk-boundary states")
    ap.add_argument("--num-warps", type=int, help="the num_warps option")
    ap.add_argument("--householder", action="store_true",
                    help="only the householder decays: sm_90 compile of hh_fwd_h / hh_bwd_dh "
                         "and the bytes of one head at T2048 K=V=128 scaled to B8 H16")
    args = ap.parse_args(argv)
    if args.householder:
        return householder_report(args)
    if args.bf16_states:
        print("\n".join(bf16_states_error()))
        return 0
    if args.measure:
        print("| recurrence | shape | fused minimum MB | glue MB | kernels MB | whole pass MB | "
              "× minimum |")
        print("|---|---|---|---|---|---|---|")
        for name, dims in MEASURE:
            if args.names and name not in args.names:
                continue
            m = measure_bytes(name, dims)
            tot = m["glue"] + m["kernels"]
            print(f"| {name} | {m['sizes']} | {m['fused'] / 1e6:.2f} | {m['glue'] / 1e6:.2f} | "
                  f"{m['kernels'] / 1e6:.2f} | {tot / 1e6:.2f} | {tot / m['fused']:.1f} |")
        return 0
    import scancc
    rows = []
    for name, label, dims in CASES:
        if args.names and name not in args.names:
            continue
        e = scancc.get(name)
        rec = e.build(**({"D": True} if name == "mamba2" else {}))
        sizes = sizes_of(rec, dims)
        jobs, cfg = jobs_for(rec, sizes, {"num_warps": args.num_warps} if args.num_warps else {})
        rows.append((name, label, rec, sizes, jobs, cfg))
    res = {}
    if not args.no_compile:
        import bench_sm90
        res = bench_sm90.compile_all([j for r in rows for j in r[4]])
    print("| recurrence | shape | kernel | BT BK BV warps | registers | spill st/ld B | "
          "tensor cores | smem B |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, rec, sizes, jobs, cfg in rows:
        for j in jobs:
            c = res.get(j["key"], {})
            if "error" in c:
                print(f"| {name} | {label} | {j['kernel']} | error: {c['error'][:120]} |")
                continue
            print(f"| {name} | {label} | {j['kernel']} | {j['blocks']} "
                  f"| {c.get('regs', '-')} | {c.get('spill_st', '-')}/"
                  f"{c.get('spill_ld', '-')} | {c.get('tc', '-')} | {c.get('smem', '-')} |")
    print()
    print("| recurrence | shape (B8 T2048) | fused minimum GB | glue GB | kernels GB | "
          "whole pass GB | × minimum |")
    print("|---|---|---|---|---|---|---|")
    for name, label, rec, sizes, jobs, cfg in rows:
        fused, glue, kern = whole_pass_bytes(rec, sizes)
        print(f"| {name} | {label} | {fused / 1e9:.3f} | {glue / 1e9:.3f} | {kern / 1e9:.3f} | "
              f"{(glue + kern) / 1e9:.3f} | {(glue + kern) / fused:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
