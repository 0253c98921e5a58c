"""Shared fixtures."""
import importlib.util
import pathlib

import pytest
import scancc

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gated_iir():
    """examples/gated_iir.py registered (the documented custom recurrence), unregistered after."""
    spec = importlib.util.spec_from_file_location("gated_iir_example",
                                                  ROOT / "examples" / "gated_iir.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield scancc.get("gated_iir")
    scancc.unregister("gated_iir")
