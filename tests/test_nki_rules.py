"""The NKI backend's shape: rule registries keyed by IR op and transition kind, a static plan
step, an emit step that never parses its own output, and module imports that form no cycle."""
import ast
import pathlib

import pytest

import scancc
from scancc import registry
from scancc.autograd import adjoint
from scancc.backends.base import UnsupportedError
from scancc.backends.nki import NkiBackend, lowering, plan
from scancc.backends.nki.chunked import CHUNK_OP_RULES
from scancc.backends.nki.hardware import CHIPS
from scancc.backends.nki.rules import ANALYSIS_RULES, OP_RULES, TRANSITION_RULES
from scancc.ir import Kind, Op
from scancc.ir.passes import canonicalize
from scancc.testing import default_sizes

NKI = pathlib.Path(lowering.__file__).parent
LIBRARY = [n for n in registry.names() if registry.get(n).origin == "library"]


def _recurrences():
    """Every library recurrence and the backward of each, after the plan's canonical passes
    (the ops and kinds NKI lowers)."""
    out = []
    for name in LIBRARY:
        rec = registry.get(name).build()
        # a cascade's backward (bmojo's) is left out here: rendering it takes about a
        # minute (docs/bmojo.md); tests/test_bmojo_grad.py runs it on NKI
        out += [rec] + ([] if rec.cascaded else [adjoint(rec).backward])
    return [canonicalize(r) for r in out]


def _imports(path: pathlib.Path) -> set[str]:
    """Modules a file imports (relative ones as '.name')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_registry_names():
    assert OP_RULES.backend == TRANSITION_RULES.backend == "nki"
    assert (OP_RULES.what, TRANSITION_RULES.what) == ("op", "transition")
    # every transition kind, the adjoint steps included
    assert TRANSITION_RULES.names() == {k.value for k in Kind}
    # every op the library and its backward use has a rule; rules only for IR ops
    used = {n.op.value for rec in _recurrences()
            for e in [s.inject for s in rec.states] + [o.expr for o in rec.outputs]
            + [lt.expr for lt in rec.lets]
            + [x for s in rec.states for _, x in s.transition.operands]
            for n in e.walk()}
    assert used <= OP_RULES.names() == {o.value for o in Op}
    # the plan writes exp(x) - 1 as expm1 (scancc.ir.passes); l2norm lowers its expansion
    assert "expm1" in used
    # every op lowered is analyzed (what it varies along decides its placement)
    assert ANALYSIS_RULES.names() == OP_RULES.names()
    # the chunked form's lowerer: the same keys (a subset: what find_chunked admits)
    assert CHUNK_OP_RULES.names() <= OP_RULES.names()


def test_missing_op_rule_names_op_backend_and_recurrence(monkeypatch):
    monkeypatch.delitem(OP_RULES._rules, Op.SOFTPLUS)
    rec = registry.get("mamba").build(delta_softplus=True)
    with pytest.raises(UnsupportedError, match=r"'nki'.*'mamba'.*no op rule for 'softplus'"):
        NkiBackend().render(rec, {})


def test_missing_transition_rule_names_kind_backend_and_recurrence(monkeypatch):
    monkeypatch.delitem(TRANSITION_RULES._rules, Kind.COMPANION)
    rec = registry.get("iir").build()
    with pytest.raises(UnsupportedError, match=r"'nki'.*'iir'.*no transition rule for "
                                               r"'companion'"):
        NkiBackend().render(rec, {})


def test_no_module_parses_generated_text():
    for path in NKI.glob("*.py"):
        assert "re" not in _imports(path), f"{path.name} imports re"


def test_imports_form_no_cycle():
    """lowering (emit) -> plan, rules, chunked -> values, hardware; never the reverse; the
    emulator takes its limits from the hardware table."""
    below = {"values.py": set(), "hardware.py": set(), "rules.py": {".values"},
             "chunked.py": {".rules", ".values"}, "plan.py": {".chunked", ".hardware", ".values"},
             "emulator.py": {".hardware"}}
    for name, allowed in below.items():
        local = {m for m in _imports(NKI / name) if m.startswith(".") and not m.startswith("..")}
        assert local <= allowed, (name, local - allowed)


@pytest.mark.parametrize("name", LIBRARY)
def test_static_plan_is_the_rendered_plan(name, monkeypatch):
    """plan_space decides layout, algorithm per state and tile candidates without emitting."""
    rec = registry.get(name).build()
    sizes = default_sizes(rec)
    src, got = NkiBackend()._render(rec, sizes, False, False, {})

    def no_emit(*a, **k):
        raise AssertionError("the static plan emitted code")
    monkeypatch.setattr(lowering, "Renderer", no_emit)
    space = plan.plan_space(rec, sizes)
    assert (space.pd, space.outer, tuple(space.chunks)) == (got.pd, got.outer, got.chunked)
    assert got.tt in space.tiles and space.chip is CHIPS["trn1"]
    assert got.algorithms == space.algorithms
    assert set(got.algorithms.values()) <= {"recurrent", "chunked"}


def test_chip_option_and_vocabulary():
    k = scancc.compile("mamba2", target="nki", chip="trn2")
    assert "nki.jit" in k.source
    be = NkiBackend()
    rec = registry.get("mamba2").build()
    sizes = default_sizes(rec)
    _, p = be._render(rec, sizes, False, False, {"chip": "trn2", "algorithm": "recurrent"})
    assert p.chip == "trn2" and not p.chunked
    with pytest.raises(UnsupportedError, match=r"unknown chip 'trn9' \(known: trn1, trn2\)"):
        be._render(rec, sizes, False, False, {"chip": "trn9"})
    with pytest.raises(UnsupportedError, match=r"unknown algorithm 'scan'.*recurrent"):
        be._render(rec, sizes, False, False, {"algorithm": "scan"})


@pytest.mark.parametrize("algorithm", ["auto", "recurrent"])
def test_static_storage_is_what_the_emitter_allocates(algorithm):
    """The plan's static count of the fixed tiles (constants, carries, trajectories,
    histories, materialized transition operands) equals the emitter's allocation sites of
    those tiles, for every library recurrence and its backward, both loop orders, several
    time tiles (so the two cannot drift); it is a lower bound of the whole kernel's need."""
    for rec in _recurrences():
        sizes = default_sizes(rec, **{rec.time: 100})
        space = plan.plan_space(rec, sizes, algorithm=algorithm)
        for tt in (1, 16, 100):
            for time_outer in (False, True):
                r = lowering.Renderer(space, tt, True, True, time_outer)
                r.render()
                fixed = space.storage(tt, time_outer)
                assert sorted(r.storage_sites) == sorted(fixed), (rec.name, tt, time_outer)
                assert sum(fixed) + max(fixed) <= r.resources().sbuf_bytes


def test_plan_runs_the_canonical_passes():
    """s4d's (exp(dt A) - 1) / A reaches the emitter as expm1 (its rule); delta_net's l2norm
    stays one node (its rule lowers the expansion); the kernel's header shows the recurrence
    as registered."""
    for name, opts, want in [("s4d", {}, Op.EXPM1),
                             ("delta_net", {"use_qk_l2norm_in_kernel": True}, Op.L2NORM)]:
        rec = registry.get(name).build(**opts)
        space = plan.plan_space(rec, default_sizes(rec))
        ops = {n.op for e in [s.inject for s in space.rec.states]
               + [o.expr for o in space.rec.outputs] + [lt.expr for lt in space.rec.lets]
               + [x for s in space.rec.states for _, x in s.transition.operands]
               for n in e.walk()}
        assert want in ops
        assert space.source is rec
