"""No-toolchain tier: the IR, its verifier, the text form (print and parse back)."""
import re

import numpy as np
import pytest
import scancc
from hypothesis import given, settings
from hypothesis import strategies as st
from scancc.ir import (Builder, IRError, Node, Op, ParseError, VerifyError,
                       companion, const, dense, diagonal, exp,
                       format_recurrence, householder, identity, parse_recurrence, scalar, shift)
from scancc.ir import reduce_sum as rsum


@pytest.mark.parametrize("name", scancc.names())
def test_library_round_trips_through_the_text_form(name):
    e = scancc.get(name)
    for opts in ({}, {o: True for o in e.optional_inputs}):
        rec = e.build(**opts)
        text = format_recurrence(rec)
        back = parse_recurrence(text)
        assert back == rec
        assert format_recurrence(back) == text


def _base():
    r = Builder("t")
    b, t, d, n = r.dim("b", "batch"), r.dim("t", "time"), r.dim("d"), r.dim("n")
    return r, b, t, d, n


def _err(fn, *pieces):
    with pytest.raises(IRError) as ei:
        fn()
    msg = str(ei.value)
    for p in pieces:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def test_verifier_names_the_state_and_dims_for_a_bad_injected_term():
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    y = r.input("y", [b, t, n])
    r.state("h", [b, d], diagonal(exp(x)), inject=x * y)
    r.output("o", [b, t, d], Node(Op.STATE, (), "h"))
    _err(r.build, "state 'h' (inject)", "['b', 'd', 'n']", "['n']")


def test_verifier_rejects_a_scalar_decay_over_feature_dims():
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    h = r.state("h", [b, d], scalar(exp(x)), inject=x)
    r.output("o", [b, t, d], h)
    _err(r.build, "state 'h' (scalar decay)", "a scalar decay")


def test_verifier_rejects_a_transition_that_reads_a_state():
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    h = Node(Op.STATE, (), "h")
    r.state("h", [b, d], diagonal(exp(h)), inject=x)
    r.output("o", [b, t, d], h)
    _err(r.build, "state 'h' (diagonal decay)", "not declared before this state")


@pytest.mark.parametrize("mutate, pieces", [
    (lambda r: r.dim("t2", "time"), ["exactly one dim must have role 'time'"]),
    (lambda r: r.dim("x", "feature"), ["input 'x'", "name already used by a dim"]),
    (lambda r: r.dim("w", "channel"), ["dim 'w'", "role 'channel'"]),
    (lambda r: r.dim("w", "feature", size=0), ["dim 'w'", "positive integer"]),
    (lambda r: r.dim("end"), ["reserved word"]),
    (lambda r: r.dim("bad name"), ["not a valid name"]),
    (lambda r: r.input("unused", ["b", "d"]), ["input 'unused'", "never used"]),
    (lambda r: r.input("q", ["b", "zz"]), ["input 'q'", "unknown dim 'zz'"]),
    (lambda r: r.dim("lonely"), ["dim 'lonely'", "has no size"]),
])
def test_verifier_errors_name_what_is_wrong(mutate, pieces):
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d, n])
    h = r.state("h", [b, d, n], diagonal(exp(x)), inject=x)
    r.output("o", [b, t, d, n], h)
    mutate(r)
    _err(r.build, *pieces)


@pytest.mark.parametrize("make, pieces", [
    (lambda x, h: rsum(x, "n"), ["reduces over dim 'n'", "['b', 'd']"]),
    (lambda x, h: Node(Op.INPUT, (), "nope"), ["unknown input 'nope'"]),
    (lambda x, h: Node(Op.PARAM, (), "later"), ["not a let bound earlier"]),
    (lambda x, h: Node(Op.FLIP, (x,), "n"), ["dim 'n' is not a dim of its operand"]),
    (lambda x, h: Node(Op.CLAMP, (x,), (1.0, 0.0)), ["clamp bounds"]),
    (lambda x, h: Node(Op.EXP, (x, x)), ["takes 1 operand"]),
])
def test_verifier_errors_for_bad_expression_nodes(make, pieces):
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    r.input("m", [n])
    h = r.state("h", [b, d], diagonal(exp(x)), inject=x)
    r.output("o", [b, t, d], h + make(x, h) + rsum(Node(Op.INPUT, (), "m"), "n"))
    _err(r.build, "output 'o'", *pieces)


