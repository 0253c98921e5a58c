"""Triton imported in GPU mode (by another library, before scancc) on a machine without a
GPU: scancc switches it to the interpreter and kernels still give the reference results
(issue 10, item 9; docs/security.md)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the Triton backend needs torch (scancc[triton])")
if importlib.util.find_spec("triton") is None:
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

SCRIPT = r'''
import triton, triton.language  # another library imports triton first, in GPU mode
import numpy as np, torch, scancc
from scancc import backends, registry, testing
for name, sizes in [("hgrn", {"batch": 2, "time": 9, "chan": 5}),
                    ("simple_gla", None)]:
    entry = registry.get(name)
    rec = entry.build()
    if sizes is None:
        from scancc.ir import default_sizes
        sizes = dict(default_sizes(rec)); sizes["time"] = 20
    x = testing.sample_inputs(rec, sizes, 0, hints=entry.hints)
    ref = backends.get("reference").run(rec, x, sizes, None, False, {}).outputs
    out = backends.get("triton").run(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                                     sizes, None, False, {}).outputs
    for k in ref:
        testing.assert_close(out[k], ref[k], "float32", f"{name} {k}")
print("OK")
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_triton_imported_in_gpu_mode_first(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SCANCC_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
