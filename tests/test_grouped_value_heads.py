"""Grouped value heads (fla's GVA: v with HV = G * H heads, q and k with H) in the library's
``kda`` and ``gated_delta_net`` (option ``grouped_value_heads=True``).

Truth is flash-linear-attention's naive recurrences, called, not copied: ``naive_recurrent_kda``
takes HV > H itself (q, k repeat_interleave'd to HV heads; v, g, beta and the state have HV);
fla's naive gated delta rule has no HV, so it is fed q, k repeat_interleave'd by this file, the
head map of fla's chunk/fused kernels (``i_h = i_hv // (HV // H)``). A run with the other head
map (q, k tiled) must miss, and so must a run with a bumped last value: the comparisons can
fail. Backends NaN-poison their outputs (``scancc.testing.errors`` is inf on a non-finite
output). Gradients: torch.autograd.gradcheck of the reference at a tiny shape.
"""
import importlib.util
import pathlib
import warnings

import numpy as np
import pytest

import scancc
from scancc.testing import assert_close

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

_spec = importlib.util.spec_from_file_location(
    "_gva_library_truth_helpers", pathlib.Path(__file__).with_name("test_library_truth.py"))
LT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(LT)

B, H, G, K, V = 2, 2, 2, 5, 7
HV = G * H
TS = (1, 63, 64, 70)   # one step; a chunk (64) short, full, and with a ragged tail


@pytest.fixture(scope="module")
def fla():
    with warnings.catch_warnings():  # "Triton is not supported on current platform" on CPU
        warnings.simplefilter("ignore")
        pytest.importorskip("fla", reason=LT.FLA_SKIP)
        from fla.ops.gated_delta_rule import naive_recurrent_gated_delta_rule
        from fla.ops.kda.naive import naive_recurrent_kda
    return naive_recurrent_kda, naive_recurrent_gated_delta_rule


_KERNELS = {}


def kernel(name, target, **opts):
    """One compiled kernel per (name, target, options): the Triton interpreter compiles per
    source, so the T cases of a target share it."""
    key = (name, target, tuple(sorted(opts.items())))
    if key not in _KERNELS:
        _KERNELS[key] = scancc.compile(name, target, grouped_value_heads=True, **opts)
    return _KERNELS[key]


def inputs(name, T, init, seed, dtype="float32", l2=False):
    r = LT.rng_for("gva", name, T, init, seed, dtype, l2)
    mk = LT.randn if l2 else LT.unit_rows
    x = dict(q=mk(r, dtype, B, T, H, K), k=mk(r, dtype, B, T, H, K), v=LT.randn(r, dtype, B, T, HV, V))
    x["g"] = LT.log_gate(r, dtype, B, T, HV, K) if name == "kda" else \
        LT.log_gate(r, dtype, B, T, HV)
    x["beta"] = LT.arr(r.uniform(0.05, 0.95, (B, T, HV)), dtype)
    S0 = LT.randn(r, dtype, B, HV, K, V) if init else None
    return x, S0


def truth(fla, name, x, S0, scale=None, l2=False, head_map="interleave"):
    """fla's naive recurrence on x (float32, as fla computes); head_map "tile" is the wrong
    map (value head i reading q/k head i % H), for the must-miss runs."""
    naive_kda, naive_gdn = fla
    f = {n: t.float() for n, t in x.items()}
    S0 = None if S0 is None else S0.float()
    q, k = f["q"], f["k"]
    if l2:   # fla's naive functions never normalize: feed them fla's in-kernel l2norm
        q, k = LT.l2n(q), LT.l2n(k)
    rep = (lambda t: t.repeat_interleave(G, dim=2)) if head_map == "interleave" else \
        (lambda t: t.repeat(1, 1, G, 1))
    if name == "kda":
        if head_map == "interleave":   # naive_recurrent_kda takes HV > H itself
            return naive_kda(q, k, f["v"], f["g"], f["beta"], scale=scale, initial_state=S0,
                             output_final_state=True)
        return naive_kda(rep(q), rep(k), f["v"], f["g"], f["beta"], scale=scale,
                         initial_state=S0, output_final_state=True)
    return naive_gdn(rep(q), rep(k), f["v"], f["beta"], f["g"], scale=scale,
                     initial_state=S0, output_final_state=True)


def run(name, target, x, S0, **kw):
    if target == "reference":
        x = {n: t.numpy() for n, t in x.items()}
        S0 = None if S0 is None else S0.numpy()
    o, S = kernel(name, target, **kw)(**x, initial_state=S0, output_final_state=True)
    return tuple(t if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t))
                 for t in (o, S))


