"""Host overhead of a decode step (``Kernel.step``) on the Triton backend, launches stubbed.

    python benchmarks/bench_decode.py [--calls N] [--batch B] [names ...]

Not a test: prints a Markdown table of *measured* times (docs/serving.md records one) and
exits non-zero when a ``step`` row is over the target (0.1 ms).

The launches are stubbed as in benchmarks/bench_host_overhead.py (every ``@triton.jit``
kernel of a generated module replaced, as the module loads, by a stub whose
``kernel[grid](...)`` does nothing): what is timed is everything the host does for a step
except the kernel itself. Rows, per library recurrence (default sizes of
``scancc.testing``, batch ``--batch``), torch CPU tensors, float32:

- ``step``: ``kernel.step(*inputs_t, state=state)``: the step plan lookup, the time dim
  added to each input (views), the step launcher (contiguous checks, the NaN-filled
  outputs, the grid), the time dim dropped from the outputs;
- ``step + state_indices``: the same on rows of a pool of 4B states (adds the gather and
  the scatter of the picked rows: two torch calls per state);
- ``T=1 scan``: what decoding cost before, ``kernel(*inputs[:, t:t+1], initial_state=state,
  output_final_state=True)`` (the ``scancc::scan`` op, the full launcher, a new final state
  per step), for comparison.

Median of ``--calls`` calls after warm-up; "host CPU ms" is the CPU time of this process
(``time.process_time``), the pass/fail measure; "wall ms" is printed next to it. Without a
GPU the step launcher is wrapped in ``np.errstate`` (padded lanes of the interpreter),
which a GPU run does not pay.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_host_overhead import _median_ms, stub_launches  # noqa: E402

TARGET_MS = 0.1


def measure(name: str, batch: int, calls: int) -> list[tuple[str, tuple[float, float]]]:
    import numpy as np
    import torch

    import scancc
    from scancc import registry
    from scancc.testing import default_sizes, sample_inputs, sample_state

    entry = registry.get(name)
    k = scancc.compile(name, target="triton")
    rec = k.ir
    sizes = default_sizes(rec, time=1, batch=batch)
    x = {n: torch.from_numpy(v.astype(np.float32))
         for n, v in sample_inputs(rec, sizes, hints=entry.hints).items()}
    xt = {n: v.select(rec.input(n).dims.index(rec.time), 0).contiguous()
          if rec.time in rec.input(n).dims else v for n, v in x.items()}
    h0 = {s: torch.from_numpy(v.astype(np.float32)) for s, v in sample_state(rec, sizes).items()}
    state = h0 if len(h0) > 1 else next(iter(h0.values()))
    pool = {s: torch.zeros((4 * batch,) + tuple(v.shape[1:])) for s, v in h0.items()}
    pool = pool if len(pool) > 1 else next(iter(pool.values()))
    idx = torch.arange(batch) * 3
    rows = [("step", _median_ms(lambda: k.step(**xt, state=state), calls)),
            ("step + state_indices",
             _median_ms(lambda: k.step(**xt, state=pool, state_indices=idx), calls)),
            ("T=1 scan", _median_ms(lambda: k(**x, initial_state=h0, output_final_state=True),
                                    calls))]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--calls", type=int, default=500, help="timed calls per row")
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from scancc.backends.triton import runtime
    runtime.prepare()
    stub_launches()
    from scancc import library  # noqa: F401  (registers the library)
    from scancc import registry
    names = a.names or [n for n in registry.names() if registry.get(n).origin == "library"]
    print(f"host time per decode step, launches stubbed (measured: CPU time of this process, "
          f"median of {a.calls}; batch {a.batch}; target {TARGET_MS} ms for `step` rows)\n")
    print("| recurrence | call | host CPU ms | wall ms | target ms | pass |")
    print("|---|---|---:|---:|---:|---|")
    worst = 0.0
    for name in names:
        for what, (ms, wall) in measure(name, a.batch, a.calls):
            judged = what.startswith("step")
            if judged:
                worst = max(worst, ms)
            verdict = ("pass" if ms <= TARGET_MS else "FAIL") if judged else "-"
            print(f"| {name} | {what} | {ms:.3f} | {wall:.3f} | "
                  f"{TARGET_MS if judged else '-'} | {verdict} |", flush=True)
    print(f"\nworst step: {worst:.3f} ms")
    return 0 if worst <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
