"""The stable text form of the IR: its printers and a whitelist parser that reads it back.

    recurrence simple_gla
      # S = exp(g) S + k v^T
      dim batch: batch
      dim time: time
      ...
      input q: [batch, time, heads, key]
      let scale = rsqrt(size(key))
      state S: [batch, heads, key, value] = scalar(decay=exp(g)) + k * v
      output o: [batch, time, heads, value] = sum(S * q, key) * scale
    end

The printers sit beside what they print (``format_expr`` in expr.py, ``format_transition`` and
``format_recurrence`` in recurrence.py) so ``repr(node)`` and ``str(rec)`` need nothing from
here; import all of the text form from this module. The same expression grammar is used by
YAML specs. Parsing never evaluates Python: it is a
tokenizer plus a recursive-descent parser over a fixed set of operators and functions.
"""
from __future__ import annotations

import math
import re
from typing import Callable

from .errors import ParseError
from .expr import FUNCTIONS, MAX_DEPTH, Node, Op, depth, format_expr, lift
from .recurrence import (AXIS_KINDS, COL_KINDS, OPERANDS, Dim, Input, Kind, Let, Numerics, Output,
                         Recurrence, State, Transition, format_recurrence, format_transition)

__all__ = ["ExprParser", "format_expr", "format_recurrence", "format_transition",
           "parse_recurrence", "parse_transition"]

# ---------------------------------------------------------------- parsing

_TOKEN = re.compile(r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
                    r"|(?P<op>[-+*/(),=\[\]?:]))")


