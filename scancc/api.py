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
from ._forward import Runner, by_slot, runner
from .autograd import adjoint, check_no_forward_ad, torch_ops
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


def compile(what: Any, target: str = "auto", *, options: Mapping[str, Any] | None = None,
            **kwargs: Any) -> "Kernel":  # noqa: A001
    """Compile a recurrence for a backend.

    Args:
        what: a registered name (``"mamba2"``), a path to a YAML spec, or a ``Recurrence``.
        target: a backend name: ``reference``, ``torch``, ``triton`` or ``nki`` (see
            ``scancc backends``), or ``auto`` (the default): per call, by the inputs
            (``default_target``): the reference for NumPy arrays, Triton for CUDA tensors, the
            torch backend for other torch tensors.
        options: backend options of ``target`` (``{"chip": "trn2"}``), or backend options by
            backend name (``{"nki": {"chip": "trn2"}, "triton": {"num_warps": 8}}``: those of
            ``target`` apply, so one mapping serves several targets).
        **kwargs: the recurrence's options (e.g. ``dt_softplus=True``); a backend option may
            be given here too where no recurrence option has its name.

    Returns:
        a ``Kernel``: call it with the inputs; ``.ir`` is its IR, ``.source`` its code.
    """
    entry, rec, spec_opts = _resolve(what)
    if target == AUTO:
        return AutoKernel(entry, rec, {**spec_opts, **kwargs}, options)
    backend = backends.get(target)
    return Kernel(entry, rec, backend, {**spec_opts, **kwargs}, _backend_options(options, target))


AUTO = "auto"


