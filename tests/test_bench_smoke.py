"""`python -m bench` end to end on tiny sizes (no torch.compile): JSON, markdown, PNG, the table's columns,
progress without a terminal, no profiler noise; and the pieces a default CPU run relies on."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import __main__ as bench_main
from bench import cases as C
from bench.harness import peak_bytes, throttle_warnings

ROOT = Path(__file__).resolve().parents[1]
OPS = {"cross_entropy", "kd_loss", "gumbel_softmax", "sample", "infonce", "linear_cross_entropy"}
GPU_SIZED_OPS = {"softmax", "clip_loss", "nt_xent"}  # no CPU size of their own: a default CPU run leaves them out


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_python_m_bench_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_TAU_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--sizes", "8x100,8x64x16", "--budget",
                           "0.02", "--providers", "fused_tau,torch", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)  # stderr is a pipe, not a terminal: progress as lines
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "torch", "device", "ceilings", "ceilings_end"} <= set(report["environment"])
    assert report["environment"]["ceilings"]["copy_gbps"] > 0
    rows = report["results"]
    assert {r["op"] for r in rows} == OPS | GPU_SIZED_OPS  # --sizes gives every op its size
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["reps"] >= 3
        assert (r.get("gbps", 0) > 0 or r.get("tflops", 0) > 0) and r["peak_mib"] > 0
        assert r["of_ceiling"] > 0 and r["vs_eager"] > 0
    assert all(r["vs_eager"] == 1.0 for r in rows if r["provider"] == "torch")

    # progress: case i of n with an ETA, one line each, on stderr
    n = len(rows)
    assert f"[{n}/{n} " in proc.stderr and "ETA" in proc.stderr
    # no profiler or allocator noise (Kineto's USDT lines, CPUAllocator's "unknown size" warning)
    assert "USDT" not in proc.stderr and "profiler_start" not in proc.stderr
    assert "CPUAllocator" not in proc.stderr and "unknown size" not in proc.stderr

    md = out.with_suffix(".md").read_text()
    assert md.strip() in proc.stdout  # what is printed is what is written
    header = next(line for line in md.splitlines() if line.startswith("| case"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(bench_main.TABLE_COLUMNS)
    body = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(body) == n and all(line.count("|") == len(bench_main.TABLE_COLUMNS) + 1 for line in body)
    assert any(line.startswith("| cross_entropy fwd 8x100 float32 ") for line in body)
    assert "peak MiB on CPU: torch's CPU allocator" in md
    if _has_matplotlib():
        png = out.with_suffix(".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_cpu_run_leaves_out_gpu_only_and_slow_peers():
    args = bench_main.parse_args(["--device", "cpu"])
    todo, skipped = bench_main.plan(args, torch.device("cpu"))
    ran = {p for _, p in todo}
    assert ran == {"fused_tau", "torch", "torch.compile"}
    assert set(skipped) == {"liger", "cut-cross-entropy", "torch chunked"}
    assert {c.op for c, _ in todo} == OPS
    line = bench_main.skipped_line(skipped, "cpu")
    assert "liger, cut-cross-entropy: GPU-only" in line and "torch chunked" in line and "--full" in line

    full, skipped_full = bench_main.plan(bench_main.parse_args(["--device", "cpu", "--full"]), torch.device("cpu"))
    assert "torch chunked" in {p for _, p in full} and "torch chunked" not in skipped_full
    assert len({(c.op, c.n, c.c, c.d) for c, _ in full}) > len({(c.op, c.n, c.c, c.d) for c, _ in todo})

    gpu_run, gpu_skipped = C.providers("linear_cross_entropy", "cuda")
    assert set(gpu_run) == set(C.PROVIDERS["linear_cross_entropy"]) and not gpu_skipped
    assert C.sizes_for("cross_entropy", "cuda", full=False) == C.OPS["cross_entropy"]["gpu_sizes"]


def test_progress_draws_a_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    progress = bench_main.Progress(3)
    for i in range(3):
        progress.describe(f"case {i}")
        progress.step(f"result {i}")
    progress.close()
    text = err.getvalue()
    assert "3/3" in text and "result 2" in text


def test_throttle_warnings():
    steady = dict(copy_gbps=30.0, matmul_tflops=0.2, copy_spread=1.1, matmul_spread=1.1)
    assert throttle_warnings(steady, steady, dict(steady, source="x"), load=0.1) == []
    noisy = dict(steady, matmul_spread=2.5)
    assert any("matmul rate varied 2.5x" in w for w in throttle_warnings(noisy, steady))
    slower = dict(steady, copy_gbps=15.0)
    assert any("changed from 30 to 15" in w for w in throttle_warnings(steady, slower))
    assert any("50% of the 30 GB/s of x" in w for w in throttle_warnings(slower, slower, dict(steady, source="x")))
    assert any("load average 1.9" in w for w in throttle_warnings(steady, steady, load=1.9))


def test_cpu_peak_memory_counts_temporaries_and_is_silent(capfd):
    x = torch.randn(256, 1024, requires_grad=True)

    def step():
        x.grad = None
        (x / 0.5).softmax(-1).sum().backward()

    step.reset = lambda: setattr(x, "grad", None)
    step()  # a gradient from before the window, freed by reset(), not inside it
    peak = peak_bytes(step, torch.device("cpu"))
    # x / 0.5, its softmax and the gradient are alive at once: at least 3 × 1 MiB
    assert peak >= 3 * x.numel() * 4
    err = capfd.readouterr().err
    assert "USDT" not in err and "CPUAllocator" not in err


def test_latency_probe_reads_what_it_times():
    """bench/latency_probe.py (gpu_quick's DRAM latency, the model's latency constant) runs its kernel and
    reads every row it times (the checksum), here under the interpreter on CPU tensors."""
    pytest.importorskip("triton")
    from bench.latency_probe import dram_latency_ns

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns, err = dram_latency_ns(device, iters=3, programs=2, repeats=1)
    assert ns > 0 and err == 0.0
