"""The Triton kernel cache: it runs only the text scancc generated (never a planted file or
``.pyc``), refuses directories others can write, and heals or falls back to memory (with a
warning) when a cache file or directory is damaged. See docs/security.md."""
from __future__ import annotations

import errno
import importlib.util
import os
import py_compile
import tempfile
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Triton backend needs torch (scancc[triton])")
if importlib.util.find_spec("triton") is None:
    pytest.skip("the Triton backend needs triton (scancc[triton])", allow_module_level=True)

from scancc import backends, registry, testing  # noqa: E402
from scancc.backends.triton import runtime  # noqa: E402

SIZES = {"batch": 2, "time": 7, "chan": 5}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory and empty in-memory caches; returns the triton directory."""
    monkeypatch.setenv("SCANCC_CACHE_DIR", str(tmp_path))
    for name in ("_MODULES", "_BY_ID", "_BY_IR"):
        monkeypatch.setattr(runtime, name, {})
    monkeypatch.setattr(runtime, "_WARNED", set(), raising=False)
    return tmp_path / "triton"


def _forget(monkeypatch):
    for name in ("_MODULES", "_BY_ID", "_BY_IR"):
        monkeypatch.setattr(runtime, name, {})


def _run():
    rec = registry.get("hgrn").build()
    x = testing.sample_inputs(rec, SIZES, 0, hints=registry.get("hgrn").hints)
    ref = backends.get("reference").run(rec, x, SIZES, None, False, {}).outputs
    tx = {k: torch.from_numpy(v).float() for k, v in x.items()}
    out = backends.get("triton").run(rec, tx, SIZES, None, False, {}).outputs
    for k in ref:
        testing.assert_close(out[k], ref[k], "float32", k)
    return {k: np.asarray(v) for k, v in out.items()}


def _no_warnings():
    return warnings.catch_warnings(record=True)


def test_planted_pyc_next_to_a_valid_cache_file_never_runs(cache, tmp_path, monkeypatch):
    _run()
    (py,) = cache.glob("*.py")
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    # an unchecked-hash .pyc: the file loader would run it whatever the .py says
    py_compile.compile(str(evil), cfile=importlib.util.cache_from_source(str(py)),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    _forget(monkeypatch)
    _run()
    assert not marker.exists()


def test_tampered_cache_file_is_rewritten_not_run(cache, tmp_path, monkeypatch):
    _run()
    (py,) = cache.glob("*.py")
    marker = tmp_path / "MARKER"
    good = py.read_text()
    py.write_text(good + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    _forget(monkeypatch)
    _run()
    assert not marker.exists() and py.read_text() == good


def test_world_writable_cache_dir_is_refused_with_a_warning(cache):
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    with pytest.warns(RuntimeWarning, match=str(cache)):
        _run()
    assert not list(cache.glob("*.py"))  # nothing written to (or read from) it


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="chown to another user needs root")
def test_cache_dir_owned_by_another_user_is_refused(cache):
    cache.mkdir(parents=True, mode=0o700)
    os.chown(cache, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="owned by uid 65534"):
        _run()
    assert not list(cache.glob("*.py"))


def test_non_utf8_cache_file_is_healed(cache, monkeypatch):
    _run()
    (py,) = cache.glob("*.py")
    good = py.read_text()
    py.write_bytes(b"\xff\xfe\x80 not utf-8 \xc3\x28")
    _forget(monkeypatch)
    with _no_warnings() as w:
        warnings.simplefilter("always")
        _run()
    assert py.read_text() == good
    assert not [x for x in w if "cache" in str(x.message)]


def test_directory_in_place_of_a_cache_file_falls_back_to_memory(cache, monkeypatch):
    _run()
    (py,) = cache.glob("*.py")
    py.unlink()
    py.mkdir()
    _forget(monkeypatch)
    with pytest.warns(RuntimeWarning, match=str(py)):
        _run()
    assert py.is_dir()


def test_unwritable_cache_dir_falls_back_to_memory(cache, monkeypatch):
    cache.mkdir(parents=True, mode=0o700)

    def read_only(*a, **k):  # what a read-only filesystem answers (root ignores mode bits)
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.warns(RuntimeWarning, match="Read-only file system"):
        _run()
    assert not list(cache.glob("*.py"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root can write a directory whatever its mode")
def test_read_only_cache_dir_mode_falls_back_to_memory(cache):
    cache.mkdir(parents=True, mode=0o700)
    os.chmod(cache, 0o500)
    try:
        with pytest.warns(RuntimeWarning, match=str(cache)):
            _run()
    finally:
        os.chmod(cache, 0o700)


def test_unsafe_dir_reasons(tmp_path):
    d = tmp_path / "d"
    assert runtime.unsafe_dir_reason(d) is None and d.is_dir()
    os.chmod(d, 0o770)
    assert "group or others can write" in runtime.unsafe_dir_reason(d)
    f = tmp_path / "f"
    f.write_text("")
    assert runtime.unsafe_dir_reason(f) is not None
