"""Which source ``for`` a SASS loop runs and how many times: the loops of Triton's GPU IR (with the call
chain that inlined them) or the SASS line table name the statement, and its ``range(lo, hi, step)`` is
evaluated with a launch's integer and constexpr arguments, through the call sites of inlined helpers.
Part of the model's SASS reader (bench/model/sass.py)."""
import ast
import dataclasses
import functools
import math
import os
import re
from collections import Counter

from .sass_loops import _innermost_loop


@dataclasses.dataclass(frozen=True)
class ForStmt:
    path: str
    func: str
    lineno: int
    end_lineno: int
    range_args: tuple  # ast expressions of range(lo, hi, step)

    def claims(self, pos):
        return pos is not None and os.path.basename(pos[0]) == os.path.basename(self.path) \
            and self.lineno <= pos[1] <= self.end_lineno


@functools.lru_cache(maxsize=None)
def _source_tree(path):
    with open(path) as f:
        return ast.parse(f.read())


@functools.lru_cache(maxsize=None)
def source_fors(path):
    """Every ``for ... in range(...)`` / ``tl.range(...)`` of a source file, with its function."""
    out = []
    for fn in ast.walk(_source_tree(path)):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.For) and isinstance(node.iter, ast.Call):
                callee = node.iter.func
                name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
                if name in ("range", "static_range"):
                    out.append(ForStmt(path, fn.name, node.lineno, node.end_lineno, tuple(node.iter.args)))
    return out


def _resolve_path(path, search_dirs):
    """The source file a location names: the file itself, else the same name in the kernel's directory
    (a kernel from Triton's cache may name the checkout that compiled it first; same source, same lines)."""
    for d in search_dirs:
        candidate = os.path.join(d, os.path.basename(path))
        if os.path.exists(candidate):
            return candidate
    return path if os.path.exists(path) else None


_LOC_DEF = re.compile(r"^(#loc\d*) = (loc\(.*\))\s*$", re.M)
_LOC_FILE = re.compile(r'^loc\("([^"]+)":(\d+):\d+\)$')
_LOC_NAMED = re.compile(r'^loc\("[^"]*"\((#loc\d*)\)\)$')
_LOC_CALLSITE = re.compile(r"^loc\(callsite\((#loc\d*) at (#loc\d*)\)\)$")


def ir_loops(ttgir):
    """The ``scf.for`` loops of Triton's GPU IR in program order: (depth, call chain), the chain being the
    for statement's (file, line) followed by the call sites that inlined it, innermost first."""
    defs = dict(_LOC_DEF.findall(ttgir))

    def chain(ref):
        text = defs.get(ref, "")
        m = _LOC_FILE.match(text)
        if m:
            return [(m.group(1), int(m.group(2)))]
        m = _LOC_NAMED.match(text)
        if m:
            return chain(m.group(1))
        m = _LOC_CALLSITE.match(text)
        if m:
            return chain(m.group(1)) + chain(m.group(2))
        return []

    loops, stack = [], []
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            kind = stack.pop() if stack else None
            if kind is not None and kind[0] == "for":
                m = re.search(r"loc\((#loc\d*)\)\s*$", s)
                loops[kind[1]] = (loops[kind[1]][0], chain(m.group(1)) if m else [])
            if s.endswith("{"):
                stack.append(("other", None))
            continue
        if s.endswith("{"):
            if re.search(r"\bscf\.for\b", s):
                loops.append((sum(1 for k in stack if k[0] == "for"), []))
                stack.append(("for", len(loops) - 1))
            else:
                stack.append(("other", None))
    return loops


def map_loops(facts, kernel_path, ttgir):
    """Attach to each SASS loop the source loop it runs, with the call chain that inlined it.

    The loops of the GPU IR and of the SASS are matched in program order when their nesting agrees
    (the usual case); otherwise each SASS loop takes the source ``for`` whose lines hold most of its
    own instructions (the SASS line table)."""
    dirs = [os.path.dirname(kernel_path)]
    ir = ir_loops(ttgir)
    sass_depths = [lp.depth for lp in sorted(facts.loops, key=lambda lp: lp.start)]
    if [d for d, _ in ir] == sass_depths:
        for lp, (_, chain) in zip(sorted(facts.loops, key=lambda lp: lp.start), ir):
            if not chain:
                continue
            path = _resolve_path(chain[0][0], dirs)
            f = next((f for f in source_fors(path) if f.lineno == chain[0][1]), None) if path else None
            lp.for_stmt, lp.chain = f, [(p, ln) for p, ln in chain]
    for lp in facts.loops:
        if lp.for_stmt is None:
            _map_by_line_table(lp, facts, dirs)
        if lp.for_stmt is None:
            facts.unmapped_loops.append(f"loop 0x{lp.start:x}-0x{lp.end:x}: no source loop found")


