"""Options: backend options are declared (``backends.base.Option``) and checked by one function,
in their own namespace (``compile(..., options={...})``); recurrence options are typed on the
Python path as strictly as in YAML specs. Every bad case names the option, its owner, what was
expected and what came."""
import importlib.util
import inspect

import numpy as np
import pytest

import scancc
from scancc import backends
from scancc.backends.base import Option, OptionError, check_options
from scancc.backends.nki import PlanError
from scancc.spec import SpecError, parse_spec
from scancc.testing import assert_close, default_sizes, sample_inputs

HAS_TRITON = importlib.util.find_spec("triton") is not None and \
    importlib.util.find_spec("torch") is not None


@pytest.fixture
def registered():
    """Register recurrences for one test; unregistered after it."""
    names = []

    def reg(name, f, **kw):
        scancc.register(name, override=True, **kw)(f)
        names.append(name)
        return scancc.get(name)
    yield reg
    for n in names:
        scancc.unregister(n)


# ---- declarations ----

@pytest.mark.parametrize("target", backends.names())
def test_every_backend_declares_its_options(target):
    be = backends.get(target)
    for name, opt in be.options.items():
        assert isinstance(opt, Option) and opt.name == name and opt.doc, name
        value, problem = opt.convert(opt.default)  # the default is an accepted value
        assert problem is None, (target, name, problem)


def test_no_backend_option_collides_with_compile_or_a_recurrence_option():
    """A loose keyword is unambiguous for every library recurrence and backend, and no backend
    option is named like compile()'s own parameters or a backend (options= may be keyed by
    backend name)."""
    own = set(inspect.signature(scancc.compile).parameters) - {"kwargs"}
    assert own == {"what", "target", "options"}
    rec_opts = {k for n in scancc.names() for k in scancc.get(n).defaults}
    for target in backends.names():
        names = set(backends.get(target).options)
        assert not names & own, (target, names & own)
        assert not names & rec_opts, (target, names & rec_opts)
        assert not names & set(backends.names()), target


def test_the_issue_repro_nki_chip_from_the_api():
    """`compile("mamba2", "nki", target="trn2")` could not be written; the chip is `chip`."""
    for k in (scancc.compile("mamba2", "nki", chip="trn2"),
              scancc.compile("mamba2", target="nki", options={"chip": "trn2"}),
              scancc.compile("mamba2", target="nki", options={"nki": {"chip": "trn2"}})):
        assert k.backend_options == {"chip": "trn2"} and k.options == {}


def test_chip_selects_the_sbuf_budget():
    """A key dim too big for trn1's SBUF renders on trn2: the option reaches the plan."""
    rec = scancc.get("delta_net").build()  # key: the householder axis, never split
    huge = default_sizes(rec, time=8, key=6000)
    with pytest.raises(PlanError, match="180224 B"):
        scancc.compile("delta_net", target="nki", sizes=huge).source
    assert "nki.jit" in scancc.compile("delta_net", target="nki",
                                       options={"chip": "trn2", "sizes": huge}).source


def test_nki_options_run_against_the_reference():
    e = scancc.get("mamba2")
    k = scancc.compile("mamba2", target="nki", dt_softplus=True,
                       options={"chip": "trn2", "algorithm": "recurrent", "loop_order": "time",
                                "runner": "emulator"})
    ref = scancc.compile("mamba2", dt_softplus=True)
    x = sample_inputs(k.ir, default_sizes(k.ir, time=21), 3, e.hints)
    assert_close(k(**x), ref(**x), "float32", "mamba2 on nki (chip trn2, recurrent)")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton and torch (scancc[triton])")
def test_triton_options_run_against_the_reference():
    e = scancc.get("simple_gla")
    k = scancc.compile("simple_gla", "triton", algorithm="chunked", num_warps=2,
                       dot_precision="ieee", block_sizes={"time": 16})
    x = sample_inputs(k.ir, default_sizes(k.ir, time=37), 4, e.hints)
    x = {n: v.astype(np.float32) for n, v in x.items()}
    assert_close(k(**x), scancc.compile("simple_gla")(**x), "float32", "simple_gla chunked")


