"""Bad input: a clear Python exception naming the argument, raised before any launch."""
import pytest
import torch

import fused_tau


X = torch.randn(4, 7)
Y = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("op", [fused_tau.softmax, fused_tau.log_softmax, fused_tau.logsumexp])
@pytest.mark.parametrize("tau,exc", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                     (float("nan"), ValueError), (True, TypeError), ("0.1", TypeError),
                                     (None, TypeError)])
def test_bad_float_tau(no_launch, op, tau, exc):
    with pytest.raises(exc, match="tau"):
        op(X, tau=tau)


@pytest.mark.parametrize("tau,match", [
    (torch.tensor([0.5, 0.2]), "tau must be a float, a one-element tensor or a tensor of shape"),
    (torch.tensor(-0.5), "tau must be positive"),
    (torch.tensor(0.0), "tau must be positive"),
    (torch.tensor([0.5, 0.0, 1.0, 2.0]), "tau must be positive"),
    (torch.tensor(float("nan")), "tau must be positive and finite"),
    (torch.tensor(1, dtype=torch.int64), "tau must be float16"),
    (torch.tensor(0.5, device="meta"), "tau is on meta"),
])
def test_bad_tensor_tau(no_launch, tau, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_tau.cross_entropy(X, Y, tau=tau)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_tau.softmax(X, tau=tau)


def test_bad_input_tensor(no_launch):
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fused_tau.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="input must be float16"):
        fused_tau.softmax(torch.arange(5))
    with pytest.raises(IndexError, match="dim=2"):
        fused_tau.softmax(X, tau=1.0, dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        fused_tau.logsumexp(X, tau=1.0, dim=0.5)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape \\(4,\\)"),
    (dict(target=torch.tensor([0, 1, 2, 7])), IndexError, "target holds a class index outside \\[0, 7\\)"),
    (dict(target=torch.tensor([0, -1, 2, 3])), IndexError, "target holds a class index"),
    (dict(target=torch.rand(4, 6)), ValueError, "probability target must have input's shape"),
    (dict(target=torch.tensor([True, False, True, False])), TypeError, "target must hold class indices"),
    (dict(weight=torch.rand(6)), ValueError, "weight must have shape \\(7,\\)"),
    (dict(weight=torch.arange(7)), TypeError, "weight must be float16"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be a float in \\[0, 1\\]"),
    (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
    (dict(input=torch.tensor(3.0)), ValueError, "input must have at least one dimension"),
    (dict(input=torch.randint(0, 3, (4, 7))), TypeError, "input must be float16"),
    (dict(target=torch.tensor([0, 1, 2, 3], device="meta")), ValueError, "target is on meta"),
])
def test_bad_cross_entropy_arguments(no_launch, kwargs, exc, match):
    args = dict(input=X, target=Y)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_tau.cross_entropy(**args)


def test_ignore_index_is_not_out_of_range(backend):
    out = fused_tau.cross_entropy(X, torch.tensor([0, -100, 5, 1]), tau=0.5)
    assert torch.isfinite(out)


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FUSED_TAU_BACKEND must be one of"):
        fused_tau.softmax(X)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-side asserts need CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_target_check_is_async(compiled):
    """On CUDA the data checks go through torch._assert_async: no host sync, an error at the next
    sync, eager and compiled.  In a child process: a device-side assert leaves the CUDA context
    unusable for the rest of the process."""
    import subprocess
    import sys

    script = f"""
import torch, fused_tau
f = lambda x, y: fused_tau.cross_entropy(x, y)
if {compiled}:
    f = torch.compile(f, fullgraph=True)
x = torch.randn(4, 7, device="cuda")
y = torch.tensor([0, 1, 2, 9], device="cuda")
try:
    f(x, y)
    torch.cuda.synchronize()
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0])
else:
    print("no error")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "raised:" in proc.stdout, proc.stdout + proc.stderr[-2000:]
