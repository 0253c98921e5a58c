"""Context parallelism (scancc/distributed.py): 2 and 4 gloo processes on CPU, spawned by the
test, each holding a contiguous time shard, against one single-process run of the whole
sequence: outputs, the global final state (on every rank), and gradients w.r.t. every input
and the initial state (replicated inputs: the sum of the ranks' partial gradients). T=13:
the shards are uneven (np.array_split: 7+6 on 2 ranks, 4+3+3+3 on 4). The ranks are forked
(spawned where fork is unavailable) after the parent computed the single-process truth, so
they inherit its compiled kernels and derived backwards."""
import os
import socket
import tempfile

import numpy as np
import pytest

import scancc
from scancc import registry
from scancc.autograd import has_adjoint
from scancc.distributed import has_summary, summary_recurrence
from scancc.testing import sample_inputs, sample_state

torch = pytest.importorskip("torch", reason="torch (the [triton] extra) is not installed")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

LIBRARY_ALL = [n for n in registry.names() if registry.get(n).origin == "library"]


# the fold (summaries, one all-gather) with gradients: recurrences with a linear summary and a
# derived adjoint; the others (bmojo: selection + cascade, no linear summary) relay states:
# test_relay_*
LIBRARY = [n for n in LIBRARY_ALL if has_summary(registry.get(n).build())
           and has_adjoint(registry.get(n).build())]
RELAYED = [n for n in LIBRARY_ALL if not has_summary(registry.get(n).build())]
SIZES = {"batch": 2, "time": 13, "heads": 2, "key": 3, "value": 2, "chan": 3, "dstate": 2,
         "headdim": 2, "groups": 1, "width": 3, "order": 3}
