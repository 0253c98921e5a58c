"""The command line, run as a user runs it."""
import subprocess
import sys

import pytest
import scancc
from scancc.cli import main
from scancc.ir import parse_recurrence


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