def test_verifier_checks_structure_operands_and_axes():
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    r.input("k", [b, t, n])
    h = r.state("h", [b, d], householder("n", x, x), inject=x)
    r.output("o", [b, t, d], h)
    _err(r.build, "state 'h'", "axis 'n' is not one of the state dims")

    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d, n])
    h = r.state("h", [b, d, n], shift("n"), inject=x)
    r.output("o", [b, t, d], rsum(h, "n"))
    _err(r.build, "state 'h' (inject)", "one slot of the axis")

    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    c = r.input("c", [d])
    h = r.state("h", [b, d, n], companion("n", c), inject=x)
    r.output("o", [b, t, d], rsum(h, "n"))
    _err(r.build, "feedback row must vary along the axis 'n'")


def test_dense_transition_needs_a_column_dim_of_the_same_size():
    r = Builder("t")
    b, t, n, m = r.dim("b", "batch"), r.dim("t", "time"), r.dim("n"), r.dim("m")
    x = r.input("x", [b, t, n])
    M = r.input("M", [n, m])
    h = r.state("h", [b, n], dense("n", "m", M), inject=x)
    r.output("o", [b, t, n], h)
    rec = r.build()
    k = scancc.compile(rec)
    with pytest.raises(IRError, match="dense column dim 'm' has size 4, expected the size of 'n'"):
        k(np.zeros((1, 3, 3)), np.zeros((3, 4)))
    # and it computes h_t = M h_{t-1} + x_t
    rng = np.random.default_rng(0)
    xs, Mv = rng.standard_normal((2, 5, 3)), 0.5 * rng.standard_normal((3, 3))
    hh, want = np.zeros((2, 3)), []
    for i in range(5):
        hh = hh @ Mv.T + xs[:, i]
        want.append(hh)
    np.testing.assert_allclose(k(xs, Mv), np.stack(want, 1), rtol=1e-12)


def test_optional_dims_and_shape_errors_name_input_dim_expected_and_got():
    k = scancc.compile("mamba")
    b, d, T, n = 2, 4, 5, 3
    u = np.zeros((b, d, T))
    A = -np.ones((d, n))
    ok = k(u, u, A, np.zeros((b, n, T)), np.zeros((b, n, T)))  # groups dim left out
    assert ok.shape == (b, d, T)
    _err(lambda: k(u, u, A, np.zeros((b, n + 1, T)), np.zeros((b, n, T))),
         "input 'B'", "dim 'dstate' has size 4", "input 'A' gives dstate=3", "(2, 4, 5)")
    _err(lambda: k(u, u, A, np.zeros((b, n, T, 1, 1)), np.zeros((b, n, T))),
         "input 'B'", "expected 4 dims", "[batch, dstate, time]", "(2, 3, 5, 1, 1)")
    _err(lambda: k(u, u, A, np.zeros((b, 3, n, T)), np.zeros((b, 3, n, T))),
         "dim 'chan' (size 4) is not a multiple of groups dim 'groups' (size 3)")
    _err(lambda: k(u, u, A, np.zeros((b, n, T))), "missing input(s) ['C']")
    _err(lambda: k(u, u, A, u, u, bogus=u), "no input or option 'bogus'")
    _err(lambda: k(u, u, A.astype(np.int64), u[:, :n], u[:, :n]), "input 'A'", "floating dtype")
    _err(lambda: k(u, u, A, np.zeros((b, n, T)), np.zeros((b, n, T)),
                   initial_state=np.zeros((b, d, n + 1))),
         "initial_state 'x'", "dstate=3", "got (2, 4, 4)")


