"""Anchors of the offline sm_90 report (benchmarks/bench_sm90.py), from the anchors' own
compiled kernels: fla's chunked Triton forwards and mamba_ssm's Triton SSD
(``mamba_chunk_scan_combined``) are recorded, compiled for sm_90 and modelled exactly as
bench_sm90 does for scancc's kernels (same ``Launch`` records, same child compile, same
``model``); the call's time is the sum over its kernels.

Nothing of fla or mamba_ssm is copied here: fla is the installed package (``fla-core``,
a test oracle; without it the column says ``-``), mamba_ssm's Triton files are imported from
its PyPI sdist unpacked in a cache outside the repository (``fetch_mamba_ssm``; without it
the mamba2 column says ``-``).

How:

1. **pretend H100** (``pretend_h100``, in a fresh process, before fla is imported): fla picks
   block sizes and autotune config lists at import time from the device
   (``check_shared_mem``, ``IS_NVIDIA_HOPPER``, ``IS_TF32_SUPPORTED`` ...). Triton's active
   driver is replaced by one whose target is ``cuda`` sm_90 and whose device properties are
   an H100's (228 KiB opt-in shared memory = fla's ``Backend.HOPPER``, 132 SMs), and
   ``torch.cuda``'s capability / name / properties queries answer (9, 0) / "NVIDIA H100 80GB
   HBM3". ``FLA_DISABLE_BACKEND_DISPATCH=1``: fla's optional non-Triton backends (none is
   installed here) are not consulted.
2. **record**: the anchor op is called on ``meta`` tensors while every Triton kernel object
   (``JITFunction`` / ``Autotuner`` / ``Heuristics``) in the globals of every loaded
   ``fla.*`` / ``mamba_ssm.*`` module is a recorder. A launch is recorded once per autotune
   config (``triton.heuristics`` resolved with the bound arguments, in the decorator order:
   an outer heuristic sees the call's arguments, an inner one also the config's); explicit
   launch keywords (``num_warps``, ``num_stages``) win as in Triton.
3. **compile + model**: bench_sm90's child compiles each candidate (the job names the
   module to import and this file's ``prelude``), and ``model`` gives each a time. **The
   autotuned config is the one with the lowest modelled time** — what autotune would pick
   on a GPU if the model ranked configs as the GPU does (it need not). Autotuners with more
   than ``MAX_CONFIGS`` configs are thinned to a deterministic spread (stated per kernel in
   the report).

    .venv/bin/python benchmarks/anchors_sm90.py --fetch-mamba-ssm   # once: the sdist
    .venv/bin/python benchmarks/bench_sm90.py --names gla mamba2    # the report uses this file
    .venv/bin/python benchmarks/anchors_sm90.py --names retnet gla gated_delta_net \
        --batch 1 --time 8192 --heads 96                            # one shape, anchors only
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
from types import ModuleType, SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_CONFIGS = 3
MAMBA_SSM_VERSION = "2.3.2.post1"
MAMBA_SSM_SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"
CACHE = os.environ.get("SCANCC_ANCHOR_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "scancc-anchors"))
H100 = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
        "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
        "mem_bus_width": 5120}

# the anchor of each scancc recurrence: (source, op, note)
ANCHORS = {
    "linear_attn": ("fla", "chunk_linear_attn", "normalize=False"),
    "retnet": ("fla", "chunk_retention", ""),
    "simple_gla": ("fla", "chunk_simple_gla", ""),
    "gla": ("fla", "chunk_gla", ""),
    "delta_net": ("fla", "chunk_delta_rule", ""),
    "gated_delta_net": ("fla", "chunk_gated_delta_rule", ""),
    "hgrn2": ("fla", "chunk_gla", "HGRN2 = GLA with k = 1 - exp(g) (the torch op computing k not counted)"),
    "rwkv6": ("fla", "chunk_rwkv6", ""),
    "rwkv7": ("fla", "chunk_rwkv7", "default chunk_size (no lower_bound given: fla picks 16)"),
    "kda": ("fla", "chunk_kda", ""),
    "mamba2": ("mamba_ssm", "mamba_chunk_scan_combined", "chunk_size=256, no D/z/dt_bias"),
}


# ---------------------------------------------------------------------------------------
# environment

class _FakeUtils:
    def get_device_properties(self, device=0):
        return dict(H100)


class _FakeH100Driver:
    """Answers the device queries fla makes at import time as an H100 would; launches nothing."""
    utils = _FakeUtils()

    def is_active(self):
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def get_benchmarker(self):  # pragma: no cover - nothing is timed
        raise RuntimeError("no GPU: configs are chosen by the model, not timed")


def pretend_h100() -> None:
    import torch
    from triton.runtime import driver
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    driver.set_active(_FakeH100Driver())
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0,
                            multi_processor_count=132, total_memory=80 * 2**30,
                            shared_memory_per_block=49152,
                            shared_memory_per_block_optin=H100["max_shared_mem"],
                            shared_memory_per_multiprocessor=233472)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_name = lambda *a, **k: props.name
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0

    class _Device:  # ``with torch.cuda.device(x.device.index)`` (mamba_ssm) on meta tensors
        def __init__(self, device=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    torch.cuda.device = _Device


def mamba_ssm_root(download: bool = False) -> str | None:
    """The unpacked mamba_ssm sdist (its ``mamba_ssm`` package's parent), fetched once from
    PyPI into CACHE when ``download``; None when absent."""
    root = os.path.join(CACHE, f"mamba_ssm-{MAMBA_SSM_VERSION}")
    if os.path.isdir(os.path.join(root, "mamba_ssm", "ops", "triton")):
        return root
    if not download:
        return None
    import hashlib
    import urllib.request
    os.makedirs(CACHE, exist_ok=True)
    meta = json.load(urllib.request.urlopen(
        f"https://pypi.org/pypi/mamba-ssm/{MAMBA_SSM_VERSION}/json", timeout=60))
    sd = next(u for u in meta["urls"] if u["packagetype"] == "sdist")
    tgz = os.path.join(CACHE, sd["filename"])
    urllib.request.urlretrieve(sd["url"], tgz)
    with open(tgz, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != MAMBA_SSM_SHA256:
        raise RuntimeError(f"{tgz}: sha256 {digest} != {MAMBA_SSM_SHA256}")
    with tarfile.open(tgz) as t:
        t.extractall(CACHE, filter="data")
    return root if os.path.isdir(root) else None


def install_mamba_ssm(root: str) -> None:
    """Make ``mamba_ssm.ops.triton.*`` importable from the sdist without running
    ``mamba_ssm/__init__.py`` (it imports the CUDA extension ``selective_scan_cuda``): the
    top package is a bare module whose ``__path__`` is the sdist's ``mamba_ssm`` folder (its
    ``ops``, ``ops/triton`` and ``utils`` ``__init__``s import nothing CUDA)."""
    if "mamba_ssm" in sys.modules:
        return
    pkg = ModuleType("mamba_ssm")
    pkg.__path__ = [os.path.join(root, "mamba_ssm")]
    pkg.__version__ = MAMBA_SSM_VERSION
    sys.modules["mamba_ssm"] = pkg


def prelude() -> None:
    """Run before importing any anchor module (recording and compile children)."""
    pretend_h100()
    root = mamba_ssm_root()
    if root:
        install_mamba_ssm(root)


# ---------------------------------------------------------------------------------------
# recording (child process: ``python anchors_sm90.py --record``)

def _bench():
    import importlib.util
    if "bench_sm90" in sys.modules:
        return sys.modules["bench_sm90"]
    spec = importlib.util.spec_from_file_location("bench_sm90", os.path.join(HERE, "bench_sm90.py"))
    m = importlib.util.module_from_spec(spec)
    sys.modules["bench_sm90"] = m
    spec.loader.exec_module(m)
    return m


def _chain(kernel):
    """Outer-to-inner list of the wrappers down to the JITFunction."""
    out, k = [], kernel
    while k is not None and len(out) < 8:
        out.append(k)
        k = getattr(k, "fn", None)
        import inspect
        if inspect.isfunction(k):
            break
    return out


def _spread(configs: list, n: int) -> list:
    """At most ``n`` configs: one per (block kwargs, num_warps), the one with num_stages
    closest to 2, then an even spread over that list's order."""
    groups: dict = {}
    for c in configs:
        k = (json.dumps(c.kwargs, sort_keys=True, default=str), c.num_warps)
        if k not in groups or abs((c.num_stages or 2) - 2) < abs((groups[k].num_stages or 2) - 2):
            groups[k] = c
    configs = list(groups.values())
    if len(configs) <= n:
        return configs
    step = (len(configs) - 1) / (n - 1)
    return [configs[round(i * step)] for i in range(n)]


