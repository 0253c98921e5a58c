"""Rule registries: the one shape every backend's lowering has.

A backend keeps two registries, with the same names in every backend:

- ``OP_RULES``: keyed by IR op (``scancc.ir.Op``): how one expression node is lowered;
- ``TRANSITION_RULES``: keyed by transition kind (``scancc.ir.Kind``): how one state step is
  lowered.

Each entry is one function, registered with a decorator::

    OP_RULES = Rules("triton", "op")

    @OP_RULES.register(Op.EXP, Op.LOG)
    def _unary(L, node, env): ...

``rules.lookup(key, recurrence)`` returns the function or raises ``UnsupportedError`` naming
the backend, the recurrence and the missing entry, so a missing rule is never a KeyError from
deep inside a renderer. ``names()`` lists the entries (tests compare them across backends).
"""
from __future__ import annotations

import enum
from typing import Callable, Iterable

from .base import UnsupportedError


class Rules:
    """A registry of lowering rules keyed by an IR enum member (``Op`` or ``Kind``)."""

    def __init__(self, backend: str, what: str):
        self.backend, self.what = backend, what
        self._rules: dict[enum.Enum, Callable] = {}

    def register(self, *keys: enum.Enum) -> Callable[[Callable], Callable]:
        if not keys:
            raise ValueError("register() needs at least one key")

        def deco(fn: Callable) -> Callable:
            for k in keys:
                if k in self._rules:
                    raise ValueError(f"{self.backend} {self.what} rule for {k.value!r} "
                                     f"registered twice")
                self._rules[k] = fn
            return fn
        return deco

    def add(self, keys: Iterable[enum.Enum], fn: Callable) -> None:
        self.register(*keys)(fn)

    def lookup(self, key: enum.Enum, recurrence: str) -> Callable:
        fn = self._rules.get(key)
        if fn is None:
            raise UnsupportedError(self.backend, recurrence,
                                   f"no {self.what} rule for {key.value!r}")
        return fn

    def __contains__(self, key: enum.Enum) -> bool:
        return key in self._rules

    def names(self) -> frozenset[str]:
        """The registered entries, by the IR's name for them (``"exp"``, ``"householder"``)."""
        return frozenset(k.value for k in self._rules)

    def __repr__(self) -> str:
        return f"Rules({self.backend!r}, {self.what!r}: {', '.join(sorted(self.names()))})"


__all__ = ["Rules"]
