"""Every registered recurrence on every backend and algorithm, against the reference.

The cases come from the registry, not from a list in this file: ``cases()`` enumerates
``scancc.names()`` (the standard library and anything registered), the recurrences the
modules in ``examples/`` register, and every spec in ``specs/``; crossed with
``scancc.backends.names()`` (a backend that does not run here is a skipped case that says
why) and each algorithm the backend's ``algorithm`` option names and ``supports`` accepts for
the recurrence. Registering a recurrence is enough for it to be tested here on every backend
(``test_a_newly_registered_recurrence_is_a_case_on_every_backend``).

Each case runs at small default sizes (T crosses Triton's 32-step chunk, with a ragged last
chunk), with an initial state and the final state compared too, optional inputs given, in
float32 against the float64 reference on the same rounded inputs, with the one tolerance table
(``scancc.testing.TOLERANCES``). Backends NaN-poison their outputs, so an element a kernel never
writes fails; outputs must be finite wherever the reference is. For the reference backend
itself the case is its state continuation: T steps equal T//2 steps, then the rest from the
returned final state. ``pytest -m slow`` adds float16 and bfloat16 at a longer T.
"""
from __future__ import annotations

import importlib.util
import pathlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest

import scancc
from scancc import backends, registry
from scancc.api import _resolve
from scancc.ir import const, scalar
from scancc.registry import Entry
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
T_DEFAULT = 37   # > Triton's 32-step chunk: one full chunk and a ragged one
T_SLOW = 150


@dataclass(frozen=True)
class Case:
    """One recurrence (an ``Entry`` with the options to build it) on one backend/algorithm."""
    label: str                    # the library name, "examples/<file>:<name>" or "specs/<file>"
    entry: Entry = field(repr=False)
    options: tuple = ()           # recurrence options (spec options, optional inputs given)
    backend: str = "reference"
    algorithm: str | None = None  # None: the backend has no algorithm option
    skip: str = ""                # why this case cannot run here (the backend is unavailable)
    unsupported: str = ""         # why the backend lowers none of its algorithms (a failure)

    @property
    def id(self) -> str:
        return "-".join(x for x in (self.label, self.backend, self.algorithm) if x)


