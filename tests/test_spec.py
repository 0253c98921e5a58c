"""YAML specs: both forms load, every error names file:line, and a YAML recurrence computes
what the same recurrence written in Python (and a plain NumPy loop) computes."""
from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scancc
from scancc import ir, registry
from scancc.ir import format_recurrence, parse_recurrence
from scancc.ir.expr import FUNCTIONS, RESERVED
from scancc.spec import SpecError, load_recurrence, load_spec, parse_spec, register_spec
from scancc.testing import default_sizes, sample_inputs

SPECS = Path(__file__).resolve().parent.parent / "specs"

GOOD = """\
name: leaky
dims:
  batch: batch
  time: time
  chan: feature
inputs:
  x: [batch, time, chan]
  g: [batch, time, chan]
lets:
  decay: sigmoid(g)
states:
  h:
    dims: [batch, chan]
    transition: diagonal(decay=decay)
    inject: x
outputs:
  y:
    dims: [batch, time, chan]
    expr: h * silu(x)
"""


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error(tmp_path: Path, text: str, name: str = "bad.yaml") -> SpecError:
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text, name))
    return e.value


def line_of(text: str, needle: str, nth: int = 0) -> int:
    """1-based line of the nth line containing needle."""
    hits = [i for i, ln in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in ln]
    return hits[nth]


def check(tmp_path, text, needle, *fragments, nth=0, col_of=None):
    e = error(tmp_path, text)
    line = line_of(text, needle, nth)
    msg = str(e)
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}:{line}:"), msg
    assert e.line == line
    for f in fragments:
        assert f in msg, msg
    if col_of is not None:
        src = textwrap.dedent(text).splitlines()[line - 1]
        assert e.col == src.index(col_of) + 1, msg
    return e


# ---- the good paths ----

def test_good_define_spec_builds_the_recurrence(tmp_path):
    spec = load_spec(write(tmp_path, GOOD, "leaky.yaml"))
    rec = spec.recurrence()
    assert spec.options == {} and spec.entry.origin == str(tmp_path / "leaky.yaml")
    assert [d.name for d in rec.dims] == ["batch", "time", "chan"]
    assert [l.name for l in rec.lets] == ["decay"]
    assert rec.state("h").transition.kind is ir.Kind.DIAGONAL
    assert rec.state("h").transition.operand("decay") == ir.Node(ir.Op.PARAM, (), "decay")
    assert rec.outputs[0].expr == ir.Node(ir.Op.STATE, (), "h") * ir.silu(
        ir.Node(ir.Op.INPUT, (), "x"))


def test_example_specs_load():
    m = load_spec(SPECS / "mamba2.yaml")
    assert m.entry is registry.get("mamba2") and m.options == {"dt_softplus": True}
    assert any(n.op is ir.Op.SOFTPLUS for n in m.recurrence().let("dt_").expr.walk())
    g = load_spec(SPECS / "gla.yaml")
    assert g.entry is registry.get("gla") and g.options == {"scale": None}
    iir = load_spec(SPECS / "gated_iir.yaml")
    assert iir.entry.name == "gated_iir" and iir.entry.hints == {"a": "stable_poly",
                                                                 "b": "small"}
    assert iir.recurrence().state("w").transition.kind is ir.Kind.COMPANION


def test_compile_takes_a_spec_path_and_applies_its_options():
    rng = np.random.default_rng(0)
    b, t, h, p, n = 2, 17, 2, 3, 4
    x, dt = rng.standard_normal((b, t, h, p)), rng.standard_normal((b, t, h))
    A = -np.exp(rng.standard_normal(h))
    B, C = rng.standard_normal((b, t, 1, n)), rng.standard_normal((b, t, 1, n))
    y = scancc.compile(str(SPECS / "mamba2.yaml"))(x, dt, A, B, C)
    want = scancc.compile("mamba2", dt_softplus=True)(x, dt, A, B, C)
    unsoft = scancc.compile("mamba2")(x, np.logaddexp(0.0, dt), A, B, C)
    np.testing.assert_allclose(y, want, rtol=0, atol=0)
    np.testing.assert_allclose(y, unsoft, rtol=1e-12, atol=1e-12)


