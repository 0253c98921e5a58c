"""B'MOJO (issue 13): the joint softmax, bmojo_f, and (below) cascaded states, the selection
kind and bmojo, each against truth written here from the definitions: explicit masked-softmax
attention over the union of the windows, the two-attention + log-sum-exp merge of
hybrid-model-factory's B'MOJO-F, plain Python loops."""
import dataclasses
import re

import numpy as np
import pytest

import scancc
from scancc.ir import (Builder, VerifyError, const, diagonal, dot, identity, joint_softmax,
                       parse_recurrence, prev)
from scancc.ir.expr import Node, Op
from scancc.ir.passes.softmax import desugar_joint_softmax
from scancc.library import bmojo

rng = np.random.default_rng(13)


def _attn_inputs(B=2, T=11, H=2, K=4, V=3, seed=0):
    g = np.random.default_rng(seed)
    q, k, kf = (g.standard_normal((B, T, H, K)) for _ in range(3))
    v, vf = (g.standard_normal((B, T, H, V)) for _ in range(2))
    return q, k, v, kf, vf


def _keys_bmojo_f(t, W):
    """(source, j) of every key o_t attends to: the window and the fading window."""
    return [("w", j) for j in range(max(0, t - W + 1), t + 1)] + \
        [("f", j) for j in range(max(0, t - 2 * W + 1), t - W + 1)]


def _masked_softmax_attention(q, k, v, kf, vf, keys_of, scale=None):
    """o_t = softmax(scale q_t . key) over an explicit list of keys, per batch and head."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    o = np.full(v.shape, np.nan)
    src = {"w": (k, v), "f": (kf, vf)}
    for t in range(T):
        keys = keys_of(t)
        kk = np.stack([src[s][0][:, j] for s, j in keys], -2)   # [B, H, n, K]
        vv = np.stack([src[s][1][:, j] for s, j in keys], -2)   # [B, H, n, V]
        logit = np.einsum("bhk,bhnk->bhn", q[:, t], kk) * scale
        p = np.exp(logit - logit.max(-1, keepdims=True))
        o[:, t] = np.einsum("bhn,bhnv->bhv", p / p.sum(-1, keepdims=True), vv)
    return o


def _lse_merge(q, k, v, kf, vf, W, scale=None):
    """hybrid-model-factory's B'MOJO-F: a sliding-window attention over (k, v) and one over the
    fading tokens delayed by W, merged by their log-sum-exps."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    o = np.full(v.shape, np.nan)
    for t in range(T):
        parts = []
        for kk, vv, js in ((k, v, range(max(0, t - W + 1), t + 1)),
                           (kf, vf, range(max(0, t - 2 * W + 1), t - W + 1))):
            js = list(js)
            if not js:
                continue
            logit = np.einsum("bhk,bjhk->bhj", q[:, t], kk[:, js]) * scale
            m = logit.max(-1, keepdims=True)
            lse = np.log(np.exp(logit - m).sum(-1)) + m[..., 0]
            att = np.einsum("bhj,bjhv->bhv", np.exp(logit - lse[..., None]), vv[:, js])
            parts.append((att, lse))
        if len(parts) == 1:
            o[:, t] = parts[0][0]
        else:
            (a1, l1), (a2, l2) = parts
            lse = np.logaddexp(l1, l2)
            o[:, t] = a1 * np.exp(l1 - lse)[..., None] + a2 * np.exp(l2 - lse)[..., None]
    return o


def _out(r):
    return np.asarray(r[0] if isinstance(r, tuple) else r, dtype=np.float64)


# ---------------------------------------------------------------- joint softmax (IR)

def _jsm_rec(mask_w=True):
    r = Builder("jsm")
    b, t, w, f = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("w", size=3), \
        r.dim("f", size=2)
    x, y = r.input("x", [b, t, w]), r.input("y", [b, t, f])
    m = r.input("m", [b, t, w])
    r.state("acc", [b, w], identity(), inject=x)  # a recurrence needs a state
    pw, pf = joint_softmax([(x, w, m if mask_w else 1.0), (y, f)])
    r.output("ow", [b, t, w], pw)
    r.output("of", [b, t, f], pf)
    return r.build()


