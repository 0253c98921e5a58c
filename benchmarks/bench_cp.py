"""Context parallelism on CPU (gloo): per-rank time vs one process at the same total T, and
the bytes each rank sends in the one all-gather, per recurrence (transition kind).

    python benchmarks/bench_cp.py [--time T] [--reps N] [--target reference] [names ...]

Not a test: prints two Markdown tables of *measured* numbers (docs/distributed.md records
them). For P in (2, 4) the script forks P ranks (gloo, 127.0.0.1, a free port); each holds
T/P steps of the same inputs and runs ``kernel(*shard, cp_group=WORLD,
output_final_state=True)`` ``--reps`` times after one warm-up call, between barriers; the
row's time is the median over reps of the slowest rank. "1 process" is
``kernel(*inputs, output_final_state=True)`` on all T steps in this process. Forward only,
no gradients. torch runs one intra-op thread per process. On a machine with fewer cores than
ranks (this one has 2, shared with other sessions) the ranks time-share: the per-rank time
then includes waiting for a core, which the table says next to the numbers.

Bytes per rank: the flat tensor each rank contributes to the all-gather (summaries of its
transition products + its local final states, in float32 for float32 inputs); each rank
receives P times that. Summary shapes come from the IR (scancc.distributed).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time


def _inputs(name, T, target):
    import numpy as np
    import torch

    import scancc
    from scancc import registry
    from scancc.testing import default_sizes, sample_inputs
    k = scancc.compile(name, target)
    rec = k.ir
    sizes = default_sizes(rec, time=T)
    x = {n: torch.from_numpy(v.astype(np.float32))
         for n, v in sample_inputs(rec, sizes, hints=registry.get(name).hints).items()}
    return k, rec, x


def _shard(rec, x, rank, world):
    out = {}
    for n, v in x.items():
        dims = rec.input(n).dims
        out[n] = v.chunk(world, dims.index(rec.time))[rank].contiguous() \
            if rec.time in dims else v
    return out


def _rank(rank, world, port, names, T, reps, target, outdir):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    try:
        for name in names:
            k, rec, x = _inputs(name, T, target)
            local = _shard(rec, x, rank, world)
            with torch.no_grad():
                k(**local, output_final_state=True, cp_group=dist.group.WORLD)  # warm-up
                times = []
                for _ in range(reps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    k(**local, output_final_state=True, cp_group=dist.group.WORLD)
                    times.append(time.perf_counter() - t0)
            res[name] = times
        torch.save(res, os.path.join(outdir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bytes_per_rank(name, T, target):
    """(kinds, summary shapes, summary bytes, final-state bytes) of one rank's all-gather."""
    from scancc.distributed import _Plan
    k, rec, x = _inputs(name, T, target)
    run = k._plan_call((), dict(x), None).runner
    sizes = run.sizes(tuple(v.shape for v in x.values()))
    plan = _Plan(k, rec, sizes)
    item = 4
    s_bytes = plan.summary_numel() * item
    f_bytes = sum(_prod(v) for v in plan.state_shapes.values()) * item
    kinds = ", ".join(f"{s.name}: {s.transition.kind.value}" for s in rec.states)
    shapes = ", ".join(f"{n}{list(v)}" for n, v in plan.summary_shapes.items()) or "none"
    return kinds, shapes, s_bytes, f_bytes


def _prod(shape):
    n = 1
    for v in shape:
        n *= v
    return n