def gated_iir_numpy(x, g, a, b):
    """w_t = x_t - sigmoid(g_t) sum_{k>=1} a_k w_{t-k}; y_t = sum_{k>=0} b_k w_{t-k}."""
    B, T, D = x.shape
    n = a.shape[1]
    w = np.zeros((B, T, D))
    y = np.zeros((B, T, D))
    for t in range(T):
        s = 1.0 / (1.0 + np.exp(-g[:, t]))
        fb = sum(a[:, k] * w[:, t - k] for k in range(1, n) if t - k >= 0)
        w[:, t] = x[:, t] - s * fb
        y[:, t] = sum(b[:, k] * w[:, t - k] for k in range(n) if t - k >= 0)
    return y


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_gated_iir_matches_a_numpy_loop(order):
    rec = load_recurrence(SPECS / "gated_iir.yaml")
    hints = load_spec(SPECS / "gated_iir.yaml").entry.hints
    inp = sample_inputs(rec, default_sizes(rec, time=37, order=order, chan=3), seed=order,
                        hints=hints)
    y = scancc.compile(str(SPECS / "gated_iir.yaml"))(**inp)
    want = gated_iir_numpy(inp["x"], inp["g"], inp["a"], inp["b"])
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-10)


def test_gated_iir_without_gate_is_scipy_lfilter():
    from scipy.signal import lfilter
    rec = load_recurrence(SPECS / "gated_iir.yaml")
    inp = sample_inputs(rec, default_sizes(rec, time=50), hints={"a": "stable_poly"})
    inp["g"] = np.full_like(inp["g"], 800.0)  # sigmoid(800) == 1.0 in float64
    y = scancc.compile(str(SPECS / "gated_iir.yaml"))(**inp)
    x = inp["x"]
    want = np.stack([lfilter(inp["b"][c], inp["a"][c], x[:, :, c], axis=1)
                     for c in range(x.shape[2])], axis=2)
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-9)


def test_gated_iir_spec_equals_the_python_example():
    """docs/adding-a-recurrence.md: the spec and examples/gated_iir.py are the same layer."""
    import importlib.util
    path = SPECS.parent / "examples" / "gated_iir.py"
    mod = importlib.util.spec_from_file_location("gated_iir_example_for_spec", path)
    try:
        mod.loader.exec_module(importlib.util.module_from_spec(mod))
        example = registry.get("gated_iir").build()
    finally:
        registry.unregister("gated_iir")
    spec = load_spec(SPECS / "gated_iir.yaml")
    assert spec.recurrence() == example
    assert spec.entry.hints == {"a": "stable_poly", "b": "small"}


def test_gated_iir_is_stable_with_its_hints_over_a_long_sequence():
    spec = load_spec(SPECS / "gated_iir.yaml")
    rec = spec.recurrence()
    inp = sample_inputs(rec, default_sizes(rec, time=3000), seed=3, hints=spec.entry.hints)
    y, w = scancc.compile(str(SPECS / "gated_iir.yaml"))(**inp, output_final_state=True)
    assert np.all(np.isfinite(y))
    # a stable filter forgets: the final state is of the order of the recent inputs
    assert np.abs(w).max() < 20 * np.abs(inp["x"]).max()
    # the hint matters: feedback with roots outside the unit circle and an open gate diverges
    a_bad = np.broadcast_to(np.poly([1.5, -1.5]), inp["a"].shape)
    unstable = dict(inp, a=a_bad, g=np.full_like(inp["g"], 10.0))
    with np.errstate(over="ignore", invalid="ignore"):
        y2 = scancc.compile(str(SPECS / "gated_iir.yaml"))(**unstable)
    assert not np.all(np.abs(y2) < 1e6)


GLA_YAML = """\
name: gla_yaml
doc: Gated linear attention, written as a spec.
dims: {batch: batch, time: time, heads: head, key: feature, value: feature}
inputs:
  q: [batch, time, heads, key]
  k: [batch, time, heads, key]
  v: [batch, time, heads, value]
  g: [batch, time, heads, key]
states:
  S:
    dims: [batch, heads, key, value]
    transition: diagonal(decay=exp(g))
    inject: k * v
outputs:
  o: {dims: [batch, time, heads, value], expr: "sum(S * q, key) * rsqrt(size(key))"}
hints: {g: logsigmoid}
"""


