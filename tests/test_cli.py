"""The command line, run as a user runs it."""
import subprocess
import sys

import pytest
import scancc
from scancc.cli import main
from scancc.ir import const, parse_recurrence, scalar


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "scancc", *args], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_list_shows_every_library_recurrence_with_its_structures():
    rc, out, _ = cli("list")
    assert rc == 0
    for n in scancc.names():
        assert n in out
    assert "S:householder" in out and "w:companion" in out


def test_show_prints_parseable_ir_with_options(capsys):
    assert main(["show", "mamba2", "--option", "dt_softplus=true", "--option", "D=true"]) == 0
    out = capsys.readouterr().out
    assert parse_recurrence(out) == scancc.get("mamba2").build(dt_softplus=True, D=True)


def test_compile_reference_writes_the_ir(tmp_path):
    f = tmp_path / "k.txt"
    assert main(["compile", "hgrn", "-o", str(f)]) == 0
    assert parse_recurrence(f.read_text()) == scancc.get("hgrn").build()


def test_check_prints_a_table_and_summary():
    rc, out, err = cli("check", "fir", "iir", "--targets", "reference", "--T", "9")
    assert rc == 0, err
    assert "fir" in out and "iir" in out and "2 passed, 0 failed" in out
    assert "[1/2] fir reference" in err  # progress on stderr


def test_check_backward_compares_gradients_of_a_target():
    rc, out, err = cli("check", "iir", "hgrn", "--backward", "--targets", "reference,nki",
                       "--T", "11")
    assert rc == 0, out + err
    assert "2 passed, 0 failed" in out and "backward" in err
    assert out.count("nki") == 2 and "reference  " not in out  # the reference is the truth


def test_check_backward_rows_fail_when_gradients_differ(monkeypatch):
    """A backward kernel that is off makes its row fail (the check can fail)."""
    from scancc import autograd, check
    real = autograd.backward

    def off(rec, x, dy, h0, dh, chunk, target):
        g, gi = real(rec, x, dy, h0, dh, chunk, target)
        if target != "reference":
            g = {k: v * (1 + 1e-3) for k, v in g.items()}
        return g, gi
    monkeypatch.setattr(autograd, "backward", off)
    row = check.check_backward("hgrn", "nki", T=7)
    assert not row.ok and "over tolerance" in row.note


@pytest.mark.parametrize("args, msg", [
    (["show", "nope"], "no recurrence named 'nope'"),
    (["show", "gla", "--option", "scale"], "--option expects KEY=VALUE"),
    (["show", "gla", "--option", "sacle=1"], "takes no option(s) ['sacle']"),
    (["check", "gla", "--targets", "cuda"], "unknown backend 'cuda'"),
    (["show", "missing.yaml"], "missing.yaml"),
])
def test_errors_exit_nonzero_with_a_message(args, msg):
    rc, out, err = cli(*args)
    assert rc != 0 and msg in err, err


def test_help_everywhere():
    for sub in ([], ["list"], ["show"], ["compile"], ["check"], ["backends"]):
        rc, out, _ = cli(*sub, "--help")
        assert rc == 0 and "usage: scancc" in out
    for sub in ("compile", "check"):
        assert "--backend-option" in cli(sub, "--help")[1]