def default_target(x: Any) -> str:
    """The backend ``target="auto"`` runs a call on, from its first array: the reference for
    NumPy arrays (it defines the semantics), Triton for CUDA tensors where Triton imports, the
    torch backend for any other torch tensor (CPU, MPS, XPU, or CUDA without Triton)."""
    if not type(x).__module__.startswith("torch"):
        return "reference"
    if x.device.type == "cuda" and backends.get("triton").available()[0]:
        return "triton"
    return "torch"


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
        self._plans: dict = {}       # call structure -> _CallPlan (see __call__)
        self._last: Runner | None = None
        # builds the IR: the recurrence options are checked there (Entry.check_options)
        self.backend_options = backend.check_options(self.ir, {**loose, **explicit})
        _KERNELS[id(self)] = self
        if "torch" in sys.modules:  # ready the torch ops before torch.compile may trace a call
            from . import _torch_plan  # noqa: F401
            _constant_plan()
            from .varlen import torch_varlen_traced_op  # the packed call's traced op too
            torch_varlen_traced_op()
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

    @property
    def last_run(self):
        """The backend's ``RunResult`` of the last call (outputs, counters)."""
        return self._last.last_run if self._last is not None else None

    def runner(self, rec: Recurrence) -> Runner:
        """The forward path of variant ``rec`` on this kernel's backend (scancc/_forward.py)."""
        return runner(self.backend, rec, self.backend_options)

    def __call__(self, *args: Any, initial_state: Any = None, output_final_state: bool = False,
                 cu_seqlens: Any = None, cp_group: Any = None, **kwargs: Any):
        """``cu_seqlens``: a packed variable-length batch (batch 1, ``[N+1]`` int64
        boundaries along time, as fla; docs/serving.md): every state resets at each boundary,
        ``initial_state`` and the final state carry N in place of the batch dim.
        ``cp_group``: context parallel over the time shards of a torch.distributed process
        group (docs/distributed.md)."""
        if cp_group is not None:
            if cu_seqlens is not None:  # a packed batch whose sequences may span ranks
                from .distributed import cp_varlen_call
                return cp_varlen_call(self, args, kwargs, cu_seqlens, initial_state,
                                      bool(output_final_state), cp_group, InputError)
            from .distributed import cp_call
            return cp_call(self, args, kwargs, initial_state, bool(output_final_state), cp_group,
                           InputError)
        if _compiling():  # inside torch.compile: only constant planning, then the op
            return self._traced_call(args, kwargs, initial_state, output_final_state,
                                     cu_seqlens)
        # the fast path: a call with the structure of an earlier one (which inputs are given
        # and how, option values, array kinds, dtypes and shapes) reuses that call's plan, so
        # binding, checks and variant selection are done once per structure
        try:
            key = (tuple(map(_sig, args)), tuple((k, _sig(v)) for k, v in kwargs.items()),
                   _init_sig(initial_state), bool(output_final_state),
                   None if cu_seqlens is None else _cu_sig(cu_seqlens))
            plan = self._plans.get(key)
        except TypeError:  # an unhashable option value: plan every call
            key = plan = None
        n_seq = None if cu_seqlens is None else _n_seq(cu_seqlens)
        if plan is None:
            plan = self._plan_call(args, kwargs, initial_state, n_seq)
            if key is not None:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        self._last = plan.runner
        cu = None if cu_seqlens is None else plan.check_cu(cu_seqlens)
        return plan.run(args, kwargs, initial_state, bool(output_final_state), cu)

    def step(self, *args: Any, state: Any, state_indices: Any = None, **kwargs: Any):
        """One decode step: each input without its time dim, ``state`` as
        ``output_final_state=True`` returns it (updated in place); returns the outputs without
        the time dim. ``state_indices`` (int ``[B]``): the rows of a larger state pool the B
        inputs step (continuous batching). No gradients. See scancc/_step.py, docs/serving.md."""
        from ._step import step
        return step(self, args, kwargs, state, state_indices, InputError, _kind)

    def _plan_call(self, args, kwargs, initial_state, n_seq: int | None = None) -> "_CallPlan":
        """Everything about a call that depends only on its structure, checked in full."""
        entry_opts = set(self.entry.defaults) if self.entry else set()
        optional = set(self.entry.optional_inputs) if self.entry else set()
        kwargs = dict(kwargs)
        call_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in entry_opts - optional}
        opts = {**self.options, **call_opts}
        for name in optional:  # specialize on which optional inputs are present
            opts[name] = kwargs.get(name) is not None
        rec = self.variant(**opts)
        _check_names(rec, [k for k, v in kwargs.items() if v is None], optional)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        inputs = _bind_positional(rec, args, kwargs)
        kind, dtype = _check_inputs(rec, inputs, self.backend)
        sizes = _bind(rec, inputs)
        batch = next((d.name for d in rec.dims if d.role == "batch"), None)
        if n_seq is not None and batch is not None and sizes[batch] != 1:
            raise InputError(f"recurrence {rec.name!r}: cu_seqlens: packed sequences take "
                             f"batch 1 (the sequences concatenated along time), got batch "
                             f"{sizes[batch]}")
        init = _initial_state(rec, initial_state, sizes, n_seq) \
            if initial_state is not None else None
        run = self.runner(rec)
        if kind == "torch":  # the scancc::scan op runs the runner its slot was first taken by
            run = by_slot(run.slot)  # (same IR text and options): that one's last_run is ours
        plan = _CallPlan(run, len(args), kind, dtype,
                         None if init is None else tuple(init), sizes)
        if n_seq is not None:
            plan.packed(n_seq)
        return plan

    def _traced_call(self, args, kwargs, initial_state, output_final_state, cu_seqlens=None):
        """The call while torch.compile traces: planning is a constant function of the
        call's structure (evaluated once at trace time), shape checks run in the op's fake."""
        from .autograd import torch_ops
        named = tuple(sorted(k for k, v in kwargs.items() if v is not None
                             and type(v).__module__.startswith("torch")))
        opts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in named
                            and v is not None and not type(v).__module__.startswith("torch")))
        init = initial_state if isinstance(initial_state, Mapping) or initial_state is None \
            else {"": initial_state}
        nones = tuple(sorted(k for k, v in kwargs.items() if v is None))
        plan = _PLAN if _PLAN is not None else _constant_plan()
        key, order, snames, onames = plan(
            id(self), len(args), named, opts, tuple(sorted(init)) if init is not None else None,
            nones)
        given = dict(zip(order, args))
        given.update({k: kwargs[k] for k in named})
        tensors = [given[n] for n in order]
        states = [] if init is None else [init.get(s, init.get("")) for s in snames]
        if cu_seqlens is None:
            res = torch_ops()(key, tensors, states, output_final_state)
        else:  # a packed call: cu_seqlens a tensor input of the op (values read when it runs)
            import torch

            from .varlen import torch_varlen_traced_op
            cu = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else \
                torch.tensor(list(cu_seqlens), dtype=torch.int64)
            if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool \
                    or cu.dim() != 1:
                raise InputError(f"cu_seqlens: expected an int64 tensor [N+1], got dtype "
                                 f"{cu.dtype} shape {tuple(cu.shape)}")
            res = torch_varlen_traced_op()(key, tensors, states, cu, output_final_state)
        out = res[0] if len(onames) == 1 else dict(zip(onames, res))
        if not output_final_state:
            return out
        fin = res[len(onames):]
        return out, (fin[0] if len(fin) == 1 else dict(zip(snames, fin)))


