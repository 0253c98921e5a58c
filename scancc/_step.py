"""The decode step: ``Kernel.step(*inputs_t, state=..., state_indices=None)``.

One time step of a recurrence: each input without its time dim, the state as
``output_final_state=True`` returns it (a tensor, or a dict by state name), updated in place;
returns the outputs without the time dim. ``state_indices`` (int ``[B]``) picks the rows of a
larger state pool (first dim: the state's batch dim) that the B inputs step, as mamba_ssm's
``selective_state_update(..., state_batch_indices)`` (continuous batching).

The host path is planned once per call structure (``StepPlan``, cached on the kernel by the
kinds, dtypes and shapes of the inputs, state and indices): a repeated step only adds the
time dim to the inputs (views), calls the backend's step and drops the time dim from the
outputs. The Triton backend has a dedicated step kernel (backends/triton/step.py: the
recurrent kernel without its time loop, the state read and written in place); the reference
and NKI backends step through their T=1 scan (``kernel(..., initial_state=state,
output_final_state=True)``, the final state copied into ``state``). No gradients flow
through a step (decoding is inference; train with the scan).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

_MAX_PLANS = 256


def _sig(x):
    shape = getattr(x, "shape", None)
    if shape is None:
        return type(x), x
    return type(x), x.dtype, tuple(shape), str(getattr(x, "device", ""))


def _state_sig(x):
    """A state's key: also whether it is contiguous (the step kernel writes it in place)."""
    contiguous = getattr(x, "is_contiguous", None)
    return _sig(x), contiguous() if contiguous is not None else x.flags.c_contiguous


def step(kernel, args: tuple, kwargs: dict, state: Any, state_indices: Any, error, kind):
    """``kernel.step``; ``error``: the exception class of input errors (api.InputError),
    ``kind``: the array-kind function (api._kind): passed in, so this module never imports
    ``api``, which imports it."""
    plans = kernel.__dict__.setdefault("_step_plans", {})
    try:
        key = (tuple(map(_sig, args)), tuple((k, _sig(v)) for k, v in kwargs.items()),
               tuple((k, _state_sig(v)) for k, v in state.items()) if isinstance(state, Mapping)
               else _state_sig(state), _sig(state_indices) if state_indices is not None else None)
        plan = plans.get(key)
    except TypeError:  # an unhashable option value: plan every call
        key = plan = None
    if plan is None:
        plan = StepPlan(kernel, args, kwargs, state, state_indices, error, kind)
        if key is not None:
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            plans[key] = plan
    return plan.run(args, kwargs, state, state_indices)


