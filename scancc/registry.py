"""The registry of recurrences: the standard library and user registrations, by name.

The standard library (``scancc.library``) registers itself here when ``scancc`` is imported;
this module never imports it (the library depends on the registry, not the reverse).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from scancc.ir import Builder, IRError, Recurrence, check_ident

from .sampling import SAMPLERS

if TYPE_CHECKING:
    from scancc.backends.base import Option


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
    # option -> accepted types, where declared (a builder's annotations); else from the default
    types: dict[str, tuple[type, ...]] = field(default_factory=dict)

    def declared_options(self) -> dict[str, "Option"]:
        """Each option as an ``Option``: typed by its annotation, else by its default
        (``dt_softplus=False`` takes booleans; a None default without annotation takes any)."""
        from dataclasses import replace

        from scancc.backends.base import Option
        out = {}
        for k, d in self.defaults.items():
            o = Option.like(k, d)
            out[k] = replace(o, types=self.types[k]) if k in self.types else o
        return out

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with values converted (ints to float, lists to tuples) if each is
        accepted; else ``OptionError`` naming the recurrence, option, expected and got. The
        one check of recurrence options: the Python path and YAML specs both use it."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise RegistryError(f"recurrence {self.name!r} takes no option(s) {unknown} "
                                f"(options: {known})")
        from scancc.backends.base import check_options
        return check_options(f"recurrence {self.name!r}", self.declared_options(), options)

    def build(self, **options: Any) -> Recurrence:
        return self.builder(**{**self.defaults, **self.check_options(options)})


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
        types = _declared_types(f)
        doc = inspect.getdoc(f) or ""

        def builder(**options):
            r = Builder(nm, doc.split("\n\n")[0] if doc else "")
            f(r, **options)
            return r.build()
        bad = {k: v for k, v in (hints or {}).items() if v not in SAMPLERS}
        if bad:
            raise RegistryError(f"recurrence {nm!r}: unknown sampling hints {bad} "
                                f"(known: {', '.join(SAMPLERS)})")
        add(Entry(nm, builder, defaults, tuple(optional_inputs), doc, origin, dict(hints or {}),
                  types), override)
        f.entry = _REGISTRY[nm]
        return f
    return deco


_PLAIN = (bool, int, float, str, tuple, list, dict)


def _declared_types(f: Callable) -> dict[str, tuple[type, ...]]:
    """Option types a builder declares by annotation (``scale: float | None = None``): plain
    types, their unions with None, ``tuple[...]``; anything else is left to the default."""
    import typing
    from types import NoneType, UnionType
    try:
        hints = typing.get_type_hints(f)
    except Exception:  # an annotation that does not resolve types nothing
        return {}
    out = {}
    for k, ann in hints.items():
        if k == "return":
            continue
        args = typing.get_args(ann) if isinstance(ann, UnionType) or \
            typing.get_origin(ann) is typing.Union else (ann,)
        ts = tuple(typing.get_origin(a) or a for a in args if a is not NoneType)
        if ts and all(t in _PLAIN for t in ts):
            out[k] = ts
    return out


def get(name: str) -> Entry:
    if name not in _REGISTRY:
        raise RegistryError(f"no recurrence named {name!r} (registered: {', '.join(names())})")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
