"""The torch backend (issue 16) against independent truth: the float64 reference interpreter
and closed forms.

tests/test_backends.py already runs every registered recurrence on every torch algorithm at
the default chunk (one chunk at T=37); here the chunk is small and does not divide T, so
states are carried across several chunks and the last one is ragged, and float64 inputs
check the algorithms themselves (float64 accumulation: the chunked forms are exact
rewrites, to ~1e-12, not approximations). Outputs are NaN-poisoned by the generated code,
so an element it never writes is non-finite and fails.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import scancc
from scancc import autograd, backends
from scancc.ir import const, scalar
from scancc.testing import assert_close, default_sizes, sample_inputs, sample_state

torch = pytest.importorskip("torch")

BE = backends.get("torch")
T = 29       # chunk 8: three full chunks and a ragged one
CHUNK = 8


def _algos(rec):
    return [a for a in ("recurrent", "chunked") if BE.supports(rec, {"algorithm": a})[0]]


CASES = [(n, a) for n in scancc.names() for a in _algos(scancc.get(n).build())]


def _dicts(y, names):
    return y if isinstance(y, dict) else {names[0]: y}


def _run_both(name, algo, dtype, T=T, chunk=CHUNK, seed=0):
    e = scancc.get(name)
    opts = {o: True for o in e.optional_inputs}
    ref = scancc.compile(name, "reference", **opts)
    rec = ref.ir
    sizes = default_sizes(rec, time=T)
    x = {k: torch.from_numpy(v).to(getattr(torch, dtype))
         for k, v in sample_inputs(rec, sizes, seed, e.hints).items()}
    h0 = {k: v.astype(np.float32) for k, v in sample_state(rec, sizes, seed + 1).items()}
    seen = {k: v.double().numpy() for k, v in x.items()}
    wy, wh = ref(**seen, initial_state={k: v.astype(np.float64) for k, v in h0.items()},
                 output_final_state=True)
    k = scancc.compile(name, "torch", **opts, options={"algorithm": algo, "chunk": chunk})
    gy, gh = k(**x, initial_state={k: torch.from_numpy(v) for k, v in h0.items()},
               output_final_state=True)
    outs, states = [o.name for o in rec.outputs], [s.name for s in rec.states]
    return (_dicts(gy, outs), _dicts(wy, outs)), (_dicts(gh, states), _dicts(wh, states)), k


@pytest.mark.parametrize("name,algo", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_several_chunks_match_the_reference(name, algo):
    (gy, wy), (gh, wh), k = _run_both(name, algo, "float32")
    assert k.last_run is None or k.last_run.counters.get("algorithm") in (None, algo)
    for what, got, want in (("output", gy, wy), ("final state", gh, wh)):
        for n, w in want.items():
            g = got[n].detach().double().numpy()
            assert g.shape == w.shape
            assert np.isfinite(g[np.isfinite(w)]).all(), f"{name} {what} {n}: unwritten"
            assert_close(g, w, "float32", f"{name}/{algo} {what} {n}")


@pytest.mark.parametrize("name,algo", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_float64_inputs_are_exact_rewrites(name, algo):
    """float64 inputs accumulate in float64: every form equals the reference to rounding."""
    (gy, wy), (gh, wh), _ = _run_both(name, algo, "float64")
    for got, want in ((gy, wy), (gh, wh)):
        for n, w in want.items():
            g = got[n].double().numpy()
            assert g.dtype == np.float64
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["mamba2", "gla", "mamba", "fir"])
def test_low_precision_inputs_accumulate_in_float32(name, dtype):
    (gy, wy), _, _ = _run_both(name, "chunked", dtype)
    for n, w in wy.items():
        assert gy[n].dtype == getattr(torch, dtype)  # outputs in the inputs' dtype
        assert_close(gy[n].float().double().numpy(), w, dtype, f"{name} {n}")


def _leaky(r, lam=0.25):
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x = r.input("x", [b, t, d])
    h = r.state("h", [b, d], scalar(const(1.0 - lam)), inject=x * lam)
    r.output("y", [b, t, d], h)


@pytest.mark.parametrize("algo", ["recurrent", "chunked"])
def test_leaky_integrator_closed_form(algo):
    """y_t = (1-l)^(t+1) h0 + l sum_{s<=t} (1-l)^(t-s) x_s, in float64."""
    scancc.register("torch_test_leaky")(_leaky)
    try:
        lam, n = 0.25, 21
        rng = np.random.default_rng(0)
        x, h0 = rng.standard_normal((2, n, 3)), rng.standard_normal((2, 3))
        k = scancc.compile("torch_test_leaky", "torch", options={"algorithm": algo, "chunk": 4})
        y = k(torch.from_numpy(x), initial_state=torch.from_numpy(h0)).numpy()
        t = np.arange(n)
        decay = np.tril((1 - lam) ** (t[:, None] - t[None, :]))
        want = (1 - lam) ** (t + 1)[None, :, None] * h0[:, None, :] + \
            lam * np.einsum("ts,bsd->btd", decay, x)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    finally:
        scancc.unregister("torch_test_leaky")


def test_linear_attention_closed_form():
    """linear_attn with no initial state: y_t = sum_{s<=t} (q_t . k_s) v_s / sqrt(K) (a masked
    matmul), through the chunked (SSD) form."""
    rec = scancc.get("linear_attn").build()
    sizes = default_sizes(rec, time=19)
    x = sample_inputs(rec, sizes, 3)
    k = scancc.compile("linear_attn", "torch", options={"algorithm": "chunked", "chunk": 4})
    y = k(**{a: torch.from_numpy(v.astype(np.float64)) for a, v in x.items()})
    q, kk, v = (x[a].astype(np.float64) for a in ("q", "k", "v"))
    dims = {i.name: i.dims for i in rec.inputs}
    assert dims["q"][1] == "time"  # [batch, time, heads, key]
    s = np.einsum("bthk,bshk->bhts", q, kk) * np.tril(np.ones((19, 19)))
    want = np.einsum("bhts,bshv->bthv", s, v) / np.sqrt(q.shape[-1])
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-10, atol=1e-10)


def _helpers():
    from scancc.backends.torch.rules import HELPERS
    ns = {"torch": torch}
    exec(HELPERS["linear_scan"], ns)  # noqa: S102 - the backend's own helper text
    return ns["_linear_scan"]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 31, 64])
def test_prefix_scan_is_the_recurrence(n):
    scan = _helpers()
    g = torch.Generator().manual_seed(n)
    a = torch.rand(n, 3, 1, dtype=torch.float64, generator=g)
    b = torch.randn(n, 3, 4, dtype=torch.float64, generator=g)
    h, p, hs, ps = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64), [], []
    for i in range(n):
        h, p = a[i] * h + b[i], p * a[i]
        hs.append(h)
        ps.append(p)
    got_a, got_h = scan(a, b)
    torch.testing.assert_close(got_h, torch.stack(hs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_a[..., :1], torch.stack(ps), rtol=1e-12, atol=1e-12)


def test_hard_reset_forgets_the_past():
    """A log-gate of -inf (gla) is a decay of exactly 0: outputs after it equal a run that
    starts there from a zero state (the chunked form never puts -inf in a cumulative sum)."""
    rec = scancc.get("gla").build()
    sizes = default_sizes(rec, time=24)
    x = {a: torch.from_numpy(v.astype(np.float64)) for a, v in
         sample_inputs(rec, sizes, 5, scancc.get("gla").hints).items()}
    x["g"][:, 10] = float("-inf")
    k = scancc.compile("gla", "torch", options={"algorithm": "chunked", "chunk": 8})
    y = k(**x)
    rest = k(**{a: v[:, 10:] for a, v in x.items()})
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, 10:], rest, rtol=1e-10, atol=1e-10)


def test_auto_algorithms():
    pick = {n: BE.algorithm(scancc.get(n).build(), {}) for n in scancc.names()}
    for n in ("linear_attn", "retnet", "simple_gla", "gla", "mamba2", "fir", "swa", "iir",
              "delta_net", "gated_delta_net"):
        assert pick[n] == "chunked", n
    for n in ("mamba", "s4d", "hgrn"):
        assert pick[n] == "recurrent", n
    assert BE.supports(scancc.get("iir").build(), {"algorithm": "chunked"})[0]
    with pytest.raises(scancc.OptionError if hasattr(scancc, "OptionError") else Exception):
        BE.check_options(scancc.get("mamba").build(), {"chunk": 0})


def test_generated_source_is_standalone_and_device_free(tmp_path):
    """`scancc compile NAME --target torch -o f.py` writes a module that runs on its own
    (given sizes) and equals the backend's run; it names no device."""
    f = tmp_path / "mamba2_torch.py"
    subprocess.run([sys.executable, "-m", "scancc", "compile", "mamba2", "--target", "torch",
                    "-o", str(f)], check=True, capture_output=True)
    src = f.read_text()
    assert src.startswith('"""mamba2: chunked forward generated by scancc (torch backend).')
    assert "# recurrence mamba2" in src and "import torch" in src
    for word in ("cuda", "'cpu'", '"cpu"', "mps", "xpu", "scancc."):
        assert word not in src, word
    spec = importlib.util.spec_from_file_location("mamba2_torch", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = scancc.get("mamba2").build()
    sizes = default_sizes(rec, time=21)
    x = {a: torch.from_numpy(v) for a, v in sample_inputs(rec, sizes, 0).items()}
    y, _ = mod.mamba2_chunked_fwd(*[x[i.name] for i in rec.inputs], sizes, chunk=8)
    want = scancc.compile("mamba2", "torch", options={"chunk": 8})(**x)
    torch.testing.assert_close(y["y"], want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mamba2", "gla", "mamba", "fir", "iir", "delta_net"])
def test_backward_runs_on_torch_and_matches_the_reference(name):
    """The derived adjoint runs on the torch backend itself (backward_target), in chunks of
    the orchestrator (memory linear in T); gradients equal the reference's."""
    e = scancc.get(name)
    k, ref = scancc.compile(name, "torch"), scancc.compile(name, "reference")
    assert autograd.backward_target(k, k.ir) == "torch"
    sizes = default_sizes(k.ir, time=23)
    x = sample_inputs(k.ir, sizes, 0, e.hints)
    xt = {a: torch.tensor(v, dtype=torch.float64, requires_grad=True) for a, v in x.items()}
    xr = {a: torch.tensor(v, dtype=torch.float64, requires_grad=True) for a, v in x.items()}
    outs = [o.name for o in k.ir.outputs]
    y, yr = _dicts(k(**xt), outs), _dicts(ref(**xr), outs)
    w = {n: torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
         for n, v in yr.items()}
    sum((y[n] * w[n]).sum() for n in y).backward()
    sum((yr[n] * w[n]).sum() for n in yr).backward()
    for a in xt:
        if xr[a].grad is not None:
            # the adjoint's kernels accumulate in float32 (the tolerance table's float32 row)
            assert_close(xt[a].grad.numpy(), xr[a].grad.numpy(), "float32", f"{name} d{a}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamba2", "gla", "retnet"])
def test_long_sequences_chunked(name):
    """T=700 at chunk 64 in float32 (long memories: the tolerance's long-T form)."""
    (gy, wy), (gh, wh), _ = _run_both(name, "chunked", "float32", T=700, chunk=64)
    for n, w in wy.items():
        assert_close(gy[n].double().numpy(), w, "float32", f"{name} {n}", T=700)


def test_rule_registries_cover_every_entry_of_the_reference():
    from scancc.backends.reference import rules as ref
    from scancc.backends.torch import rules
    assert rules.OP_RULES.names() == ref.OP_RULES.names()
    assert rules.TRANSITION_RULES.names() == ref.TRANSITION_RULES.names()


@pytest.mark.parametrize("name", ["gla", "gated_delta_net", "mamba2"])
def test_chunks_longer_than_a_sub_chunk_are_exact(name):
    """chunk 40 (GLA: the halving scores padded to 64 steps, pairs across halves through the
    factored decay) at T=77 with float64 inputs: the reference to rounding."""
    (gy, wy), (gh, wh), _ = _run_both(name, "chunked", "float64", T=77, chunk=40)
    for got, want in ((gy, wy), (gh, wh)):
        for n, w in want.items():
            np.testing.assert_allclose(got[n].numpy(), w, rtol=1e-9,
                                       atol=1e-9 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("n", [1, 2, 7, 16, 50, 64])
@pytest.mark.parametrize("resets", [False, True])
def test_diag_decay_scores_equal_the_pairwise_sum(n, resets):
    """``_diag_decay_scores`` (halving: pairs across the halves of a block through the first
    half's end) against the definition, sum_K q_t k_s exp(c_t - c_s) over s <= t with no
    reset in (s, t], summed pair by pair in float64; decays in (e^-3, e^0.5] (some > 1) and,
    with resets, hard resets (log decay <= RESET_LOG_DECAY) at ~10% of the entries."""
    import torch

    from scancc.backends.torch.rules import HELPERS
    from scancc.ir.passes.chunked import RESET_LOG_DECAY
    ns = {"torch": torch}
    exec(HELPERS["diag_scores"], ns)
    gen = torch.Generator().manual_seed(n)
    q, k = (torch.randn(2, 3, n, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    g = torch.rand(2, 3, n, 5, dtype=torch.float64, generator=gen) * 3.5 - 3.0
    if resets:
        g[torch.rand(g.shape, generator=gen) < 0.1] = RESET_LOG_DECAY - 1.0
    r = g <= RESET_LOG_DECAY
    c = torch.where(r, 0.0, g).cumsum(-2)
    R = r.to(torch.int32).cumsum(-2)
    got = ns["_diag_decay_scores"](q, k, c, R)
    want = torch.full_like(got, float("nan"))
    for t in range(n):
        for s in range(n):
            keep = (s <= t) & (R[..., t, :] == R[..., s, :])
            dec = torch.where(keep, torch.exp(c[..., t, :] - c[..., s, :]), 0.0)
            want[..., t, s] = (q[..., t, :] * k[..., s, :] * dec).sum(-1)
    if resets and n >= 16:
        assert (r.any(-1)).any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["fir", "swa", "delta_net"])
def test_scancc_check_backward_on_torch(name):
    """`scancc check --backward --targets torch`: gradients of every input and initial state
    with T crossing the orchestrator's chunks (a one-step last chunk for fir and swa: flipped
    NumPy views of one step reach the backend)."""
    from scancc.check import check_backward
    row = check_backward(name, "torch")
    assert row.ok, row.note


@pytest.mark.parametrize("chunk", [2, 8, 64])
def test_iir_chunked_equals_scipy_lfilter(chunk):
    """iir (time-invariant coefficients: the chunk's slots by one triangular solve) against
    scipy.signal.lfilter, per channel, float64, chunks shorter and longer than the order."""
    signal = pytest.importorskip("scipy.signal")
    rec = scancc.get("iir").build()
    sizes = default_sizes(rec, time=45)
    x = sample_inputs(rec, sizes, 4, scancc.get("iir").hints)
    x["a"][:, 0] = 1.0
    k = scancc.compile("iir", "torch", options={"algorithm": "chunked", "chunk": chunk})
    y = k(**{a: torch.from_numpy(v.astype(np.float64)) for a, v in x.items()}).numpy()
    want = np.stack([signal.lfilter(x["b"][c], x["a"][c], x["x"][:, :, c], axis=1)
                     for c in range(x["x"].shape[2])], axis=2)
    np.testing.assert_allclose(y, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_cascaded_states_bmojo_equals_the_reference(algorithm):
    """bmojo's eidetic memory reads states in its operands (a cascade: mem_key, mem_k, mem_v
    read the shift registers' h_t and prev(mem_key)): on torch (float64, chunks of 5 steps so
    the loop crosses chunk boundaries, a call split in two through the final state) it equals
    the float64 reference, outputs and every final state, and the memory does fill and
    replace (it is not all zeros)."""
    import scancc
    from scancc.ir import default_sizes
    from scancc.sampling import sample_inputs
    ker = scancc.compile("bmojo", "torch", options={"algorithm": algorithm, "chunk": 5})
    ref = scancc.compile("bmojo", "reference")
    sizes = default_sizes(ker.ir, **{ker.ir.time: 23})
    x = sample_inputs(ker.ir, sizes, seed=3, hints=scancc.get("bmojo").hints)
    xt = {n: torch.tensor(v, dtype=torch.float64) for n, v in x.items()}
    y, f = ker(**xt, output_final_state=True)
    yr, fr = ref(**x, output_final_state=True)
    np.testing.assert_allclose(y.numpy(), yr, rtol=1e-12, atol=1e-12)
    assert set(f) == set(fr)
    for s in fr:
        np.testing.assert_allclose(f[s].numpy(), fr[s], rtol=1e-12, atol=1e-12, err_msg=s)
    assert (fr["mem_key"] > 0).all() and np.abs(fr["mem_k"]).max() > 0
    t = ker.ir.time
    first = {n: v[:, :9] if t in ker.ir.input(n).dims else v for n, v in xt.items()}
    rest = {n: v[:, 9:] if t in ker.ir.input(n).dims else v for n, v in xt.items()}
    _, h = ker(**first, output_final_state=True)
    y2 = ker(**rest, initial_state=h)
    np.testing.assert_allclose(y2.numpy(), yr[:, 9:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gated_delta_net", "mamba2", "fir"])
def test_packed_batches_and_decode_steps_on_torch(name):
    """cu_seqlens (one call per sequence, the backends' default) and kernel.step (the T=1 scan)
    on the torch backend equal the float64 reference's packed call and scan."""
    import scancc
    from scancc.sampling import sample_inputs
    from scancc.testing import assert_close
    k, ref = scancc.compile(name, "torch"), scancc.compile(name, "reference")
    from scancc.ir import default_sizes
    sizes = default_sizes(k.ir, **{k.ir.time: 30, "batch": 1})
    x = {n: torch.tensor(v, dtype=torch.float32)
         for n, v in sample_inputs(k.ir, sizes, seed=5).items()}
    cu = torch.tensor([0, 7, 8, 30])
    y, f = k(**x, cu_seqlens=cu, output_final_state=True)
    yr, fr = ref(**x, cu_seqlens=cu, output_final_state=True)
    assert_close(y, yr, "float32", T=30)
    for s in (f if isinstance(f, dict) else {"": f}):
        a, b = (f[s], fr[s]) if s else (f, fr)
        assert a.shape[0] == 3 and torch.isfinite(a).all()
        assert_close(a, b, "float32", T=30)
    # decode: prefill 10 steps, then 5 steps, against one 15-step scan of the reference
    t_ax = {i.name: (i.dims.index(k.ir.time) if k.ir.time in i.dims else None) for i in k.ir.inputs}
    def sl(n, v, a, b):
        return v if t_ax[n] is None else v.narrow(t_ax[n], a, b - a)
    _, state = k(**{n: sl(n, v, 0, 10) for n, v in x.items()}, output_final_state=True)
    outs = [k.step(**{n: v if t_ax[n] is None else v.select(t_ax[n], 10 + i)
                      for n, v in x.items()}, state=state) for i in range(5)]
    want = ref(**{n: sl(n, v, 0, 15) for n, v in x.items()})
    o_ax = k.ir.outputs[0].dims.index(k.ir.time)
    assert_close(torch.stack(outs, o_ax), want.narrow(o_ax, 10, 5), "float32", T=15)


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_cascades_read_current_earlier_and_previous_later_states(algorithm):
    """A hand-made cascade: c reads state(a) (h_t of an earlier, scanned state) and prev(e)
    (h_{t-1} of a later, non-cascaded state), e2 reads prev of itself through its decay and
    state(c) of a cascaded one; torch (float64, chunks of 4) equals the float64 reference,
    outputs and final states, from a given initial state."""
    from scancc.ir import Builder, Node, Op, diagonal, identity, prev, sigmoid
    r = Builder("casc_t")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x, g = r.input("x", [b, t, d]), r.input("g", [b, t, d])
    a = r.state("a", [b, d], diagonal(g), inject=x)
    c = r.state("c", [b, d], identity(), inject=a * a - prev("e"))
    r.state("e2", [b, d], diagonal(sigmoid(prev("e2"))), inject=c * x)
    e = r.state("e", [b, d], diagonal(g), inject=x * 0.5)
    r.output("o", [b, t, d], c + Node(Op.STATE, (), "e2") + e)
    rec = r.build()
    assert rec.cascaded == ("c", "e2")
    rng = np.random.default_rng(4)
    xs, gs = rng.standard_normal((2, 11, 3)), rng.random((2, 11, 3))
    h0 = {s: rng.standard_normal((2, 3)) for s in ("a", "c", "e2", "e")}
    ker = scancc.compile(rec, "torch", options={"algorithm": algorithm, "chunk": 4})
    y, f = ker(x=torch.from_numpy(xs), g=torch.from_numpy(gs),
               initial_state={k: torch.from_numpy(v) for k, v in h0.items()},
               output_final_state=True)
    yr, fr = scancc.compile(rec, "reference")(x=xs, g=gs, initial_state=h0,
                                             output_final_state=True)
    np.testing.assert_allclose(y.numpy(), yr, rtol=1e-12, atol=1e-12)
    for s in fr:
        np.testing.assert_allclose(f[s].numpy(), fr[s], rtol=1e-12, atol=1e-12, err_msg=s)
