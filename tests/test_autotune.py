"""Autotuning (backends/triton/autotune.py), exercised on the CPU with the GPU gate and the timer
replaced: the chosen configuration reaches the launcher and gives the reference's result, the
shape class excludes T and the batch, the table persists on disk under the cache's trust
rules, and a damaged or tampered table is ignored."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import scancc
from scancc.testing import assert_close, default_sizes, sample_inputs

from scancc.backends.triton import autotune, runtime


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Autotuning on (as on a GPU), a private cache dir, and a fake timer that prefers
    num_warps=8 and the smallest value block; records every timed configuration."""
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("SCANCC_CACHE_DIR", str(d))
    timed: list = []
    launched: list = []

    def enabled(options):
        return options.get("autotune", True) and options.get("block_sizes") is None \
            and options.get("num_warps") is None

    def timer(fn):
        fn()
        if not launched:  # a test that does not record launches: count the timing only
            timed.append(None)
            return 1.0
        bs, nw = launched[-1]
        timed.append((dict(bs or {}), nw))
        return 1.0 / nw + 1e-3 * sum((bs or {}).values())

    monkeypatch.setattr(autotune, "enabled", enabled)
    monkeypatch.setattr(autotune, "TIMER", timer)
    autotune.forget()
    runtime.forget_compiled()
    yield d, timed, launched
    autotune.forget()
    runtime.forget_compiled()


def _recording(kern, launched):
    """Wrap the kernel's launcher so each call records its (block_sizes, num_warps)."""
    be = kern.backend
    orig = be._last_compiled

    def spy(rec, options, args):
        c = orig(rec, options, args)
        launcher = c.launcher

        def wrapped(*a):
            launched.append((a[-2], a[-1]))
            return launcher(*a)
        return type(c)(c.lowering, c.source, wrapped, c.algorithm, c.ranks, c.unsqueeze,
                       c.counters)
    be._last_compiled = spy
    return lambda: setattr(be, "_last_compiled", orig)


def _case(name, T, batch=None, seed=0):
    e = scancc.get(name)
    rec = e.build()
    sizes = default_sizes(rec, time=T)
    if batch is not None:
        sizes["batch"] = batch
    return {k: v.astype(np.float32) for k, v in sample_inputs(rec, sizes, seed, e.hints).items()}


def test_the_fastest_configuration_runs_and_is_kept_per_shape_class(tuned):
    d, timed, launched = tuned
    k = scancc.compile("simple_gla", target="triton", algorithm="chunked")
    undo = _recording(k, launched)
    try:
        x = _case("simple_gla", 40)
        y = k(**x)
        c = k.backend.compiled(k.ir, k.backend_options, ("float32",) * 4)
        space = autotune.space(c, {"value": 12})
        assert len(timed) == len(space) >= 2
        assert launched[-1] == ({"value": 16}, 8)  # the fake timer's favourite
        assert_close(y, scancc.compile("simple_gla")(**x), "float32")
        n = len(timed)
        # another T and batch: the same shape class, nothing timed again
        y2 = k(**_case("simple_gla", 77, batch=3, seed=1))
        assert len(timed) == n and launched[-1] == ({"value": 16}, 8)
        assert np.isfinite(np.asarray(y2)).all()
        # the table is on disk, keyed without T or batch
        files = list(d.glob("triton/autotune-*.json"))
        assert len(files) == 1
        table = json.loads(files[0].read_text())
        assert list(table.values()) == [{"block_sizes": {"value": 16}, "num_warps": 8}]
        # a new process (memory dropped) reads it back: no timing
        autotune.forget()
        k(**x)
        assert len(timed) == n
    finally:
        undo()


def test_a_new_feature_size_is_a_new_shape_class(tuned):
    d, timed, launched = tuned
    k = scancc.compile("simple_gla", target="triton", algorithm="chunked")
    k(**_case("simple_gla", 20))
    n = len(timed)
    x = _case("simple_gla", 20)
    x["v"] = np.concatenate([x["v"], x["v"]], axis=-1)  # value 12 -> 24
    k(**x)
    assert len(timed) > n


def test_explicit_launch_options_are_never_tuned(tuned):
    d, timed, launched = tuned
    for opts in ({"num_warps": 4}, {"block_sizes": {"value": 16}}, {"autotune": False}):
        k = scancc.compile("simple_gla", target="triton", algorithm="chunked", **opts)
        k(**_case("simple_gla", 20))
    assert timed == []


def test_a_tampered_or_damaged_table_is_ignored(tuned):
    d, timed, launched = tuned
    k = scancc.compile("simple_gla", target="triton", algorithm="chunked")
    x = _case("simple_gla", 20)
    k(**x)
    path = next(d.glob("triton/autotune-*.json"))
    key = next(iter(json.loads(path.read_text())))
    for bad in ('{"%s": {"block_sizes": {"value": 3}, "num_warps": 8}}' % key,
                '{"%s": {"block_sizes": {"key; import os": 16}, "num_warps": 8}}' % key,
                '{"%s": {"block_sizes": {}, "num_warps": 7}}' % key,
                "\xff\xfe not json"):
        path.write_bytes(bad.encode("latin-1"))
        autotune.forget()
        n = len(timed)
        assert_close(k(**x), scancc.compile("simple_gla")(**x), "float32")
        assert len(timed) > n, bad  # re-tuned instead of trusting it


def test_an_unsafe_cache_dir_keeps_the_table_in_memory(tuned):
    d, timed, launched = tuned
    os.chmod(d, 0o777)
    (d / "triton").mkdir(mode=0o700, exist_ok=True)
    os.chmod(d / "triton", 0o777)
    k = scancc.compile("simple_gla", target="triton", algorithm="chunked")
    with pytest.warns(RuntimeWarning, match="autotuning cache"):
        k(**_case("simple_gla", 20))
    assert not list(d.glob("triton/autotune-*.json"))


def test_space_is_small_and_valid():
    k = scancc.compile("mamba", target="triton", algorithm="recurrent")
    c = k.backend.compiled(k.ir, k.backend_options, ("float32",) * len(k.ir.inputs))
    sp = autotune.space(c, {"chan": 2048, "dstate": 16})
    assert 2 <= len(sp) <= 8
    for cfg in sp:
        assert set(cfg["block_sizes"]) <= set(c.lowering.plan.split)
        assert all(v in autotune.BLOCKS for v in cfg["block_sizes"].values())
        assert cfg["num_warps"] in autotune.WARPS