def _example_entries(path: pathlib.Path) -> list[tuple[str, Entry]]:
    """The entries a module in examples/ registers; the registry is left as it was."""
    before = {n: registry.get(n) for n in registry.names()}
    spec = importlib.util.spec_from_file_location(f"_scancc_example_{path.stem}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    out = []
    for n in registry.names():
        e = registry.get(n)
        if before.get(n) is not e:
            out.append((n, e))
            if n in before:
                registry.add(before[n], override=True)
            else:
                registry.unregister(n)
    return out


def recurrences() -> list[tuple[str, Entry, dict[str, Any]]]:
    """(label, entry, recurrence options) for every registered recurrence, every recurrence
    an example registers and every spec; optional inputs given (so their code runs)."""
    items = [(n, registry.get(n), {}) for n in registry.names()]
    for p in sorted((ROOT / "examples").glob("*.py")):
        items += [(f"examples/{p.name}:{n}", e, {}) for n, e in _example_entries(p)]
    for p in sorted((ROOT / "specs").glob("*.y*ml")):
        entry, _, opts = _resolve(str(p))
        items.append((f"specs/{p.name}", entry, dict(opts)))
    return [(label, e, {**opts, **{o: True for o in e.optional_inputs}})
            for label, e, opts in items]


def cases(backend_names: list[str] | None = None) -> list[Case]:
    """Every recurrence x backend x algorithm the backend accepts for it."""
    out = []
    for label, entry, opts in recurrences():
        rec = entry.build(**opts)
        for b in backend_names or backends.names():
            be = backends.get(b)
            base = Case(label, entry, tuple(sorted(opts.items())), b)
            ok, why = be.available()
            if not ok:
                out.append(replace(base, skip=f"{b} does not run here: {why}"))
                continue
            algos = be.algorithms()
            if not algos:
                ok, why = be.supports(rec, {})
                out.append(base if ok else replace(base, unsupported=why))
                continue
            found = [a for a in algos if be.supports(rec, {"algorithm": a})[0]]
            out += [replace(base, algorithm=a) for a in found]
            if not found:
                why = be.supports(rec, {})[1]
                out.append(replace(base, unsupported=why))
    return out


def _params(cs: list[Case], *marks) -> list:
    return [pytest.param(c, id=c.id, marks=[*marks] + (
        [pytest.mark.skip(reason=c.skip)] if c.skip else [])) for c in cs]


def _cast(x: np.ndarray, dtype: str):
    """x rounded to dtype: NumPy, or torch for bfloat16 (NumPy has none)."""
    if dtype == "bfloat16":
        import torch
        return torch.from_numpy(x).to(torch.bfloat16)
    return x.astype(dtype)


def _f64(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.detach().cpu().double().numpy()


def _by_name(x, names: list[str]) -> dict:
    return x if isinstance(x, dict) else {names[0]: x}


def run_case(case: Case, dtype: str = "float32", T: int = T_DEFAULT, seed: int = 0) -> None:
    """Run ``case`` and compare it with the float64 reference on the same rounded inputs."""
    assert not case.unsupported, f"{case.backend} lowers no algorithm of {case.label}: " \
                                 f"{case.unsupported}"
    opts = dict(case.options)
    ref = scancc.compile(case.entry, "reference", **opts)
    rec = ref.ir
    sizes = default_sizes(rec, time=T)
    outs, states = [o.name for o in rec.outputs], [s.name for s in rec.states]
    x = {k: _cast(v, dtype) for k, v in sample_inputs(rec, sizes, seed, case.entry.hints).items()}
    h0 = {k: v.astype(np.float32) for k, v in sample_state(rec, sizes, seed + 1).items()}
    seen = {k: _f64(v) for k, v in x.items()}  # the reference sees what the kernel sees
    want_y, want_h = ref(**seen, initial_state={k: v.astype(np.float64) for k, v in h0.items()},
                         output_final_state=True)
    want_y, want_h = _by_name(want_y, outs), _by_name(want_h, states)
    if case.backend == "reference":  # the definition: check its state continuation
        dtype, half = "float64", T // 2
        tpos = {i.name: i.dims.index(rec.time) if rec.time in i.dims else None
                for i in rec.inputs}

        def part(sl):
            return {k: v if tpos[k] is None else np.take(v, sl, axis=tpos[k])
                    for k, v in seen.items()}
        y1, h1 = ref(**part(range(half)), initial_state=h0, output_final_state=True)
        y2, got_h = ref(**part(range(half, T)), initial_state=_by_name(h1, states),
                        output_final_state=True)
        y1, y2 = _by_name(y1, outs), _by_name(y2, outs)
        got_y = {o.name: np.concatenate([y1[o.name], y2[o.name]], axis=o.dims.index(rec.time))
                 for o in rec.outputs}
    else:
        k = scancc.compile(case.entry, case.backend, **opts,
                           options={"algorithm": case.algorithm} if case.algorithm else None)
        got_y, got_h = k(**x, initial_state=h0, output_final_state=True)
        # torch calls go through the scancc::scan op, which may report on a twin kernel
        last = getattr(k, "last_run", None)
        ran = last.counters.get("algorithm") if last is not None else None
        assert ran in (None, case.algorithm), f"{case.id}: ran {ran}"
    got_y, got_h = _by_name(got_y, outs), _by_name(got_h, states)
    for what, got, want in [("output", got_y, want_y), ("final state", got_h, want_h)]:
        for n, w in want.items():
            g = _f64(got[n])
            assert g.shape == w.shape, f"{case.id} {what} {n}: shape {g.shape}, want {w.shape}"
            finite = np.isfinite(w)
            assert np.isfinite(g[finite]).all(), f"{case.id} {what} {n}: non-finite where the " \
                                                 "reference is finite (an unwritten element?)"
            assert_close(g, w, dtype, f"{case.id} {what} {n} (T={T})")


CASES = cases()


@pytest.mark.parametrize("case", _params(CASES))
def test_backend_matches_reference(case):
    run_case(case)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", _params([c for c in CASES if c.backend != "reference"],
                                         pytest.mark.slow))
