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
    proc = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--sizes", "8x100,8x64x16", "--budget",
                           "0.05", "--providers", "fused_tau,torch", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"date", "torch", "device", "ceilings"} <= set(report["environment"])
    assert report["environment"]["ceilings"]["copy_gbps"] > 0
    rows = report["results"]
    assert {r["op"] for r in rows} == {"cross_entropy", "kd_loss", "gumbel_softmax", "sample", "infonce",
                                       "linear_cross_entropy"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and (r.get("gbps", 0) > 0 or r.get("tflops", 0) > 0) and r["peak_mib"] > 0
        assert r["of_ceiling"] > 0
    assert "| cross_entropy-fwd-8x100-float32 |" in proc.stdout
