"""How fused_tau fits into training code: import without Triton, autocast, determinism, packaging."""
import os
import site
import subprocess
import sys
import sysconfig
import tarfile
import time
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


def _venv_env():
    """The environment of a command in the test's venv: no PYTHONPATH naming a checkout."""
    return {k: v for k, v in _clean_env().items() if k != "PYTHONPATH"}


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


def test_cli_without_triton_is_silent():
    """The CLI's commands run without Triton, on the torch path, and say why in ``info``."""
    prelude = 'import sys; sys.modules["triton"] = None\n'
    for args in (["table", "--logits", "1,2,3", "--tau", "0.5", "--target", "2"], ["info"]):
        out = _run_cli(args, prelude)
        assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
    assert "Triton does not import" in out.stdout, out.stdout


# A child process's first lines where numpy is not installed (torch and fused_tau do not need it):
# the path finder no longer finds it, so `import numpy` and importlib.util.find_spec("numpy") fail as
# they do without numpy.
HIDE_NUMPY = """
import importlib.machinery, sys
class _PathFinderWithoutNumpy(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "numpy" else super().find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _PathFinderWithoutNumpy
"""

NUMPY_IS_ABSENT = """
import importlib.util
assert "numpy" not in sys.modules and importlib.util.find_spec("numpy") is None
"""


def _run_cli(args, prelude=""):
    """``fused-tau ARGS`` (as ``python -m fused_tau``) in a child process whose first lines are ``prelude``."""
    script = prelude + f"import runpy, sys\nsys.argv = ['fused-tau', *{list(args)!r}]\n" \
                       "runpy.run_module('fused_tau', run_name='__main__', alter_sys=True)\n"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("numpy_installed", [True, False], ids=["with_numpy", "without_numpy"])
def test_import_and_cli_say_nothing(numpy_installed):
    """`import fused_tau` and the CLI print nothing on stderr, also where numpy is not installed
    (torch itself warns "Failed to initialize NumPy" as it imports there)."""
    prelude = "import sys\n" + ("" if numpy_installed else HIDE_NUMPY)
    check = "" if numpy_installed else NUMPY_IS_ABSENT
    out = subprocess.run([sys.executable, "-c", prelude + "import fused_tau\n" + check], cwd=ROOT,
                         env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr[-3000:]
    for args in (["--help"], ["table", "--logits", "1,2,3", "--tau", "0.5", "--target", "2"]):
        out = _run_cli(args, prelude)
        assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]


def test_import_loads_neither_dynamo_nor_triton():
    """Importing fused_tau and running an op on CPU tensors imports neither torch._dynamo (as long to
    import as torch itself) nor Triton: the compiler's machinery loads when something compiles, and
    Triton when an input could run on the kernels."""
    script = """
import sys, torch
before = set(sys.modules)
import fused_tau
x = torch.randn(4, 9, requires_grad=True)
fused_tau.cross_entropy(x, torch.tensor([0, 1, 2, 3]), tau=0.5).backward()
fused_tau.infonce(torch.randn(4, 8), torch.randn(4, 8), torch.randn(16, 8), tau=0.1)
print(" ".join(sorted(m for m in set(sys.modules) - before
                      if m.partition(".")[0] == "triton" or m.startswith(("torch._dynamo", "torch._inductor")))))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_backend_choice_is_marked_constant_as_torch_marks_it():
    """fused_tau marks its backend choice a constant of compiled graphs itself, without importing
    torch._dynamo; the mark must be the one torch.compiler.assume_constant_result sets."""
    from fused_tau import _dispatch

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) == {"_dynamo_marked_constant": True}
    assert _dispatch._backend_choice._dynamo_marked_constant is True


def _best_seconds(commands, runs):
    """The fastest wall time of each command (argv lists) over ``runs`` alternating rounds."""
    best = [float("inf")] * len(commands)
    for _ in range(runs):
        for i, cmd in enumerate(commands):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
            best[i] = min(best[i], time.perf_counter() - t0)
            assert out.returncode == 0, out.stderr[-3000:]
    return best


def test_import_time_close_to_torchs():
    """`import fused_tau` takes at most 1.3x `import torch` (it once took 2x, importing torch._dynamo
    and Triton), and `fused-tau --help` answers within 2 s of torch's import: best of 3 alternating
    runs, each in a fresh process, so that a busy machine slows both sides alike."""
    torch_s, fused_s, help_s = _best_seconds([[sys.executable, "-c", "import torch"],
                                              [sys.executable, "-c", "import fused_tau"],
                                              [sys.executable, "-m", "fused_tau", "--help"]], runs=3)
    assert fused_s <= 1.3 * torch_s, f"import fused_tau {fused_s:.2f} s, import torch {torch_s:.2f} s"
    assert help_s <= torch_s + 2.0, f"fused-tau --help {help_s:.2f} s, import torch {torch_s:.2f} s"


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


def _running_site_dirs():
    """The site-packages directories of the interpreter running the suite (a venv's own, and the
    base's where that venv sees system packages), where torch and the test tools are."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    dirs += [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


SDIST_TEST_FILES = ("pytest.ini", "tests/__init__.py", "tests/conftest.py", "tests/tolerances.py",
                    "tests/cli_support.py", "tests/test_ecosystem.py")


@pytest.mark.slow
def test_wheel_and_sdist_install_in_a_fresh_venv(tmp_path):
    """python -m build makes an sdist and a wheel; the wheel holds fused_tau.kernels (never a top-level
    `kernels`), py.typed and the LICENSE, the sdist the tests with what they need to run, and the wheel
    installs in a fresh venv where a smoke test and the console script pass."""
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = next(dist.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fused_tau/kernels/row_ce.py" in names and "fused_tau/py.typed" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [f for f in ("LICENSE", "README.md", "setup.py", *SDIST_TEST_FILES) if f not in members]
    assert not missing, f"the sdist lacks {missing}"
    assert {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} <= members

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    # The new venv sees the running environment's packages (torch: no multi-GB download) after its own,
    # whether the suite runs in a venv or in the system's Python; fused_tau itself comes only from the wheel.
    (venv_site / "running_env.pth").write_text("\n".join(_running_site_dirs()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)], check=True,
                   timeout=300)
    smoke = """
import fused_tau, torch, pathlib, sys
assert pathlib.Path(fused_tau.__file__).is_relative_to(sys.argv[1]), fused_tau.__file__
import fused_tau.kernels.row
x = torch.tensor([[1., 2., 3.]])
print(fused_tau.__version__, fused_tau.cross_entropy(x, torch.tensor([2]), tau=0.05).item())
"""
    out = subprocess.run([str(py), "-c", smoke, str(venv_site)], cwd=tmp_path, env=_venv_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, loss = out.stdout.split()
    assert version == fused_tau.__version__ and abs(float(loss) - 2.0611536e-9) < 1e-15
    console = venv / "bin" / "fused-tau"
    out = subprocess.run([str(console), "table", "--logits", "1,2,3", "--tau", "0.05", "--target", "2"],
                         cwd=tmp_path, env=_venv_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
