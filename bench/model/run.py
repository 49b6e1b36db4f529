"""The model's cases, their predictions and the written table (its checks: checks.py)."""
import dataclasses
import datetime
import inspect
import json
from collections import defaultdict
from pathlib import Path

import torch

from .. import cases as C
from . import roofline as R
from . import sass
from .capture import ARCHS, capture, count_torch, merge_arch, unique_bytes

RESULTS = Path(__file__).resolve().parents[1] / "results"

# (op, N, C or K or V, D): bf16, every mode the op has (bench/cases.py OPS); a new op adds its case here
MODEL_SIZES = [
    ("cross_entropy", 8192, 32000, 0), ("cross_entropy", 8192, 128256, 0), ("cross_entropy", 64, 256000, 0),
    ("softmax", 8192, 32000, 0), ("kd_loss", 8192, 128256, 0), ("sample", 64, 256000, 0),
    ("gumbel_softmax", 64, 256000, 0), ("infonce", 256, 65536, 128), ("infonce", 4096, 65536, 128),
    ("clip_loss", 4096, 4096, 512), ("nt_xent", 4096, 8192, 128), ("linear_cross_entropy", 8192, 128256, 4096),
]


def model_cases(ops=None):
    out = []
    for op, n, c, d in MODEL_SIZES:
        if ops and op not in ops:
            continue
        for mode in C.OPS[op]["modes"]:
            out.append(C.Case(op, n, c, torch.bfloat16, mode, d))
    return out


# ----------------------------------------------------------------------------- per launch

class Analyser:
    """Facts and counts per compiled kernel, computed once per run."""

    def __init__(self):
        self._facts, self._counts, self._access = {}, {}, {}

    def facts(self, launch, arch):
        kernel = launch.compiled[arch]
        key = (kernel.hash, arch)
        if key not in self._facts:
            f = sass.analyse(kernel, arch)
            sass.map_loops(f, inspect.getsourcefile(launch.fn.fn), kernel.asm["ttgir"])
            self._facts[key] = f
        return self._facts[key]

    def counts(self, launch, arch):
        f = self.facts(launch, arch)
        scalars = tuple(sorted((k, getattr(v, "value", v)) for k, v in launch.args.items()
                               if isinstance(getattr(v, "value", v), (int, float, bool))))
        key = (launch.compiled[arch].hash, arch, scalars)
        if key not in self._counts:
            self._counts[key] = sass.per_program(f, launch.args, inspect.getsourcefile(launch.fn.fn))
        return self._counts[key]

    def dram_bytes(self, launch):
        kernel = launch.compiled[ARCHS[0]]
        if kernel.hash not in self._access:
            self._access[kernel.hash] = sass.pointer_access(kernel.asm["ttir"])
        reads, writes = self._access[kernel.hash]

        def footprint(names):
            seen = {}
            for name in names:
                t = launch.args.get(name)
                if isinstance(t, torch.Tensor):
                    seen[(t.data_ptr(), unique_bytes(t))] = unique_bytes(t)
            return sum(seen.values())

        return footprint(reads), footprint(writes), sorted(reads), sorted(writes)


def arch_facts(kernel, arch, programs, spill_instructions=None):
    """Registers, shared memory (Triton's launch figure plus any static), spills and occupancy of a compiled
    kernel, from ``cuobjdump --dump-resource-usage``; a spill shows as a stack frame or local memory
    (and, where the SASS was read, as LDL / STL instructions)."""
    res = sass.resources(kernel.asm["cubin"])
    num_warps = kernel.metadata.num_warps
    shared = int(kernel.metadata.shared) + max(0, res.get("shared", 0) - R.RESERVED_SHARED)
    resident = R.resident_blocks(arch, num_warps, res.get("reg", 0), shared)
    return dict(registers=res.get("reg", 0), shared_bytes=shared,
                shared_limit=R.ARCH_LIMITS[arch]["shared_per_block"], spill_instructions=spill_instructions,
                stack_bytes=res.get("stack", 0), local_bytes=res.get("local", 0), resident_blocks=resident,
                waves=round(programs / (R.H100.sms * resident), 3) if resident else None)


def spills_of(a):
    return bool(a["spill_instructions"] or a["stack_bytes"] or a["local_bytes"])


# Kernels whose body runs only when a value on the device says so, with the predicate (of the launch's
# bound arguments, read from the capture's real tensors) under which it runs; otherwise the launch costs
# its start only.  cross_entropy's backward scales the gradient its forward wrote unless the incoming
# gradient is 1 (kernels/row_ce.py, _ce_grad_rescale_kernel).
CONDITIONAL_BODY = {
    "_ce_grad_rescale_kernel": ("g == 1: nothing read or written",
                                lambda args: float(args["g_ptr"].reshape(-1)[0]) != 1.0),  # host-ok: CPU capture
}


