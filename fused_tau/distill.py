"""Knowledge distillation on the row engine: ``kd_loss``.

Layers: kernels/row_kd.py (or the torch path, fused_tau/_torch_kd.py and _torch_kd_stats.py) -> ``KDFunction``
-> ``kd_loss`` -> ``KDLoss`` (fused_tau/modules.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _ops as ops
from . import reference
from ._checks import check_class_targets, check_reduction, check_same_device, check_tensor
from ._dispatch import autocast_off, backend_for, loss_under_autocast, once_differentiable
from ._tau import reduce_tau_grad, tau_for_kernel, tau_tensor
from .cross_entropy import class_indices, mean_denominator

KD_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _rows2(x):
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@dataclass(frozen=True)
class KDOptions:
    """kd_loss's options as ``KDFunction`` carries them from forward to backward."""
    alpha: float = 0.9
    reduction: str = "batchmean"
    ignore_index: int = -100


class KDFunction(torch.autograd.Function):
    """τ² KL(softmax(teacher/τ) ‖ softmax(student/τ)), reduced, optionally mixed with CE(student, target):
    ``apply(student, teacher, target, tau, options: KDOptions, backend)``."""

    @staticmethod
    @autocast_off
    def forward(ctx, student, teacher, target, tau, options, backend):
        reduction = options.reduction
        s2, t2 = _rows2(student), _rows2(teacher)
        R, C = s2.shape
        tgt = class_indices(target) if target is not None else None
        tau_k = tau_for_kernel(tau, student)
        elementwise = reduction == "none"
        kl, ce, stats, out = ops.kd_fwd(backend, s2, t2, tgt, tau_k, options.ignore_index, elementwise)
        tau2 = tau_k.reshape(-1) ** 2
        n_valid = None
        if elementwise:
            loss = out.view(student.shape)
        else:
            total = (tau2 * kl).sum()
            scale = {"batchmean": 1.0 / student.shape[0], "sum": 1.0, "mean": 1.0 / (R * C)}[reduction]
            loss = total * scale
            if tgt is not None:
                # the student's hard-label cross-entropy at τ = 1, reduced as cross_entropy's
                ce_total = ce.sum()
                if reduction != "sum":
                    n_valid = mean_denominator(tgt, None, options.ignore_index, False, R, ce.dtype)
                    ce_total = ce_total / n_valid
                loss = options.alpha * loss + (1.0 - options.alpha) * ce_total
        ctx.backend, ctx.shape, ctx.options = backend, student.shape, options
        ctx.save_for_backward(s2, t2, tgt, tau_k, stats, n_valid, tau)
        return loss  # the compute dtype: the caller rounds it (or not, under autocast)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, grad):
        s2, t2, tgt, tau_k, stats, n_valid, tau = ctx.saved_tensors
        alpha, reduction, ignore_index = ctx.options.alpha, ctx.options.reduction, ctx.options.ignore_index
        R, C = s2.shape
        teacher_grad, tau_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        g_ce = None
        if reduction == "none":
            g = grad.reshape(R, C)
        else:
            g = grad.detach().to(stats.dtype).reshape(1)
            scale = {"batchmean": 1.0 / ctx.shape[0], "sum": 1.0, "mean": 1.0 / (R * C)}[reduction]
            if tgt is not None:
                g_ce = g * (1.0 - alpha) if reduction == "sum" else g * (1.0 - alpha) / n_valid
                g = g * alpha
            g = g * scale
        ds, dt, dtau = ops.kd_bwd(ctx.backend, s2, t2, tgt, tau_k, stats, g, g_ce, ignore_index, reduction == "none",
                                     teacher_grad, tau_grad)
        ds = ds.view(ctx.shape) if ctx.needs_input_grad[0] else None
        dt = dt.view(ctx.shape) if teacher_grad else None
        if tau_grad:
            # a row whose KL is NaN, or +inf at every τ (the student -inf where the teacher is not), has no dL/dτ:
            # NaN, as the composition's, not the finite remainder of the other terms
            dtau = reduce_tau_grad(torch.where(torch.isfinite(stats[:, 4]), dtau, float("nan")), tau, 1)
        else:
            dtau = None
        return ds, dt, None, dtau, None, None


def _check(student, teacher, target, alpha, reduction):
    check_tensor(student, "student")
    check_tensor(teacher, "teacher")
    if student.ndim == 0:
        raise ValueError("student must have at least one dimension (the classes), got a 0-dim tensor")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
    check_same_device(teacher, "teacher", student, "student")
    check_reduction(reduction, KD_REDUCTIONS)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if target is not None:
        check_tensor(target, "target", floating=False)
        check_same_device(target, "target", student, "student")
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
        if tuple(target.shape) != tuple(student.shape[:-1]):
            raise ValueError(f"target must have shape {tuple(student.shape[:-1])}, got {tuple(target.shape)}")
        if reduction == "none":
            raise ValueError("reduction='none' gives the KL per element (as F.kl_div) and cannot be mixed "
                             "with the per-row cross-entropy of target: use 'batchmean', 'sum' or 'mean'")
        check_class_targets(target, student.shape[-1], -100)


def kd_loss(student: Tensor, teacher: Tensor, *, tau: float | Tensor = 4.0, target: Tensor | None = None, alpha: float = 0.9,
            reduction: str = "batchmean") -> Tensor:
    """Hinton distillation over the last dimension, in one fused pass over both logits:

    ``tau**2 * F.kl_div(F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1), reduction)``;
    with ``target``: ``alpha * that + (1 - alpha) * F.cross_entropy(student, target)`` (student at
    τ = 1, rows flattened, targets of -100 ignored; CE summed for reduction='sum', else averaged).

    Reductions as F.kl_div: 'batchmean' divides the sum by ``student.shape[0]``, 'mean' by the
    element count, 'none' returns the elementwise ``τ² q (log q - log p)``.  Teacher classes of
    zero probability add 0 (no NaN).  The teacher gets a gradient only when it requires one;
    τ may be a float, a one-element tensor or one τ per row (shape ``student.shape[:-1]``),
    and gets its gradient when it requires one.  Every argument after the logits is keyword-only.
    """
    _check(student, teacher, target, alpha, reduction)
    tau_t = tau_tensor(tau, student, tuple(student.shape[:-1]))
    backend = backend_for(student)
    if backend == "reference" or student.numel() == 0:
        return reference.kd_loss(student, teacher, tau=tau_t, target=target, alpha=alpha, reduction=reduction)
    options = KDOptions(float(alpha), reduction, -100)
    return loss_under_autocast(KDFunction.apply(student, teacher, target, tau_t, options, backend), student)

