"""The staged form's state pass (backends/triton/staged.py, identity/scalar/key-diagonal
kinds): split over [BLOCK_KEY_STATE, BLOCK_VALUE_STATE] sub-blocks of the state (several K
and V sub-blocks, partial last ones), each chunk's contribution computed in the loop, and the
per-chunk states stored in the input dtype for 16-bit inputs. Against the reference (the
independent truth), with initial and final states."""
from __future__ import annotations

import numpy as np
import pytest

import scancc
from scancc import backends, testing
from scancc.backends.triton import staged

torch = pytest.importorskip("torch")
TRI = backends.get("triton")
if not TRI.available()[0]:
    pytest.skip("triton does not run here", allow_module_level=True)
REF = backends.get("reference")

# one recurrence per kind the split applies to: identity, scalar, key-diagonal
NAMES = ["linear_attn", "simple_gla", "gla"]


def _case(name, T, key, value, seed=0):
    e = scancc.get(name)
    rec = e.build()
    sizes = testing.default_sizes(rec, time=T)
    sizes.update({"batch": 1, "heads": 1, "key": key, "value": value})
    x = testing.sample_inputs(rec, sizes, seed, e.hints)
    x = {k: np.asarray(v, dtype=np.float32) for k, v in x.items()}
    s = rec.states[0]
    h0 = {s.name: np.random.default_rng(seed + 1).standard_normal(
        [sizes[d] for d in s.dims]).astype(np.float32)}
    return rec, sizes, x, h0


def _ref(rec, sizes, x, h0):
    r = REF.run(rec, {k: v.astype(np.float64) for k, v in x.items()}, sizes,
                {k: v.astype(np.float64) for k, v in h0.items()}, True, {})
    return r.outputs[rec.outputs[0].name], r.final_states[rec.states[0].name]


def test_the_split_is_in_effect_at_these_sizes():
    """key 72 > 2 x 32 and value 80 > 64: three K sub-blocks (the last partial) and two V
    blocks (the last partial), so the tests below run several state-pass programs per head."""
    ks, vs = staged.Lowering.STATE_BLOCK
    assert -(-72 // ks) == 3 and 72 % ks
    assert 80 > vs and 80 % vs


@pytest.mark.parametrize("name", NAMES)
def test_split_state_pass_matches_the_reference(name):
    rec, sizes, x, h0 = _case(name, 70, 72, 80)
    x["q"][0, 5, 0, 3] = np.nan  # an output-only NaN: poisons o at t=5 only
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    th = {k: torch.from_numpy(v) for k, v in h0.items()}
    r = TRI.run(rec, tx, sizes, th, True, {"algorithm": "staged", "dot_precision": "ieee"})
    o = r.outputs[rec.outputs[0].name].numpy()
    ht = r.final_states[rec.states[0].name].numpy()
    ro, rht = _ref(rec, sizes, x, h0)
    np.testing.assert_array_equal(np.isfinite(o), np.isfinite(ro))
    assert not np.isfinite(o).all() and np.isfinite(o).any()
    fin = np.isfinite(ro)
    testing.assert_close(np.where(fin, o, 0.0), np.where(fin, ro, 0.0), "float32",
                         f"{name} staged output, split state pass")
    testing.assert_close(ht, rht, "float32", f"{name} staged final state, split state pass")


@pytest.mark.parametrize("name", ["simple_gla", "linear_attn"])
def test_bf16_chunk_states_within_the_bf16_table(name):
    """bf16 inputs: hc in bf16 (the state entering each chunk rounded once), sums in float32;
    several chunks and sub-blocks, default dot precision, against the float64 reference on the
    same rounded inputs (docs/triton.md: measured 6.1e-3-6.2e-3 at the default sizes)."""
    rec, sizes, x, h0 = _case(name, 200, 72, 80, seed=3)
    tx = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in x.items()}
    xr = {k: v.double().numpy() for k, v in tx.items()}
    r = TRI.run(rec, tx, sizes, {k: torch.from_numpy(v) for k, v in h0.items()}, True,
                {"algorithm": "staged"})
    ref = REF.run(rec, xr, sizes, {k: v.astype(np.float64) for k, v in h0.items()}, True, {})
    o = rec.outputs[0].name
    testing.assert_close(r.outputs[o].float().numpy(), ref.outputs[o], "bfloat16",
                         f"{name} staged bf16 output")
    s = rec.states[0].name
    testing.assert_close(r.final_states[s].numpy(), ref.final_states[s], "bfloat16",
                         f"{name} staged bf16 final state")


@pytest.mark.parametrize("T", [1, 63, 65])
def test_f16_chunk_states_short_and_partial_chunks(T):
    """float16 inputs (hc in float16), T of one step, one partial chunk, a full chunk and one
    step: output and final state against the float64 reference on the rounded inputs."""
    rec, sizes, x, h0 = _case("simple_gla", T, 40, 72, seed=5)
    tx = {k: torch.from_numpy(v).to(torch.float16) for k, v in x.items()}
    xr = {k: v.double().numpy() for k, v in tx.items()}
    r = TRI.run(rec, tx, sizes, {k: torch.from_numpy(v) for k, v in h0.items()}, True,
                {"algorithm": "staged"})
    ref = REF.run(rec, xr, sizes, {k: v.astype(np.float64) for k, v in h0.items()}, True, {})
    o, s = rec.outputs[0].name, rec.states[0].name
    testing.assert_close(r.outputs[o].float().numpy(), ref.outputs[o], "float16",
                         f"simple_gla staged f16 output, T={T}")
    testing.assert_close(r.final_states[s].numpy(), ref.final_states[s], "float16",
                         f"simple_gla staged f16 final state, T={T}")


@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net"])
def test_householder_state_pass_split_over_value_blocks(name):
    """Householder: stage 2 split over V sub-blocks of HOUSEHOLDER_STATE_BV columns (value 40:
    three sub-blocks, the last partial, and one fully masked), a NaN in one v element (its
    state column and the outputs after it), initial and final states, float32 "ieee"."""
    assert 40 > 2 * staged.Lowering.HOUSEHOLDER_STATE_BV
    rec, sizes, x, h0 = _case(name, 70, 24, 40, seed=7)
    x["v"][0, 40, 0, 17] = np.nan
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    th = {k: torch.from_numpy(v) for k, v in h0.items()}
    r = TRI.run(rec, tx, sizes, th, True, {"algorithm": "staged", "dot_precision": "ieee"})
    ro, rht = _ref(rec, sizes, x, h0)
    for got, want, what in ((r.outputs[rec.outputs[0].name].numpy(), ro, "output"),
                            (r.final_states[rec.states[0].name].numpy(), rht, "final state")):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=what)
        fin = np.isfinite(want)
        assert fin.any() and not fin.all()
        testing.assert_close(np.where(fin, got, 0.0), np.where(fin, want, 0.0), "float32",
                             f"{name} staged {what}, V-split state pass")
