"""YAML layer specs: instantiate a registered recurrence, or define a new one as data.

    use: mamba2                      # form (a): a registered recurrence with options
    options: {dt_softplus: true}

    name: leaky                      # form (b): a new recurrence
    dims: {batch: batch, time: time, chan: feature}
    inputs: {x: [batch, time, chan], g: [batch, time, chan]}
    states: {h: {dims: [batch, chan], transition: diagonal(decay=sigmoid(g)), inject: x}}
    outputs: {y: {dims: [batch, time, chan], expr: h}}

Specs are data: YAML is read with a SafeLoader subclass (it only adds source positions and
rejects duplicate keys), every name passes ``check_ident``, and expressions go through the
IR's whitelist parser (``ExprParser`` / ``parse_transition``), never through Python. Every
error is a ``SpecError`` that starts with ``file:line[:col]``. See docs/spec.md.
"""
from __future__ import annotations

import difflib
import os
import re
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from scancc.ir import (Dim, ExprParser, Input, IRError, Let, Node, Numerics, Op, Output,
                       ParseError, Recurrence, State, VerifyError, check_ident)
from scancc.ir.printer import parse_transition
from scancc.ir.recurrence import ROLES
from scancc.ir.verify import verify

from . import registry
from .registry import Entry, RegistryError
from .sampling import SAMPLERS

_MERGE = "tag:yaml.org,2002:merge"
INSTANTIATE_KEYS = ("use", "name", "doc", "options")
DEFINE_KEYS = ("name", "doc", "dims", "inputs", "lets", "states", "outputs", "numerics",
               "hints")
_DEFINE_REQUIRED = ("name", "dims", "inputs", "states", "outputs")


class SpecError(IRError):
    """A spec file is malformed. ``str()`` starts with ``file:line[:col]:``."""

    def __init__(self, path: str, line: int | None, col: int | None, message: str):
        self.path, self.line, self.col, self.message = path, line, col, message
        loc = path + (f":{line}" if line is not None else "") + (
            f":{col}" if line is not None and col is not None else "")
        super().__init__(f"{loc}: {message}")


@dataclass
class Spec:
    """A loaded spec: ``entry`` is the recurrence family, ``options`` the options it sets."""
    path: str
    entry: Entry
    options: dict[str, Any] = field(default_factory=dict)
    top: Any = field(default=None, repr=False, compare=False)  # the YAML mapping, for errors

    def recurrence(self) -> Recurrence:
        return self.entry.build(**self.options)


# ---- the YAML layer: safe loading that remembers where every key and value is ----

class _Map(dict):
    """A YAML mapping; ``key_nodes``/``value_nodes`` hold the YAML node of each key and value
    (for positions in errors)."""
    node: yaml.Node
    key_nodes: dict[str, yaml.Node]
    value_nodes: dict[str, yaml.Node]


class _Seq(list):
    """A YAML sequence; ``items`` holds the YAML node of each item."""
    node: yaml.Node
    items: list[yaml.Node]


class _Loader(yaml.SafeLoader):
    path = "<string>"


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"number {v!r}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    m = _Map()
    m.node, m.key_nodes, m.value_nodes = node, {}, {}
    seen: dict[str, yaml.Node] = {}
    for knode, _ in node.value:  # before merging, so '<<' defaults are not duplicates
        if knode.tag == _MERGE:
            continue
        k = _key(loader, knode)
        if k in seen:
            line = seen[k].start_mark.line + 1
            raise SpecError(loader.path, *_pos(knode),
                            f"duplicate key {k!r} (first given at line {line}): expected each "
                            "key once in a mapping")
        seen[k] = knode
    loader.flatten_mapping(node)
    for knode, vnode in node.value:
        k = _key(loader, knode)
        m[k] = loader.construct_object(vnode, deep=True)
        m.key_nodes[k], m.value_nodes[k] = knode, vnode
    return m


