"""bench/train_moco.py: a few MoCo steps with fused_tau and with the composition agree to 1e-5."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_moco import main, parse_args, train  # noqa: E402

pytestmark = pytest.mark.slow  # minutes, not seconds: `pytest -m "not slow"` leaves it out


def test_fused_and_composition_curves_agree(monkeypatch):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "torch")
    args = parse_args(["--steps", "6", "--batch", "64", "--device", "cpu"])
    fused = train(args, "fused_tau", progress=False)
    composition = train(args, "composition", progress=False)
    assert len(fused) == len(composition) == 6
    assert max(abs(a - b) for a, b in zip(fused, composition)) < 1e-5


def test_script_writes_curve_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "torch")
    assert main(["--steps", "3", "--batch", "32", "--queue", "1024", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "train_moco.json").read_text()
    assert '"max_abs_difference"' in report
    png = (tmp_path / "train_moco.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compiled_steps_agree(monkeypatch):
    """--compile: the step's forward (encoders, momentum update, loss) under torch.compile(fullgraph=True)."""
    monkeypatch.setenv("FUSED_TAU_BACKEND", "torch")
    import torch

    torch._dynamo.reset()
    args = parse_args(["--steps", "3", "--batch", "32", "--queue", "1024", "--device", "cpu", "--compile"])
    fused = train(args, "fused_tau", progress=False)
    eager = train(parse_args(["--steps", "3", "--batch", "32", "--queue", "1024", "--device", "cpu"]), "fused_tau",
                  progress=False)
    composition = train(args, "composition", progress=False)
    torch._dynamo.reset()
    assert max(abs(a - b) for a, b in zip(fused, eager)) < 1e-5
    assert max(abs(a - b) for a, b in zip(fused, composition)) < 1e-5


def test_torchrun_two_ranks(tmp_path):
    """Two CPU ranks under torchrun (gloo): DDP, each rank's keys enqueued on every rank; the fused and
    composition curves (means over the ranks) agree."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FUSED_TAU_BACKEND="torch", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "bench" / "train_moco.py"), "--device", "cpu", "--steps", "3", "--batch", "16",
           "--queue", "256", "--no-plot", "--out", str(tmp_path)]
    for attempt in range(2):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        # gloo sometimes aborts a rank while the process group is torn down after the run (std::terminate
        # in a destructor, after every rank passed the final barrier; seen under heavy CPU load, 2 of ~10
        # loaded runs): that teardown, not the training, is run once more
        if proc.returncode == 0 or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "train_moco.json").read_text())
    assert report["world_size"] == 2
    assert report["max_abs_difference"] < 1e-5
