"""Bytes moved by the derived backward pass vs the minimum, per backend (not a test: prints a
Markdown table; docs/performance/training.md records one).

    .venv/bin/python benchmarks/bench_backward_bytes.py [--only hgrn,mamba] [--T 512]
        [--chunk 64] [--targets triton,nki] [--shapes small|realistic] [--full]

For every registered recurrence whose adjoint derives (others print "not derived: <reason>"),
the backward pass of ``scancc.autograd.backward`` is two kernels per chunk of ``chunk`` steps,
last chunk first: the recompute kernel (``adj.states_view``: the chunk's states from its
boundary state) and the backward kernel (``adj.backward``: the adjoint recurrence over the
reversed chunk), each called with an initial state and asked for its final state, float32
(what autograd feeds Triton and NKI). Both are measured; the forward is not.

By default each kernel is run once at time = chunk (and once more for a shorter last chunk)
and its bytes are multiplied by the number of chunks: every chunk call has the same shapes,
and neither counter depends on the data. ``--full`` instead runs ``scancc.autograd.backward``
over all T with every recompute/backward call measured (it gives the same numbers; slow on
the NKI emulator for the delta-rule and Mamba backward kernels).

Bytes: Triton, every load/store the interpreter executes (``runtime.count_traffic``, as in
bench_triton.py; masked-off lanes excluded) plus every atomic-add element (``ungroup``
outputs are accumulated with tl.atomic_add; shown in their own column too); NKI, the
emulator's DMA counters (as in bench_nki.py). Per kernel, the minimum is each input of that
call read once and each output written once (initial and final states included), summed
over the calls.

Two whole-pass references:
- fused minimum: one kernel for the whole backward pass: the forward inputs, dy and the
  T/chunk boundary states read once, the input gradients and dL/dh0 written once;
- naive: the forward stores all T states (T x |state| x 4 bytes written there) and the same
  backward kernel reads them; no recompute.

Shapes: ``small`` (default; about 5 minutes on 2 CPU cores) keeps the feature dims small
enough for the emulators (the NKI backward kernels of the attention family, the delta rule
and Mamba run ~10^4-10^5 instructions per step at key = value = 64, minutes per call);
``realistic`` is bench_triton.py's SHAPES (use with --targets triton: hours on the NKI
emulator, and mamba2's NKI backward does not fit SBUF there).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import numpy as np

from bench_triton import SHAPES

ITEM = 4  # float32 on both backends
ROLES = ("recompute", "backward")

_ATTN_SMALL = {"batch": 1, "heads": 4, "key": 16, "value": 16}
SMALL = {
    "linear_attn": _ATTN_SMALL, "retnet": _ATTN_SMALL, "simple_gla": _ATTN_SMALL,
    "gla": _ATTN_SMALL, "delta_net": _ATTN_SMALL, "gated_delta_net": _ATTN_SMALL,
    "swa": _ATTN_SMALL,
    "hgrn": {"batch": 1, "chan": 1024},
    "mamba": {"batch": 1, "chan": 64, "groups": 1, "dstate": 16},
    "mamba2": {"batch": 1, "heads": 4, "headdim": 16, "groups": 1, "dstate": 16},
    "s4d": {"batch": 1, "heads": 64, "dstate": 16},
    "fir": {"batch": 1, "chan": 1024, "width": 4},
    "iir": {"batch": 1, "chan": 256, "order": 3},
}


class Tally:
    def __init__(self):
        self.bytes = dict.fromkeys(ROLES, 0)
        self.minimum = dict.fromkeys(ROLES, 0)
        self.calls = dict.fromkeys(ROLES, 0)
        self.forms = {r: set() for r in ROLES}
        self.atomic = 0

    def add(self, role, got, minimum, times=1):
        moved, form = got["moved"], got["form"]
        self.atomic += got.get("atomic", 0) * times
        self.bytes[role] += moved * times
        self.minimum[role] += minimum * times
        self.calls[role] += times
        self.forms[role].add(form)


def _nelem(d) -> int:
    return sum(int(np.prod(tuple(v.shape))) for v in (d or {}).values())


@contextlib.contextmanager
def counting(kernel, target: str):
    """Bytes moved by the one call of ``kernel`` made inside the block, and its form."""
    got = {}
    if target == "triton":
        from scancc.backends.triton import runtime
        with runtime.count_traffic() as tr:
            yield got
        got["moved"] = tr.loaded + tr.stored + tr.atomic
        got["atomic"] = tr.atomic
        got["form"] = kernel.last_run.counters.get("algorithm", "?")
    else:
        yield got
        c = kernel.last_run.counters
        got["moved"] = c["dma_bytes_in"] + c["dma_bytes_out"]
        plan = kernel.backend.last_plan
        got["form"] = f"{plan.pd}/{plan.tt}"


def _as_dict(v, items):
    return v if isinstance(v, dict) else {items[0].name: v}


def per_chunk(adj, target, sizes, hints, T, chunk, tally):
    """One call of each kernel per distinct chunk length, scaled by its number of chunks."""
    import scancc
    from scancc.testing import sample_inputs
    n_full, rest = divmod(T, chunk)
    for length, times in ((chunk, n_full), (rest, 1)):
        if not times or not length:
            continue
        sz = {**sizes, adj.forward.time: length}
        for role, r in zip(ROLES, (adj.states_view, adj.backward)):
            x = {k: v.astype(np.float32) for k, v in sample_inputs(r, sz, 0, hints).items()}
            init = {s.name: np.zeros(tuple(sz[d] for d in s.dims), np.float32)
                    for s in r.states}
            k = scancc.compile(r, target)
            with counting(k, target) as got:
                out, fin = k(**x, initial_state=init, output_final_state=True)
            out, fin = _as_dict(out, r.outputs), _as_dict(fin, r.states)
            minimum = ITEM * (_nelem(x) + _nelem(init) + _nelem(out) + _nelem(fin))
            tally.add(role, got, minimum, times)


@contextlib.contextmanager
def instrument(adj, target: str, tally: Tally):
    """--full: measure every recompute/backward call scancc.autograd.backward makes (wraps
    its private ``_run``, which runs one kernel call)."""
    from scancc import autograd
    orig = autograd._run
    role = {adj.states_view: "recompute", adj.backward: "backward"}

    def run(rec, inputs, init, tgt="reference"):
        if rec not in role:  # the forward: not part of the backward pass
            return orig(rec, inputs, init, tgt)
        with counting(autograd._kernel(rec, tgt), target) as got:
            outs, fins = orig(rec, inputs, init, tgt)
        minimum = ITEM * (_nelem(inputs) + _nelem(init) + _nelem(outs) + _nelem(fins))
        tally.add(role[rec], got, minimum)
        return outs, fins

    autograd._run = run
    try:
        yield
    finally:
        autograd._run = orig


def measure(name: str, target: str, T: int, chunk: int, shapes: dict, full: bool):
    from scancc import registry
    from scancc.autograd import adjoint, backward
    from scancc.testing import default_sizes, sample_inputs
    entry = registry.get(name)
    rec = entry.build()
    adj = adjoint(rec)
    sizes = default_sizes(rec, **{**shapes.get(name, {}), "time": T})
    tally = Tally()
    t0 = time.time()
    if full:
        x = sample_inputs(rec, sizes, 0, entry.hints)
        rng = np.random.default_rng(1)
        dy = {o.name: rng.standard_normal(tuple(sizes[d] for d in o.dims))
              for o in rec.outputs}
        with instrument(adj, target, tally):
            backward(rec, x, dy, chunk=chunk, target=target)
    else:
        per_chunk(adj, target, sizes, entry.hints, T, chunk, tally)
    wall = time.time() - t0
    state = sum(int(np.prod([sizes[d] for d in s.dims])) for s in rec.states)
    inputs = sum(int(np.prod([sizes[d] for d in x.dims])) for x in rec.inputs)
    dys = sum(int(np.prod([sizes[d] for d in o.dims])) for o in rec.outputs)
    n_chunks = -(-T // chunk)
    fused = ITEM * (2 * inputs + dys + n_chunks * state + state)
    naive = tally.bytes["backward"] + ITEM * T * state
    shape = ", ".join(f"{k}={v}" for k, v in sizes.items() if k != "groups")
    return tally, fused, naive, shape, wall


def reason(e: Exception) -> str:
    return str(getattr(e, "feature", None) or e).replace("|", "/").replace("\n", " ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated recurrence names")
    ap.add_argument("--T", type=int, default=512, help="sequence length (default 512)")
    ap.add_argument("--chunk", type=int, default=None,
                    help="backward chunk (default: scancc.autograd.DEFAULT_CHUNK)")
    ap.add_argument("--targets", default="triton,nki")
    ap.add_argument("--shapes", default="small", choices=["small", "realistic"])
    ap.add_argument("--full", action="store_true",
                    help="run scancc.autograd.backward over all T, measuring every call")
    args = ap.parse_args(argv)
    import scancc
    from scancc import autograd, registry
    from scancc.backends import UnsupportedError, get
    from scancc.ir import IRError
    chunk = args.chunk or autograd.DEFAULT_CHUNK
    shapes = SMALL if args.shapes == "small" else SHAPES
    names = [n for n in args.only.split(",") if n] or registry.names()
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        print(f"# {t}: {get(t).available()[1]}", file=sys.stderr)
    mb = 1e-6
    print(f"T = {args.T}, chunk = {chunk}, float32, {args.shapes} shapes; MB = 10^6 bytes; "
          "(minimum, ratio = bytes / minimum)\n")
    print("| recurrence | backend | shape | recompute MB (min, ratio) | backward MB (min, ratio) "
          "| recompute + backward MB (min, ratio) | fused minimum MB | sum / fused | "
          "naive: all T states stored MB | naive / fused | kernel forms (recompute; backward) | "
          "of which atomic adds MB |")
    print("|---|---|---|---|---|---|---:|---:|---:|---:|---|---:|")
    blank = " |" * 9  # the empty cells after the reason
    for name in names:
        try:
            adj = autograd.adjoint(registry.get(name).build())
        except IRError as e:
            print(f"| {name} | — | — | not derived: {reason(e)}{blank}", flush=True)
            continue
        for target in targets:
            why = None
            for r in (adj.forward, adj.states_view, adj.backward):
                try:
                    scancc.compile(r, target)
                except UnsupportedError as e:
                    why = f"{r.name}: {reason(e)}"
                    break
            if why:
                print(f"| {name} | {target} | — | unsupported: {why}{blank}", flush=True)
                continue
            try:
                tally, fused, naive, shape, wall = measure(name, target, args.T, chunk, shapes,
                                                           args.full)
            except UnsupportedError as e:  # e.g. NKI: no tile plan fits SBUF at these sizes
                print(f"| {name} | {target} | — | unsupported at these sizes: {reason(e)}"
                      f"{blank}", flush=True)
                continue
            b, m = tally.bytes, tally.minimum
            cell = {k: f"{b[k] * mb:.2f} ({m[k] * mb:.2f}, {b[k] / m[k]:.2f})" for k in ROLES}
            tot, tmin = sum(b.values()), sum(m.values())
            atomic = f"{tally.atomic * mb:.2f}" if target == "triton" else "—"
            forms = "; ".join(", ".join(sorted(tally.forms[k])) for k in ROLES)
            print(f"| {name} | {target} | {shape} | {cell['recompute']} | {cell['backward']} | "
                  f"{tot * mb:.2f} ({tmin * mb:.2f}, {tot / tmin:.2f}) | {fused * mb:.2f} | "
                  f"{tot / fused:.2f} | {naive * mb:.2f} | {naive / fused:.2f} | {forms} | "
                  f"{atomic} |", flush=True)
            print(f"# {name} {target}: {tally.calls} kernel calls, {wall:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
