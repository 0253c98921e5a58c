"""Loading and running generated modules: the kernel cache, the CPU interpreter switch, the
interpreter's bf16 dot fix and its memory-traffic counters.

Generated source is identical for GPU and CPU. Without a CUDA device the backend sets
``TRITON_INTERPRET=1`` before triton is first imported (see ``prepare``), so ``@triton.jit``
builds interpreted kernels that run on torch CPU tensors.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..base import freeze

GENERATOR_VERSION = "1"
_LOCK = threading.Lock()
_MODULES: dict[str, object] = {}
_GPU: bool | None = None
_PREPARED = False


def has_gpu() -> bool:
    global _GPU
    if _GPU is None:  # asked once: a process does not gain or lose its CUDA devices
        import torch
        _GPU = torch.cuda.is_available()
    return _GPU


def choose_mode() -> None:
    """Without a GPU, set TRITON_INTERPRET=1 if triton is not imported yet (it does not import
    triton). Called by ``prepare`` and before scancc imports torch modules that import triton
    themselves (torch._dynamo)."""
    if "triton" not in sys.modules and not has_gpu():
        os.environ["TRITON_INTERPRET"] = "1"


def prepare() -> None:
    """Put triton in interpreter mode when there is no GPU. Call before importing triton:
    triton.language builds its own jit helpers (tl.zeros, tl.sum, ...) at import time, in
    whichever mode is set then, so the mode is chosen once per process."""
    global _PREPARED
    if _PREPARED or has_gpu():
        return
    choose_mode()
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    if isinstance(tl.zeros, JITFunction):
        _switch_to_interpreter()
    install_interpreter_fixes()
    _PREPARED = True


def _switch_to_interpreter() -> None:
    """Triton was imported without TRITON_INTERPRET (by another library, before scancc) on a
    machine with no GPU: ``triton.language`` then holds GPU-mode ``@jit`` helpers (tl.zeros,
    tl.sum, ...) that the interpreter cannot call. Set the variable (later ``@triton.jit``
    decorations read it) and rebuild each such helper as an interpreted function, in every
    ``triton.language`` module and on ``tl.tensor``'s methods."""
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    swapped: dict[int, object] = {}

    def swap(owner, attrs) -> None:
        for k, v in list(attrs):
            if isinstance(v, JITFunction):
                if id(v) not in swapped:
                    swapped[id(v)] = InterpretedFunction(v.fn)
                setattr(owner, k, swapped[id(v)])

    try:
        for name, m in list(sys.modules.items()):
            if m is not None and (name == "triton.language" or name.startswith("triton.language.")):
                swap(m, vars(m).items())
        swap(tl.tensor, vars(tl.tensor).items())
    except Exception as e:  # noqa: BLE001 - a triton whose layout differs: say what to do
        raise RuntimeError(
            "triton was imported in GPU mode (TRITON_INTERPRET unset) before scancc, and there "
            "is no GPU here; scancc could not switch it to the interpreter "
            f"({type(e).__name__}: {e}). Set TRITON_INTERPRET=1 in the environment, or import "
            "scancc's Triton backend before the library that imports triton") from e
    if isinstance(tl.zeros, JITFunction):
        raise RuntimeError(
            "triton was imported in GPU mode (TRITON_INTERPRET unset) before scancc, and there "
            "is no GPU here: set TRITON_INTERPRET=1 in the environment, or import scancc's "
            "Triton backend before the library that imports triton")


_DEVICE = None


def device():
    global _DEVICE
    if _DEVICE is None:
        import torch
        _DEVICE = torch.device("cuda") if has_gpu() else torch.device("cpu")
    return _DEVICE


@dataclass(frozen=True)
class Compiled:
    """What a call needs, built once per (IR, options, input dtypes): the lowering, its
    source, the loaded launcher, and the per-input facts ``TritonBackend.run`` uses."""
    lowering: Any
    source: str
    launcher: Callable
    algorithm: str
    ranks: tuple[int, ...]                  # declared rank of each input
    unsqueeze: tuple[tuple[int, ...], ...]  # axes of the optional dims, per input
    counters: Mapping[str, Any]

    @property
    def optional(self) -> bool:
        """Whether some input has optional dims (a call may leave them out)."""
        return any(self.unsqueeze)


# (id(rec), options, dtypes) -> (rec, Compiled): the per-call lookup, no hashing of the IR;
# the entry holds rec, so its id cannot be reused while the entry lives
_BY_ID: dict[tuple, tuple[Any, Compiled]] = {}
# (rec, options, dtypes) -> Compiled: an equal IR built again (a new object) hits here
_BY_IR: dict[tuple, Compiled] = {}
_MAX_ENTRIES = 1024


