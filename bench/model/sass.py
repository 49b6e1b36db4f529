"""What a compiled kernel executes, read from its SASS (``nvdisasm`` and ``cuobjdump`` ship with Triton).

:func:`analyse` turns a cubin into static facts (its loops, what each iteration issues, spill
instructions) and :func:`per_program` turns those into dynamic counts for one program of a launch,
given the launch's arguments.

How the dynamic counts are formed (per thread of one program; every warp runs the same stream):
- A loop is a backward branch.  Its trip count comes from the Triton source: the SASS line table
  (``nvdisasm -gi``: file, line, and the line a helper was inlined at) names the ``for`` statement
  whose instructions the loop holds, and its ``range(lo, hi, step)`` is evaluated with the launch's
  integer and constexpr arguments (through the call site when the loop is in an inlined helper).
- A region that a forward branch skips and that calls a subroutine (the slow path of an IEEE
  division, taken only for denormal or huge operands) is cold: counted zero times.  Every other
  instruction counts once per iteration of the loops around it, predicated or not (a predicated-off
  instruction still takes its issue slot).
- A region entered only by the program an atomic ticket elects (a split row's last arriver, which
  combines the row's partials: the first predicated EXIT, or forward branch, within a few
  instructions after an ATOMG that returns its old value, up to the end of the kernel or the
  branch's target) is elected: counted zero times, as one program of a row's splits runs it.
- Bytes: a global load of width w moves 32·w bytes per warp.  A software-pipelined loop issues the
  first iterations' loads before the loop (same source line as a load inside it); those copies are
  issued but not counted as bytes, since the loop's last iterations load nothing (predicated off).
"""
import ast
import dataclasses
import functools
import math
import os
import re
import subprocess
import tempfile
from collections import Counter

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_LOC = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_LABEL = re.compile(r"^\s*([.$\w]+):\s*$")
_TARGET = re.compile(r"`\(([.$\w]+)\)")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    op: str
    operands: str
    loc: tuple  # (file, line) or None
    inlined_at: tuple  # (file, line) or None

    @property
    def base(self):
        return self.op.split(".")[0]


