"""Timing and peak-memory measurement shared by ``python -m bench`` and ``pytest bench``.

Time: on CUDA the median of ``triton.testing.do_bench``; on CPU the median of
repeated ``perf_counter`` timings.  Peak memory: the bytes allocated by the
call above what was allocated before it (its temporaries and outputs, not its
inputs): ``torch.cuda.max_memory_allocated`` on CUDA, the running sum of the
profiler's allocation events on CPU.
"""
import statistics
import time

import torch


def time_ms(fn, device, budget_s=1.0, min_reps=3, max_reps=50):
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up (and the first call's one-off costs)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device):
    """Peak bytes allocated while ``fn()`` runs, above the allocation before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def environment(device):
    import datetime
    import platform

    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        cpu_threads=torch.get_num_threads(),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["driver"] = _driver_version()
    return info


def _driver_version():
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi: the driver version is simply not reported
        return None
