"""The reference evaluates injected terms and transition operands a block of steps at a time
(issue 10, item 11): the result does not depend on the block (no op works along time), and its
memory holds one block of a state-shaped inject, not all T steps of it."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from scancc import registry
from scancc.backends.reference.interpreter import Interpreter
from scancc.ir import default_sizes
from scancc.sampling import sample_inputs, sample_state

LIBRARY = [n for n in registry.names() if registry.get(n).origin == "library"]


def _run(rec, x, h0, sizes, block_elems):
    it = Interpreter(rec, sizes)
    it.BLOCK_ELEMS = block_elems
    return it.run(x, h0)


@pytest.mark.parametrize("name", LIBRARY)
def test_blocks_do_not_change_the_result(name):
    e = registry.get(name)
    rec = e.build(**{o: True for o in e.optional_inputs})
    sizes = default_sizes(rec, time=37)
    x, h0 = sample_inputs(rec, sizes, 0, e.hints), sample_state(rec, sizes, 1)
    whole_y, whole_h = _run(rec, x, h0, sizes, 1 << 40)          # one block of all T steps
    biggest = max(int(np.prod([sizes[d] for d in s.dims])) for s in rec.states)
    for steps in (1, 5):                                         # blocks of 1 and 5 steps
        it = Interpreter(rec, sizes)
        it.BLOCK_ELEMS = steps * biggest
        assert it.time_block(37) == steps
        y, h = _run(rec, x, h0, sizes, steps * biggest)
        for k in whole_y:
            np.testing.assert_array_equal(y[k], whole_y[k])
        for k in whole_h:
            np.testing.assert_array_equal(h[k], whole_h[k])


def test_memory_holds_one_block_of_the_inject():
    """simple_gla with a 64 x 64 state per head and T=2048: all steps of the inject k v^T are
    2048 * 2 * 64 * 64 * 8 B = 128 MiB; a block of 16 steps is 1 MiB."""
    rec = registry.get("simple_gla").build()
    sizes = default_sizes(rec, batch=1, time=2048, heads=2, key=64, value=64)
    x = sample_inputs(rec, sizes, 0, registry.get("simple_gla").hints)
    all_steps = 2048 * 2 * 64 * 64 * 8
    it = Interpreter(rec, sizes)
    it.BLOCK_ELEMS = 16 * 2 * 64 * 64
    tracemalloc.start()
    try:
        y, _ = it.run(x, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(y["o"]).all()
    assert peak < all_steps / 8, f"peak {peak / 2**20:.1f} MiB"
