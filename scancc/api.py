"""The user-facing entry point: ``compile(what, target, **options) -> Kernel``."""
from __future__ import annotations

import os
import sys
import weakref
from typing import Any, Mapping

import numpy as np

from scancc import backends
from scancc.backends import UnsupportedError
from scancc.ir import IRError, Recurrence, ShapeMismatch, bind_sizes
from scancc.ir.verify import verify

from . import registry
from .registry import Entry

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class InputError(IRError):
    """A kernel call's inputs do not match the recurrence (names the input, dim, expected/got)."""


def _resolve(what: Any) -> tuple[Entry | None, Recurrence | None, dict]:
    """(entry, fixed IR, spec options) for a library/registered name, a YAML path or an IR."""
    if isinstance(what, Recurrence):
        return None, verify(what), {}
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


def compile(what: Any, target: str = "reference", *, options: Mapping[str, Any] | None = None,
            **kwargs: Any) -> "Kernel":  # noqa: A001
    """Compile a recurrence for a backend.

    Args:
        what: a registered name (``"mamba2"``), a path to a YAML spec, or a ``Recurrence``.
        target: a backend name: ``reference``, ``triton`` or ``nki`` (see ``scancc backends``).
        options: backend options of ``target`` (``{"chip": "trn2"}``), or backend options by
            backend name (``{"nki": {"chip": "trn2"}, "triton": {"num_warps": 8}}``: those of
            ``target`` apply, so one mapping serves several targets).
        **kwargs: the recurrence's options (e.g. ``dt_softplus=True``); a backend option may
            be given here too where no recurrence option has its name.

    Returns:
        a ``Kernel``: call it with the inputs; ``.ir`` is its IR, ``.source`` its code.
    """
    entry, rec, spec_opts = _resolve(what)
    backend = backends.get(target)
    return Kernel(entry, rec, backend, {**spec_opts, **kwargs}, _backend_options(options, target))


