"""The key-diagonal intra-chunk pair tile by halving levels (backends/triton/chunked.py
``Lowering._diagonal_pairs``; fused kernel and staged stage 3) against the float64 reference:
64-step chunks (six levels, h = 32 ... 1), hard resets (log-gates of -inf) in single key columns
at the steps where the levels split (15/16, 31/32, 47/48, the chunk's last and first), a
very negative but finite gate, an initial state, a partial last chunk; gla (readout of S),
hgrn2 (tied k = 1 - exp(g)) and rwkv6 (readout of prev(S): strict mask, c_(t-1))."""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc import backends, testing
from scancc.ir.passes import chunked

torch = pytest.importorskip("torch")
TRI = backends.get("triton")
if not TRI.available()[0]:
    pytest.skip("triton does not run here", allow_module_level=True)
REF = backends.get("reference")

# (step, key column) of each hard reset; the 64-step chunk's level boundaries and its ends
RESETS = [(0, 0), (15, 1), (16, 2), (31, 0), (32, 3), (33, 1), (47, 2), (48, 0), (63, 3),
          (64, 1), (95, 2), (96, 0)]


def _case(name, T=130):
    e = scancc.get(name)
    rec = e.build()
    sizes = testing.default_sizes(rec, time=T)
    x = testing.sample_inputs(rec, sizes, 4, e.hints)
    x = {k: np.asarray(v, dtype=np.float32) for k, v in x.items()}
    cs = chunked.analyze(rec, prev=True).only()
    g = (cs.log_decay if cs.decay_is_exp else cs.decay).arg  # the log-gate input
    assert rec.input(g).dims == ("batch", "time", "heads", "key")
    for t, kcol in RESETS:
        x[g][0, t, :, kcol % x[g].shape[3]] = -np.inf
    x[g][1, 40, 0, 0] = -80.0  # finite, above RESET_LOG_DECAY: a decay of e^-80 inside a level
    s = rec.states[0]
    h0 = {s.name: np.random.default_rng(5).standard_normal(
        [sizes[d] for d in s.dims]).astype(np.float32)}
    return rec, sizes, x, h0


@pytest.mark.parametrize("algorithm", ["chunked", "staged"])
@pytest.mark.parametrize("name", ["gla", "hgrn2", "rwkv6"])
def test_levels_with_resets_at_the_split_steps_match_the_reference(name, algorithm):
    rec, sizes, x, h0 = _case(name)
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    th = {k: torch.from_numpy(v) for k, v in h0.items()}
    r = TRI.run(rec, tx, sizes, th, True, {"algorithm": algorithm, "dot_precision": "ieee",
                                            "block_sizes": {"time": 64}})
    ref = REF.run(rec, {k: v.astype(np.float64) for k, v in x.items()}, sizes,
                  {k: v.astype(np.float64) for k, v in h0.items()}, True, {})
    o, s = rec.outputs[0].name, rec.states[0].name
    out = r.outputs[o].float().numpy()
    assert np.isfinite(out).all(), f"{name} {algorithm}: a reset gave non-finite outputs"
    testing.assert_close(out, ref.outputs[o], "float32", f"{name} {algorithm} output", T=130)
    testing.assert_close(r.final_states[s].numpy(), ref.final_states[s], "float32",
                         f"{name} {algorithm} final state", T=130)


def test_levels_emit_one_dot_per_level_and_no_broadcast_product():
    """The generated fused kernel: a tl.dot per level (guarded by the chunk length), no
    [BT, BT, BK] product (the form this replaced), and the chunk-length bound asserted."""
    src = TRI.compiled(scancc.get("gla").build(), {"algorithm": "chunked"}, ("float32",)).source
    assert "[:, None, :] *" not in src
    for h in (1, 2, 4, 8, 16, 32, 64, 128):
        assert f"> {h}:  # s in the left, t in the right half of {2 * h} steps" in src
    assert "tl.static_assert(" in src
