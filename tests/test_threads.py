"""Kernels called from several threads give the single-threaded results: interpreted Triton
launches and NKI emulator runs take turns under a process-wide lock (docs/security.md)."""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import scancc
from scancc import registry, testing

THREADS, CALLS = 4, 3
SIZES = {"batch": 2, "time": 9, "chan": 5}


def _inputs(seed):
    rec = registry.get("hgrn").build()
    return testing.sample_inputs(rec, SIZES, seed, hints=registry.get("hgrn").hints)


def _check(call, convert):
    xs = [_inputs(s) for s in range(THREADS * CALLS)]
    want = [np.asarray(call(**convert(x))) for x in xs]  # single-threaded

    def worker(i):
        return [np.asarray(call(**convert(xs[j]))) for j in range(i, len(xs), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(worker, range(THREADS)))
    for i, outs in enumerate(got):
        for j, out in zip(range(i, len(xs), THREADS), outs):
            np.testing.assert_array_equal(out, want[j])


def test_triton_kernel_from_several_threads():
    torch = pytest.importorskip("torch")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    k = scancc.compile("hgrn", target="triton")

    def convert(x):
        return {n: torch.from_numpy(v).float() for n, v in x.items()}

    def call(**kw):
        out = k(**kw)
        out = out[0] if isinstance(out, tuple) else out
        return out.detach().cpu()
    _check(call, convert)


def test_nki_kernel_from_several_threads():
    k = scancc.compile("hgrn", target="nki")

    def convert(x):
        return {n: v.astype(np.float32) for n, v in x.items()}

    def call(**kw):
        out = k(**kw)
        return out[0] if isinstance(out, tuple) else out
    _check(call, convert)
