"""Gradients through B'MOJO (issue 13): the derived adjoint of cascaded states and of the
selection kind (ir/passes/adjoint.py, docs/bmojo.md "Gradients").

Truth: finite differences (torch.autograd.gradcheck, float64, on the reference), and torch
autograd through a plain loop written here from the issue's contract, in which the memory's
choice is made with torch ops under no_grad and the attention is differentiable (the
convention the adjoint implements: no gradient through which token is stored). Triton and the
NKI emulator against the reference."""
import numpy as np
import pytest

import scancc
import scancc.autograd as ag
from scancc.autograd import adjoint, backward_target, has_adjoint
from scancc.library import bmojo

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")

NAMES = ("q", "k", "v", "kf", "vf", "y")


def _inputs(B=1, T=7, H=2, K=3, V=2, seed=0):
    g = np.random.default_rng(seed)
    return {n: g.standard_normal((B, T, H, K if n in ("q", "k", "kf") else V)) for n in NAMES}


def _tie_inputs(scores, K=2, seed=0):
    """W = 1, P = 1, one head, V = 1: y_j = y_{j-1} + sqrt(s_j), so the innovation of token j
    is exactly s_j (perfect squares: ties are exact ties)."""
    n = len(scores)
    T = n + 2
    g = np.random.default_rng(seed)
    x = {n_: g.standard_normal((1, T, 1, K if n_ in ("q", "k", "kf") else 1)) for n_ in NAMES}
    y = np.zeros((1, T, 1, 1))
    y[0, :n, 0, 0] = np.cumsum(np.sqrt(np.asarray(scores, float)))
    x["y"] = y
    return x


def _torch_loop(x, W, m, P, scale=None):
    """o from the issue's definitions, differentiable in q, k, v, kf, vf (a list of steps per
    batch and head, stacked): the memory's choice (s_j, free slot, smallest score, lowest
    slot on ties) made under no_grad from y, then one softmax over the window, the fading
    window and the stored tokens' (k_j, v_j)."""
    q, k, v, kf, vf, y = (x[n] for n in NAMES)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            slots = [None] * m   # (score, j)
            steps = []
            for t in range(T):
                j = t - W
                if j >= 0:
                    with torch.no_grad():
                        yh = sum(y[b, j - i, h] if j - i >= 0 else torch.zeros_like(y[b, j, h])
                                 for i in range(1, P + 1)) / P
                        s = float(((y[b, j, h] - yh) ** 2).sum())
                        free = [i for i in range(m) if slots[i] is None]
                        if free:
                            slots[free[0]] = (s, j)
                        else:
                            i = min(range(m), key=lambda i: (slots[i][0], i))
                            if s > slots[i][0]:
                                slots[i] = (s, j)
                ks = [k[b, i, h] for i in range(max(0, t - W + 1), t + 1)]
                vs = [v[b, i, h] for i in range(max(0, t - W + 1), t + 1)]
                ks += [kf[b, i, h] for i in range(max(0, t - 2 * W + 1), j + 1)]
                vs += [vf[b, i, h] for i in range(max(0, t - 2 * W + 1), j + 1)]
                ks += [k[b, sl[1], h] for sl in slots if sl is not None]
                vs += [v[b, sl[1], h] for sl in slots if sl is not None]
                p = torch.softmax(torch.stack(ks) @ q[b, t, h] * scale, 0)
                steps.append(p @ torch.stack(vs))
            heads.append(torch.stack(steps))            # [T, V]
        rows.append(torch.stack(heads, 1))               # [T, H, V]
    return torch.stack(rows)                             # [B, T, H, V]


def _out(r):
    return r[0] if isinstance(r, tuple) else r


def test_bmojo_has_a_derived_adjoint():
    assert has_adjoint(bmojo(window=2, memory=3, predictor=2))
    b = adjoint(bmojo(window=2, memory=3, predictor=2)).backward
    # the selection states' adjoints are diagonals (1 - e_t), e_t one let per choice
    assert [l.name for l in b.lets] == ["choice_mem_key"]
    kinds = {s.name: s.transition.kind.value for s in b.states}
    assert kinds["nu_mem_k"] == kinds["nu_mem_v"] == kinds["nu_mem_key"] == "diagonal"
    assert kinds["nu_kw"] == "shift_adjoint"


