"""The user-facing entry point: ``compile(what, target, **options) -> Kernel``."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from scancc import backends
from scancc.backends import UnsupportedError
from scancc.ir import IRError, Recurrence, ShapeMismatch, bind_sizes

from . import registry
from .registry import Entry

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class InputError(IRError):
    """A kernel call's inputs do not match the recurrence (names the input, dim, expected/got)."""


def _resolve(what: Any) -> tuple[Entry | None, Recurrence | None, dict]:
    """(entry, fixed IR, spec options) for a library/registered name, a YAML path or an IR."""
    if isinstance(what, Recurrence):
        return None, what.verify(), {}
    if isinstance(what, Entry):
        return what, None, {}
    if isinstance(what, (str, os.PathLike)):
        s = os.fspath(what)
        if s.endswith((".yaml", ".yml")) or os.sep in s or os.path.exists(s):
            from .spec import load_spec
            spec = load_spec(s)
            return spec.entry, None, spec.options
        return registry.get(s), None, {}
    raise TypeError(f"compile() takes a recurrence name, a YAML spec path or a Recurrence, "
                    f"got {type(what).__name__}")


def compile(what: Any, target: str = "reference", **options: Any) -> "Kernel":  # noqa: A001
    """Compile a recurrence for a backend.

    Args:
        what: a registered name (``"mamba2"``), a path to a YAML spec, or a ``Recurrence``.
        target: a backend name: ``reference``, ``triton`` or ``nki`` (see ``scancc backends``).
        **options: the recurrence's options (e.g. ``dt_softplus=True``) and backend options.

    Returns:
        a ``Kernel``: call it with the inputs; ``.ir`` is its IR, ``.source`` its code.
    """
    entry, rec, spec_opts = _resolve(what)
    return Kernel(entry, rec, backends.get(target), {**spec_opts, **options})


