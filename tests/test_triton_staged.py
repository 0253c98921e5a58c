"""The staged chunked algorithm (backends/triton/staged.py) and the chunked kernels' default dot
precision, against the reference (the independent truth): outputs and final states with an
initial state, sizes that leave a partial last chunk and several V blocks, the edges (NaN
placement, hard resets) across chunk boundaries, the parity of the staged and fused forms, and
the bf16 error of the default ``dot_precision="auto"`` against the tolerance table."""
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

STAGED = [n for n in scancc.names() if TRI.supports(scancc.get(n).build(), {"algorithm": "staged"})[0]]
CHUNKED = [n for n in scancc.names()
           if TRI.supports(scancc.get(n).build(), {"algorithm": "chunked"})[0]]


HOUSEHOLDER = [n for n in STAGED
               if chunked.analyze(scancc.get(n).build(), prev=True).only().kind.value
               == "householder"]


def test_staged_covers_every_chunked_kind():
    kinds = {chunked.analyze(scancc.get(n).build(), prev=True).only().kind.value for n in STAGED}
    assert kinds == {"identity", "scalar", "diagonal", "householder", "dplr"}
    # every chunked recurrence has a staged form (dplr: rwkv7, kda, since issue 15)
    assert set(STAGED) == set(CHUNKED)
    assert {"rwkv7", "kda"} <= set(STAGED)
    assert {"delta_net", "gated_delta_net"} <= set(HOUSEHOLDER)


def _inputs(name, T, seed=0, overrides=None):
    e = scancc.get(name)
    rec = e.build()
    sizes = testing.default_sizes(rec, time=T)
    sizes.update(overrides or {})
    x = testing.sample_inputs(rec, sizes, seed, e.hints)
    x = {k: np.asarray(v, dtype=np.float32) for k, v in x.items()}
    return rec, sizes, x


def _run(rec, sizes, x, h0, opts, dtype=torch.float32):
    tx = {k: torch.from_numpy(v).to(dtype) for k, v in x.items()}
    th = {k: torch.from_numpy(v).float() for k, v in h0.items()} if h0 else None
    r = TRI.run(rec, tx, sizes, th, True, opts)
    o, s = rec.outputs[0].name, rec.states[0].name
    return r.outputs[o].float().numpy(), r.final_states[s].numpy()


def _ref(rec, sizes, x, h0):
    r = REF.run(rec, {k: v.astype(np.float64) for k, v in x.items()}, sizes,
                {k: v.astype(np.float64) for k, v in h0.items()} if h0 else None, True, {})
    return r.outputs[rec.outputs[0].name], r.final_states[rec.states[0].name]


@pytest.mark.parametrize("name", STAGED)
def test_staged_matches_the_reference_with_initial_and_final_state(name):
    """T=150: two full chunks of 64 and a partial one (32-step chunks for gla: 5); value
    blocks of 16 over several programs."""
    rec, sizes, x = _inputs(name, 150)
    s = rec.states[0]
    h0 = {s.name: np.random.default_rng(1).standard_normal(
        [sizes[d] for d in s.dims]).astype(np.float32)}
    o, ht = _run(rec, sizes, x, h0, {"algorithm": "staged", "dot_precision": "ieee",
                                     "block_sizes": {chunked.analyze(rec, prev=True).only().V: 16}})
    ro, rht = _ref(rec, sizes, x, h0)
    testing.assert_close(o, ro, "float32", f"{name} staged output")
    testing.assert_close(ht, rht, "float32", f"{name} staged final state")


def test_staged_and_fused_agree():
    """The same chunk size makes the staged form and the fused one the same sums in a
    different order: equal to float32 rounding (ieee dots), on every staged recurrence."""
    for name in STAGED:
        rec, sizes, x = _inputs(name, 96, seed=5)
        bt = {"time": 32}
        a, sa = _run(rec, sizes, x, None, {"algorithm": "staged", "dot_precision": "ieee",
                                           "block_sizes": bt})
        b, sb = _run(rec, sizes, x, None, {"algorithm": "chunked", "dot_precision": "ieee",
                                           "block_sizes": bt})
        testing.assert_close(a, b, "float32", f"{name} staged vs fused output")
        testing.assert_close(sa, sb, "float32", f"{name} staged vs fused final state")


