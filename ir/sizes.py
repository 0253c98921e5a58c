"""Default dim sizes: what a recurrence is rendered, checked and benchmarked at when the
caller gives no shapes (a fact of the IR's dims: looked up by dim name, then by role)."""
from __future__ import annotations

from .recurrence import Recurrence

# by dim name (the names the standard library uses), then by role; fixed-size dims keep theirs
DEFAULT_SIZES = {"batch": 2, "time": 64, "heads": 2, "key": 8, "value": 12, "chan": 6,
                 "dstate": 4, "headdim": 6, "groups": 1, "width": 4, "order": 3}
ROLE_SIZES = {"batch": 2, "time": 64, "head": 2, "group": 1, "feature": 5}


def default_sizes(rec: Recurrence, **overrides: int) -> dict[str, int]:
    """A size for every dim of ``rec``; ``overrides`` (dim=size) replace those of unfixed dims."""
    out = {}
    for d in rec.dims:
        out[d.name] = d.size if d.size is not None else DEFAULT_SIZES.get(
            d.name, ROLE_SIZES[d.role])
    out.update({k: v for k, v in overrides.items() if k in out and rec.dim(k).size is None})
    return out