def test_yaml_gla_equals_the_builder_gla(tmp_path):
    spec = load_spec(write(tmp_path, GLA_YAML, "gla_yaml.yaml"))
    rec, lib = spec.recurrence(), registry.get("gla").build()
    assert dataclasses.replace(rec, name="gla", doc=lib.doc) == lib
    sizes = default_sizes(rec, time=23)
    inp = sample_inputs(rec, sizes, seed=5, hints=spec.entry.hints)
    y = scancc.compile(str(tmp_path / "gla_yaml.yaml"))(**inp)
    np.testing.assert_array_equal(y, scancc.compile("gla")(**inp))


SWA_YAML = """\
name: swa_yaml
dims:
  batch: batch
  time: time
  heads: head
  key: feature
  value: feature
  window: {size: 3}
inputs: {q: [batch, time, heads, key], k: [batch, time, heads, key],
         v: [batch, time, heads, value]}
states:
  kw: {dims: [batch, heads, window, key], transition: shift(axis=window), inject: k}
  vw: {dims: [batch, heads, window, value], transition: shift(axis=window), inject: v}
  valid: {dims: [batch, window], transition: shift(axis=window), inject: 1}
outputs:
  o:
    dims: [batch, time, heads, value]
    expr: >-
      sum(softmax(sum(q * kw, key) * 0.5, window, mask=valid) * vw,
          window)
"""


def test_yaml_swa_equals_the_builder_swa(tmp_path):
    """Fixed-size dims, shift states, a constant inject, softmax with a mask, a folded
    multi-line expression."""
    rec = load_recurrence(write(tmp_path, SWA_YAML, "swa.yaml"))
    lib = registry.get("swa").build(window=3, scale=0.5)
    assert dataclasses.replace(rec, name="swa", doc=lib.doc) == lib


def test_exponent_without_a_dot_is_a_number(tmp_path):
    spec = load_spec(write(tmp_path, "use: swa\noptions: {scale: 1e-3, window: 2}\n"))
    assert spec.options == {"scale": 0.001, "window": 2}
    assert spec.recurrence() == registry.get("swa").build(scale=0.001, window=2)


MAMBA_YAML = """\
name: s6
dims: {batch: batch, chan: feature, time: time, groups: group, dstate: feature}
inputs:
  u: [batch, chan, time]
  delta: [batch, chan, time]
  A: [chan, dstate]
  B: {dims: [batch, groups, dstate, time], optional: [groups]}
  C:
    - batch
    - groups?
    - dstate
    - time
lets:
  dt: delta
states:
  x:
    dims: [batch, chan, dstate]
    transition: diagonal(decay=exp(dt * A))
    inject: dt * group(B, groups, chan) * u
outputs:
  y: {dims: [batch, chan, time], expr: "sum(x * group(C, groups, chan), dstate)"}
"""


def test_yaml_mamba_with_optional_dims_equals_the_builder_mamba(tmp_path):
    """Both spellings of an optional dim, and group() over it."""
    p = write(tmp_path, MAMBA_YAML, "s6.yaml")
    rec, lib = load_recurrence(p), registry.get("mamba").build()
    assert rec.input("B").optional_dims == rec.input("C").optional_dims == ("groups",)
    assert dataclasses.replace(rec, name="mamba", doc=lib.doc) == lib
    rng = np.random.default_rng(2)
    u, delta = rng.standard_normal((2, 4, 9)), rng.uniform(0.01, 0.2, (2, 4, 9))
    A, B, C = -np.exp(rng.standard_normal((4, 3))), rng.standard_normal((2, 3, 9)), \
        rng.standard_normal((2, 1, 3, 9))
    np.testing.assert_array_equal(scancc.compile(str(p))(u, delta, A, B, C),
                                  scancc.compile("mamba")(u, delta, A, B, C))


