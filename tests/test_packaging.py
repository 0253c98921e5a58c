"""Packaging: every package folder is installed under the one `scancc` namespace."""
import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREFIX = {"scancc": "scancc", "ir": "scancc.ir", "backends": "scancc.backends"}


def _package_folders():
    for top, name in PREFIX.items():
        for init in sorted((ROOT / top).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / top).parts
            yield ".".join((name,) + rel)


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    missing = sorted(set(_package_folders()) - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_ir_and_backends_refuse_bare_imports():
    for top in ("ir", "backends"):
        p = subprocess.run([sys.executable, "-c", f"import {top}"], cwd=ROOT,
                           capture_output=True, text=True)
        assert p.returncode != 0 and f"import this package as scancc.{top}" in p.stderr


@pytest.mark.slow
def test_built_wheel_contains_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    whl = next(tmp_path.glob("scancc-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    for pkg in _package_folders():
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
