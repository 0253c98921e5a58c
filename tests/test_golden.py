"""Generated source as a product: one golden file per (backend, library recurrence, algorithm),
named the same way for every backend that generates source:

    tests/golden/<backend>/<recurrence>_<algorithm>.py

The cases come from the registry and each backend's ``supports``: a new library recurrence or
a new algorithm gets a golden file without editing this test. After an intended codegen
change, regenerate and review the diff:

    SCANCC_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from scancc import backends, registry

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("SCANCC_REGEN_GOLDEN") == "1"
ALGORITHMS = ("recurrent", "chunked", "staged", "scan", "window")


def _library() -> list[str]:
    return [n for n in registry.names() if registry.get(n).origin == "library"]


def cases() -> list[tuple[str, str, str]]:
    """(backend, recurrence, algorithm) for every source-generating backend, every library
    recurrence and every algorithm the backend accepts for it."""
    out = []
    for b in backends.names():
        be = backends.get(b)
        if not be.generates_source:
            continue
        for name in _library():
            rec = registry.get(name).build()
            for algo in ALGORITHMS:
                if be.supports(rec, {"algorithm": algo})[0]:
                    out.append((b, name, algo))
    return out


CASES = cases()


def _path(backend: str, name: str, algo: str) -> Path:
    return GOLDEN / backend / f"{name}_{algo}.py"


@pytest.mark.parametrize("backend,name,algo", CASES, ids=["-".join(c) for c in CASES])
def test_golden_source(backend, name, algo):
    rec = registry.get(name).build()
    src = backends.get(backend).render(rec, {"algorithm": algo})
    path = _path(backend, name, algo)
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    assert path.exists(), f"no golden file {path}: run with SCANCC_REGEN_GOLDEN=1"
    assert src == path.read_text(), (
        f"generated {backend} source for {name} ({algo}) differs from {path}; if intended, "
        "regenerate with SCANCC_REGEN_GOLDEN=1 and review the diff")


def test_every_source_backend_has_goldens_for_both_algorithms():
    """The naming is uniform: each source-generating backend has recurrent goldens for every
    library recurrence, and chunked ones where the chunked-form analysis applies."""
    by_backend: dict[str, set] = {}
    for b, name, algo in CASES:
        by_backend.setdefault(b, set()).add((name, algo))
    assert set(by_backend) == {"triton", "nki", "torch"}
    for b, got in by_backend.items():
        assert {(n, "recurrent") for n in _library()} <= got, b
        assert any(a == "chunked" for _, a in got), b


def test_no_stale_golden_files():
    """A golden file no case renders is stale (a renamed recurrence or algorithm)."""
    want = {_path(*c) for c in CASES}
    have = {p for b in ("triton", "nki", "torch") for p in (GOLDEN / b).glob("*.py")}
    stale = sorted(str(p.relative_to(GOLDEN)) for p in have - want)
    if REGEN:
        for p in stale:
            (GOLDEN / p).unlink()
        return
    assert not stale, f"stale golden files (no case renders them): {stale}"
