"""The static structure of a kernel's SASS: its loops (backward branches) and their nesting, the cold
regions (an IEEE division's slow path), the regions only a ticket's elected program runs, the software
pipeliner's prologue loads, and :func:`analyse`, which gathers them into :class:`Facts`.  Part of the
model's SASS reader (bench/model/sass.py: its docstring says how each is counted)."""
import dataclasses
from typing import TYPE_CHECKING

from .sass_parse import _TARGET, GLOBAL_LOADS, _run_tool, parse_sass

if TYPE_CHECKING:  # Loop's annotation only (sass_trips imports this module)
    from .sass_trips import ForStmt


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