# (target, options, fragments every error must contain)
BAD_BACKEND_OPTIONS = [
    ("nki", {"chip": "trn3"}, ["'nki'", "chip='trn3'", "one of 'trn1', 'trn2'", "got str"]),
    ("nki", {"time_tile": 0}, ["time_tile=0", "a positive integer", "got int 0"]),
    ("nki", {"time_tile": "64"}, ["time_tile='64'", "an integer", "got str '64'"]),
    ("nki", {"runner": "gpu"}, ["runner='gpu'", "'emulator'"]),
    ("nki", {"algorithm": "scan"}, ["algorithm='scan'", "'auto', 'recurrent', 'chunked'"]),
    ("nki", {"loop_order": "inner"}, ["loop_order='inner'", "'outer', 'time'"]),
    ("nki", {"dtype": "float64"}, ["dtype='float64'", "'bfloat16'"]),
    ("nki", {"sizes": {"nope": 3}}, ["sizes=", "'nope', not a dim"]),
    ("nki", {"sizes": {"time": 3}}, ["sizes={'time': 3}", "a size for every dim of 'mamba'",
                                     "none for batch, chan"]),
    ("nki", {"initial_state": "yes"}, ["initial_state='yes'", "a boolean"]),
    ("triton", {"num_warps": 3}, ["'triton'", "num_warps=3", "one of 1, 2, 4, 8, 16, 32"]),
    ("triton", {"num_warps": True}, ["num_warps=True", "one of 1, 2", "got bool True"]),
    ("triton", {"dot_precision": "fast"}, ["dot_precision='fast'", "'ieee', 'tf32x3'"]),
    ("triton", {"algorithm": "bogus"}, ["algorithm='bogus'", "'recurrent'"]),
    ("triton", {"block_sizes": [16]}, ["block_sizes=[16]", "a dict", "got list"]),
    ("triton", {"block_sizes": {"time": 12}}, ["block_sizes['time']=12", "a power of two"]),
    ("triton", {"block_sizes": {"value": 16}}, ["'value', not a dim", "dims: batch"]),
]


@pytest.mark.parametrize("target,options,fragments", BAD_BACKEND_OPTIONS,
                         ids=[f"{t}-{next(iter(o))}" for t, o, _ in BAD_BACKEND_OPTIONS])
def test_bad_backend_options_are_named(target, options, fragments):
    """Each bad value fails at compile() (explicit or loose) and in supports(), with the
    backend, the recurrence, the option, expected and got."""
    name = "mamba"
    for kw in ({"options": options}, options):
        with pytest.raises(OptionError) as e:
            scancc.compile(name, target, **kw)
        msg = str(e.value)
        assert f"'{name}'" in msg and f"backend {target!r}" in msg, msg
        for frag in fragments:
            assert frag in msg, (frag, msg)
        assert e.value.option == next(iter(options))
    ok, why = backends.get(target).supports(scancc.get(name).build(), options)
    assert not ok and fragments[0] in why


def test_unknown_backend_option_lists_the_known_ones():
    with pytest.raises(scancc.InputError, match=r"takes no option\(s\) \['chips'\].*nki backend "
                                                r"options: chip, time_tile"):
        scancc.compile("hgrn", target="nki", chips="trn2")
    with pytest.raises(OptionError, match="no nki backend option 'chips' .*options: chip,"):
        scancc.compile("hgrn", target="nki", options={"chips": "trn2"})
    with pytest.raises(OptionError, match="no reference backend option 'chip'"):
        scancc.compile("hgrn", "reference", options={"chip": "trn2"})
    with pytest.raises(scancc.InputError, match="with target='auto', give backend options by "
                                                "backend name"):
        scancc.compile("hgrn", options={"chip": "trn2"})