class AnchorRecorder:
    """``kernel[grid](*args, **kw)`` appends one entry to ``log``: the list of candidate
    ``Launch``es, one per (thinned) autotune config."""

    def __init__(self, name, kernel, module, log):
        import inspect

        from triton.runtime.autotuner import Autotuner, Heuristics
        self.name, self.module, self.log = name, module, log
        self.layers = []  # ("heur", values) | ("tune", configs, total)
        for k in _chain(kernel):
            if isinstance(k, Heuristics):
                self.layers.append(("heur", k.values))
            elif isinstance(k, Autotuner):
                cfgs = list(k.configs)
                self.layers.append(("tune", _spread(cfgs, MAX_CONFIGS), len(cfgs)))
        fn = _bench()._python_fn(kernel)
        self.params = list(inspect.signature(fn).parameters.values())
        try:
            self.source = inspect.getsource(fn)
        except (OSError, TypeError):
            self.source = ""

    def __getitem__(self, grid):
        def launch(*args, **kw):
            import inspect
            b = _bench()
            names = {p.name for p in self.params}
            defaults = {p.name: (p.default if p.default is not inspect.Parameter.empty else None)
                        for p in self.params}
            # as Triton's wrappers: a heuristic sees the arguments given (not the defaults)
            base = {p.name: v for p, v in zip(self.params, args)}
            base.update({k: v for k, v in kw.items() if k in names})
            extra = {k: v for k, v in kw.items() if k not in names}
            tune = next((ly for ly in self.layers if ly[0] == "tune"), None)
            configs = tune[1] if tune else [None]
            cands = []
            for cfg in configs:
                bound, ex = dict(base), dict(extra)
                for ly in self.layers:
                    if ly[0] == "heur":
                        for k, f in ly[1].items():
                            bound[k] = f(dict(bound))
                    elif cfg is not None:
                        bound.update({k: v for k, v in cfg.kwargs.items()})
                        if cfg.num_warps is not None:
                            ex.setdefault("num_warps", cfg.num_warps)
                        if cfg.num_stages is not None:
                            ex.setdefault("num_stages", cfg.num_stages)
                bound = {**defaults, **bound}
                g = grid(dict(bound)) if callable(grid) else grid
                g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
                rec = b.Recorder.__new__(b.Recorder)
                rec.params, rec.config, rec.source = self.params, None, self.source
                rec.name, rec.module_source = self.name, ""
                sub: list = []
                rec.log = sub
                kw2 = {k: v for k, v in bound.items()}
                kw2.update({k: v for k, v in ex.items() if k in ("num_warps", "num_stages")})
                b.Recorder.__getitem__(rec, g)(**kw2)
                ln = sub[0]
                ln.num_stages = ex.get("num_stages")
                cands.append(ln)
            self.log.append({"kernel": self.name, "module": self.module,
                             "configs": (tune[2] if tune else 0), "candidates": cands})
        return launch