class StepPlan:
    """One call structure of ``Kernel.step``, checked in full once."""

    def __init__(self, kernel, args, kwargs, state, state_indices, error, kind):
        InputError, _kind = error, kind
        self.error = error
        self.kernel = kernel
        entry = kernel.entry
        entry_opts = set(entry.defaults) if entry else set()
        optional = set(entry.optional_inputs) if entry else set()
        call_opts = {k: v for k, v in kwargs.items() if k in entry_opts - optional}
        opts = {**kernel.options, **call_opts}
        for name in optional:
            opts[name] = kwargs.get(name) is not None
        rec = kernel.variant(**opts)
        self.rec, self.call_opts = rec, call_opts
        names = [x.name for x in rec.inputs]
        if len(args) > len(names):
            raise InputError(f"recurrence {rec.name!r} takes {len(names)} inputs "
                             f"({', '.join(names)}), got {len(args)} positional arguments")
        self.by_name = [n for n in names[len(args):] if kwargs.get(n) is not None]
        given = dict(zip(names, args))
        given.update({n: kwargs[n] for n in self.by_name})
        # where each input gets its time dim back (None: it has none)
        self.t_axis, self.opt_axes = [], []
        for n in names[:len(args)] + self.by_name:
            inp, x = rec.input(n), given[n]
            dims, left_out = inp.dims, ()
            if len(x.shape) != len(dims) - (rec.time in dims):  # an optional dim left out
                dims = tuple(d for d in dims if d not in inp.optional_dims)
                left_out = tuple(i for i, d in enumerate(inp.dims) if d in inp.optional_dims)
            self.opt_axes.append(left_out)
            if len(x.shape) != len(dims) - (rec.time in dims):
                raise InputError(f"step: input {n!r} takes its dims [{', '.join(dims)}] "
                                 f"without the time dim {rec.time!r}, got shape "
                                 f"{tuple(x.shape)}")
            self.t_axis.append(dims.index(rec.time) if rec.time in dims else None)
        self.kind = _kind(given[names[0]] if names[0] in given else args[0])
        self.o_axis = [o.dims.index(rec.time) for o in rec.outputs]
        self.o_names = [o.name for o in rec.outputs]
        self.s_names = [s.name for s in rec.states]
        # the T=1 call: checks shapes and dtypes, binds sizes
        t_args, t_kw = self._with_time(args, kwargs)
        cp = kernel._plan_call(t_args, t_kw, None)
        self.sizes = cp.runner.sizes(tuple(tuple(x.shape) for x in cp._inputs(t_args, t_kw)))
        states = self._states(state)
        self.batch_dim = rec.states[0].dims[0]
        if state_indices is not None:
            for s in rec.states:
                if s.dims[0] != self.batch_dim or rec.dim(s.dims[0]).role != "batch":
                    raise InputError(f"step: state_indices picks rows of the states' first "
                                     f"dim, which must be the batch dim; state {s.name!r} has "
                                     f"dims {list(s.dims)}")
            dt = str(state_indices.dtype)
            if "int" not in dt or len(state_indices.shape) != 1 or \
                    state_indices.shape[0] != self.sizes[self.batch_dim]:
                raise InputError(f"step: state_indices must be an integer [{self.batch_dim}="
                                 f"{self.sizes[self.batch_dim]}] tensor, got {dt} "
                                 f"{tuple(state_indices.shape)}")
        for s in rec.states:
            want = tuple(self.sizes[d] for d in s.dims)
            got = tuple(states[s.name].shape)
            ok = got == want if state_indices is None else got[1:] == want[1:]
            if not ok:
                pool = " (a pool: any first dim)" if state_indices is not None else ""
                raise InputError(f"step: state {s.name!r}: expected shape {want}{pool}, got "
                                 f"{got}")
            if _kind(states[s.name]) != self.kind:
                raise InputError(f"step: state {s.name!r} is not a {self.kind} array like "
                                 "the inputs")
            first = next(iter(given.values()))
            if self.kind == "torch" and states[s.name].device != first.device:
                raise InputError(f"step: state {s.name!r} is on {states[s.name].device}, the "
                                 f"inputs on {first.device}")
        # the dedicated step kernel: Triton, torch tensors, float32 contiguous states
        self.launcher = None
        hook = getattr(kernel.backend, "step_launcher", None)
        if hook is not None and self.kind == "torch" and all(
                v.dtype.is_floating_point and str(v.dtype) == "torch.float32"
                and v.is_contiguous() for v in states.values()):
            dtypes = tuple(str(x.dtype).replace("torch.", "")
                           for x in cp._inputs(t_args, t_kw))
            opts = {k: v for k, v in kernel.backend_options.items()
                    if k in ("block_sizes", "num_warps")}
            self.indexed = state_indices is not None
            try:  # state pools picked inside the kernel
                self.launcher = hook(cp.rec, opts, dtypes, self.indexed)
            except ValueError:  # not one program per batch row: gather/scatter the rows here
                self.indexed = False
                self.launcher = hook(cp.rec, opts, dtypes)
            self.block_sizes = opts.get("block_sizes")
            self.num_warps = opts.get("num_warps") or 4
            self.order = [x.name for x in cp.rec.inputs]
            pos = {n: i for i, n in enumerate(names[:len(args)] + self.by_name)}
            self.optional = [(self.order.index(n), self.opt_axes[i]) for n, i in pos.items()
                             if self.opt_axes[i]]

    own_step = True  # the backend's dedicated step kernel (run_step), until it cannot render

    def _run_backend_step(self, t_args, t_kw, states, state_indices):
        """The backend's dedicated step kernel on NumPy arrays (NKI: backends/nki/step.py),
        the new states copied into ``states`` (in place); None where it cannot be rendered
        (then, and for every later call of this plan, the T=1 scan)."""
        from scancc.backends.base import UnsupportedError
        names = [x.name for x in self.rec.inputs]
        given = dict(zip(names, t_args))
        given.update({k: t_kw[k] for k in self.by_name})
        torch_kind = self.kind == "torch"

        def native(v):
            return v.detach().cpu().numpy() if torch_kind else np.asarray(v)
        if state_indices is None:
            init = {k: native(v) for k, v in states.items()}
        else:
            idx = native(state_indices).astype(np.int64)
            init = {k: native(v)[idx] for k, v in states.items()}
        try:
            res = self.kernel.backend.run_step(self.rec, {k: native(v) for k, v in given.items()},
                                               self.sizes, init, self.kernel.backend_options)
        except UnsupportedError:
            self.own_step = False
            return None
        first = next(iter(given.values()))
        outs = {}
        for o in self.o_names:
            y = np.asarray(res.outputs[o])
            if torch_kind:
                import torch
                outs[o] = torch.from_numpy(y.copy()).to(dtype=first.dtype, device=first.device)
            else:
                outs[o] = y.astype(first.dtype if first.dtype.kind == "f" else np.float32)
        for k, v in states.items():
            f = np.asarray(res.final_states[k])
            if torch_kind:
                import torch
                f = torch.from_numpy(f.copy()).to(dtype=v.dtype, device=v.device)
                if state_indices is None:
                    v.copy_(f)
                else:
                    v.index_copy_(0, state_indices, f)
            elif state_indices is None:
                np.copyto(v, f)
            else:
                v[np.asarray(state_indices)] = f
        self.kernel.__dict__["_last_step_counters"] = res.counters
        return self._squeeze(outs)

    def _with_time(self, args, kwargs):
        ax = self.t_axis
        n = len(args)
        if self.kind == "torch":
            t_args = tuple(a if ax[i] is None else a.unsqueeze(ax[i]) for i, a in enumerate(args))
            t_kw = dict(kwargs)
            for j, k in enumerate(self.by_name):
                if ax[n + j] is not None:
                    t_kw[k] = kwargs[k].unsqueeze(ax[n + j])
        else:
            t_args = tuple(a if ax[i] is None else np.expand_dims(a, ax[i])
                           for i, a in enumerate(args))
            t_kw = dict(kwargs)
            for j, k in enumerate(self.by_name):
                if ax[n + j] is not None:
                    t_kw[k] = np.expand_dims(kwargs[k], ax[n + j])
        return t_args, t_kw

    def _states(self, state) -> dict:
        InputError = self.error
        if isinstance(state, Mapping):
            missing = [s for s in self.s_names if s not in state]
            if missing:
                raise InputError(f"step: state misses {missing} (states: {self.s_names})")
            return dict(state)
        if len(self.s_names) != 1:
            raise InputError(f"step: recurrence {self.rec.name!r} has states {self.s_names}: "
                             "pass state as a dict")
        return {self.s_names[0]: state}

    def _squeeze(self, outs):
        if self.kind == "torch":
            res = [outs[n].select(a, 0) for n, a in zip(self.o_names, self.o_axis)]
        else:
            res = [np.take(outs[n], 0, axis=a) for n, a in zip(self.o_names, self.o_axis)]
        return res[0] if len(res) == 1 else dict(zip(self.o_names, res))

    def run(self, args, kwargs, state, state_indices):
        t_args, t_kw = self._with_time(args, kwargs)
        states = self._states(state)
        if self.launcher is not None:
            if state_indices is None:
                sts = [states[s] for s in self.s_names]
            elif self.indexed:
                sts = [states[s] for s in self.s_names] + [state_indices]
            else:
                sts = [states[s].index_select(0, state_indices) for s in self.s_names]
            given = dict(zip(self.order, t_args))
            if t_kw:
                given.update((k, t_kw[k]) for k in self.by_name)
            ins = [given[n] for n in self.order]
            if self.optional:  # the step kernel takes every dim: size-1 optional dims back
                for i, axes in self.optional:
                    for a in axes:
                        ins[i] = ins[i].unsqueeze(a)
            outs = self.launcher(*ins, *sts, self.block_sizes, self.num_warps)
            if state_indices is not None and not self.indexed:
                for s, v in zip(self.s_names, sts):
                    states[s].index_copy_(0, state_indices, v)
            return self._squeeze(outs)
        if getattr(self.kernel.backend, "run_step", None) is not None and self.own_step:
            res = self._run_backend_step(t_args, t_kw, states, state_indices)
            if res is not None:
                return res
        # the T=1 scan of the kernel's backend
        if state_indices is None:
            init = states
        elif self.kind == "torch":
            init = {k: v.index_select(0, state_indices) for k, v in states.items()}
        else:
            init = {k: v[np.asarray(state_indices)] for k, v in states.items()}
        if self.kind == "torch":
            import torch
            with torch.no_grad():
                out, fin = self.kernel(*t_args, initial_state=init, output_final_state=True,
                                       **t_kw)
        else:
            out, fin = self.kernel(*t_args, initial_state=init, output_final_state=True,
                                   **t_kw)
        fin = fin if isinstance(fin, Mapping) else {self.s_names[0]: fin}
        for k, v in states.items():
            if self.kind == "torch":
                if state_indices is None:
                    v.copy_(fin[k])
                else:
                    v.index_copy_(0, state_indices, fin[k].to(v.dtype))
            elif state_indices is None:
                np.copyto(v, fin[k])
            else:
                v[np.asarray(state_indices)] = fin[k]
        out = out if isinstance(out, Mapping) else {self.o_names[0]: out}
        return self._squeeze(out)


__all__ = ["step", "StepPlan"]
