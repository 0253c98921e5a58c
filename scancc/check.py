"""``scancc check``: run every available backend against the reference on random inputs."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from scancc import backends
from scancc.ir import default_sizes

from .api import _resolve, compile
from .registry import Entry
from .sampling import sample_inputs, sample_state
from .testing import TOLERANCES, errors, tolerance  # noqa: F401 (cli reads TOLERANCES)


@dataclass
class Row:
    recurrence: str
    target: str
    dtype: str
    case: str
    rel_rms: float = float("nan")
    max_abs: float = float("nan")
    ok: bool = False
    note: str = ""
    seconds: float = 0.0
    skipped: bool = False   # the backend takes no inputs of this dtype: not run, not failed


def _cast(x: np.ndarray, dtype: str, torch_out: bool):
    """x rounded to dtype: a torch tensor if torch_out (or bfloat16), else a NumPy array."""
    if torch_out or dtype == "bfloat16":
        import torch
        return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))
    return x.astype(dtype)


def _f64(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.detach().cpu().double().numpy()


def _as_dict(x, names):
    return x if isinstance(x, dict) else {names[0]: x}


def _judge(row: Row, worst: list[tuple[float, float]], T: int | None = None,
           dtype: str | None = None) -> None:
    """The row's errors (the worst over its arrays) against its dtype's tolerance at ``T``
    steps (``testing.tolerance``; the memory is taken as T: not estimated from the decays,
    so a long-memory run is never judged tighter than its T allows)."""
    row.rel_rms = max(r for r, _ in worst)
    row.max_abs = max(m for _, m in worst)
    tol = tolerance(dtype or row.dtype, T)
    row.ok = row.rel_rms <= tol.rel_rms and row.max_abs <= tol.max_abs
    if not row.ok:
        row.note = f"over tolerance (rel-RMS {tol.rel_rms:.2g}, max-abs {tol.max_abs:.2g}" + \
            ("" if T is None else f" at T={T}") + ")"


def _failure(e: Exception, options: dict) -> str:
    """A row's note for an exception; a builder's own error (``float('abc')``) that names no
    option is said with the recurrence options given (``--option scale=abc``)."""
    from scancc.ir import IRError
    note = f"{type(e).__name__}: {e}"
    given = {k: v for k, v in options.items() if k != "options"}
    if isinstance(e, (ValueError, TypeError)) and not isinstance(e, IRError) and given \
            and not any(k in str(e) for k in given):
        note += " (options: " + ", ".join(f"{k}={v!r}" for k, v in given.items()) + ")"
    return note


def _sizes(rec, T: int | None, dim_sizes: dict[str, int] | None) -> dict[str, int]:
    """default_sizes, with T for the time dim and ``dim_sizes`` (``--size DIM=N``) for any
    dim of ``rec`` (others are skipped: one --size serves several recurrences); a fixed dim
    given another size is an error."""
    given = dict(dim_sizes or {})
    if T:
        given.setdefault(rec.time, T)
    names = [d.name for d in rec.dims]
    given = {k: v for k, v in given.items() if k in names}  # the CLI names unknown dims
    for k, v in given.items():
        fixed = rec.dim(k).size
        if fixed is not None and fixed != v:
            raise ValueError(f"--size {k}={v}: dim {k!r} of {rec.name!r} is fixed at {fixed}")
    sizes = default_sizes(rec, **given)
    return sizes


def check_backward(what: Any, target: str, T: int | None = None, seed: int = 0,
                   dim_sizes: dict[str, int] | None = None, **options) -> Row:
    """Gradients (every input and the initial states, from random output and final-state
    cotangents) through ``target``'s forward, recompute and backward kernels against the
    float64 reference's, with T crossing chunk boundaries. The backward kernels compute in
    float32 whatever the input dtype (scancc.autograd), so this is a float32 check."""
    from . import autograd
    entry, fixed, spec_opts = _resolve(what)
    opts = {**spec_opts, **{o: True for o in (entry.optional_inputs if entry else ())}, **options}
    row = Row(entry.name if entry else fixed.name, target, "float32", "")
    t0 = time.perf_counter()
    try:
        ref = compile(what, "reference", **opts)
        rec = ref.ir
        sizes = _sizes(rec, T, dim_sizes)
        chunk = max(1, min(autograd.DEFAULT_CHUNK, sizes[rec.time] // 3))
        row.case = " ".join(f"{d}={sizes[d]}" for d in (x.name for x in rec.dims)) + \
            f" (chunk {chunk})"
        be = backends.get(target)
        ok, why = be.available()
        if not ok:
            row.note = f"unavailable: {why}"
            return row
        ker = compile(what, target, **opts)
        on = autograd.backward_target(ker, rec)
        if on != target:
            row.note = f"the backward runs on {on}: {target} does not lower it"
            return row
        rng = np.random.default_rng(seed + 2)
        x = {k: v.astype(np.float32).astype(np.float64)
             for k, v in sample_inputs(rec, sizes, seed, entry.hints if entry else {}).items()}
        h0 = {k: v.astype(np.float32).astype(np.float64)
              for k, v in sample_state(rec, sizes, seed + 1).items()}
        dy = {o.name: rng.standard_normal(tuple(sizes[d] for d in o.dims)) for o in rec.outputs}
        dh = {s.name: rng.standard_normal(tuple(sizes[d] for d in s.dims)) for s in rec.states}
        want = autograd.backward(rec, x, dy, h0, dh, chunk, "reference")
        got = autograd.backward(rec, x, dy, h0, dh, chunk, target)
        _judge(row, [errors(got[i][k], want[i][k]) for i in (0, 1) for k in want[i]],
               sizes[rec.time])
    except Exception as e:  # a row per failure, not a crash of the whole run
        row.note = _failure(e, options)
    finally:
        row.seconds = time.perf_counter() - t0
    return row


def check_one(what: Any, target: str, dtype: str, T: int | None = None, seed: int = 0,
              dim_sizes: dict[str, int] | None = None, **options) -> Row:
    """Compare ``target`` with the float64 reference on one random case (with an initial
    state, and the final state compared too). For target "reference" the case checks that
    running T steps equals running T//2 steps, then the rest from the returned final state."""
    entry, fixed, spec_opts = _resolve(what)
    opts = {**spec_opts, **{o: True for o in (entry.optional_inputs if entry else ())}, **options}
    name = entry.name if entry else fixed.name
    t0 = time.perf_counter()
    row = Row(name, target, dtype, "")
    try:
        ref = compile(what, "reference", **opts)
        rec = ref.ir
        sizes = _sizes(rec, T, dim_sizes)
        row.case = " ".join(f"{d}={sizes[d]}" for d in (x.name for x in rec.dims))
        hints = entry.hints if entry else {}
        be = backends.get(target)
        ok, why = be.available()
        if not ok:
            row.note = f"unavailable: {why}"
            return row
        if dtype not in be.dtypes:
            row.skipped = True
            row.note = f"{target} takes no {dtype} inputs (it takes {', '.join(be.dtypes)})"
            return row
        torch_in = be.array == "torch"
        x = {k: _cast(v, dtype, torch_in) for k, v in sample_inputs(rec, sizes, seed, hints).items()}
        h0 = {k: v.astype(np.float32) for k, v in sample_state(rec, sizes, seed + 1).items()}
        x64 = {k: _f64(v) for k, v in x.items()}
        snames = [s.name for s in rec.states]
        onames = [o.name for o in rec.outputs]
        want_y, want_h = ref(**x64, initial_state={k: v.astype(np.float64) for k, v in h0.items()},
                             output_final_state=True)
        if target == "reference":
            half = max(1, sizes[rec.time] // 2)
            tpos = {i.name: (i.dims.index(rec.time) if rec.time in i.dims else None)
                    for i in rec.inputs}
            part = lambda sl: {k: (v if tpos[k] is None else np.take(v, sl, axis=tpos[k]))  # noqa
                               for k, v in x64.items()}
            y1, h1 = ref(**part(range(half)), initial_state=h0, output_final_state=True)
            y2, h2 = ref(**part(range(half, sizes[rec.time])),
                         initial_state=_as_dict(h1, snames), output_final_state=True)
            y1, y2 = _as_dict(y1, onames), _as_dict(y2, onames)
            got_y = {o.name: np.concatenate([y1[o.name], y2[o.name]],
                                            axis=o.dims.index(rec.time)) for o in rec.outputs}
            got_h = h2
            row.case += " (T split in two, state carried)"
        else:
            k = compile(what, target, **opts)
            init = {n: _cast(v, "float32", torch_in) for n, v in h0.items()}
            got_y, got_h = k(**x, initial_state=init, output_final_state=True)
        got_h, want_h = _as_dict(got_h, snames), _as_dict(want_h, snames)
        got_y, want_y = _as_dict(got_y, onames), _as_dict(want_y, onames)
        # a backend that takes float64 arrays but computes in float32 (NKI: the hardware has
        # no float64) is judged at float32's tolerance, and the row says so
        judged = "float32" if dtype == "float64" and not (be.computes_float64
                                                          or be.float64_inputs) else dtype
        _judge(row, [errors(_f64(got_y[n]), want_y[n]) for n in onames]
               + [errors(_f64(got_h[n]), want_h[n]) for n in snames], sizes[rec.time], judged)
        if judged != dtype:
            row.note = (row.note + "; " if row.note else "") + \
                f"{target} computes {dtype} inputs in {judged}: judged at {judged}'s tolerance"
    except Exception as e:  # a row per failure, not a crash of the whole run
        row.note = _failure(e, options)
    finally:
        row.seconds = time.perf_counter() - t0
    return row


# structural variants a recurrence's check covers besides its defaults: a bool option (False by
# default) that changes the IR's shape (fla's grouped value heads: v with HV = G * H heads, q
# and k with H; kda, gated_delta_net). Each variant is one more set of rows, labelled
# "name (option=True)", unless the call sets the option itself.
VARIANT_OPTIONS = ("grouped_value_heads",)


def variants(item: Any, options: dict | None = None) -> list[dict]:
    """The option sets ``item`` is checked at: ``{}`` (its defaults, with ``options``) first,
    then one per ``VARIANT_OPTIONS`` entry the recurrence declares with default False and
    ``options`` does not set."""
    try:
        entry = item if isinstance(item, Entry) else _resolve(item)[0]
    except Exception:  # a bad name or spec: its row says why (check_one)
        return [{}]
    extra = [{o: True} for o in VARIANT_OPTIONS
             if entry is not None and entry.defaults.get(o, None) is False
             and o not in (options or {})]
    return [{}] + extra


def _label(item: Any, variant: dict) -> str:
    name = item.name if isinstance(item, Entry) else str(item)
    return name + (" (" + ", ".join(f"{k}={v!r}" for k, v in variant.items()) + ")"
                   if variant else "")


def run_check(items: Iterable[Any], targets: list[str], dtypes: list[str], T: int | None = None,
              seed: int = 0, progress: Callable[[str], None] | None = None,
              options: dict | None = None, backward: bool = False,
              dim_sizes: dict[str, int] | None = None, with_variants: bool = True) -> list[Row]:
    """Rows of every (item, variant, target, dtype); ``with_variants``: also each item's
    ``variants`` (the row's recurrence column names the variant's options)."""
    items = [(it, v) for it in items
             for v in (variants(it, options) if with_variants else [{}])]
    if backward:  # gradients of each target against the reference's; float32 kernels
        jobs = [(it, v, tg) for it, v in items for tg in targets if tg != "reference"]
        rows = []
        for i, (it, v, tg) in enumerate(jobs, 1):
            if progress:
                progress(f"[{i}/{len(jobs)}] {_label(it, v)} {tg} backward")
            row = check_backward(it, tg, T, seed, dim_sizes, **{**(options or {}), **v})
            row.recurrence = _label(it, v) if v else row.recurrence
            rows.append(row)
        return rows
    jobs = [(it, v, tg, dt) for it, v in items for tg in targets for dt in dtypes
            if not (tg == "reference" and dt != dtypes[0])]
    rows = []
    for i, (it, v, tg, dt) in enumerate(jobs, 1):
        if progress:
            progress(f"[{i}/{len(jobs)}] {_label(it, v)} {tg} {dt}")
        row = check_one(it, tg, "float64" if tg == "reference" else dt, T, seed,
                        dim_sizes, **{**(options or {}), **v})
        row.recurrence = _label(it, v) if v else row.recurrence
        rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("recurrence", "target", "dtype", "rel-RMS", "max-abs", "status", "time")
    body = [(r.recurrence, r.target, r.dtype, f"{r.rel_rms:.2e}", f"{r.max_abs:.2e}",
             ("ok" + (f" ({r.note})" if r.note else "")) if r.ok else
             f"skipped: {r.note}" if r.skipped else
             "FAIL" + (f": {r.note}" if r.note else ""), f"{r.seconds:.1f}s")
            for r in rows]
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head) - 2)]
    fmt = lambda x: "  ".join(c.ljust(w[i]) for i, c in enumerate(x[:-2])) + \
        f"  {x[-1]:>7}  {x[-2]}"  # noqa: E731
    return "\n".join([fmt(head)] + [fmt(b) for b in body])


def main_check(items, targets, dtypes, T, seed, out=None, err=None,
               options=None, backward: bool = False, dim_sizes=None,
               with_variants: bool = True) -> int:
    out, err = out or sys.stdout, err or sys.stderr  # the streams of the call, not of import
    rows = run_check(items, targets, dtypes, T, seed,
                     progress=lambda s: print(s, file=err, flush=True), options=options,
                     backward=backward, dim_sizes=dim_sizes, with_variants=with_variants)
    print(format_table(rows), file=out)
    bad = [r for r in rows if not (r.ok or r.skipped)]
    skipped = sum(r.skipped for r in rows)
    print(f"{len(rows) - len(bad) - skipped} passed, {len(bad)} failed"
          + (f", {skipped} skipped (dtypes a backend does not take)" if skipped else ""), file=out)
    return 1 if bad else 0