class Kernel:
    """A compiled recurrence. Call it with inputs (NumPy arrays or torch tensors).

    ``kernel(*inputs, initial_state=None, output_final_state=False, **options)`` returns the
    output (or a dict of outputs, if the recurrence has several), in the kind and dtype of the
    first input; with ``output_final_state=True`` it returns ``(output, final_state)``, the
    final state in float32 (float64 for float64 inputs; a dict by state name if the recurrence has several states), as
    flash-linear-attention does. Optional inputs (e.g. mamba's ``D``, ``z``) may be given or
    left out: the kernel specializes on which are present.
    """

    def __init__(self, entry: Entry | None, rec: Recurrence | None, backend, options: dict):
        self.entry, self._fixed, self.backend = entry, rec, backend
        rec_opts = set(entry.defaults) if entry else set()
        self.options = {k: v for k, v in options.items() if k in rec_opts}
        self.backend_options = {k: v for k, v in options.items() if k not in rec_opts}
        unknown = sorted(set(self.backend_options) - set(backend.options))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in (entry.defaults if entry else {}).items())
            raise InputError(f"recurrence {self.name!r} takes no option(s) {unknown} "
                             f"(recurrence options: {known or 'none'}; {backend.name} backend "
                             f"options: {', '.join(backend.options) or 'none'})")
        self._variants: dict = {}
        ok, why = backend.supports(self.ir, self.backend_options)
        if not ok:
            prefix = f"backend {backend.name!r} cannot lower recurrence {self.ir.name!r}: "
            raise UnsupportedError(backend.name, self.ir.name, why.removeprefix(prefix))

    @property
    def name(self) -> str:
        return self.entry.name if self.entry else self._fixed.name

    def variant(self, **options: Any) -> Recurrence:
        if self._fixed is not None:
            if options:
                raise InputError(f"recurrence {self._fixed.name!r} takes no options, got "
                                 f"{sorted(options)}")
            return self._fixed
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        if key not in self._variants:
            self._variants[key] = self.entry.build(**options)
        return self._variants[key]

    @property
    def ir(self) -> Recurrence:
        return self.variant(**self.options)

    @property
    def source(self) -> str | None:
        """Generated kernel source (None for the reference backend, which interprets the IR)."""
        return self.backend.render(self.ir, self.backend_options)

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, target={self.backend.name!r}, options={self.options})"

    def __call__(self, *args: Any, initial_state: Any = None, output_final_state: bool = False,
                 **kwargs: Any):
        entry_opts = set(self.entry.defaults) if self.entry else set()
        optional = set(self.entry.optional_inputs) if self.entry else set()
        call_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in entry_opts - optional}
        opts = {**self.options, **call_opts}
        for name in optional:  # specialize on which optional inputs are present
            opts[name] = kwargs.get(name) is not None
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        rec = self.variant(**opts)
        inputs = _bind_positional(rec, args, kwargs)
        kind, dtype = _check_inputs(rec, inputs, self.backend)
        sizes = _bind(rec, inputs)
        init = _initial_state(rec, initial_state, sizes) if initial_state is not None else None
        if kind == "torch" and _requires_grad(inputs, init):
            return self._differentiable(rec, inputs, init, output_final_state)
        native = {k: _to_backend(v, self.backend) for k, v in inputs.items()}
        if init is not None:
            init = {k: _to_backend(v, self.backend) for k, v in init.items()}
        run_opts = dict(self.backend_options)
        if "dtype" in self.backend.options:  # a backend that converts arrays learns their dtype
            run_opts.setdefault("dtype", dtype)
        res = self.backend.run(rec, native, sizes, init, output_final_state, run_opts)
        self.last_run = res
        outs = {k: _from_backend(v, kind, dtype, inputs) for k, v in res.outputs.items()}
        out = outs[rec.outputs[0].name] if len(outs) == 1 else outs
        if not output_final_state:
            return out
        # states are carried in numerics.state (float32); float64 callers get float64 back
        sdt = "float64" if dtype == "float64" else rec.numerics.state
        finals = {k: _from_backend(v, kind, sdt, inputs)
                  for k, v in res.final_states.items()}
        return out, (finals[rec.states[0].name] if len(finals) == 1 else finals)


    def _native(self, x):
        return _to_backend(x, self.backend)

    def _differentiable(self, rec: Recurrence, inputs: dict, init: dict | None,
                        output_final_state: bool):
        """The call as a torch autograd node (backward: the derived backward recurrence)."""
        import torch

        from .autograd import DEFAULT_CHUNK, adjoint, scan_function
        adjoint(rec)  # derive now, so an underivable recurrence fails at the call
        names = tuple(x.name for x in rec.inputs)
        snames = tuple(s.name for s in rec.states)
        tensors = [inputs[n] for n in names]
        if init is not None:
            ref = tensors[0]
            tensors += [init[s].to(ref.device) if s in init else
                        torch.zeros(tuple(v.shape), dtype=torch.float32, device=ref.device)
                        for s, v in zip(snames, (_state_like(rec, s, inputs) for s in snames))]
        res = scan_function().apply(self, rec, names, snames, output_final_state, DEFAULT_CHUNK,
                                    *tensors)
        outs = dict(zip((o.name for o in rec.outputs), res))
        out = outs[rec.outputs[0].name] if len(outs) == 1 else outs
        if not output_final_state:
            return out
        finals = dict(zip(snames, res[len(rec.outputs):]))
        return out, (finals[snames[0]] if len(finals) == 1 else finals)


def _requires_grad(inputs: Mapping, init: Mapping | None) -> bool:
    import torch
    if not torch.is_grad_enabled():
        return False
    return any(getattr(v, "requires_grad", False)
               for v in list(inputs.values()) + list((init or {}).values()))


def _state_like(rec: Recurrence, name: str, inputs: Mapping):
    sizes = bind_sizes(rec, {k: tuple(v.shape) for k, v in inputs.items()})
    return np.empty(tuple(sizes[d] for d in rec.state(name).dims), dtype=np.float32)


