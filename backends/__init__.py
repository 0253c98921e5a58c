"""scancc.backends: one package per backend, each with the same shape (see base.Backend).

Discovery: ``get(name)`` returns a backend instance; ``report()`` says for each whether it
is available here and why (toolchains are imported lazily, never at import time).
"""
if __name__ != "scancc.backends":
    raise ImportError(f"import this package as scancc.backends, not {__name__!r}")

import importlib

from .base import Backend, RunResult, UnsupportedError

# name -> module path and class name; the order is the order `scancc backends` lists them
_BACKENDS = {
    "reference": ("scancc.backends.reference", "ReferenceBackend"),
    "nki": ("scancc.backends.nki", "NkiBackend"),
    "triton": ("scancc.backends.triton", "TritonBackend"),
    "torch": ("scancc.backends.torch", "TorchBackend"),
}
_instances: dict = {}


def names() -> list[str]:
    return list(_BACKENDS)


def get(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(_BACKENDS)})")
    if name not in _instances:
        mod, cls = _BACKENDS[name]
        _instances[name] = getattr(importlib.import_module(mod), cls)()
    return _instances[name]


def report() -> list[tuple[str, bool, str]]:
    """(name, available, how it runs or why not) for every backend."""
    out = []
    for n in _BACKENDS:
        try:
            ok, why = get(n).available()
        except Exception as e:  # a broken toolchain is a report line, not a crash
            ok, why = False, f"{type(e).__name__}: {e}"
        out.append((n, ok, why))
    return out


__all__ = ["Backend", "RunResult", "UnsupportedError", "get", "names", "report"]