def _median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def split(names, T, reps, target):
    """One process, rank 1's work of 2 ranks (T/2 steps): (a) the carrying summary scan
    (states + summaries, no readout), (b) the rerun from an entering state (the kernel with
    its readouts), and, for the linear-readout case a rerun-free scheme would use instead of
    (b), (c) the closed-form carried term where it is one contraction (hand-written torch,
    not generated: identity ``q_t . E``; scalar/diagonal decays ``(q_t * prod_{s<=t}
    a_s) . E``): a modelled lower bound of the correction. Measured, forward only."""
    import torch

    from scancc.distributed import _Plan, identity_state
    rows = []
    for name in names:
        k, rec, x = _inputs(name, T, target)
        local = _shard(rec, x, 1, 2)
        run = k._plan_call((), dict(local), None).runner
        sizes = run.sizes(tuple(v.shape for v in local.values()))
        cp = _Plan(k, rec, sizes)
        ident = identity_state(torch, cp.summ, cp.ssizes, torch.float32, "cpu",
                               only=set(cp.sname.values()))
        enter = {s.name: torch.randn(cp.state_shapes[s.name]) for s in rec.states}
        with torch.no_grad():
            a = _median_ms(lambda: cp.skernel(**{n: local[n] for n in cp.s_inputs},
                                              initial_state=ident or None,
                                              output_final_state=True), reps)
            b = _median_ms(lambda: k(**local, initial_state=enter), reps)
            c = None
            if name in ("linear_attn", "gla", "simple_gla", "retnet"):
                q = local["q"]
                E = enter[rec.states[0].name]
                if name == "linear_attn":
                    f = lambda: torch.einsum("bthk,bhkv->bthv", q, E)  # noqa: E731
                else:
                    g = local.get("g", local.get("gk"))
                    if g is None:  # retnet: a per-head constant decay
                        g = torch.full(q.shape[:3] + (1,), -0.1)
                    if g.dim() == 3:
                        g = g[..., None]
                    f = lambda: torch.einsum(  # noqa: E731
                        "bthk,bhkv->bthv", q * torch.exp(torch.cumsum(g, 1)), E)
                c = _median_ms(f, reps)
        rows.append((name, a, b, c))
    print(f"rank 1 of 2 (T/2 = {T // 2} steps), {target} backend, float32, median of {reps} "
          "(measured)\n")
    print("| recurrence | (a) carrying summary scan ms | (b) rerun ms | (c) closed-form "
          "carried term ms | (b)/((a)+(b)) |")
    print("|---|---:|---:|---:|---:|")
    for name, a, b, c in rows:
        cs = "—" if c is None else f"{c:.2f}"
        print(f"| {name} | {a:.1f} | {b:.1f} | {cs} | {b / (a + b):.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--time", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target", default="reference")
    ap.add_argument("--split", action="store_true",
                    help="one process: the per-rank pieces (summary scan, rerun, carried term)")
    a = ap.parse_args(argv)
    if a.split:
        from scancc import library  # noqa: F401
        from scancc import registry
        names = a.names or [n for n in registry.names() if registry.get(n).origin == "library"]
        import torch
        torch.set_num_threads(1)
        split(names, a.time, a.reps, a.target)
        return 0
    import torch
    import torch.multiprocessing as mp
    torch.set_num_threads(1)
    from scancc import library  # noqa: F401
    from scancc import registry
    names = a.names or [n for n in registry.names() if registry.get(n).origin == "library"]
    single = {}
    with torch.no_grad():
        for name in names:
            k, rec, x = _inputs(name, a.time, a.target)
            k(**x, output_final_state=True)
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                k(**x, output_final_state=True)
                ts.append(time.perf_counter() - t0)
            single[name] = statistics.median(ts)
    per = {}
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(_rank, args=(world, _free_port(), names, a.time, a.reps,
                                            a.target, d), nprocs=world, join=True,
                               start_method="fork")
            ranks = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(world)]
        per[world] = {n: statistics.median(max(rk[n][i] for rk in ranks)
                                           for i in range(a.reps)) for n in names}
    print(f"per-rank time of a context-parallel forward (measured, {a.target} backend, "
          f"T={a.time} in total, float32, median of {a.reps}; {os.cpu_count()} CPU cores)\n")
    print("| recurrence | 1 process ms | 2 ranks: per-rank ms | ratio | 4 ranks: per-rank ms "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in names:
        s, p2, p4 = single[n] * 1e3, per[2][n] * 1e3, per[4][n] * 1e3
        print(f"| {n} | {s:.1f} | {p2:.1f} | {p2 / s:.2f} | {p4:.1f} | {p4 / s:.2f} |")
    print("\nbytes each rank sends in the one all-gather (float32; each rank receives P times "
          "this)\n")
    print("| recurrence | states: kind | summary shape | summary B | final state B | total B |")
    print("|---|---|---|---:|---:|---:|")
    for n in names:
        kinds, shapes, sb, fb = bytes_per_rank(n, a.time, a.target)
        print(f"| {n} | {kinds} | {shapes} | {sb} | {fb} | {sb + fb} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
