"""Peak memory of the derived backward pass vs sequence length (not a test).

The backward keeps the states at chunk boundaries (T/C of them) and one chunk of recomputed
states, so beyond the gradients themselves (O(T) by definition: one per input element) its working
memory grows only by the boundary states. Measured with tracemalloc on the reference backend.

    .venv/bin/python benchmarks/bench_backward_memory.py [--name simple_gla] [--chunk 64]
"""
import argparse
import time
import tracemalloc

import numpy as np
import scancc
from scancc.autograd import backward
from scancc.testing import default_sizes, sample_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="simple_gla")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--T", default="1024,4096,16384,65536")
    a = ap.parse_args()
    e = scancc.get(a.name)
    rec = e.build()
    print(f"{a.name}, chunk {a.chunk}, reference backend, float64")
    print("| T | gradients (MiB) | peak during backward (MiB) | peak - gradients (MiB) | "
          "all T states would be (MiB) | seconds |")
    print("|---|---|---|---|---|---|")
    for T in (int(t) for t in a.T.split(",")):
        sizes = default_sizes(rec, time=T, batch=1)
        x = sample_inputs(rec, sizes, 0, e.hints)
        o = rec.outputs[0]
        dy = {o.name: np.random.default_rng(1).standard_normal(tuple(sizes[d] for d in o.dims))}
        io = sum(v.nbytes for v in x.values())  # the gradients: allocated during backward
        state = sum(np.prod([sizes[d] for d in s.dims]) for s in rec.states) * 8
        tracemalloc.start()
        t0 = time.perf_counter()
        grads, _ = backward(rec, x, dy, chunk=a.chunk)
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        mib = 1 / 2**20
        print(f"| {T} | {io * mib:.2f} | {peak * mib:.2f} | {(peak - io) * mib:.2f} | "
              f"{state * T * mib:.1f} | {dt:.1f} |")


if __name__ == "__main__":
    main()