def test_instantiate_with_a_name_makes_a_new_entry(tmp_path):
    p = write(tmp_path, """\
        use: mamba2
        name: mamba2_soft
        doc: Mamba2 with dt softplus in the kernel.
        options: {dt_softplus: true, dt_limit: [1e-3, 0.1]}
        """, "m.yaml")
    spec = load_spec(p)
    assert spec.entry.name == "mamba2_soft" and spec.entry.origin == str(p)
    assert spec.options == {"dt_softplus": True, "dt_limit": (0.001, 0.1)}
    rec = spec.recurrence()
    assert rec.name == "mamba2_soft"
    assert dataclasses.replace(rec, name="mamba2", doc="") == dataclasses.replace(
        registry.get("mamba2").build(dt_softplus=True, dt_limit=(0.001, 0.1)), doc="")
    with_d = spec.entry.build(D=True)
    assert "D" in [i.name for i in with_d.inputs]


def test_register_spec_adds_and_rejects_duplicates(tmp_path):
    p = write(tmp_path, GOOD, "leaky.yaml")
    try:
        entry = register_spec(p)
        assert registry.get("leaky") is entry
        with pytest.raises(SpecError) as e:
            register_spec(p)
        assert str(e.value).startswith(f"{p}:1:") and "already registered" in str(e.value)
        assert register_spec(p, override=True) is registry.get("leaky")
        y = scancc.compile("leaky")(x=np.ones((1, 4, 2)), g=np.zeros((1, 4, 2)))
        np.testing.assert_allclose(y[0, :, 0], [1.0, 1.5, 1.75, 1.875] * np.ones(4) * (
            1.0 / (1.0 + np.exp(-1.0))))
    finally:
        registry.unregister("leaky")


def test_register_spec_clashes_with_the_library(tmp_path):
    p = write(tmp_path, GOOD.replace("name: leaky", "name: gla"), "gla.yaml")
    with pytest.raises(SpecError) as e:
        register_spec(p)
    assert str(e.value).startswith(f"{p}:1:") and "from library" in str(e.value)


def test_register_spec_of_an_unnamed_instantiation(tmp_path):
    with pytest.raises(SpecError) as e:
        register_spec(SPECS / "mamba2.yaml")
    assert f"mamba2.yaml:{line_of((SPECS / 'mamba2.yaml').read_text(), 'use:')}:" in str(
        e.value) and "without a name" in str(e.value)


# ---- every error path names file:line ----

def test_yaml_syntax_error(tmp_path):
    check(tmp_path, "name: x\ndims: {batch: batch\ninputs: {}\n", "inputs", "invalid YAML")


def test_empty_file(tmp_path):
    e = error(tmp_path, "# nothing here\n")
    assert str(e).startswith(f"{tmp_path / 'bad.yaml'}:1:") and "empty file" in str(e)


def test_top_level_not_a_mapping(tmp_path):
    e = error(tmp_path, "- use: gla\n")
    assert str(e).startswith(f"{tmp_path / 'bad.yaml'}:1:") and "found a list" in str(e)


def test_neither_use_nor_name(tmp_path):
    check(tmp_path, "# a comment\nusee: gla\n", "usee", "unknown key 'usee'",
          "did you mean 'use'")
    check(tmp_path, "# a comment\ndims: {}\n", "dims", "expected 'use:'", "or 'name:'")


def test_several_documents(tmp_path):
    check(tmp_path, "use: gla\n---\nuse: hgrn\n", "---", "single document")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml: cannot read"):
        load_spec(tmp_path / "nope.yaml")


def test_duplicate_top_level_key(tmp_path):
    text = GOOD + "name: other\n"
    check(tmp_path, text, "name: other", "duplicate key 'name'", "first given at line 1")


def test_duplicate_nested_key(tmp_path):
    text = GOOD.replace("  x: [batch, time, chan]\n",
                        "  x: [batch, time, chan]\n  x: [batch, time]\n")
    check(tmp_path, text, "x: [batch, time]", "duplicate key 'x'")


def test_unknown_top_level_key(tmp_path):
    check(tmp_path, GOOD.replace("states:", "stats:"), "stats:", "unknown key 'stats'",
          "did you mean 'states'")