# every optional input given, nonlinear options on (as tests/test_autograd.py)
OPTS = {"mamba": {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
        "mamba2": {"D": True, "z": True, "dt_bias": True, "dt_softplus": True,
                   "dt_limit": None},
        "fir": {"bias": True, "activation": "silu"}}


# the Triton interpreter runs every program in Python: a smaller case keeps it fast
SMALL = {"batch": 1, "time": 6, "heads": 1}


def _dense_rec():
    """A dense transition (no library recurrence has one): tests/test_autograd.py's."""
    from scancc.ir import Builder, dense, reduce_sum, sigmoid, silu
    r = Builder("cp_test_dense")
    b, t, h, n, c = (r.dim("batch", "batch"), r.dim("time", "time"), r.dim("heads", "head"),
                     r.dim("n"), r.dim("c"))
    x, g = r.input("x", [b, t, h, n]), r.input("g", [b, t, h])
    m = r.input("m", [h, n, c])
    s = r.state("s", [b, h, n], dense(n, c, m * sigmoid(g)), inject=silu(x))
    r.output("y", [b, t, h, n], s * x + reduce_sum(s * s, n))
    return r.build()


def _compile(name, target="reference"):
    if name == "cp_test_dense":
        return scancc.compile(_dense_rec(), target)
    return scancc.compile(name, target, **OPTS.get(name, {}))


def _hints(name):
    return {"m": "small"} if name == "cp_test_dense" else registry.get(name).hints


def _case(name, seed=0, T=13, small=False):  # uneven shards: 7+6, 4+3+3+3
    k = _compile(name)
    rec = k.ir
    over = SMALL if small else {}
    sizes = {d.name: d.size or over.get(d.name, SIZES.get(d.name, 2)) for d in rec.dims}
    sizes[rec.time] = over.get("time", T)
    x = sample_inputs(rec, sizes, seed, _hints(name))
    h0 = sample_state(rec, sizes, seed + 1)
    wy = {o.name: np.random.default_rng(seed + 2).standard_normal(
        tuple(sizes[d] for d in o.dims)) for o in rec.outputs}
    wf = {s: np.random.default_rng(seed + 3).standard_normal(v.shape) for s, v in h0.items()}
    return rec, x, h0, wy, wf


def _odims(rec, o):
    return next(x.dims for x in rec.outputs if x.name == o)


def _shard(rec, name, v, rank, world):
    dims = rec.input(name).dims
    if rec.time not in dims:
        return v
    ax = dims.index(rec.time)
    return np.array_split(v, world, axis=ax)[rank]


def _t(v, dtype, grad=True):
    return torch.tensor(v, dtype=dtype).requires_grad_(grad)


def _run(name, target, dtype, x, h0, wy, wf, rank=None, world=None, group=None):
    """Outputs, final states and gradients of one run (a shard when ``group`` is given)."""
    k = _compile(name, target)
    rec = k.ir
    if group is not None:
        x = {n: _shard(rec, n, v, rank, world) for n, v in x.items()}
        wy = {o: np.array_split(v, world, axis=_odims(rec, o).index(rec.time))[rank]
              for o, v in wy.items()}
    xt = {n: _t(v, dtype) for n, v in x.items()}
    ht = {n: _t(v, dtype) for n, v in h0.items()}
    kw = {} if group is None else {"cp_group": group}
    out, fin = k(**xt, initial_state=ht, output_final_state=True, **kw)
    out = out if isinstance(out, dict) else {rec.outputs[0].name: out}
    fin = fin if isinstance(fin, dict) else {rec.states[0].name: fin}
    loss = sum((out[o] * torch.tensor(w, dtype=out[o].dtype)).sum() for o, w in wy.items())
    if rank in (None, 0):  # the final-state term counted once (every rank holds it)
        loss = loss + sum((fin[s] * torch.tensor(w, dtype=fin[s].dtype)).sum()
                          for s, w in wf.items())
    loss.backward()
    grads = {n: v.grad.detach().double().numpy() if v.grad is not None else None
             for n, v in {**xt, **{"h0:" + s: t for s, t in ht.items()}}.items()}
    return ({o: v.detach().double().numpy() for o, v in out.items()},
            {s: v.detach().double().numpy() for s, v in fin.items()}, grads)


def _run_nofinal(name, target, dtype, x, h0, wy, rank=None, world=None, group=None):
    """Outputs and gradients of a run without a final state, the loss on the outputs."""
    k = _compile(name, target)
    rec = k.ir
    if group is not None:
        x = {n: _shard(rec, n, v, rank, world) for n, v in x.items()}
        wy = {o: np.array_split(v, world, axis=_odims(rec, o).index(rec.time))[rank]
              for o, v in wy.items()}
    xt = {n: _t(v, dtype) for n, v in x.items()}
    ht = {n: _t(v, dtype) for n, v in h0.items()}
    kw = {} if group is None else {"cp_group": group}
    y = k(**xt, initial_state=ht, **kw)
    y = y if isinstance(y, dict) else {rec.outputs[0].name: y}
    sum((y[o] * torch.tensor(w, dtype=y[o].dtype)).sum() for o, w in wy.items()).backward()
    return ({o: v.detach().double().numpy() for o, v in y.items()},
            {n: v.grad.detach().double().numpy() for n, v in xt.items()})


def _worker(rank, world, port, target, names, dtype_name, outdir, small):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dtype = getattr(torch, dtype_name)
        res = {}
        for name in names:
            _, x, h0, wy, wf = _case(name, small=small)
            res[name] = _run(name, target, dtype, x, h0, wy, wf, rank, world, dist.group.WORLD)
        if PLAIN in names:  # no initial state, no final state, no gradients
            rec, x, _, _, _ = _case(PLAIN, small=small)
            k = _compile(PLAIN, target)
            with torch.no_grad():
                y = k(**{n: torch.tensor(_shard(rec, n, v, rank, world), dtype=dtype)
                         for n, v in x.items()}, cp_group=dist.group.WORLD)
            res["plain"] = y.double().numpy()
            # with gradients, no final state: rank 0 (which never folds) must still run the
            # gather's backward collective (its outputs are tied to the gathered tensors)
            _, x, h0, wy, wf = _case(PLAIN, small=small)
            res["plain_grad"] = _run_nofinal(PLAIN, target, dtype, x, h0, wy, rank, world,
                                             dist.group.WORLD)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm(names, small):
    """Derive the backward of each summary recurrence here, before the ranks fork, so they
    inherit it (the derivation is cached per IR: scancc.autograd.adjoint)."""
    from scancc.autograd import adjoint
    for name in names:
        rec, x, _, _, _ = _case(name, small=small)
        sizes = _compile(name)._plan_call(
            (), dict(x), None).runner.sizes(tuple(v.shape for v in x.values()))
        adjoint(summary_recurrence(rec, sizes, carry=True))  # what the ranks run


def _spawn(world, target, names, dtype_name, small):
    """Run ``world`` ranks; forked (the parent warmed the compiled kernels and derived
    backwards, which the ranks inherit) where the platform can, else spawned."""
    import multiprocessing

    import torch.multiprocessing as mp
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, _free_port(), target, names, dtype_name, d, small),
                           nprocs=world, join=True, start_method=method)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]