def _key(loader: _Loader, knode: yaml.Node) -> str:
    if not isinstance(knode, yaml.ScalarNode):
        raise SpecError(loader.path, *_pos(knode), "expected a name as mapping key, found "
                        + ("a list" if isinstance(knode, yaml.SequenceNode) else "a mapping"))
    k = loader.construct_object(knode)
    if not isinstance(k, str):
        raise SpecError(loader.path, *_pos(knode),
                        f"expected a name as mapping key, found {_describe(k)} (YAML reads "
                        "yes/no/on/off/true/false/null and numbers as non-strings: quote it)")
    return k


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq(loader.construct_object(v, deep=True) for v in node.value)
    s.node, s.items = node, list(node.value)
    return s


# YAML 1.1 reads 1e-3 (no dot) as a string; read it as the number everyone means
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _reader_error(text: str, path: str, e: yaml.reader.ReaderError) -> SpecError:
    """A character YAML does not accept (NUL, other control characters): its line/column."""
    pos = e.position if isinstance(e.position, int) else 0
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    ch = e.character
    code = ord(ch) if isinstance(ch, str) and len(ch) == 1 else ch
    what = f"U+{code:04X}" if isinstance(code, int) else repr(code)
    return SpecError(path, line, col, f"invalid YAML: character {what} is not allowed in a spec "
                     "(control characters other than tab and newline are rejected)")