def compiled(rec, options: Mapping[str, Any], dtypes: tuple[str, ...],
             build: Callable[[], Compiled]) -> Compiled:
    """The cached ``Compiled`` of (rec, options, dtypes); ``build()`` makes it on a miss."""
    okey = tuple((k, freeze(v)) for k, v in options.items())
    key = (id(rec), okey, dtypes)
    hit = _BY_ID.get(key)
    if hit is not None and hit[0] is rec:
        return hit[1]
    full = (rec, tuple(sorted(okey)), dtypes)
    c = _BY_IR.get(full)
    if c is None:
        c = build()
        with _LOCK:
            if len(_BY_IR) >= _MAX_ENTRIES:
                _BY_IR.clear()
            _BY_IR[full] = c
    with _LOCK:
        if len(_BY_ID) >= _MAX_ENTRIES:
            _BY_ID.clear()
        _BY_ID[key] = (rec, c)
    return c


def forget_compiled() -> None:
    """Drop every cached ``Compiled`` (tests; loaded modules stay in ``_MODULES``)."""
    with _LOCK:
        _BY_ID.clear()
        _BY_IR.clear()


def cache_dir() -> Path:
    """Where generated modules are kept: $SCANCC_CACHE_DIR/triton, or ~/.cache/scancc/triton."""
    root = os.environ.get("SCANCC_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "scancc")
    return Path(root) / "triton"


def cache_key(ir_text: str, algorithm: str, options: dict, dtypes: tuple[str, ...]) -> str:
    import triton
    parts = [ir_text, algorithm, repr(sorted(options.items())), ",".join(dtypes),
             triton.__version__, GENERATOR_VERSION, "interpret" if not has_gpu() else "gpu"]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_WARNED: set[str] = set()


def _warn(msg: str) -> None:
    if msg not in _WARNED:  # once per message (per directory and reason) and process
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def unsafe_dir_reason(d: Path) -> str | None:
    """Why the cache directory ``d`` must not be used (None: it may). It is created (mode
    0700) if missing; it must be a directory owned by this user that neither group nor
    others can write."""
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
    """Keep ``source`` at ``path`` (a record for people to read: it is never imported).
    A missing, different, undecodable or unreadable file is rewritten; False (after a
    warning) when the directory is unsafe or the file cannot be written."""
    d = path.parent
    why = unsafe_dir_reason(d)
    if why is not None:
        _warn(f"scancc: not using the Triton kernel cache directory {d}: {why}; generated "
              f"kernels stay in memory (set SCANCC_CACHE_DIR to a private directory)")
        return False
    try:
        with open(path, "rb") as f:
            if f.read().decode("utf-8") == source:
                return True
    except (OSError, UnicodeDecodeError):
        pass  # missing, a directory, unreadable, or not UTF-8: (re)write it below
    try:
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(f"{path} is a directory")
        _write_atomic(path, source)
        return True
    except OSError as e:
        _warn(f"scancc: cannot write the Triton kernel cache file {path} in {d} "
              f"({e.strerror or e}); the kernel stays in memory")
        return False


class _VerifiedLoader:
    """The module's ``__loader__``: serves the verified text (``inspect``/``linecache``
    fall back to it), never the file."""

    def __init__(self, text: str):
        self._text = text

    def get_source(self, name):
        return self._text


def _exec_verified(name: str, source: str, filename: str):
    """A fresh module made by compiling ``source`` itself (no file and no .pyc is read).
    ``linecache`` holds the same text under ``filename``, so Triton's ``@jit`` (which reads
    kernel source with ``inspect.getsourcelines``) sees exactly what runs."""
    lines = source.splitlines(keepends=True)
    # mtime None: linecache.checkcache leaves the entry alone (it never re-reads the disk)
    linecache.cache[filename] = (len(source), None, lines, filename)
    mod = types.ModuleType(name)
    mod.__file__ = filename
    mod.__loader__ = _VerifiedLoader(source)
    sys.modules[name] = mod  # inspect.getmodule finds the kernels' module through it
    code = compile(source, filename, "exec", dont_inherit=True)
    exec(code, mod.__dict__)  # noqa: S102 - the text scancc generated, compared above
    if not has_gpu():  # the interpreter reads a kernel's source at its first launch: now,
        from triton.runtime.interpreter import InterpretedFunction  # while linecache holds it
        for v in list(vars(mod).values()):
            if isinstance(v, InterpretedFunction):
                v.rewrite()
    return mod


def load(key: str, source: str):
    """The module of ``source`` (cached in memory; kept on disk under ``key``).

    Only ``source`` itself is compiled and run: the cache file is written for people to
    read and compared, never imported, so a planted file or ``__pycache__/*.pyc`` is inert.
    An unsafe cache directory (see ``unsafe_dir_reason``) or an unwritable file is skipped
    with a warning and the module lives in memory only."""
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        path = cache_dir() / f"{key[:32]}.py"
        on_disk = _store(path, source)
        name = f"scancc_triton_{key[:32]}"
        filename = str(path) if on_disk else f"<scancc triton kernel {key[:32]}>"
        prepare()
        mod = _exec_verified(name, source, filename)
        _MODULES[key] = mod
        return mod


@contextlib.contextmanager
def quiet_padding():
    """Padded lanes of a block (past a non-power-of-two size) compute on zeros and may make
    0/0 or log(0) there, as on a GPU; they are masked out of every reduction and store, so
    the interpreter's NumPy warnings about them are noise."""
    if has_gpu():
        yield
        return
    import numpy as np
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        yield


_FIXED = False
# held around every interpreted Triton launch (see install_interpreter_fixes)
INTERPRETER_LOCK = threading.RLock()


def install_interpreter_fixes() -> None:
    """Make the CPU interpreter compute what the GPU computes.

    triton 3.9's interpreter stores bfloat16 as raw uint16 bits and its ``create_dot``
    multiplies those bits as integers (triton-lang/triton#11584). A GPU multiplies bf16
    operands exactly and accumulates in float32, so the fix converts bf16 operands to float32
    before the matmul. Float16/float32 dots and everything else are left as they are.
    """
    global _FIXED
    if _FIXED:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as it

    orig = it.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def f32(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h
                data = it._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return it.TensorHandle(data, tl.float32)
            a, b = f32(a), f32(b)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    it.InterpreterBuilder.create_dot = create_dot

    # The interpreter keeps one global builder (grid index, patched tl functions): two
    # launches at once from two threads corrupt each other. Interpreted launches are
    # serialised by one process-wide lock (GPU launches are not affected).
    orig_run = it.InterpretedFunction.run

    def run(self, *args, **kwargs):
        with INTERPRETER_LOCK:
            return orig_run(self, *args, **kwargs)

    it.InterpretedFunction.run = run
    _FIXED = True


class Traffic:
    """Global-memory bytes an interpreted kernel loads and stores (masked-off lanes
    excluded): ``loaded``/``stored`` count every access, ``unique_loaded``/``unique_stored``
    each address once (the traffic of a cache that never evicts)."""

    def __init__(self):
        self.loaded = 0
        self.stored = 0
        self.atomic = 0    # bytes of atomic read-modify-writes (tl.atomic_add: ungroup outputs)
        self.loads = 0
        self.stores = 0
        self._addr = {"load": [], "store": []}

    def _unique(self, kind: str) -> int:
        import numpy as np
        chunks = self._addr[kind]
        if not chunks:
            return 0
        out = 0
        for size in {s for s, _ in chunks}:
            a = np.concatenate([c for s, c in chunks if s == size])
            out += int(np.unique(a).size) * size
        return out

    @property
    def unique_loaded(self) -> int:
        return self._unique("load")

    @property
    def unique_stored(self) -> int:
        return self._unique("store")


@contextlib.contextmanager
def count_traffic():
    """Count the bytes of every load/store (and atomic add) the interpreter executes inside
    the block."""
    import numpy as np
    from triton.runtime import interpreter as it

    traffic = Traffic()
    B = it.InterpreterBuilder
    orig_load, orig_store = B.create_masked_load, B.create_masked_store
    orig_rmw = B.create_atomic_rmw

    def nbytes(kind, ptrs, mask):
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        traffic._addr[kind].append((size, np.asarray(ptrs.data)[m].astype(np.uint64)))
        return int(np.count_nonzero(m)) * size

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        traffic.loaded += nbytes("load", ptrs, mask)
        traffic.loads += 1
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        traffic.stored += nbytes("store", ptrs, mask)
        traffic.stores += 1
        return orig_store(self, ptrs, value, mask, cache_policy)

    def rmw(self, op, ptrs, val, mask, sem, scope):  # one element counts once, like a store
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        traffic.atomic += int(np.count_nonzero(m)) * (ptrs.get_element_ty().primitive_bitwidth // 8)
        return orig_rmw(self, op, ptrs, val, mask, sem, scope)

    B.create_masked_load, B.create_masked_store, B.create_atomic_rmw = load, store, rmw
    try:
        yield traffic
    finally:
        B.create_masked_load, B.create_masked_store = orig_load, orig_store
        B.create_atomic_rmw = orig_rmw
