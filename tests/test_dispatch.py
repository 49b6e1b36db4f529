"""Dispatch: which implementation serves a call, and the reference backend."""
import pytest
import torch

import fused_tau
from fused_tau import _dispatch


def test_mode_numbers_match_the_kernels():
    row = pytest.importorskip("fused_tau.kernels.row")
    assert (row.MODE_LSE, row.MODE_SOFTMAX, row.MODE_LOG_SOFTMAX) == (
        _dispatch.MODE_LSE, _dispatch.MODE_SOFTMAX, _dispatch.MODE_LOG_SOFTMAX)


def test_default_backend(monkeypatch):
    monkeypatch.delenv("FUSED_TAU_BACKEND", raising=False)
    assert _dispatch.backend_for(torch.zeros(2)) == "torch"  # CPU tensors: the torch path
    if torch.cuda.is_available() and _dispatch.triton_available():
        assert _dispatch.backend_for(torch.zeros(2, device="cuda")) == "triton"
        assert _dispatch.backend_for(torch.zeros(2, device="cuda", dtype=torch.float64)) == "torch"


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "reference")
    assert _dispatch.backend_for(torch.zeros(2)) == "reference"
    monkeypatch.setenv("FUSED_TAU_BACKEND", "torch")
    assert _dispatch.backend_for(torch.zeros(2)) == "torch"
    if _dispatch.triton_available():
        monkeypatch.setenv("FUSED_TAU_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                _dispatch.backend_for(torch.zeros(2))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _dispatch.backend_for(torch.zeros(2)) == "triton"
        assert _dispatch.backend_for(torch.zeros(2, dtype=torch.float64)) == "torch"


def test_reference_backend_is_the_composition(monkeypatch):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "reference")
    x = torch.randn(3, 5, requires_grad=True)
    y = torch.tensor([0, 4, 2])
    out = fused_tau.cross_entropy(x, y, tau=0.3, label_smoothing=0.1)
    assert out.grad_fn is not None and "CrossEntropyFunction" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, torch.nn.functional.cross_entropy(x / 0.3, y, label_smoothing=0.1))


def test_float64_keeps_float64(monkeypatch):
    monkeypatch.delenv("FUSED_TAU_BACKEND", raising=False)
    x = torch.randn(4, 9, dtype=torch.float64)
    y = torch.randint(0, 9, (4,))
    out = fused_tau.cross_entropy(x, y, tau=0.05)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.nn.functional.cross_entropy(x / 0.05, y), rtol=1e-12, atol=0)
