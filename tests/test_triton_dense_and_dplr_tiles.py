"""Issue 15's register tiling of the modern kernels, checked in the interpreter against
independent truths: mamba3's recurrent kernel with its headdim split into small blocks over
programs (the default at realistic sizes, ``plan.DENSE_TILE_ELEMENTS``), and the staged dplr
stages whose pair tiles are built one row at a time (rwkv7, kda: tests/test_dplr.py and
tests/test_triton_staged.py cover the rest)."""
from __future__ import annotations

import numpy as np
import pytest
import scancc
from scancc import registry
from scancc.testing import assert_close

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "_modern", pathlib.Path(__file__).with_name("test_library_modern.py"))
_modern = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_modern)
mamba3_inputs, mamba3_loop, to_frame = _modern.mamba3_inputs, _modern.mamba3_loop, _modern.to_frame


def _lowering(name, **opts):
    from scancc.backends.triton import recurrent
    return recurrent.Lowering(registry.get(name).build(**opts), {})


def test_mamba3_default_headdim_block_is_capped_at_realistic_sizes():
    """H16 P64 N128 (pairs 64): the dense state's tile [headdim, pairs, comp, slot, slot_in]
    is held to DENSE_TILE_ELEMENTS (4 x 2048), not the 64-wide block that spilled 19 KB."""
    from scancc.backends.triton.plan import DENSE_TILE_ELEMENTS
    L = _lowering("mamba3")
    sizes = {"batch": 1, "time": 8, "heads": 16, "headdim": 64, "groups": 1, "pairs": 64,
             "comp": 2, "slot": 4, "slot_in": 4}
    assert L.plan.split == ("headdim",)
    assert L.block_size("headdim", 64, sizes) == DENSE_TILE_ELEMENTS // (64 * 2 * 4 * 4) == 4
    # the launcher's default expression agrees with block_size
    expr = L.block_default("headdim")
    env = {L.size[d]: n for d, n in sizes.items()}
    assert eval(expr, {}, env) == 4  # noqa: S307 - generated arithmetic on ints
    # small shapes keep the whole headdim in one block
    assert L.block_size("headdim", 4, {**sizes, "pairs": 3}) == 4


def test_other_recurrent_kernels_keep_their_blocks():
    """Only states with a column dim (dense) take the cap: gla's recurrent V block stays 64."""
    L = _lowering("gla")
    sizes = {"batch": 1, "time": 8, "heads": 16, "key": 128, "value": 128}
    assert L.block_size(L.plan.split[0], 128, sizes) == 64


@pytest.mark.parametrize("T", [1, 63, 64, pytest.param(257, marks=pytest.mark.slow)])
def test_mamba3_split_headdim_matches_its_definition(T):
    """headdim 5 in blocks of 2 (three programs per head, the last one masked), with an
    entering state and the final state, against the loop from mamba3's definition."""
    B, G, H, J, P = 2, 1, 2, 3, 5
    x = mamba3_inputs(T, B, T, G, H, J, P, D=True, Z=True)
    r = np.random.default_rng(T)
    S0 = r.standard_normal((B, H, P, 2 * J)).astype(np.float32).astype(np.float64)
    U0 = r.standard_normal((B, H, P, 2 * J)).astype(np.float32).astype(np.float64)
    want_y, S, theta, U = mamba3_loop(**x, S0=S0, U0=U0)
    ker = scancc.compile("mamba3", target="triton", D=True, Z=True, block_sizes={"headdim": 2})
    X0 = to_frame(S0, np.zeros((B, H, J)), U0).astype(np.float32)
    y, X = ker(**{k: v.astype(np.float32) for k, v in x.items()}, initial_state=X0,
               output_final_state=True)
    y, X = np.asarray(y, np.float64), np.asarray(X, np.float64)
    assert np.isfinite(y).all() and np.isfinite(X).all()
    assert_close(y, want_y, "float32", T=T)
    assert_close(X, to_frame(S, theta, U), "float32", "final state", T=T)


# ---- dplr (rwkv7, kda): the row-at-a-time pair tiles, fused and staged ----