PLAIN = "gated_delta_net"


def _check(world, target, names, dtype_name, rtol, atol, small=False):
    truth = {}
    for name in names:  # the single-process truth first (it warms the caches ranks inherit)
        rec, x, h0, wy, wf = _case(name, small=small)
        truth[name] = _run(name, "reference", torch.float64, x, h0, wy, wf)
    _warm(names, small)
    ranks = _spawn(world, target, names, dtype_name, small)
    if PLAIN in names:
        rec, x, _, _, _ = _case(PLAIN, small=small)
        y = _compile(PLAIN)(**{n: torch.tensor(v) for n, v in x.items()}).numpy()
        ax = _odims(rec, rec.outputs[0].name).index(rec.time)
        np.testing.assert_allclose(np.concatenate([r["plain"] for r in ranks], axis=ax), y,
                                   rtol=rtol, atol=atol, err_msg="no initial/final state")
        _, x, h0, wy, _ = _case(PLAIN, small=small)
        yo, go = _run_nofinal(PLAIN, "reference", torch.float64, x, h0, wy)
        for n, g in go.items():
            if rec.time in rec.input(n).dims:
                got = np.concatenate([r["plain_grad"][1][n] for r in ranks],
                                     axis=rec.input(n).dims.index(rec.time))
            else:
                got = sum(r["plain_grad"][1][n] for r in ranks)
            np.testing.assert_allclose(got, g, rtol=rtol, atol=atol,
                                       err_msg=f"no final state: grad {n}")
    for name in names:
        rec = _case(name, small=small)[0]
        out, fin, grads = truth[name]
        for o, v in out.items():  # each rank's outputs are its shard of the whole
            ax = _odims(rec, o).index(rec.time)
            got = np.concatenate([ranks[r][name][0][o] for r in range(world)], axis=ax)
            np.testing.assert_allclose(got, v, rtol=rtol, atol=atol, err_msg=f"{name} {o}")
        for r in range(world):  # every rank holds the global final state
            for s, v in fin.items():
                np.testing.assert_allclose(ranks[r][name][1][s], v, rtol=rtol, atol=atol,
                                           err_msg=f"{name} final {s} on rank {r}")
        for n, g in grads.items():
            if n.startswith("h0:"):  # the initial state is read on rank 0 only
                got = ranks[0][name][2][n]
            elif rec.time in rec.input(n).dims:
                ax = rec.input(n).dims.index(rec.time)
                got = np.concatenate([ranks[r][name][2][n] for r in range(world)], axis=ax)
            else:  # replicated: the ranks' partial gradients add up (an all-reduce)
                got = sum(ranks[r][name][2][n] for r in range(world))
            assert np.all(np.isfinite(got)), (name, n)
            np.testing.assert_allclose(got, g, rtol=rtol, atol=atol,
                                       err_msg=f"{name} grad {n} ({world} ranks)")


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_every_library_recurrence_reference(world):
    """Every library recurrence, and a dense transition (the one kind no library entry
    has)."""
    _check(world, "reference", LIBRARY + ["cp_test_dense"], "float64", 1e-9, 1e-9)


def test_context_parallel_triton_interpreter():
    """Two recurrences on the Triton backend (interpreter): a diagonal and a householder."""
    pytest.importorskip("triton")
    _check(2, "triton", ["gla", "delta_net"], "float32", 2e-4, 2e-4, small=True)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_every_library_recurrence_triton(world):
    pytest.importorskip("triton")
    _check(world, "triton", LIBRARY, "float32", 2e-4, 2e-4)