@pytest.mark.parametrize("old,new,needle,frag", [
    ("    inject: x", "    injct: x", "injct", "unknown key 'injct' in state 'h'"),
    ("    expr: h", "    exp: h", "exp: h", "unknown key 'exp' in output 'y'"),
    ("  chan: feature", "  chan: {role: feature, sise: 3}", "chan:", "unknown key 'sise'"),
])
def test_unknown_nested_key(tmp_path, old, new, needle, frag):
    check(tmp_path, GOOD.replace(old, new), needle, frag)


def test_missing_required_key(tmp_path):
    text = GOOD[:GOOD.index("outputs:")]
    e = check(tmp_path, text, "name: leaky", "missing the key 'outputs'")
    assert e.line == 1


def test_missing_state_key(tmp_path):
    check(tmp_path, GOOD.replace("    inject: x\n", ""), "dims: [batch, chan]",
          "missing the key 'inject'")


def test_number_where_a_dim_list_is_expected(tmp_path):
    check(tmp_path, GOOD.replace("g: [batch, time, chan]", "g: 3"), "g: 3",
          "input 'g': expected a list of dims", "found number 3")


def test_unknown_dim(tmp_path):
    text = GOOD.replace("g: [batch, time, chan]", "g: [batch, time, chanel]")
    check(tmp_path, text, "chanel", "expected one of the declared dims", "'chanel'",
          col_of="chanel")


def test_repeated_dim(tmp_path):
    check(tmp_path, GOOD.replace("dims: [batch, chan]", "dims: [batch, chan, chan]"),
          "chan, chan", "listed twice")


def test_optional_dim_only_on_inputs(tmp_path):
    check(tmp_path, GOOD.replace("dims: [batch, chan]", "dims: ['batch?', chan]"),
          "batch?", "found string 'batch?'")


def test_unquoted_optional_dim_in_a_flow_list_gets_a_hint(tmp_path):
    check(tmp_path, GOOD.replace("g: [batch, time, chan]", "g: [batch?, time, chan]"),
          "batch?", "invalid YAML", "must be quoted", col_of="?")


def test_optional_dim_not_among_the_inputs_dims(tmp_path):
    text = GOOD.replace("g: [batch, time, chan]", "g: {dims: [batch, time, chan], "
                        "optional: [time, x]}")
    check(tmp_path, text, "optional:", "expected one of the declared dims", "'x'")
    text = GOOD.replace("g: [batch, time, chan]", "g: {dims: [batch, time], "
                        "optional: [chan]}")
    check(tmp_path, text, "optional:", "expected one of its dims", "'chan'")


def test_bad_role(tmp_path):
    check(tmp_path, GOOD.replace("chan: feature", "chan: channel"), "chan: channel",
          "expected a role (batch, time, head, group, feature)", "'channel'")


def test_bad_dim_size(tmp_path):
    check(tmp_path, GOOD.replace("chan: feature", "chan: {role: feature, size: four}"),
          "size: four", "expected a positive integer")


def test_dim_size_not_positive_reaches_the_verifier(tmp_path):
    check(tmp_path, GOOD.replace("chan: feature", "chan: {role: feature, size: 0}"),
          "chan:", "size must be a positive integer")


@pytest.mark.parametrize("name", ["1x", "x-y", "state", "sum", "a" * 65,
                                  "__import__('os').system('x')"])
def test_bad_names(tmp_path, name):
    text = GOOD.replace("  g: [batch, time, chan]", f"  \"{name}\": [batch, time, chan]")
    check(tmp_path, text, "[batch, time, chan]", "input", nth=1)


def test_boolean_key(tmp_path):
    check(tmp_path, GOOD.replace("  g: [batch", "  on: [batch"), "on: [batch",
          "found boolean true", "quote it")


def test_bad_recurrence_name(tmp_path):
    check(tmp_path, GOOD.replace("name: leaky", "name: 'leaky; rm -rf /'"), "name:",
          "is not a valid name")


