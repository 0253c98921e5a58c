"""``scancc check`` (issue 10, item 13): recurrences with several outputs, --size, the
binary sampler."""
import numpy as np
import pytest
from scancc.ir import diagonal

import scancc
from scancc.check import check_backward, check_one
from scancc.cli import main
from scancc.sampling import SAMPLERS, sample_inputs


@pytest.fixture(scope="module")
def two_outputs():
    @scancc.register("test_two_out_ema", hints={"reset": "binary"}, override=True)
    def two_out_ema(r):
        """EMA with a reset flag and two outputs."""
        b, t, c = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x, reset = r.input("x", [b, t, c]), r.input("reset", [b, t, c])
        h = r.state("h", [b, c], diagonal(0.9 * (1 - reset)), inject=x)
        r.output("y", [b, t, c], h)
        r.output("z", [b, t, c], 2 * h + x)
    yield "test_two_out_ema"
    from scancc import registry
    registry._REGISTRY.pop("test_two_out_ema", None)  # other tests list every registration


@pytest.mark.parametrize("target", ["reference", "triton", "nki"])
def test_check_one_compares_every_output_of_a_two_output_recurrence(two_outputs, target):
    row = check_one(two_outputs, target, "float32", T=9)
    assert row.ok, row.note


def test_check_one_fails_when_the_second_output_is_off(two_outputs, monkeypatch):
    from scancc import check
    real = check.errors
    calls = []

    def spy(got, want):
        calls.append(got.shape)
        return real(got, want)
    monkeypatch.setattr(check, "errors", spy)
    assert check_one(two_outputs, "triton", "float32", T=9).ok
    assert len(calls) == 3  # y, z and the final state h


def test_check_backward_of_a_two_output_recurrence(two_outputs):
    row = check_backward(two_outputs, "triton", T=9)
    assert row.ok, row.note


def test_check_size_sets_a_dim(two_outputs, capsys):
    row = check_one(two_outputs, "reference", "float64", T=7, dim_sizes={"chan": 3})
    assert row.ok and "time=7 chan=3" in row.case
    assert main(["check", "gla", "--targets", "reference", "--T", "5", "--size", "key=3",
                 "--size", "value=2"]) == 0


def test_check_size_rejects_unknown_dims_and_bad_values():
    with pytest.raises(SystemExit, match="--size nope: not a dim"):
        main(["check", "gla", "--targets", "reference", "--size", "nope=3"])
    with pytest.raises(SystemExit, match="integer >= 1"):
        main(["check", "gla", "--targets", "reference", "--size", "key=0"])


def test_binary_sampler_draws_zero_one_flags(two_outputs):
    x = SAMPLERS["binary"](np.random.default_rng(0), (1000,))
    assert set(np.unique(x)) == {0.0, 1.0}
    rec = scancc.get(two_outputs).build()
    got = sample_inputs(rec, {"batch": 2, "time": 50, "chan": 4}, hints={"reset": "binary"})
    assert set(np.unique(got["reset"])) == {0.0, 1.0}


def test_a_builder_error_in_a_row_names_the_options():
    row = check_one("gla", "reference", "float64", T=4, scale="abc")
    assert not row.ok and "(options: scale='abc')" in row.note


def test_check_skips_a_dtype_the_backend_does_not_take(two_outputs, capsys):
    """Triton takes no float64 inputs: the row is skipped (named), not run and not failed."""
    row = check_one(two_outputs, "triton", "float64", T=5)
    assert row.skipped and not row.ok and "triton takes no float64 inputs" in row.note
    assert main(["check", "fir", "--targets", "triton", "--dtypes", "float64", "--T", "5"]) == 0
    out = capsys.readouterr().out
    assert "skipped: triton takes no float64" in out and "0 passed, 0 failed, 1 skipped" in out


def test_check_judges_nki_float64_at_float32_tolerance(two_outputs, monkeypatch):
    """NKI runs float64 arrays in float32 (no float64 on the hardware): the row is judged at
    float32's tolerance and says so; an error over float32's tolerance still fails."""
    row = check_one(two_outputs, "nki", "float64", T=9)
    assert row.ok and "nki computes float64 inputs in float32" in row.note, row.note
    from scancc import check
    monkeypatch.setattr(check, "errors", lambda got, want: (1e-3, 1e-3))
    row = check_one(two_outputs, "nki", "float64", T=9)
    assert not row.ok and "over tolerance" in row.note


def test_check_covers_the_grouped_value_heads_variants():
    """kda and gated_delta_net are checked with grouped_value_heads=True too (their own rows,
    the variant's IR: a qk_heads dim); a recurrence without the option gets no variant;
    with_variants=False and an explicit option give the defaults' rows only."""
    from scancc.check import run_check, variants
    rows = run_check(["kda", "gated_delta_net", "gla"], ["nki"], ["float32"], T=5)
    names = [r.recurrence for r in rows]
    assert names == ["kda", "kda (grouped_value_heads=True)", "gated_delta_net",
                     "gated_delta_net (grouped_value_heads=True)", "gla"]
    assert all(r.ok for r in rows), [(r.recurrence, r.note) for r in rows]
    for r in rows:
        assert ("qk_heads=" in r.case) == ("grouped" in r.recurrence), r.case
    assert variants("gla") == [{}]
    assert variants("kda", {"grouped_value_heads": False}) == [{}]
    rows = run_check(["kda"], ["reference"], ["float32"], T=3, with_variants=False)
    assert [r.recurrence for r in rows] == ["kda"]
    assert main(["check", "kda", "--targets", "reference", "--T", "3", "--no-variants"]) == 0
