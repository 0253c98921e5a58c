"""The NKI emulator: each instruction against hand-computed NumPy, and each hardware rule
raising a clear NkiError when a kernel breaks it."""
import sys

import numpy as np
import pytest

from scancc.backends.nki import emulator as E
from scancc.backends.nki.emulator import NkiError

nl, nisa = E.language, E.isa
RNG = np.random.default_rng(0)


def run(fn, *arrays, dtypes=None, chip="trn1"):
    k = E.Kernel(fn, chip)
    out = k(*arrays, dtypes=dtypes)
    return out, k.counters


def sb(shape, dtype=None):
    return nl.ndarray(shape, dtype=dtype or nl.float32, buffer=nl.sbuf)


def load(x):
    t = sb(x.shape)
    nisa.dma_copy(t, x)
    return t


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ---- instructions ----

@pytest.mark.parametrize("op,ref", [("add", np.add), ("subtract", np.subtract),
                                    ("multiply", np.multiply), ("divide", np.divide),
                                    ("maximum", np.maximum), ("minimum", np.minimum)])
def test_tensor_tensor(op, ref):
    a, b = rand(5, 7), rand(5, 7) + 3.0

    def k(x, y):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        r = sb((5, 7))
        nisa.tensor_tensor(r, load(x), load(y), getattr(nl, op))
        nisa.dma_copy(out, r)
        return out
    o, c = run(k, a, b)
    np.testing.assert_allclose(o, ref(a, b), rtol=1e-6)
    assert c["instructions"]["vector"] == 1 and c["cycles"]["vector"] == 64


def test_tensor_scalar_vector_operand_reverse_and_op1():
    a, s = rand(4, 9), rand(4, 1)

    def k(x, v):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        r = sb((4, 9))
        nisa.tensor_scalar(r, load(x), nl.subtract, load(v), reverse0=True, op1=nl.multiply,
                           operand1=2.0)
        nisa.dma_copy(out, r)
        return out
    o, _ = run(k, a, s)
    np.testing.assert_allclose(o, (s - a) * 2.0, rtol=1e-6)


def test_activation_scale_vector_and_bias():
    a, s, b = rand(3, 6), rand(3, 1), rand(3, 1)

    def k(x, sc, bi):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        r = sb((3, 6))
        nisa.activation(r, nl.exp, load(x), bias=load(bi), scale=load(sc))
        nisa.dma_copy(out, r)
        return out
    o, c = run(k, a, s, b)
    np.testing.assert_allclose(o, np.exp(a * s + b), rtol=1e-5)
    assert c["instructions"]["scalar"] == 1


@pytest.mark.parametrize("fn,ref", [("softplus", lambda x: np.log1p(np.exp(x))),
                                    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
                                    ("silu", lambda x: x / (1 + np.exp(-x))),
                                    ("rsqrt", lambda x: 1 / np.sqrt(np.abs(x) + 1))])
def test_activation_functions(fn, ref):
    a = rand(2, 5)
    a = np.abs(a) + 1 if fn == "rsqrt" else a

    def k(x):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        r = sb((2, 5))
        nisa.activation(r, getattr(nl, fn), load(x))
        nisa.dma_copy(out, r)
        return out
    o, _ = run(k, a)
    np.testing.assert_allclose(o, ref(a - 1 if fn == "rsqrt" else a) if fn != "rsqrt"
                               else 1 / np.sqrt(a), rtol=1e-5)


def test_tensor_reduce_last_axes():
    a = rand(4, 3, 5)

    def k(x):
        o1 = nl.ndarray((4, 3), dtype=nl.float32, buffer=nl.shared_hbm)
        o2 = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        t = load(x)
        r1, r2 = sb((4, 3)), sb((4, 1))
        nisa.tensor_reduce(r1, nl.add, t, axis=2)
        nisa.tensor_reduce(r2, nl.maximum, t, axis=(1, 2), keepdims=True)
        nisa.dma_copy(o1, r1)
        nisa.dma_copy(o2, r2)
        return o1, o2
    (s, m), _ = run(k, a)
    np.testing.assert_allclose(s, a.sum(2), rtol=1e-5)
    np.testing.assert_allclose(m[:, 0], a.max((1, 2)))


