"""Every backend has the same shape: two rule registries, ``OP_RULES`` keyed by IR op and
``TRANSITION_RULES`` keyed by transition kind, in ``backends/<name>/rules.py``, with the same
entry names in every backend: every op and every transition kind of the IR. A new op or kind
fails here until each backend has its rule (docs/architecture.md, "Where each kind of change
goes")."""
from __future__ import annotations

import importlib

import pytest

from scancc import backends
from scancc.backends.rules import Rules
from scancc.ir import Kind, Op

ALL_OPS = {o.value for o in Op}
ALL_KINDS = {k.value for k in Kind}


def _rules(backend: str):
    return importlib.import_module(f"scancc.backends.{backend}.rules")


@pytest.mark.parametrize("backend", backends.names())
def test_every_backend_has_both_registries(backend):
    mod = _rules(backend)
    assert isinstance(mod.OP_RULES, Rules) and isinstance(mod.TRANSITION_RULES, Rules)
    assert mod.OP_RULES.backend == mod.TRANSITION_RULES.backend == backend
    assert (mod.OP_RULES.what, mod.TRANSITION_RULES.what) == ("op", "transition")


def test_same_entry_names_in_every_backend():
    ops = {b: _rules(b).OP_RULES.names() for b in backends.names()}
    kinds = {b: _rules(b).TRANSITION_RULES.names() for b in backends.names()}
    assert {b: ALL_OPS - n for b, n in ops.items()} == {b: set() for b in ops}
    assert {b: ALL_KINDS - n for b, n in kinds.items()} == {b: set() for b in kinds}
    assert len({frozenset(n) for n in ops.values()}) == 1
    assert len({frozenset(n) for n in kinds.values()}) == 1


def test_a_lookup_of_a_missing_entry_names_backend_recurrence_and_entry():
    r = Rules("somebackend", "op")

    @r.register(Op.EXP)
    def _exp(*a):
        return "exp"

    assert r.lookup(Op.EXP, "rec")() == "exp"
    with pytest.raises(backends.UnsupportedError,
                       match=r"backend 'somebackend' cannot lower recurrence 'myrec': "
                             r"no op rule for 'log'"):
        r.lookup(Op.LOG, "myrec")
    with pytest.raises(ValueError, match="registered twice"):
        r.register(Op.EXP)(_exp)