def test_options_by_backend_name_apply_to_their_target_only():
    opts = {"nki": {"chip": "trn2", "time_tile": 16}, "triton": {"num_warps": 8}}
    assert scancc.compile("hgrn", "nki", options=opts).backend_options == opts["nki"]
    assert scancc.compile("hgrn", "reference", options=opts).backend_options == {}
    with pytest.raises(scancc.InputError, match="not both"):
        scancc.compile("hgrn", "nki", options={"nki": {}, "chip": "trn2"})
    with pytest.raises(scancc.InputError, match="expected a dict of backend options"):
        scancc.compile("hgrn", "nki", options=["chip"])
    with pytest.raises(scancc.InputError, match=r"\['chip'\] given twice"):
        scancc.compile("hgrn", "nki", chip="trn1", options={"chip": "trn2"})


def test_a_recurrence_option_named_like_a_backend_option(registered):
    """Loose keywords go to the recurrence; where a backend option has the same name the
    keyword is ambiguous, and options= says which."""
    def leaky(r, chip=0.5):
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        h = r.state("h", [b, d], scancc.ir.scalar(scancc.ir.const(chip)), inject=x)
        r.output("y", [b, t, d], h)
    registered("opt_test_chip", leaky)
    assert scancc.compile("opt_test_chip", "reference", chip=0.25).options == {"chip": 0.25}
    with pytest.raises(scancc.InputError, match=r"\['chip'\] name both .* options=\{'chip'"):
        scancc.compile("opt_test_chip", "nki", chip=0.25)
    k = scancc.compile("opt_test_chip", "nki", chip=0.25, options={"chip": "trn2"})
    assert k.options == {"chip": 0.25} and k.backend_options == {"chip": "trn2"}


def test_check_options_without_a_recurrence():
    """By name only (no IR at hand): declared types and choices still hold; rules that need
    the recurrence's dims are skipped."""
    tb = backends.get("triton")
    assert tb.check_options("mamba", {"block_sizes": {"anything": 8}}) == {
        "block_sizes": {"anything": 8}}
    with pytest.raises(OptionError, match="recurrence 'mamba'.*block_sizes\\['x'\\]=3"):
        tb.check_options("mamba", {"block_sizes": {"x": 3}})
    assert tb.algorithms() == ("recurrent", "chunked", "staged", "scan", "window")
    assert backends.get("nki").algorithms() == ("recurrent", "chunked")
    assert backends.get("reference").algorithms() == ()


# ---- recurrence options: typed by their default (or annotation), YAML and Python alike ----

BAD_RECURRENCE_OPTIONS = [
    ("mamba2", {"dt_softplus": "false"}, "expected a boolean like its default False, got str "
                                         "'false'"),
    ("mamba2", {"dt_softplus": 1}, "expected a boolean like its default False, got int 1"),
    ("mamba2", {"dt_limit": 6.0}, "dt_limit=6.0: expected a list like its default (0.0, inf)"),
    ("mamba", {"delta_softplus": "true"}, "delta_softplus='true': expected a boolean"),
    ("swa", {"window": 2.5}, "window=2.5: expected an integer like its default 4, got float"),
    ("swa", {"window": True}, "window=True: expected an integer like its default 4, got bool"),
    ("delta_net", {"use_qk_l2norm_in_kernel": "yes"}, "expected a boolean"),
]


@pytest.mark.parametrize("name,options,fragment", BAD_RECURRENCE_OPTIONS,
                         ids=[f"{n}-{next(iter(o))}" for n, o, _ in BAD_RECURRENCE_OPTIONS])
def test_bad_recurrence_options_are_rejected_on_the_python_path(name, options, fragment):
    with pytest.raises(OptionError) as e:
        scancc.compile(name, **options)
    assert str(e.value).startswith(f"recurrence {name!r}: option ") and fragment in str(e.value)
    with pytest.raises(OptionError, match=fragment.split(":")[0]):
        scancc.get(name).build(**options)


