"""The shape every backend has: capability flags, declared options, ``supports``, ``render``
(text), ``run``."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

from scancc.ir import IRError, Recurrence


def freeze(v: Any) -> Any:
    """``v`` as a hashable key: mappings as sorted (key, value) tuples, lists as tuples, all
    the way down (options carry dicts, e.g. Triton's ``block_sizes``)."""
    if isinstance(v, Mapping):
        return tuple(sorted((k, freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v


class UnsupportedError(IRError):
    """A backend cannot lower something: names the backend, the recurrence and the feature."""

    def __init__(self, backend: str, recurrence: str, feature: str):
        self.backend, self.recurrence, self.feature = backend, recurrence, feature
        super().__init__(f"backend {backend!r} cannot lower recurrence {recurrence!r}: {feature}")


class OptionError(IRError):
    """An option a backend or a recurrence does not take, or a value of the wrong type or range.

    ``owner`` says whose option it is (``backend 'nki', recurrence 'mamba2'`` or
    ``recurrence 'mamba2'``); the message names the option, what was expected and what came.
    """

    def __init__(self, owner: str, option: str, message: str):
        self.owner, self.option = owner, option
        super().__init__(f"{owner}: {message}")


class Problem(NamedTuple):
    """What an ``Option.rule`` found wrong: ``where`` (e.g. ``block_sizes['chan']``), the bad
    value, what was expected, and (optionally) how to name what came instead."""
    where: str
    value: Any
    expected: str
    got: str | None = None


def describe(v: Any) -> str:
    """A value as errors name it: its Python type and repr (``str 'false'``, ``int 3``)."""
    return f"{type(v).__name__} {v!r}"


# how errors name the accepted types
_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               tuple: "a list", list: "a list", dict: "a dict"}


def _type_ok(v: Any, t: type) -> bool:
    if t is bool:
        return isinstance(v, bool)
    if t is int:  # a bool is not an integer option value; a NumPy integer is
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)
    if t is float:  # an integer is a fine number
        return isinstance(v, numbers.Real) and not isinstance(v, bool)
    if t in (tuple, list):
        return isinstance(v, (tuple, list))
    if t is dict:
        return isinstance(v, Mapping)
    return isinstance(v, t)


@dataclass(frozen=True)
class Option:
    """A declared option: name, accepted types or values, default, one-line doc.

    ``types`` (empty: any type) and ``choices`` (empty: any value of those types) say what is
    accepted; ``rule(value, rec)`` adds a constraint the types cannot express (it returns a
    ``Problem`` or None; ``rec`` is the recurrence, or None when checked without one). ``None``
    always means "the default" unless ``nullable`` is False.
    """
    name: str
    doc: str = ""
    default: Any = None
    types: tuple[type, ...] = ()
    choices: tuple = ()
    rule: Callable[[Any, Recurrence | None], Problem | None] | None = None
    nullable: bool = True

    @classmethod
    def like(cls, name: str, default: Any, doc: str = "") -> "Option":
        """An option typed by its default (a recurrence option: ``dt_softplus=False`` takes
        booleans); a None default accepts any value."""
        t = type(default)
        types = () if default is None else ((tuple,) if t is list else (t,))
        return cls(name, doc, default, types if t in _TYPE_WORDS else ())

    def expected(self) -> str:
        """What the option accepts, in words."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        words = [_TYPE_WORDS.get(t, t.__name__) for t in self.types]
        return " or ".join(dict.fromkeys(words)) or "any value"

    def convert(self, value: Any, rec: Recurrence | None = None) -> tuple[Any, Problem | None]:
        """(the value, converted where the type says so, e.g. a list to a tuple or an int to a
        float; None) if ``value`` is accepted, else (value, the problem)."""
        if value is None and self.nullable:
            return None, None
        if self.types and not any(_type_ok(value, t) for t in self.types):
            like = f" like its default {self.default!r}" \
                if self.default is not None and not self.choices else ""
            return value, Problem(self.name, value, self.expected() + like)
        if self.choices and not any(value == c and type(value) is type(c) for c in self.choices):
            return value, Problem(self.name, value, self.expected())
        if self.types in ((int,), (float,)):  # plain Python numbers (NumPy's too)
            value = self.types[0](value)
        elif self.types == (tuple,):
            value = tuple(value)
        if self.rule is not None:
            p = self.rule(value, rec)
            if p is not None:
                return value, p
        return value, None


def check_options(owner: str, declared: Mapping[str, Option], options: Mapping[str, Any],
                  rec: Recurrence | None = None, what: str = "option") -> dict[str, Any]:
    """The one option check (backends and recurrences): every name declared, every value
    accepted. Returns the options with their values converted; raises ``OptionError``
    naming the owner, the option, what was expected and what came."""
    out = {}
    for k, v in options.items():
        if k not in declared:
            known = ", ".join(declared) or "none"
            raise OptionError(owner, k, f"no {what} {k!r} (options: {known})")
        out[k], p = declared[k].convert(v, rec)
        if p is not None:
            raise OptionError(owner, k, f"option {p.where}={p.value!r}: expected {p.expected}, "
                              f"got {p.got or describe(p.value)}")
    return out


@dataclass
class RunResult:
    """What ``Backend.run`` returns: outputs and (when asked) final states, by name, in
    their declared layouts, plus per-run counters a backend may report."""
    outputs: dict[str, Any]
    final_states: dict[str, Any] | None = None
    counters: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class. A backend imports its toolchain lazily, inside ``available`` / ``run``."""
    name: str = ""
    array: str = "numpy"               # the array kind ``run`` takes and returns: numpy | torch
    generates_source: bool = False
    dtypes: tuple[str, ...] = ("float64", "float32", "float16")
    computes_float64: bool = False     # arithmetic in float64 (else float32 accumulation)
    float64_inputs: bool = False       # float64 inputs computed in float64 (torch backend)
    varlen: bool = False               # run_varlen resets states in its kernels (else: N runs)
    options: Mapping[str, Option] = {}  # backend options compile() accepts, by name

    @classmethod
    def check_options(cls, rec: Recurrence | str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Raise ``OptionError`` (naming backend, recurrence, option, expected and got) unless
        every option is declared in ``options`` and its value accepted; returns the options
        with converted values. ``rec`` may be a name when there is no recurrence at hand."""
        name = rec if isinstance(rec, str) else rec.name
        return check_options(f"backend {cls.name!r}, recurrence {name!r}", cls.options, options,
                             None if isinstance(rec, str) else rec, f"{cls.name} backend option")

    def algorithms(self) -> tuple[str, ...]:
        """The algorithms the ``algorithm`` option names (without ``auto``); empty if none."""
        opt = self.options.get("algorithm")
        return tuple(a for a in (opt.choices if opt else ()) if a != "auto")

    def available(self) -> tuple[bool, str]:
        """(True, how it runs here) or (False, why not)."""
        return True, ""

    def supports(self, rec: Recurrence, options: Mapping[str, Any]) -> tuple[bool, str]:
        """(True, '') if this backend can lower ``rec`` with ``options``, else (False, reason)."""
        return True, ""

    def render(self, rec: Recurrence, options: Mapping[str, Any]) -> str | None:
        """Kernel source text, or None for backends that do not generate code."""
        return None

    def run(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
            initial_state: Mapping[str, Any] | None, output_final_state: bool,
            options: Mapping[str, Any]) -> RunResult:
        raise UnsupportedError(self.name, rec.name, "this backend has no run stage")

    def run_varlen(self, rec: Recurrence, inputs: Mapping[str, Any], sizes: Mapping[str, int],
                   initial_state: Mapping[str, Any] | None, output_final_state: bool,
                   options: Mapping[str, Any], cu: tuple[int, ...]) -> RunResult:
        """A packed variable-length batch (``cu``: validated boundaries, plain ints; see
        scancc/ir/segments.py). The default runs each sequence on its own; backends whose
        kernels reset states at the boundaries (``varlen = True``) override it."""
        return run_varlen_by_sequence(self, rec, inputs, sizes, initial_state,
                                      output_final_state, options, cu)


def _time_layout(rec: Recurrence, x, dims: tuple[str, ...], optional: tuple[str, ...] = ()):
    """The time axis of array ``x`` laid out as ``dims`` (optional dims possibly left out)."""
    if x.ndim != len(dims):
        dims = tuple(d for d in dims if d not in optional)
    return dims.index(rec.time) if rec.time in dims else None


def _cat(parts: list, axis: int):
    if type(parts[0]).__module__.startswith("torch"):
        import torch
        return torch.cat(parts, axis)
    import numpy as np
    return np.concatenate(parts, axis)


def run_varlen_by_sequence(backend: Backend, rec: Recurrence, inputs: Mapping[str, Any],
                           sizes: Mapping[str, int], initial_state: Mapping[str, Any] | None,
                           output_final_state: bool, options: Mapping[str, Any],
                           cu: tuple[int, ...]) -> RunResult:
    """A packed variable-length batch (scancc/ir/segments.py) as N runs of ``backend``, one per
    sequence: what ``Backend.run_varlen`` does for a backend whose kernels take no resets.
    ``initial_state`` and the final states carry the sequences along the batch dim."""
    batch = next((d.name for d in rec.dims if d.role == "batch"), None)

    def b_axis(s):
        return s.dims.index(batch) if batch in s.dims else None
    t_in = {x.name: _time_layout(rec, inputs[x.name], x.dims, x.optional_dims)
            for x in rec.inputs}
    outs: dict[str, list] = {o.name: [] for o in rec.outputs}
    finals: dict[str, list] = {s.name: [] for s in rec.states}
    for n in range(len(cu) - 1):
        t0, t1 = cu[n], cu[n + 1]
        init = None
        if initial_state:
            init = {}
            for s in rec.states:
                if s.name in initial_state:
                    v, ax = initial_state[s.name], b_axis(s)
                    init[s.name] = v[n] if ax is None else v[(slice(None),) * ax + (slice(n, n + 1),)]
        if t1 == t0:  # an empty sequence: no output steps, its final state is its initial one
            if output_final_state:
                for s in rec.states:
                    v = (init or {}).get(s.name)
                    if v is None:
                        v = _zeros_like_state(backend, rec, s, sizes, inputs)
                    finals[s.name].append(v)
            continue
        part = {k: v if t_in[k] is None else v[(slice(None),) * t_in[k] + (slice(t0, t1),)]
                for k, v in inputs.items()}
        res = backend.run(rec, part, {**sizes, rec.time: t1 - t0}, init, output_final_state,
                          options)
        for o in rec.outputs:
            outs[o.name].append(res.outputs[o.name])
        if output_final_state:
            for s in rec.states:
                finals[s.name].append(res.final_states[s.name])
    out = {}
    for o in rec.outputs:
        if outs[o.name]:
            out[o.name] = _cat(outs[o.name], o.dims.index(rec.time))
        else:  # T = 0
            res = backend.run(rec, inputs, sizes, None, False, options)
            out[o.name] = res.outputs[o.name]
    fin = None
    if output_final_state:
        fin = {}
        for s in rec.states:
            ax = b_axis(s)
            parts = finals[s.name]
            if ax is None:
                parts, ax = [p[None] for p in parts], 0
            fin[s.name] = _cat(parts, ax)
    return RunResult(out, fin, {"varlen": "per sequence"})


def _zeros_like_state(backend: Backend, rec: Recurrence, s, sizes, inputs):
    shape = tuple(1 if d == rec.time else sizes[d] for d in s.dims)
    ref = next(iter(inputs.values()))
    if type(ref).__module__.startswith("torch"):
        import torch
        dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
        return torch.zeros(shape, dtype=dt, device=ref.device)
    import numpy as np
    return np.zeros(shape)
