"""How fused_tau fits into training code: import without Triton, autocast, determinism, packaging."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_tau

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_TAU_BACKEND")}
    env.update(extra)
    return env


def test_import_without_triton_is_silent_and_serves_the_torch_path():
    """Where Triton is absent (macOS, CPU-only installs) the import works, says nothing, and every op
    runs on the torch path; backend_info says why."""
    script = """
import sys, warnings
sys.modules["triton"] = None  # `import triton` now raises ImportError
import torch
warnings.simplefilter("error")
import fused_tau
x = torch.randn(4, 9, requires_grad=True)
fused_tau.cross_entropy(x, torch.tensor([0, 1, 2, 3]), tau=0.5).backward()
fused_tau.infonce(torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8)).item()
info = fused_tau.backend_info()
assert all(v["backend"] == "torch" and v["why"] == "Triton does not import" for v in info.values()), info
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok" and out.stderr.strip() == ""


LOSSES = {
    "cross_entropy": (lambda x: fused_tau.cross_entropy(x, torch.arange(4) % 7, tau=0.5),
                      lambda x: F.cross_entropy(x / 0.5, torch.arange(4) % 7)),
    "kd_loss": (lambda x: fused_tau.kd_loss(x, x.detach().flip(0), tau=2.0),
                lambda x: 4.0 * F.kl_div(F.log_softmax(x / 2, -1), F.softmax(x.detach().flip(0) / 2, -1),
                                         reduction="batchmean")),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_losses_compute_and_return_fp32(backend, name, dtype):
    """Under torch.autocast a loss is fp32 as torch's own is; the input's gradient keeps its dtype."""
    ours_fn, torch_fn = LOSSES[name]
    x = torch.randn(4, 7).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = ours_fn(x), torch_fn(x)
    assert ours.dtype == theirs.dtype == torch.float32
    ours.backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(ours, theirs.float(), rtol=2e-2, atol=2e-2)


def test_autocast_tile_losses(backend):
    q, k = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16)
    queue = torch.randn(40, 16)
    x, W = torch.randn(6, 16, requires_grad=True), torch.randn(30, 16)
    y = torch.randint(0, 30, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [fused_tau.infonce(q, k, queue, tau=0.2), fused_tau.nt_xent(q, k), fused_tau.clip_loss(q, k),
                  fused_tau.linear_cross_entropy(x, W, y, tau=0.5)]
    for loss in losses:
        assert loss.dtype == torch.float32
    # autocast is off inside: fp32 inputs are multiplied in fp32, not silently in bf16
    torch.testing.assert_close(losses[0], fused_tau.infonce(q, k, queue, tau=0.2), rtol=1e-6, atol=1e-6)
    sum(losses).backward()
    assert q.grad.dtype == x.grad.dtype == torch.float32


def test_deterministic_algorithms(backend):
    """With torch.use_deterministic_algorithms(True) every op runs (no atomics, nothing to refuse) and
    gives bit-identical results and gradients twice."""
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        def run():
            torch.manual_seed(1)
            x = torch.randn(5, 23, requires_grad=True)
            q = torch.randn(5, 16, requires_grad=True)
            W = torch.randn(23, 16, requires_grad=True)
            y = torch.randint(0, 23, (5,))
            loss = (fused_tau.cross_entropy(x, y, tau=0.3, label_smoothing=0.1) + fused_tau.kd_loss(x, x.flip(0).detach())
                    + fused_tau.infonce(q, q.flip(0).detach(), torch.randn(30, 16)) + fused_tau.nt_xent(q, q.flip(0))
                    + fused_tau.linear_cross_entropy(q, W, y) + fused_tau.softmax(x, tau=0.5).sum())
            loss.backward()
            g = torch.Generator().manual_seed(3)
            draws = fused_tau.sample(x.detach(), tau=0.7, generator=g)
            return [loss.detach(), x.grad, q.grad, W.grad, draws]

        for a, b in zip(run(), run()):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.slow
def test_wheel_and_sdist_install_in_a_fresh_venv(tmp_path):
    """python -m build makes an sdist and a wheel; the wheel holds fused_tau.kernels (never a top-level
    `kernels`) and py.typed, and installs in a fresh venv where a smoke test passes."""
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = next(dist.glob("*.whl"))
    assert next(dist.glob("*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fused_tau/kernels/row_ce.py" in names and "fused_tau/py.typed" in names
    assert not any(n.startswith("kernels/") for n in names)
    venv = tmp_path / "venv"
    # the venv sees the system's torch (no multi-GB download); fused_tau itself comes only from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)], check=True,
                   timeout=300)
    smoke = """
import fused_tau, torch, pathlib, sys
assert "site-packages" in fused_tau.__file__, fused_tau.__file__
import fused_tau.kernels.row
x = torch.tensor([[1., 2., 3.]])
print(fused_tau.__version__, fused_tau.cross_entropy(x, torch.tensor([2]), tau=0.05).item())
"""
    out = subprocess.run([str(py), "-c", smoke], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, loss = out.stdout.split()
    assert version == fused_tau.__version__ and abs(float(loss) - 2.0611536e-9) < 1e-15
    console = venv / "bin" / "fused-tau"
    assert subprocess.run([str(console), "table", "--logits", "1,2,3", "--tau", "0.05", "--target", "2"],
                          cwd=tmp_path, env=_clean_env(), capture_output=True, timeout=300).returncode == 0
