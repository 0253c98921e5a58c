"""The emulator's ``nisa.tensor_copy_predicated`` and ``nl.uint8`` (added for the chunked
kernels' edge handling): the instruction against NumPy and each rule raising (the rules of
NKI's ``nki.isa.tensor_copy_predicated``: an integer predicate of dst's layout; src a tile of
dst's dtype or a number; src and predicate not both in PSUM)."""
import numpy as np
import pytest

from scancc.backends.nki import emulator as E
from scancc.backends.nki.emulator import NkiError

nl, nisa = E.language, E.isa
RNG = np.random.default_rng(1)


def run(fn, *arrays):
    k = E.Kernel(fn, "trn1")
    return k(*arrays), k.counters


def sb(shape, dtype=None):
    return nl.ndarray(shape, dtype=dtype or nl.float32, buffer=nl.sbuf)


def load(x):
    t = sb(x.shape)
    nisa.dma_copy(t, x)
    return t


def _data():
    a = RNG.standard_normal((6, 10)).astype(np.float32)
    a[1, 3], a[4, 0], a[5, 9] = np.nan, np.inf, -np.inf
    return a


@pytest.mark.parametrize("reverse", [False, True])
def test_sanitize_with_a_scalar_src(reverse):
    """The kernels' idiom: a uint8 predicate from x * 0 != 0, then 0.0 where it holds."""
    a = _data()

    def k(x):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        t = load(x)
        pred = sb((6, 10), nl.uint8)
        nisa.tensor_scalar(pred, t, nl.multiply, 0.0, op1=nl.not_equal, operand1=0.0)
        nisa.tensor_copy_predicated(t, 0.0, pred, reverse_pred=reverse)
        nisa.dma_copy(out, t)
        return out
    o, c = run(k, a)
    bad = ~np.isfinite(a)
    np.testing.assert_array_equal(o, np.where(bad != reverse, np.float32(0.0), a))
    assert c["instructions"]["vector"] == 2
    assert c["peak_sbuf_bytes_per_partition"] == 10 * 4 + 10 * 1   # uint8: one byte


def test_tile_src_and_nan_value():
    a, b = _data(), RNG.standard_normal((6, 10)).astype(np.float32)
    p = (RNG.random((6, 10)) < 0.4).astype(np.float32)

    def k(x, y, m):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        out2 = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        t, pred = load(x), sb((6, 10), nl.uint8)
        nisa.tensor_copy(pred, load(m))
        nisa.tensor_copy_predicated(t, load(y), pred)
        nisa.dma_copy(out, t)
        nisa.tensor_copy_predicated(t, float("nan"), pred)
        nisa.dma_copy(out2, t)
        return out, out2
    (o, o2), _ = run(k, a, b, p)
    np.testing.assert_array_equal(o, np.where(p != 0, b, a))
    assert np.isnan(o2[p != 0]).all()
    np.testing.assert_array_equal(o2[p == 0], a[p == 0])


def _expect(body, match):
    def k(x):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        body(load(x))
        return out
    with pytest.raises(NkiError, match=match):
        run(k, np.zeros((4, 4), np.float32))


def test_rules_raise():
    _expect(lambda t: nisa.tensor_copy_predicated(t, 0.0, sb((4, 4))), "integer dtype")
    _expect(lambda t: nisa.tensor_copy_predicated(t, 0.0, sb((4, 3), nl.uint8)),
            "same partitions")
    _expect(lambda t: nisa.tensor_copy_predicated(t, sb((4, 4), nl.bfloat16),
                                                  sb((4, 4), nl.uint8)), "same dtype")
    _expect(lambda t: nisa.tensor_copy_predicated(t, "0", sb((4, 4), nl.uint8)),
            "tile or a number")

    def both_psum(t):
        pred = nl.ndarray((4, 4), dtype=nl.uint8, buffer=nl.psum)
        src = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum)
        nisa.tensor_copy_predicated(t, src, pred)
    _expect(both_psum, "both in PSUM")
    _expect(lambda t: nisa.nc_matmul(nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.psum),
                                     sb((4, 4), nl.uint8), sb((4, 4), nl.uint8)),
            "integer operands")


def test_uint8_is_not_a_kernel_input_dtype():
    """Predicates live on chip; kernel inputs stay float (float32, bfloat16, float16)."""
    assert "uint8" not in E.DTYPES and nl.uint8.itemsize == 1