def test_show_and_compile_the_backward_recurrence(capsys, tmp_path):
    assert main(["show", "simple_gla", "--backward"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("recurrence simple_gla_bwd") and "prev(nu_S)" in text
    assert parse_recurrence(text).name == "simple_gla_bwd"
    f = tmp_path / "bwd.txt"
    assert main(["compile", "mamba2", "--backward", "-o", str(f)]) == 0
    assert "output grad_B" in f.read_text() and "ungroup(" in f.read_text()
    rc, out, _ = cli("show", "fir", "--backward")
    assert rc == 0 and "shift_adjoint(axis=width)" in out


def test_compile_takes_backend_options_by_option_or_backend_option(tmp_path, capsys):
    """`--option chip=trn2` (no recurrence option has that name) and `--backend-option` both
    reach the NKI plan: a key dim too big for trn1's SBUF compiles on trn2 (delta_net: key is
    the householder axis, never split into an outer loop)."""
    huge = "sizes={batch: 2, time: 8, heads: 2, key: 6000, value: 12}"
    f = tmp_path / "k.py"
    for chip in (["--option", "chip=trn2"], ["--backend-option", "nki.chip=trn2"],
                 ["--backend-option", "chip=trn2"]):
        assert main(["compile", "delta_net", "--target", "nki", *chip, "--backend-option", huge,
                     "-o", str(f)]) == 0
        assert "nki.jit" in f.read_text()
    assert main(["compile", "delta_net", "--target", "nki", "--backend-option", huge]) == 2
    assert "180224 B" in capsys.readouterr().err


def test_check_passes_backend_options_to_their_target_only(monkeypatch):
    from scancc import backends
    nki = backends.get("nki")
    seen = []
    real = nki.run

    def run(rec, inputs, sizes, init, final, options):
        seen.append(dict(options))
        return real(rec, inputs, sizes, init, final, options)
    monkeypatch.setattr(nki, "run", run)
    assert main(["check", "mamba2", "--targets", "reference,nki", "--T", "5",
                 "--option", "chip=trn2", "--option", "dt_softplus=true",
                 "--backend-option", "nki.time_tile=4"]) == 0
    assert seen and seen[0]["chip"] == "trn2" and seen[0]["time_tile"] == 4


@pytest.mark.parametrize("args, msg", [
    (["compile", "mamba2", "--target", "nki", "--option", "chip=trn3"],
     "backend 'nki', recurrence 'mamba2': option chip='trn3': expected one of 'trn1', 'trn2'"),
    (["compile", "mamba2", "--option", "dt_softplus=yes please"],
     "recurrence 'mamba2': option dt_softplus='yes please': expected a boolean"),
    (["compile", "mamba2", "--target", "nki", "--backend-option", "triton.num_warps=8"],
     "'triton' is not a target here"),
    (["compile", "mamba2", "--target", "nki", "--backend-option", "num_warps=8"],
     "no target here has a backend option 'num_warps' (backend options: nki: chip,"),
    (["compile", "mamba2", "--target", "nki", "--backend-option", "chip"],
     "--backend-option expects KEY=VALUE"),
    (["check", "mamba2", "--targets", "reference,nki", "--backend-option", "nki.chips=trn2"],
     "no target here has a backend option 'chips'"),
])
def test_option_errors_name_option_owner_expected_and_got(args, msg, capsys):
    try:
        rc = main(args)
    except SystemExit as e:  # argument errors exit with their message
        rc, err = 2, str(e)
    else:
        err = capsys.readouterr().err
    assert rc != 0 and msg in err, err


def test_an_option_both_a_recurrence_and_a_backend_has_is_refused(capsys):
    @scancc.register("cli_test_chip", override=True)
    def _chip(r, chip=0.5):
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        r.output("y", [b, t, d], r.state("h", [b, d], scalar(const(chip)), inject=x))
    try:
        with pytest.raises(SystemExit, match="both a recurrence option and a nki backend "
                                             "option; give the backend's with --backend-opt"):
            main(["compile", "cli_test_chip", "--target", "nki", "--option", "chip=0.25"])
        # with the backend's given by --backend-option, --option is the recurrence's
        assert main(["compile", "cli_test_chip", "--target", "nki", "--option", "chip=0.25",
                     "--backend-option", "chip=trn2"]) == 0
        assert "0.25" in capsys.readouterr().out
        assert main(["show", "cli_test_chip", "--option", "chip=0.25"]) == 0
        assert "0.25" in capsys.readouterr().out
    finally:
        scancc.unregister("cli_test_chip")


def test_backends_lists_the_declared_options(capsys):
    assert main(["backends", "--options"]) == 0
    out = capsys.readouterr().out
    assert "    chip           one of 'trn1', 'trn2' (default 'trn1'): " in out
    assert "    num_warps      one of 1, 2, 4, 8, 16, 32 (default 4): " in out


# issue 10, item 8: bad CLI values get an error naming what is wrong


def test_option_value_a_builder_rejects_names_the_option(capsys):
    assert main(["show", "gla", "--option", "scale=abc"]) == 2
    err = capsys.readouterr().err
    assert "--option scale='abc'" in err and "gla" in err


def test_option_sizes_missing_dims_are_named(capsys):
    assert main(["compile", "gla", "--target", "nki", "--option", "sizes={time: 128}"]) == 2
    err = capsys.readouterr().err
    assert "sizes=" in err and "a size for every dim" in err and "batch" in err


def test_check_rejects_an_unknown_dtype_with_the_known_names():
    with pytest.raises(SystemExit, match=r"unknown dtype 'fp32' \(known: float64, float32"):
        main(["check", "fir", "--targets", "reference", "--dtypes", "fp32"])


@pytest.mark.parametrize("T", ["0", "-3"])
def test_check_rejects_a_sequence_length_below_one(T):
    with pytest.raises(SystemExit, match="--T must be at least 1"):
        main(["check", "gla", "--targets", "reference", "--T", T])


# issue 10, item 14: a recurrence registered in Python reaches the CLI by importing its module

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "gated_iir.py"


def cli_in(cwd, *args):
    p = subprocess.run([sys.executable, "-m", "scancc", *args], capture_output=True, text=True,
                       timeout=300, cwd=cwd, check=False)
    return p.returncode, p.stdout, p.stderr


def test_a_py_path_as_name_is_imported_and_its_recurrence_used(tmp_path):
    rc, out, err = cli_in(tmp_path, "show", str(EXAMPLE))
    assert rc == 0, err
    assert out.startswith("recurrence gated_iir")
    rc, out, err = cli_in(tmp_path, "check", str(EXAMPLE), "--targets", "reference", "--T", "7")
    assert rc == 0 and "gated_iir" in out and "1 passed" in out, out + err


def test_import_flag_by_module_name_and_by_path(tmp_path):
    root = EXAMPLE.parents[1]
    rc, out, err = cli_in(root, "list", "--import", "examples.gated_iir")
    assert rc == 0 and "gated_iir" in out and "w:companion" in out, err
    rc, out, err = cli_in(tmp_path, "compile", "gated_iir", "--import", str(EXAMPLE))
    assert rc == 0 and out.startswith("recurrence gated_iir"), err
    rc, out, err = cli_in(tmp_path, "show", "gated_iir")  # without the import: unknown
    assert rc != 0


def test_import_errors_are_said_plainly(tmp_path):
    rc, _, err = cli_in(tmp_path, "show", "x", "--import", "no_such_module_here")
    assert rc != 0 and "--import no_such_module_here: ModuleNotFoundError" in err
    rc, _, err = cli_in(tmp_path, "show", str(tmp_path / "missing.py"))
    assert rc != 0 and "no such file" in err


# issue 10, item 15: list/show say the options and optional inputs; the README snippet runs


def test_list_shows_options_and_optional_inputs():
    rc, out, err = cli("list")
    assert rc == 0, err
    assert "options" in out.splitlines()[0]
    row = next(ln for ln in out.splitlines() if ln.startswith("mamba2 "))
    assert "[optional: D, z, dt_bias]" in row and "dt_softplus=False" in row


def test_show_says_options_and_optional_inputs_as_comments(capsys):
    assert main(["show", "mamba2"]) == 0
    out = capsys.readouterr().out
    assert "# options (--option KEY=VALUE; defaults): dt_softplus=False" in out
    assert "# optional inputs (--option NAME=true to include): D, z, dt_bias" in out
    assert parse_recurrence(out) == scancc.get("mamba2").build()  # still parses


def test_readme_python_snippet_runs_as_written():
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Use\n\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert "sample_inputs" in block
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README, as a user runs it