def _gate(rec):
    cs = chunked.analyze(rec, prev=True).only()
    if cs.decay is None:
        return None
    node = cs.log_decay if cs.decay_is_exp else cs.decay
    return (node.arg, -np.inf if cs.decay_is_exp else 0.0) if node.op.value == "input" else None


@pytest.mark.parametrize("name", STAGED)
def test_staged_edges_nan_placement_and_resets_across_chunks(name):
    """A NaN in v at step 70 (second chunk), a NaN in k at step 140 (third chunk), and hard
    resets at steps 63 and 64 (the last step of a chunk and the first of the next): the
    output is non-finite exactly where the reference's is, and equal elsewhere; the final
    state likewise."""
    rec, sizes, x = _inputs(name, 150, seed=2)
    for inp, step in (("v", 70), ("x", 70), ("k", 140), ("B", 140)):
        if inp in x:
            t_ax = rec.input(inp).dims.index(rec.time)
            idx = [0] * x[inp].ndim
            idx[t_ax] = step
            x[inp][tuple(idx)] = np.nan
    g = _gate(rec)
    if g is not None:
        t_ax = rec.input(g[0]).dims.index(rec.time)
        for step in (63, 64):
            sl = [slice(None)] * x[g[0]].ndim
            sl[t_ax] = step
            x[g[0]][tuple(sl)] = g[1]
    o, ht = _run(rec, sizes, x, None, {"algorithm": "staged", "dot_precision": "ieee"})
    ro, rht = _ref(rec, sizes, x, None)
    for got, want, what in ((o, ro, "output"), (ht, rht, "final state")):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=what)
        fin = np.isfinite(want)
        assert fin.any()
        testing.assert_close(np.where(fin, got, 0.0), np.where(fin, want, 0.0), "float32",
                             f"{name} staged {what} (finite part)")


def _bf16_error(name, algorithm, T):
    rec, sizes, x = _inputs(name, T)
    tx = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in x.items()}
    ref = REF.run(rec, {k: v.double().numpy() for k, v in tx.items()}, sizes, None, False, {})
    res = TRI.run(rec, tx, sizes, None, False, {"algorithm": algorithm})  # default precision
    o = rec.outputs[0].name
    return res.outputs[o], ref.outputs[o]


@pytest.mark.parametrize("name,algorithm", [("mamba2", "chunked"), ("delta_net", "chunked"),
                                            ("retnet", "staged")])
def test_default_dot_precision_is_within_the_bf16_table(name, algorithm):
    """dot_precision="auto" at bf16: the measured worst cases of docs/triton.md (every
    operand in bf16 exceeded the table on these)."""
    out, ref = _bf16_error(name, algorithm, 64)
    testing.assert_close(out, ref, "bfloat16", f"{name} {algorithm} bf16 default dots")


@pytest.mark.slow
@pytest.mark.parametrize("name", CHUNKED + [f"{n}:staged" for n in STAGED])
def test_default_dot_precision_bf16_at_T257(name):
    """The measurement of docs/triton.md as a test: every chunked recurrence at T=257."""
    n, _, algo = name.partition(":")
    out, ref = _bf16_error(n, algo or "chunked", 257)
    testing.assert_close(out, ref, "bfloat16", f"{name} bf16 default dots, T=257")


@pytest.mark.parametrize("name", HOUSEHOLDER)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
def test_staged_householder_matches_the_reference(name, T):
    """The three householder stages (blocked UT inverse; R = P S + Q and the state pass;
    outputs) at T around the default 32-step chunk and 16/64-step ones (block_sizes: one
    diagonal block, four block rows of the inverse), with an initial
    state and value blocks of 16 over several programs: outputs and final state."""
    rec, sizes, x = _inputs(name, T, seed=3)
    s = rec.states[0]
    h0 = {s.name: np.random.default_rng(4).standard_normal(
        [sizes[d] for d in s.dims]).astype(np.float32)}
    ro, rht = _ref(rec, sizes, x, h0)
    V = chunked.analyze(rec, prev=True).only().V
    for bt in ((None, 16, 64) if T in (63, 64, 65) else (None,)):
        blocks = {V: 16} if bt is None else {V: 16, rec.time: bt}
        o, ht = _run(rec, sizes, x, h0, {"algorithm": "staged", "dot_precision": "ieee",
                                         "block_sizes": blocks})
        testing.assert_close(o, ro, "float32", f"{name} staged T={T} BT={bt} output")
        testing.assert_close(ht, rht, "float32", f"{name} staged T={T} BT={bt} final state")


