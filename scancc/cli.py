"""The ``scancc`` command line: list, show, compile, check, backends."""
from __future__ import annotations

import argparse
import os
import sys

import yaml

from scancc import backends

from . import registry
from .api import _resolve, compile
from .registry import Entry


def _options(pairs: list[str] | None, flag: str = "--option") -> dict:
    """``--option k=v`` pairs; values are read as YAML scalars (true, 3, 0.5, null, [a, b],
    {time: 16})."""
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise SystemExit(f"scancc: {flag} expects KEY=VALUE, got {p!r}")
        out[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return out


def _split_options(a, entries: list, targets: list[str]) -> tuple[dict, dict]:
    """(recurrence options, backend options by target) from ``--option`` and
    ``--backend-option``. An ``--option`` is the recurrence's where a recurrence has that
    name, else a backend option of every target that declares it; ``--backend-option
    [BACKEND.]KEY=VALUE`` is a backend option only (of BACKEND, or of every target declaring
    KEY)."""
    rec_names = {k for e in entries if e is not None for k in e.defaults}
    declared = {t: backends.get(t).options for t in targets}
    rec_opts, by_target = {}, {t: {} for t in targets}
    for key, v in _options(getattr(a, "backend_option", None), "--backend-option").items():
        b, dot, k = key.rpartition(".")
        if dot and b not in targets:
            raise SystemExit(f"scancc: --backend-option {key}: {b!r} is not a target here "
                             f"(targets: {', '.join(targets)})")
        owners = [b] if dot else [t for t in targets if k in declared[t]]
        if not owners or any(k not in declared[t] for t in owners):
            known = "; ".join(f"{t}: {', '.join(declared[t]) or 'none'}" for t in targets)
            raise SystemExit(f"scancc: --backend-option {key}: no target here has a backend "
                             f"option {k!r} (backend options: {known})")
        for t in owners:
            by_target[t][k] = v
    for k, v in _options(a.option).items():
        owners = [t for t in targets if k in declared[t] and k not in by_target[t]]
        if k in rec_names and owners:
            raise SystemExit(f"scancc: --option {k}: both a recurrence option and a "
                             f"{'/'.join(owners)} backend option; give the backend's with "
                             f"--backend-option {k}=... (then --option {k}=... is the "
                             "recurrence's)")
        if owners and k not in rec_names:
            for t in owners:
                by_target[t][k] = v
        else:  # the recurrence's (compile() names it if no recurrence takes it)
            rec_opts[k] = v
    return rec_opts, {t: o for t, o in by_target.items() if o}


def _load_specs(paths: list[str] | None) -> None:
    if not paths:
        return
    from .spec import register_spec
    for p in paths:
        register_spec(p, override=True)


def _is_spec(s: str) -> bool:
    return s.endswith((".yaml", ".yml")) or (os.sep in s and not _is_py(s))


def _is_py(s) -> bool:
    return isinstance(s, str) and s.endswith(".py")


def _import(what: str) -> list[str]:
    """Import a Python module, by file path (``my_ema.py``) or module name (``pkg.mod``,
    found from the current directory too), so that its ``@scancc.register`` calls run; the
    names of the recurrences it registered."""
    import importlib
    import importlib.util
    before = {n: registry.get(n) for n in registry.names()}
    try:
        if _is_py(what) or os.path.isfile(what):
            path = os.path.abspath(what)
            if not os.path.isfile(path):
                raise SystemExit(f"scancc: --import {what}: no such file")
            stem = os.path.splitext(os.path.basename(path))[0]
            mod = next((m for m in list(sys.modules.values())
                        if getattr(m, "__file__", None) == path), None)
            if mod is None:
                spec = importlib.util.spec_from_file_location(stem, path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules.setdefault(stem, mod)
                spec.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(what)
    except SystemExit:
        raise
    except Exception as e:  # the module's own error, said as such
        raise SystemExit(f"scancc: --import {what}: {type(e).__name__}: {e}") from e
    new = [n for n in registry.names() if before.get(n) is not registry.get(n)]
    return new or [n for n in registry.names()
                   if getattr(registry.get(n).builder, "__module__", None) == mod.__name__]


def _from_py(what: str) -> str:
    """A ``.py`` NAME argument: import it; the one recurrence it registers."""
    got = _import(what)
    if len(got) != 1:
        raise SystemExit(f"scancc: {what} registers {len(got)} recurrences "
                         f"({', '.join(got) or 'none'}); give --import {what} and one name")
    return got[0]


def _load(a) -> None:
    """--spec files registered, --import modules imported, ``.py`` NAME arguments imported
    and replaced by the recurrence they register (by all of them, for check)."""
    _load_specs(getattr(a, "spec", None))
    for m in getattr(a, "imports", None) or []:
        _import(m)
    what = getattr(a, "what", None)
    if isinstance(what, str) and _is_py(what):
        a.what = _from_py(what)
    elif isinstance(what, list):
        a.what = [n for w in what for n in (_import(w) if _is_py(w) else [w])]


def _option_text(e: Entry) -> tuple[str, str]:
    """(options as KEY=DEFAULT, optional inputs) of a registration, for list and show."""
    opts = ", ".join(f"{k}={v!r}" for k, v in e.defaults.items() if k not in e.optional_inputs)
    return opts, ", ".join(e.optional_inputs)


def cmd_list(a) -> int:
    _load(a)
    rows = []
    for n in registry.names():
        e = registry.get(n)
        try:
            rec = e.build()
            kinds = ", ".join(f"{s.name}:{s.transition.kind.value}" for s in rec.states)
            ins = ", ".join(i.name for i in rec.inputs)
        except Exception as ex:  # a broken user registration is listed, not fatal
            kinds, ins = f"(does not build: {ex})", ""
        opts, optional = _option_text(e)
        if optional:  # optional inputs are left out of a default build: say them
            ins = f"{ins} [optional: {optional}]" if ins else f"[optional: {optional}]"
        rows.append((n, e.origin, kinds, ins, opts or "-"))
    head = ("name", "origin", "states", "inputs", "options")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head] + rows:
        print("  ".join(r[i].ljust(w[i]) for i in range(4)) + f"  {r[4]}")
    return 0


def _backward_ir(k):
    from .autograd import adjoint
    return adjoint(k.ir).backward


def _compile(what, target, options=None, **rec_opts):
    """compile(), with a builder's own error (e.g. ``float('abc')`` for ``--option
    scale=abc``) naming the recurrence options it was given."""
    from scancc.ir import IRError
    try:
        return compile(what, target, options=options, **rec_opts)
    except (ValueError, TypeError) as e:
        if not rec_opts or isinstance(e, IRError) or any(f"{k}" in str(e) for k in rec_opts):
            raise
        given = ", ".join(f"--option {k}={v!r}" for k, v in rec_opts.items())
        raise ValueError(f"recurrence {what!r} with {given}: {e}") from e


def cmd_show(a) -> int:
    _load(a)
    k = _compile(a.what, "reference", **_options(a.option))
    entry = _resolve(a.what)[0]
    if entry is not None and not a.backward:  # what the IR does not say: comments, so it
        # still parses (the backward's text is the derived recurrence alone)
        opts, optional = _option_text(entry)
        if opts:
            print(f"# options (--option KEY=VALUE; defaults): {opts}")
        if optional:
            print(f"# optional inputs (--option NAME=true to include): {optional}")
    print(_backward_ir(k) if a.backward else k.ir, end="")
    return 0


def cmd_compile(a) -> int:
    _load(a)
    rec_opts, backend_opts = _split_options(a, [_resolve(a.what)[0]], [a.target])
    k = _compile(a.what, a.target, options=backend_opts, **rec_opts)
    if a.backward:  # the derived backward recurrence, lowered like any recurrence
        k = compile(_backward_ir(k), a.target, options=k.backend_options)
    src = k.source
    if src is None:  # the reference backend interprets the IR: its program is the IR text
        src = str(k.ir)
    if a.output:
        with open(a.output, "w") as f:
            f.write(src)
        print(f"wrote {a.output} ({a.target}, {k.name})", file=sys.stderr)
    else:
        sys.stdout.write(src)
    return 0


def cmd_check(a) -> int:
    from .check import main_check
    _load(a)
    items: list = list(a.what or [])
    if a.all or not items:
        items = [registry.get(n) for n in registry.names()] + [
            x for x in items if _is_spec(x)]
    # fail early, with the spec error, on a bad name or path
    entries = [x if isinstance(x, Entry) else _resolve(x)[0] for x in items]
    targets = a.targets.split(",") if a.targets else [
        n for n, ok, _ in backends.report() if ok]
    for t in targets:
        backends.get(t)
    rec_opts, backend_opts = _split_options(a, entries, targets)
    if backend_opts:  # compile() takes them by backend name: each target gets its own
        rec_opts["options"] = backend_opts
    from .check import TOLERANCES  # the dtypes check knows (cli may not import testing)
    dtypes = [d.strip() for d in a.dtypes.split(",")]
    bad = [d for d in dtypes if d not in TOLERANCES]
    if bad:
        raise SystemExit(f"scancc check: --dtypes: unknown dtype {', '.join(map(repr, bad))} "
                         f"(known: {', '.join(TOLERANCES)})")
    if a.T is not None and a.T < 1:
        raise SystemExit(f"scancc check: --T must be at least 1, got {a.T}")
    sizes = {}
    for k, v in _options(a.size, "--size").items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SystemExit(f"scancc check: --size {k}={v!r}: a size is an integer >= 1")
        sizes[k] = v
    if sizes:
        dims = {d.name for e in items for d in _build(e).dims}
        bad = [k for k in sizes if k not in dims]
        if bad:
            raise SystemExit(f"scancc check: --size {', '.join(bad)}: not a dim of any "
                             f"recurrence checked (dims: {', '.join(sorted(dims))})")
    return main_check(items, targets, dtypes, a.T, a.seed, options=rec_opts,
                      backward=a.backward, dim_sizes=sizes, with_variants=not a.no_variants)


def _build(item):
    """The IR of a check item (an Entry or a name/spec path), at its default options."""
    if isinstance(item, Entry):
        opts = {o: True for o in item.optional_inputs}
        return item.build(**opts)
    return compile(item, "reference").ir


def cmd_backends(a) -> int:
    _load(a)
    for n, ok, why in backends.report():
        print(f"{n:<10} {'available' if ok else 'unavailable':<12} {why}")
        if a.options:  # the declared backend options: name, what it accepts (default), doc
            for o in backends.get(n).options.values():
                print(f"    {o.name:<14} {o.expected()} (default {o.default!r}): {o.doc}")
    try:
        import torch
        here = "a GPU here" if torch.cuda.is_available() else "no GPU here: torch tensors run on torch"
    except ImportError:
        here = "torch not installed"
    print(f"default (compile's target='auto'): reference for NumPy arrays, triton for CUDA "
          f"tensors, torch for other torch tensors ({here})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scancc", description="A compiler for state-space scans: "
                                "one IR, lowered to NumPy (reference), PyTorch, Triton and NKI.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, what=True, nargs=None, backend_opts=False):
        if what:
            sp.add_argument("what", nargs=nargs, metavar="NAME|SPEC",
                            help="a registered recurrence name, a YAML spec path, or a .py "
                                 "file that registers one (imported first)")
        sp.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a recurrence option, e.g. --option dt_softplus=true, or a "
                             "backend option no recurrence option shares a name with, e.g. "
                             "--option chip=trn2 (values are YAML: true, 3, [0, 6], {time: 16})")
        if backend_opts:
            sp.add_argument("--backend-option", action="append", metavar="[BACKEND.]KEY=VALUE",
                            help="a backend option only, e.g. --backend-option nki.chip=trn2 "
                                 "(without BACKEND.: for every target that has KEY)")
        sp.add_argument("--spec", action="append", metavar="FILE",
                        help="register the recurrence a YAML spec defines first")
        imports(sp)

    def imports(sp):
        sp.add_argument("--import", dest="imports", action="append", metavar="MODULE|FILE.py",
                        help="import a Python module first (a dotted name, found from the "
                             "current directory too, or a .py path) so that its "
                             "@scancc.register calls run; a .py path as NAME does the same")

    sp = sub.add_parser("list", help="list registered recurrences")
    sp.add_argument("--spec", action="append", metavar="FILE",
                    help="also register the recurrence a YAML spec defines")
    imports(sp)
    sp.set_defaults(fn=cmd_list)
    sp = sub.add_parser("show", help="print a recurrence's IR in the text form")
    common(sp)
    sp.add_argument("--backward", action="store_true",
                    help="print the derived backward recurrence instead")
    sp.set_defaults(fn=cmd_show)
    sp = sub.add_parser("compile", help="write a recurrence's kernel source for a target")
    common(sp, backend_opts=True)
    sp.add_argument("--target", default="reference", choices=backends.names())
    sp.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    sp.add_argument("--backward", action="store_true",
                    help="compile the derived backward recurrence instead")
    sp.set_defaults(fn=cmd_compile)
    sp = sub.add_parser("check", help="run each backend against the reference on random "
                        "inputs and print a table of errors (exit 1 on any failure)")
    common(sp, nargs="*", backend_opts=True)
    sp.add_argument("--all", action="store_true", help="every registered recurrence")
    sp.add_argument("--targets", help="comma-separated backends (default: all available)")
    sp.add_argument("--dtypes", default="float32",
                    help="comma-separated input dtypes (default float32)")
    sp.add_argument("--T", type=int, default=None, help="sequence length (default 64)")
    sp.add_argument("--size", action="append", metavar="DIM=N",
                    help="the size of a dim, e.g. --size key=32 --size kc=5 (default: "
                         "scancc.ir.default_sizes; --T sets the time dim)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--backward", action="store_true",
                    help="check gradients instead: each target's forward, recompute and "
                         "backward kernels against the reference (float32; T crosses chunks)")
    sp.add_argument("--no-variants", action="store_true",
                    help="check each recurrence at its default options only (by default a "
                         "recurrence with grouped_value_heads, kda and gated_delta_net, is "
                         "checked with it on too)")
    sp.set_defaults(fn=cmd_check)
    sp = sub.add_parser("backends", help="list backends and whether they run here")
    sp.add_argument("--options", action="store_true",
                    help="also list each backend's options (--option / --backend-option)")
    imports(sp)
    sp.set_defaults(fn=cmd_backends)
    return p


def main(argv: list[str] | None = None) -> int:
    from scancc.ir import IRError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (IRError, ValueError, TypeError, OSError) as e:
        if os.environ.get("SCANCC_DEBUG"):
            raise
        print(f"scancc {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
