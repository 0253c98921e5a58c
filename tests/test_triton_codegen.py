"""Generated Triton source as a product: readability conventions, safety of names, and a
compile check for a real GPU target (no GPU needed). Golden files of the source are checked by
tests/test_golden.py, the same way for every backend.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from scancc import backends, registry, testing

# every library recurrence, from the registry (a new one is covered without editing this file)
LIBRARY = [n for n in registry.names() if registry.get(n).origin == "library"]


def _cases():
    tb = backends.get("triton")
    for name in LIBRARY:
        rec = registry.get(name).build()
        for algo in ("recurrent", "chunked"):
            if tb.supports(rec, {"algorithm": algo})[0]:
                yield name, algo


CASES = list(_cases())


@pytest.mark.parametrize("name,algo", CASES)
def test_source_conventions(name, algo):
    rec = registry.get(name).build()
    src = backends.get("triton").render(rec, {"algorithm": algo})
    tree = ast.parse(src)  # valid Python
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert f"{name}_{algo}_fwd_kernel" in funcs and f"{name}_{algo}_fwd" in funcs
    # the IR it came from is in the header
    for line in str(rec).splitlines():
        assert f"# {line}".rstrip() in src
    # standalone: the module needs torch and triton only
    imports = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert imports == {"torch", "triton", "triton.language"}
    assert not any(isinstance(n, ast.ImportFrom) for n in ast.walk(tree))
    kernel = funcs[f"{name}_{algo}_fwd_kernel"]
    for node in ast.walk(kernel):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assert node.id.split("_")[0] in ("b", "p", "i", "o", "m"), node.id
    for a in kernel.args.args:
        if a.annotation is not None:  # constexpr flags and sizes are UPPER
            assert a.arg.isupper(), a.arg
    # no dead branches: every `if` tests a constexpr flag the launcher sets, or compares
    # constexpr sizes with constants (resolved when the kernel compiles)
    def constexpr(e):
        return (isinstance(e, ast.Name) and e.id.isupper()) or isinstance(e, ast.Constant)
    for node in ast.walk(kernel):
        if isinstance(node, ast.If):
            t = node.test
            assert (isinstance(t, ast.Name) and t.id.isupper()) or (
                isinstance(t, ast.Compare) and all(map(constexpr, [t.left, *t.comparators]))), \
                ast.unparse(t)


def test_hostile_doc_cannot_escape_the_header():
    import scancc
    from scancc.ir import identity

    @scancc.register("triton_test_hostile_doc", override=True)
    def hostile(r):
        '''Doc """ with quotes\rimport os; os.system("x")\x00 and \u2028 separators.'''
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("chan")
        x = r.input("x", [b, t, d])
        h = r.state("h", [b, d], identity(), inject=x)
        r.output("y", [b, t, d], h)

    src = backends.get("triton").render(registry.get("triton_test_hostile_doc").build(), {})
    tree = ast.parse(src)
    assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) and n.names[0].name == "os"
                   for n in ast.walk(tree))
    assert all(ord(c) < 128 for c in src)
    registry.unregister("triton_test_hostile_doc")


def test_python_keywords_and_generated_names_do_not_collide():
    import scancc
    from scancc.ir import identity

    @scancc.register("triton_test_names", override=True)
    def names(r):
        b, t, d = r.dim("batch", "batch"), r.dim("time", "time"), r.dim("BLOCK_chan")
        hd = r.dim("t", "head")  # its program index would be i_t, the time loop's variable
        x = r.input("lambda", [b, t, hd, d])
        g = r.input("grid", [b, t, hd, d])
        o = r.input("o_BLOCK_chan", [hd, d])
        h = r.state("p_lambda", [b, hd, d], identity(), inject=x * g + o)
        r.output("tl", [b, t, hd, d], h)

    rec = registry.get("triton_test_names").build()
    ast.parse(backends.get("triton").render(rec, {}))
    torch = pytest.importorskip("torch")
    sizes = {"batch": 2, "time": 5, "t": 3, "BLOCK_chan": 4}
    x = testing.sample_inputs(rec, sizes, 0)
    ref = backends.get("reference").run(rec, x, sizes, None, True, {})
    res = backends.get("triton").run(rec, {k: torch.from_numpy(v).float() for k, v in x.items()},
                                     sizes, None, True, {})
    testing.assert_close(res.outputs["tl"], ref.outputs["tl"], "float32")
    testing.assert_close(res.final_states["p_lambda"], ref.final_states["p_lambda"], "float32")
    registry.unregister("triton_test_names")


def test_regeneration_is_stable():
    rec = registry.get("mamba2").build()
    tb = backends.get("triton")
    assert tb.render(rec, {}) == tb.render(registry.get("mamba2").build(), {})


_COMPILE = r'''
import json, sys, importlib.util
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
out = []
for path, kernel, sig, const in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("m", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = getattr(mod, kernel)
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
    out.append([kernel, "ptx" in c.asm and len(c.asm["ptx"]) > 0])
print(json.dumps(out))
'''


def test_generated_kernels_compile_for_h100(tmp_path):
    """Every library kernel goes through Triton's real GPU compiler (sm_90, to PTX) in a
    process without TRITON_INTERPRET: catches source the interpreter accepts but a GPU
    build rejects (e.g. loop-carried values changing shape)."""
    jobs = []
    for name, algo in CASES:
        rec = registry.get(name).build()
        for dtype in ("float32", "bfloat16"):
            low = backends.get("triton")._lowering_for(rec, {"algorithm": algo})
            path = tmp_path / f"{name}_{algo}.py"
            path.write_text(low.render())
            sizes = testing.default_sizes(rec)
            sig, const = low.compile_args(sizes, dtype)
            jobs.append([str(path), low.kernel_name, sig, const])
    for prec in ("tf32x3", "input"):
        rec = registry.get("mamba2").build()
        low = backends.get("triton")._lowering_for(rec, {"algorithm": "chunked",
                                                         "dot_precision": prec})
        path = tmp_path / f"mamba2_chunked_{prec}.py"
        path.write_text(low.render())
        sig, const = low.compile_args(testing.default_sizes(rec), "bfloat16")
        jobs.append([str(path), low.kernel_name, sig, const])
    # derived backward kernels: prev/step, the adjoint steps (tl.gather), ungroup (atomic add)
    from scancc.autograd import adjoint
    for name in ("fir", "iir", "swa", "mamba", "mamba2", "gated_delta_net"):
        e = registry.get(name)
        rec = adjoint(e.build(**{o: True for o in e.optional_inputs})).backward
        low = backends.get("triton")._lowering_for(rec, {"algorithm": "recurrent"})
        path = tmp_path / f"{name}_bwd.py"
        path.write_text(low.render())
        sig, const = low.compile_args(testing.default_sizes(rec), "float32")
        jobs.append([str(path), low.kernel_name, sig, const])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(jobs), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(done) == len(jobs) and all(ok for _, ok in done), done


# ---- rule registries (backends/triton/rules.py) ----

def test_every_transition_kind_has_a_rule():
    from scancc.backends.triton.rules import TRANSITION_RULES
    from scancc.ir import Kind
    assert TRANSITION_RULES.names() == {k.value for k in Kind}


def test_op_rules_cover_every_op_the_lowering_meets():
    """Every op in any library recurrence or its derived backward has an entry (ungroup's rule
    lowers it as a whole output only; the lowering refuses it anywhere else)."""
    from scancc.autograd import adjoint
    from scancc.backends.triton.rules import OP_RULES
    from scancc.ir import Op
    seen = set()
    for name in registry.names():
        e = registry.get(name)
        if e.origin != "library":
            continue
        rec = e.build(**{o: True for o in e.optional_inputs})
        # (a cascade, bmojo's, has no derived backward yet: docs/bmojo.md)
        for r in (rec,) if rec.cascaded else (rec, adjoint(rec).backward,
                                              adjoint(rec).states_view):
            seen |= {n.op for _, root in r.exprs() for n in root.walk()}
    missing = {op.value for op in seen if op not in OP_RULES}
    assert not missing
    # and every op of the IR has a rule
    assert OP_RULES.names() == {op.value for op in Op}


def test_a_missing_rule_names_op_backend_and_recurrence(monkeypatch):
    from scancc.backends import UnsupportedError
    from scancc.backends.triton import rules
    from scancc.ir import Kind, Op
    rec = registry.get("hgrn").build()
    ops = dict(rules.OP_RULES._rules)
    del ops[Op.EXP]
    monkeypatch.setattr(rules.OP_RULES, "_rules", ops)
    with pytest.raises(UnsupportedError, match=r"backend 'triton' cannot lower recurrence "
                       r"'hgrn': .*no op rule for 'exp'"):
        backends.get("triton").render(rec, {"algorithm": "recurrent"})
    monkeypatch.undo()
    kinds = dict(rules.TRANSITION_RULES._rules)
    del kinds[Kind.DIAGONAL]
    monkeypatch.setattr(rules.TRANSITION_RULES, "_rules", kinds)
    with pytest.raises(UnsupportedError, match=r"backend 'triton' cannot lower recurrence "
                       r"'hgrn': state 'h': no transition rule for 'diagonal'"):
        backends.get("triton").render(rec, {"algorithm": "recurrent"})


def test_prune_dead_drops_only_unread_pure_bindings():
    from scancc.backends.triton.emit import prune_dead
    lines = ["b_a = tl.load(p)",
             "b_dead = tl.sum(b_a, axis=0)",         # never read: dropped
             "b_dead2 = b_dead * 2.0",               # read by nothing, reads b_dead: both go
             "b_x = b_a + 1.0",
             "b_x = tl.where(b_x > 0, b_x, 0.0)",    # a re-binding that reads itself: kept
             "if FLAG:",
             "    b_only = b_a * 3.0",               # the block's only statement: kept
             "b_st = tl.store(p, b_x)",              # stores: kept
             "tl.store(q, b_x)"]
    assert prune_dead(lines) == [lines[0]] + lines[3:]