def _read_yaml(text: str, path: str) -> Any:
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as e:
        raise _reader_error(text, path, e) from None
    loader.path = path
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(s for s in (e.context, e.problem) if s)
        if "flow sequence" in what and "got '?'" in what:
            what += (" (in [...] a '?' ending an optional dim must be quoted: write "
                     "[batch, 'groups?'], or use {dims: [batch, groups], optional: [groups]})")
        raise SpecError(path, mark.line + 1 if mark else None,
                        mark.column + 1 if mark else None, f"invalid YAML: {what}") from None
    except yaml.reader.ReaderError as e:
        raise _reader_error(text, path, e) from None
    except yaml.YAMLError as e:
        raise SpecError(path, None, None, f"invalid YAML: {e}") from None
    except RecursionError:
        raise SpecError(path, None, None, "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


# ---- helpers shared by both forms ----

class _Source:
    def __init__(self, path: str):
        self.path = path

    def fail(self, node: yaml.Node | None, msg: str, col: bool = True):
        line, c = _pos(node) if node is not None else (None, None)
        raise SpecError(self.path, line, c if col else None, msg)

    def check_keys(self, m: _Map, allowed, what: str, required=()) -> None:
        for k in m:
            if k not in allowed:
                close = difflib.get_close_matches(k, allowed, 1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(m.key_nodes[k], f"unknown key {k!r} in {what}{hint}: expected one of "
                                     f"{', '.join(allowed)}")
        for k in required:
            if k not in m:
                self.fail(m.node, f"{what} is missing the key {k!r} (required: "
                                  f"{', '.join(required)})")

    def mapping(self, m: _Map, key: str, what: str, optional: bool = False) -> _Map:
        v = m.get(key)
        if v is None and optional:
            empty = _Map()
            empty.node, empty.key_nodes, empty.value_nodes = m.value_nodes.get(key, m.node), {}, {}
            return empty
        if not isinstance(v, dict):
            self.fail(m.value_nodes[key], f"{what}: expected a mapping, found {_describe(v)}")
        return v

    def string(self, m: _Map, key: str, what: str) -> str:
        v = m[key]
        if not isinstance(v, str):
            self.fail(m.value_nodes[key], f"{what}: expected a string, found {_describe(v)}")
        # a YAML escape ("\0", "\x1b") passes the reader: specs are text, reject it here
        bad = next((c for c in v if c not in "\t\n" and unicodedata.category(c) in ("Cc", "Cs")),
                   None)
        if bad is not None:
            self.fail(m.value_nodes[key], f"{what}: contains the control character "
                      f"U+{ord(bad):04X}: expected printable text (tabs and newlines allowed)")
        return v

    def name(self, node: yaml.Node, v: Any, what: str) -> str:
        if not isinstance(v, str):
            self.fail(node, f"{what}: expected a name, found {_describe(v)}"
                      + (" (YAML reads yes/no/on/off/true/false/null as non-strings: quote "
                         "it)" if v is None or isinstance(v, bool) else ""))
        try:
            return check_ident(v, what)
        except IRError as e:
            self.fail(node, str(e))


# ---- form (a): use a registered recurrence ----

def _option_value(src: _Source, node: yaml.Node, key: str, v: Any, base: Entry) -> Any:
    """Check ``v`` with the recurrence's own option check (``Entry.declared_options``, as on
    the Python path); lists become tuples."""
    if isinstance(v, list):
        bad = [x for x in v if isinstance(x, (list, dict))]
        if bad:
            src.fail(node, f"option {key!r}: expected a flat list of values, found a nested "
                           f"{_describe(bad[0])}")
        v = tuple(v)
    if isinstance(v, dict):
        src.fail(node, f"option {key!r}: expected a value, found a mapping")
    v, problem = base.declared_options()[key].convert(v)
    if problem is not None:
        src.fail(node, f"option {key!r}: expected {problem.expected}, found {_describe(v)}")
    return v


def _instantiate(src: _Source, top: _Map) -> Spec:
    src.check_keys(top, INSTANTIATE_KEYS, "an instantiate spec (one with 'use:')")
    use = src.name(top.value_nodes["use"], top["use"], "use")
    try:
        base = registry.get(use)
    except RegistryError as e:
        src.fail(top.value_nodes["use"], f"use: {e}")
    opts = src.mapping(top, "options", "options", optional=True)
    options = {}
    for k, v in opts.items():
        if k not in base.defaults or k in base.optional_inputs:
            known = ", ".join(f"{o}={d!r}" for o, d in base.defaults.items()
                              if o not in base.optional_inputs) or "none"
            why = (f"{k!r} is an optional input of {use!r}: pass it when calling the kernel"
                   if k in base.optional_inputs else f"{use!r} has no option {k!r}")
            src.fail(opts.key_nodes[k], f"{why} (options: {known})")
        options[k] = _option_value(src, opts.value_nodes[k], k, v, base)
    where = top.value_nodes.get("options", top.value_nodes["use"])
    try:
        base.build(**options)
    except (IRError, ValueError, TypeError) as e:
        src.fail(where, f"{use!r} rejects these options: {e}")
    if "name" not in top:
        if "doc" in top:
            src.fail(top.key_nodes["doc"], "doc: only a spec with its own 'name:' takes a doc")
        return Spec(src.path, base, options, top)
    name = src.name(top.value_nodes["name"], top["name"], "recurrence name")
    doc = src.string(top, "doc", "doc") if "doc" in top else base.doc

    def builder(**opts: Any) -> Recurrence:
        return verify(replace(base.build(**opts), name=name, doc=doc.split("\n\n")[0]))
    entry = Entry(name, builder, {**base.defaults, **options}, base.optional_inputs, doc,
                  src.path, dict(base.hints))
    return Spec(src.path, entry, options, top)


# ---- form (b): define a recurrence ----

class _Define:
    def __init__(self, src: _Source, top: _Map):
        self.src, self.top = src, top
        self.symbols: dict[str, Node] = {}
        self.owner: dict[str, tuple[str, yaml.Node]] = {}  # name -> (what, key node)
        self.locs: dict[tuple[str, str], dict[str, yaml.Node]] = {}

    def declare(self, m: _Map, key: str, what: str) -> str:
        node = m.key_nodes[key]
        name = self.src.name(node, key, what)
        if name in self.owner:
            other, onode = self.owner[name]
            self.src.fail(node, f"{what} {name!r}: name already used by the {other} at line "
                                f"{onode.start_mark.line + 1} (dims, inputs, lets, states and "
                                "outputs share one namespace)")
        self.owner[name] = (what, node)
        return name

    def dim_list(self, m: _Map, key: str, what: str, optional_ok: bool = False):
        """A list of declared dims; with ``optional_ok`` a trailing '?' marks optional dims."""
        v, vnode = m[key], m.value_nodes[key]
        if not isinstance(v, list):
            self.src.fail(vnode, f"{what}: expected a list of dims like [batch, time], found "
                                 f"{_describe(v)}")
        dims, optional = [], []
        for item, inode in zip(v, v.items):
            if isinstance(item, str) and item.endswith("?") and optional_ok:
                item = item[:-1]
                optional.append(item)
            if not isinstance(item, str) or item not in self.dims:
                self.src.fail(inode, f"{what}: expected one of the declared dims "
                                     f"({', '.join(self.dims)}), found {_describe(item)}")
            if item in dims:
                self.src.fail(inode, f"{what}: dim {item!r} is listed twice")
            dims.append(item)
        return tuple(dims), tuple(optional)

    def input_dims(self, imap: _Map, key: str, name: str):
        """``[batch, groups?, n]`` or ``{dims: [batch, groups, n], optional: [groups]}``."""
        v = imap[key]
        if not isinstance(v, dict):
            return self.dim_list(imap, key, f"input {name!r}", optional_ok=True)
        self.src.check_keys(v, ("dims", "optional"), f"input {name!r}", ("dims",))
        dims, marked = self.dim_list(v, "dims", f"input {name!r} dims", optional_ok=True)
        optional = list(marked)
        if v.get("optional") is not None:
            opt, _ = self.dim_list(v, "optional", f"input {name!r} optional")
            for d, node in zip(opt, v["optional"].items):
                if d not in dims:
                    self.src.fail(node, f"input {name!r} optional: expected one of its dims "
                                        f"({', '.join(dims)}), found {d!r}")
            optional += [d for d in opt if d not in optional]
        return dims, tuple(d for d in dims if d in optional)

    def expr(self, m: _Map, key: str, what: str) -> Node:
        text, node = self.text(m, key, what)
        return self.parsed(node, what, lambda line, col0: self.parser.parse(text, line, col0))

    def text(self, m: _Map, key: str, what: str) -> tuple[str, yaml.Node]:
        v, node = m[key], m.value_nodes[key]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = repr(float(v))
        if not isinstance(v, str):
            self.src.fail(node, f"{what}: expected an expression string, found {_describe(v)}")
        return v, node

    def parsed(self, node: yaml.ScalarNode, what: str, parse):
        """Run ``parse(line, col0)`` so parse errors point at the file's line and column."""
        one_line = node.start_mark.line == node.end_mark.line and node.style in (None, "'", '"')
        col0 = node.start_mark.column + (1 if node.style in ("'", '"') else 0)
        try:
            return parse(node.start_mark.line + 1, col0)
        except ParseError as e:
            raise SpecError(self.src.path, e.line, e.col if one_line else None,
                            f"{what}: {e.message}") from None
        except RecursionError:
            self.src.fail(node, f"{what}: expected an expression, found one nested too deeply",
                          one_line)

    def build(self) -> Recurrence:
        src, top = self.src, self.top
        src.check_keys(top, DEFINE_KEYS, "a spec", _DEFINE_REQUIRED)
        self.name = src.name(top.value_nodes["name"], top["name"], "recurrence name")
        doc = src.string(top, "doc", "doc") if "doc" in top else ""

        dims = []
        dmap = src.mapping(top, "dims", "dims")
        for k, v in dmap.items():
            name = self.declare(dmap, k, "dim")
            vnode = dmap.value_nodes[k]
            role, size = v, None
            if isinstance(v, dict):
                src.check_keys(v, ("role", "size"), f"dim {name!r}")
                role, size = v.get("role", "feature"), v.get("size")
                vnode = v.value_nodes.get("role", vnode)
                if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
                    src.fail(v.value_nodes["size"], f"dim {name!r} size: expected a positive "
                                               f"integer, found {_describe(size)}")
            if role not in ROLES:
                src.fail(vnode, f"dim {name!r}: expected a role ({', '.join(ROLES)}) or "
                                f"{{role: ..., size: ...}}, found {_describe(role)}")
            dims.append(Dim(name, role, size))
            self.locs["dim", name] = {"key": dmap.key_nodes[k]}
        self.dims = [d.name for d in dims]
        self.parser = ExprParser(self.symbols.get, set(self.dims))

        inputs = []
        imap = src.mapping(top, "inputs", "inputs")
        for k in imap:
            name = self.declare(imap, k, "input")
            ds, opt = self.input_dims(imap, k, name)
            inputs.append(Input(name, ds, opt))
            self.symbols[name] = Node(Op.INPUT, (), name)
            self.locs["input", name] = {"key": imap.key_nodes[k], "dims": imap.value_nodes[k]}

        lets = []
        lmap = src.mapping(top, "lets", "lets", optional=True)
        for k in lmap:
            name = self.declare(lmap, k, "let")
            lets.append(Let(name, self.expr(lmap, k, f"let {name!r}")))
            self.symbols[name] = Node(Op.PARAM, (), name)  # later lets and exprs may read it
            self.locs["let", name] = {"key": lmap.key_nodes[k], "expr": lmap.value_nodes[k]}

        smap = src.mapping(top, "states", "states")
        for k in smap:  # every state is a name before any expression is parsed
            name = self.declare(smap, k, "state")
            self.symbols[name] = Node(Op.STATE, (), name)
        states = [self.state(smap, k) for k in smap]

        outputs = []
        omap = src.mapping(top, "outputs", "outputs")
        for k in omap:
            name = self.declare(omap, k, "output")
            o = src.mapping(omap, k, f"output {name!r}")
            src.check_keys(o, ("dims", "expr"), f"output {name!r}", ("dims", "expr"))
            ds, _ = self.dim_list(o, "dims", f"output {name!r} dims")
            outputs.append(Output(name, ds, self.expr(o, "expr", f"output {name!r} expr")))
            self.locs["output", name] = {"key": omap.key_nodes[k], "dims": o.value_nodes["dims"],
                                         "expr": o.value_nodes["expr"]}

        rec = Recurrence(self.name, tuple(dims), tuple(inputs), tuple(lets), tuple(states),
                         tuple(outputs), self.numerics(), doc)
        try:
            return verify(rec)
        except VerifyError as e:
            raise SpecError(src.path, *_pos(self.locate(e)), f"{e.label}: {e.message}") from None
        except IRError as e:
            src.fail(top.value_nodes["name"], str(e))

    def state(self, smap: _Map, key: str) -> State:
        src, name = self.src, key
        s = src.mapping(smap, key, f"state {name!r}")
        src.check_keys(s, ("dims", "transition", "inject"), f"state {name!r}",
                       ("dims", "transition", "inject"))
        ds, _ = self.dim_list(s, "dims", f"state {name!r} dims")
        what = f"state {name!r} transition"
        text, tnode = self.text(s, "transition", what)
        tr, rest = self.parsed(tnode, what, lambda line, col0: parse_transition(
            self.parser, text, line, col0))
        if rest.strip():
            self.parsed(tnode, what, lambda line, col0: _trailing(text, rest, line, col0))
        inject = self.expr(s, "inject", f"state {name!r} inject")
        self.locs["state", name] = {"key": smap.key_nodes[key], "dims": s.value_nodes["dims"],
                                    "transition": tnode, "inject": s.value_nodes["inject"]}
        return State(name, ds, tr, inject)

    def numerics(self) -> Numerics:
        """Dtypes for generated kernels; the verifier checks the values."""
        nmap = self.src.mapping(self.top, "numerics", "numerics", optional=True)
        self.src.check_keys(nmap, ("accum", "state", "input"), "numerics")
        for k, v in nmap.items():
            if not isinstance(v, str) and not (k == "input" and v is None):
                self.src.fail(nmap.value_nodes[k], f"numerics {k}: expected a dtype name like "
                                              f"float32, found {_describe(v)}")
        return Numerics(**nmap)

    def hints(self, inputs) -> dict[str, str]:
        hmap = self.src.mapping(self.top, "hints", "hints", optional=True)
        out = {}
        for k, v in hmap.items():
            if k not in inputs:
                self.src.fail(hmap.key_nodes[k], f"hints: expected an input name "
                                            f"({', '.join(inputs)}), found {k!r}")
            if not isinstance(v, str) or v not in SAMPLERS:
                self.src.fail(hmap.value_nodes[k], f"hint for {k!r}: expected a sampler "
                                              f"({', '.join(SAMPLERS)}), found {_describe(v)}")
            out[k] = v
        return out

    def locate(self, e: VerifyError) -> yaml.Node:
        """The YAML node a verifier error is about, from its structured ``where``."""
        top, (what, *rest) = self.top, e.where
        if what == "numerics" and "numerics" in top.value_nodes:
            return top.value_nodes["numerics"]
        if not rest:  # the recurrence as a whole: ("name",), ("dims",), ("states",), ...
            return top.key_nodes[what] if what in top.key_nodes and what != "name" \
                else top.value_nodes["name"]
        loc = self.locs.get((what, rest[0]))
        if loc is None:
            return top.value_nodes["name"]
        # the part at fault (a transition operand is inside the transition string)
        return loc.get(rest[1] if len(rest) > 1 else "key", loc["key"])


def _trailing(text: str, rest: str, line: int, col0: int):
    raise ParseError(f"expected the end of the transition, found {rest.strip()!r} (the "
                     "injected term goes under 'inject:')", line,
                     col0 + len(text) - len(rest.lstrip()) + 1)


def _define(src: _Source, top: _Map) -> Spec:
    d = _Define(src, top)
    rec = d.build()
    hints = d.hints([i.name for i in rec.inputs])

    def builder() -> Recurrence:
        return rec
    return Spec(src.path, Entry(rec.name, builder, {}, (), rec.doc, src.path, hints), {}, top)


# ---- entry points ----

def parse_spec(text: str, path: str = "<string>") -> Spec:
    """Load a spec from its text; ``path`` names it in errors and becomes the entry's origin."""
    src = _Source(path)
    top = _read_yaml(text, path)
    if top is None:
        raise SpecError(path, 1, None, "expected a mapping with 'use:' (instantiate a "
                                       "registered recurrence) or 'name:' (define one), "
                                       "found an empty file")
    if not isinstance(top, dict):
        raise SpecError(path, 1, None, "expected a mapping with 'use:' or 'name:' at the top "
                                       f"level, found {_describe(top)}")
    if "use" not in top and "name" not in top:
        src.check_keys(top, tuple(dict.fromkeys(INSTANTIATE_KEYS + DEFINE_KEYS)), "a spec")
        raise SpecError(path, *_pos(top.node), "expected 'use:' (instantiate a registered "
                        "recurrence) or 'name:' (define one), found neither")
    return _instantiate(src, top) if "use" in top else _define(src, top)


def load_spec(path: str | os.PathLike) -> Spec:
    """Load a YAML spec file.

    Args:
        path: the spec file.

    Returns:
        a ``Spec``: ``.entry`` (a registry ``Entry``), ``.options`` and ``.path``.

    Raises:
        SpecError: naming the file, the line (and column) and what was expected vs found.
    """
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(p, None, None, f"cannot read the spec file: {e}") from None
    return parse_spec(text, p)


def load_recurrence(path: str | os.PathLike) -> Recurrence:
    """The verified recurrence a spec file describes (with the options it sets)."""
    return load_spec(path).recurrence()


def register_spec(path: str | os.PathLike, override: bool = False) -> Entry:
    """Load a spec and add it to the registry under its ``name``.

    Args:
        path: the spec file.
        override: replace an existing registration of the same name.
    """
    spec = load_spec(path)
    top, src = spec.top, _Source(spec.path)
    if "name" not in top:
        src.fail(top.key_nodes["use"], f"this spec instantiates {top['use']!r} without a name: add "
                                  "'name: ...' to register it as a new recurrence")
    registry.names()  # load the standard library first, so a clash with it is caught now
    try:
        return registry.add(spec.entry, override)
    except RegistryError as e:
        src.fail(top.value_nodes["name"], str(e))