@pytest.mark.parametrize("W,m,P,scores", [
    (2, 3, 2, None),              # random scores
    (1, 2, 1, [4, 4, 1, 4, 9]),   # ties with the smallest stored score: no replace
    (1, 2, 1, [1, 1, 9, 9, 1]),   # tied smallest: the lowest slot goes
    (2, 9, 1, None),              # m > the number of tokens: the memory never fills
])
def test_bmojo_gradients_match_torch_autograd_through_the_contract_loop(W, m, P, scores):
    x = _inputs(T=8) if scores is None else _tie_inputs(scores)
    ker = scancc.compile(bmojo(window=W, memory=m, predictor=P), "reference")
    t = {n: torch.tensor(a, requires_grad=True) for n, a in x.items()}
    do = torch.tensor(np.random.default_rng(5).standard_normal(x["v"].shape))
    (_out(ker(*t.values())) * do).sum().backward()
    u = {n: torch.tensor(a, requires_grad=True) for n, a in x.items()}
    want = _torch_loop(u, W, m, P)
    (want * do).sum().backward()
    with torch.no_grad():
        np.testing.assert_allclose(_out(ker(*t.values())).numpy(), want.numpy(),
                                   rtol=1e-12, atol=1e-12)
    for n in NAMES:
        g = u[n].grad if u[n].grad is not None else torch.zeros_like(u[n])
        np.testing.assert_allclose(t[n].grad.numpy(), g.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=n)
    assert not np.allclose(t["k"].grad.numpy(), 0.0)


def _gradcheck(W, m, P, x, wrt, seed=3, init=True):
    """gradcheck of sum(w_o o) + sum over the final states of w_s h_T (one output element, so
    one backward per check) w.r.t. the inputs ``wrt`` and, if ``init``, the memory's initial
    state (two filled slots whose stored tokens stay until replaced)."""
    rec = bmojo(window=W, memory=m, predictor=P)
    ker = scancc.compile(rec, "reference")
    g = np.random.default_rng(seed)
    sizes = {"batch": 1, "heads": x["q"].shape[2], "key": x["q"].shape[3],
             "value": x["v"].shape[3]}
    sizes.update({d.name: d.size for d in rec.dims if d.size})
    h0 = {s.name: torch.zeros(tuple(sizes[d] for d in s.dims), dtype=torch.float64)
          for s in rec.states}
    if init:
        key = np.zeros(h0["mem_key"].shape)
        key[..., :2] = 1.0 + g.uniform(0.5, 3.0, key[..., :2].shape)
        h0["mem_key"] = torch.tensor(key)
        for s in ("mem_k", "mem_v"):
            a = g.standard_normal(tuple(h0[s].shape))
            a[..., 2:, :] = 0.0
            h0[s] = torch.tensor(a)
    grads_init = ("mem_k", "mem_v", "mem_key") if init else ()
    for s in grads_init:
        h0[s].requires_grad_(True)
    w_o = torch.tensor(g.standard_normal(x["v"].shape))
    w_s = {s.name: torch.tensor(g.standard_normal(tuple(h0[s.name].shape))) for s in rec.states}
    t = {n: torch.tensor(a, requires_grad=n in wrt) for n, a in x.items()}

    def f(*args):
        xs = dict(t, **dict(zip(wrt, args[:len(wrt)])))
        init_ = dict(h0, **dict(zip(grads_init, args[len(wrt):])))
        o, fin = ker(*(xs[n] for n in NAMES), initial_state=init_, output_final_state=True)
        return (o * w_o).sum() + sum((fin[s] * w).sum() for s, w in w_s.items())

    args = tuple(t[n] for n in wrt) + tuple(h0[s] for s in grads_init)
    assert torch.autograd.gradcheck(f, args, atol=1e-8, rtol=1e-6)


def test_gradcheck_bmojo_every_input_and_the_memorys_initial_state(monkeypatch):
    """Random scores (no ties within the finite-difference step): every input, y included
    (y reaches the final stored scores mem_key, the items of that selection state), and the
    initial memory (a stored token's gradient until it is replaced). Chunks of 3 over T = 7:
    the backward recomputes the choices from the chunk-boundary states."""
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 3)
    x = _inputs(T=7, H=1, K=2, V=2)
    _gradcheck(2, 2, 2, x, NAMES)


@pytest.mark.parametrize("W,m,P,scores", [
    (1, 2, 1, [4, 4, 1, 4, 9]),   # ties
    (1, 6, 1, [1, 9, 4]),         # m > the number of tokens
])
def test_gradcheck_bmojo_with_ties_and_a_memory_larger_than_the_tokens(W, m, P, scores):
    """y fixed (a finite difference in y would break the ties: the choice is not
    differentiable there, and the adjoint says nothing about it)."""
    x = _tie_inputs(scores)
    _gradcheck(W, m, P, x, ("q", "k", "v", "kf", "vf"), init=m < 6)