torch = pytest.importorskip("torch")


def _dplr_case(name, T, heads=2, key=6, value=5, resets=True):
    from scancc.testing import sample_inputs, sample_state
    e = scancc.get(name)
    rec = e.build()
    sizes = {"batch": 1, "time": T, "heads": heads, "key": key, "value": value}
    x = sample_inputs(rec, sizes, T + 3, e.hints)
    g = "g" if name == "kda" else "w"
    if resets and T > 20:  # a hard reset of one key element inside a chunk, of all at a start
        x[g][0, 20, 1 % heads, 3] = -np.inf
        x[g][0, 16] = -np.inf
    x = {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}
    S0 = sample_state(rec, sizes, 9)["S"].astype(np.float32).astype(np.float64)
    return rec, sizes, x, S0


def _triton(rec, sizes, x, S0, opts):
    from scancc.backends import get
    tx = {k: torch.from_numpy(v.astype(np.float32)) for k, v in x.items()}
    return get("triton").run(rec, tx, sizes, {"S": torch.from_numpy(S0.astype(np.float32))},
                             True, opts)


def _reference(rec, sizes, x, S0):
    from scancc.backends import get
    return get("reference").run(rec, x, sizes, {"S": S0}, True, {})


@pytest.mark.parametrize("T", [1, 63, 64, pytest.param(257, marks=pytest.mark.slow)])
@pytest.mark.parametrize("algorithm", ["chunked", "staged"])
@pytest.mark.parametrize("name", ["rwkv7", "kda"])
def test_dplr_chunked_forms_match_the_reference(name, algorithm, T):
    """Fused and staged dplr kernels (pair tiles one row at a time) against the reference,
    float32 inputs, exact float32 dots, an initial and the final state, hard resets."""
    rec, sizes, x, S0 = _dplr_case(name, T)
    ref = _reference(rec, sizes, x, S0)
    res = _triton(rec, sizes, x, S0, {"algorithm": algorithm, "dot_precision": "ieee"})
    assert res.counters["algorithm"] == algorithm
    o = res.outputs["o"].numpy()
    assert np.isfinite(o).all()
    assert_close(o, ref.outputs["o"], "float32", f"{algorithm} output", T=T)
    assert_close(res.final_states["S"].numpy(), ref.final_states["S"], "float32",
                 f"{algorithm} final state", T=T)


@pytest.mark.parametrize("name,fused", [("rwkv7", False), ("kda", False), ("gla", True),
                                        ("delta_net", True)])
def test_auto_module_has_a_fused_branch_except_for_dplr(name, fused):
    """The dplr rule under auto: the module has no fused branch (STAGE == 0) and its launcher
    no B·H·⌈V/BV⌉ >= 132 test, so every shape runs the three stages; the other chunked kinds
    keep both (tests/test_triton_staged.py checks which one runs for them)."""
    from scancc.backends.triton import TritonBackend
    rec = registry.get(name).build()
    c = TritonBackend().compiled(rec, {}, tuple(["float32"] * len(rec.inputs)))
    assert ("== 0:  # fused" in c.source) is fused
    assert ("enough programs: the fused kernel" in c.source) is fused
    assert "== 3:  # outputs" in c.source


def test_dplr_auto_runs_the_stages():
    """auto equals algorithm="staged" bit-for-bit on rwkv7 (and matches the reference)."""
    rec, sizes, x, S0 = _dplr_case("rwkv7", 20, resets=False)
    auto = _triton(rec, sizes, x, S0, {"dot_precision": "ieee"})
    staged = _triton(rec, sizes, x, S0, {"algorithm": "staged", "dot_precision": "ieee"})
    np.testing.assert_array_equal(auto.outputs["o"].numpy(), staged.outputs["o"].numpy())
    np.testing.assert_array_equal(auto.final_states["S"].numpy(),
                                  staged.final_states["S"].numpy())
    ref = _reference(rec, sizes, x, S0)
    assert_close(auto.outputs["o"].numpy(), ref.outputs["o"], "float32", "auto output", T=20)