def _backend_options(options: Mapping[str, Any] | None, target: str) -> dict:
    """The ``options=`` of ``compile`` for ``target``: flat, or keyed by backend name."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InputError(f"options: expected a dict of backend options (or of them by backend "
                         f"name), got {type(options).__name__} {options!r}")
    names = backends.names()
    keyed = [k for k in options if k in names]
    if not keyed:
        return dict(options)
    flat = [k for k in options if k not in names]
    bad = [k for k in keyed if not isinstance(options[k], Mapping)]
    if flat or bad:
        raise InputError(f"options: either backend options ({', '.join(map(repr, flat))}) or "
                         f"dicts of them by backend name ({', '.join(map(repr, keyed))}), "
                         "not both")
    return dict(options.get(target) or {})


class Kernel:
    """A compiled recurrence. Call it with inputs (NumPy arrays or torch tensors).

    ``kernel(*inputs, initial_state=None, output_final_state=False, **options)`` returns the
    output (or a dict of outputs, if the recurrence has several), in the kind and dtype of the
    first input; with ``output_final_state=True`` it returns ``(output, final_state)``, the
    final state in float32 (float64 for float64 inputs; a dict by state name if the recurrence has several states), as
    flash-linear-attention does. Optional inputs (e.g. mamba's ``D``, ``z``) may be given or
    left out: the kernel specializes on which are present.
    """

    def __init__(self, entry: Entry | None, rec: Recurrence | None, backend, options: dict,
                 backend_options: Mapping[str, Any] | None = None):
        self.entry, self._fixed, self.backend = entry, rec, backend
        # loose keywords: a recurrence option by its name, else a backend option
        rec_opts = set(entry.defaults) if entry else set()
        self.options = {k: v for k, v in options.items() if k in rec_opts}
        loose = {k: v for k, v in options.items() if k not in rec_opts}
        explicit = dict(backend_options or {})
        # ambiguous unless options= gives the backend's: then the keyword is the recurrence's
        both = sorted(set(self.options) & set(backend.options) - set(explicit))
        if both:
            raise InputError(f"option(s) {both} name both an option of recurrence "
                             f"{self.name!r} and a {backend.name} backend option: pass backend "
                             f"options as compile(..., options={{{both[0]!r}: ...}})")
        twice = sorted(set(loose) & set(explicit))
        if twice:
            raise InputError(f"backend option(s) {twice} given twice (as keywords and in "
                             "options=)")
        unknown = sorted(set(loose) - set(backend.options))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in (entry.defaults if entry else {}).items())
            raise InputError(f"recurrence {self.name!r} takes no option(s) {unknown} "
                             f"(recurrence options: {known or 'none'}; {backend.name} backend "
                             f"options: {', '.join(backend.options) or 'none'})")
        self._variants: dict = {}
        # builds the IR: the recurrence options are checked there (Entry.check_options)
        self.backend_options = backend.check_options(self.ir, {**loose, **explicit})
        _KERNELS[id(self)] = self
        if "torch" in sys.modules:  # ready the torch ops before torch.compile may trace a call
            from . import _torch_plan  # noqa: F401
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
        if _compiling():  # inside torch.compile: only constant planning, then the op
            return self._traced_call(args, kwargs, initial_state, output_final_state)
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
        if kind == "torch":
            return self._torch_call(rec, inputs, init, output_final_state)
        native = {k: _to_backend(v, self.backend) for k, v in inputs.items()}
        if init is not None:
            init = {k: _to_backend(v, self.backend) for k, v in init.items()}
        run_opts = dict(self.backend_options)
        if "dtype" in self.backend.options and dtype != "float64":
            # a backend that converts arrays learns their dtype (float64: its own default)
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

    def _traced_call(self, args, kwargs, initial_state, output_final_state):
        """The call while torch.compile traces: planning is a constant function of the
        call's structure (evaluated once at trace time), shape checks run in the op's fake."""
        from .autograd import torch_ops
        named = tuple(sorted(k for k, v in kwargs.items() if v is not None
                             and type(v).__module__.startswith("torch")))
        opts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in named
                            and v is not None and not type(v).__module__.startswith("torch")))
        init = initial_state if isinstance(initial_state, Mapping) or initial_state is None \
            else {"": initial_state}
        from ._torch_plan import plan
        key, order, snames, onames = plan(id(self), len(args), named, opts,
                                          tuple(sorted(init)) if init is not None else None)
        given = dict(zip(order, args))
        given.update({k: kwargs[k] for k in named})
        tensors = [given[n] for n in order]
        states = [] if init is None else [init.get(s, init.get("")) for s in snames]
        res = torch_ops()(key, tensors, states, output_final_state)
        out = res[0] if len(onames) == 1 else dict(zip(onames, res))
        if not output_final_state:
            return out
        fin = res[len(onames):]
        return out, (fin[0] if len(fin) == 1 else dict(zip(snames, fin)))

    def _torch_call(self, rec: Recurrence, inputs: dict, init: dict | None,
                    output_final_state: bool):
        """torch inputs go through the scancc::scan custom op: differentiable (the backward is
        the derived backward recurrence) and traceable by torch.compile."""
        import torch

        from . import _torch_plan  # noqa: F401  (ready before torch.compile traces a call)
        from .autograd import adjoint, slot, torch_ops
        if _requires_grad(inputs, init):
            adjoint(rec)  # derive now, so an underivable recurrence fails at the call
        tensors = [inputs[x.name] for x in rec.inputs]
        ref = tensors[0]
        states = []
        if init is not None:
            sizes = bind_sizes(rec, {k: tuple(v.shape) for k, v in inputs.items()})
            for s in rec.states:
                v = init.get(s.name)
                v = torch.zeros(tuple(sizes[d] for d in s.dims)) if v is None else v
                states.append(torch.as_tensor(v).to(device=ref.device,
                                                    dtype=_state_dtype(torch, ref)))
        res = torch_ops()(slot(self, rec), tensors, states, output_final_state)
        outs = dict(zip((o.name for o in rec.outputs), res))
        out = outs[rec.outputs[0].name] if len(outs) == 1 else outs
        if not output_final_state:
            return out
        finals = dict(zip((s.name for s in rec.states), res[len(rec.outputs):]))
        return out, (finals[rec.states[0].name] if len(finals) == 1 else finals)


# kernels by id, for the planner torch.compile calls with constants only
_KERNELS: "weakref.WeakValueDictionary[int, Kernel]" = weakref.WeakValueDictionary()


def _compiling() -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    return torch is not None and torch.compiler.is_compiling()


def _plan_impl(kernel_id: int, n_pos: int, named: tuple, opts: tuple, init: tuple | None):
    """(op key, input order, state names, output names) for a call's structure."""
    from .autograd import slot
    k = _KERNELS[kernel_id]
    optional = set(k.entry.optional_inputs) if k.entry else set()
    o = {**k.options, **dict(opts)}
    for name in optional:
        o[name] = name in named
    rec = k.variant(**o)
    order = tuple(x.name for x in rec.inputs)
    if n_pos + len(named) != len(order) or set(named) - set(order[n_pos:]):
        raise InputError(f"recurrence {rec.name!r} takes inputs {order}, got {n_pos} "
                         f"positional and {named} by name")
    return (slot(k, rec), order, tuple(s.name for s in rec.states),
            tuple(o.name for o in rec.outputs))


def _state_dtype(torch, ref):
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def _requires_grad(inputs: Mapping, init: Mapping | None) -> bool:
    import torch
    if not torch.is_grad_enabled():
        return False
    return any(getattr(v, "requires_grad", False)
               for v in list(inputs.values()) + list((init or {}).values()))


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