class _Tokens:
    def __init__(self, text: str, line: int | None, col0: int = 0):
        self.text, self.line, self.toks, pos = text, line, [], 0
        while True:
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                rest = text[pos:].strip()
                if rest:
                    raise ParseError(f"unexpected character {rest[0]!r} in {text.strip()!r}",
                                     line, col0 + len(text) - len(text[pos:].lstrip()) + 1)
                break
            kind = m.lastgroup
            self.toks.append((kind, m.group(kind), col0 + m.start(kind) + 1))
            pos = m.end()
        self.i = 0

    def peek(self, k: int = 0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("end", "", len(self.text) + 1)

    def take(self, kind: str | None = None, value: str | None = None):
        t = self.peek()
        if (kind and t[0] != kind) or (value is not None and t[1] != value):
            want = repr(value) if value is not None else {"name": "a name", "num": "a number",
                                                            "end": "end of expression"}[kind]
            got = "end of expression" if t[0] == "end" else repr(t[1])
            self.fail(f"expected {want}, got {got}", t)
        self.i += 1
        return t

    def at(self, value: str) -> bool:
        return self.peek()[0] == "op" and self.peek()[1] == value

    def fail(self, msg: str, tok=None):
        tok = tok or self.peek()
        raise ParseError(f"{msg} in {self.text.strip()!r}", self.line, tok[2])


class ExprParser:
    """Recursive descent over the expression grammar; ``resolve`` maps a leaf name to a node
    and ``dims`` is the set of dim names (used where a function takes a dim)."""

    def __init__(self, resolve: Callable[[str], Node | None], dims: set[str]):
        self.resolve, self.dims = resolve, dims
        self.prev_states: set[str] = set()  # prev() may name any state, even a later one

    def parse(self, text: str, line: int | None = None, col0: int = 0) -> Node:
        if not isinstance(text, str):
            raise ParseError(f"expected an expression string, got {type(text).__name__} "
                             f"{text!r}", line)
        ts = _Tokens(text, line, col0)
        if ts.peek()[0] == "end":
            raise ParseError("empty expression", line)
        node = self.expr(ts)
        ts.take("end")
        return node

    def number(self, ts: _Tokens, neg: bool = False) -> float:
        """The next token as a finite number (``-`` applied when ``neg``)."""
        t = ts.take("num")
        v = float(t[1])
        if not math.isfinite(v):
            ts.fail(f"constant {t[1]} is not finite (beyond float64): expected a finite number", t)
        return -v if neg else v

    def checked(self, ts: _Tokens, n: Node, start) -> Node:
        """``n`` if its tree is at most MAX_DEPTH deep, else a ParseError at ``start``."""
        if depth(n) > MAX_DEPTH:
            ts.fail(f"expression nested too deeply (depth over {MAX_DEPTH}: a long sum, "
                    "product or chain of '-'): split it with lets", start)
        return n

    def expr(self, ts: _Tokens) -> Node:
        start = ts.peek()
        n = self.term(ts)
        k = 0
        while ts.at("+") or ts.at("-"):
            op = Op.ADD if ts.take()[1] == "+" else Op.SUB
            n = Node(op, (n, self.term(ts)))
            k += 1
            if k > MAX_DEPTH:
                self.checked(ts, n, start)
        return self.checked(ts, n, start)

    def term(self, ts: _Tokens) -> Node:
        start = ts.peek()
        n = self.unary(ts)
        k = 0
        while ts.at("*") or ts.at("/"):
            op = Op.MUL if ts.take()[1] == "*" else Op.DIV
            n = Node(op, (n, self.unary(ts)))
            k += 1
            if k > MAX_DEPTH:
                self.checked(ts, n, start)
        return n

    def unary(self, ts: _Tokens) -> Node:
        start, k = ts.peek(), 0
        while ts.at("-"):  # a loop, not recursion: a chain of '-' is bounded by MAX_DEPTH
            ts.take()
            k += 1
            if k > MAX_DEPTH:
                ts.fail(f"expression nested too deeply (over {MAX_DEPTH} '-' in a row)", start)
            if ts.peek()[0] == "num":
                n = lift(self.number(ts, neg=True))
                k -= 1
                break
        else:
            n = self.atom(ts)
        for _ in range(k):
            n = Node(Op.NEG, (n,))
        return n

    def atom(self, ts: _Tokens) -> Node:
        t = ts.peek()
        if t[0] == "num":
            return lift(self.number(ts))
        if ts.at("("):
            ts.take()
            n = self.expr(ts)
            ts.take("op", ")")
            return n
        if t[0] != "name":
            ts.fail("expected a number, a name or '('" if t[0] != "end"
                    else "expression ends early")
        ts.take()
        if ts.at("("):
            return self.call(ts, t)
        node = self.resolve(t[1])
        if node is None:
            what = "a dim (dims only appear as function arguments)" if t[1] in self.dims else \
                "not an input, let or state"
            ts.fail(f"unknown name {t[1]!r}: {what}", t)
        return node

    def dim(self, ts: _Tokens) -> str:
        t = ts.take("name")
        if t[1] not in self.dims:
            ts.fail(f"{t[1]!r} is not a dim (dims: {', '.join(sorted(self.dims))})", t)
        return t[1]

    def call(self, ts: _Tokens, name_tok) -> Node:
        fname = name_tok[1]
        op = FUNCTIONS.get(fname)
        if op is None:
            ts.fail(f"unknown function {fname!r} (known: {', '.join(sorted(FUNCTIONS))})",
                    name_tok)
        ts.take("op", "(")
        if op in (Op.IOTA, Op.SIZE):
            node = Node(op, (), self.dim(ts))
        elif op is Op.PREV:
            t = ts.take("name")
            ref = self.resolve(t[1])
            if (ref is None or ref.op is not Op.STATE) and t[1] not in self.prev_states:
                ts.fail(f"prev() takes a state name, got {t[1]!r}", t)
            node = Node(op, (), t[1])
        elif op in (Op.SUM, Op.MAX):
            x = self.expr(ts)
            ds = []
            while ts.at(","):
                ts.take()
                ds.append(self.dim(ts))
            if not ds:
                ts.fail(f"{fname}() needs at least one dim to reduce over")
            node = Node(op, (x,), tuple(ds))
        elif op in (Op.L2NORM, Op.FLIP):
            x = self.expr(ts)
            ts.take("op", ",")
            node = Node(op, (x,), self.dim(ts))
        elif op in (Op.GROUP, Op.UNGROUP):
            x = self.expr(ts)
            ts.take("op", ",")
            g = self.dim(ts)
            ts.take("op", ",")
            node = Node(op, (x,), (g, self.dim(ts)))
        elif op is Op.SOFTMAX:
            x = self.expr(ts)
            ts.take("op", ",")
            d = self.dim(ts)
            src = (x,)
            if ts.at(","):
                ts.take()
                kw = ts.take("name")
                if kw[1] != "mask":
                    ts.fail(f"softmax() takes keyword 'mask', not {kw[1]!r}", kw)
                ts.take("op", "=")
                src = (x, self.expr(ts))
            node = Node(op, src, d)
        elif op is Op.JSOFTMAX:  # joint_softmax(part, logits_0, dim_0, mask_0, logits_1, ...)
            pt = ts.take("num")
            if not pt[1].isdigit():
                ts.fail(f"joint_softmax() takes a part index first, got {pt[1]!r}", pt)
            src, ds = [], []
            while ts.at(","):
                ts.take()
                src.append(self.expr(ts))
                ts.take("op", ",")
                ds.append(self.dim(ts))
                ts.take("op", ",")
                src.append(self.expr(ts))
            node = Node(op, tuple(src), (int(pt[1]), tuple(ds)))
        elif op is Op.CLAMP:
            x = self.expr(ts)
            bounds = {"lo": None, "hi": None}
            while ts.at(","):
                ts.take()
                kw = ts.take("name")
                if kw[1] not in bounds:
                    ts.fail(f"clamp() takes keywords lo= and hi=, not {kw[1]!r}", kw)
                ts.take("op", "=")
                neg = ts.at("-") and ts.take()
                bounds[kw[1]] = self.number(ts, bool(neg))
            node = Node(op, (x,), (bounds["lo"], bounds["hi"]))
        else:
            arity = 2 if op in (Op.MAXIMUM, Op.MINIMUM) else 1
            args = [self.expr(ts)]
            while ts.at(","):
                ts.take()
                args.append(self.expr(ts))
            if len(args) != arity:
                ts.fail(f"{fname}() takes {arity} argument(s), got {len(args)}", name_tok)
            node = Node(op, tuple(args))
        ts.take("op", ")")
        return node


def parse_recurrence(text: str) -> Recurrence:
    """Parse the text form printed by ``format_recurrence`` (round-trip exact)."""
    lines = text.splitlines()
    name, doc = None, []
    dims: list[Dim] = []
    inputs: list[Input] = []
    lets: list[Let] = []
    states: list[State] = []
    outputs: list[Output] = []
    numerics = Numerics()
    symbols: dict[str, Node] = {}
    parser = ExprParser(symbols.get, set())
    # a cascade's prev(x) may read a state declared later (its value entering the step)
    parser.prev_states = {m[1] for m in re.finditer(r"(?m)^\s*state\s+(\w+)\s*:", text)}
    ended = False
    for ln, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s:
            continue
        if ended:
            raise ParseError("text after 'end'", ln)
        if s.startswith("#"):
            if name is not None and not (dims or inputs):
                doc.append(s[1:].strip())
            continue
        head, _, rest = s.partition(" ")
        rest = rest.strip()
        if name is None:
            if head != "recurrence" or not rest:
                raise ParseError("expected 'recurrence NAME'", ln)
            name = rest
            continue
        if head == "end":
            ended = True
        elif head == "dim":
            m = re.fullmatch(r"(\w+)\s*:\s*(\w+)(?:\s*=\s*(\d+))?", rest)
            if not m:
                raise ParseError("expected 'dim NAME: ROLE [= SIZE]'", ln)
            dims.append(Dim(m[1], m[2], int(m[3]) if m[3] else None))
            parser.dims.add(m[1])
        elif head in ("input", "state", "output"):
            m = re.fullmatch(r"(\w+)\s*:\s*\[([^\]]*)\]\s*(?:=\s*(.*))?", rest)
            if not m:
                raise ParseError(f"expected '{head} NAME: [dims]" +
                                 (" = ...'" if head != "input" else "'"), ln)
            nm, dl, body = m[1], [d.strip() for d in m[2].split(",") if d.strip()], m[3]
            plain = tuple(d.rstrip("?") for d in dl)
            if head == "input":
                if body is not None:
                    raise ParseError("an input takes no '= ...'", ln)
                inputs.append(Input(nm, plain, tuple(d.rstrip("?") for d in dl if d.endswith("?"))))
                symbols[nm] = Node(Op.INPUT, (), nm)
            elif body is None:
                raise ParseError(f"a {head} needs '= ...'", ln)
            elif head == "output":
                outputs.append(Output(nm, plain, parser.parse(body, ln, raw.index(body))))
            else:
                symbols[nm] = Node(Op.STATE, (), nm)
                states.append(_parse_state(parser, nm, plain, body, ln, raw.index(body)))
        elif head == "let":
            m = re.fullmatch(r"(\w+)\s*=\s*(.*)", rest)
            if not m:
                raise ParseError("expected 'let NAME = EXPR'", ln)
            lets.append(Let(m[1], parser.parse(m[2], ln, raw.index(m[2]))))
            symbols[m[1]] = Node(Op.PARAM, (), m[1])
        elif head == "numerics":
            kv = dict(re.findall(r"(\w+)=(\w+)", rest))
            if set(kv) - {"accum", "state", "input"}:
                raise ParseError(f"numerics takes accum=, state= and input=, got {sorted(kv)}",
                                 ln)
            numerics = Numerics(**kv)
        else:
            raise ParseError(f"unknown declaration {head!r} (expected dim, input, let, state, "
                             "output, numerics or end)", ln, 1)
    if name is None or not ended:
        raise ParseError("expected 'recurrence NAME' ... 'end'")
    return Recurrence(name, tuple(dims), tuple(inputs), tuple(lets), tuple(states),
                      tuple(outputs), numerics, "\n".join(doc))


def parse_transition(parser: ExprParser, text: str, line: int | None = None,
                     col0: int = 0) -> tuple[Transition, str]:
    """Parse ``kind(axis=.., col=.., operand=expr, ...)``; returns it and the rest of the text."""
    ts = _Tokens(text, line, col0)
    kt = ts.take("name")
    try:
        kind = Kind(kt[1])
    except ValueError:
        ts.fail(f"unknown transition {kt[1]!r} (known: {', '.join(k.value for k in Kind)})", kt)
    ts.take("op", "(")
    axis = col = None
    ops: list[tuple[str, Node]] = []
    req, opt = OPERANDS[kind]
    while not ts.at(")"):
        if ops or axis or col:
            ts.take("op", ",")
        kw = ts.take("name")
        ts.take("op", "=")
        if kw[1] == "axis" and kind in AXIS_KINDS:
            axis = parser.dim(ts)
        elif kw[1] == "col" and kind in COL_KINDS:
            col = parser.dim(ts)
        elif kw[1] in req + opt:
            ops.append((kw[1], parser.expr(ts)))
        else:
            takes = (["axis"] if kind in AXIS_KINDS else []) + (
                ["col"] if kind in COL_KINDS else []) + list(req + opt)
            ts.fail(f"{kind.value}() takes {', '.join(takes) or 'nothing'}, not {kw[1]!r}", kw)
    close = ts.take("op", ")")
    return Transition(kind, axis, tuple(ops), col), text[close[2] - col0:]


def _parse_state(parser, name, dims, body, ln, col0) -> State:
    t, rest = parse_transition(parser, body, ln, col0)
    m = re.match(r"\s*\+\s*", rest)
    if not m:
        raise ParseError(f"state {name!r}: expected '+ INJECT' after the transition", ln,
                         col0 + len(body) - len(rest) + 1)
    rest = rest[m.end():]
    inject = parser.parse(rest, ln, col0 + len(body) - len(rest))
    return State(name, dims, t, inject)