def inflight_bytes(hot, counts, num_stages):
    """Bytes of loads a thread keeps in flight: one iteration of the hot loop's (its cp.async copies
    num_stages - 1 iterations ahead), or without a loop all the program's loads at once."""
    if hot is None:
        return counts.load_bytes
    total = 0.0
    for op, n in hot["loads"].items():
        ahead = max(num_stages - 1, 1) if op.startswith("LDGSTS") else 1
        total += n * sass.load_width(op) * ahead
    return total


def launch_record(launch, analyser):
    programs = launch.programs(90)
    f90 = analyser.facts(launch, 90)
    counts, hot, trips = analyser.counts(launch, 90)
    read_bytes, write_bytes, reads, writes = analyser.dram_bytes(launch)
    # a gather (the LLM head's combine reads b's target rows, not all of b) reads no more of DRAM than it loads
    read_bytes = min(read_bytes, programs * f90.num_warps * 32 * counts.load_bytes)
    dram = read_bytes + write_bytes
    skipped_body = None
    if launch.name in CONDITIONAL_BODY and not CONDITIONAL_BODY[launch.name][1](launch.args):
        skipped_body = CONDITIONAL_BODY[launch.name][0]
        counts, dram, hot = sass.Counts(), 0, None
    rec = dict(kernel=launch.name, phase=launch.phase, count=1, grid=list(launch.grid), programs=programs,
               num_warps=f90.num_warps, num_stages=f90.num_stages,
               sm90=arch_facts(launch.compiled[90], 90, programs, f90.spill_instructions), hot_loop=hot,
               loop_trips=trips,
               per_thread=dict(instructions=counts.instructions, mufu=counts.mufu, load_bytes=counts.load_bytes,
                               store_bytes=counts.store_bytes),
               reads=reads, writes=writes, dram_bytes=dram,
               l2_bytes=programs * f90.num_warps * 32 * (counts.load_bytes + counts.store_bytes),
               tensor_flops=programs * sum(counts.tensor_flops.values()),
               shared_bytes=programs * counts.shared_bytes,
               notes=list(f90.unmapped_loops), skipped_body=skipped_body)
    for arch in ARCHS:
        if arch != 90:
            rec[f"sm{arch}"] = arch_facts(launch.compiled[arch], arch, launch.programs(arch))
    rec["time_us"], rec["limit"], rec["terms_us"] = {}, {}, {}
    rec["reread_dram_bytes"] = {}
    loaded = programs * f90.num_warps * 32 * counts.load_bytes
    rec["inflight_bytes"] = inflight = inflight_bytes(hot, counts, f90.num_stages)
    for dev in R.DEVICES:
        # row-engine kernels: a program re-reads its own rows; the tile engine's programs share their
        # operands, whose reuse across programs this does not describe
        again = 0.0 if counts.tensor_flops else R.reread_dram_bytes(dev, programs, rec["sm90"]["resident_blocks"],
                                                                     read_bytes, loaded)
        rec["reread_dram_bytes"][dev.name] = again
        latency = R.latency_seconds(dev, programs, f90.num_warps, rec["sm90"]["resident_blocks"], inflight,
                                    read_bytes + again)
        t, limit, terms = R.kernel_time(dev, programs, f90.num_warps, counts, dram + again, latency)
        rec["time_us"][dev.name] = t * 1e6
        rec["limit"][dev.name] = limit
        rec["terms_us"][dev.name] = {k: v * 1e6 for k, v in terms.items()}
    return rec


def _merge_launches(records):
    merged = {}
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k != "count"}, sort_keys=True, default=str)
        if key in merged:
            merged[key]["count"] += 1
        else:
            merged[key] = r
    return list(merged.values())


def _torch_summary(ops):
    groups = defaultdict(lambda: dict(count=0, bytes=0, flops=0))
    for op in ops:
        g = groups[(op.name, op.phase)]
        g["count"] += 1
        g["bytes"] += op.bytes
        g["flops"] += op.flops
    out = []
    for (name, phase), g in groups.items():
        g.update(op=name, phase=phase, time_us={}, limit={})
        out.append(g)
    for dev in R.DEVICES:
        per = defaultdict(lambda: [0.0, defaultdict(float)])
        for op in ops:
            t, limit = R.torch_op_time(dev, op.bytes, op.flops)
            per[(op.name, op.phase)][0] += t
            per[(op.name, op.phase)][1][limit] += t
        for g in out:
            t, limits = per[(g["op"], g["phase"])]
            g["time_us"][dev.name] = t * 1e6
            g["limit"][dev.name] = max(limits, key=limits.get)
    return out


