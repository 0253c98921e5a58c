"""torch.compile of the torch backend's generated functions (issue 16: "torch.compile-friendly,
no data-dependent Python control flow on tensor values"): ``fullgraph=True`` fails on any
graph break, so one chunked (matmul form), one recurrent (step loop) and the iir closed form
each trace to a single graph; the compiled function's output equals the float64 reference
(independent truth). Dynamo's ``eager`` backend: the graph capture is what is tested, not
inductor's code generation (measured in benchmarks/bench_torch_cpu.py --compile)."""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc import backends
from scancc.testing import default_sizes, sample_inputs, sample_state

torch = pytest.importorskip("torch")
pytest.importorskip("torch._dynamo")

CASES = [("simple_gla", "chunked"), ("mamba", "recurrent"), ("iir", "chunked")]


@pytest.mark.parametrize("name,algo", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_fullgraph_compiles_and_equals_the_reference(name, algo):
    rec = scancc.get(name).build()
    fn, got_algo = backends.get("torch").compiled(rec, {"algorithm": algo})
    assert got_algo == algo
    sizes = default_sizes(rec, time=19)  # chunk 8: two full chunks and a ragged one
    x = sample_inputs(rec, sizes, 0, scancc.get(name).hints)
    if name == "iir":
        x["a"][:, 0] = 1.0
    h0 = sample_state(rec, sizes, 1)
    args = [torch.from_numpy(x[i.name].astype(np.float32)) for i in rec.inputs]
    init = {k: torch.from_numpy(v.astype(np.float32)) for k, v in h0.items()}
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    ys, hs = compiled(*args, dict(sizes), init, True, chunk=8)
    ref = scancc.compile(name, "reference")
    wy, wh = ref(**{k: v.astype(np.float64) for k, v in x.items()},
                 initial_state={k: v.astype(np.float64) for k, v in h0.items()},
                 output_final_state=True)
    wy = wy if isinstance(wy, dict) else {rec.outputs[0].name: wy}
    wh = wh if isinstance(wh, dict) else {rec.states[0].name: wh}
    for k, want in list(wy.items()) + list(wh.items()):
        got = (ys | hs)[k].double().numpy()
        assert np.isfinite(got).all(), k
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=k)