def test_issue_repro_dt_softplus_string_is_rejected_at_call_time_too():
    """`dt_softplus="false"` used to apply softplus (a non-empty string is truthy)."""
    k = scancc.compile("mamba2")
    x = sample_inputs(k.ir, default_sizes(k.ir, time=5), 0, scancc.get("mamba2").hints)
    with pytest.raises(OptionError, match="dt_softplus='false': expected a boolean"):
        k(**x, dt_softplus="false")
    np.testing.assert_array_equal(k(**x, dt_softplus=False), k(**x))


def test_good_recurrence_options_are_converted_like_yaml():
    e = scancc.get("mamba2")
    # a list is a tuple (as in YAML), None keeps meaning "off"
    assert e.build(dt_limit=[0.0, 6.0]) == e.build(dt_limit=(0.0, 6.0))
    assert e.build(dt_limit=None) != e.build()
    assert scancc.get("swa").build(window=3).dim("window").size == 3
    assert scancc.get("swa").build(window=np.int64(3)) == scancc.get("swa").build(window=3)
    assert scancc.compile("hgrn", "nki", time_tile=np.int64(16)).backend_options == {
        "time_tile": 16}
    # scale defaults to None and has no declared type: the builder takes numbers
    assert scancc.get("gla").build(scale=0.5) == scancc.get("gla").build(scale=0.5)


def test_the_same_check_in_yaml_and_python():
    with pytest.raises(SpecError) as y:
        parse_spec("use: mamba2\noptions:\n  dt_softplus: 'false'\n", "m.yaml")
    with pytest.raises(OptionError) as p:
        scancc.get("mamba2").build(dt_softplus="false")
    assert "m.yaml:3" in str(y.value)
    want = "dt_softplus': expected a boolean like its default False"
    assert want in str(y.value) and "dt_softplus='false': expected a boolean like its " \
        "default False" in str(p.value)


def test_annotations_declare_option_types(registered):
    """An annotation types an option whose default cannot (``gain: float | None = None``);
    an int is a fine float and becomes one."""
    seen = {}

    def annotated(r, gain: float | None = None, mode: str = "plain", taps: tuple = (1, 2)):
        seen.update(gain=gain, taps=taps)
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        g = 0.5 if gain is None else gain
        h = r.state("h", [b, d], scancc.ir.scalar(scancc.ir.const(g)), inject=x)
        r.output("y", [b, t, d], h)
    e = registered("opt_test_annotated", annotated)
    assert e.types == {"gain": (float,), "mode": (str,), "taps": (tuple,)}
    e.build(gain=2, taps=[3])
    assert seen == {"gain": 2.0, "taps": (3,)} and isinstance(seen["gain"], float)
    e.build(gain=None)
    with pytest.raises(OptionError, match=r"'opt_test_annotated': option gain='0.5': expected "
                                          r"a number, got str '0.5'"):
        e.build(gain="0.5")
    with pytest.raises(OptionError, match="mode=3: expected a string like its default 'plain'"):
        e.build(mode=3)


def test_check_options_is_one_function_for_both():
    decl = {"n": Option("n", "a count", 1, (int,)), "how": Option("how", "", "a", (str,),
                                                                   ("a", "b"))}
    assert check_options("thing 'x'", decl, {"n": 3, "how": "b"}) == {"n": 3, "how": "b"}
    with pytest.raises(OptionError, match=r"^thing 'x': option how='c': expected one of 'a', "
                                          r"'b', got str 'c'$"):
        check_options("thing 'x'", decl, {"how": "c"})
    with pytest.raises(OptionError, match=r"^thing 'x': no option 'm' \(options: n, how\)$"):
        check_options("thing 'x'", decl, {"m": 1})
