"""Loading generated torch modules: the verified module cache (as the Triton backend's).

Only the generated text itself is compiled and run; the cache file
($SCANCC_CACHE_DIR/torch or ~/.cache/scancc/torch) is written for people to read and is never
imported, so a planted file or ``__pycache__`` is inert. An unsafe cache directory (not
owned by this user, or writable by others) is skipped with a warning: the module then lives
in memory only.
"""
from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
import types
import warnings
from pathlib import Path

GENERATOR_VERSION = "1"
_LOCK = threading.Lock()
_MODULES: dict[str, object] = {}
_WARNED: set[str] = set()


def cache_dir() -> Path:
    root = os.environ.get("SCANCC_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "scancc")
    return Path(root) / "torch"


def cache_key(source: str) -> str:
    import torch
    parts = [source, torch.__version__, GENERATOR_VERSION]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _warn(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def unsafe_dir_reason(d: Path) -> str | None:
    """Why the cache directory ``d`` must not be used (None: it may)."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(d)
    except OSError as e:
        return f"it cannot be created or read ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"group or others can write it (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _store(path: Path, source: str) -> bool:
    why = unsafe_dir_reason(path.parent)
    if why is not None:
        _warn(f"scancc: not using the torch module cache directory {path.parent}: {why}; "
              "generated modules stay in memory (set SCANCC_CACHE_DIR to a private directory)")
        return False
    try:
        with open(path, "rb") as f:
            if f.read().decode("utf-8") == source:
                return True
    except (OSError, UnicodeDecodeError):
        pass
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(source)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return True
    except OSError as e:
        _warn(f"scancc: cannot write the torch module cache file {path} ({e.strerror or e}); "
              "the module stays in memory")
        return False


class _VerifiedLoader:
    def __init__(self, text: str):
        self._text = text

    def get_source(self, name):
        return self._text


def load(source: str):
    """The module of ``source`` (cached in memory by its hash; kept on disk for reading)."""
    key = cache_key(source)
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        path = cache_dir() / f"{key[:32]}.py"
        filename = str(path) if _store(path, source) else f"<scancc torch module {key[:32]}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True),
                                     filename)
        name = f"scancc_torch_{key[:32]}"
        mod = types.ModuleType(name)
        mod.__file__ = filename
        mod.__loader__ = _VerifiedLoader(source)
        sys.modules[name] = mod
        exec(compile(source, filename, "exec", dont_inherit=True), mod.__dict__)  # noqa: S102
        _MODULES[key] = mod
        return mod


__all__ = ["load", "cache_dir", "cache_key"]
