"""The SASS of a compiled kernel as instructions, and what an opcode does (the bytes a load, store or
shared-memory access moves, a tensor-core instruction's shape and dtype); ``nvdisasm`` and ``cuobjdump``
ship with Triton.  Part of the model's SASS reader (bench/model/sass.py)."""
import dataclasses
import os
import re
import subprocess
import tempfile

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


def resources(cubin):
    """REG, STACK, SHARED (static) and LOCAL of the kernel, from ``cuobjdump --dump-resource-usage``."""
    out = _run_tool("cuobjdump", ["--dump-resource-usage"], cubin)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}