@pytest.mark.parametrize("name", HOUSEHOLDER)
def test_staged_householder_bf16_default_dots(name):
    """bf16 inputs, dot_precision="auto" (tf32x3 for the UT inverse and A's products, the
    fused kernel's roles elsewhere), against the reference on the bf16-rounded inputs, with
    the bf16 table; the launcher allocates the output NaN-filled, so a row the kernel does
    not write fails the finiteness check."""
    rec, sizes, x = _inputs(name, 65, seed=6)
    tx = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in x.items()}
    ref = REF.run(rec, {k: v.double().numpy() for k, v in tx.items()}, sizes, None, True, {})
    res = TRI.run(rec, tx, sizes, None, True, {"algorithm": "staged"})
    o, st = rec.outputs[0].name, rec.states[0].name
    assert np.isfinite(res.outputs[o].float().numpy()).all()
    testing.assert_close(res.outputs[o], ref.outputs[o], "bfloat16", f"{name} staged bf16")
    testing.assert_close(res.final_states[st], ref.final_states[st], "bfloat16",
                         f"{name} staged bf16 final state")


@pytest.mark.parametrize("name,heads", [("simple_gla", 132), ("gla", 8),
                                        pytest.param("delta_net", 132, marks=pytest.mark.slow),
                                        ("gated_delta_net", 8)])  # delta_net-132: ~60 s
def test_auto_launcher_rule_fused_with_many_programs_else_staged(name, heads):
    """algorithm="auto": B·H·⌈V/BV⌉ >= 132 programs run the fused kernel, fewer the three
    stages (staged.Lowering.SMS). Which one ran is seen bit-for-bit: the result equals the
    explicit algorithm's (same kernel code, same chunking), and both match the reference."""
    e = scancc.get(name)
    rec = e.build()
    V = chunked.analyze(rec, prev=True).only().V
    sizes = testing.default_sizes(rec, time=40)
    sizes.update({"batch": 1, "heads": heads, chunked.analyze(rec, prev=True).only().K: 16, V: 16})
    x = {k: np.asarray(v, dtype=np.float32)
         for k, v in testing.sample_inputs(rec, sizes, 7, e.hints).items()}
    want = "chunked" if heads >= 132 else "staged"
    assert TRI.algorithm(rec, {}) == "chunked"  # the chunked form, the launcher picks how
    auto, _ = _run(rec, sizes, x, None, {"dot_precision": "ieee"})
    same, _ = _run(rec, sizes, x, None, {"algorithm": want, "dot_precision": "ieee"})
    np.testing.assert_array_equal(auto, same)
    ro, _ = _ref(rec, sizes, x, None)
    testing.assert_close(auto, ro, "float32", f"{name} auto ({want})")


def _prev_readout(kind):
    """A [b, h, k, v] state read as RWKV-6 reads it, o = sum(prev(S) * q, k) + (q . k) v (a
    bonus term that reads no state), with an identity, scalar or key-diagonal decay."""
    from scancc.ir import Builder, diagonal, exp, identity, prev, reduce_sum, scalar
    r = Builder(f"prev_{kind}")
    b, t, h = r.dim("b", "batch"), r.dim("t", "time"), r.dim("h", "head")
    k, v = r.dim("key"), r.dim("value")
    q, kk, vv = r.input("q", [b, t, h, k]), r.input("k", [b, t, h, k]), r.input("v", [b, t, h, v])
    tr = identity()
    if kind == "scalar":
        tr = scalar(exp(r.input("g", [b, t, h])))
    elif kind == "diagonal":
        tr = diagonal(exp(r.input("g", [b, t, h, k])))
    r.state("S", [b, h, k, v], tr, inject=kk * vv)
    r.output("o", [b, t, h, v], reduce_sum(prev("S") * q, k) + reduce_sum(q * kk, k) * vv)
    return r.build()