def _patch_all(prefixes, log):
    from triton.runtime.jit import KernelInterface
    saved = []
    for mname, m in list(sys.modules.items()):
        if not mname.startswith(prefixes) or m is None:
            continue
        for k, v in list(vars(m).items()):
            if isinstance(v, KernelInterface) and not isinstance(v, AnchorRecorder):
                fn = _bench()._python_fn(v)
                # only kernels (launched with a grid), defined in this module
                if getattr(fn, "__module__", mname) != mname:
                    continue
                try:
                    setattr(m, k, AnchorRecorder(k, v, mname, log))
                    saved.append((m, k, v))
                except Exception:  # noqa: BLE001 - a helper we cannot wrap stays
                    pass
    # imported names (``from fla.ops.x import kernel``) bound in other modules
    by_id = {id(v): r for m, k, v in saved for r in [getattr(m, k)]}
    for mname, m in list(sys.modules.items()):
        if not mname.startswith(prefixes) or m is None:
            continue
        for k, v in list(vars(m).items()):
            if id(v) in by_id:
                setattr(m, k, by_id[id(v)])
                saved.append((m, k, v))
    return saved


def _inputs(name: str, s: dict):
    import torch
    bf, f32 = torch.bfloat16, torch.float32

    def t(*shape, dtype=bf):
        return torch.empty(shape, dtype=dtype, device="meta")
    if name == "mamba2":
        B, T, H, P, N, G = (s[k] for k in ("batch", "time", "heads", "headdim", "dstate", "groups"))
        return (t(B, T, H, P), t(B, T, H), t(H, dtype=f32), t(B, T, G, N), t(B, T, G, N)), {
            "chunk_size": 256}
    B, T, H, K, V = (s[k] for k in ("batch", "time", "heads", "key", "value"))
    q, k, v = t(B, T, H, K), t(B, T, H, K), t(B, T, H, V)
    if name == "linear_attn":
        return (q, k, v), {"normalize": False}
    if name == "retnet":
        return (q, k, v), {}
    if name == "simple_gla":
        return (q, k, v, t(B, T, H, dtype=f32)), {}
    if name in ("gla", "hgrn2"):
        return (q, k, v, t(B, T, H, K, dtype=f32)), {}
    if name == "delta_net":
        return (q, k, v, t(B, T, H)), {}
    if name == "gated_delta_net":
        return (q, k, v, t(B, T, H, dtype=f32), t(B, T, H)), {}
    if name == "rwkv6":
        return (q, k, v, t(B, T, H, K, dtype=f32), t(H, K)), {}
    if name == "rwkv7":  # r, w, k, v, a, b
        return (q, t(B, T, H, K, dtype=f32), k, v, t(B, T, H, K), t(B, T, H, K)), {}
    if name == "kda":
        return (q, k, v, t(B, T, H, K, dtype=f32), t(B, T, H)), {}
    raise KeyError(name)