def _relay_worker(rank, world, port, names, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for name in names:
            rec, x, h0, _, _ = _case(name)
            k = _compile(name)
            xs = {n: torch.tensor(_shard(rec, n, v, rank, world)) for n, v in x.items()}
            out, fin = k(**xs, initial_state={s: torch.tensor(v) for s, v in h0.items()},
                         output_final_state=True, cp_group=dist.group.WORLD)
            res[name] = ({o: v.numpy() for o, v in (out if isinstance(out, dict) else
                                                     {rec.outputs[0].name: out}).items()},
                         {s: v.numpy() for s, v in (fin if isinstance(fin, dict) else
                                                    {rec.states[0].name: fin}).items()})
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_relay_without_a_linear_summary(world):
    """bmojo's eidetic memory (a selection state read by cascaded states) has no linear
    transition summary: each shard runs from the state the rank before it ended with. Outputs
    and the global final state equal one single-process run (forward only here)."""
    import multiprocessing

    import torch.multiprocessing as mp
    assert RELAYED == ["bmojo"]
    truth = {}
    for name in RELAYED:
        rec, x, h0, _, _ = _case(name)
        out, fin = _compile(name)(**{n: torch.tensor(v) for n, v in x.items()},
                                  initial_state={s: torch.tensor(v) for s, v in h0.items()},
                                  output_final_state=True)
        truth[name] = (out if isinstance(out, dict) else {rec.outputs[0].name: out}, fin)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_relay_worker, args=(world, _free_port(), RELAYED, d), nprocs=world,
                           join=True, start_method=method)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                 for r in range(world)]
    for name in RELAYED:
        rec = _compile(name).ir
        out, fin = truth[name]
        for o, v in out.items():
            ax = _odims(rec, o).index(rec.time)
            got = np.concatenate([ranks[r][name][0][o] for r in range(world)], axis=ax)
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, v.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)
        for r in range(world):
            for s, v in fin.items():
                np.testing.assert_allclose(ranks[r][name][1][s], v.numpy(), rtol=1e-12,
                                           atol=1e-12, err_msg=f"{name} {s} rank {r}")


@pytest.mark.parametrize("name", LIBRARY + ["cp_test_dense"])
def test_summary_recurrence_is_the_transition_product(name):
    """Closed form, one process: for T steps, the summary's final state applied to a random
    h0, plus the zero-start final state, equals the scan from h0 (the fold of one rank)."""
    from scancc.distributed import apply_summary, identity_state
    rec, x, h0, _, _ = _case(name, seed=5, T=7)
    k = _compile(name)
    sizes = k._plan_call((), {n: v for n, v in x.items()}, None).runner.sizes(
        tuple(v.shape for v in x.values()))
    summ = summary_recurrence(rec, sizes)
    xt = {n: torch.tensor(v) for n, v in x.items()}
    _, f0 = k(**xt, output_final_state=True)
    _, fh = k(**xt, initial_state={s: torch.tensor(v) for s, v in h0.items()},
              output_final_state=True)
    f0 = f0 if isinstance(f0, dict) else {rec.states[0].name: f0}
    fh = fh if isinstance(fh, dict) else {rec.states[0].name: fh}
    ms = {}
    if summ is not None:
        ss = {**sizes, **{d.name: d.size for d in summ.dims if d.size is not None}}
        sk = scancc.compile(summ)
        _, ms = sk(**{i.name: xt[i.name] for i in summ.inputs}, initial_state=identity_state(torch, summ, ss, torch.float64, "cpu"),
                   output_final_state=True)
        ms = ms if isinstance(ms, dict) else {summ.states[0].name: ms}
    for s in rec.states:
        h = torch.tensor(h0[s.name])
        mh = h if s.name not in ms else apply_summary(torch, s, summ.state(s.name).dims,
                                                      ms[s.name], h)
        np.testing.assert_allclose((mh + f0[s.name]).numpy(), fh[s.name].numpy(), rtol=1e-10,
                                   atol=1e-10, err_msg=f"{name} state {s.name}")
        if s.name in ms:  # the summary is not the trivial identity/ones: the test can fail
            assert ms[s.name].numel() > 0


def test_context_parallel_takes_torch_tensors_only():
    k = scancc.compile("hgrn")
    x = np.zeros((1, 4, 3))
    with pytest.raises(scancc.api.InputError, match="torch tensors"):
        k(x, x, cp_group=object())