def test_unknown_options_are_rejected_with_the_known_ones():
    _err(lambda: scancc.compile("mamba2", dtsoftplus=True).ir, "takes no option(s) ['dtsoftplus']",
         "dt_softplus=False")


def test_registering_a_recurrence_in_python():
    @scancc.register("leaky_sum_test", hints={"x": "small"})
    def leaky(r, decay=0.5):
        """A leaky integrator."""
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        h = r.state("h", [b, d], scalar(const(decay)), inject=x)
        r.output("y", [b, t, d], h)

    try:
        assert "leaky_sum_test" in scancc.names()
        y = scancc.compile("leaky_sum_test", decay=0.25)(np.ones((1, 3, 1)))
        np.testing.assert_allclose(y[0, :, 0], [1, 1.25, 1.3125])
        with pytest.raises(scancc.RegistryError, match="already registered"):
            scancc.register("leaky_sum_test")(leaky)
        scancc.register("leaky_sum_test", override=True)(leaky)
        with pytest.raises(scancc.RegistryError, match="unknown sampling hints"):
            scancc.register("other_test", hints={"x": "gaussian"})(leaky)
    finally:
        scancc.unregister("leaky_sum_test")
        scancc.unregister("other_test")


# ---- the text form ----

def test_parse_errors_carry_line_and_column():
    text = format_recurrence(scancc.get("hgrn").build()).replace("exp(g)", "exp(g +)")
    with pytest.raises(ParseError) as ei:
        parse_recurrence(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "exp(g +)" in l)
    assert ei.value.line == line and "expected a number, a name or '('" in str(ei.value)
    assert ei.value.col == text.splitlines()[line - 1].index("+)") + 2  # 1-based, at ')'
    assert f"line {line}, col {ei.value.col}" in str(ei.value)


@pytest.mark.parametrize("expr, msg", [
    ("__import__('os')", "unexpected character"),
    ("os.system(1)", "unexpected character '.'"),
    ("eval(x)", "unknown function 'eval'"),
    ("x ** 2", "expected a number, a name or '('"),
    ("sum(x)", "needs at least one dim"),
    ("sum(x, x)", "'x' is not a dim"),
    ("y", "unknown name 'y'"),
    ("clamp(x, mid=1)", "takes keywords lo= and hi="),
    ("maximum(x)", "takes 2 argument(s), got 1"),
    ("", "empty expression"),
])
def test_expression_parser_is_a_whitelist(expr, msg):
    from scancc.ir import ExprParser
    p = ExprParser({"x": Node(Op.INPUT, (), "x")}.get, {"d"})
    with pytest.raises(ParseError, match=re.escape(msg)):
        p.parse(expr, 3)


def test_unknown_declarations_and_transitions_are_parse_errors():
    base = format_recurrence(scancc.get("hgrn").build())
    with pytest.raises(ParseError, match="unknown transition 'tridiagonal'"):
        parse_recurrence(base.replace("diagonal(decay=exp(g))", "tridiagonal(decay=exp(g))"))
    with pytest.raises(ParseError, match="diagonal\\(\\) takes decay, not 'axis'"):
        parse_recurrence(base.replace("diagonal(decay=exp(g))", "diagonal(axis=chan)"))
    with pytest.raises(ParseError, match="unknown declaration 'import'"):
        parse_recurrence(base.replace("end", "import os\nend"))


# ---- property tests ----