def test_name_shared_by_two_declarations(tmp_path):
    check(tmp_path, GOOD.replace("  decay: sigmoid(g)", "  x: sigmoid(g)"), "x: sigmoid",
          "name already used by the input at line 7")


@pytest.mark.parametrize("old,new,needle,col_of,frag", [
    ("expr: h * silu(x)", "expr: h * foo(x)", "expr:", "foo", "unknown function 'foo'"),
    ("expr: h * silu(x)", "expr: 'h * silu(q)'", "expr:", "q)", "unknown name 'q'"),
    ("expr: h * silu(x)", "expr: h * silu(x) +", "expr:", None, "expression ends early"),
    ("expr: h * silu(x)", "expr: h * chan", "expr:", "chan", "dims only appear as function"),
    ("expr: h * silu(x)", "expr: sum(h, x)", "expr:", "x)", "'x' is not a dim"),
    ("decay: sigmoid(g)", "decay: sigmoid(later)", "decay:", "later", "unknown name"),
    ("transition: diagonal(decay=decay)", "transition: diagonals(decay=decay)", "transition:",
     "diagonals", "unknown transition 'diagonals'"),
    ("transition: diagonal(decay=decay)", "transition: diagonal(axis=chan, decay=decay)",
     "transition:", "axis", "diagonal() takes decay, not 'axis'"),
    ("transition: diagonal(decay=decay)", "transition: diagonal(decay=decay) + x",
     "transition:", "+ x", "expected the end of the transition"),
])
def test_bad_expressions_point_at_line_and_column(tmp_path, old, new, needle, col_of, frag):
    e = check(tmp_path, GOOD.replace(old, new), needle, frag, col_of=col_of)
    assert col_of is not None or e.col is not None


def test_multiline_expression_error_names_the_line(tmp_path):
    text = GOOD.replace("expr: h * silu(x)", "expr: |\n      h *\n      bad(x)")
    e = check(tmp_path, text, "expr: |", "unknown function 'bad'")
    assert e.col is None


@pytest.mark.parametrize("value,frag", [("[h, x]", "found a list"), ("true", "boolean"),
                                        ("null", "null"), ("- h", "found a list")])
def test_expression_of_the_wrong_type(tmp_path, value, frag):
    text = GOOD.replace("expr: h * silu(x)", f"expr: {value}" if value != "- h"
                        else "expr:\n      - h")
    check(tmp_path, text, "expr:" if value != "- h" else "- h", "expected an expression string",
          frag)


@pytest.mark.parametrize("old,new,needle,frag", [
    # scalar decay with a feature dim: the verifier's message, at the transition line
    ("transition: diagonal(decay=decay)", "transition: scalar(decay=decay)", "transition:",
     "a scalar decay"),
    ("    inject: x", "    inject: x * h", "inject: x * h", "not declared before this state"),
    ("dims: [batch, time, chan]\n    expr", "dims: [batch, time]\n    expr", "expr:",
     "the readout has dims"),
    ("dims: [batch, chan]", "dims: [batch, time, chan]", "dims: [batch, time", "time dim"),
    ("dims: [batch, time, chan]\n    expr", "dims: [batch, chan]\n    expr", "    dims:",
     "must have the time dim"),
    ("  g: [batch, time, chan]\n", "  g: [batch, time, chan]\n  u: [chan]\n", "u: [chan]",
     "is never used"),
    ("transition: diagonal(decay=decay)", "transition: shift(axis=batch)", "inject: x",
     "the injected term"),
    ("transition: diagonal(decay=decay)", "transition: companion(axis=chan, feedback=sum(g, chan))",
     "transition:", "the feedback row must vary"),
])
def test_verifier_errors_point_at_the_offending_key(tmp_path, old, new, needle, frag):
    assert old in GOOD
    text = GOOD.replace(old, new)
    nth = 1 if needle == "    dims:" else 0
    check(tmp_path, text, needle, frag, nth=nth)