# ---- packed sequences spanning ranks: cu_seqlens with cp_group ---------------------------
# T=13 in 2 ranks (7+6): rank 1 starts mid-sequence with a boundary inside (a zero
# transition, its tail scanned alone); in 4 (4+3+3+3): rank 1 starts at a boundary (exact
# from the start), rank 2 holds no boundary (summary + rerun), rank 3 one inside. A
# zero-length sequence (its final state is its initial state).
CU = {13: [0, 3, 4, 4, 11, 13], 6: [0, 1, 6]}
CU_TRITON = {"gla": [0, 1, 6], "delta_net": [0, 2, 5, 6]}  # no boundary / one inside rank 1


def _packed_case(name, seed=0, small=False, cu=None):
    k = _compile(name)
    rec = k.ir
    over = SMALL if small else {}
    T = over.get("time", 13)
    cu = cu or CU[T]
    n_seq = len(cu) - 1
    sizes = {d.name: d.size or over.get(d.name, SIZES.get(d.name, 2)) for d in rec.dims}
    sizes[rec.time] = T
    batch = next((d.name for d in rec.dims if d.role == "batch"), None)
    if batch:
        sizes[batch] = 1
    x = sample_inputs(rec, sizes, seed, _hints(name))
    rng = np.random.default_rng(seed + 1)
    h0 = {}
    for s in rec.states:
        shape = [n_seq if d == batch else sizes[d] for d in s.dims]
        h0[s.name] = 0.5 * rng.standard_normal(tuple(shape if batch in s.dims
                                                     else [n_seq] + shape))
    wy = {o.name: np.random.default_rng(seed + 2).standard_normal(
        tuple(sizes[d] for d in o.dims)) for o in rec.outputs}
    wf = {s: np.random.default_rng(seed + 3).standard_normal(v.shape) for s, v in h0.items()}
    return rec, x, h0, wy, wf, cu


def _run_packed(name, target, dtype, x, h0, wy, wf, cu, rank=None, world=None, group=None,
                final=True):
    """As ``_run``, packed: every rank passes the global cu_seqlens and initial state.
    ``final=False``: no final state asked, the loss reads the outputs only (every rank must
    still run the gathers' backward collectives)."""
    k = _compile(name, target)
    rec = k.ir
    if group is not None:
        x = {n: _shard(rec, n, v, rank, world) for n, v in x.items()}
        wy = {o: np.array_split(v, world, axis=_odims(rec, o).index(rec.time))[rank]
              for o, v in wy.items()}
    xt = {n: _t(v, dtype) for n, v in x.items()}
    ht = {n: _t(v, dtype) for n, v in h0.items()}
    kw = {} if group is None else {"cp_group": group}
    res = k(**xt, initial_state=ht, output_final_state=final,
            cu_seqlens=torch.tensor(cu, dtype=torch.int64), **kw)
    out, fin = res if final else (res, {})
    out = out if isinstance(out, dict) else {rec.outputs[0].name: out}
    fin = fin if isinstance(fin, dict) else {rec.states[0].name: fin}
    loss = sum((out[o] * torch.tensor(w, dtype=out[o].dtype)).sum() for o, w in wy.items())
    if rank in (None, 0) and final:
        loss = loss + sum((fin[s] * torch.tensor(w, dtype=fin[s].dtype)).sum()
                          for s, w in wf.items())
    loss.backward()
    grads = {n: v.grad.detach().double().numpy() if v.grad is not None else None
             for n, v in {**xt, **{"h0:" + s: t for s, t in ht.items()}}.items()}
    return ({o: v.detach().double().numpy() for o, v in out.items()},
            {s: v.detach().double().numpy() for s, v in fin.items()}, grads)


