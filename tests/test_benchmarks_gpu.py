"""The GPU report tools (benchmarks/bench_sm90.py, benchmarks/bench_gpu.py) without a GPU:
the launch recorder against real interpreted launches, the loop-trip parser, the TTGIR and
SASS text parsers and the occupancy/wave model against hand-computed values, and the
no-GPU path of the GPU benchmark."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


sm90 = _load("bench_sm90")


# --- the recorder ----------------------------------------------------------------------

def _real_launches(launcher, args):
    """(kernel, grid, num_warps) of each launch the launcher really makes (in the
    interpreter): every module-level kernel wrapped by a pass-through proxy."""
    g = launcher.__globals__
    seen = []
    saved = {k: v for k, v in g.items() if sm90._is_kernel(v)}

    class Proxy:
        def __init__(self, name, k):
            self.name, self.k = name, k

        def __getitem__(self, grid):
            def go(*a, **kw):
                gr = grid(kw) if callable(grid) else grid
                seen.append((self.name, tuple(int(x) for x in gr), kw.get("num_warps", 4)))
                return self.k[grid](*a, **kw)
            return go
    try:
        for k, v in saved.items():
            g[k] = Proxy(k, v)
        launcher(*args, None, False, None, 4)
    finally:
        g.update(saved)
    return seen


@pytest.mark.parametrize("name,dims", [
    ("simple_gla", {"batch": 2, "time": 40, "heads": 3, "key": 16, "value": 32}),
    ("hgrn", {"batch": 2, "time": 9, "chan": 40}),
    ("mamba2", {"batch": 1, "time": 20, "heads": 2, "headdim": 16, "groups": 1,
                "dstate": 16}),
])
def test_recorder_sees_exactly_the_launches_a_real_run_makes(name, dims):
    import torch
    from scancc import registry
    from scancc.backends.triton import TritonBackend
    rec = registry.get(name).build()
    sizes = sm90.case_sizes(rec, dims, {})
    launches, algo, dev = sm90.record(rec, sizes, "float32")
    assert dev == "meta" and launches
    c = TritonBackend().compiled(rec, {}, tuple(["float32"] * len(rec.inputs)))
    args = [torch.rand(t.shape) * 0.5 for t in sm90.input_tensors(rec, sizes, "float32")]
    real = _real_launches(c.launcher, args)
    assert [(ln.kernel, ln.grid, ln.num_warps) for ln in launches] == real
    for ln in launches:
        assert f"def {ln.kernel}(" in c.source
        # every tensor argument carries its full shape, every size argument its value
        t = [a for a in ln.args if a.kind == "tensor"]
        assert t and all(a.nbytes == math.prod(a.shape) * 4 for a in t)
        vals = ln.values()
        for k in ("TIME", "HEADS"):
            if k in vals:
                assert vals[k] == sizes[k.lower()]
    # the real call did not see the recorder (the module's kernels were restored)
    assert not any(isinstance(v, sm90.Recorder) for v in c.launcher.__globals__.values())


def test_compile_job_types_follow_the_recorded_arguments():
    A = sm90.Arg
    ln = sm90.Launch("k", (4, 2), [
        A("x", "tensor", False, dtype="bfloat16", shape=(2, 3), nbytes=12),
        A("h0", "none", False), A("T", "int", False, 2048), A("BIG", "int", False, 2**33),
        A("BT", "int", True, 64), A("USE", "bool", True, False), A("s", "float", False, 0.5),
    ], 8)
    job = sm90.compile_job(ln, "/x.py")
    assert job["sig"] == {"x": "*bf16", "h0": "*fp32", "T": "i32", "BIG": "i64",
                          "BT": "constexpr", "USE": "constexpr", "s": "fp32"}
    assert job["const"] == {"BT": 64, "USE": False} and job["num_warps"] == 8



def test_specialized_compile_jobs_carry_the_int_values_and_key_apart(monkeypatch):
    """--specialize: a GPU launch specializes ints (== 1: constexpr; % 16: divisibility) and
    aligned pointers; the job carries the values the child needs and never shares a cache
    key with the unspecialized compile."""
    A = sm90.Arg
    ln = sm90.Launch("k", (4,), [A("x", "tensor", False, dtype="float32", shape=(4,), nbytes=16),
                                 A("h0", "none", False), A("s1", "int", False, 1),
                                 A("T", "int", False, 2048)], 4)
    plain = sm90.compile_job(ln, "/x.py")
    monkeypatch.setattr(sm90, "SPECIALIZE", True)
    spec = sm90.compile_job(ln, "/x.py")
    assert spec["specialize"] and spec["ints"] == {"s1": 1, "T": 2048} and spec["nones"] == ["h0"]
    assert spec["key"] != plain["key"] and not plain["specialize"]


def test_arg_use_counts_cp_async_copies_as_loads():
    """Aligned (specialized) loads are pipelined into cp.async copies to shared memory: the
    argument is still read (its bytes count)."""
    ttgir = """tt.func public @k(%x: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %y: !tt.ptr<f32>) {
    %0 = tt.splat %x : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>
    %1 = tt.addptr %0, %c : tensor<16x!tt.ptr<f32>>, tensor<16xi32>
    %2 = ttg.async_copy_global_to_local %1, %buf : tensor<16x!tt.ptr<f32>> -> <16xf32>
    %3 = tt.splat %y : !tt.ptr<f32> -> tensor<16x!tt.ptr<f32>>
    tt.store %3, %v : tensor<16x!tt.ptr<f32>>
"""
    assert sm90.ttgir_arg_use(ttgir) == {"x": [True, False], "y": [False, True]}

# --- loop trip counts ------------------------------------------------------------------

KERNEL = '''
@triton.jit
def k(x, T, N: tl.constexpr, BT: tl.constexpr, USE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    NT = tl.cdiv(T, BT)
    for c in range(0, NT):
        b = tl.load(x + c)
        for j in range(N // 16):
            b += 1
    if USE:
        for s in tl.range(0, T, 2 * BT):
            pass
    else:
        for s in range(0, 1000):
            pass
    for r in range(0, i + 1):
        pass
    for u in tl.static_range(4):
        pass


@triton.jit
def other(x, T):
    for c in range(T):
        pass
'''


def test_loop_parser_evaluates_bounds_nesting_branches_and_program_ids():
    vals = {"T": 100, "N": 64, "BT": 16, "USE": True}
    loops = sm90.parse_loops(KERNEL, "k", vals, (3,))
    # cdiv(100,16)=7 chunks x 64//16=4 inner; tl.range(0,100,32)=4; program 2 of 3 -> 3;
    # static_range unrolled, not counted
    assert [lp.trips for lp in loops] == [7, 4, 3]
    assert [lp.trips for lp in loops[0].body] == [4]
    assert sm90.iterations(loops) == 7 * 4 + 4 + 3
    assert sm90.depth_multipliers(loops) == [1, 7, 28]
    loops = sm90.parse_loops(KERNEL, "k", {**vals, "USE": False}, (1,))
    assert sm90.iterations(loops) == 28 + 1000 + 1
    assert sm90.iterations(sm90.parse_loops(KERNEL, "other", {"T": 33}, (1,))) == 33


def test_loop_parser_says_unknown_for_data_dependent_bounds():
    src = '''
def k(x, T):
    n = tl.load(x)
    for c in range(0, n):
        pass
'''
    loops = sm90.parse_loops(src, "k", {"T": 8}, (1,))
    assert loops[0].trips is None and sm90.iterations(loops) is None
    assert "?" in sm90.loop_text(loops)


def test_loop_parser_evaluates_tuple_assignments_element_wise():
    # fla's kernels set the sequence bounds and chunk counts with tuple assignments
    src = '''
def k(x, T, BT: tl.constexpr, BS: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_n = tl.program_id(1)
    if IS_VARLEN:
        bos, eos = tl.load(x + i_n), tl.load(x + i_n + 1)
        T = eos - bos
        NT, NS = tl.cdiv(T, BT), tl.cdiv(T, BS)
    else:
        bos, eos = i_n * T, i_n * T + T
        NT, NS = tl.cdiv(T, BT), tl.cdiv(T, BS)
    for i_t in range(NT):
        pass
    for i_s in range(NS):
        pass
    a, b = divmod(T, 3)
    for j in range(a):
        pass
'''
    loops = sm90.parse_loops(src, "k", {"T": 2048, "BT": 64, "BS": 128, "IS_VARLEN": False},
                             (1, 4))
    # cdiv(2048, 64) = 32, cdiv(2048, 128) = 16; a from a call returning a tuple: unknown
    assert [lp.trips for lp in loops] == [32, 16, None]
    assert sm90.iterations(loops[:2]) == 48


def test_selective_scan_floor_closed_form():
    B, D, T, N = 8, 2048, 2048, 16
    n = B * D * T * N
    sfu = n / (132 * 16 * 1.98e9)          # one exp per state element per step on the MUFU
    issue = 5 * n / (132 * 4 * 32 * 1.98e9)
    old = sm90.selective_scan_model(B, D, T, N)
    assert sfu > issue > 0 and sfu > old    # the exp floor binds at this shape
    assert sm90.selective_scan_floor(B, D, T, N) == pytest.approx(sfu, rel=1e-12)
    assert sm90.selective_scan_floor(B, D, T, N) == pytest.approx(128.4e-6, rel=1e-3)
    # N = 1: the bytes bind again (u, delta, y: 3 x B x D x T bf16 + A + B, C)
    assert sm90.selective_scan_floor(B, D, T, 1) == pytest.approx(
        sm90.selective_scan_model(B, D, T, 1), rel=1e-12)


def _anchor_kernel_module(tmp_path, order):
    """A module with one kernel wrapped in triton.heuristics and triton.autotune, in
    ``order`` (outer first)."""
    heur = ('@triton.heuristics({"HAS_Y": lambda a: a["y"] is not None, '
            '"EVEN": lambda a: a["n"] % a["BLOCK"] == 0 if "BLOCK" in a else None})')
    tune = ('@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) '
            'for b in (32, 96) for w in (2, 4) for s in (1, 2, 3)], key=["n"])')
    decos = "\n".join([heur, tune] if order == "heur_outer" else [tune, heur])
    src = f'''
import triton
import triton.language as tl

{decos}
@triton.jit
def kern(x, y, n, BLOCK: tl.constexpr, EVEN: tl.constexpr, HAS_Y: tl.constexpr):
    pid = tl.program_id(0)
    for i in range(tl.cdiv(n, BLOCK)):
        pass


def call(x, y, n):
    kern[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
'''
    path = tmp_path / f"anchor_mod_{order}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"anchor_mod_{order}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("order", ["heur_outer", "tune_outer"])
def test_anchor_recorder_resolves_autotune_configs_and_heuristics(tmp_path, order):
    import torch
    anchors = _load("anchors_sm90")
    mod = _anchor_kernel_module(tmp_path, order)
    log = []
    mod.kern = anchors.AnchorRecorder("kern", mod.kern, mod.__name__, log)
    mod.call(torch.zeros(4), None, 384)
    (entry,) = log
    assert entry["configs"] == 12 and entry["module"] == mod.__name__
    # thinned: one config per (BLOCK, num_warps) with num_stages closest to 2 (4 groups),
    # then an even spread of MAX_CONFIGS = 3 over them: groups 0, 2 (round(1.5)), 3
    assert anchors.MAX_CONFIGS == 3
    got = [(ln.values()["BLOCK"], ln.num_warps, ln.num_stages, ln.grid)
           for ln in entry["candidates"]]
    assert got == [(32, 2, 2, (12,)), (96, 2, 2, (4,)), (96, 4, 2, (4,))]
    for ln in entry["candidates"]:
        v = ln.values()
        assert v["HAS_Y"] is False and v["n"] == 384
        # an outer heuristic sees only the call's arguments; an inner one also the config's
        assert v["EVEN"] is (None if order == "heur_outer" else (384 % v["BLOCK"] == 0))
        loops = sm90.parse_loops(ln.source, "kern", v, ln.grid, ln.constexprs())
        assert loops[0].trips == -(-384 // v["BLOCK"])


def test_compile_all_returns_cached_results_without_compiling(tmp_path):
    cache = tmp_path / "c.json"
    jobs = [{"key": "a", "kernel": "k"}, {"key": "b", "kernel": "k"}, {"key": "a", "kernel": "k"}]
    cache.write_text('{"a": {"regs": 1}, "b": {"regs": 2}, "c": {"regs": 3}}')
    # every key cached: no child is started (it would fail on these jobs)
    assert sm90.compile_all(jobs, cache=str(cache)) == {"a": {"regs": 1}, "b": {"regs": 2}}


# --- compiler-output parsers and the model -----------------------------------------------

TTGIR = '''
#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4]}>
  tt.func public @k(%arg0: !tt.ptr<bf16>) attributes {noinline = false} {
    %0 = arith.mulf %a, %b : tensor<64x128xf32, #blocked>
    %1 = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<64x64xf32, #mma>) : i32 {
      %2 = ttng.warp_group_dot %x, %y, %acc {inputPrecision = 0 : i32} : !ttg.memdesc<64x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma>
      %3 = math.exp %2 : tensor<64x64xf32, #mma>
      %4 = "tt.reduce"(%3) <{axis = 0 : i32}> ({
      ^bb0(%p: f32, %q: f32):
        %5 = arith.addf %p, %q : f32
        tt.reduce.return %5 : f32
      }) : (tensor<64x64xf32, #mma>) -> tensor<64xf32>
      scf.for %j = %c0 to %m step %c1 : i32 {
        %6 = tt.dot %u, %w, %v, inputPrecision = ieee : tensor<32x16xf32, #dot0> * tensor<16x8xf32, #dot1> -> tensor<32x8xf32, #blocked>
      }
      scf.yield %2 : tensor<64x64xf32, #mma>
    } {tt.num_stages = 3 : i32}
    %7 = math.fma %a, %b, %c : tensor<4xf32, #blocked>
    tt.return
  }
'''


def test_ttgir_parser_finds_dots_elementwise_flops_and_loop_depth():
    dots, ew = sm90.ttgir_ops(TTGIR)
    assert dots == [["ttng.warp_group_dot", 64, 64, 128, "bf16", "", 1],
                    ["tt.dot", 32, 8, 16, "f32", "", 2]]
    assert ew == [[64 * 128, 0], [64 * 64, 1], [1, 1], [2 * 4, 0]]


SASS = '''
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
.L_x_1:
        /*0020*/                   IADD3 R5, R5, 0x1, RZ ;
        /*0030*/                   ISETP.GE.AND P0, PT, R5, R6, PT ;
        /*0040*/               @!P0 BRA `(.L_x_1) ;
        /*0050*/                   FADD R2, R2, R7 ;
        /*0060*/               @!P1 BRA `(.L_x_0) ;
        /*0070*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
'''


def test_sass_parser_finds_nested_loops():
    n, spans = sm90.sass_loops(SASS)
    # 0x10..0x60 outer (instructions 1..6), 0x20..0x40 inner (2..4); 0x70 branches forward;
    # 0x90 branches to itself (the trap after EXIT): not a loop
    assert (n, spans) == (10, [[1, 6], [2, 4]])


def test_instructions_per_program_from_sass_loops_and_source_trips():
    loops = sm90.parse_loops(KERNEL, "k", {"T": 100, "N": 64, "BT": 16, "USE": True}, (3,),
                             {"N", "BT", "USE"})
    # for c: runtime (T); for j: constant (N // 16); tl.range: runtime; for r: program id
    assert [lp.constant for lp in sm90._preorder(loops)] == [False, True, False, False]
    # 4 SASS loops: one to one in pre-order: c (7) { j (4) }, s (4), r (3)
    spans = [[10, 29], [12, 15], [40, 44], [50, 51]]
    n, how = sm90.sass_instructions(60, spans, loops)
    assert how == "matched"
    outside = 60 - 20 - 5 - 2
    assert n == outside + 7 * (16 + 4 * 4) + 4 * 5 + 3 * 2
    # the compiler unrolled j: 3 SASS loops match the 3 runtime source loops
    n, how = sm90.sass_instructions(60, [[10, 29], [40, 44], [50, 51]], loops)
    assert how == "matched" and n == (60 - 27) + 7 * 20 + 4 * 5 + 3 * 2
    # counts disagree: each runtime iteration (7 + 4 + 3) costs the smallest innermost loop
    n, how = sm90.sass_instructions(60, [[10, 29]], loops)
    assert how == "approx" and n == 40 + 14 * 20
    n, how = sm90.sass_instructions(60, [[10, 29], [30, 33]], loops)
    assert how == "approx" and n == 36 + 14 * 4


def test_occupancy_and_wave_quantisation_closed_forms():
    assert sm90.occupancy(32, 0, 4) == 16       # 64 warps / 4
    assert sm90.occupancy(255, 0, 4) == 2       # 256 regs x 32 x 4 = 32768 per program
    assert sm90.occupancy(40, 100_000, 4) == 2  # 233472 // 100000
    assert sm90.occupancy(255, 0, 16) == 0      # does not fit
    ln = sm90.Launch("k", (133,), [sm90.Arg("x", "tensor", False, dtype="bfloat16",
                                            shape=(1,), nbytes=3_350_000)], 8)
    c = {"regs": 255, "smem": 0, "dots": [], "ew": [], "sass": 0, "spans": []}
    m = sm90.model(ln, c, 0, [1])
    assert m["occ"] == 1 and m["waves"] == 2
    assert m["wq"] == pytest.approx(2 / (133 / 132))
    assert m["time"] == pytest.approx(1e-6 * 2 / (133 / 132))  # 3.35 MB at 3.35 TB/s
    c2 = {**c, "sass": 100, "spans": [[50, 59]]}
    loop = sm90.Loop(1, 1_000_000, "for")
    m2 = sm90.model(ln, c2, 1_000_000, [1], [loop])
    # resident warps per SM: min(occupancy 1, ceil(133/132) = 2) x 8 warps = 8 -> issue x 8/4
    assert m2["time"] == pytest.approx(2 * (90 + 1_000_000 * 10) * (8 / 4) / 1.98e9)
    assert m2["bound"] == "issue/latency"


# --- the GPU benchmark without a GPU -----------------------------------------------------

def _no_cuda() -> bool:
    import torch
    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="a CUDA device is present")
def test_bench_gpu_without_cuda_says_nothing_timed():
    p = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--names", "gla"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "no CUDA device: nothing timed"
    h = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--help"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    text = " ".join(h.stdout.split())
    assert h.returncode == 0 and "--shapes" in text and "no CUDA device" in text


def test_bench_gpu_cases_cover_the_sm90_report_anchor_pairs():
    """Every recurrence with a compiled anchor in the sm_90 report (and mamba, whose
    selective_scan is CUDA C++) is timed at the report's shapes and labels."""
    gpu = _load("bench_gpu")
    anchors = _load("anchors_sm90")
    names = {n for n, _, _ in gpu.CASES}
    assert set(anchors.ANCHORS) | {"mamba"} == names
    assert gpu.SHAPES == {k: (v["batch"], v["time"]) for k, v in sm90.SHAPES.items()}
    report = {(n, lab.split(" (")[0]) for n, lab, _ in sm90.CASES}
    assert {(n, lab) for n, lab, _ in gpu.CASES} <= report


def _fla_as_chunk_functions():
    """fla's chunk functions by name, each computed by fla's naive (PyTorch) recurrence with
    the chunk function's documented signature and defaults (scale K^-1/2 unless given; chunk_rwkv7
    scale 1.0; time-major [B, T, H, ...] layouts)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.ops.delta_rule.naive import delta_rule_recurrence
        from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.kda.naive import naive_recurrent_kda
        from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
        from fla.ops.retention.naive import naive_retention
        from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    def t(x):
        return x.transpose(1, 2)

    def rwkv7(r, w, k, v, a, b, scale=1.0):  # dplr_recurrence scales q by K^-1/2 itself
        r = r * (scale * r.shape[-1] ** 0.5)
        return t(dplr_recurrence(t(r), t(k), t(v), t(a), t(b), t(w))[0])
    return {
        "chunk_simple_gla": lambda q, k, v, g: naive_recurrent_simple_gla(q, k, v, g)[0],
        "chunk_gla": lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)[0],
        "chunk_retention": lambda q, k, v: t(naive_retention(t(q), t(k), t(v))),
        "chunk_linear_attn": lambda q, k, v, normalize: naive_recurrent_linear_attn(
            q, k, v, normalize=normalize)[0],
        "chunk_delta_rule": lambda q, k, v, beta: t(
            delta_rule_recurrence(t(q), t(k), t(v), t(beta))[0]),
        "chunk_gated_delta_rule": lambda q, k, v, g, beta: naive_recurrent_gated_delta_rule(
            q, k, v, beta, g)[0],
        "chunk_rwkv6": lambda r, k, v, w, u, scale=None: t(naive_recurrent_rwkv6(
            t(r), t(k), t(v), t(w), u, scale=scale)[0]),
        "chunk_rwkv7": rwkv7,
        "chunk_kda": lambda q, k, v, g, beta, scale=None: naive_recurrent_kda(
            q, k, v, g, beta, scale=scale)[0],
    }


def test_bench_gpu_pairs_compute_the_same_function_as_fla_references():
    """The inputs bench_gpu gives scancc and the exact call it makes of each fla anchor
    (function, arguments, keywords) describe the same recurrence: scancc's reference backend
    vs fla's own naive (PyTorch) recurrences standing in for the chunk functions, on CPU at a
    small shape, float32 (independent implementations)."""
    pytest.importorskip("fla")
    import scancc
    import torch
    gpu = _load("bench_gpu")
    fla_fns = _fla_as_chunk_functions()
    fla_names = [n for n, _, _ in gpu.CASES if n not in ("mamba", "mamba2")]
    assert set(fla_names) == set(gpu.ATTN) | set(gpu.MODERN)
    for name in dict.fromkeys(fla_names):
        args, anchor = gpu._inputs(name, 2, 20, {"heads": 2, "key": 8, "value": 16},
                                   torch.device("cpu"), torch.float32)
        assert anchor.module == "fla.ops"
        y = torch.as_tensor(scancc.compile(name)(*[x.numpy() for x in args]))
        ref = fla_fns[anchor.fn](*anchor.args, **anchor.kwargs).float()
        assert y.shape == ref.shape and torch.isfinite(ref).all(), name
        assert gpu.rel_rms(y, ref) < 1e-5, (name, gpu.rel_rms(y, ref))
    # the check can fail: chunk_rwkv7 at its own default scale (1.0) is another function
    args, anchor = gpu._inputs("rwkv7", 2, 20, {"heads": 2, "key": 8, "value": 16},
                               torch.device("cpu"), torch.float32)
    y = torch.as_tensor(scancc.compile("rwkv7")(*[x.numpy() for x in args]))
    assert gpu.rel_rms(y, fla_fns["chunk_rwkv7"](*anchor.args)) > 0.1


def test_bench_gpu_leaves_are_the_distinct_floating_inputs():
    import torch
    gpu = _load("bench_gpu")
    args, anchor = gpu._inputs("hgrn2", 1, 4, {"heads": 1, "key": 4, "value": 4},
                               torch.device("cpu"), torch.float32)
    leaves = gpu._leaves(args, anchor.args)
    # q, v, g shared; the anchor's k = 1 - exp(g) its own leaf
    assert len(leaves) == 4 and all(t.requires_grad and t.is_leaf for t in leaves)


def test_time_walking_kernels_are_those_whose_programs_do_not_grow_with_time():
    from scancc import registry
    rec = registry.get("hgrn").build()
    sizes = {"batch": 2, "time": 64, "chan": 40}
    launches, _, _ = sm90.record(rec, sizes, "float32", {"algorithm": "recurrent"})
    # the recurrent kernel: one program per (batch, channel block) whatever T
    assert sm90.time_walking(rec, sizes, "float32", {"algorithm": "recurrent"},
                             launches) == [True]
    # a launch list that differs from the 2T recording falls back to the iteration rule:
    # a fake launch with no loop is parallel in time
    fake = sm90.Launch("k", (4,), [], 4, source="def k(x):\n    pass\n")
    assert sm90.time_walking(rec, sizes, "float32", {"algorithm": "recurrent"},
                             launches + [fake]) == [True, False]
