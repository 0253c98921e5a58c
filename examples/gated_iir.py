"""A recurrence that is in no other library: an IIR layer whose feedback is gated by the input.

    w_t = x_t - sigmoid(g_t) * sum_{k=1..n} a_k w_{t-k}      (companion form, input-dependent)
    y_t = sum_{k=0..n} b_k w_{t-k}

With the gate at 1 this is scipy.signal.lfilter(b, a, x); the gate lets the layer decide, per
token and channel, how much of its filtered past to feed back. Import this module to register
it; then it is listed, shown, compiled and checked like a built-in:

    python -c "import examples.gated_iir, scancc; print(scancc.compile('gated_iir').ir)"
"""
import scancc
from scancc.ir import companion, dot, flip, sigmoid


@scancc.register("gated_iir", hints={"a": "stable_poly", "b": "small"}, override=True)
def gated_iir(r):
    """Gated IIR: w_t = x_t - sigmoid(g_t) sum_k a_k w_{t-k}; y_t = sum_k b_k w_{t-k}."""
    batch, time = r.dim("batch", "batch"), r.dim("time", "time")
    chan, order = r.dim("chan"), r.dim("order")          # order = n + 1 coefficients
    x, g = r.input("x", [batch, time, chan]), r.input("g", [batch, time, chan])
    b, a = r.input("b", [chan, order]), r.input("a", [chan, order])
    # companion: shift the window, then the newest slot = sum(feedback * window) + x
    w = r.state("w", [batch, chan, order], companion(order, -flip(a, order) * sigmoid(g)),
                inject=x)
    r.output("y", [batch, time, chan], dot(flip(b, order), w, order))
