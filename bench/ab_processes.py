"""A/B timing of checkouts on CPU, one process per side, alternating calls.

    python bench/ab_processes.py cross_entropy-fwd-256 eager=/work/main:torch before=/work/main after=.
    python bench/ab_processes.py kd_loss-fwd+bwd --threads 1 --rounds 11 --busy 1 a=/path/a b=/path/b

Each ``name=checkout[:provider]`` starts a worker process with the checkout on its PYTHONPATH that
builds the first bench case whose name starts with CASE (bench/cases.py, default sizes) and runs one
call of ``provider`` (default fused_tau; ``torch`` for the eager composition) each time it is told;
each round tells every worker once, the order reversed every other round, so that all sides see the
same load.  Unlike bench/cpu_ab.py (both sides in one process), no side inherits the other's
allocator or cache state.  Prints each side's median and min wall time, its median CPU time (all its
threads), and the first side's median over its own (> 1: faster than the first).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r'''
import json, sys, time
import torch
from bench import cases
torch.set_num_threads(int(sys.argv[2]))
case = [c for c in cases.cases("cpu") if c.name.startswith(sys.argv[1])][0]
step = cases.runner(case, sys.argv[3], cases.make_inputs(case, torch.device("cpu")))
step()
step()
print(case.name, flush=True)
for _ in sys.stdin:
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    print(json.dumps([time.perf_counter() - t0, time.process_time() - c0]), flush=True)
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", help="the start of a bench case's name, e.g. kd_loss-fwd+bwd")
    p.add_argument("sides", nargs="+", help="name=checkout[:provider]")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--busy", type=int, default=0, help="processes spinning beside the run")
    args = p.parse_args(argv)
    workers = []
    for spec in args.sides:
        name, rest = spec.split("=", 1)
        path, _, provider = rest.partition(":")
        path = os.path.abspath(path)
        proc = subprocess.Popen([sys.executable, "-c", WORKER, args.case, str(args.threads), provider or "fused_tau"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=path,
                                env=dict(os.environ, PYTHONPATH=path))
        case_name = proc.stdout.readline().strip()
        workers.append((name, proc, [], []))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        for r in range(args.rounds):
            for name, proc, wall, cpu in (workers if r % 2 == 0 else workers[::-1]):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                w, c = json.loads(proc.stdout.readline())
                wall.append(w * 1e3)
                cpu.append(c * 1e3)
    finally:
        for s in spinners:
            s.kill()
            s.wait()
        for _, proc, _, _ in workers:
            proc.stdin.close()
            proc.wait()
    print(f"{case_name}, {args.threads} threads, {args.busy} busy, {args.rounds} alternating rounds")
    first = None
    for name, _, wall, cpu in workers:
        med = statistics.median(wall)
        first = first or med
        print(f"  {name:12} wall median {med:9.2f} ms  min {min(wall):9.2f}  cpu median {statistics.median(cpu):9.2f}"
              f"  first/this {first / med:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
