"""A/B timing of fused_tau's torch path against the eager composition on CPU, robust to a shared machine.

    python -m bench.cpu_ab                      # every CPU case of bench/cases.py and a MoCo step
    python -m bench.cpu_ab --busy 1             # the same with one spinning process beside it
    python -m bench.cpu_ab --ops kd_loss --rounds 15

Each round times one call of fused_tau, then one of the composition ("torch" in bench/cases.py),
alternately, so that both see the same load; the table gives each side's median over the rounds,
their ratio eager / fused_tau (> 1: fused_tau is faster) and the ratio's spread (the 25th and
75th percentiles of the per-round ratios).  ``moco-step`` is one step of bench/train_moco.py
(encoder forward and backward, the loss against a 65,536-key queue, SGD, enqueue).
``--busy N`` starts N processes spinning on a core (``--pin``: each pinned to core i) for
the duration of the run, and ends them afterwards.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cases as bench_cases  # noqa: E402


def _moco_runner(loss_kind, batch=256, queue_len=65536, dim=128, seed=0):
    import copy

    import torch.nn.functional as F

    import fused_tau
    from bench.train_moco import SyntheticViews, encoder
    from fused_tau import reference

    torch.manual_seed(seed)
    data = SyntheticViews(seed=seed)
    enc_q = encoder(32, dim)
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    queue = fused_tau.MoCoQueue(dim, queue_len)
    loss_fn = fused_tau.InfoNCELoss(tau=0.2)
    opt = torch.optim.SGD(enc_q.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)

    def step():
        x_q, x_k = data.batch(batch, g)
        q = F.normalize(enc_q(x_q), dim=1)
        with torch.no_grad():
            for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters()):
                p_k.mul_(0.99).add_(p_q.detach(), alpha=0.01)
            k = F.normalize(enc_k(x_k), dim=1)
        loss = loss_fn(q, k, queue) if loss_kind == "fused_tau" else reference.infonce(q, k, queue.queue, tau=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        queue.enqueue(k)
        return loss.item()  # host-ok: a training step ends with its loss read

    return step


def runners(args):
    """(name, fused_tau step, eager step) for each case asked for."""
    out = []
    for case in bench_cases.cases("cpu", ops=args.ops, modes=args.modes):
        inp_a = bench_cases.make_inputs(case, torch.device("cpu"))
        inp_b = bench_cases.make_inputs(case, torch.device("cpu"))
        out.append((case.name, bench_cases.runner(case, "fused_tau", inp_a), bench_cases.runner(case, "torch", inp_b)))
    if args.moco:
        out.append(("moco-step-256x65536x128", _moco_runner("fused_tau"), _moco_runner("composition")))
    return out


def _once(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _quantile(xs, q):
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def measure(name, ours, eager, rounds, warmup):
    for _ in range(warmup):
        ours()
        eager()
    t_ours, t_eager = [], []
    for r in range(rounds):
        # alternate which goes first, so that neither always follows the other's cache state
        if r % 2:
            t_eager.append(_once(eager))
            t_ours.append(_once(ours))
        else:
            t_ours.append(_once(ours))
            t_eager.append(_once(eager))
    ratios = [e / o for e, o in zip(t_eager, t_ours)]
    return dict(case=name, ours=statistics.median(t_ours), eager=statistics.median(t_eager),
                ratio=statistics.median(t_eager) / statistics.median(t_ours),
                q25=_quantile(ratios, 0.25), q75=_quantile(ratios, 0.75))


def _spinners(n, pin):
    procs = []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        if pin and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(p.pid, {i % os.cpu_count()})
        procs.append(p)
    return procs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="*", default=None, help="ops of bench/cases.py (default: all)")
    p.add_argument("--modes", nargs="*", default=None, help="fwd and/or fwd+bwd (default: both)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-moco", dest="moco", action="store_false", help="leave out the MoCo training step")
    p.add_argument("--busy", type=int, default=0, help="processes spinning beside the run")
    p.add_argument("--pin", action="store_true", help="pin spinner i to core i")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    args = p.parse_args(argv)
    if args.ops == ["moco"]:
        args.ops, args.moco = [], True
    if args.threads:
        torch.set_num_threads(args.threads)
    work = runners(args)
    spinners = _spinners(args.busy, args.pin)
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"{args.busy} busy process(es){' pinned' if args.pin else ''}, {args.rounds} alternating rounds, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        print(f"{'case':42} {'fused_tau ms':>12} {'eager ms':>10} {'eager/ours':>10} {'(q25..q75)':>14}", flush=True)
        rows = []
        for name, ours, eager in work:
            r = measure(name, ours, eager, args.rounds, args.warmup)
            rows.append(r)
            print(f"{r['case']:42} {r['ours']:12.2f} {r['eager']:10.2f} {r['ratio']:10.2f} "
                  f"  ({r['q25']:.2f}..{r['q75']:.2f})", flush=True)
    finally:
        for sp in spinners:
            sp.kill()
            sp.wait()
    slower = [r["case"] for r in rows if r["ratio"] < 1.0]
    print("slower than eager: " + (", ".join(slower) if slower else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