def test_numerics(tmp_path):
    rec = load_recurrence(write(tmp_path, GOOD + "numerics: {accum: float64, input: float32}\n"))
    assert rec.numerics == ir.Numerics("float64", "float32", "float32")
    check(tmp_path, GOOD + "numerics: {accum: float16}\n", "numerics", "accum dtype",
          col_of="{")
    check(tmp_path, GOOD + "numerics: {state: 32}\n", "numerics", "expected a dtype name",
          col_of="32")
    check(tmp_path, GOOD + "numerics: {dtype: float32}\n", "numerics", "unknown key 'dtype'")


def test_no_time_dim(tmp_path):
    check(tmp_path, GOOD.replace("time: time", "time: batch"), "dims:",
          "exactly one dim must have role 'time'")


@pytest.mark.parametrize("hints,needle,frag", [
    ("hints: {x: gaussian}", "hints", "expected a sampler"),
    ("hints: {q: normal}", "hints", "expected an input name"),
    ("hints: [x]", "hints", "expected a mapping"),
    ("hints: {x: [normal]}", "hints", "expected a sampler"),
])
def test_bad_hints(tmp_path, hints, needle, frag):
    check(tmp_path, GOOD + hints + "\n", needle, frag)


@pytest.mark.parametrize("text,needle,frag", [
    ("use: mamba2\noptions: {dt_softplux: true}\n", "options", "no option 'dt_softplux'"),
    ("use: mamba2\noptions:\n  dt_softplus: 1\n", "dt_softplus", "expected a boolean"),
    ("use: mamba2\noptions:\n  D: true\n", "D: true", "optional input of 'mamba2'"),
    ("use: mamba9\n", "use:", "no recurrence named 'mamba9'"),
    ("use: [gla]\n", "use:", "expected a name"),
    ("use: fir\noptions: {activation: relu}\n", "options", "rejects these options"),
    ("use: swa\noptions:\n  window: 2.5\n", "window", "expected an integer"),
    ("use: gla\nstates: {}\n", "states", "unknown key 'states' in an instantiate spec"),
    ("use: gla\ndoc: hello\n", "doc", "only a spec with its own 'name:'"),
    ("use: gla\noptions: 3\n", "options", "expected a mapping"),
    ("use: mamba2\noptions:\n  dt_limit: [[0, 1]]\n", "dt_limit", "nested"),
])
def test_bad_instantiation(tmp_path, text, needle, frag):
    check(tmp_path, text, needle, frag)


# ---- specs are data ----

def test_python_yaml_tags_are_rejected_and_never_run(tmp_path, monkeypatch):
    def boom(*a):
        raise AssertionError("a spec ran os.system")
    monkeypatch.setattr(os, "system", boom)
    text = "use: !!python/object/apply:os.system ['echo pwned']\n"
    check(tmp_path, text, "use:", "invalid YAML", "could not determine a constructor")


def test_malicious_expression_is_parsed_never_evaluated(tmp_path, monkeypatch):
    def boom(*a):
        raise AssertionError("a spec ran os.system")
    monkeypatch.setattr(os, "system", boom)
    for bad in ["__import__('os').system('x')", "__import__(x)", "x.__class__",
                "eval(x)", "lambda: x", "x if x else x", "[x]", "x ** 2"]:
        text = GOOD.replace("expr: h * silu(x)", f"expr: \"{bad}\"")
        e = check(tmp_path, text, "expr:", "output 'y' expr")
        assert e.col is not None


def test_deeply_nested_expression(tmp_path):
    deep = "(" * 5000 + "x" + ")" * 5000
    check(tmp_path, GOOD.replace("expr: h * silu(x)", f"expr: {deep}"), "expr:",
          "nested too deeply")


def test_malicious_use_name(tmp_path):
    check(tmp_path, "use: \"__import__('os').system('x')\"\n", "use:", "is not a valid name")


# ---- round trip: random diagonal/scalar specs -> IR text form -> IR ----

# YAML 1.1 reads these as booleans or null; a spec must quote them (tested above)
_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "null"}
_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in RESERVED and s not in FUNCTIONS and s not in _YAML_WORDS)