def test_joint_softmax_is_one_normalization_over_the_union():
    rec = _jsm_rec()
    x, y = rng.standard_normal((2, 5, 3)) * 3, rng.standard_normal((2, 5, 2)) * 3
    m = (rng.random((2, 5, 3)) > 0.4).astype(float)
    m[0, 0] = 0.0
    z = np.concatenate([np.where(m != 0, x, -np.inf), y], -1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for r in (rec, desugar_joint_softmax(rec)):
        ker = scancc.compile(r, "reference")
        out = ker(x=x, y=y, m=m)
        ow, of = out["ow"], out["of"]
        np.testing.assert_allclose(np.asarray(ow), p[..., :3], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(of), p[..., 3:], rtol=1e-12, atol=1e-14)
    assert desugar_joint_softmax(rec) != rec
    assert not any(n.op is Op.JSOFTMAX for _, e in desugar_joint_softmax(rec).exprs()
                   for n in e.walk())


def test_joint_softmax_with_every_key_masked_reads_nothing():
    r = Builder("jsm0")
    b, t, w, f = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("w", size=3), \
        r.dim("f", size=2)
    x, y = r.input("x", [b, t, w]), r.input("y", [b, t, f])
    r.state("acc", [b, w], identity(), inject=x)
    pw, pf = joint_softmax([(x, w, 0.0), (y, f, 0.0)])
    r.output("o", [b, t], dot(pw, x, w) + dot(pf, y, f))
    rec = r.build()
    x, y = rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 4, 2))
    for rr in (rec, desugar_joint_softmax(rec)):
        assert np.all(np.asarray(scancc.compile(rr, "reference")(x=x, y=y)) == 0.0)


def test_joint_softmax_text_form_round_trips():
    rec = _jsm_rec()
    text = str(rec)
    assert "joint_softmax(0, x, w, m, y, f, 1.0)" in text
    assert parse_recurrence(text) == rec
    bf = scancc.get("bmojo_f").build(window=2)
    assert parse_recurrence(str(bf)) == bf


def _with_output(rec, expr):
    return dataclasses.replace(rec, outputs=(dataclasses.replace(rec.outputs[0], expr=expr),
                                             *rec.outputs[1:]))


@pytest.mark.parametrize("make,msg", [
    (lambda x, y, m: Node(Op.JSOFTMAX, (x, m, y, const(1.0)), (0, ("w", "w"))), "repeat a dim"),
    (lambda x, y, m: Node(Op.JSOFTMAX, (x, m, y, const(1.0)), (2, ("w", "f"))), "out of range"),
    (lambda x, y, m: Node(Op.JSOFTMAX, (x, m, y), (0, ("w", "f"))), "a (logits, dim, mask)"),
    (lambda x, y, m: Node(Op.JSOFTMAX, (y, const(1.0), y, const(1.0)), (0, ("w", "f"))),
     "part 0: dim 'w' is not a dim of its logits"),
    (lambda x, y, m: Node(Op.JSOFTMAX, (x, m, y * x, const(1.0)), (0, ("w", "f"))),
     "a key dim belongs to one part"),
    (lambda x, y, m: Node(Op.JSOFTMAX, (x, m, y, const(1.0)), (0, ("w", "time"))),
     "not a declared non-time dim"),
])
def test_joint_softmax_verifier_errors(make, msg):
    rec = _jsm_rec()
    x, y, m = (Node(Op.INPUT, (), n) for n in ("x", "y", "m"))
    with pytest.raises(VerifyError, match=re.escape(msg)):
        from scancc.ir.verify import verify
        verify(_with_output(rec, make(x, y, m)))


# ---------------------------------------------------------------- bmojo_f