def _packed_worker(rank, world, port, target, names, dtype_name, outdir, small, cus):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dtype = getattr(torch, dtype_name)
        res = {}
        for name in names:
            _, x, h0, wy, wf, cu = _packed_case(name, small=small, cu=cus.get(name))
            res[name] = _run_packed(name, target, dtype, x, h0, wy, wf, cu, rank, world,
                                    dist.group.WORLD)
        _, x, h0, wy, wf, cu = _packed_case(names[0], small=small, cu=cus.get(names[0]))
        res["nofinal"] = _run_packed(names[0], target, dtype, x, h0, wy, wf, cu, rank, world,
                                     dist.group.WORLD, final=False)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _check_packed(world, target, names, dtype_name, rtol, atol, small=False, cus=None):
    import multiprocessing

    import torch.multiprocessing as mp
    cus = cus or {}
    truth = {}
    for name in names:  # the single-process packed truth (warms what the ranks inherit)
        rec, x, h0, wy, wf, cu = _packed_case(name, small=small, cu=cus.get(name))
        truth[name] = _run_packed(name, "reference", torch.float64, x, h0, wy, wf, cu)
        assert all(np.all(np.isfinite(v)) for v in truth[name][0].values())
    rec, x, h0, wy, wf, cu = _packed_case(names[0], small=small, cu=cus.get(names[0]))
    truth["nofinal"] = _run_packed(names[0], "reference", torch.float64, x, h0, wy, wf, cu,
                                   final=False)
    _warm_packed(names, small)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_packed_worker, args=(world, _free_port(), target, names,
                                                 dtype_name, d, small, cus),
                           nprocs=world, join=True, start_method=method)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False)
                 for r in range(world)]
    for name in names + ["nofinal"]:
        rec = _compile(names[0] if name == "nofinal" else name).ir
        out, fin, grads = truth[name]
        for o, v in out.items():
            ax = _odims(rec, o).index(rec.time)
            got = np.concatenate([ranks[r][name][0][o] for r in range(world)], axis=ax)
            np.testing.assert_allclose(got, v, rtol=rtol, atol=atol, err_msg=f"{name} {o}")
        for r in range(world):  # every rank holds every sequence's final state
            for s, v in fin.items():
                np.testing.assert_allclose(ranks[r][name][1][s], v, rtol=rtol, atol=atol,
                                           err_msg=f"{name} final {s} on rank {r}")
        for n, g in grads.items():
            if rec.time in (rec.input(n).dims if not n.startswith("h0:") else ()):
                ax = rec.input(n).dims.index(rec.time)
                got = np.concatenate([ranks[r][name][2][n] for r in range(world)], axis=ax)
            else:  # replicated (the initial state too): partial gradients add up
                parts = [ranks[r][name][2][n] for r in range(world)]
                got = sum(p for p in parts if p is not None)
            assert np.all(np.isfinite(got)), (name, n)
            np.testing.assert_allclose(got, g, rtol=rtol, atol=atol,
                                       err_msg=f"{name} grad {n} ({world} ranks)")


def _warm_packed(names, small):
    from scancc.autograd import adjoint
    for name in names:
        rec, x, _, _, _, _ = _packed_case(name, small=small)
        sizes = _compile(name)._plan_call(
            (), dict(x), None).runner.sizes(tuple(v.shape for v in x.values()))
        adjoint(summary_recurrence(rec, sizes, carry=True))


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_packed_reference(world):
    """cu_seqlens with cp_group: sequences spanning ranks, every library recurrence, against
    one single-process packed call (outputs, per-sequence final states on every rank,
    gradients)."""
    _check_packed(world, "reference", LIBRARY, "float64", 1e-9, 1e-9)


def test_context_parallel_packed_triton_interpreter():
    pytest.importorskip("triton")
    _check_packed(2, "triton", ["gla", "delta_net"], "float32", 2e-4, 2e-4, small=True,
                  cus=CU_TRITON)


def test_context_parallel_packed_bad_cu_seqlens():
    """The global cu_seqlens is checked against the sum of the shards (one process: world 1)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_bad_cu_worker, args=(_free_port(), d), nprocs=1, join=True,
                           start_method="fork" if os.name == "posix" else "spawn")
        msg = open(os.path.join(d, "msg")).read()
    assert "cu_seqlens" in msg and "T = 13" in msg, msg


def _bad_cu_worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        rec, x, _, _, _, _ = _packed_case("hgrn")
        k = _compile("hgrn")
        try:
            k(**{n: torch.tensor(v) for n, v in x.items()}, cp_group=dist.group.WORLD,
              cu_seqlens=torch.tensor([0, 3, 12]))
            msg = "no error"
        except scancc.api.InputError as e:
            msg = str(e)
        open(os.path.join(outdir, "msg"), "w").write(msg)
    finally:
        dist.destroy_process_group()