_MAX_PLANS = 256


class AutoKernel(Kernel):
    """``compile(..., target="auto")``: each call runs on ``default_target`` of its first
    array. The kernel itself is the reference's (NumPy calls run here, as with
    ``target="reference"``); another backend's kernel is built on first use. ``ir``, options
    and checks are the reference's; ``target`` and ``source`` name the backend of the last
    call."""

    def __init__(self, entry: Entry | None, rec: Recurrence | None, options: dict,
                 backend_options: Mapping[str, Any] | None):
        if backend_options is not None and (
                not isinstance(backend_options, Mapping) or
                any(k not in backends.names() for k in backend_options)):
            raise InputError("options: with target='auto', give backend options by backend "
                             "name ({'triton': {'num_warps': 8}, 'torch': {...}}), or compile "
                             "for one target")
        self._by_backend = dict(backend_options or {})
        super().__init__(entry, rec, backends.get("reference"), options,
                         self._by_backend.get("reference"))
        self._kernels: dict[str, Kernel] = {"reference": self}
        self._current: Kernel = self
        if "torch" in sys.modules:  # built now: a first call may come inside torch.compile
            import torch
            self._build("triton" if torch.cuda.is_available() else "torch")

    def kernel_for(self, x: Any) -> Kernel:
        """The kernel a call whose first array is ``x`` runs (see ``default_target``)."""
        target = default_target(x)
        k = self._kernels.get(target) or self._build(target)
        self._current = k
        return k

    def _build(self, target: str) -> Kernel:
        try:
            k = Kernel(self.entry, self._fixed, backends.get(target), self.options,
                       self._by_backend.get(target))
        except UnsupportedError:   # that backend cannot lower it: the definition runs
            k = self
        self._kernels[target] = k
        return k

    @staticmethod
    def _first(args, kwargs):
        for x in (*args, *kwargs.values()):
            if isinstance(x, np.ndarray) or type(x).__module__.startswith("torch"):
                return x
        return None

    def __call__(self, *args: Any, **kwargs: Any):
        k = self.kernel_for(self._first(args, kwargs))
        return super().__call__(*args, **kwargs) if k is self else k(*args, **kwargs)

    def step(self, *args: Any, **kwargs: Any):
        k = self.kernel_for(self._first(args, kwargs))
        return super().step(*args, **kwargs) if k is self else k.step(*args, **kwargs)

    @property
    def source(self) -> str | None:
        return super().source if self._current is self else self._current.source

    @property
    def target(self) -> str:
        """The backend of the last call (the reference before any call)."""
        return self._current.backend.name

    @property
    def last_run(self):
        return super().last_run if self._current is self else self._current.last_run

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, target='auto', options={self.options})"


def _sig(x):
    """What a call plan depends on in one argument: an array's kind, dtype and shape; any
    other value (an option, None) itself."""
    shape = getattr(x, "shape", None)
    if shape is None:
        return type(x), x  # True and 1 are equal and hash alike, but are checked apart
    return type(x), x.dtype, tuple(shape)


def _cu_sig(cu):
    """What a call plan depends on in ``cu_seqlens``: its kind, dtype and length (N)."""
    shape = getattr(cu, "shape", None)
    if shape is None:
        return type(cu), len(cu)
    return type(cu), str(cu.dtype), tuple(shape)


def _n_seq(cu) -> int:
    """N of ``cu_seqlens`` [N+1] (checked in full by ``_CallPlan.check_cu``)."""
    try:
        return max(0, len(cu) - 1)
    except TypeError:
        raise InputError(f"cu_seqlens: expected an int64 array or tensor [N+1], got "
                         f"{type(cu).__name__}") from None


