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

The reader is four modules: sass_parse (instructions and opcode facts), sass_loops (loops, cold and
elected regions, :func:`analyse`), sass_trips (each loop's source ``for`` and trip count) and this one
(per-program counts and the hot loop, and which pointer arguments a kernel reads and writes); the
names other modules use are re-exported here.
"""
import dataclasses
import os
import re
from collections import Counter

from .sass_loops import Facts, Loop, _innermost_loop, analyse
from .sass_parse import (GLOBAL_LOADS, GLOBAL_STORES, SHARED_ACCESSES, TENSOR, Instr, load_width, nvidia_tool,
                         parse_sass, resources, shared_operand_bytes, shared_width, tensor_op)
from .sass_trips import ForStmt, ir_loops, map_loops, source_fors, trip_count

__all__ = ["Counts", "per_program", "pointer_access", "Facts", "Loop", "analyse", "GLOBAL_LOADS", "GLOBAL_STORES",
           "SHARED_ACCESSES", "TENSOR", "Instr", "load_width", "nvidia_tool", "parse_sass", "resources",
           "shared_operand_bytes", "shared_width", "tensor_op", "ForStmt", "ir_loops", "map_loops", "source_fors",
           "trip_count"]

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

    def define(frames, name, o):
        """name's origin gains o; the innermost region remembers what it was before."""
        if frames and name not in frames[-1]:
            frames[-1][name] = set(origin[name]) if name in origin else None
        origin.setdefault(name, set()).update(o)

    for _ in range(2):  # a second pass carries loop-carried pointers defined after their first use
        # the names a region defines die with it: sibling regions (a loop's body, an if's) reuse SSA names
        frames = []
        for line in ttir.splitlines():
            body = line.split(" loc(")[0]
            text = body.strip()
            if text.startswith("}") and frames:
                for name, before in frames.pop().items():
                    if before is None:
                        origin.pop(name, None)
                    else:
                        origin[name] = before
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
            m = _DEF.match(body)
            if m and m.group(2) not in ("tt.load", "tt.descriptor_load"):
                lhs, op, rest = m.groups()
                is_pointer = "!tt.ptr" in rest or "tt.tensordesc" in rest or op == "tt.make_tensor_descriptor"
                # addptr's offset is an integer: only its base carries an origin
                o = (refs(rest.split(",")[0]) if op == "tt.addptr" else refs(rest)) if is_pointer else set()
                if o:
                    define(frames, lhs, o)  # an op's results live in the region that holds the op
            if text.endswith("{"):
                frames.append({})
            if "scf.for" in body and "iter_args(" in body:  # the loop's own values, in its region
                for new, init in _ITER_ARG.findall(body.split("iter_args(", 1)[1]):
                    o = origin.get(init.split("#")[0], set())
                    if o:
                        define(frames, new, o)
        frames.clear()


    return reads, writes
