"""The NKI layout search and the selection rule (issue 13): the selection rule steps on
(rows, m) tiles, so the states its keys/filled read must hold the memory axis alone per
partition. bmojo's *states view* (the forward with every state sequence as an output, which
its backward recomputes) has h_valid [time, batch, window] without heads: the layouts with
the partition dim in every output put batch on the partitions, where mem_key would hold
heads x memory per partition. ``plan.layout_problem`` (from the IR, per transition kind)
leaves such layouts out, so heads goes on the partitions and h_valid is stored as a row.

Truth: the reference backend's states view (float64), and a plain check of which layout."""
import warnings

import numpy as np
import pytest

import scancc
import scancc.autograd as ag
from scancc.autograd import adjoint
from scancc.backends.nki import plan
from scancc.ir.passes import canonicalize
from scancc.library import bmojo
from scancc.registry import get

NAMES = ("q", "k", "v", "kf", "vf", "y")


def _inputs(B=2, T=7, H=2, K=3, V=2, seed=0):
    g = np.random.default_rng(seed)
    return {n: g.standard_normal((B, T, H, K if n in ("q", "k", "kf") else V)) for n in NAMES}


def test_layout_search_keeps_the_memory_axis_alone_on_the_selection_states():
    sv = canonicalize(adjoint(bmojo(window=2, memory=3, predictor=2)).states_view)
    sizes = {"batch": 2, "time": 7, "heads": 2, "key": 3, "value": 2, "window": 3,
             "fading": 4, "memory": 3, "ypast": 5}
    # batch is the only dim in every output: it was the preferred partition dim
    assert [d for d in sv.canonical if all(d in o.dims for o in sv.outputs)] == ["batch"]
    why = plan.layout_problem(sv, "batch", ())
    assert why is not None and "mem_key" in why and "heads" in why
    found = plan.layouts(sv, sizes)
    assert found[0] == ("heads", ("batch",))
    assert all(plan.layout_problem(sv, pd, outer) is None for pd, outer in found)
    # the forward's layout is unchanged (heads was already its first)
    fwd = canonicalize(bmojo(window=2, memory=3, predictor=2))
    assert plan.layouts(fwd, sizes)[0] == ("heads", ("batch",))


def test_a_layout_no_rule_admits_is_kept_so_the_rule_names_the_problem(monkeypatch):
    """layout_problem never hides the only layouts there are: where every layout is refused,
    the unfiltered order comes back and the rule itself names the problem when it lowers."""
    sv = canonicalize(adjoint(bmojo(window=2, memory=3, predictor=2)).states_view)
    sizes = {"batch": 2, "time": 7, "heads": 2, "key": 3, "value": 2, "window": 3,
             "fading": 4, "memory": 3, "ypast": 5}
    monkeypatch.setattr(plan, "layout_problem", lambda rec, pd, outer: "refused")
    assert plan.layouts(sv, sizes)[0] == ("batch", ())


@pytest.mark.parametrize("B,H", [(2, 2), (1, 3)])
def test_bmojo_states_view_runs_on_nki_like_the_reference(B, H):
    """Every state sequence (h_valid and h_valid_f, without heads, included) and o equal the
    reference's; nothing is left NaN (the emulator fills new buffers with NaN)."""
    sv = adjoint(bmojo(window=2, memory=2, predictor=2)).states_view
    x = _inputs(B=B, T=9, H=H)
    want = scancc.compile(sv, "reference")(*(x[n] for n in NAMES))
    got = scancc.compile(sv, "nki", time_tile=4)(*(np.float32(x[n]) for n in NAMES))
    be = scancc.backends.get("nki")
    assert be.last_plan.pd == "heads" and be.last_plan.outer == ("batch",)
    names = [o.name for o in sv.outputs]
    got = got if isinstance(got, dict) else dict(zip(names, got))
    want = want if isinstance(want, dict) else dict(zip(names, want))
    assert sorted(got) == sorted(want) == sorted(names)
    for o in names:
        g, w = np.asarray(got[o], np.float64), want[o]
        assert g.shape == w.shape and not np.isnan(g).any(), o
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=o)
    # the memory filled: the check is not on an empty memory
    mk = np.asarray(got["h_mem_key"])
    assert (mk[-1] > 0).all()


class _Refuses:
    """A backend that lowers the forward but not its backward recurrence."""
    name = "refuses"

    def supports(self, rec, options):
        return (not rec.name.endswith("_bwd"), "no rule for shift_adjoint (test)")


class _Kernel:
    backend = _Refuses()
    options = {}


def test_a_backward_fallback_to_the_reference_is_reported():
    """Where a backend does not lower a piece of the backward, backward_target still picks
    the reference, but says so (never silently): the warning names the piece and why."""
    rec = get("bmojo_f").build(window=2)
    with pytest.warns(ag.BackwardFallbackWarning, match=r"bmojo_f_bwd.*shift_adjoint"):
        assert ag.backward_target(_Kernel(), rec) == "reference"


def test_nki_picks_itself_for_bmojo_f_without_a_warning():
    rec = get("bmojo_f").build(window=2)
    ker = scancc.compile(rec, "nki")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ag.BackwardFallbackWarning)
        assert ag.backward_target(ker, rec) == "nki"