def _limit_and_total(launches, torch_ops, dev):
    by_limit = defaultdict(float)
    for r in launches:
        by_limit[r["limit"][dev]] += r["count"] * r["time_us"][dev]
    for op in torch_ops:
        by_limit[("torch " + op["limit"][dev])] += op["time_us"][dev]
    total = sum(by_limit.values())
    return total, max(by_limit, key=by_limit.get) if by_limit else None, dict(by_limit)


def floor_seconds(case, dev):
    """The case's least time: the bytes it must move at the copy bandwidth, or the FLOPs it must do at
    the matmul rate (bench/cases.py)."""
    b, f = case.bytes_moved(), case.flops()
    return b / dev.dram_bytes_s if b is not None else f / dev.matmul_flops_s


def _drive(case, inp, arch):
    """(TritonCapture, TorchCost) of one step of fused_tau on ``case``, run as ``arch``."""
    with capture(arch) as (triton_rec, torch_rec):
        step = C.runner(case, "fused_tau", inp)
        # a first step, not counted: the steady state is modelled, not what a first call does once (a
        # workspace made on first use and kept, as kernels/row_ce.py's tickets)
        step()
        triton_rec.launches.clear()
        torch_rec.ops.clear()
        if case.mode == "fwd":
            step()
        else:  # label the launches of the backward
            step.reset()
            out = C.PROVIDERS[case.op]["fused_tau"](inp)
            triton_rec.phase = torch_rec.phase = "bwd"
            out.backward(inp.get("upstream"))
    return triton_rec, torch_rec


def model_case(case, analyser):
    """Predicted time of fused_tau and of the eager composition on one case, with every launch's facts."""
    cpu = torch.device("cpu")
    inp = C.make_inputs(case, cpu, values=False)
    runs = {arch: _drive(case, inp, arch) for arch in ARCHS}
    triton_rec, torch_rec = runs[ARCHS[0]]
    for arch in ARCHS[1:]:
        merge_arch(triton_rec.launches, runs[arch][0].launches, arch)
    with count_torch() as eager_rec:
        step = C.runner(case, "torch", inp)
        if case.mode == "fwd":
            step()
        else:
            step.reset()
            out = C.PROVIDERS[case.op]["torch"](inp)
            eager_rec.phase = "bwd"
            out.backward(inp.get("upstream"))
    launches = _merge_launches([launch_record(lch, analyser) for lch in triton_rec.launches])
    torch_ops, eager_ops = _torch_summary(torch_rec.ops), _torch_summary(eager_rec.ops)
    rec = dict(case=case.name, op=case.op, mode=case.mode, shape=[case.n, case.c] + ([case.d] if case.d else []),
               predicted_ms={}, limit={}, share={}, eager_ms={}, vs_eager={}, floor_ms={}, time_by_limit_us={})
    for dev in R.DEVICES:
        total, limit, by_limit = _limit_and_total(launches, torch_ops, dev.name)
        eager_total, _, _ = _limit_and_total([], eager_ops, dev.name)
        floor = floor_seconds(case, dev)
        rec["predicted_ms"][dev.name] = total / 1e3
        rec["limit"][dev.name] = limit
        rec["time_by_limit_us"][dev.name] = by_limit
        rec["floor_ms"][dev.name] = floor * 1e3
        rec["share"][dev.name] = floor * 1e6 / total if total else None
        rec["eager_ms"][dev.name] = eager_total / 1e3
        rec["vs_eager"][dev.name] = eager_total / total if total else None
    rec.update(launches=launches, torch_ops=torch_ops, eager_ops=eager_ops)
    return rec


def environment():
    import platform

    import triton

    return dict(date=datetime.date.today().isoformat(), triton=triton.__version__, torch=torch.__version__,
                python=platform.python_version(),
                devices={d.name: dict(dataclasses.asdict(d)) for d in R.DEVICES},
                arch_limits={f"sm{k}": v for k, v in R.ARCH_LIMITS.items()})


def run(cases, progress=None):
    analyser = Analyser()
    records = []
    for i, case in enumerate(cases):
        if progress:
            progress(i, len(cases), case)
        records.append(model_case(case, analyser))
    return dict(environment=environment(), cases=records)


def latest_table(directory=RESULTS):
    tables = sorted(directory.glob("model-*.json"))
    return tables[-1] if tables else None


# ----------------------------------------------------------------------------- the table

def _ms(v):
    return f"{v:.3g}" if v >= 0.1 else f"{v:.2g}"