def test_backend_matches_reference_every_dtype(case, dtype):
    if dtype not in backends.get(case.backend).dtypes:
        pytest.skip(f"{case.backend} takes no {dtype}")
    run_case(case, dtype, T=T_SLOW)


def test_cases_cover_the_registry_examples_and_specs():
    labels = {c.label for c in CASES}
    assert set(scancc.names()) <= labels
    assert {f"specs/{p.name}" for p in (ROOT / "specs").glob("*.yaml")} <= labels
    assert "examples/gated_iir.py:gated_iir" in labels
    for label in labels:  # every recurrence on every backend
        assert {c.backend for c in CASES if c.label == label} == set(backends.names()), label
    before = {n: registry.get(n) for n in scancc.names()}
    recurrences()  # loading the examples leaves the registry as it was
    assert {n: registry.get(n) for n in scancc.names()} == before


def _leaky(r, lam=0.25):
    """Leaky integrator: h_t = (1 - lam) h_{t-1} + lam x_t; y_t = h_t."""
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, d])
    h = r.state("h", [b, d], scalar(const(1.0 - lam)), inject=x * lam)
    r.output("y", [b, t, d], h)


def test_a_newly_registered_recurrence_is_a_case_on_every_backend():
    """Registering is all it takes: cases() yields the new recurrence on every backend, with
    each algorithm the backend accepts for it (Triton: recurrent and chunked, NKI: recurrent;
    its chunked form needs a contraction readout), and every such case runs and passes. The reference
    is checked against the closed form y_t = (1-l)^(t+1) h0 + l sum_s<=t (1-l)^(t-s) x_s."""
    scancc.register("backends_test_leaky")(_leaky)
    try:
        mine = [c for c in cases() if c.label == "backends_test_leaky"]
        assert {c.backend for c in mine} == set(backends.names())
        for b in backends.names():
            be = backends.get(b)
            got = sorted(c.algorithm or "" for c in mine if c.backend == b)
            if not be.available()[0]:
                assert [c.skip for c in mine if c.backend == b][0]
                continue
            rec = scancc.get("backends_test_leaky").build()
            want = [a for a in be.algorithms() if be.supports(rec, {"algorithm": a})[0]]
            assert got and got == sorted(want or [""]), (b, got)
        for c in mine:
            if not c.skip:
                run_case(c)

        lam, T = 0.25, 9
        rng = np.random.default_rng(0)
        x, h0 = rng.standard_normal((2, T, 3)), rng.standard_normal((2, 3))
        y = scancc.compile("backends_test_leaky")(x, initial_state=h0)
        t = np.arange(T)
        decay = np.tril((1 - lam) ** (t[:, None] - t[None, :]))       # [t, s]
        want = (1 - lam) ** (t + 1)[None, :, None] * h0[:, None, :] + \
            lam * np.einsum("ts,bsd->btd", decay, x)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    finally:
        scancc.unregister("backends_test_leaky")


def test_a_wrong_backend_fails_its_case(monkeypatch):
    """The suite can fail: a backend off by 1e-3 in one output element is caught."""
    from scancc.backends.base import RunResult
    be = backends.get("nki")
    real = be.run

    def off(rec, inputs, sizes, init, final, options):
        res = real(rec, inputs, sizes, init, final, options)
        y = {k: np.array(v, copy=True) for k, v in res.outputs.items()}
        first = next(iter(y))
        y[first].flat[7] += 1e-3 * (1 + abs(y[first].flat[7]))
        return RunResult(y, res.final_states, res.counters)
    monkeypatch.setattr(be, "run", off)
    case = next(c for c in CASES if c.label == "hgrn" and c.backend == "nki")
    with pytest.raises(AssertionError, match="hgrn-nki-.* output o"):
        run_case(case)

