"""``python -m bench``: fused_tau against the PyTorch composition (eager and torch.compile).

Ops: infonce, linear_cross_entropy, cross_entropy, kd_loss, gumbel_softmax, sample, and on a GPU
(or with --full / --sizes) softmax, clip_loss and nt_xent (bench/cases.py).  On a GPU it runs the sizes of
real runs in bf16 (cross-entropy N = 8192
and 32768 × C = 32000 and 128256; kd_loss N = 8192; gumbel_softmax and sample 64 × 256000)
against every peer; on a CPU the torch path at sizes a 2-core machine does in about three
minutes, against the peers that run on a CPU (``--full``: more sizes and "torch chunked").
It shows its progress on stderr, prints a table (min / median / max ms, the speed-up over
eager torch, rate, share of the ceiling, peak memory) and writes it as markdown, every raw
number as JSON and, where matplotlib is installed, a plot of time against size (default
bench/results/<device>-<date>.{json,md,png}).
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from . import cases as C
from .harness import (CPU_MEMORY_NOTE, CUDA_MEMORY_NOTE, ceilings, environment, load_average, peak_bytes,
                      throttle_warnings, time_stats)

RESULTS = Path(__file__).parent / "results"
CPU_BUDGET_S = 0.5


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(C.OPS), help="comma-separated ops (default: all)")
    p.add_argument("--sizes", default=None,
                   help="N x C list, e.g. '8192x32000,32768x128256' (default: each op's, by device)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--providers", default="all",
                   help="comma-separated providers, or 'all' (each op's peers that run on the device; "
                        "a missing one is reported)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--full", action="store_true",
                   help="on a CPU: more sizes and the slow peers (torch chunked); tens of minutes")
    p.add_argument("--out", default=None,
                   help="JSON file; the .md and .png go beside it (default bench/results/<device>-<date>.json)")
    p.add_argument("--budget", type=float, default=CPU_BUDGET_S,
                   help=f"seconds of timing per case and provider on CPU, at least 3 calls (default {CPU_BUDGET_S})")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p.parse_args(argv)


class Progress:
    """Case i of n with an ETA on stderr: a tqdm bar on a terminal, one line per case otherwise
    (a log file gets no carriage returns) or where tqdm is not installed."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def describe(self, text):
        if self.bar is not None:
            self.bar.set_description_str(text[:60])

    def step(self, line):
        self.done += 1
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done:{len(str(self.total))}}/{self.total} {_clock(elapsed)} ETA {_clock(eta)}] {line}",
              file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _clock(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def plan(args, device):
    """[(case, provider)] to run, and {provider: reason} for the peers left out."""
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")] if args.sizes else None
    dtypes = [getattr(torch, args.dtype)] if args.dtype else None
    todo, skipped = [], {}
    for case in C.cases(device.type, ops=args.ops.split(","), sizes=sizes, dtypes=dtypes,
                        modes=tuple(args.modes.split(",")), full=args.full):
        if args.providers == "all":
            run, left_out = C.providers(case.op, device.type, full=args.full)
            skipped.update(left_out)
        else:
            run = [p for p in args.providers.split(",") if p in C.PROVIDERS[case.op]]
        todo += [(case, p) for p in run]
    return todo, skipped


def measure(case, provider, device, budget_s, limits):
    rec = dict(case=case.name, op=case.op, mode=case.mode, n=case.n, c=case.c, d=case.d,
               dtype=str(case.dtype).replace("torch.", ""), provider=provider)
    inputs = step = None
    try:
        inputs = C.make_inputs(case, device)
        step = C.runner(case, provider, inputs)
        t = time_stats(step, device, budget_s=budget_s)
        peak = peak_bytes(step, device, compiled=provider == "torch.compile")
        rec.update(status="ok", ms=t["median"], ms_min=t["min"], ms_max=t["max"], reps=t["reps"],
                   peak_mib=None if peak is None else peak / 2**20)
        if case.bytes_moved() is not None:
            rec.update(gbps=case.bytes_moved() / t["median"] / 1e6)
            rec.update(of_ceiling=rec["gbps"] / limits["copy_gbps"])
        else:
            rec.update(tflops=case.flops() / t["median"] / 1e9)
            rec.update(of_ceiling=rec["tflops"] / limits["matmul_tflops"])
    except ImportError as exc:  # a peer that is not installed is reported as missing
        rec.update(status=f"missing: {exc.name or exc} not installed")
    except Exception as exc:  # a provider that cannot run this case is reported, not hidden
        rec.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    finally:
        inputs = step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def run(args, out=None):
    device = torch.device(args.device)
    load = load_average() if device.type == "cpu" else None
    env = environment(device)
    reference = reference_ceilings(env, exclude=out)
    limits = ceilings(device, budget_s=args.budget)
    print(f"ceilings: copy {limits['copy_gbps']:.1f} GB/s, {limits['matmul_dtype']} matmul "
          f"{limits['matmul_tflops']:.2f} TFLOP/s", file=sys.stderr, flush=True)
    early = throttle_warnings(limits, None, reference, load)
    for w in early:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    todo, skipped = plan(args, device)
    if skipped:
        print(skipped_line(skipped, device.type), file=sys.stderr, flush=True)
    progress = Progress(len(todo))
    records = []
    try:
        for case, provider in todo:
            progress.describe(f"{case.name} {provider}")
            rec = measure(case, provider, device, args.budget, limits)
            records.append(rec)
            progress.step(_line(rec))
    finally:
        progress.close()
    add_speedups(records)
    end_limits = ceilings(device, budget_s=min(args.budget, 0.2))
    env.update(ceilings=limits, ceilings_end=end_limits, load_average_before=load,
               load_average_after=load_average() if device.type == "cpu" else None)
    warnings = throttle_warnings(limits, end_limits, reference, load)
    memory = CUDA_MEMORY_NOTE if device.type == "cuda" else CPU_MEMORY_NOTE + "; n/a for torch.compile"
    for w in warnings:
        if w not in early:
            print(f"warning: {w}", file=sys.stderr, flush=True)
    return dict(environment=env, formulas=C.__doc__.strip(), memory=memory, warnings=warnings,
                skipped=skipped, full=args.full, results=records)


def add_speedups(records):
    """``vs_eager``: eager torch's median over each provider's, in the same case (> 1: faster than eager)."""
    eager = {r["case"]: r["ms"] for r in records if r["provider"] == "torch" and r["status"] == "ok"}
    for r in records:
        if r["status"] == "ok" and r["case"] in eager:
            r["vs_eager"] = eager[r["case"]] / r["ms"]


def reference_ceilings(env, exclude=None):
    """The best ceilings earlier runs on this device recorded under bench/results/ (same device name and
    thread count, and CPU model where both name one), with the file they came from; None when none did."""
    best = {}
    for path in sorted(RESULTS.glob("*.json")):
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        try:
            old = json.loads(path.read_text())["environment"]
            lim = old["ceilings"]
        except (ValueError, KeyError, TypeError, OSError):
            continue
        if old.get("device") != env["device"] or old.get("cpu_threads") != env["cpu_threads"]:
            continue
        if old.get("cpu_model") and env.get("cpu_model") and old["cpu_model"] != env["cpu_model"]:
            continue
        for key in ("copy_gbps", "matmul_tflops"):
            if lim.get(key) and lim[key] > best.get(key, 0):
                best[key] = lim[key]
                best.setdefault("sources", {})[key] = f"{path.relative_to(RESULTS.parent.parent)} " \
                                                      f"({old.get('date', '?')[:10]})"
    if not best:
        return None
    sources = sorted(set(best.pop("sources").values()))
    return dict(best, source="the run in " + " and ".join(sources))


def skipped_line(skipped, device_type):
    by_reason = {}
    for peer, reason in skipped.items():
        by_reason.setdefault(reason, []).append(peer)
    return f"skipped on {device_type}: " + "; ".join(f"{', '.join(p)}: {r}" for r, p in by_reason.items())


def _line(r):
    if r["status"] != "ok":
        return f"{r['case']} {r['provider']}: {r['status']}"
    return (f"{r['case']} {r['provider']}: {r['ms_min']:.3f} / {r['ms']:.3f} / {r['ms_max']:.3f} ms, "
            f"{_rate(r)}, {_mib(r['peak_mib'])} MiB")


def _rate(r):
    return f"{r['gbps']:.1f} GB/s" if "gbps" in r else f"{r['tflops']:.3f} TFLOP/s"


def _mib(v):
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _case_label(r):
    shape = f"{r['n']}x{r['c']}" + (f"x{r['d']}" if r["d"] else "")
    return f"{r['op']} {r['mode']} {shape} {r['dtype']}"


TABLE_COLUMNS = ("case", "provider", "min ms", "median ms", "max ms", "vs eager", "rate", "of ceiling", "peak MiB")


def table(report):
    """Markdown, aligned for a terminal: one row per case and provider (min / median / max ms, eager torch's
    median over this one's, GB/s or TFLOP/s, share of the ceiling that bounds the op, peak MiB); the
    providers that did not run are listed under it."""
    rows, notes = [], []
    for r in report["results"]:
        if r["status"] != "ok":
            notes.append(f"- {_case_label(r)}, {r['provider']}: {r['status']}")
            continue
        rows.append([_case_label(r), r["provider"], f"{r['ms_min']:.3f}", f"{r['ms']:.3f}", f"{r['ms_max']:.3f}",
                     f"{r['vs_eager']:.2f}x" if "vs_eager" in r else "-", _rate(r),
                     f"{100 * r['of_ceiling']:.0f}%", _mib(r["peak_mib"])])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(TABLE_COLUMNS)]
    right = [False, False] + [True] * (len(TABLE_COLUMNS) - 2)

    def fmt(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    lines = [fmt(TABLE_COLUMNS),
             "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"]
    lines += [fmt(row) for row in rows]
    if notes:
        lines += ["", "Not measured:"] + notes
    return "\n".join(lines)


def markdown(report):
    env = report["environment"]
    lim, end = env["ceilings"], env["ceilings_end"]
    head = [f"# python -m bench{' --full' if report.get('full') else ''}: {env['device']}",
            "",
            f"device: {env['device']}" + (f" ({env['cpu_model']}, {env['cpu_threads']} threads)"
                                          if not env.get("cuda") else f", CUDA {env['cuda']}")
            + f", torch {env['torch']}, triton {env['triton']}, {env['date']}",
            f"ceilings: copy {lim['copy_gbps']:.1f} GB/s, {lim['matmul_dtype']} matmul "
            f"{lim['matmul_tflops']:.3f} TFLOP/s at the start; {end['copy_gbps']:.1f} GB/s, "
            f"{end['matmul_tflops']:.3f} TFLOP/s at the end"]
    if env.get("load_average_before") is not None:
        head.append(f"load average (1 min): {env['load_average_before']:.2f} before, "
                    f"{env['load_average_after']:.2f} after")
    head += ["", "ms: min / median / max of the calls; vs eager: eager torch's median over the provider's "
                 "(> 1 is faster); rate: GB/s of the bytes the op must move, or TFLOP/s of the matmuls it must "
                 "do (bench/cases.py), and its share of the copy or matmul ceiling; " + report["memory"] + "."]
    if report["skipped"]:
        head.append(skipped_line(report["skipped"], "cpu" if not env.get("cuda") else "cuda") + ".")
    for w in report["warnings"]:
        head.append(f"**warning:** {w}: the timings may be inflated.  ")
    return "\n".join(head) + "\n\n" + table(report) + "\n"


def plot(report, path):
    """Median ms (bars: min to max) against size (elements of the logits, N·C), one panel per op and mode,
    one colour per provider, log-log; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in report["results"] if r["status"] == "ok"]
    panels = list(dict.fromkeys((r["op"], r["mode"]) for r in ok))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    style = {p: (f"C{i}", "osD^vP*X"[i % 8]) for i, p in enumerate(providers)}
    several_dtypes = len({r["dtype"] for r in ok}) > 1
    handles = {}
    for ax, (op, mode) in zip(axes.flat, panels):
        series = {}
        for r in ok:
            if (r["op"], r["mode"]) == (op, mode):
                key = (r["provider"], r["dtype"], r["d"])
                series.setdefault(key, []).append((r["n"] * r["c"], r["ms"], r["ms_min"], r["ms_max"]))
        dims = sorted({d for _, _, d in series})
        for (provider, dtype, d), pts in series.items():
            pts.sort()
            label = provider + (f" {dtype}" if several_dtypes else "") + (f" D={d}" if len(dims) > 1 else "")
            color, marker = style[provider]
            h = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], capsize=2, color=color, marker=marker,
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            linestyle="--" if dtype == "float32" and several_dtypes else "-")
            handles.setdefault(label, h)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{op} {mode}" + (f", D={dims[0]}" if len(dims) == 1 and dims[0] else ""), fontsize=10)
        ax.set_xlabel("elements of the logits (N·C)", fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = report["environment"]
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle(f"python -m bench: median ms (bars: min to max) against size; {env['device']}, "
                 f"torch {env['torch']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_out(device):
    import datetime

    env_device = environment(device)["device"]
    name = re.sub(r"[^A-Za-z0-9]+", "-", env_device).strip("-").lower() or "device"
    return RESULTS / f"{name}-{datetime.datetime.now(datetime.timezone.utc).date().isoformat()}.json"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out) if args.out else default_out(torch.device(args.device))
    report = run(args, out=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    png = None if args.no_plot else plot(report, out.with_suffix(".png"))
    print(text)
    written = [out, out.with_suffix(".md")] + ([png] if png else [])
    print("written: " + ", ".join(os.path.relpath(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