def _bind_positional(rec: Recurrence, args, kwargs) -> dict:
    names = [i.name for i in rec.inputs]
    if len(args) > len(names):
        raise InputError(f"recurrence {rec.name!r} takes {len(names)} inputs "
                         f"({', '.join(names)}), got {len(args)} positional arguments")
    inputs = dict(zip(names, args))
    for k, v in kwargs.items():
        if k in inputs:
            raise InputError(f"input {k!r} given twice (positionally and by name)")
        if k not in names:
            raise InputError(f"recurrence {rec.name!r} has no input or option {k!r} "
                             f"(inputs: {', '.join(names)})")
        inputs[k] = v
    missing = [n for n in names if n not in inputs]
    if missing:
        raise InputError(f"recurrence {rec.name!r}: missing input(s) {missing}")
    return inputs


def _kind(x) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    if type(x).__module__.startswith("torch"):
        return "torch"
    raise InputError(f"expected a NumPy array or a torch tensor, got {type(x).__name__}")


def _dtype_name(x) -> str:
    return str(x.dtype).replace("torch.", "")


def _check_inputs(rec: Recurrence, inputs: Mapping, backend) -> tuple[str, str]:
    kinds = {k: _kind(v) for k, v in inputs.items()}
    if len(set(kinds.values())) > 1:
        raise InputError(f"inputs mix NumPy arrays and torch tensors: {kinds}")
    for k, v in inputs.items():
        dt = _dtype_name(v)
        if dt not in FLOAT_DTYPES:
            raise InputError(f"input {k!r}: expected a floating dtype ({', '.join(FLOAT_DTYPES)}), "
                             f"got {dt}")
        if rec.numerics.input and dt != rec.numerics.input:
            raise InputError(f"input {k!r}: recurrence {rec.name!r} takes {rec.numerics.input} "
                             f"inputs (numerics input={rec.numerics.input}), got {dt}")
        if dt not in backend.dtypes:
            raise UnsupportedError(backend.name, rec.name, f"input {k!r} has dtype {dt}; "
                                   f"this backend takes {', '.join(backend.dtypes)}")
    first = inputs[rec.inputs[0].name]
    return _kind(first), _dtype_name(first)


def _bind(rec: Recurrence, inputs: Mapping) -> dict[str, int]:
    try:
        return bind_sizes(rec, {k: tuple(v.shape) for k, v in inputs.items()})
    except ShapeMismatch as e:
        raise InputError(f"recurrence {rec.name!r}: {e}") from None


def _initial_state(rec: Recurrence, init: Any, sizes: Mapping[str, int]) -> dict:
    if not isinstance(init, Mapping):
        if len(rec.states) != 1:
            raise InputError(f"recurrence {rec.name!r} has states "
                             f"{[s.name for s in rec.states]}: pass initial_state as a dict")
        init = {rec.states[0].name: init}
    for k, v in init.items():
        try:
            s = rec.state(k)
        except IRError:
            raise InputError(f"initial_state: recurrence {rec.name!r} has no state {k!r} "
                             f"(states: {[s.name for s in rec.states]})") from None
        want = tuple(sizes[d] for d in s.dims)
        if tuple(v.shape) != want:
            raise InputError(f"initial_state {k!r}: expected shape "
                             f"[{', '.join(f'{d}={sizes[d]}' for d in s.dims)}] = {want}, "
                             f"got {tuple(v.shape)}")
    return dict(init)


def _to_backend(x, backend):
    if backend.array == "numpy":
        if _kind(x) == "torch":
            import torch
            return x.detach().to("cpu", torch.float64).numpy()
        return x
    import torch
    return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x


def _from_backend(y, kind: str, dtype: str, inputs: Mapping):
    if kind == "numpy":
        y = y.detach().cpu().float().numpy() if not isinstance(y, np.ndarray) else y
        return np.asarray(y, dtype=np.float32 if dtype == "bfloat16" else dtype)
    import torch
    device = next(iter(inputs.values())).device
    t = torch.from_numpy(np.array(y)) if isinstance(y, np.ndarray) else y
    return t.to(device=device, dtype=getattr(torch, dtype))