def nvidia_tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run_tool(tool, args, cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([nvidia_tool(tool), *args, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def parse_sass(text):
    """(instructions in address order, {label: address}, [subroutine start addresses])."""
    instrs, labels, pending, subroutines = [], {}, [], []
    loc = inlined = None
    for line in text.splitlines():
        m = _LOC.search(line)
        if m:
            loc = (m.group(1), int(m.group(2)))
            inlined = (m.group(3), int(m.group(4))) if m.group(3) else None
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
                if name.startswith("$__internal"):
                    subroutines.append(addr)
            pending = []
            instrs.append(Instr(addr, (m.group(2) or "").strip(), m.group(3), m.group(4), loc, inlined))
    return instrs, labels, subroutines


# ----------------------------------------------------------------------------- instruction classes

def load_width(op):
    """Bytes per thread of a load / store opcode (LDG.E.128 -> 16, LDG.E.U16 -> 2, LDG.E -> 4)."""
    mods = op.split(".")[1:]
    for m in mods:
        if m in ("128", "64", "32"):
            return int(m) // 8
        if m in ("U16", "S16"):
            return 2
        if m in ("U8", "S8"):
            return 1
    return 4


GLOBAL_LOADS = ("LDG", "LDGSTS")  # LDGSTS: cp.async, global -> shared
# Instructions that read or write shared memory through its banks (the bytes per thread as load_width;
# LDSM per matrix count), LDGSTS for the bytes it writes there; wgmma's operands: shared_operand_bytes
SHARED_ACCESSES = ("LDS", "STS", "LDSM", "LDGSTS")
GLOBAL_STORES = ("STG", "RED", "ATOM", "ATOMG")
TENSOR = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA")
_TENSOR_DTYPES = ("BF16", "F16", "TF32", "E4M3", "E5M2", "S8")


def shared_width(op):
    """Bytes per thread a shared-memory access moves (LDSM.16.M88.4: four 8 x 8 16-bit matrices a warp, 16)."""
    if op.split(".")[0] == "LDSM":
        return 4 * int(op.split(".")[-1]) if op.split(".")[-1] in ("1", "2", "4") else 4
    return load_width(op)


def shared_operand_bytes(op, operands):
    """Bytes one wgmma (HGMMA / QGMMA / IGMMA, issued by a warpgroup) reads from shared memory: B's K x N,
    and A's M x K unless A comes from registers (``R24, R88, gdesc[UR4], R24``: a register before the
    descriptor); 0 for other opcodes (mma.sync reads registers, filled by LDSM)."""
    t = tensor_op(op)
    if t is None or not t[0].endswith("GMMA"):
        return 0
    _, m, n, k, dtype, _ = t
    elem = {"TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1}.get(dtype, 2)
    fields = [f.strip() for f in operands.split(",")]
    a_in_shared = len(fields) > 1 and fields[1].startswith("gdesc")
    return (n * k + (m * k if a_in_shared else 0)) * elem


def tensor_op(op):
    """(kind, M, N, K, input dtype, warps that issue it together) of a tensor-core opcode, else None."""
    parts = op.split(".")
    base = parts[0]
    if base not in TENSOR:
        return None
    shape = parts[1] if len(parts) > 1 else ""
    dtype = next((p for p in reversed(parts) if p in _TENSOR_DTYPES), "?")
    if base.endswith("GMMA"):  # wgmma: one warpgroup (4 warps), 64 x N x K
        m, n, k = (int(v) for v in shape.split("x"))
        return base, m, n, k, dtype, 4
    digits = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}
    m, n, k = digits.get(shape, (16, 8, 16))
    return base, m, n, k, dtype, 1


# ----------------------------------------------------------------------------- structure

@dataclasses.dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    parent: "Loop" = None
    for_stmt: "ForStmt" = None
    chain: list = None  # the for statement's (file, line), then the call sites that inlined it

    def contains(self, addr):
        return self.start <= addr <= self.end

    @property
    def depth(self):
        return 0 if self.parent is None else 1 + self.parent.depth


@dataclasses.dataclass
class Facts:
    """Static facts of one compiled kernel."""
    name: str
    arch: int
    num_warps: int
    num_stages: int
    spill_instructions: int  # LDL / STL in the kernel's code (local memory: spills or a local array)
    instrs: list
    loops: list
    cold: set  # addresses of cold instructions
    elected: set  # addresses of the instructions only a ticket's elected program runs
    prologue_loads: set  # addresses of pipelining-prologue loads (issued, bytes not counted)
    unmapped_loops: list  # loops no source ``for`` could be found for (trip count 1 assumed)


def _find_loops(instrs, labels, main_end):
    loops = []
    for ins in instrs:
        if ins.addr >= main_end or ins.base != "BRA":
            continue
        m = _TARGET.search(ins.operands)
        if not m or m.group(1) not in labels:
            continue
        target = labels[m.group(1)]
        if target < ins.addr:
            loops.append(Loop(target, ins.addr))
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for lp in loops:  # the innermost enclosing loop is the parent
        enclosing = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
        lp.parent = min(enclosing, key=lambda o: o.end - o.start, default=None)
    return loops


def _cold_addresses(instrs, labels, main_end):
    """Instructions skipped by a forward branch whose skipped region calls a subroutine and holds no
    loop (the slow path of an IEEE division; not a branch around a whole loop)."""
    cold = set()
    by_addr = {i.addr: i for i in instrs}
    for ins in instrs:
        if ins.addr >= main_end or ins.base != "BRA" or not ins.pred:
            continue
        m = _TARGET.search(ins.operands)
        if not m or m.group(1) not in labels:
            continue
        target = labels[m.group(1)]
        if target <= ins.addr:
            continue
        region = [a for a in by_addr if ins.addr < a < target]
        has_loop = any(by_addr[a].base == "BRA" and _TARGET.search(by_addr[a].operands)
                       and labels.get(_TARGET.search(by_addr[a].operands).group(1), a + 1) <= a for a in region)
        if not has_loop and any(by_addr[a].base == "CALL" for a in region):
            cold.update(region)
    return cold


ELECTION_WINDOW = 32  # instructions between a ticket's ATOMG and the branch that leaves the others out (the
# atomic of one lane, its value shared through shared memory and a barrier: 17 in sample's kernel)


def _elected_addresses(instrs, labels, main_end):
    """Instructions only the program a ticket elects runs: after an ATOMG that returns its old value (a
    ticket, row_engine.tickets), the first predicated EXIT within ELECTION_WINDOW instructions leaves every
    other program out of the rest of the kernel, or a predicated forward branch out of the region up to
    its target."""
    body = [i for i in instrs if i.addr < main_end]
    elected = set()
    for k, ins in enumerate(body):
        if not ins.op.startswith("ATOMG") or ins.operands.split(",")[0].strip() in ("PT", "RZ") and \
                ins.operands.split(",")[1].strip() == "RZ":
            continue
        for nxt in body[k + 1:k + 1 + ELECTION_WINDOW]:
            if not nxt.pred:
                continue
            if nxt.base == "EXIT":
                elected.update(i.addr for i in body if i.addr > nxt.addr)
                break
            m = _TARGET.search(nxt.operands) if nxt.base == "BRA" else None
            if m and labels.get(m.group(1), 0) > nxt.addr:
                target = labels[m.group(1)]
                elected.update(i.addr for i in body if nxt.addr < i.addr < target)
                break
    return elected


def _innermost_loop(loops, addr):
    inside = [lp for lp in loops if lp.contains(addr)]
    return max(inside, key=lambda lp: lp.depth, default=None)


def _prologue_loads(instrs, loops, main_end):
    """Loads outside a loop at the source location of a load inside it: the pipeliner's prologue copies."""
    out = set()
    for lp in loops:
        inner_locs = {(i.loc, i.inlined_at) for i in instrs
                      if lp.contains(i.addr) and i.base in GLOBAL_LOADS and _innermost_loop(loops, i.addr) is lp}
        for i in instrs:
            if i.addr >= main_end or lp.contains(i.addr) or i.base not in GLOBAL_LOADS:
                continue
            if (i.loc, i.inlined_at) in inner_locs and _innermost_loop(loops, i.addr) is lp.parent:
                out.add(i.addr)
    return out


def resources(cubin):
    """REG, STACK, SHARED (static) and LOCAL of the kernel, from ``cuobjdump --dump-resource-usage``."""
    out = _run_tool("cuobjdump", ["--dump-resource-usage"], cubin)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def analyse(kernel, arch):
    """Static facts of a Triton ``CompiledKernel`` for ``arch`` (its resources: run.arch_facts)."""
    cubin = kernel.asm["cubin"]
    text = _run_tool("nvdisasm", ["-c", "-gi"], cubin)
    instrs, labels, subroutines = parse_sass(text)
    main_end = min(subroutines) if subroutines else (instrs[-1].addr + 1 if instrs else 0)
    loops = _find_loops(instrs, labels, main_end)
    md = kernel.metadata
    facts = Facts(
        name=md.name, arch=arch, num_warps=md.num_warps, num_stages=md.num_stages,
        spill_instructions=sum(1 for i in instrs if i.base in ("LDL", "STL")),
        instrs=[i for i in instrs if i.addr < main_end and i.base != "NOP"],
        loops=loops, cold=_cold_addresses(instrs, labels, main_end),
        elected=_elected_addresses(instrs, labels, main_end),
        prologue_loads=_prologue_loads(instrs, loops, main_end), unmapped_loops=[])
    return facts



# ----------------------------------------------------------------------------- source loops

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
    assigned = {}
    if kernel_fn is not None:
        once = Counter(t.id for st in kernel_fn.body if isinstance(st, ast.Assign)
                       for t in st.targets if isinstance(t, ast.Name))
        assigned = {st.targets[0].id: st.value for st in kernel_fn.body if isinstance(st, ast.Assign)
                    and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name) and once[st.targets[0].id] == 1}

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


# ----------------------------------------------------------------------------- dynamic counts

@dataclasses.dataclass
class Counts:
    """Per-program dynamic counts (per thread: multiply by the warps for warp-instructions)."""
    instructions: float = 0.0
    mufu: float = 0.0
    load_bytes: float = 0.0  # per thread: times 32 lanes and the warps for the program's bytes
    store_bytes: float = 0.0
    tensor_flops: dict = dataclasses.field(default_factory=dict)  # (input dtype, opcode) -> FLOPs per program
    shared_bytes: float = 0.0  # per program: bytes through shared memory's banks (accesses and wgmma operands)
    spill_ops: float = 0.0


def per_program(facts, args, kernel_path):
    """Dynamic counts for one program of a launch with ``args``, and the hot loop's description."""
    trips = {}
    steps = {}
    dirs = [os.path.dirname(kernel_path)]
    for lp in facts.loops:
        try:
            trips[id(lp)], steps[id(lp)] = trip_count(lp, args, facts.name, dirs)
        except ValueError as e:
            facts.unmapped_loops.append(str(e))
            trips[id(lp)], steps[id(lp)] = 1, None

    def multiplier(addr):
        m, lp = 1, _innermost_loop(facts.loops, addr)
        while lp is not None:
            m *= trips[id(lp)]
            lp = lp.parent
        return m

    counts = Counts()
    per_loop = {id(lp): Counter() for lp in facts.loops}
    warpgroups = facts.num_warps / 4
    for ins in facts.instrs:
        if ins.addr in facts.cold or ins.addr in facts.elected:
            continue
        mult = multiplier(ins.addr)
        counts.instructions += mult
        lp = _innermost_loop(facts.loops, ins.addr)
        if lp is not None:
            per_loop[id(lp)]["instructions"] += 1
        if ins.base == "MUFU":
            counts.mufu += mult
            if lp is not None:
                per_loop[id(lp)]["mufu"] += 1
        if ins.base in ("LDL", "STL"):
            counts.spill_ops += mult
        if ins.base in GLOBAL_LOADS:
            if lp is not None:
                per_loop[id(lp)][f"{ins.base}.{8 * load_width(ins.op)}"] += 1
            if ins.addr not in facts.prologue_loads:
                counts.load_bytes += mult * load_width(ins.op)
        if ins.base in GLOBAL_STORES:
            counts.store_bytes += mult * load_width(ins.op)
            if lp is not None:
                per_loop[id(lp)][f"{ins.base}.{8 * load_width(ins.op)}"] += 1
        if ins.base in SHARED_ACCESSES:
            counts.shared_bytes += mult * facts.num_warps * 32 * shared_width(ins.op)
        t = tensor_op(ins.op)
        if t is not None:
            base, m, n, k, dtype, group = t
            counts.shared_bytes += mult * (warpgroups if group == 4 else 0) * shared_operand_bytes(ins.op, ins.operands)
            issuers = warpgroups if group == 4 else facts.num_warps
            key = (dtype, "HMMA" if base == "HMMA" else base)
            counts.tensor_flops[key] = counts.tensor_flops.get(key, 0) + mult * issuers * 2 * m * n * k
            if lp is not None:
                per_loop[id(lp)][ins.op] += 1
    hot = _hot_loop(facts, trips, steps, per_loop, multiplier)
    if hot and "instructions_per_element" in hot and hot["trips"]:
        # the whole kernel over the row it streams (every pass over it, plus the per-row work)
        row = hot["trips"] * hot["step"] / (32 * facts.num_warps)
        hot["kernel_instructions_per_element"] = counts.instructions / row
        hot["kernel_mufu_per_element"] = counts.mufu / row
    return counts, hot, {f"0x{lp.start:x}": trips[id(lp)] for lp in facts.loops}


def _hot_loop(facts, trips, steps, per_loop, multiplier):
    """The loop that issues the most instructions (its nested loops included), described per iteration."""
    if not facts.loops:
        return None

    def total(lp):  # instructions of one iteration of lp, its inner loops run in full
        n = per_loop[id(lp)]["instructions"]
        for child in facts.loops:
            if child.parent is lp:
                n += total(child) * trips[id(child)]
        return n

    def outer_trips(lp):
        m, p = 1, lp
        while p is not None:
            m *= trips[id(p)]
            p = p.parent
        return m

    lp = max(facts.loops, key=lambda l: total(l) * outer_trips(l) if l.parent is None else 0)
    # descend into a nested loop that carries most of the work, as long as it carries at least half
    while True:
        children = [c for c in facts.loops if c.parent is lp]
        big = max(children, key=lambda c: total(c) * trips[id(c)], default=None)
        if big is None or total(big) * trips[id(big)] < 0.5 * total(lp):
            break
        lp = big
    inner = Counter(per_loop[id(lp)])
    for child in facts.loops:  # one iteration's nested work, per iteration of lp
        p = child
        while p is not None and p.parent is not lp:
            p = p.parent
        if p is not None:
            mult = trips[id(child)]
            q = child.parent
            while q is not None and q is not lp:
                mult *= trips[id(q)]
                q = q.parent
            for k, v in per_loop[id(child)].items():
                inner[k] += v * mult
    f = lp.for_stmt
    threads = 32 * facts.num_warps
    step = steps[id(lp)]
    tensor = {k: v for k, v in inner.items() if k.split(".")[0] in TENSOR}
    out = dict(source=f"{os.path.basename(f.path)}:{f.lineno}" if f else None, trips=trips[id(lp)],
               step=step, instructions_per_iteration=inner["instructions"], mufu_per_iteration=inner["mufu"],
               loads={k: v for k, v in inner.items() if k.split(".")[0] in GLOBAL_LOADS},
               stores={k: v for k, v in inner.items() if k.split(".")[0] in GLOBAL_STORES},
               tensor=tensor)
    if step and not tensor:  # a streaming loop: `step` elements of the row per iteration
        out["elements_per_thread"] = step / threads
        out["instructions_per_element"] = inner["instructions"] * threads / step
        out["mufu_per_element"] = inner["mufu"] * threads / step
    return out


# ----------------------------------------------------------------------------- which arguments are read / written

_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_REF = re.compile(r"%([\w.$-]+)")
_ITER_ARG = re.compile(r"(%[\w.$-]+)\s*=\s*(%[\w.$-]+)")


def pointer_access(ttir):
    """(names of the pointer arguments the kernel loads from, names it stores to), from Triton's IR:
    a pointer's origin follows the pointer-typed values derived from it (addptr, splat, select, the
    loop-carried values of scf.for)."""
    head = re.search(r"tt\.func\s+public\s+@\w+\((.*?)\)\s*attributes", ttir, re.S)
    origin = {}
    if head:
        for name in re.findall(r"(%[\w.$-]+):\s*!tt\.ptr", head.group(1)):
            origin[name] = {name[1:]}
    reads, writes = set(), set()

    def refs(text):
        out = set()
        for r in _REF.findall(text):
            out |= origin.get("%" + r.split("#")[0], set())
        return out

    for _ in range(2):  # a second pass carries loop-carried pointers defined after their first use
        for line in ttir.splitlines():
            body = line.split(" loc(")[0]
            if "tt.load" in body or "tt.descriptor_load" in body or "tt.atomic" in body:
                m = re.search(r"tt\.(?:load|descriptor_load|atomic_rmw|atomic_cas)\s+(?:\w+,\s*\w+,\s*\w+,\s*)?(%[\w.$#-]+)",
                              body)
                if m:
                    reads |= refs(m.group(1))
                if "tt.atomic" in body and m:
                    writes |= refs(m.group(1))
            if re.search(r"\btt\.(store|descriptor_store)\b", body):
                m = re.search(r"tt\.(?:store|descriptor_store)\s+(%[\w.$#-]+)", body)
                if m:
                    writes |= refs(m.group(1))
            if "scf.for" in body and "iter_args(" in body:
                for new, init in _ITER_ARG.findall(body.split("iter_args(", 1)[1]):
                    origin.setdefault(new, set()).update(origin.get(init.split("#")[0], set()))
            m = _DEF.match(body)
            if not m:
                continue
            lhs, op, rest = m.groups()
            if op in ("tt.load", "tt.descriptor_load"):
                continue
            is_pointer = "!tt.ptr" in rest or "tt.tensordesc" in rest or op == "tt.make_tensor_descriptor"
            if is_pointer:
                # addptr's offset is an integer: only its base carries an origin (sibling regions, such as
                # two loops, may reuse an SSA name that is a pointer in one of them)
                o = refs(rest.split(",")[0]) if op == "tt.addptr" else refs(rest)
                if o:
                    origin.setdefault(lhs, set()).update(o)
    return reads, writes