@st.composite
def _exprs(draw, leaves, depth=3):
    """(text, node) of a random expression over ``leaves`` ({name: node})."""
    kind = draw(st.sampled_from(["leaf", "const", "unary", "binary", "neg", "clamp"]
                                if depth else ["leaf", "const"]))
    if kind == "leaf":
        name = draw(st.sampled_from(sorted(leaves)))
        return name, leaves[name]
    if kind == "const":
        v = draw(st.floats(0.0, 100.0, allow_nan=False).map(lambda f: round(f, 3)))
        return repr(v), ir.const(v)
    a, an = draw(_exprs(leaves, depth - 1))
    if kind == "unary":
        f = draw(st.sampled_from(["exp", "sigmoid", "softplus", "logsigmoid", "silu"]))
        return f"{f}({a})", ir.Node(FUNCTIONS[f], (an,))
    if kind == "neg":
        return f"-({a})", -an
    if kind == "clamp":
        return f"clamp({a}, lo=-1.5, hi=2.0)", ir.clamp(an, -1.5, 2.0)
    b, bn = draw(_exprs(leaves, depth - 1))
    op = draw(st.sampled_from(["+", "-", "*", "/", "maximum"]))
    if op == "maximum":
        return f"maximum({a}, {b})", ir.maximum(an, bn)
    node = {"+": an + bn, "-": an - bn, "*": an * bn, "/": an / bn}[op]
    return f"({a}) {op} ({b})", node


@st.composite
def _specs(draw):
    names = draw(st.lists(_NAMES, min_size=8, max_size=8, unique=True))
    bat, tim, hd, feat, gin, xin, st_, out = names
    kind = draw(st.sampled_from(["scalar", "diagonal"]))
    # a scalar decay is constant over the state's feature dim, so it reads only the gate
    leaves = {gin: ir.Node(ir.Op.INPUT, (), gin)}
    if kind == "diagonal":
        leaves[xin] = ir.Node(ir.Op.INPUT, (), xin)
    decay, dnode = draw(_exprs(leaves))
    inj, inode = draw(_exprs({xin: ir.Node(ir.Op.INPUT, (), xin)}, 2))
    gate_dims = [bat, tim, hd]
    text = f"""\
name: {names[0]}r
dims:
  {bat}: batch
  {tim}: time
  {hd}: head
  {feat}: {{role: feature, size: {draw(st.integers(1, 9))}}}
inputs:
  {gin}: [{', '.join(draw(st.permutations(gate_dims)))}]
  {xin}: [{bat}, {tim}, {hd}, {feat}]
states:
  {st_}:
    dims: [{bat}, {hd}, {feat}]
    transition: "{kind}(decay={decay})"
    inject: "{inj}"
outputs:
  {out}: {{dims: [{bat}, {tim}, {hd}, {feat}], expr: "{st_} * {xin} + {gin}"}}
"""
    return text, kind, dnode, inode


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs())
def test_round_trip_through_the_text_form(case):
    text, kind, decay, inject = case
    rec = parse_spec(text, "random.yaml").recurrence()
    s = rec.states[0]
    assert s.transition.kind.value == kind
    assert s.transition.operand("decay") == decay and s.inject == inject
    assert parse_recurrence(format_recurrence(rec)) == rec


# The time dim is named after a word a message-text search keys on: 'axis' reads as a
# transition problem, 'readout' as a readout-expression problem. The structured location
# (VerifyError.where) says which declaration and part is at fault, whatever the names.
AXIS_TIME = GOOD.replace("time: time", "axis: time").replace("time, chan]", "axis, chan]")


@pytest.mark.parametrize("text,needle,nth,frag", [
    (AXIS_TIME.replace("dims: [batch, chan]", "dims: [batch, axis, chan]"),
     "dims: [batch, axis, chan]", 0, "must not include the time dim 'axis'"),
    (GOOD.replace("time: time", "readout: time").replace("time, chan]", "readout, chan]")
     .replace("dims: [batch, readout, chan]\n    expr", "dims: [batch, chan]\n    expr"),
     "dims: [batch, chan]", 1, "must have the time dim 'readout'"),
])
def test_verifier_errors_are_located_by_structure_not_by_message_text(tmp_path, text, needle,
                                                                      nth, frag):
    check(tmp_path, text, needle, frag, nth=nth)
