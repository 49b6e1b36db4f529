"""Row engine, cross-entropy: class-index and probability targets, class weights, ignore_index and
label smoothing, forward and backward (see row_engine.py for the layout and the saved statistics)."""
import torch
import triton
import triton.language as tl

from .row_engine import half_gap, interpreted, load_x, recompute_p, row_config, row_start, rows, tau_stride
from .tl_math import (exp2_scale, log1p, nan_if_posinf, online_finalize_log2, online_update_log2, to_store,
                      weighted_gap_finalize, weighted_gap_update)


@triton.jit
def _ce_coefficient(t_row, w_ptr, c, C, stride_tc, smoothing,
                    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr):
    """a_c of the loss term Σ_c a_c (lse - z_c): w_c·((1-ε) t_c + ε/C) for probability
    targets, w_c·ε/C (label smoothing) for class-index targets."""
    mask = c < C
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(t_row + c.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(tl.float32)
        if SMOOTH:
            t = t * (1.0 - smoothing) + smoothing / C
        return w * t
    else:
        return w * (smoothing / C)


@triton.jit
def _ce_fwd_kernel(
    # pointers
    x_ptr, target_ptr, weight_ptr, tau_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr,
    # shapes: x is (A, C, B); class-index targets are contiguous (A*B,)
    C, B,
    # strides of x, of probability targets and of τ
    stride_xa, stride_xc, stride_xb, stride_ta, stride_tc, stride_tb, stride_tau,
    # runtime scalars
    ignore_index, smoothing,
    # constants
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row, z = x/τ, lse = M/τ + log1p(S) (M = max x, row_engine.py):
    class index y: loss = (1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c), 0 if y == ignore_index;
    probabilities t: loss = Σ_c w_c ((1-ε) t_c + ε/C) (lse - z_c).
    lse - z_y is formed as (M - x_y)·(1/τ) + log1p(S): exact when y is the argmax at small τ, and
    Σ_c a_c (M - x_c) (non-negative terms) is summed in x units and scaled by 1/τ once."""
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    t_row = target_ptr + a * stride_ta + b * stride_tb
    scale = exp2_scale(tau)
    inv_tau = 1.0 / tau
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    A = tl.zeros([BLOCK], tl.float32)
    D = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        x = load_x(x_row, c, C, stride_xc)
        if PROB_TARGET or SMOOTH:
            coef = _ce_coefficient(t_row, weight_ptr, c, C, stride_tc, smoothing,
                                   HAS_WEIGHT, PROB_TARGET, SMOOTH)
            A, D = weighted_gap_update(m, A, D, x, coef)
        m, s = online_update_log2(m, s, x, scale)
    M, S = online_finalize_log2(m, s, scale)
    S = nan_if_posinf(M, S)
    log_total = log1p(S)
    tl.store(m_ptr + r, M)
    tl.store(s_ptr + r, S)
    loss = 0.0
    if PROB_TARGET or SMOOTH:
        A_row, D_row = weighted_gap_finalize(m, A, D, M)
        tl.store(a_ptr + r, A_row)
        loss = D_row * inv_tau + A_row * log_total
    if not PROB_TARGET:
        y = tl.load(target_ptr + r)
        valid = y != ignore_index
        # An out-of-range target was reported before the launch; never read out of bounds.
        y_safe = tl.where(valid & (y >= 0) & (y < C), y, 0)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y_safe).to(tl.float32)
        else:
            w_y = 1.0
        w_y = tl.where(valid, w_y, 0.0)
        x_y = tl.load(x_row + y_safe * stride_xc).to(tl.float32)
        loss = (1.0 - smoothing) * w_y * ((M - x_y) * inv_tau + log_total) + loss
        loss = tl.where(valid, loss, 0.0)
        tl.store(wy_ptr + r, w_y)
    tl.store(loss_ptr + r, loss)


@triton.jit
def _ce_bwd_kernel(
    # pointers
    x_ptr, target_ptr, weight_ptr, tau_ptr, m_ptr, s_ptr, a_ptr, g_ptr, dx_ptr, dtau_ptr,
    # shapes
    C, B,
    # strides of x, of probability targets, of dx, of τ, of g (0: one scale for all rows)
    stride_xa, stride_xc, stride_xb, stride_ta, stride_tc, stride_tb,
    stride_da, stride_dc, stride_db, stride_tau, stride_g,
    # runtime scalars
    ignore_index, smoothing,
    # constants
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
    TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """dL/dz_c = g_r [h (p_c - δ_{c,y}) + A p_c - a_c], h = (1-ε) w_y, A = Σ a_c; dx = dL/dz / τ.

    The target's p_y - 1 is -Σ_{j≠y} p_j = -S/(1+S) when y is the argmax, so
    the row's gradient still sums to zero at small τ."""
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    t_row = target_ptr + a * stride_ta + b * stride_tb
    dx_row = dx_ptr + a * stride_da + b * stride_db
    scale = exp2_scale(tau)
    inv_tau = 1.0 / tau
    M = tl.load(m_ptr + r)
    S = tl.load(s_ptr + r)
    # S = -1 marks a row with no finite logit: NaN everywhere, as the composition's softmax (not ±inf)
    inv_total = tl.where(S == -1.0, float("nan"), 1.0 / (1.0 + S))
    g = tl.load(g_ptr + r * stride_g).to(tl.float32)
    if PROB_TARGET or SMOOTH:
        A_row = tl.load(a_ptr + r)
    valid = True
    h = 0.0
    y = -1
    if not PROB_TARGET:
        y = tl.load(target_ptr + r)
        valid = y != ignore_index
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + tl.where(valid & (y >= 0) & (y < C), y, 0)).to(tl.float32)
        else:
            w_y = 1.0
        h = (1.0 - smoothing) * w_y
    cols = tl.arange(0, BLOCK)
    tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        x, p = recompute_p(x_row, c, C, stride_xc, scale, M, inv_total)
        dz = tl.zeros([BLOCK], tl.float32)
        if not PROB_TARGET:
            q = tl.where(x == M, S * inv_total, 1.0 - p)
            dz = h * tl.where(c == y, -q, p)
        if PROB_TARGET or SMOOTH:
            coef = _ce_coefficient(t_row, weight_ptr, c, C, stride_tc, smoothing,
                                   HAS_WEIGHT, PROB_TARGET, SMOOTH)
            dz += A_row * p - coef
        dz = tl.where(valid, g * dz, 0.0)
        tl.store(dx_row + c.to(tl.int64) * stride_dc, to_store(dz * inv_tau, dx_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            # -(1/τ²) Σ (x - M) dz (see row_engine.py; M in x units: half_gap's τ is 1); masked classes
            # (dz = 0) add 0, NaN adds NaN
            tau_acc += tl.where(dz != 0.0, half_gap(x, M, 1.0) * dz, 0.0)
    if TAU_GRAD:
        tl.store(dtau_ptr + r, -(tl.sum(tau_acc, 0) * inv_tau) * (2.0 * inv_tau))


def ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target):
    """Returns (loss, w_y, M, S, A) per row, fp32.  ``target`` is (A*B,) int64 class
    indices or an (A, C, B) view of probabilities; w_y is None for probabilities and
    A is None without label smoothing or probabilities."""
    R, C, B = rows(x3)
    dev = x3.device
    f32 = dict(device=dev, dtype=torch.float32)
    loss, m, s = torch.empty(R, **f32), torch.empty(R, **f32), torch.empty(R, **f32)
    has_a = prob_target or smoothing > 0
    a = torch.empty(R, **f32) if has_a else m
    wy = m if prob_target else torch.empty(R, **f32)
    t_strides = target.stride() if prob_target else (0, 0, 0)
    block, _, num_warps = row_config(C)
    _ce_fwd_kernel[(R,)](
        x3, target, weight if weight is not None else m, tau, loss, wy, m, s, a,
        C, B, *x3.stride(), *t_strides, tau_stride(tau),
        ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, SMOOTH=smoothing > 0,
        BLOCK=block, num_warps=num_warps,
    )
    return loss, (None if prob_target else wy), m, s, (a if has_a else None)


def ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target,
           tau_grad, inplace=False):
    """Returns (dx, dτ per row or None).  ``g`` is one fp32 scale per row (A*B,) or a
    single element used for every row.  ``inplace`` writes dx over x3."""
    R, C, B = rows(x3)
    dx = x3 if inplace else torch.empty((x3.shape[0], C, B), device=x3.device, dtype=x3.dtype)
    dtau = torch.empty(R, device=x3.device, dtype=torch.float32) if tau_grad else m
    t_strides = target.stride() if prob_target else (0, 0, 0)
    block, _, num_warps = row_config(C)
    _ce_bwd_kernel[(R,)](
        x3, target, weight if weight is not None else m, tau, m, s, a if a is not None else m, g, dx, dtau,
        C, B, *x3.stride(), *t_strides, *dx.stride(), tau_stride(tau), 0 if g.numel() == 1 else 1,
        ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, SMOOTH=smoothing > 0,
        TAU_GRAD=tau_grad, BLOCK=block, INTERPRETED=interpreted(), num_warps=num_warps,
    )
    return dx, (dtau if tau_grad else None)
