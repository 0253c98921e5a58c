"""The reference backend's rule registries: every IR op and every transition kind has one
rule, looked up by the interpreter; a missing rule is an error naming the backend, the
recurrence and the entry."""
import pytest

from scancc import registry
from scancc.backends import get
from scancc.backends.base import UnsupportedError
from scancc.backends.reference import rules
from scancc.backends.rules import Rules
from scancc.ir import Kind, Op
from scancc.testing import default_sizes, sample_inputs


def test_every_op_has_a_rule():
    assert rules.OP_RULES.names() == {op.value for op in Op}


def test_every_transition_kind_has_a_rule():
    assert rules.TRANSITION_RULES.names() == {k.value for k in Kind}


def test_registries_are_the_shared_primitive():
    for reg, what in ((rules.OP_RULES, "op"), (rules.TRANSITION_RULES, "transition")):
        assert isinstance(reg, Rules) and (reg.backend, reg.what) == ("reference", what)


def _run(name):
    entry = registry.get(name)
    rec = entry.build()
    sizes = default_sizes(rec, time=3)
    return get("reference").run(rec, sample_inputs(rec, sizes, hints=entry.hints), sizes, None,
                                False, {})


@pytest.mark.parametrize("reg,key,name", [
    (rules.OP_RULES, Op.EXP, "simple_gla"),
    (rules.TRANSITION_RULES, Kind.HOUSEHOLDER, "delta_net"),
])
def test_a_missing_rule_names_backend_recurrence_and_entry(monkeypatch, reg, key, name):
    _run(name)
    monkeypatch.setattr(reg, "_rules", {k: f for k, f in reg._rules.items() if k is not key})
    with pytest.raises(UnsupportedError) as e:
        _run(name)
    msg = str(e.value)
    assert "'reference'" in msg and repr(name) in msg and repr(key.value) in msg
