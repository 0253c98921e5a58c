"""Packed variable-length batches: the per-step reset of a recurrence (the semantics).

A packed call has batch 1 and N sequences concatenated along time; ``cu`` (``[N+1]``, starts at
0, ends at T, non-decreasing, as flash-linear-attention's ``cu_seqlens``) gives sequence n the
steps ``[cu[n], cu[n+1])``. Every state resets at each boundary:

    before the transition at a step t = cu[n] that starts sequence n, the previous state of
    every state is *replaced* (a select, not a multiply: a NaN or inf in sequence n-1 never
    reaches sequence n) by that sequence's initial state, zero or ``initial_state[n]``;
    readouts reading ``prev(h)`` at that step see the replaced state;
    the state after sequence n's last step is its final state ``final[n]`` (an empty
    sequence's final state is its initial state).

Per-sequence initial and final states carry N in place of the batch dim (batch is 1). The
rule is generic over transition kinds: only the previous state is selected, the transition
itself is whatever the kind says. In reverse time (the adjoint) the boundaries are the same
ones read backwards (``reversed_cu``): the adjoint state entering a sequence's last step is
that sequence's d final state (zero if none), never the adjoint of the next sequence, and the
adjoint leaving its first step is the gradient of its initial state.

This module holds the plain-integer helpers every backend shares.
"""
from __future__ import annotations

from typing import Sequence


def as_cu(cu) -> tuple[int, ...]:
    """``cu`` (any integer sequence, a NumPy array or a torch tensor) as a tuple of ints."""
    if hasattr(cu, "tolist"):
        cu = cu.tolist()
    return tuple(int(c) for c in cu)


def segments(cu: Sequence[int]) -> list[tuple[int, int, int]]:
    """(n, start, end) for each sequence n, empty ones included."""
    cu = as_cu(cu)
    return [(n, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def starts(cu: Sequence[int]) -> dict[int, int]:
    """step -> the sequence that starts there (the non-empty sequences)."""
    cu = as_cu(cu)
    return {cu[n]: n for n in range(len(cu) - 1) if cu[n + 1] > cu[n]}


def ends(cu: Sequence[int]) -> dict[int, int]:
    """step -> the sequence whose last step it is (the non-empty sequences)."""
    cu = as_cu(cu)
    return {cu[n + 1] - 1: n for n in range(len(cu) - 1) if cu[n + 1] > cu[n]}


def reversed_cu(cu: Sequence[int]) -> tuple[int, ...]:
    """The boundaries of the time-reversed packing: sequence n of the reversed packing is
    sequence N-1-n reversed."""
    cu = as_cu(cu)
    T = cu[-1]
    return tuple(T - c for c in reversed(cu))


def reset_flags(cu: Sequence[int], T: int) -> list[bool]:
    """reset_t for t in [0, T): True where a non-empty sequence starts (step 0 included)."""
    s = starts(cu)
    return [t in s for t in range(T)]


__all__ = ["as_cu", "segments", "starts", "ends", "reversed_cu", "reset_flags"]