def _map_by_line_table(lp, facts, dirs):
    fors = []
    paths = {i.loc[0] for i in facts.instrs if i.loc} | {i.inlined_at[0] for i in facts.instrs if i.inlined_at}
    for p in paths:
        real = _resolve_path(p, dirs)
        if real and real.endswith(".py") and os.path.dirname(real) in dirs:
            fors.extend(source_fors(real))
    own = [i for i in facts.instrs if _innermost_loop(facts.loops, i.addr) is lp]
    best, best_score = None, (0, 0, 0)
    for f in fors:
        primary = sum(1 for i in own if f.claims(i.loc))
        inlined = sum(1 for i in own if not f.claims(i.loc) and f.claims(i.inlined_at))
        score = (primary + inlined, primary, -(f.end_lineno - f.lineno))
        if primary + inlined and score > best_score:
            best, best_score = f, score
    if best is not None:
        sites = Counter(i.inlined_at for i in own if i.inlined_at and best.claims(i.loc))
        lp.for_stmt = best
        lp.chain = [(best.path, best.lineno)] + ([sites.most_common(1)[0][0]] if sites else [])


class _Eval(ast.NodeVisitor):
    OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

    def __init__(self, lookup):
        self.lookup = lookup

    def visit_Constant(self, node):
        return node.value

    def visit_Name(self, node):
        return self.lookup(node.id)

    def visit_BinOp(self, node):
        return self.OPS[type(node.op)](self.visit(node.left), self.visit(node.right))

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.USub):
            return -self.visit(node.operand)
        raise ValueError(ast.dump(node))

    def visit_Call(self, node):
        """The few calls a loop bound is built from: a program's index (the first program, whose trip
        count every program but a ragged last one shares), min / max and cdiv."""
        name = getattr(node.func, "attr", getattr(node.func, "id", None))
        if name == "program_id":
            return 0
        vals = [self.visit(a) for a in node.args]
        if name in ("minimum", "min"):
            return min(vals)
        if name in ("maximum", "max"):
            return max(vals)
        if name == "cdiv":
            return -(-vals[0] // vals[1])
        raise ValueError(f"cannot evaluate {ast.unparse(node)}")

    def generic_visit(self, node):
        raise ValueError(f"cannot evaluate {ast.unparse(node)}")


def _scalar(v):
    v = getattr(v, "value", v)  # tl.constexpr
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"not an integer argument: {v!r}")
    return v


def _function_at(path, line):
    """The innermost function definition of ``path`` holding ``line``."""
    best = None
    for fn in ast.walk(_source_tree(path)):
        if isinstance(fn, ast.FunctionDef) and fn.lineno <= line <= fn.end_lineno:
            if best is None or fn.lineno > best.lineno:
                best = fn
    return best


def _lookup_through(chain, level, args, kernel_name, dirs):
    """A name resolver for the function holding ``chain[level]``: the launch's arguments in the kernel,
    the inlining call's argument expressions (evaluated one level out) in a helper, and the launch's
    argument of the same name where the chain ends."""
    path = _resolve_path(chain[level][0], dirs)
    fn = _function_at(path, chain[level][1]) if path else None

    # in the kernel itself, a name assigned once in its body (e.g. a split's first column from
    # tl.program_id) evaluates through its assignment
    kernel_fn = fn if fn is not None and fn.name == kernel_name else None
    # (annotated ones too: ``GROUP: tl.constexpr = BLOCK * GROUP_BLOCKS``)
    assigned = {}
    if kernel_fn is not None:
        single = [(st.targets[0] if isinstance(st, ast.Assign) and len(st.targets) == 1 else st.target, st.value)
                  for st in kernel_fn.body if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None]
        once = Counter(t.id for st in kernel_fn.body if isinstance(st, ast.Assign)
                       for t in st.targets if isinstance(t, ast.Name))
        once.update(st.target.id for st in kernel_fn.body
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name))
        assigned = {t.id: v for t, v in single if isinstance(t, ast.Name) and once[t.id] == 1}

    def from_args(name):
        if name in args:
            return _scalar(args[name])
        if name in assigned:
            return _scalar(_Eval(from_args).visit(assigned[name]))
        raise ValueError(f"{name!r} is not a launch argument")

    if fn is None or fn.name == kernel_name or level + 1 >= len(chain):
        return from_args
    caller_path = _resolve_path(chain[level + 1][0], dirs)
    call = None
    if caller_path:
        line = chain[level + 1][1]
        call = next((n for n in ast.walk(_source_tree(caller_path)) if isinstance(n, ast.Call)
                     and getattr(n.func, "id", getattr(n.func, "attr", None)) == fn.name
                     and n.lineno <= line <= n.end_lineno), None)
    if call is None:
        return from_args
    env = dict(zip([a.arg for a in fn.args.args], call.args))
    env.update({k.arg: k.value for k in call.keywords})
    outer = _lookup_through(chain, level + 1, args, kernel_name, dirs)

    def lookup(name):
        if name in env:
            return _scalar(_Eval(outer).visit(env[name]))
        return from_args(name)

    return lookup


def trip_count(lp, args, kernel_name, dirs):
    """(iterations of a SASS loop per program, the loop's step); (1, None) where no source loop was found."""
    f = lp.for_stmt
    if f is None:
        return 1, None
    lookup = _lookup_through(lp.chain, 0, args, kernel_name, dirs)
    try:
        vals = [_Eval(lookup).visit(a) for a in f.range_args]
    except (ValueError, KeyError) as e:
        raise ValueError(f"loop {os.path.basename(f.path)}:{f.lineno}: {e}") from None
    lo, hi, step = (0, vals[0], 1) if len(vals) == 1 else (vals[0], vals[1], vals[2] if len(vals) > 2 else 1)
    return max(0, math.ceil((hi - lo) / step)), step
