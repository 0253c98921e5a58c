"""A small Python API for writing recurrences: declare dims, inputs, lets, states, outputs."""
from __future__ import annotations


from .errors import IRError
from .expr import Node, Op, as_expr
from .recurrence import Dim, Input, Let, Numerics, Output, Recurrence, State, Transition
from .verify import verify


class Builder:
    """Collects declarations in order and returns a verified ``Recurrence`` from ``build()``.

    Example::

        r = Builder("hgrn")
        batch, time, chan = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x, g = r.input("x", [batch, time, chan]), r.input("g", [batch, time, chan])
        h = r.state("h", [batch, chan], diagonal(exp(g)), inject=x)
        r.output("o", [batch, time, chan], h)
    """

    def __init__(self, name: str, doc: str = ""):
        self.name, self.doc = name, doc
        self.dims: list[Dim] = []
        self.inputs: list[Input] = []
        self.lets: list[Let] = []
        self.states: list[State] = []
        self.outputs: list[Output] = []
        self._numerics = Numerics()

    def dim(self, name: str, role: str = "feature", size: int | None = None) -> str:
        self.dims.append(Dim(name, role, size))
        return name

    def input(self, name: str, dims, optional_dims=()) -> Node:
        self.inputs.append(Input(name, tuple(dims), tuple(optional_dims)))
        return Node(Op.INPUT, (), name)

    def let(self, name: str, expr: Node) -> Node:
        self.lets.append(Let(name, as_expr(f"let {name!r}", expr)))
        return Node(Op.PARAM, (), name)

    def state(self, name: str, dims, transition: Transition, inject: Node) -> Node:
        if not isinstance(transition, Transition):
            raise IRError(f"state {name!r}: transition must be a Transition (diagonal(...), "
                          f"scalar(...), identity(), ...), got {type(transition).__name__} "
                          f"{transition!r}")
        self.states.append(State(name, tuple(dims), transition,
                                 as_expr(f"state {name!r} inject", inject)))
        return Node(Op.STATE, (), name)

    def output(self, name: str, dims, expr: Node) -> None:
        self.outputs.append(Output(name, tuple(dims), as_expr(f"output {name!r}", expr)))

    def numerics(self, accum: str = "float32", state: str = "float32",
                 input: str | None = None) -> None:
        self._numerics = Numerics(accum, state, input)

    def build(self) -> Recurrence:
        return verify(Recurrence(self.name, tuple(self.dims), tuple(self.inputs),
                                 tuple(self.lets), tuple(self.states), tuple(self.outputs),
                                 self._numerics, self.doc))