@pytest.mark.parametrize("kind", ["identity", "scalar", "diagonal"])
@pytest.mark.parametrize("algorithm", ["chunked", "staged"])
def test_prev_readout_matches_the_reference(kind, algorithm):
    """The prev(S) readout rule (strict mask, e^{c_(t-1)}) on each decay kind, fused and
    staged, T = 150 (partial last chunk), value blocks of 16 over two programs, with an
    initial state and a hard reset (a log-decay of -inf) at step 70, against the reference."""
    rec = _prev_readout(kind)
    sizes = {"b": 2, "t": 150, "h": 2, "key": 8, "value": 24}
    rng = np.random.default_rng(3)
    x = {"q": rng.standard_normal((2, 150, 2, 8)), "k": rng.standard_normal((2, 150, 2, 8)) / 3,
         "v": rng.standard_normal((2, 150, 2, 24))}
    if kind != "identity":
        shape = (2, 150, 2) + ((8,) if kind == "diagonal" else ())
        x["g"] = -np.logaddexp(0.0, -(rng.standard_normal(shape) + 2.0))
        x["g"][0, 70] = -np.inf
    x = {n: a.astype(np.float32) for n, a in x.items()}
    h0 = {"S": rng.standard_normal((2, 2, 8, 24)).astype(np.float32)}
    o, ht = _run(rec, sizes, x, h0, {"algorithm": algorithm, "dot_precision": "ieee",
                                     "block_sizes": {"value": 16}})
    ro, rht = _ref(rec, sizes, x, h0)
    assert np.isfinite(o).all()
    testing.assert_close(o, ro, "float32", f"prev {kind} {algorithm} output", T=150)
    testing.assert_close(ht, rht, "float32", f"prev {kind} {algorithm} final state", T=150)


def test_householder_with_an_inject_other_than_the_reflection_key():
    """S = e^g (I - beta k kᵀ) S + u vᵀ with u != k: the general householder stages (not the
    shared-k form delta_net and gated_delta_net take), T = 70 (a partial last chunk), against
    the float64 reference."""
    import torch

    from scancc.backends.triton import staged
    from scancc.ir import Builder, exp, householder, reduce_sum
    r = Builder("hh_general_inject")
    b, t, h = r.dim("b", "batch"), r.dim("t", "time"), r.dim("h", "head")
    k, v = r.dim("key"), r.dim("value")
    q, kk = r.input("q", [b, t, h, k]), r.input("k", [b, t, h, k])
    vv, uu = r.input("v", [b, t, h, v]), r.input("u", [b, t, h, k])
    beta, g = r.input("beta", [b, t, h]), r.input("g", [b, t, h])
    S = r.state("S", [b, h, k, v], householder(k, kk, beta, exp(g)), inject=uu * vv)
    r.output("o", [b, t, h, v], reduce_sum(S * q, k))
    rec = r.build()
    assert not staged.Lowering(rec, {"algorithm": "staged"}).hh_shared
    rng = np.random.default_rng(0)
    B, T, H, K, V = 2, 70, 2, 8, 24
    kn = rng.standard_normal((B, T, H, K))
    x = dict(q=rng.standard_normal((B, T, H, K)), k=kn / np.linalg.norm(kn, axis=-1, keepdims=True),
             v=rng.standard_normal((B, T, H, V)), u=0.3 * rng.standard_normal((B, T, H, K)),
             beta=rng.uniform(0, 1, (B, T, H)), g=-rng.uniform(0, 0.5, (B, T, H)))
    want = scancc.compile(rec, "reference")(*(torch.tensor(a) for a in x.values()))
    got = scancc.compile(rec, "triton", algorithm="staged")(
        *(torch.tensor(a, dtype=torch.float32) for a in x.values()))
    testing.assert_close(got.double().numpy(), want.numpy(), "float32", "general householder")