def _op(name: str):
    src, op, _ = ANCHORS[name]
    if src == "fla":
        import fla.ops
        return getattr(fla.ops, op), ("fla.",)
    import importlib
    m = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    return getattr(m, op), ("mamba_ssm.",)


def record_child(cases: list) -> list:
    """[(name, sizes)] -> per case {"launches": [...]} or {"error": ...} (JSON-able)."""
    prelude()
    b = _bench()
    out = []
    for name, sizes in cases:
        try:
            fn, prefixes = _op(name)
            import torch
            log: list = []
            saved = _patch_all(prefixes, log)
            try:
                args, kw = _inputs(name, sizes)
                with torch.no_grad():
                    fn(*args, **kw)
            finally:
                for m, k, v in reversed(saved):
                    setattr(m, k, v)
            for e in log:
                e["candidates"] = [dataclasses.asdict(c) for c in e["candidates"]]
            out.append({"launches": log})
        except Exception as e:  # noqa: BLE001 - the row says why
            import traceback
            out.append({"error": f"{type(e).__name__}: {e}"[:300],
                        "trace": traceback.format_exc()[-1500:]})
    del b
    return out


# ---------------------------------------------------------------------------------------
# parent side

def compile_cache() -> str:
    """bench_sm90's compile results of the anchors' jobs, by job key (the key holds the
    kernel's source, signature, constexprs, warps and stages; the file name the Triton
    version; ptxas/nvdisasm ship with Triton)."""
    import triton
    return os.path.join(CACHE, f"compiled-triton{triton.__version__}.json")


def available(name: str) -> str | None:
    """Why the compiled anchor of ``name`` is unavailable (None: available)."""
    if name not in ANCHORS:
        return "no anchor op"
    src = ANCHORS[name][0]
    if src == "fla":
        import importlib.util
        return None if importlib.util.find_spec("fla") else "fla not installed"
    return None if mamba_ssm_root() else f"mamba_ssm {MAMBA_SSM_VERSION} sdist not in {CACHE}"


