"""Measured float32 error of long recurrences against ``scancc.testing.tolerance(dtype, T,
memory)``: not a test; prints a Markdown table (docs/performance/tolerance.md records one).

    python benchmarks/bench_tolerance.py [--T 64,1024,4096,16384] [names ...]

Each case runs float32 inputs through the Triton kernels (recurrent, and chunked where it
applies; without a GPU in Triton's CPU interpreter) and through a plain NumPy float32 loop
(h = a * h + b, one step at a time, the float32 rounding of the model in docs/numerics.md),
and compares both with the float64 reference on the same (float32) inputs. Columns: the
memory L = min(T, 1 / (1 - max |a|)), the measured rel-RMS and max-abs (the worst over the
outputs and the final state), the bound ``tolerance("float32", T, memory)`` and the ratio
measured / bound, and the base table's float32 row (2e-5, 1e-4) for comparison.

Cases: hgrn with a constant decay 0.9999 (the issue's case: g = log(0.9999) in float32, so
every step multiplies by the same rounded decay), simple_gla with that decay, retnet
(gamma = 1 - 2^-5, 1 - 2^-6: memory <= 64), linear_attn (identity: the memory is T) and
mamba on its sampled inputs (decays exp(dt A), memory from their largest value). The
attention family runs at T <= 8192 (``CAP``: interpreter time).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

ATTN = {"batch": 1, "heads": 2, "key": 8, "value": 8}
SIZES = {"hgrn": {"batch": 1, "chan": 8}, "simple_gla": ATTN, "retnet": ATTN,
         "linear_attn": ATTN, "mamba": {"batch": 1, "chan": 4, "dstate": 4}}
DECAY = 0.9999  # the constant decay (hgrn, simple_gla)
# the attention family's recurrent kernel takes ~10 ms a step in the CPU interpreter: its
# longest T is capped here (a larger --T runs at the cap)
CAP = {"simple_gla": 8192, "retnet": 8192, "linear_attn": 8192}


def inputs(name: str, rec, sizes, entry) -> dict[str, np.ndarray]:
    """float32-representable float64 inputs (sampled; a constant decay where the case has one)."""
    from scancc import testing
    x = testing.sample_inputs(rec, sizes, 0, entry.hints)
    if name in ("hgrn", "simple_gla"):
        x["g"] = np.full_like(x["g"], np.log(DECAY))
    return {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}


def decays(name: str, x: dict, sizes) -> np.ndarray:
    """The transition values a_t (float64), for the memory 1 / (1 - max |a|)."""
    if name in ("hgrn", "simple_gla"):
        return np.exp(x["g"])
    if name == "retnet":
        return 1.0 - 2.0 ** (-5.0 - np.arange(sizes["heads"]))
    if name == "linear_attn":
        return np.ones(1)
    if name == "mamba":  # exp(delta[b, d, t] * A[d, n])
        return np.exp(x["delta"][:, :, None, :] * x["A"][None, :, :, None])
    raise KeyError(name)


def numpy_float32(name: str, x: dict, h0: dict, sizes) -> tuple[dict, dict] | None:
    """The recurrence as a float32 NumPy loop (hgrn and the [K, V] attention family)."""
    f = {k: v.astype(np.float32) for k, v in x.items()}
    if name == "hgrn":
        h = h0["h"].astype(np.float32)
        a = np.exp(f["g"])
        o = np.empty_like(f["x"])
        for t in range(f["x"].shape[1]):
            h = a[:, t] * h + f["x"][:, t]
            o[:, t] = h
        return {"o": o}, {"h": h}
    if name in ("simple_gla", "retnet", "linear_attn"):
        q, k, v = f["q"], f["k"], f["v"]
        B, T, H, K = q.shape
        if name == "simple_gla":
            a = np.exp(f["g"])
        elif name == "retnet":
            gam = (1.0 - np.exp((-5.0 - np.arange(H, dtype=np.float32)) * np.float32(np.log(2.0))))
            a = np.broadcast_to(gam.astype(np.float32), (B, T, H))
        else:
            a = np.ones((B, T, H), np.float32)
        scale = np.float32(1.0 / np.sqrt(K))
        S = h0["S"].astype(np.float32)
        o = np.empty(v.shape, np.float32)
        for t in range(T):
            S = a[:, t, :, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            o[:, t] = np.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale
        return {"o": o}, {"S": S}
    return None


def worst(got: tuple[dict, dict], want: tuple[dict, dict]) -> tuple[float, float]:
    from scancc.testing import errors
    errs = [errors(got[i][k], want[i][k]) for i in (0, 1) for k in want[i]]
    return max(e[0] for e in errs), max(e[1] for e in errs)


def run_case(name: str, T: int, rows: list[str]) -> None:
    import torch

    from scancc import backends, registry, testing
    entry = registry.get(name)
    rec = entry.build()
    sizes = testing.default_sizes(rec, time=T, **SIZES[name])
    x = inputs(name, rec, sizes, entry)
    h0 = {k: v.astype(np.float32).astype(np.float64)
          for k, v in testing.sample_state(rec, sizes, 1).items()}
    ref = backends.get("reference").run(rec, x, sizes, h0, True, {})
    want = (ref.outputs, ref.final_states)
    memory = testing.memory_length(decays(name, x, sizes))
    L = min(T, memory)
    tol = testing.tolerance("float32", T, memory)
    tb = backends.get("triton")
    runs = []
    for algo in ("recurrent", "chunked"):
        if not tb.supports(rec, {"algorithm": algo})[0]:
            continue
        t0 = time.perf_counter()
        res = tb.run(rec, {k: torch.from_numpy(v).float() for k, v in x.items()}, sizes,
                     {k: torch.from_numpy(v).float() for k, v in h0.items()}, True,
                     {"algorithm": algo})
        got = ({k: v.double().numpy() for k, v in res.outputs.items()},
               {k: v.double().numpy() for k, v in res.final_states.items()})
        runs.append((f"triton {algo}", got, time.perf_counter() - t0))
    t0 = time.perf_counter()
    loop = numpy_float32(name, x, h0, sizes)
    if loop is not None:
        runs.append(("numpy float32 loop", loop, time.perf_counter() - t0))
    for label, got, secs in runs:
        rel, mx = worst(got, want)
        same = ""
        if loop is not None and label != "numpy float32 loop":
            same = "yes" if all(np.array_equal(got[0][k], loop[0][k]) for k in loop[0]) else "no"
        rows.append(f"| {name} | {label} | {T} | {L:.0f} | {rel:.2e} | {mx:.2e} | "
                    f"{tol.rel_rms:.2e} | {tol.max_abs:.2e} | {rel / tol.rel_rms:.2f} | "
                    f"{mx / tol.max_abs:.2f} | {same} | {secs:.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", default="64,1024,4096,16384", help="comma-separated T values")
    p.add_argument("names", nargs="*", default=list(SIZES))
    a = p.parse_args(argv)
    rows = ["| case | run | T | L | rel-RMS | max-abs | bound rel-RMS | bound max-abs | "
            "rel / bound | max / bound | = NumPy loop | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in a.names:
        Ts = [min(int(t), CAP.get(name, int(t))) for t in a.T.split(",")]
        for T in dict.fromkeys(Ts):
            run_case(name, T, rows)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
