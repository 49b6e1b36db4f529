"""``python -m bench.gpu_quick``: one short GPU lease, measured beside the model's prediction.

In order, each result written as one JSON line the moment it is measured (a killed run keeps what
it had), and printed beside the prediction of the newest committed bench/results/model-*.json:
  0. the row engine's last-arriver combines (few long rows: the programs of a split row take a ticket,
     the last one combines), which no GPU has run yet: repeated runs bit-identical, and against float64;
     sample's draws by inversion against their softmax (χ²);
  1. the ceilings the model takes as constants: device-to-device copy bandwidth (bytes read + written),
     the 8192^3 bf16 matmul rate on random data, a copy that stays in L2 (its read + write bandwidth),
     the time of a tiny kernel back to back (eager launches and replayed from a CUDA graph), and the
     DRAM load latency (bench/latency_probe.py, the model's latency term);
  2. every case of the model (bench/model/run.py), fused_tau and the eager composition, then the peers
     that are installed (Liger-Kernel, cut-cross-entropy: linear_cross_entropy only);
  3. torch.compile of the composition (dynamic shapes), as long as the time budget lasts.
Inputs are drawn on the GPU; a case whose inputs fit in L2 several times over rotates among several
input sets, so that it is not timed from the cache.  Times: triton.testing.do_bench, median ms.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from . import cases as C
from .harness import ceilings, environment

L2_BYTES = 60e6  # the H200's, as PyTorch reported it (KINDS.md); an H100 SXM has 50 MB
ROTATE_BYTES = 4 * L2_BYTES


def _bench(fn, rep_ms=100):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def measure_ceilings(device):
    base = ceilings(device)  # copy (1 GiB fp32 each way) and matmul (8192^3 bf16, random)
    small = torch.empty(int(L2_BYTES / 8) // 4, device=device, dtype=torch.float32).fill_(1.0)  # 7.5 MB each way
    dst = torch.empty_like(small)
    l2_ms = _bench(lambda: dst.copy_(small))
    one = torch.zeros(1, device=device)
    n = 200

    def eager():
        for _ in range(n):
            one.add_(1)

    eager_us = _bench(eager) * 1e3 / n
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        eager()  # warm up on the side stream before capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        eager()
    graph_us = _bench(graph.replay) * 1e3 / n
    return dict(copy_gbps=base["copy_gbps"], matmul_tflops=base["matmul_tflops"],
                l2_copy_gbps=2 * small.numel() * 4 / l2_ms / 1e6, launch_us_eager=eager_us, launch_us_graph=graph_us,
                copy_spread=base["copy_spread"], matmul_spread=base["matmul_spread"])


def check_last_arrivers(device, repeats=20, shape=(64, 256000)):
    """Few long rows (64 × 256000 bf16, split across programs; the last program of each row combines, and
    for mean / sum the last row's reduces the rows): cross_entropy, logsumexp and sample run ``repeats``
    times must give the same bits each time, and cross_entropy / τ·logsumexp agree with float64 on the GPU
    (relative error; the outputs are bf16, as torch's: up to 2^-8 from their rounding alone)."""
    import fused_tau
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(*shape, device=device, generator=gen) * 3).to(torch.bfloat16)
    y = torch.randint(0, shape[1], shape[:1], device=device, generator=gen)
    y[3] = -100  # an ignored row
    tau = 0.07
    x64 = x.double() / tau
    results = {}
    for name, fn, ref in (
            ("cross_entropy mean", lambda: fused_tau.cross_entropy(x, y, tau=tau),
             lambda: F.cross_entropy(x64, y)),
            ("cross_entropy sum", lambda: fused_tau.cross_entropy(x, y, tau=tau, reduction="sum"),
             lambda: F.cross_entropy(x64, y, reduction="sum")),
            ("cross_entropy none", lambda: fused_tau.cross_entropy(x, y, tau=tau, reduction="none"),
             lambda: F.cross_entropy(x64, y, reduction="none")),
            ("logsumexp", lambda: fused_tau.logsumexp(x, -1, tau=tau), lambda: tau * torch.logsumexp(x64, -1)),
            ("sample", lambda: fused_tau.sample(x, tau=tau, generator=torch.Generator(device=device).manual_seed(1)),
             None)):
        outs = [fn() for _ in range(repeats)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        same = all(torch.equal(o, outs[0]) for o in outs[1:])
        err = None
        if ref is not None:
            r = ref()
            err = float(((outs[0].double() - r).abs() / r.abs().clamp_min(1e-30)).max())
        results[name] = dict(bit_identical=same, max_rel_err=err)
    return results


def check_sample_distribution(device, rows=512, cols=65536, repeats=20):
    """sample's draws by inversion on split rows: ``rows`` rows of ``cols`` logits, -inf but for four
    classes spread over the row (in different groups and splits) whose softmax at τ = 0.5 is p; the
    counts of ``rows · repeats`` draws against p by Pearson's χ² (3 degrees of freedom: above 16.3 has
    probability 1e-3 for a correct sampler), and no draw outside the four."""
    import fused_tau

    x = torch.full((rows, cols), float("-inf"), device=device)
    where = torch.tensor([3, cols // 3, cols // 2 + 5, cols - 1], device=device)
    logits = torch.tensor([0.0, 0.4, 0.8, 1.2], device=device)
    x[:, where] = logits
    tau = 0.5
    p = torch.softmax(logits.double() / tau, 0)
    gen = torch.Generator(device=device).manual_seed(7)
    draws = torch.cat([fused_tau.sample(x.to(torch.bfloat16), tau=tau, generator=gen) for _ in range(repeats)])
    counts = torch.stack([(draws == w).sum() for w in where]).double()
    n = float(draws.numel())
    chi2 = float(((counts - n * p.to(counts.device)) ** 2 / (n * p.to(counts.device))).sum())
    return dict(chi2=chi2, draws=int(n), outside=int(n - counts.sum()), counts=counts.tolist(), p=p.tolist())


try:
    import triton
    import triton.language as tl

    from fused_tau.kernels.tl_math import randint4x

    @triton.jit
    def _philox_probe(seed_ptr, q_ptr, diff_ptr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
        """Adds to diff how many of the four words of randint4x differ from tl.randint4x's."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        q = tl.load(q_ptr + i)
        seed = tl.load(seed_ptr)
        a0, a1, a2, a3 = randint4x(seed, q, INTERPRETED)
        b0, b1, b2, b3 = tl.randint4x(seed, q)
        d = (a0 != b0).to(tl.int32) + (a1 != b1).to(tl.int32) + (a2 != b2).to(tl.int32) + (a3 != b3).to(tl.int32)
        tl.atomic_add(diff_ptr, tl.sum(d, 0))
except ImportError:  # bench's CPU commands run without triton
    _philox_probe = None


def check_philox(device, n=4096):
    """The noise's Philox (kernels/tl_math.randint4x: its 64-bit products are inline PTX, which the
    interpreter never runs) against tl.randint4x, compiled, for 64-bit seeds and counters: the number
    of words that differ a seed (0 expected)."""
    from fused_tau.kernels.row_engine import interpreted

    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-2 ** 62, 2 ** 62, (n,), generator=gen).to(device)
    differ = {}
    for seed in (0, 2 ** 31 - 1, 0x1234_5678_9ABC_DEF0):
        diff = torch.zeros(1, dtype=torch.int32, device=device)
        _philox_probe[(n // 256,)](torch.tensor([seed], device=device), q, diff, BLOCK=256,
                                   INTERPRETED=interpreted())
        differ[hex(seed)] = int(diff.item())
    return dict(words=4 * n, differ=differ)


def _footprint(inp):
    seen = {}
    for v in inp.values():
        if isinstance(v, torch.Tensor):
            seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values())


def timed_step(case, provider, device):
    """A callable running one step of ``provider`` on ``case``, cycling through input sets when one set
    would sit in L2."""
    first = C.make_inputs(case, device)
    sets = [first]
    n_sets = min(8, max(1, math.ceil(ROTATE_BYTES / max(_footprint(first), 1))))
    for _ in range(n_sets - 1):
        sets.append(C.make_inputs(case, device))
    steps = [C.runner(case, provider, inp) for inp in sets]
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % len(steps)
        steps[state["i"]]()

    return step, n_sets


def load_predictions():
    from .model.run import latest_table

    path = latest_table()
    if path is None:
        return None, {}
    table = json.loads(path.read_text())
    return path.name, {r["case"]: r for r in table["cases"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_quick", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="quick.jsonl", help="JSON lines, appended as measured")
    p.add_argument("--summary", default=None, help="markdown table of measured beside predicted")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new measurements after this many seconds (torch.compile goes last)")
    p.add_argument("--ops", default=None, help="comma-separated ops (default: every case of the model)")
    p.add_argument("--device-name", default="h200", choices=("h100", "h200"),
                   help="which prediction to print beside the measurement")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m bench.gpu_quick needs a CUDA device", file=sys.stderr)
        return 2
    from .model.run import model_cases

    t0 = time.perf_counter()
    device = torch.device("cuda")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table_name, predicted = load_predictions()
    dev = args.device_name
    rows = []

    def emit(record):
        record["t_s"] = round(time.perf_counter() - t0, 1)
        with out.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        rows.append(record)

    env = environment(device)
    for peer in ("liger_kernel", "cut_cross_entropy"):
        try:
            env[peer] = __import__(peer).__dict__.get("__version__", "installed")
        except ImportError:
            env[peer] = None
    emit(dict(kind="environment", model_table=table_name, **env))
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}; predictions: {table_name} ({dev})",
          flush=True)
    try:
        checks = check_last_arrivers(device)
        emit(dict(kind="check", name="last_arrivers", results=checks))
        for name, r in checks.items():
            print(f"check {name}: bit-identical {r['bit_identical']}, max rel err vs float64 {r['max_rel_err']}",
                  flush=True)
    except Exception as e:  # noqa: BLE001 - a failing check is a result, not the end of the lease
        emit(dict(kind="check", name="last_arrivers", status="error", error=f"{type(e).__name__}: {e}"[:500]))
        print(f"check last_arrivers: error {type(e).__name__}: {e}", flush=True)
    try:
        ph = check_philox(device)
        emit(dict(kind="check", name="philox", results=ph))
        print(f"check philox: words that differ from tl.randint4x {ph['differ']} of {ph['words']} a seed", flush=True)
    except Exception as e:  # noqa: BLE001 - as above
        emit(dict(kind="check", name="philox", status="error", error=f"{type(e).__name__}: {e}"[:500]))
        print(f"check philox: error {type(e).__name__}: {e}", flush=True)
    try:
        dist = check_sample_distribution(device)
        emit(dict(kind="check", name="sample_distribution", results=dist))
        print(f"check sample distribution: chi2 {dist['chi2']:.2f} (3 dof; > 16.3 at p = 1e-3), "
              f"{dist['outside']} of {dist['draws']} draws outside the four classes", flush=True)
    except Exception as e:  # noqa: BLE001 - as above
        emit(dict(kind="check", name="sample_distribution", status="error", error=f"{type(e).__name__}: {e}"[:500]))
        print(f"check sample distribution: error {type(e).__name__}: {e}", flush=True)
    ceil = measure_ceilings(device)
    emit(dict(kind="ceilings", **ceil))
    from .model import roofline as R

    const = {d.name: d for d in R.DEVICES}[dev]
    try:
        from .latency_probe import dram_latency_ns

        lat_ns, lat_err = dram_latency_ns(device)
        emit(dict(kind="latency", dram_latency_ns=lat_ns, checksum_err=lat_err,
                  model_ns=const.dram_latency_s * 1e9))
        print(f"DRAM load latency {lat_ns:.0f} ns, one warp an SM (model {const.dram_latency_s * 1e9:.0f})",
              flush=True)
    except Exception as e:  # noqa: BLE001 - a failed probe is a result, not the end of the lease
        emit(dict(kind="latency", status="error", error=f"{type(e).__name__}: {e}"[:500]))
    print(f"copy {ceil['copy_gbps']:.0f} GB/s (model {const.dram_bytes_s / 1e9:.0f}); matmul "
          f"{ceil['matmul_tflops']:.0f} TFLOP/s (model {const.matmul_flops_s / 1e12:.0f}); L2 copy "
          f"{ceil['l2_copy_gbps']:.0f} GB/s (model L2 {const.l2_bytes_s / 1e9:.0f}); launch "
          f"{ceil['launch_us_eager']:.1f} us eager, {ceil['launch_us_graph']:.1f} us graph "
          f"(model {const.launch_s * 1e6:.1f})", flush=True)

    cases = model_cases(args.ops.split(",") if args.ops else None)
    first = ["fused_tau", "torch", "liger", "cut-cross-entropy"]
    plan = [(case, prov) for prov in first for case in cases if prov in C.PROVIDERS[case.op]]
    plan += [(case, "torch.compile") for case in cases]
    print(f"{'case':58} {'provider':18} {'ms':>9} {'model ms':>9} {'meas/model':>10}", flush=True)
    for case, provider in plan:
        if time.perf_counter() - t0 > args.budget_s:
            emit(dict(kind="skipped", case=case.name, provider=provider, reason="time budget"))
            continue
        pred = predicted.get(case.name, {})
        # fused_tau beside its prediction; the composition, eager or compiled, beside its eager floor
        model_ms = (pred.get("predicted_ms", {}).get(dev) if provider == "fused_tau"
                    else pred.get("eager_ms", {}).get(dev) if provider in ("torch", "torch.compile") else None)
        record = dict(kind="case", case=case.name, op=case.op, mode=case.mode, provider=provider, model_ms=model_ms)
        try:
            step, n_sets = timed_step(case, provider, device)
            step()  # compile / autotune / first-call costs stay out of the timing
            torch.cuda.synchronize()
            record.update(ms=_bench(step), input_sets=n_sets)
        except ImportError as e:
            record.update(status="not installed", error=str(e))
        except Exception as e:  # noqa: BLE001 - one failing peer must not stop the lease
            record.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
        finally:
            torch.cuda.empty_cache()
        emit(record)
        ms = record.get("ms")
        ratio = f"{ms / model_ms:10.2f}" if ms and model_ms else " " * 10
        shown = f"{ms:9.3f}" if ms else f"{record.get('status', ''):>9}"
        print(f"{case.name:58} {provider:18} {shown} {model_ms if model_ms is None else round(model_ms, 3)!s:>9} "
              f"{ratio}", flush=True)
    if args.summary:
        Path(args.summary).write_text(summary(rows, dev))
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def summary(rows, dev):
    lines = [f"| case | provider | measured ms | model ms ({dev}) | measured / model |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") != "case":
            continue
        ms, model = r.get("ms"), r.get("model_ms")
        lines.append(f"| {r['case']} | {r['provider']} | {'' if ms is None else f'{ms:.3f}'} | "
                     f"{'' if model is None else f'{model:.3f}'} | "
                     f"{'' if not (ms and model) else f'{ms / model:.2f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
