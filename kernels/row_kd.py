"""Row engine, distillation: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`` per row, optionally mixed
with the hard-label cross-entropy of the student at τ = 1, from one pass over both rows: the launchers.

The kernels: row_kd_fwd.py (the forward: the lanes' online sums and teacher-weighted moments, the row's
KL in its second-order form, the per-row statistics stats[r]; its module docstring holds the formulas)
and row_kd_bwd.py (the backward: d student, d teacher and dτ from those statistics).

A NaN or +inf logit, or a teacher row with no finite logit, makes the row's loss and every gradient
NaN, as the composition; a masked teacher class (-inf, q = 0) adds exactly 0.
"""
from .row_engine import interpreted, row_launch, tau_stride
from .row_kd_bwd import _kd_bwd_kernel
from .row_kd_fwd import _kd_fwd_kernel


def kd_fwd(s2, t2, target, tau, ignore_index, kl, ce, stats, out):
    """Rows (R, C) of student and teacher logits (class stride 1).  Writes kl, ce (None without a
    target), stats ((R, 8) fp32, zero-filled by the caller) and the elementwise output (None: not wanted)
    (fused_tau._ops.kd_fwd_outputs)."""
    R, C = s2.shape
    elementwise = out is not None
    cfg = row_launch("kd_fwd", C, s2.device)
    _kd_fwd_kernel[(R,)](
        s2, t2, target if target is not None else kl, tau, kl, ce if ce is not None else kl, stats,
        out if elementwise else kl,
        C, s2.stride(0), t2.stride(0), tau_stride(tau), ignore_index,
        HAS_TARGET=target is not None, ELEMENTWISE=elementwise, LANES=cfg.lanes, CHUNK=cfg.chunk,
        BLOCK=cfg.block, INTERPRETED=interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, ds, dt, dtau):
    """Writes d student, d teacher and dτ per row (None: not wanted).  ``g``: one fp32 scale for all
    rows (1 element), one per row, or (elementwise) an (R, C) gradient; ``g_ce`` likewise, per row."""
    R, C = s2.shape
    teacher_grad, tau_grad = dt is not None, dtau is not None
    dt = dt if teacher_grad else ds
    dtau = dtau if tau_grad else stats
    if elementwise:
        g = g.contiguous()
    stride_g = 0 if (elementwise or g.numel() == 1) else 1
    cfg = row_launch("kd_bwd", C, s2.device)  # 8 a thread: 16 spill on sm_80 with the target's and τ's terms
    _kd_bwd_kernel[(R,)](
        s2, t2, target if target is not None else stats, tau, stats, g, g_ce if g_ce is not None else stats,
        ds, dt, dtau, C, s2.stride(0), t2.stride(0), tau_stride(tau), stride_g, ignore_index,
        HAS_TARGET=target is not None, ELEMENTWISE=elementwise, TEACHER_GRAD=teacher_grad,
        TAU_GRAD=tau_grad, BLOCK=cfg.block, INTERPRETED=interpreted(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
