"""softmax, log_softmax, logsumexp against the float64 reference, on every backend."""
import pytest
import torch

import fused_tau
from fused_tau import reference

from .tolerances import assert_close_to_ref

OPS = [
    (fused_tau.softmax, reference.softmax),
    (fused_tau.log_softmax, reference.log_softmax),
    (fused_tau.logsumexp, reference.logsumexp),
]
OP_IDS = ["softmax", "log_softmax", "logsumexp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _call(op, x, tau, dim, keepdim=False):
    if op in (fused_tau.logsumexp, reference.logsumexp):
        return op(x, dim, keepdim, tau=tau)
    return op(x, dim, tau=tau)


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((7, 37), -1), ((3, 16), 1), ((1, 1), -1), ((2, 33, 3), 1),
                                       ((4, 5, 2, 3), 0), ((70,), 0)])
@pytest.mark.parametrize("tau", [1e-3, 0.07, 1.0, 1e3])
def test_forward_matches_reference(backend, device, op, ref, dtype, shape, dim, tau):
    x = (torch.randn(shape, device=device) * 4).to(dtype)
    out = _call(op, x, tau, dim)
    assert out.dtype == dtype and out.device == x.device
    assert_close_to_ref(out, _call(ref, x.double(), tau, dim), dtype,
                        torch_same_dtype=_call(ref, x, tau, dim))


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau_kind", ["float", "scalar_grad", "per_row_grad"])
def test_gradients_of_x_and_tau(backend, device, op, ref, dtype, tau_kind):
    shape, dim = (3, 41, 2), 1
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    if tau_kind == "float":
        tau = 0.3
    elif tau_kind == "scalar_grad":
        tau = torch.tensor(0.3, device=device, requires_grad=True)
    else:
        tau = (torch.rand(3, device=device) + 0.2).requires_grad_()
    out = _call(op, x, tau, dim)
    g = torch.randn(out.shape, device=device)
    (out.float() * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    tau64 = tau.detach().double().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    (_call(ref, x64, tau64, dim) * g.double()).sum().backward()
    # torch's own gradient in the same dtype: softmax's backward uses the rounded output, as ours does
    x_t = x.detach().clone().requires_grad_()
    (_call(ref, x_t, tau.detach() if isinstance(tau, torch.Tensor) else tau, dim).float() * g).sum().backward()
    assert x.grad.dtype == dtype
    assert_close_to_ref(x.grad, x64.grad, dtype, torch_same_dtype=x_t.grad)
    if isinstance(tau, torch.Tensor):
        assert tau.grad.shape == tau.shape
        assert_close_to_ref(tau.grad, tau64.grad, dtype if dtype == torch.float32 else torch.bfloat16,
                            scale=shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_properties(backend, device, dtype):
    """Rows sum to 1, shift invariance, and τ → 0 tends to one-hot argmax."""
    x = torch.randn(9, 100, device=device).to(dtype)
    p = fused_tau.softmax(x, tau=0.5).float()
    torch.testing.assert_close(p.sum(-1), torch.ones(9, device=device), atol=2e-2, rtol=0)
    x32 = x.float()
    shifted = fused_tau.softmax(x32 + 100.0, tau=0.5)
    assert (shifted - fused_tau.softmax(x32, tau=0.5)).abs().max() < 1e-5
    hard = fused_tau.softmax(x.float(), tau=1e-4)
    assert torch.equal(hard.argmax(-1), x.float().argmax(-1))
    assert (hard.max(-1).values > 0.99).all()


def test_logsumexp_is_a_smooth_max(backend, device):
    """Seed 001: τ·lse(x/τ) → max(x) as τ → 0 and lse([1,2,3,4]) = 4.4402."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=device)
    assert abs(fused_tau.logsumexp(x).item() - 4.4402) < 1e-4
    assert abs(fused_tau.logsumexp(x * 10).item() - 40.00) < 1e-2
    assert abs(fused_tau.logsumexp(x / 10).item() - 1.6425) < 1e-4
    gaps = [fused_tau.logsumexp(x, tau=t).item() - 4.0 for t in (1.0, 0.1, 0.01)]
    assert gaps[0] > gaps[1] > gaps[2] >= 0 and gaps[1] < 1e-5


def test_keepdim_and_masked_rows(backend, device):
    x = torch.randn(4, 19, device=device)
    x[:, 5] = float("-inf")
    x[2] = float("-inf")  # a fully masked row: the reference gives NaN / -inf, so do we
    for op, ref in OPS:
        out = op(x, -1, tau=0.2) if op is not fused_tau.logsumexp else op(x, -1, True, tau=0.2)
        exp = ref(x.double(), -1, tau=0.2) if op is not fused_tau.logsumexp else ref(x.double(), -1, True, tau=0.2)
        assert out.shape == exp.shape
        assert_close_to_ref(out, exp, torch.float32)


def test_non_contiguous_input(backend, device):
    base = torch.randn(23, 40, device=device)
    x = base.t()[3:, ::2]  # strides (1, 80): the class dim is not unit-stride
    assert not x.is_contiguous()
    for op, ref in OPS:
        assert_close_to_ref(_call(op, x, 0.7, -1), _call(ref, x.double(), 0.7, -1), torch.float32)
    before = base.clone()
    fused_tau.softmax(x, tau=0.7)
    assert torch.equal(base, before)  # inputs are never modified


def test_empty_input(backend, device):
    x = torch.randn(0, 7, device=device)
    assert fused_tau.softmax(x, tau=0.5).shape == (0, 7)
    assert fused_tau.logsumexp(x, tau=0.5).shape == (0,)


def test_small_tau_log_softmax_keeps_precision(backend, device):
    """The argmax's log-probability is -log1p(Σ others): 2.06e-9 at τ = 0.05, not 0."""
    x = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    lp = fused_tau.log_softmax(x, tau=0.05)
    exact = reference.log_softmax(x.double(), tau=0.05)
    assert abs(lp[0, 2].item() - exact[0, 2].item()) <= 1e-6 * abs(exact[0, 2].item())
    assert lp[0, 2].item() != 0.0


@pytest.mark.parametrize("op,ref", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_leaves_output_and_input_intact(backend, device, op, ref, dtype):
    """Neither the forward's output (which the backward reads) nor the input is written to."""
    x = torch.randn(4, 37, device=device, dtype=dtype, requires_grad=True)
    out = _call(op, x, 0.5, -1)
    out_before, x_before = out.detach().clone(), x.detach().clone()
    out.backward(torch.randn_like(out))
    assert torch.equal(out.detach(), out_before)
    assert torch.equal(x.detach(), x_before)
