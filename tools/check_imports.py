"""Check that scancc's layers import downward only, with no import cycles.

    python tools/check_imports.py [ROOT]

Builds the module import graph of the project from source (every import statement, also
those inside functions or under ``if TYPE_CHECKING:``: a lazy import is still a dependency;
relative imports resolved; ``importlib.import_module("...")`` with a literal name counted
too) and reports

- every import cycle: a strongly connected component of more than one module;
- every upward import across the layers

      scancc.ir  <-  scancc.ir.passes  <-  scancc.backends  <-  scancc (the frontend)

  i.e. the IR importing anything else of the project, the IR core importing its passes,
  a backend importing the frontend, and product code importing the test utilities
  (``scancc.testing``; only ``scancc check`` may, see TEST_UTILITY_USERS).

Prints one line per violation and a summary; exits 1 on any violation, 2 if the tree cannot
be read, else 0. Standard library only, so it runs before the project is installed.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"ir": "scancc.ir", "backends": "scancc.backends", "scancc": "scancc"}
IR, PASSES, BACKENDS, FRONTEND = "scancc.ir", "scancc.ir.passes", "scancc.backends", "scancc"
TESTING = "scancc.testing"
# `scancc check` is the portability test runner shipped to users: it compares backends with
# the test utilities' tolerance table, so it is the one product module that may import them
TEST_UTILITY_USERS = {"scancc.check"}


class CheckError(Exception):
    """The tree could not be checked (exit status 2, unlike a violation's 1)."""


@dataclass(frozen=True)
class Import:
    src: str      # importing module
    dst: str      # imported module of the project
    path: str     # file of the import, relative to the root
    line: int


@dataclass
class Report:
    modules: dict[str, str] = field(default_factory=dict)    # module -> file (relative)
    imports: list[Import] = field(default_factory=list)
    cycles: list[frozenset[str]] = field(default_factory=list)
    upward: list[tuple[Import, str]] = field(default_factory=list)  # (import, rule broken)

    @property
    def ok(self) -> bool:
        return not self.cycles and not self.upward


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def layer(mod: str) -> str:
    """The layer a module of the project belongs to."""
    if _under(mod, PASSES):
        return "passes"
    if _under(mod, IR):
        return "ir"
    if _under(mod, BACKENDS):
        return "backends"
    return "frontend"


def find_modules(root: Path) -> dict[str, Path]:
    """Every module of the project: dotted name -> file."""
    out = {}
    for folder, pkg in PACKAGES.items():
        base = root / folder
        if not base.is_dir():
            continue
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((pkg,) + rel)] = f
    return out


def _resolve_relative(mod: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` inside ``mod``."""
    parts = mod.split(".")
    if not is_package:
        parts = parts[:-1]  # a module's relative imports start from its package
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _project(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the project that importing ``name`` runs: the longest known prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path], root: Path) -> list[Import]:
    """The project modules ``mod`` imports, with the line of each import."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise CheckError(f"cannot parse {path}: {e}") from None
    is_package = path.name == "__init__.py"
    rel = path.relative_to(root).as_posix()
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(mod, is_package, node.level, node.module) if node.level
                    else node.module or "")
            # `from pkg import name` imports pkg.name when that is a module, else pkg
            names += [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base,
                       node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.append((node.args[0].value, node.lineno))
    out: dict[Import, None] = {}  # ordered set: `from .m import a, b` is one import of m
    for name, line in names:
        dst = _project(name, modules)
        if dst is not None and dst != mod:
            out[Import(mod, dst, rel, line)] = None
    return list(out)


def _is_import_call(f: ast.expr) -> bool:
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


def upward_rule(imp: Import) -> str | None:
    """Why an import goes up across the layers, or None if it goes down (or sideways)."""
    src, dst = imp.src, imp.dst
    ls, ld = layer(src), layer(dst)
    if ls == "ir" and ld == "passes":
        return "the IR core must not import its passes (passes import the IR)"
    if ls in ("ir", "passes") and ld not in ("ir", "passes"):
        return "the IR must not import the rest of the project"
    if ls == "backends" and ld == "frontend":
        return "a backend must not import the frontend (only scancc.ir and scancc.backends)"
    if _under(dst, TESTING) and not _under(src, TESTING) and src not in TEST_UTILITY_USERS:
        return "product code must not import the test utilities (scancc.testing)"
    return None


def strongly_connected(nodes, edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (deep import chains must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def check(root: str | Path) -> Report:
    """Build the import graph of the project at ``root`` and find its cycles and upward imports."""
    root = Path(root).resolve()
    modules = find_modules(root)
    rep = Report({m: p.relative_to(root).as_posix() for m, p in modules.items()})
    for mod, path in modules.items():
        rep.imports += imports_of(mod, path, modules, root)
    edges: dict[str, set[str]] = {}
    for imp in rep.imports:
        edges.setdefault(imp.src, set()).add(imp.dst)
    rep.cycles = [frozenset(c) for c in strongly_connected(sorted(modules), edges) if len(c) > 1]
    rep.upward = [(imp, why) for imp in rep.imports if (why := upward_rule(imp))]
    return rep


def format_report(rep: Report) -> str:
    lines = []
    for comp in sorted(rep.cycles, key=sorted):
        lines.append(f"cycle: {' <-> '.join(sorted(comp))}")
        lines += [f"    {i.path}:{i.line}: {i.src} imports {i.dst}"
                  for i in sorted(rep.imports, key=lambda i: (i.path, i.line))
                  if i.src in comp and i.dst in comp]
    for imp, why in sorted(rep.upward, key=lambda u: (u[0].path, u[0].line)):
        lines.append(f"upward: {imp.path}:{imp.line}: {imp.src} imports {imp.dst}: {why}")
    edges = {(i.src, i.dst) for i in rep.imports}
    verdict = "ok" if rep.ok else "FAILED"
    lines.append(f"{verdict}: {len(rep.modules)} modules, {len(edges)} imports between them; "
                 f"{len(rep.cycles)} import cycle(s), {len(rep.upward)} upward import(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent),
                    help="the project root, holding ir/, backends/ and scancc/ (default: "
                         "this checkout)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not any((root / f).is_dir() for f in PACKAGES):
        print(f"error: {root} has none of the folders {', '.join(PACKAGES)}", file=sys.stderr)
        return 2
    try:
        rep = check(root)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(rep))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