@pytest.mark.parametrize("W", [1, 3])
def test_bmojo_f_reference_matches_masked_attention_and_lse_merge(W):
    q, k, v, kf, vf = _attn_inputs(T=9)
    ker = scancc.compile("bmojo_f", "reference", window=W)
    o = _out(ker(q, k, v, kf, vf))
    truth = _masked_softmax_attention(q, k, v, kf, vf, lambda t: _keys_bmojo_f(t, W))
    np.testing.assert_allclose(o, truth, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(o, _lse_merge(q, k, v, kf, vf, W), rtol=1e-10, atol=1e-12)


def test_bmojo_f_scale_is_passed_on():
    q, k, v, kf, vf = _attn_inputs(T=6)
    o = _out(scancc.compile("bmojo_f", "reference", window=2, scale=0.3)(q, k, v, kf, vf))
    truth = _masked_softmax_attention(q, k, v, kf, vf, lambda t: _keys_bmojo_f(t, 2), 0.3)
    np.testing.assert_allclose(o, truth, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", ["triton", "nki"])
def test_bmojo_f_backends_match_masked_attention(target):
    q, k, v, kf, vf = (np.float32(a) for a in _attn_inputs(T=10))
    o = _out(scancc.compile("bmojo_f", target, window=3)(q, k, v, kf, vf))
    truth = _masked_softmax_attention(*(np.float64(a) for a in (q, k, v, kf, vf)),
                                      lambda t: _keys_bmojo_f(t, 3))
    np.testing.assert_allclose(o, truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["reference", "triton"])
def test_bmojo_f_split_run_with_final_state_equals_one_run(target):
    q, k, v, kf, vf = (np.float32(a) for a in _attn_inputs(T=10))
    ker = scancc.compile("bmojo_f", target, window=3)
    whole = _out(ker(q, k, v, kf, vf))
    o1, h = ker(*(a[:, :4] for a in (q, k, v, kf, vf)), output_final_state=True)
    o2 = ker(*(a[:, 4:] for a in (q, k, v, kf, vf)), initial_state=h)
    np.testing.assert_allclose(np.concatenate([_out(o1), _out(o2)], 1), whole,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bmojo (cascade + selection)

def _bmojo_loop(q, k, v, kf, vf, y, W, m, P, scale=None):
    """B'MOJO from the issue's definitions, one (batch, head) and one step at a time."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    o = np.full(v.shape, np.nan)
    for b in range(B):
        for h in range(H):
            slots = [None] * m   # (score, j) per slot
            for t in range(T):
                j = t - W
                if j >= 0:
                    y_hat = sum(y[b, j - i, h] if j - i >= 0 else 0.0 for i in range(1, P + 1)) / P
                    s = float(np.sum((y[b, j, h] - y_hat) ** 2))
                    free = [i for i in range(m) if slots[i] is None]
                    if free:
                        slots[free[0]] = (s, j)
                    else:
                        i = min(range(m), key=lambda i: (slots[i][0], i))
                        if s > slots[i][0]:
                            slots[i] = (s, j)
                keys = [(k[b, i, h], v[b, i, h]) for i in range(max(0, t - W + 1), t + 1)]
                keys += [(kf[b, i, h], vf[b, i, h]) for i in range(max(0, t - 2 * W + 1), j + 1)]
                keys += [(k[b, sl[1], h], v[b, sl[1], h]) for sl in slots if sl is not None]
                logit = np.array([q[b, t, h] @ kk for kk, _ in keys]) * scale
                p = np.exp(logit - logit.max())
                o[b, t, h] = (p / p.sum()) @ np.stack([vv for _, vv in keys])
    return o


def _bmojo_inputs(B=2, T=12, H=2, K=3, V=2, seed=1):
    g = np.random.default_rng(seed)
    q, k, kf = (g.standard_normal((B, T, H, K)) for _ in range(3))
    v, vf, y = (g.standard_normal((B, T, H, V)) for _ in range(3))
    return q, k, v, kf, vf, y


@pytest.mark.parametrize("W,m,P", [(1, 1, 1), (2, 3, 2), (3, 2, 3), (2, 20, 1)])
def test_bmojo_reference_matches_the_plain_loop(W, m, P):
    x = _bmojo_inputs()
    o = _out(scancc.compile(bmojo(window=W, memory=m, predictor=P), "reference")(*x))
    np.testing.assert_allclose(o, _bmojo_loop(*x, W, m, P), rtol=1e-10, atol=1e-12)


def test_bmojo_split_run_with_final_state_equals_one_run():
    x = _bmojo_inputs(T=13)
    ker = scancc.compile(bmojo(window=2, memory=3, predictor=2), "reference")
    whole, hw = ker(*x, output_final_state=True)
    o1, h = ker(*(a[:, :6] for a in x), output_final_state=True)
    o2, h2 = ker(*(a[:, 6:] for a in x), initial_state=h, output_final_state=True)
    np.testing.assert_allclose(np.concatenate([_out(o1), _out(o2)], 1), _out(whole),
                               rtol=1e-12, atol=1e-12)
    for name in hw:
        np.testing.assert_allclose(h2[name], hw[name], rtol=1e-12, atol=1e-12)


def _memory_after(scores, m):
    """Run bmojo (W=1, P=1, one value) on tokens whose innovation scores are ``scores``
    (y_j = y_{j-1} + sqrt(s_j), so s_j = (y_j - y_{j-1})^2); k_j = j identifies token j.
    Returns the final (stored scores, stored token ids, filled) of the one head."""
    n = len(scores)
    T = n + 1  # token j leaves the window (W=1) at step j+1
    y = np.zeros((1, T, 1, 1))
    y[0, :n, 0, 0] = np.cumsum(np.sqrt(scores))
    k = np.arange(T, dtype=float).reshape(1, T, 1, 1)
    q, v, kf, vf = (rng.standard_normal((1, T, 1, 1)) for _ in range(4))
    ker = scancc.compile(bmojo(window=1, memory=m, predictor=1), "reference")
    _, h = ker(q, k, v, kf, vf, y, output_final_state=True)
    key = h["mem_key"][0, 0]   # s_j + 1 in a filled slot, 0 in a free one
    return np.where(key != 0, key - 1.0, 0.0), h["mem_k"][0, 0, :, 0], (key != 0).astype(float)


@pytest.mark.parametrize("scores,m,want_scores,want_tokens,want_filled", [
    # perfect squares: y has integer steps, so the scores are exact (ties are ties)
    ([1, 4, 9, 16, 25], 2, [25, 16], [4, 3], [1, 1]),    # rising: the newest replace the oldest
    ([25, 16, 9, 4, 1], 2, [25, 16], [0, 1], [1, 1]),    # falling: the first two stay
    ([4, 4, 4], 2, [4, 4], [0, 1], [1, 1]),              # a tie with the smallest: no replace
    ([1, 1, 25], 2, [25, 1], [2, 1], [1, 1]),            # tied smallest: the lowest slot goes
    ([9, 1, 1, 4], 2, [9, 4], [0, 3], [1, 1]),
    ([16, 81, 1], 5, [16, 81, 1, 0, 0], [0, 1, 2, 0, 0], [1, 1, 1, 0, 0]),   # m > tokens
])
def test_bmojo_memory_contents_on_hand_made_sequences(scores, m, want_scores, want_tokens,
                                                      want_filled):
    s, tok, filled = _memory_after(np.array(scores, float), m)
    np.testing.assert_allclose(s, want_scores, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(tok, want_tokens)
    np.testing.assert_array_equal(filled, want_filled)


def test_cascade_verifier_rejects_forward_and_self_reads():
    def build(inject_of_a):
        r = Builder("casc")
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        r.state("a", [b, d], identity(), inject=inject_of_a(x))
        r.state("c", [b, d], identity(), inject=x)
        r.output("o", [b, t, d], Node(Op.STATE, (), "a"))
        return r.build()
    with pytest.raises(VerifyError, match="not declared before this state"):
        build(lambda x: x * Node(Op.STATE, (), "c"))
    with pytest.raises(VerifyError, match="not declared before this state"):
        build(lambda x: x * Node(Op.STATE, (), "a"))
    rec = build(lambda x: x * prev("c"))   # prev() of any state is allowed
    assert rec.cascaded == ("a",)


def test_cascade_reads_the_current_value_of_an_earlier_state():
    r = Builder("casc2")
    b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
    x, g = r.input("x", [b, t, d]), r.input("g", [b, t, d])
    a = r.state("a", [b, d], diagonal(g), inject=x)
    c = r.state("c", [b, d], identity(), inject=a * a)   # c_t = c_{t-1} + a_t^2
    r.output("o", [b, t, d], c)
    rec = r.build()
    assert parse_recurrence(str(rec)) == rec
    xs, gs = rng.standard_normal((2, 7, 3)), rng.random((2, 7, 3))
    o = np.asarray(scancc.compile(rec, "reference")(x=xs, g=gs))
    aa, cc, want = np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 7, 3))
    for i in range(7):
        aa = gs[:, i] * aa + xs[:, i]
        cc = cc + aa * aa
        want[:, i] = cc
    np.testing.assert_allclose(o, want, rtol=1e-12)
    from scancc.ir.passes import chunked
    assert not chunked.analyze(rec).states   # a cascade runs recurrently
    # its adjoint is derived (tests/test_bmojo_grad.py): gradients equal the loop's in torch
    torch = _torch()
    xt, gt = (torch.tensor(a, requires_grad=True) for a in (xs, gs))
    at, ct, outs = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), []
    for i in range(7):
        at = gt[:, i] * at + xt[:, i]
        ct = ct + at * at
        outs.append(ct)
    w = torch.tensor(rng.standard_normal((2, 7, 3)))
    (torch.stack(outs, 1) * w).sum().backward()
    xk, gk = (torch.tensor(a, requires_grad=True) for a in (xs, gs))
    (scancc.compile(rec, "reference")(x=xk, g=gk) * w).sum().backward()
    np.testing.assert_allclose(xk.grad.numpy(), xt.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(gk.grad.numpy(), gt.grad.numpy(), rtol=1e-10)


def test_bmojo_text_form_round_trips():
    rec = bmojo(window=2, memory=3, predictor=2)
    assert parse_recurrence(str(rec)) == rec
    assert rec.cascaded == ("mem_key", "mem_k", "mem_v")


# ---------------------------------------------------------------- scancc.nn layers

def _torch():
    return pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")


def test_bmojo_f_layer_is_the_attention_of_its_branches_and_trains():
    torch = _torch()
    from scancc.nn import BMojoF
    torch.manual_seed(0)
    layer = BMojoF(8, 2, window=3, d_state=4).double()
    u = torch.randn(2, 10, 8, dtype=torch.float64)
    with torch.no_grad():
        x = {k: t.numpy() for k, t in layer.branches(u).items()}
        o = _masked_softmax_attention(x["q"], x["k"], x["v"], x["kf"], x["vf"],
                                      lambda t: _keys_bmojo_f(t, 3))
        want = layer.o_proj(torch.from_numpy(o).reshape(2, 10, -1))
        np.testing.assert_allclose(layer(u).numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    # a few Adam steps on "recall the token W+1 back" (the fading window reaches it)
    target = torch.roll(u, 4, dims=1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    losses = []
    for _ in range(10):
        loss = (layer(u) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in layer.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def test_bmojo_layer_is_the_plain_loop_of_its_branches_and_trains():
    torch = _torch()
    from scancc.nn import BMojo
    torch.manual_seed(1)
    layer = BMojo(8, 2, window=2, d_state=4, memory=3, predictor=2).double()
    u = torch.randn(2, 11, 8, dtype=torch.float64)
    with torch.no_grad():
        x = {k: t.numpy() for k, t in layer.branches(u).items()}
        o = _bmojo_loop(x["q"], x["k"], x["v"], x["kf"], x["vf"], x["y"], 2, 3, 2)
        want = layer.o_proj(torch.from_numpy(o).reshape(2, 11, -1))
        np.testing.assert_allclose(layer(u).numpy(), want.numpy(), rtol=1e-10, atol=1e-12)
    # a few Adam steps on "recall the token 5 back" (beyond the window of 2 and the fading
    # window: the eidetic memory can hold it); gradients through the derived adjoint
    target = torch.roll(u, 5, dims=1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    losses = []
    for _ in range(8):
        loss = (layer(u) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for n, p in layer.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def _selection_rec(score=None, inject_on_axis=False):
    from scancc.ir import iota
    from scancc.ir.recurrence import selection
    r = Builder("mem")
    b, t, m, k = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("memory", size=3), \
        r.dim("key")
    x, s = r.input("x", [b, t, k]), r.input("s", [b, t])
    sc = s if score is None else score(s, iota(m))
    sel = selection(m, sc, 1.0, prev("mem_s"), prev("mem_f"))
    r.state("mem_s", [b, m], sel, inject=s)
    r.state("mem_f", [b, m], sel, inject=const(1.0))
    r.state("mem_x", [b, m, k], sel, inject=x * iota(m) if inject_on_axis else x)
    r.output("o", [b, t], dot(dot(Node(Op.STATE, (), "mem_x"), x, k), Node(Op.STATE, (), "mem_f"),
                              m))
    return r.build()


def test_selection_verifier_errors_and_text_form():
    rec = _selection_rec()
    assert "selection(axis=memory, score=s, valid=1.0, keys=prev(mem_s), " \
           "filled=prev(mem_f))" in str(rec)
    assert parse_recurrence(str(rec)) == rec
    with pytest.raises(VerifyError, match=re.escape(
            "state 'mem_s' (selection score): the incoming item's score (one item: no axis) "
            "has dims ['batch', 'memory']")):
        _selection_rec(score=lambda s, i: s * i)
    with pytest.raises(VerifyError, match=re.escape(
            "state 'mem_x' (inject): the injected term (one slot of the axis)")):
        _selection_rec(inject_on_axis=True)


@pytest.mark.parametrize("target,one_key", [("reference", False), ("triton", False),
                                            ("reference", True), ("triton", True),
                                            ("nki", True), ("torch", False), ("torch", True)])
def test_selection_kind_keeps_the_top_scores_of_a_stream(target, one_key):
    """A memory of 3 slots over a stream of 8 scored items (score < 0: not valid): after each
    step it holds the 3 best valid items so far, as the loop says. ``one_key``: the stored key
    is score + 1 (> 0), so keys and occupancy are one state (the form NKI lowers)."""
    from scancc.ir import iota, maximum, step
    from scancc.ir.recurrence import selection
    r = Builder("topm")
    b, t, m = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("memory", size=3)
    s, x = r.input("s", [b, t]), r.input("x", [b, t])
    if one_key:
        sel = selection(m, s + 1.0, step(s), prev("mem_s"), prev("mem_s"))
        r.state("mem_s", [b, m], sel, inject=s + 1.0)
    else:
        sel = selection(m, s, step(s), prev("mem_s"), prev("mem_f"))
        r.state("mem_s", [b, m], sel, inject=s)
        r.state("mem_f", [b, m], sel, inject=const(1.0))
    r.state("mem_x", [b, m], sel, inject=x)
    r.output("o", [b, t, m], Node(Op.STATE, (), "mem_x") + 0.0 * maximum(iota(m), 0.0))
    rec = r.build()
    S = np.array([[3., 1., -1., 4., 1., 5., -9., 2.], [2., 2., 2., 0., 3., 3., 1., 7.]],
                 np.float32)
    X = np.arange(16, dtype=np.float32).reshape(2, 8) + 100
    o = np.asarray(scancc.compile(rec, target)(s=S, x=X), dtype=np.float64)
    for bi in range(2):
        slots = [None] * 3
        for ti in range(8):
            if S[bi, ti] >= 0:
                free = [i for i in range(3) if slots[i] is None]
                if free:
                    slots[free[0]] = (S[bi, ti], X[bi, ti])
                else:
                    i = min(range(3), key=lambda i: (slots[i][0], i))
                    if S[bi, ti] > slots[i][0]:
                        slots[i] = (S[bi, ti], X[bi, ti])
            want = [0.0 if sl is None else sl[1] for sl in slots]
            np.testing.assert_array_equal(o[bi, ti], want)


@pytest.mark.parametrize("target", ["triton", "nki"])
def test_bmojo_backend_matches_the_plain_loop_and_splits(target):
    x = tuple(np.float32(a) for a in _bmojo_inputs(T=12))
    ker = scancc.compile(bmojo(window=2, memory=3, predictor=2), target)
    o = _out(ker(*x))
    np.testing.assert_allclose(o, _bmojo_loop(*(np.float64(a) for a in x), 2, 3, 2),
                               rtol=1e-5, atol=1e-5)
    o1, h = ker(*(a[:, :5] for a in x), output_final_state=True)
    o2 = ker(*(a[:, 5:] for a in x), initial_state=h)
    np.testing.assert_allclose(np.concatenate([_out(o1), _out(o2)], 1), o, rtol=1e-6, atol=1e-6)