def test_triton_gradients_match_the_reference():
    """bmojo's backward on Triton (its own forward, recomputation and backward kernels: the
    backward target is triton, not a fallback) against the reference in float64."""
    if not scancc.backends.get("triton").available()[0]:
        pytest.skip("the Triton backend needs triton")
    rec = bmojo(window=2, memory=3, predictor=2)
    x = _inputs(T=7)
    do = np.random.default_rng(2).standard_normal(x["v"].shape)
    grads = {}
    for target, dt in (("reference", torch.float64), ("triton", torch.float32)):
        ker = scancc.compile(rec, target)
        if target == "triton":
            assert backward_target(ker, rec) == "triton"
        t = {n: torch.tensor(a, dtype=dt, requires_grad=True) for n, a in x.items()}
        (_out(ker(*t.values())).double() * torch.tensor(do)).sum().backward()
        grads[target] = {n: t[n].grad.double().numpy() for n in NAMES}
    for n in NAMES:   # float32 kernels: measured max abs error 2.0e-7 at this size
        np.testing.assert_allclose(grads["triton"][n], grads["reference"][n], rtol=1e-5,
                                   atol=1e-5, err_msg=n)


@pytest.mark.parametrize("name", ["bmojo_f", "bmojo"])
def test_nki_gradients_match_the_reference(name, monkeypatch):
    """Gradients through an NKI kernel call run on NKI itself: its forward chunks, the states
    view that recomputes every state sequence (bmojo's has h_valid without heads: the layout
    search puts heads on the partitions, the selection rule's memory axis alone per
    partition) and the backward recurrence all run on the NKI emulator (recorded here; the
    reference backend runs nothing), without a fallback warning; they equal the reference's
    gradients in float64."""
    import warnings
    from scancc.registry import get
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 4)   # chunks crossing: T = 7 in two
    rec = get("bmojo_f").build(window=2) if name == "bmojo_f" else \
        bmojo(window=2, memory=2, predictor=2)
    names = [i.name for i in rec.inputs]
    x = {n: a for n, a in _inputs(B=2, T=7, H=2, K=3, V=2).items() if n in names}
    do = np.random.default_rng(2).standard_normal(x["v"].shape)
    ran = {"nki": [], "reference": []}
    for target in ran:
        be = scancc.backends.get(target)
        monkeypatch.setattr(be, "run", (lambda f, log: lambda r, *a, **k: (
            log.append(r.name), f(r, *a, **k))[1])(be.run, ran[target]))
    grads = {}
    for target, dt in (("reference", torch.float64), ("nki", torch.float32)):
        ker = scancc.compile(rec, target)
        ran["reference"].clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ag.BackwardFallbackWarning)
            if target == "nki":
                assert backward_target(ker, rec) == "nki"
            t = {n: torch.tensor(a, dtype=dt, requires_grad=True) for n, a in x.items()}
            (_out(ker(*t.values())).double() * torch.tensor(do)).sum().backward()
        grads[target] = {n: t[n].grad.double().numpy() for n in names}
    assert ran["reference"] == []   # the NKI pass ran nothing on the reference
    assert {f"{name}_states", f"{name}_bwd", name} <= set(ran["nki"])
    for n in names:   # float32 kernels
        np.testing.assert_allclose(grads["nki"][n], grads["reference"][n], rtol=1e-5,
                                   atol=1e-5, err_msg=n)
    assert not np.allclose(grads["nki"]["k"], 0.0)


@pytest.mark.slow
def test_nki_runs_the_derived_backward_recurrence_like_the_reference():
    """The backward recurrence itself on the NKI emulator, fed the reference's recomputed
    states (the whole path through a kernel call: test_nki_gradients_match_the_reference)."""
    rec = bmojo(window=2, memory=2, predictor=1)
    adj = adjoint(rec)
    x = _inputs(T=6, H=2, K=2, V=2)
    do = np.random.default_rng(4).standard_normal(x["v"].shape)
    ref = scancc.compile(adj.states_view, "reference")
    res = ref(*(x[n] for n in NAMES))
    seqs = dict(zip([o.name for o in adj.states_view.outputs], res)) \
        if isinstance(res, tuple) else res
    feed = {n: np.ascontiguousarray(np.flip(a, 1)) for n, a in x.items()}
    feed[adj.cotangent["o"]] = np.ascontiguousarray(np.flip(do, 1))
    for s in rec.states:
        now, before = adj.state_seq[s.name]
        hs = np.flip(np.asarray(seqs[now]), 0)
        feed[now] = np.ascontiguousarray(hs)
        feed[before] = np.ascontiguousarray(np.concatenate([hs[1:], np.zeros_like(hs[:1])]))
    names = [i.name for i in adj.backward.inputs]
    feed = {n: feed[n] for n in names}
    want = scancc.compile(adj.backward, "reference")(**feed, output_final_state=True)
    got = scancc.compile(adj.backward, "nki")(**{n: np.float32(a) for n, a in feed.items()},
                                                output_final_state=True)
    wo, wf = want
    go, gf = got
    wo = wo if isinstance(wo, dict) else dict(zip([o.name for o in adj.backward.outputs], wo))
    go = go if isinstance(go, dict) else dict(zip([o.name for o in adj.backward.outputs], go))
    for n in wo:
        np.testing.assert_allclose(np.asarray(go[n], np.float64), wo[n], rtol=1e-4, atol=1e-5,
                                   err_msg=n)
    for n in wf:
        np.testing.assert_allclose(np.asarray(gf[n], np.float64), wf[n], rtol=1e-4, atol=1e-5,
                                   err_msg=n)
    assert any(np.abs(wo[n]).max() > 0 for n in wo)