def record(cases: list, timeout: int = 1800) -> list:
    """Record ``[(name, sizes)]`` in a fresh child (pretend H100 before fla is imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--record"],
                       input=json.dumps(cases), env=env, capture_output=True, text=True,
                       timeout=timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("@@JSON@@")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"anchor record child failed (rc {r.returncode}): {r.stderr[-3000:]}")
    b = _bench()
    out = []
    for res in json.loads(line[len("@@JSON@@"):]):
        if "error" in res:
            out.append(res)
            continue
        for e in res["launches"]:
            cands = []
            for c in e["candidates"]:
                c = dict(c)
                c["args"] = [b.Arg(**{**a, "shape": tuple(a["shape"])}) for a in c["args"]]
                c["grid"] = tuple(c["grid"])
                cands.append(b.Launch(**c))
            e["candidates"] = cands
        out.append(res)
    return out


def jobs_for(recorded: list) -> list:
    """Compile jobs of every candidate of every recorded call."""
    b = _bench()
    jobs = []
    for res in recorded:
        for e in res.get("launches", []):
            e["jobs"] = []
            for ln in e["candidates"]:
                j = b.compile_job(ln, "", module=e["module"],
                                  prelude=os.path.abspath(__file__))
                e["jobs"].append(j)
                jobs.append(j)
    return jobs


def modelled(res: dict, compiled: dict) -> dict:
    """{"time": seconds or None, "kernels": [(kernel, chosen launch, model, configs tried,
    configs total, errors)]} of one recorded call: per launch the candidate with the lowest
    modelled time."""
    b = _bench()
    if "error" in res:
        return {"time": None, "error": res["error"], "kernels": []}
    tot, rows = 0.0, []
    for e in res["launches"]:
        best, errs = None, []
        for ln, j in zip(e["candidates"], e["jobs"]):
            c = compiled.get(j["key"], {"error": "not compiled"})
            if "error" in c:
                errs.append(c["error"])
                continue
            try:
                loops = b.parse_loops(ln.source, ln.kernel, ln.values(), ln.grid, ln.constexprs())
            except (SyntaxError, ValueError) as ex:
                loops = [b.Loop(0, None, f"parse failed: {ex}")]
            m = b.model(ln, c, b.iterations(loops), b.depth_multipliers(loops), loops)
            m["regs"], m["spill"], m["smem"], m["tc"] = (c["regs"], c["spill_st"] + c["spill_ld"],
                                                         c["smem"], c["tc"])
            m["iters"] = b.iterations(loops)
            if best is None or m["time"] < best[1]["time"]:
                best = (ln, m)
        if best is None:
            rows.append((e["kernel"], None, None, len(e["candidates"]), e["configs"], errs))
            return {"time": None, "error": f"{e['kernel']}: {errs[0][:200] if errs else '?'}",
                    "kernels": rows}
        tot += best[1]["time"]
        rows.append((e["kernel"], best[0], best[1], len(e["candidates"]), e["configs"], errs))
    return {"time": tot, "kernels": rows}


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", action="store_true", help="(child) record cases from stdin")
    ap.add_argument("--fetch-mamba-ssm", action="store_true",
                    help=f"download the mamba_ssm {MAMBA_SSM_VERSION} sdist into {CACHE}")
    ap.add_argument("--names", nargs="*", help="print the compiled anchors of these "
                    "recurrences at one shape (--batch, --time, --heads; K = V = 128)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--time", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=96)
    a = ap.parse_args(argv)
    if a.names:
        b = _bench()
        cases = []
        for n in a.names:
            sizes = {"batch": a.batch, "time": a.time, "heads": a.heads, "key": 128, "value": 128}
            if n == "mamba2":
                sizes = {"batch": a.batch, "time": a.time, "heads": a.heads, "headdim": 64,
                         "dstate": 128, "groups": 1}
            cases.append([n, sizes])
        res = record(cases)
        comp = b.compile_all(jobs_for(res), timeout=7200, cache=compile_cache())
        for (n, sizes), r in zip(cases, res):
            m = modelled(r, comp)
            t = "failed: " + str(m.get("error")) if m["time"] is None else f"{m['time'] * 1e6:.1f} us"
            print(f"{n} {ANCHORS[n][0]}.{ANCHORS[n][1]} {sizes}: {t} (modelled, H100)")
            for kern, ln, mm, tried, total, _ in m["kernels"]:
                if mm:
                    print(f"    {kern}: {mm['time'] * 1e6:.1f} us {mm['bound']}, grid {ln.grid}, "
                          f"{ln.num_warps} warps, regs {mm['regs']}, spill {mm['spill']} B, "
                          f"configs {tried}/{total or 1}")
        return 0
    if a.record:
        cases = json.load(sys.stdin)
        print("@@JSON@@" + json.dumps(record_child(cases), default=str))
        return 0
    if a.fetch_mamba_ssm:
        print(mamba_ssm_root(download=True))
        return 0
    ap.print_help()
    return 0

if __name__ == "__main__":
    sys.exit(main())