def _hot(lch):
    hot = lch["hot_loop"]
    if lch.get("skipped_body"):
        return f"body skipped ({lch['skipped_body']})"
    if not hot:
        return "no loop"
    loads = " ".join(f"{v}×{k}" for k, v in sorted({**hot["loads"], **hot["stores"]}.items()))
    if hot["tensor"]:
        mma = " ".join(f"{v}×{k}" for k, v in sorted(hot["tensor"].items()))
        return (f"{hot['source']}: {hot['instructions_per_iteration']} instr, {hot['mufu_per_iteration']} MUFU, "
                f"{mma}, {loads} per thread per iteration ×{hot['trips']}")
    if "instructions_per_element" in hot:
        return (f"{hot['source']}: {hot['instructions_per_element']:.1f} instr, {hot['mufu_per_element']:.2f} MUFU "
                f"per element ({hot['kernel_instructions_per_element']:.1f} and "
                f"{hot['kernel_mufu_per_element']:.2f} over the kernel); {loads} per thread per iteration "
                f"×{hot['trips']}")
    return f"{hot['source']}: {hot['instructions_per_iteration']} instr per iteration ×{hot['trips']}"


def markdown(report):
    env = report["environment"]
    lines = [f"# Performance model, {env['date']} (Triton {env['triton']}, torch {env['torch']})", "",
             "Predicted by `python -m bench.model` from the sm_90 SASS of every launch (bench/model/roofline.py "
             "says how); no GPU ran this. ms: predicted time of fused_tau; limit: what binds most of it; "
             "share: the case's floor (its bytes at the copy bandwidth or its FLOPs at the matmul rate) over "
             "the prediction; eager: the PyTorch composition's own floor (its operators' bytes at the copy "
             "bandwidth and its GEMMs at the matmul rate); vs eager: eager over fused_tau (above 1: faster).", "",
             "| case | H100 ms | H200 ms | limit H100 / H200 | share H100 / H200 | eager H100 / H200 ms | "
             "vs eager H100 / H200 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        p, s, e, v, lim = r["predicted_ms"], r["share"], r["eager_ms"], r["vs_eager"], r["limit"]
        lines.append(f"| {r['case']} | {_ms(p['h100'])} | {_ms(p['h200'])} | {lim['h100']} / {lim['h200']} | "
                     f"{100 * s['h100']:.0f}% / {100 * s['h200']:.0f}% | {_ms(e['h100'])} / {_ms(e['h200'])} | "
                     f"{v['h100']:.2f} / {v['h200']:.2f} |")
    lines += ["", "Launches (sm_90; sm_80 registers / shared memory / spills beside): grid, warps, registers, "
              "shared memory, resident blocks per SM and waves over 132 SMs; the hot loop per thread; predicted "
              "time on the H100 and its limit.", "",
              "| case | kernel ×count | grid | warps | regs sm90 / sm80 | smem KiB | blocks/SM | waves | spills | "
              "hot loop | H100 µs | limit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        for lch in r["launches"]:
            a9, a8 = lch["sm90"], lch.get("sm80", lch["sm90"])
            grid = "×".join(str(g) for g in lch["grid"] if g != 1) or "1"
            spills = ", ".join(f"sm{arch}: {a['stack_bytes'] + a['local_bytes']} B" for arch, a in ((90, a9), (80, a8))
                               if spills_of(a)) or "none"
            lines.append(f"| {r['case']} | {lch['kernel']} ×{lch['count']} ({lch['phase']}) | {grid} | "
                         f"{lch['num_warps']} | {a9['registers']} / {a8['registers']} | "
                         f"{a9['shared_bytes'] / 1024:.1f} / {a8['shared_bytes'] / 1024:.1f} | "
                         f"{a9['resident_blocks']} | {a9['waves']} | {spills} | {_hot(lch)} | "
                         f"{lch['time_us']['h100']:.1f} | {lch['limit']['h100']} |")
    lines += ["", "Constants: " + "; ".join(f"{n}: {d['sms']} SMs at {d['clock_hz'] / 1e9:.2f} GHz, copy "
                                            f"{d['dram_bytes_s'] / 1e12:.2f} TB/s, L2 {d['l2_bytes_s'] / 1e12:.1f} "
                                            f"TB/s, matmul {d['matmul_flops_s'] / 1e12:.0f} TFLOP/s, launch "
                                            f"{d['launch_s'] * 1e6:.1f} µs ({d['sources']})"
                                            for n, d in env["devices"].items()), ""]
    return "\n".join(lines)


def write(report, out):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return out


def default_out():
    return RESULTS / f"model-{datetime.date.today().isoformat()}.json"