@pytest.mark.parametrize("vector_initial", [False, True])
def test_tensor_tensor_scan(vector_initial):
    a, b, h0 = rand(6, 11), rand(6, 11), rand(6, 1)

    def k(x, y, z):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        r = sb((6, 11))
        nisa.tensor_tensor_scan(r, load(x), load(y), load(z) if vector_initial else 0.5,
                                nl.multiply, nl.add)
        nisa.dma_copy(out, r)
        return out
    o, c = run(k, a, b, h0)
    h = h0[:, 0].astype(np.float64) if vector_initial else np.full(6, 0.5)
    ref = []
    for i in range(11):
        h = a[:, i] * h + b[:, i]
        ref.append(h)
    np.testing.assert_allclose(o, np.stack(ref, 1), rtol=1e-5, atol=1e-6)
    assert c["instructions"]["vector"] == 1


def test_matmul_transpose_copy_and_accumulate():
    s, m = rand(8, 4), rand(8, 10)

    def k(x, y):
        o1 = nl.ndarray((4, 10), dtype=nl.float32, buffer=nl.shared_hbm)
        o2 = nl.ndarray((10, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        tx, ty = load(x), load(y)
        ps = nl.ndarray((4, 10), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(ps, tx, ty)
        nisa.nc_matmul(ps, tx, ty)  # accumulate=None: the second write accumulates
        r = sb((4, 10))
        nisa.tensor_copy(r, ps)
        nisa.dma_copy(o1, r)
        pt = nl.ndarray((10, 8), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_transpose(pt, ty)
        r2 = sb((10, 8))
        nisa.tensor_copy(r2, pt)
        nisa.dma_copy(o2, r2)
        return o1, o2
    (mm, tr), c = run(k, s, m)
    np.testing.assert_allclose(mm, 2 * s.T @ m, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tr, m.T)
    assert c["instructions"]["tensor"] == 3
    # fp32 matmul: max(min(64, 4), 10) * 4 cycles each
    assert c["cycles"]["tensor"] == 2 * 40 + max(min(64, 10), 8) * 4


def test_memset_iota_and_nan_fill():
    def k():
        o = nl.ndarray((3, 4), dtype=nl.float32, buffer=nl.shared_hbm)
        o2 = nl.ndarray((3, 4), dtype=nl.float32, buffer=nl.shared_hbm)
        r = sb((3, 4))
        nisa.iota(r, [[2, 4]], offset=1, channel_multiplier=10)
        nisa.dma_copy(o, r)
        r2 = sb((3, 4))
        nisa.memset(r2[0:3, 0:2], 7.0)  # the other half is never written: NaN
        nisa.dma_copy(o2, r2)
        return o, o2
    (o, o2), c = run(k)
    np.testing.assert_array_equal(o, 1 + 10 * np.arange(3)[:, None] + 2 * np.arange(4))
    assert np.all(o2[:, :2] == 7.0) and np.all(np.isnan(o2[:, 2:]))
    assert c["instructions"]["gpsimd"] == 1


def test_bfloat16_rounding_on_write_and_dma_bytes():
    x = np.array([[1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9, 3.14159265, -2.0e-3]], np.float32)

    def k(a):
        out = nl.ndarray((1, 4), dtype=nl.bfloat16, buffer=nl.shared_hbm)
        t = sb((1, 4))
        nisa.dma_copy(t, a)
        nisa.dma_copy(out, t)
        return out
    o, c = run(k, x)
    bits = x.view(np.uint32)
    rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(o, rne)
    assert o[0, 0] == 1.0 and o[0, 1] == 1.0 + 2 ** -7  # ties to even
    assert c["dma_bytes_in"] == 16 and c["dma_bytes_out"] == 8 and c["dma_transfers"] == 2


def test_bfloat16_inputs_and_counters():
    x = np.full((2, 3), 1.0 + 2 ** -10, np.float32)

    def k(a):
        out = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.shared_hbm)
        t = sb((2, 3))
        nisa.dma_copy(t, a)
        nisa.dma_copy(out, t)
        return out
    o, c = run(k, x, dtypes=["bfloat16"])
    assert np.all(o == 1.0) and c["dma_bytes_in"] == 12 and c["dma_bytes_out"] == 24


def test_source_loading_leaves_sys_modules_alone():
    src = ("import nki\nimport nki.language as nl\nimport nki.isa as nisa\n\n@nki.jit\n"
           "def k(a):\n    o = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)\n"
           "    t = nl.ndarray(a.shape, dtype=nl.float32, buffer=nl.sbuf)\n"
           "    nisa.dma_copy(t, a)\n    nisa.activation(t, nl.exp, t)\n"
           "    nisa.dma_copy(o, t)\n    return o\n")
    kern = E.load_kernel(src, "k")
    a = rand(2, 3)
    np.testing.assert_allclose(kern(a), np.exp(a), rtol=1e-6)
    assert "nki" not in sys.modules or not getattr(sys.modules["nki"], "emulated", False)


# ---- rules: each raises a clear error ----

def passes(fn):
    """Run ``fn`` inside a kernel that returns a (written) output, so only fn's rules apply."""
    def k():
        o = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        fn()
        t = sb((1, 1))
        nisa.memset(t, 1.0)
        nisa.dma_copy(o, t)
        return o
    assert run(k)[0][0, 0] == 1.0


def fails(fn, match, *arrays, chip="trn1"):
    with pytest.raises(NkiError, match=match):
        run(fn, *arrays, chip=chip)


def test_rule_partition_dim_at_most_128():
    fails(lambda: sb((129, 4)), "partition dim 129 > 128")


def test_rule_on_chip_tiles_are_2d():
    fails(lambda: sb((8,)), "at least 2-D")

    def k():
        t = sb((4, 3))
        nisa.memset(t[0:4, 1], 0.0)
    fails(k, "at least 2-D")


def test_rule_partition_index_and_contiguity():
    def k():
        sb((4, 3))[1, 0:3]
    fails(k, "integer index on the partition dim")

    def k2():
        sb((4, 3))[0:4:2, 0:3]
    fails(k2, "step 2")


def test_rule_partition_start_alignment():
    def k():
        t = sb((128, 4))
        nisa.memset(t[5:10, 0:4], 0.0)
    fails(k, "starts at partition 5")

    def ok():
        t = sb((128, 4))
        nisa.memset(t[32:64, 0:4], 0.0)
        nisa.memset(t[64:128, 0:4], 0.0)
    passes(ok)


def test_rule_compute_only_on_chip():
    def k(a):
        t = sb((2, 3))
        nisa.tensor_copy(t, a)
    fails(k, "compute instructions work on SBUF/PSUM", rand(2, 3))


def test_rule_dma_never_touches_psum_and_keeps_shape():
    def k(a):
        o = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.shared_hbm)
        p = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.psum)
        nisa.memset(p, 0.0)
        nisa.dma_copy(o, p)
    fails(k, "DMA cannot access PSUM", rand(2, 3))

    def k2(a):
        t = sb((3, 2))
        nisa.dma_copy(t, a)
    fails(k2, "does not reshape or transpose", rand(2, 3))

    def k3(a):
        t = sb((2, 3))
        nisa.memset(t, 0.0)
        nisa.dma_copy(a, t)
    fails(k3, "read-only", rand(2, 3))


def test_rule_outputs_are_top_level_shared_hbm():
    def helper():
        return nl.ndarray((2, 2), dtype=nl.float32, buffer=nl.shared_hbm)

    def k():
        return helper()
    fails(k, "top level")

    def k2():
        t = sb((2, 2))
        nisa.memset(t, 0.0)
        return t
    fails(k2, "nl.shared_hbm tensors")


def test_rule_matmul_limits_and_dst():
    def mm(k_, m_, n_, dst_buf="psum", dst_dtype="float32"):
        def k():
            s, m = sb((k_, m_)), sb((k_, n_))
            nisa.memset(s, 1.0), nisa.memset(m, 1.0)
            d = nl.ndarray((m_, min(n_, 512)), dtype=getattr(nl, dst_dtype),
                           buffer=getattr(nl, dst_buf))
            nisa.nc_matmul(d, s, m)
        return k
    passes(mm(128, 128, 512))
    fails(mm(128, 128, 513), "moving free <= 512")
    fails(mm(64, 129, 8), "partition dim 129|stationary free <= 128")
    fails(mm(4, 4, 4, dst_buf="sbuf"), "fp32 PSUM tile")
    fails(mm(4, 4, 4, dst_dtype="bfloat16"), "fp32 PSUM tile")

    def kdiff():
        s, m = sb((4, 4)), sb((5, 4))
        d = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(d, s, m)
    fails(kdiff, "contraction")


def test_rule_tensor_tensor_operands():
    def both_psum():
        a = nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.psum)
        b = nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.tensor_tensor(sb((2, 4)), a, b, nl.add)
    fails(both_psum, "both in PSUM")

    def parts():
        nisa.tensor_tensor(sb((2, 4)), sb((2, 4)), sb((3, 4)), nl.add)
    fails(parts, "same partitions and elements")

    def count():
        nisa.tensor_tensor(sb((2, 4)), sb((2, 4)), sb((2, 5)), nl.add)
    fails(count, "same partitions and elements")


