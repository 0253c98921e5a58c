"""The registry of recurrences: the standard library and user registrations, by name.

The standard library (``scancc.library``) registers itself here when ``scancc`` is imported;
this module never imports it (the library depends on the registry, not the reverse).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from scancc.ir import Builder, IRError, Recurrence, check_ident

from .sampling import SAMPLERS


class RegistryError(IRError):
    pass


@dataclass
class Entry:
    """A named recurrence family: ``build(**options)`` returns its verified IR.

    ``optional_inputs`` are inputs a caller may leave out; the builder receives a bool option
    of the same name saying whether the input is present (a kernel specializes on it).
    """
    name: str
    builder: Callable[..., Recurrence]
    defaults: dict[str, Any] = field(default_factory=dict)
    optional_inputs: tuple[str, ...] = ()
    doc: str = ""
    origin: str = "python"
    hints: dict[str, str] = field(default_factory=dict)  # input -> sampling.SAMPLERS name

    def build(self, **options: Any) -> Recurrence:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise RegistryError(f"recurrence {self.name!r} takes no option(s) {unknown} "
                                f"(options: {known})")
        return self.builder(**{**self.defaults, **options})


_REGISTRY: dict[str, Entry] = {}


def add(entry: Entry, override: bool = False) -> Entry:
    check_ident(entry.name, "recurrence name")
    if entry.name in _REGISTRY and not override:
        raise RegistryError(f"recurrence {entry.name!r} is already registered "
                            f"(from {_REGISTRY[entry.name].origin}); pass override=True to "
                            "replace it")
    _REGISTRY[entry.name] = entry
    return entry


def register(name: str | None = None, *, optional_inputs=(), hints=None,
             override: bool = False, origin: str = "python") -> Callable:
    """Decorator: register a builder ``f(r: Builder, **options)`` as recurrence ``name``.

    Args:
        name: the recurrence name (default: the function's name).
        optional_inputs: inputs callers may omit; ``f`` gets a bool option of each name.
        hints: how ``scancc check`` samples inputs so the scan stays stable, as
            ``{input: sampler}`` with samplers from ``scancc.sampling.SAMPLERS``
            (e.g. ``"logsigmoid"`` for a log-space gate, ``"negative"`` for A).
        override: replace an existing registration of the same name.

    Example::

        @scancc.register("leaky_sum")
        def leaky_sum(r, decay=0.9):
            b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
            x = r.input("x", [b, t, d])
            h = r.state("h", [b, d], scalar(const(decay)), inject=x)
            r.output("y", [b, t, d], h)
    """
    def deco(f: Callable) -> Callable:
        nm = name or f.__name__
        sig = inspect.signature(f)
        params = list(sig.parameters.values())[1:]
        defaults = {p.name: (None if p.default is inspect.Parameter.empty else p.default)
                    for p in params}
        for o in optional_inputs:
            defaults.setdefault(o, False)
        doc = inspect.getdoc(f) or ""

        def builder(**options):
            r = Builder(nm, doc.split("\n\n")[0] if doc else "")
            f(r, **options)
            return r.build()
        bad = {k: v for k, v in (hints or {}).items() if v not in SAMPLERS}
        if bad:
            raise RegistryError(f"recurrence {nm!r}: unknown sampling hints {bad} "
                                f"(known: {', '.join(SAMPLERS)})")
        add(Entry(nm, builder, defaults, tuple(optional_inputs), doc, origin, dict(hints or {})),
            override)
        f.entry = _REGISTRY[nm]
        return f
    return deco


def get(name: str) -> Entry:
    if name not in _REGISTRY:
        raise RegistryError(f"no recurrence named {name!r} (registered: {', '.join(names())})")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