@st.composite
def diag_recurrences(draw):
    """A random diagonal/scalar recurrence with a random expression for the decay."""
    r = Builder("rand")
    b, t, h, d = r.dim("b", "batch"), r.dim("t", "time"), r.dim("h", "head"), r.dim("d")
    x = r.input("x", [b, t, h, d])
    gdims = draw(st.sampled_from([[b, t, h], [b, t, h, d], [h]]))
    g = r.input("g", gdims)
    kind = scalar if d not in gdims else draw(st.sampled_from([scalar, diagonal]))
    if kind is scalar and d in gdims:
        kind = diagonal
    gate = draw(st.sampled_from(["exp_neg_softplus", "sigmoid", "exp_logsigmoid"]))
    from scancc.ir import logsigmoid, sigmoid, softplus
    dec = {"exp_neg_softplus": lambda: exp(-softplus(g)), "sigmoid": lambda: sigmoid(g),
           "exp_logsigmoid": lambda: exp(logsigmoid(g))}[gate]()
    hs = r.state("s", [b, h, d], kind(dec), inject=x * draw(st.floats(0.1, 2.0)))
    r.output("y", [b, t, h, d], hs * 2.0 - x)
    return r.build(), gdims


@settings(max_examples=40, deadline=None)
@given(diag_recurrences(), st.integers(1, 9), st.integers(1, 3), st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_random_diagonal_recurrences_match_a_naive_loop(rd, T, H, D, seed):
    rec, gdims = rd
    rng = np.random.default_rng(seed)
    sizes = {"b": 2, "t": T, "h": H, "d": D}
    x = rng.standard_normal((2, T, H, D))
    g = rng.standard_normal(tuple(sizes[k] for k in gdims))
    gate = format_recurrence(rec)
    gf = np.broadcast_to(g.reshape(tuple(sizes[k] if k in gdims else 1 for k in "bthd")),
                         (2, T, H, D)) if "t" in gdims else np.broadcast_to(
        g.reshape(1, 1, H, 1), (2, T, H, D))
    if "softplus" in gate:
        a = np.exp(-np.logaddexp(0, gf))
    elif "logsigmoid" in gate:
        a = np.exp(-np.logaddexp(0, -gf))
    else:
        a = 1 / (1 + np.exp(-gf))
    c = float(re.search(r"\+ x \* ([0-9.e-]+)", gate).group(1))
    s, want = np.zeros((2, H, D)), np.empty((2, T, H, D))
    for i in range(T):
        s = a[:, i] * s + c * x[:, i]
        want[:, i] = 2 * s - x[:, i]
    got = scancc.compile(rec)(x, g)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert format_recurrence(parse_recurrence(format_recurrence(rec))) == gate


_leaf = st.sampled_from(["x", "g", "1.5", "-2.0", "iota(d)", "size(d)"])
_fn1 = st.sampled_from(["exp", "log", "softplus", "sigmoid", "logsigmoid", "silu", "sqrt",
                        "rsqrt"])


@st.composite
def exprs(draw, depth=3):
    if depth == 0 or draw(st.booleans()):
        return draw(_leaf)
    k = draw(st.integers(0, 5))
    a = draw(exprs(depth=depth - 1))
    if k == 0:
        return f"{draw(_fn1)}({a})"
    if k == 1:
        return f"-({a})"
    if k == 2:
        return f"sum({a}, d)"
    if k == 3:
        return f"clamp({a}, lo=-1.0, hi=2.5)"
    b = draw(exprs(depth=depth - 1))
    if k == 4:
        return f"maximum({a}, {b})"
    return f"({a}) {draw(st.sampled_from(['+', '-', '*', '/']))} ({b})"


@settings(max_examples=200, deadline=None)
@given(exprs())
def test_expression_print_parse_round_trip(text):
    from scancc.ir import ExprParser, format_expr
    p = ExprParser({"x": Node(Op.INPUT, (), "x"), "g": Node(Op.INPUT, (), "g")}.get, {"d"})
    node = p.parse(text)
    printed = format_expr(node)
    assert p.parse(printed) == node
    assert format_expr(p.parse(printed)) == printed


def test_numerics_attributes_round_trip_verify_and_enforce_the_input_dtype():
    r = Builder("n")
    b, t, d = r.dim("b", "batch"), r.dim("t", "time"), r.dim("d")
    x = r.input("x", [b, t, d])
    r.state("h", [b, d], identity(), inject=x)
    r.output("y", [b, t, d], Node(Op.STATE, (), "h"))
    r.numerics(accum="float32", state="float32", input="float32")
    rec = r.build()
    assert "numerics accum=float32 state=float32 input=float32" in format_recurrence(rec)
    assert parse_recurrence(format_recurrence(rec)) == rec
    k = scancc.compile(rec)
    np.testing.assert_allclose(k(np.ones((1, 3, 2), np.float32))[0, :, 0], [1, 2, 3])
    _err(lambda: k(np.ones((1, 3, 2))), "takes float32 inputs", "got float64")
    r.numerics(accum="int8")
    _err(r.build, "numerics", "accum dtype 'int8'")


def test_a_user_registration_cannot_silently_shadow_a_library_name():
    import subprocess
    import sys
    code = ("import scancc\n"
            "try:\n"
            "    @scancc.register('gla')\n"
            "    def gla(r): pass\n"
            "except scancc.RegistryError as e: print('rejected:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "rejected: recurrence 'gla' is already registered (from library)" in p.stdout, p.stderr


@pytest.mark.parametrize("mutate, where, label", [
    (lambda r, x, h: r.state("s", ["b", "d"], scalar(exp(x)), inject=x),
     ("state", "s", "transition", "decay"), "state 's' (scalar decay)"),
    (lambda r, x, h: r.state("s", ["b", "d"], diagonal(exp(x)),  # reads itself: no cascade
                             inject=x * Node(Op.STATE, (), "s")),
     ("state", "s", "inject"), "state 's' (inject), node state"),
    (lambda r, x, h: r.state("s", ["b", "t", "d"], diagonal(exp(x)), inject=x),
     ("state", "s", "dims"), "state 's'"),
    (lambda r, x, h: r.output("y", ["b", "d"], h), ("output", "y", "dims"), "output 'y'"),
    (lambda r, x, h: r.output("y", ["b", "t"], h), ("output", "y", "expr"), "output 'y'"),
    (lambda r, x, h: r.input("u", ["b", "t", "d"]), ("input", "u"), "input 'u'"),
    (lambda r, x, h: r.dim("w", "feature", size=0), ("dim", "w", "size"), "dim 'w'"),
    (lambda r, x, h: r.let("a", exp(Node(Op.INPUT, (), "nope"))), ("let", "a", "expr"),
     "let 'a', node input"),
    (lambda r, x, h: r.numerics(accum="float16"), ("numerics", "accum"), "numerics"),
])
def test_verify_error_carries_a_structured_location(mutate, where, label):
    r, b, t, d, n = _base()
    x = r.input("x", [b, t, d])
    h = r.state("h", [b, d], diagonal(exp(x)), inject=x)
    r.output("o", [b, t, d], h)
    mutate(r, x, h)
    with pytest.raises(VerifyError) as ei:
        r.build()
    assert ei.value.where == where and ei.value.label == label
    assert str(ei.value).startswith(f"recurrence 't', {label}: ")


def test_node_hash_and_equality_are_linear_in_a_shared_dag():
    """Derived backwards are DAGs sharing subtrees (bmojo's softmax VJP): a tree-walking hash
    or equality would take 2**48 steps on this one; cached per node it takes 48."""
    import pickle

    from scancc.ir.expr import Node, Op

    def build():
        x = Node(Op.INPUT, (), "x")
        for _ in range(48):
            x = x * x + x
        return x

    a, b = build(), build()
    assert a is not b and a == b and hash(a) == hash(b) and len({a: 1, b: 2}) == 1
    assert a != build() * 2.0
    # the cached hash never travels: str hashes differ between processes
    c = pickle.loads(pickle.dumps(a))
    assert "_hash" not in c.__dict__ and c == a and hash(c) == hash(a)