def test_rule_tensor_scalar_and_activation_operands():
    def wide():
        nisa.tensor_scalar(sb((4, 3)), sb((4, 3)), nl.add, sb((4, 2)))
    fails(wide, r"fp32 \(4, 1\) tile")

    def bf16():
        nisa.tensor_scalar(sb((4, 3)), sb((4, 3)), nl.add, sb((4, 1), nl.bfloat16))
    fails(bf16, r"fp32 \(4, 1\) tile")

    def scale():
        nisa.activation(sb((4, 3)), nl.exp, sb((4, 3)), scale=sb((3, 1)))
    fails(scale, "scale must be")

    def bias():
        nisa.activation(sb((4, 3)), nl.exp, sb((4, 3)), bias=1.0)
    fails(bias, "bias must be")


def test_rule_reductions_over_free_axes_only():
    def part():
        nisa.tensor_reduce(sb((1, 3)), nl.add, sb((4, 3)), axis=0)
    fails(part, "free axes only")

    def middle():
        nisa.tensor_reduce(sb((4, 5)), nl.add, sb((4, 3, 5)), axis=1)
    fails(middle, "last contiguous")


def test_rule_scan_initial_and_psum():
    def init():
        nisa.tensor_tensor_scan(sb((4, 3)), sb((4, 3)), sb((4, 3)), sb((4, 2)), nl.multiply,
                                nl.add)
    fails(init, "initial must be")

    def psum():
        a = nl.ndarray((4, 3), dtype=nl.float32, buffer=nl.psum)
        b = nl.ndarray((4, 3), dtype=nl.float32, buffer=nl.psum)
        nisa.tensor_tensor_scan(sb((4, 3)), a, b, 0.0, nl.multiply, nl.add)
    fails(psum, "both in PSUM")


