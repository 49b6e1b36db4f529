"""kd_loss against tau**2 * F.kl_div(log_softmax(s/τ), softmax(t/τ)) (+ CE) in float64, on every backend."""
import pytest
import torch
import torch.nn.functional as F

import fused_tau
from fused_tau import reference

from .compare import check_against_reference
from .tolerances import assert_close_to_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(student, teacher, tau, target, alpha, reduction, dtype, teacher_grad=True):
    check_against_reference(
        lambda s, t, tau: fused_tau.kd_loss(s, t, tau=tau, target=target, alpha=alpha, reduction=reduction),
        lambda s, t, tau: reference.kd_loss(s, t, tau=tau, target=target, alpha=alpha, reduction=reduction),
        [student, teacher], dtype=dtype, tau=tau, grads=[True, teacher_grad], tau_scale=student.numel())


KD_TAUS = [1.0, 4.0, 0.3]
# every (reduction, target) pair the API accepts ('none' with a target is rejected: test_bad_kd_input)
KD_FORMS = [(r, t) for r in ("batchmean", "sum", "mean", "none") for t in (False, True) if not (t and r == "none")]
# fp32: every form at every τ; fp16 / bf16: every form, τ in turn (every pair of parameter values still
# meets in some case, at half the interpreter's time of the full product)
KD_CASES = [(DTYPES[0], r, t, tau) for r, t in KD_FORMS for tau in KD_TAUS] + \
    [(dtype, r, t, KD_TAUS[(i + j) % len(KD_TAUS)]) for j, dtype in enumerate(DTYPES[1:]) for i, (r, t) in enumerate(KD_FORMS)]


@pytest.mark.parametrize("dtype, reduction, with_target, tau", KD_CASES)
def test_kd_matches_reference(backend, device, dtype, reduction, with_target, tau):
    N, C = 6, 41
    s = torch.randn(N, C, device=device) * 3
    t = torch.randn(N, C, device=device) * 3
    y = None
    if with_target:
        y = torch.randint(0, C, (N,), device=device)
        y[2] = -100
    _run(s, t, tau, y, 0.7, reduction, dtype)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kd_learnable_tau_and_teacher_grad(backend, device, per_row, teacher_grad):
    s = torch.randn(2, 3, 29, device=device) * 2  # leading dims: rows are the last dim
    t = torch.randn(2, 3, 29, device=device) * 2
    tau = (torch.rand(2, 3, device=device) + 1.0) if per_row else torch.tensor(3.0, device=device)
    y = torch.randint(0, 29, (2, 3), device=device)
    _run(s, t, tau.requires_grad_(), y, 0.5, "batchmean", torch.float32, teacher_grad=teacher_grad)


def test_teacher_zero_probability_classes(backend, device):
    """Masked teacher classes (-inf: probability 0) add 0, never NaN, as F.kl_div's xlogy does."""
    s = torch.randn(4, 23, device=device)
    t = torch.randn(4, 23, device=device)
    t[:, :5] = float("-inf")
    t[1, 7:] = float("-inf")  # a teacher row that is almost one-hot
    # the reference's teacher gradient is NaN there (d xlogy(q, q)/dq = log 0 + 1): compare the rest
    _run(s, t, 2.0, None, 0.9, "batchmean", torch.float32, teacher_grad=False)
    out = fused_tau.kd_loss(s, t, tau=2.0, reduction="none")
    assert torch.isfinite(out).all() and (out[:, :5] == 0).all()
    tg = t.clone().requires_grad_()
    fused_tau.kd_loss(s, tg, tau=2.0).backward()
    assert torch.isfinite(tg.grad).all() and (tg.grad[:, :5] == 0).all()
    t64 = t.double().requires_grad_()
    reference.kd_loss(s.double(), t64, tau=2.0).backward()
    finite = torch.isfinite(t64.grad)
    assert_close_to_ref(tg.grad[finite], t64.grad[finite], torch.float32)


def test_identical_logits_give_zero(backend, device):
    x = torch.randn(5, 300, device=device) * 10
    assert abs(fused_tau.kd_loss(x, x.clone(), tau=4.0).item()) < 1e-6


def test_kd_matches_hinton_formula_in_float64(backend, device):
    """The DESIGN.md definition, literally: τ² F.kl_div(..., reduction='batchmean') (+ CE)."""
    s = torch.randn(8, 100, device=device, dtype=torch.float64)
    t = torch.randn(8, 100, device=device, dtype=torch.float64)
    y = torch.randint(0, 100, (8,), device=device)
    kd = 16 * F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean")
    torch.testing.assert_close(fused_tau.kd_loss(s, t, tau=4.0), kd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fused_tau.kd_loss(s, t, tau=4.0, target=y, alpha=0.9), 0.9 * kd + 0.1 * F.cross_entropy(s, y),
                               rtol=1e-6, atol=1e-9)


def test_kd_module(backend, device):
    s, t = torch.randn(3, 17, device=device), torch.randn(3, 17, device=device)
    y = torch.randint(0, 17, (3,), device=device)
    mod = fused_tau.KDLoss(tau=2.0, alpha=0.6, reduction="sum")
    torch.testing.assert_close(mod(s, t, y), fused_tau.kd_loss(s, t, tau=2.0, target=y, alpha=0.6, reduction="sum"))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(teacher=torch.randn(4, 6)), ValueError, "teacher must have student's shape"),
    (dict(tau=0.0), ValueError, "tau must be positive"),
    (dict(tau=-4.0), ValueError, "tau must be positive"),
    (dict(alpha=1.5), ValueError, "alpha must be a float in \\[0, 1\\]"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape \\(4,\\)"),
    (dict(target=torch.tensor([0, 1, 2, 9])), IndexError, "target holds a class index outside"),
    (dict(target=torch.zeros(4)), TypeError, "target must hold class indices"),
    (dict(target=torch.tensor([0, 1, 2, 3]), reduction="none"), ValueError, "reduction='none'"),
    (dict(student=torch.randint(0, 3, (4, 7))), TypeError, "student must be float16"),
    (dict(teacher=torch.randn(4, 7, device="meta")), ValueError, "teacher is on meta"),
])
def test_bad_kd_input(no_launch, kwargs, exc, match):
    args = dict(student=torch.randn(4, 7), teacher=torch.randn(4, 7))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fused_tau.kd_loss(**args)


def test_kd_kernels_psi_polynomial_meets_its_bound():
    """The kd kernels' h(x) = ψ(x)/x² = (e^x - 1 - x)/x² on |x| <= 1 (row_kd_fwd._psi_over_square_coefficients(7),
    its coefficients rounded to fp32 as the kernels use them) within 2e-8 relative of the float64 series:
    below half an fp32 ulp, as the 9-term Taylor series it replaced (4e-8 truncation)."""
    pytest.importorskip("triton")
    from fused_tau.kernels import row_kd_fwd

    x = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)
    h_ref = sum(x ** k / float(torch.arange(1, k + 3, dtype=torch.float64).prod()) for k in range(30))
    coeffs = torch.tensor(row_kd_fwd._psi_over_square_coefficients(7), dtype=torch.float32).double()
    h = torch.zeros_like(x)
    for c in coeffs.flip(0):
        h = h * x + c
    assert ((h - h_ref).abs() / h_ref).max().item() <= 2e-8