def _init_sig(init):
    if init is None:
        return None
    if isinstance(init, Mapping):
        return tuple((k, _sig(v)) for k, v in init.items())
    return _sig(init)


class _CallPlan:
    """One call structure of a kernel, checked once: its variant's ``Runner``, where each
    input comes from (positional, then by name, in the variant's input order), the kind and
    dtype of the arrays, and the initial states given."""

    def __init__(self, run: Runner, n_pos: int, kind: str, dtype: str,
                 init_names: tuple[str, ...] | None, sizes: dict[str, int]):
        self.runner, self.rec = run, run.rec
        self.n_pos, self.kind, self.dtype = n_pos, kind, dtype
        self.by_name = run.input_names[n_pos:]
        self.init_names = init_names
        self.single_out = len(run.output_names) == 1
        self.single_state = len(run.state_names) == 1
        self.state_shapes = {s.name: tuple(sizes[d] for d in s.dims) for s in run.rec.states}
        # states are carried in numerics.state (float32); float64 callers get float64 back
        self.state_dtype = "float64" if dtype == "float64" else run.rec.numerics.state
        self.derived = False
        self.sizes, self.n_seq = sizes, None

    def packed(self, n_seq: int) -> None:
        """A packed variable-length call of N sequences: states carry N in place of batch."""
        from .varlen import batch_axis
        self.n_seq = n_seq
        for s in self.rec.states:
            shape = list(self.state_shapes[s.name])
            ax = batch_axis(self.rec, s.dims)
            self.state_shapes[s.name] = tuple(shape[:ax] + [n_seq] + shape[ax + 1:]) \
                if ax is not None else (n_seq, *shape)

    def check_cu(self, cu) -> tuple[int, ...]:
        """``cu_seqlens`` validated against this call (raises InputError), as plain ints."""
        from .varlen import check_cu_seqlens
        rec = self.rec
        batch = next((d.name for d in rec.dims if d.role == "batch"), None)
        try:
            return check_cu_seqlens(cu, self.sizes[rec.time],
                                    self.sizes[batch] if batch else None, rec.inputs[0].name)
        except ValueError as e:
            raise InputError(f"recurrence {rec.name!r}: {e}") from None

    def _inputs(self, args, kwargs) -> list:
        return [*args, *(kwargs[n] for n in self.by_name)]

    def _init(self, init) -> dict | None:
        if init is None:
            return None
        if not isinstance(init, Mapping):
            return {self.runner.state_names[0]: init}
        return init

    def _result(self, outs: Mapping, finals: Mapping | None, want_final: bool):
        r = self.runner
        out = outs[r.output_names[0]] if self.single_out else dict(outs)
        if not want_final:
            return out
        return out, (finals[r.state_names[0]] if self.single_state else dict(finals))

    def run(self, args, kwargs, init, want_final: bool, cu: tuple[int, ...] | None = None):
        if self.kind == "torch":
            return self._run_torch(self._inputs(args, kwargs), self._init(init), want_final,
                                   cu)
        r = self.runner
        native = [r.to_native(v) for v in self._inputs(args, kwargs)]
        init = self._init(init)
        if init is not None:
            init = {k: r.to_native(v) for k, v in init.items()}
        res = r(native, init, want_final, self.dtype) if cu is None else \
            r(native, init, want_final, self.dtype, cu_seqlens=cu)
        outs = {k: _to_numpy(v, self.dtype) for k, v in res.outputs.items()}
        finals = ({k: _to_numpy(v, self.state_dtype) for k, v in res.final_states.items()}
                  if want_final else None)
        return self._result(outs, finals, want_final)

    def _run_torch(self, tensors: list, init: Mapping | None, want_final: bool,
                   cu: tuple[int, ...] | None = None):
        """torch inputs go through the scancc::scan custom op: differentiable (the backward is
        the derived backward recurrence) and traceable by torch.compile."""
        import torch
        check_no_forward_ad(tensors if init is None else [*tensors, *init.values()])
        if not self.derived and _requires_grad(tensors, init):
            adjoint(self.rec)  # derive now, so an underivable recurrence fails at the call
            self.derived = True
        states = []
        if init is not None:
            ref = tensors[0]
            sdt = _state_dtype(torch, ref)
            for s in self.runner.state_names:
                v = init.get(s)
                v = torch.zeros(self.state_shapes[s]) if v is None else v
                states.append(torch.as_tensor(v).to(device=ref.device, dtype=sdt))
        if cu is None:
            res = torch_ops()(self.runner.slot, tensors, states, want_final)
        else:
            from .varlen import torch_varlen_op
            res = torch_varlen_op()(self.runner.slot, tensors, states, list(cu), want_final)
        names = self.runner.output_names
        outs = dict(zip(names, res))
        finals = dict(zip(self.runner.state_names, res[len(names):])) if want_final else None
        return self._result(outs, finals, want_final)


