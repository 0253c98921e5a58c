"""Autotuning: on a GPU, the first call of a kernel for a *shape class* times a small space of
launch configurations and keeps the fastest, in memory and on disk.

- **Shape class**: the recurrence (its IR text), algorithm, source-affecting options, input
  dtypes, and every dim size except the batch and time dims. T and the batch are never in
  the key, so a new sequence length or batch reuses the tuned configuration (a kernel's
  per-program work does not change with them, only the number of programs or iterations).
- **Space** (``space``): the block size of each split dim (the dims blocked across programs,
  e.g. the value dim of a chunked kernel or the channel dim of mamba's recurrent kernel) in
  {16, 32, 64, 128} up to the dim's padded size, × ``num_warps`` in {4, 8}: at most 8
  configurations, tried once each. A configuration that fails to compile (too much shared
  memory, too many registers) is skipped.
- **Disk**: ``<cache_dir>/autotune-<device>.json``, written atomically, under the kernel
  cache's trust rules (a directory others can write is not used: memory only, with a
  warning). Only block sizes and warp counts are read back, each checked (powers of two
  for dims of this kernel), so a tampered file can at worst pick a slow valid configuration.
- **When**: only on a GPU, only when the call sets neither ``block_sizes`` nor ``num_warps``
  and ``autotune`` is on (the default). The CPU interpreter runs the defaults (timing it
  says nothing about a GPU).
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from . import runtime

WARPS = (4, 8)
BLOCKS = (16, 32, 64, 128)
_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}
_LOADED: set[Path] = set()


def shape_key(compiled: "runtime.Compiled", sizes: Mapping[str, int]) -> str:
    """The shape class of a call (module doc): everything but the batch and time sizes."""
    rec = compiled.lowering.ir
    kept = sorted((d.name, int(sizes[d.name])) for d in rec.dims
                  if d.role not in ("batch", "time") and d.name in sizes)
    text = "\0".join([compiled.source, compiled.algorithm, repr(kept)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def space(compiled: "runtime.Compiled", sizes: Mapping[str, int]) -> list[dict]:
    """The configurations tried for a call: [{"block_sizes": {...}, "num_warps": w}, ...]."""
    split = [d for d in compiled.lowering.plan.split if d in sizes]
    blocks: list[dict] = [{}]
    for d in split:
        top = 1 << max(int(sizes[d]) - 1, 0).bit_length()
        opts = [b for b in BLOCKS if b <= max(top, BLOCKS[0])]
        if len(opts) > 3:
            opts = opts[-3:]
        blocks = [{**b, d: v} for b in blocks for v in opts]
    return [{"block_sizes": b, "num_warps": w} for b in blocks for w in WARPS]


def _path() -> Path:
    dev = "cpu"
    if runtime.has_gpu():
        import torch
        dev = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name())[:64]
    return runtime.cache_dir() / f"autotune-{dev}.json"


def _valid(cfg: Any, compiled: "runtime.Compiled") -> bool:
    if not isinstance(cfg, dict) or set(cfg) != {"block_sizes", "num_warps"}:
        return False
    w, bs = cfg["num_warps"], cfg["block_sizes"]
    if w not in WARPS or not isinstance(bs, dict):
        return False
    dims = set(compiled.lowering.plan.split)
    return all(d in dims and v in BLOCKS for d, v in bs.items())


def _load(path: Path) -> None:
    """Read the disk table into memory once per process (a damaged file is ignored)."""
    if path in _LOADED:
        return
    _LOADED.add(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and k not in _MEMORY:
                _MEMORY[k] = v


def _save(path: Path) -> None:
    why = runtime.unsafe_dir_reason(path.parent)
    if why is not None:
        runtime._warn(f"scancc: not using the autotuning cache in {path.parent}: {why}; "
                      "tuned configurations stay in memory")
        return
    try:
        runtime._write_atomic(path, json.dumps(_MEMORY, indent=1, sort_keys=True))
    except OSError as e:
        runtime._warn(f"scancc: cannot write the autotuning cache {path} "
                      f"({e.strerror or e}); tuned configurations stay in memory")


def cuda_time(fn: Callable[[], Any], reps: int = 5) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events), after one warm-up call."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


TIMER: Callable[[Callable[[], Any]], float] = cuda_time


def enabled(options: Mapping[str, Any]) -> bool:
    """Whether a call with ``options`` is tuned: on a GPU, ``autotune`` on, and neither
    ``block_sizes`` nor ``num_warps`` chosen by the caller."""
    return (runtime.has_gpu() and options.get("autotune", True)
            and options.get("block_sizes") is None and options.get("num_warps") is None)


def choose(compiled: "runtime.Compiled", sizes: Mapping[str, int],
           launch: Callable[[dict | None, int], Any]) -> dict:
    """The configuration for a call of ``compiled`` at ``sizes``: from memory or disk, else
    each of ``space`` timed through ``launch(block_sizes, num_warps)`` and the fastest kept."""
    key = shape_key(compiled, sizes)
    path = _path()
    with _LOCK:
        _load(path)
        cfg = _MEMORY.get(key)
    if _valid(cfg, compiled):
        return cfg
    best, best_t = None, float("inf")
    for c in space(compiled, sizes):
        try:
            t = TIMER(lambda c=c: launch(c["block_sizes"], c["num_warps"]))
        except Exception:  # noqa: BLE001 - a configuration that does not compile: skip it
            continue
        if t < best_t:
            best, best_t = c, t
    if best is None:  # nothing ran: the defaults (the call itself will report the error)
        return {"block_sizes": None, "num_warps": 4}
    with _LOCK:
        _MEMORY[key] = best
        _save(path)
    return best


def forget() -> None:
    """Drop the in-memory table (tests); the disk file is read again on the next call."""
    with _LOCK:
        _MEMORY.clear()
        _LOADED.clear()


__all__ = ["choose", "space", "shape_key", "forget", "cuda_time", "TIMER", "enabled", "WARPS", "BLOCKS"]