def test_cascade_with_prev_reads_matches_torch_autograd_through_its_loop(monkeypatch):
    """A cascade of two diagonal states exercising every path of the derived adjoint:
    c reads state(a) (its inject), prev(a) (its decay), prev(c) (its own inject, apart from
    its transition) and the readout reads prev(c):
        a_t = g_t a_{t-1} + x_t
        c_t = sigmoid(a_{t-1}) c_{t-1} + a_t^2 + x_t c_{t-1}
        o_t = c_t + a_t c_{t-1}
    Gradients of every input, both initial states (and through both final states) against
    torch autograd through that loop, in chunks of 2 (the backward crosses chunk boundaries)."""
    from scancc.ir import Builder, diagonal, prev, sigmoid
    r = Builder("casc_grad")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x, g = r.input("x", [b, t, d]), r.input("g", [b, t, d])
    a = r.state("a", [b, d], diagonal(g), inject=x)
    c = r.state("c", [b, d], diagonal(sigmoid(prev("a"))), inject=a * a + x * prev("c"))
    r.output("o", [b, t, d], c + a * prev("c"))
    rec = r.build()
    assert rec.cascaded == ("c",) and has_adjoint(rec)
    rng = np.random.default_rng(7)
    xs, gs = rng.standard_normal((2, 7, 3)) * 0.5, rng.random((2, 7, 3))
    a0, c0 = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    w, wa, wc = (torch.tensor(rng.standard_normal(s)) for s in ((2, 7, 3), (2, 3), (2, 3)))

    def loop(x_, g_, a_, c_):
        outs = []
        for i in range(7):
            a_new = g_[:, i] * a_ + x_[:, i]
            c_new = torch.sigmoid(a_) * c_ + a_new * a_new + x_[:, i] * c_
            outs.append(c_new + a_new * c_)
            a_, c_ = a_new, c_new
        return (torch.stack(outs, 1) * w).sum() + (a_ * wa).sum() + (c_ * wc).sum()

    want = [torch.tensor(v, requires_grad=True) for v in (xs, gs, a0, c0)]
    loop(*want).backward()
    got = [torch.tensor(v, requires_grad=True) for v in (xs, gs, a0, c0)]
    ker = scancc.compile(rec, "reference")
    monkeypatch.setattr(ag, "DEFAULT_CHUNK", 2)
    o, fin = ker(x=got[0], g=got[1], initial_state={"a": got[2], "c": got[3]},
                 output_final_state=True)
    ((o * w).sum() + (fin["a"] * wa).sum() + (fin["c"] * wc).sum()).backward()
    for name, u, v in zip(("x", "g", "a0", "c0"), got, want):
        assert v.grad.abs().max() > 0
        np.testing.assert_allclose(u.grad.numpy(), v.grad.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_prev_of_a_shift_state_read_by_a_cascade_has_no_derived_adjoint():
    """nu_{t-1} of a shift state is A^T (nu_t + g_t): a cotangent for h_{t-1} cannot be added
    after the transposed transition, so derive names the read (docs/ir.md)."""
    from scancc.ir import Builder, IRError, identity, prev, shift, dot, iota, step
    r = Builder("casc_shift")
    b, t, w, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("w", size=3), \
        r.dim("chan")
    x = r.input("x", [b, t, d])
    r.state("win", [b, w, d], shift(w), inject=x)
    c = r.state("c", [b, d], identity(), inject=dot(prev("win"), step(-iota(w)), w))
    r.output("o", [b, t, d], c)
    rec = r.build()
    assert not has_adjoint(rec)
    with pytest.raises(IRError, match=r"state 'win': the adjoint of a read of prev\(win\) by a "
                                      r"cascaded state of a shift state is not derived yet"):
        adjoint(rec)