# kernels by id, for the planner torch.compile calls with constants only
_KERNELS: "weakref.WeakValueDictionary[int, Kernel]" = weakref.WeakValueDictionary()


def _compiling() -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    return torch is not None and torch.compiler.is_compiling()


_PLAN = None


def _constant_plan():
    """``_plan_impl`` as torch.compile sees it: a constant function of the call's structure
    (kernel, which inputs are given by position/name, options), evaluated once at trace time."""
    global _PLAN
    if _PLAN is None:
        import torch
        _PLAN = torch.compiler.assume_constant_result(_plan_impl)
    return _PLAN


def _plan_impl(kernel_id: int, n_pos: int, named: tuple, opts: tuple, init: tuple | None,
               nones: tuple = ()):
    """(op key, input order, state names, output names) for a call's structure (``nones``:
    the keywords given as None)."""
    k = _KERNELS[kernel_id]
    optional = set(k.entry.optional_inputs) if k.entry else set()
    o = {**k.options, **dict(opts)}
    for name in optional:
        o[name] = name in named
    rec = k.variant(**o)
    _check_names(rec, [n for n in nones if n not in (k.entry.defaults if k.entry else {})],
                 optional)
    order = tuple(x.name for x in rec.inputs)
    if n_pos + len(named) != len(order) or set(named) - set(order[n_pos:]):
        raise InputError(f"recurrence {rec.name!r} takes inputs {order}, got {n_pos} "
                         f"positional and {named} by name")
    return (k.runner(rec).slot, order, tuple(s.name for s in rec.states),
            tuple(o.name for o in rec.outputs))


def _state_dtype(torch, ref):
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def _requires_grad(inputs, init: Mapping | None) -> bool:
    import torch
    if not torch.is_grad_enabled():
        return False
    return any(getattr(v, "requires_grad", False)
               for v in list(inputs) + list((init or {}).values()))


def _check_names(rec: Recurrence, names, optional) -> None:
    """Keywords given as None are omitted, but only inputs may be omitted that way: any
    other name is a typo (``intial_state=None``) and is refused whatever its value."""
    known = {i.name for i in rec.inputs} | set(optional)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"recurrence {rec.name!r} has no input or option {unknown[0]!r} "
                         f"(inputs: {', '.join(i.name for i in rec.inputs)}; keywords: "
                         "initial_state, output_final_state, cu_seqlens)")


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


def _initial_state(rec: Recurrence, init: Any, sizes: Mapping[str, int],
                   n_seq: int | None = None) -> dict:
    """The initial states by name, shapes checked (``n_seq``: a packed call's N sequences,
    in place of the batch dim)."""
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
        named = {d: sizes[d] for d in s.dims}
        if n_seq is not None:  # N sequences in place of the batch dim
            from .varlen import batch_axis
            ax = batch_axis(rec, s.dims)
            named = {("sequences" if ax is not None and i == ax else d): n
                     for i, (d, n) in enumerate(named.items())}
            if ax is None:
                named = {"sequences": n_seq, **named}
            else:
                named["sequences"] = n_seq
        want = tuple(named.values())
        if tuple(v.shape) != want:
            raise InputError(f"initial_state {k!r}: expected shape "
                             f"[{', '.join(f'{d}={n}' for d, n in named.items())}] = {want}, "
                             f"got {tuple(v.shape)}")
    return dict(init)


def _to_numpy(y, dtype: str) -> np.ndarray:
    """A backend's result for a NumPy caller: in the inputs' dtype (bfloat16: float32)."""
    if not isinstance(y, np.ndarray):
        y = y.detach().cpu().float().numpy()
    return np.asarray(y, dtype=np.float32 if dtype == "bfloat16" else dtype)