def check(fla, name, target, T, init, dtype="float32", l2=False, bump=True):
    x, S0 = inputs(name, T, init, 0, dtype, l2)
    scale = 0.3 if init else None   # a non-default scale rides on the runs with a state
    kw = dict(scale=scale, use_qk_l2norm_in_kernel=l2)
    want_o, want_S = truth(fla, name, x, S0, scale, l2)
    assert want_o.shape == (B, T, HV, V) and want_S.shape == (B, HV, K, V)
    o, S = run(name, target, x, S0, **kw)
    assert o.shape == want_o.shape and S.shape == want_S.shape
    assert_close(o, want_o, "float32", f"{name} {target} output", T=T)
    assert_close(S, want_S, "float32", f"{name} {target} final state", T=T)
    if bump:
        LT.assert_misses(run(name, target, {**x, "v": LT.bump_last(x["v"], 1)}, S0, **kw)[0],
                         want_o, "float32", f"{name} {target} bumped v")
    if T > 1 or init:   # the head map is repeat_interleave: tiled q/k heads miss
        tiled_o, tiled_S = truth(fla, name, x, S0, scale, l2, head_map="tile")
        LT.assert_misses(o, tiled_o, "float32", f"{name} {target} against the tiled head map")
        LT.assert_misses(S, tiled_S, "float32", f"{name} {target} state, tiled head map")


@pytest.mark.parametrize("name", ["kda", "gated_delta_net"])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("target", ["reference", "torch"])
def test_grouped_value_heads_match_fla(fla, name, target, T, init):
    check(fla, name, target, T, init)


@pytest.mark.parametrize("name", ["kda", "gated_delta_net"])
def test_grouped_value_heads_float64_and_in_kernel_l2norm(fla, name):
    """float64 inputs (scancc's float64 path; fla still computes in float32) and raw q, k
    normalized in the kernel."""
    check(fla, name, "reference", 63, True, "float64", l2=True)
    check(fla, name, "torch", 70, True, "float64", l2=True)


@pytest.mark.parametrize("name", ["kda", "gated_delta_net"])
def test_grouped_value_heads_match_fla_on_triton(fla, name):
    """The Triton interpreter at T = 20 (kda's chunked form has chunks of 16: a full one and a
    ragged tail) with a state, the algorithm its planner picks (chunked for kda: checked by
    hand at T = 41); the tiled head map must miss (no bumped run: the interpreter is slow,
    measured ~130 s for kda at T = 70 with it)."""
    check(fla, name, "triton", 20, True, bump=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kda", "gated_delta_net"])
def test_grouped_value_heads_match_fla_on_triton_every_length(fla, name):
    """Every T of TS with and without a state, on one compiled kernel per name (measured:
    ~490 s for kda and ~80 s for gated_delta_net on this shared 2-core machine)."""
    for T in TS:
        for init in (False, True):
            check(fla, name, "triton", T, init)


def test_ungrouped_calls_are_unchanged():
    """The option is off by default: the IR is the one without it (q, k on the value heads)."""
    for name in ("kda", "gated_delta_net"):
        rec = scancc.get(name).build()
        assert all("qk_heads" not in i.dims for i in rec.inputs)
        grec = scancc.get(name).build(grouped_value_heads=True)
        dims = {i.name: i.dims for i in grec.inputs}
        assert dims["q"][2] == dims["k"][2] == "qk_heads" and dims["v"][2] == "heads"
        assert dims["beta"][2] == dims["g"][2] == "heads"


def test_heads_not_a_multiple_of_the_qk_heads_are_rejected():
    x, _ = inputs("kda", 3, False, 1)
    x["v"], x["g"], x["beta"] = x["v"][:, :, :3], x["g"][:, :, :3], x["beta"][:, :, :3]
    with pytest.raises(scancc.InputError, match="not a multiple"):
        run("kda", "reference", x, None)


@pytest.mark.parametrize("name", ["kda", "gated_delta_net"])
def test_gradcheck_on_the_reference(name):
    """Every input and the initial state against finite differences (float64, tiny shape)."""
    r = LT.rng_for("gva-grad", name)
    b, T, h, g, k, v = 1, 3, 1, 2, 2, 2
    x = dict(q=LT.unit_rows(r, "float64", b, T, h, k), k=LT.unit_rows(r, "float64", b, T, h, k),
             v=LT.randn(r, "float64", b, T, h * g, v))
    x["g"] = LT.log_gate(r, "float64", *((b, T, h * g, k) if name == "kda" else (b, T, h * g)))
    x["beta"] = LT.arr(r.uniform(0.05, 0.95, (b, T, h * g)), "float64")
    S0 = LT.randn(r, "float64", b, h * g, k, v)
    ker = kernel(name, "reference")
    names = list(x)
    leaves = tuple(t.clone().requires_grad_(True) for t in (*x.values(), S0))

    def f(*ts):
        return ker(**dict(zip(names, ts)), initial_state=ts[-1], output_final_state=True)
    assert torch.autograd.gradcheck(f, leaves, atol=1e-8, rtol=1e-6)
