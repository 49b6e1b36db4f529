"""``python -m bench``: fused_tau against the PyTorch composition (eager and torch.compile).

Ops: cross_entropy, kd_loss, gumbel_softmax, sample (bench/cases.py).  On a GPU it
runs the sizes of real runs in bf16 (cross-entropy N = 8192 and 32768 × C = 32000
and 128256; kd_loss N = 8192; gumbel_softmax and sample 64 × 256000); on a CPU the
torch path at sizes a 2-core machine can do.  It
prints a table and writes every raw number to a JSON file (default
bench/results/<device>-<date>.json).
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from . import cases as C
from .harness import ceilings, environment, peak_bytes, time_ms


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(C.OPS), help="comma-separated ops (default: all)")
    p.add_argument("--sizes", default=None,
                   help="N x C list, e.g. '8192x32000,32768x128256' (default: each op's, by device)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--providers", default="all",
                   help="comma-separated providers, or 'all' (each op's peers; a missing one is reported)")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--out", default=None, help="JSON file (default bench/results/<device>-<date>.json)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case on CPU")
    return p.parse_args(argv)


def run(args):
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")] if args.sizes else None
    dtypes = [getattr(torch, args.dtype)] if args.dtype else None
    records = []
    limits = ceilings(device, budget_s=args.budget)
    print(f"ceilings: copy {limits['copy_gbps']:.1f} GB/s, {limits['matmul_dtype']} matmul "
          f"{limits['matmul_tflops']:.2f} TFLOP/s", file=sys.stderr, flush=True)
    for case in C.cases(device.type, ops=args.ops.split(","), sizes=sizes, dtypes=dtypes,
                        modes=tuple(args.modes.split(","))):
        providers = list(C.PROVIDERS[case.op]) if args.providers == "all" else args.providers.split(",")
        for provider in providers:
            rec = dict(case=case.name, op=case.op, mode=case.mode, n=case.n, c=case.c, d=case.d,
                       dtype=str(case.dtype).replace("torch.", ""), provider=provider)
            try:
                inputs = C.make_inputs(case, device)
                step = C.runner(case, provider, inputs)
                ms = time_ms(step, device, budget_s=args.budget)
                peak = peak_bytes(step, device, compiled=provider == "torch.compile")
                rec.update(status="ok", ms=ms, peak_mib=None if peak is None else peak / 2**20)
                if case.bytes_moved() is not None:
                    rec.update(gbps=case.bytes_moved() / ms / 1e6)
                    rec.update(of_ceiling=rec["gbps"] / limits["copy_gbps"])
                else:
                    rec.update(tflops=case.flops() / ms / 1e9)
                    rec.update(of_ceiling=rec["tflops"] / limits["matmul_tflops"])
            except ImportError as exc:  # a peer that is not installed is reported as missing
                rec.update(status=f"missing: {exc.name or exc} not installed")
            except Exception as exc:  # a provider that cannot run this case is reported, not hidden
                rec.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            finally:
                inputs = step = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            records.append(rec)
            print(_line(rec), file=sys.stderr, flush=True)
    env = environment(device)
    env["ceilings"] = limits
    return dict(environment=env, formulas=C.__doc__.strip(), results=records)


def _line(r):
    if r["status"] != "ok":
        return f"{r['case']:48} {r['provider']:17} {r['status']}"
    return (f"{r['case']:48} {r['provider']:17} {r['ms']:10.3f} ms {_rate(r):>16} "
            f"{_mib(r['peak_mib']):>10} MiB")


def _rate(r):
    return f"{r['gbps']:.1f} GB/s" if "gbps" in r else f"{r['tflops']:.2f} TFLOP/s"


def _mib(v, fmt="{:.1f}"):
    return "n/a" if v is None else fmt.format(v)


def table(report):
    """Markdown: one row per case, each provider's ms (GB/s or TFLOP/s, peak MiB), fused_tau's share of
    the ceiling that bounds it, and its speed-up over each peer."""
    by_case = {}
    providers = []
    for r in report["results"]:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
        if r["provider"] not in providers:
            providers.append(r["provider"])
    head = "| case | " + " | ".join(f"{p} ms (rate, MiB)" for p in providers) + " | fused_tau of ceiling"
    others = [p for p in providers if p != "fused_tau"]
    head += " | " + " | ".join(f"speed-up vs {p}" for p in others) + " |"
    lines = [head, "|" + "---|" * (2 + len(providers) + len(others))]
    for case, row in by_case.items():
        cells = []
        for p in providers:
            r = row.get(p)
            rate = (f"{r['gbps']:.1f}" if "gbps" in r else f"{r['tflops']:.2f}") if r and r["status"] == "ok" else ""
            cells.append(f"{r['ms']:.3f} ({rate}, {_mib(r['peak_mib'], '{:.0f}')})" if r and r["status"] == "ok"
                         else (r["status"][:40] if r else "-"))
        ours = row.get("fused_tau")
        cells.append(f"{100 * ours['of_ceiling']:.0f}%" if ours and ours["status"] == "ok" else "-")
        for p in others:
            r = row.get(p)
            ok = ours and r and ours["status"] == "ok" and r["status"] == "ok"
            cells.append(f"{r['ms'] / ours['ms']:.2f}x" if ok else "-")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_out(report):
    env = report["environment"]
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower() or "device"
    return Path(__file__).parent / "results" / f"{name}-{env['date'][:10]}.json"


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out) if args.out else default_out(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    env = report["environment"]
    lim = env["ceilings"]
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}")
    print(f"ceilings: copy {lim['copy_gbps']:.1f} GB/s, {lim['matmul_dtype']} matmul {lim['matmul_tflops']:.2f} TFLOP/s")
    print(table(report))
    print(f"\nraw numbers: {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