def test_rule_gpsimd_never_touches_psum():
    def k():
        p = nl.ndarray((4, 3), dtype=nl.float32, buffer=nl.psum)
        nisa.iota(p, [[1, 3]])
    fails(k, "cannot access")


def test_rule_unknown_kwargs_and_enums():
    def kw():
        nisa.memset(sb((2, 2)), 0.0, engine="vector")
    fails(kw, r"unknown keyword argument\(s\) \['engine'\]")

    def enum():
        nisa.tensor_tensor(sb((2, 2)), sb((2, 2)), sb((2, 2)), "add")
    fails(enum, "must be an nl operator")

    def unary():
        nisa.activation(sb((2, 2)), nl.add, sb((2, 2)))
    fails(unary, "not unary")

    def dtype():
        nl.ndarray((2, 2), dtype="float32", buffer=nl.sbuf)
    fails(dtype, "dtype must be an nl dtype")


def test_rule_sbuf_capacity_per_chip():
    def k():
        big = sb((128, 47_000))  # 188,000 B per partition: over trn1's 180,224, under trn2's
        nisa.memset(big[0:128, 0:4], 0.0)
        o = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(o, big[0:1, 0:1])
        return o
    fails(k, "SBUF overflow.*180224", chip="trn1")
    out, c = run(k, chip="trn2")
    assert out[0, 0] == 0.0 and c["peak_sbuf_bytes_per_partition"] == 188_000


def test_rule_sbuf_freed_when_tile_dies():
    def k():
        for _ in range(10):  # each iteration's tile is released when the name is rebound
            t = sb((128, 20_000))
            nisa.memset(t[0:1, 0:1], 0.0)
        o = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(o, t[0:1, 0:1])
        return o
    _, c = run(k)
    # the new tile is allocated before the old binding dies: two live at the rebinding
    assert c["peak_sbuf_bytes_per_partition"] == 2 * 80_000


def test_rule_psum_banks():
    def k():
        keep = [nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum) for _ in range(9)]
        return keep
    fails(k, "PSUM overflow")

    def k2():
        nl.ndarray((128, 513), dtype=nl.float32, buffer=nl.psum)
    fails(k2, "one PSUM bank")
