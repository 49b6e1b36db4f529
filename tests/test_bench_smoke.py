"""`python -m bench` runs end to end and writes its JSON (tiny sizes, no torch.compile)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_m_bench_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_TAU_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--sizes", "8x100", "--budget", "0.05",
                           "--providers", "fused_tau,torch", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "torch", "device"} <= set(report["environment"])
    rows = report["results"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("fused_tau", "torch") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["gbps"] > 0 and r["peak_mib"] > 0
    assert "| cross_entropy-fwd-8x100-float32 |" in proc.stdout
