"""Row engine: one program streams one row of logits, scaling by 1/τ on load.

Every tensor is seen as ``(A, C, B)``: ``C`` is the softmax dimension, row
``r = a * B + b``.  ``dim=-1`` is ``B = 1`` (Triton specialises the unit stride,
so loads vectorise); class-dim-1 inputs ``(N, C, d1, ...)`` are ``A = N``,
``B = d1 * ...`` read in place, without a transposed copy.

Forward kernels read the logits once (one online pass keeping per-lane
``(max, Σ others)``, see ``tl_math``) and save two fp32 numbers per row,
``M = max z`` and ``S = Σ_{j ≠ argmax} exp(z_j - M)``.  Backward kernels
recompute probabilities from the logits and these two numbers and write the
gradient once; they also reduce the row's contribution to dL/dτ when τ needs
a gradient, from ``dL/dτ = -(1/τ) Σ_j z_j dL/dz_j`` (z = x / τ).

Memory traffic (bytes of the logits dtype, R rows × C): cross-entropy forward
reads R·C, backward reads R·C and writes R·C; no R × C temporary exists.
Offsets are int64 (the row index is widened before any stride product).
"""
import os

import torch
import triton
import triton.language as tl

from .tl_math import (log1p, online_finalize, online_update, to_store, weighted_gap_finalize,
                      weighted_gap_update)

# Largest block a row is streamed in.  4096 fp32 lanes over 8 warps is 16
# registers a lane per live tensor: no spills on sm_80/sm_90 (tests/test_aot.py).
MAX_BLOCK = 4096

MODE_LSE, MODE_SOFTMAX, MODE_LOG_SOFTMAX = 0, 1, 2


def row_config(n_cols):
    """Block size, single-block flag and warp count for a row of ``n_cols``.

    A row that fits one block is loaded once and kept in registers for the
    write pass; longer rows are streamed in ``MAX_BLOCK`` chunks.
    """
    block = min(max(triton.next_power_of_2(n_cols), 16), MAX_BLOCK)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, n_cols <= block, num_warps


@triton.jit
def _load_z(x_row, c, C, stride_xc, tau):
    """z = x / τ for columns ``c`` of a row, -inf past the end.  An IEEE-rounded division,
    not x * (1/τ): at |z| ~ 1e3 the second rounding alone would double fp32's error in exp(z - M)."""
    x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=c < C, other=float("-inf"))
    return tl.math.div_rn(x.to(tl.float32), tau)


@triton.jit
def _softmax_fwd_kernel(
    # pointers
    x_ptr, out_ptr, m_ptr, s_ptr, tau_ptr,
    # shapes: x is (A, C, B), row r = a * B + b; out is contiguous
    C, B,
    # strides of x, and of τ (0: one τ; 1: one τ per a)
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    MODE: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """MODE 0: out[r] = τ·logsumexp(x_r / τ); 1: softmax(x_r / τ); 2: log_softmax(x_r / τ)."""
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    x_row = x_ptr + a * stride_xa + b * stride_xb
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    if ONE_BLOCK:
        z_kept = _load_z(x_row, cols, C, stride_xc, tau)
        m, s = online_update(m, s, z_kept)
    else:
        for start in range(0, C, BLOCK):
            m, s = online_update(m, s, _load_z(x_row, start + cols, C, stride_xc, tau))
    M, S = online_finalize(m, s)
    tl.store(m_ptr + r, M)
    tl.store(s_ptr + r, S)
    if MODE == 0:
        tl.store(out_ptr + r, to_store(tau * (M + log1p(S)), out_ptr, INTERPRETED))
    else:
        out_row = out_ptr + a * C * B + b
        inv_total = 1.0 / (1.0 + S)
        log_total = log1p(S)
        for start in range(0, C, BLOCK):
            c = start + cols
            if ONE_BLOCK:
                z = z_kept
            else:
                z = _load_z(x_row, c, C, stride_xc, tau)
            if MODE == 1:
                y = tl.exp(z - M) * inv_total
            else:
                y = (z - M) - log_total
            tl.store(out_row + c.to(tl.int64) * B, to_store(y, out_ptr, INTERPRETED), mask=c < C)


@triton.jit
def _softmax_bwd_kernel(
    # pointers: y (the forward's output), g (its gradient) and dx share y's contiguous layout
    y_ptr, g_ptr, dx_ptr, x_ptr, m_ptr, s_ptr, tau_ptr, dtau_ptr,
    # shapes
    C, B,
    # strides of x (read only for dL/dτ) and of τ
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    LOG: tl.constexpr, TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """dz = y (g - Σ g y) for softmax, dz = g - exp(y) Σ g for log_softmax; dx = dz / τ.

    dL/dτ of the row is -(1/τ) Σ (z - lse) dz: shifting z by lse changes
    nothing (Σ dz = 0) and keeps the terms small at small τ.
    """
    # Padding lanes must give dz = 0: y = 0 for softmax, log y = -inf for log_softmax.
    Y_PAD: tl.constexpr = float("-inf") if LOG else 0.0
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    base = a * C * B + b
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    inv_tau = 1.0 / tau
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        offs = cols.to(tl.int64) * B
        y_kept = tl.load(y_ptr + base + offs, mask=cols < C, other=Y_PAD).to(tl.float32)
        g_kept = tl.load(g_ptr + base + offs, mask=cols < C, other=0.0).to(tl.float32)
        if LOG:
            red = tl.sum(g_kept, 0)
        else:
            red = tl.sum(g_kept * y_kept, 0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            c = start + cols
            offs = c.to(tl.int64) * B
            g = tl.load(g_ptr + base + offs, mask=c < C, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                acc += g * tl.load(y_ptr + base + offs, mask=c < C, other=0.0).to(tl.float32)
        red = tl.sum(acc, 0)
    if TAU_GRAD:
        x_row = x_ptr + a * stride_xa + b * stride_xb
        M = tl.load(m_ptr + r)
        lse = M + log1p(tl.load(s_ptr + r))
        tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        offs = c.to(tl.int64) * B
        if ONE_BLOCK:
            y = y_kept
            g = g_kept
        else:
            y = tl.load(y_ptr + base + offs, mask=c < C, other=Y_PAD).to(tl.float32)
            g = tl.load(g_ptr + base + offs, mask=c < C, other=0.0).to(tl.float32)
        if LOG:
            dz = g - tl.exp(y) * red
        else:
            dz = y * (g - red)
        tl.store(dx_ptr + base + offs, to_store(dz * inv_tau, dx_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            z = _load_z(x_row, c, C, stride_xc, tau)
            tau_acc += tl.where(dz != 0.0, (z - lse) * dz, 0.0)
    if TAU_GRAD:
        tl.store(dtau_ptr + r, -inv_tau * tl.sum(tau_acc, 0))


@triton.jit
def _lse_bwd_kernel(
    # pointers
    x_ptr, m_ptr, s_ptr, tau_ptr, g_ptr, dx_ptr, dtau_ptr,
    # shapes
    C, B,
    # strides of x and τ; dx is contiguous
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """out = τ·lse(x/τ): dx = g·softmax(x/τ); dL/dτ = g·(lse - Σ p z) = g·(log1p(S) + Σ p (M - z))."""
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    x_row = x_ptr + a * stride_xa + b * stride_xb
    dx_row = dx_ptr + a * C * B + b
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    inv_tau = 1.0 / tau
    M = tl.load(m_ptr + r)
    S = tl.load(s_ptr + r)
    g = tl.load(g_ptr + r).to(tl.float32)
    inv_total = 1.0 / (1.0 + S)
    cols = tl.arange(0, BLOCK)
    tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        z = _load_z(x_row, c, C, stride_xc, tau)
        p = tl.exp(z - M) * inv_total
        tl.store(dx_row + c.to(tl.int64) * B, to_store(g * p, dx_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            tau_acc += tl.where(p != 0.0, p * (M - z), 0.0)
    if TAU_GRAD:
        tl.store(dtau_ptr + r, g * (log1p(S) + tl.sum(tau_acc, 0)))


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
    """Per row, z = x/τ, lse = M + log1p(S):
    class index y: loss = (1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c), 0 if y == ignore_index;
    probabilities t: loss = Σ_c w_c ((1-ε) t_c + ε/C) (lse - z_c).
    lse - z_y is formed as (M - z_y) + log1p(S): exact when y is the argmax at small τ."""
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    x_row = x_ptr + a * stride_xa + b * stride_xb
    t_row = target_ptr + a * stride_ta + b * stride_tb
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    A = tl.zeros([BLOCK], tl.float32)
    D = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        z = _load_z(x_row, c, C, stride_xc, tau)
        if PROB_TARGET or SMOOTH:
            coef = _ce_coefficient(t_row, weight_ptr, c, C, stride_tc, smoothing,
                                   HAS_WEIGHT, PROB_TARGET, SMOOTH)
            A, D = weighted_gap_update(m, A, D, z, coef)
        m, s = online_update(m, s, z)
    M, S = online_finalize(m, s)
    log_total = log1p(S)
    tl.store(m_ptr + r, M)
    tl.store(s_ptr + r, S)
    loss = 0.0
    if PROB_TARGET or SMOOTH:
        A_row, D_row = weighted_gap_finalize(m, A, D, M)
        tl.store(a_ptr + r, A_row)
        loss = D_row + A_row * log_total
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
        z_y = tl.math.div_rn(tl.load(x_row + y_safe * stride_xc).to(tl.float32), tau)
        loss = (1.0 - smoothing) * w_y * ((M - z_y) + log_total) + loss
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
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    x_row = x_ptr + a * stride_xa + b * stride_xb
    t_row = target_ptr + a * stride_ta + b * stride_tb
    dx_row = dx_ptr + a * stride_da + b * stride_db
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    inv_tau = 1.0 / tau
    M = tl.load(m_ptr + r)
    S = tl.load(s_ptr + r)
    inv_total = 1.0 / (1.0 + S)
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
        z = _load_z(x_row, c, C, stride_xc, tau)
        p = tl.exp(z - M) * inv_total
        dz = tl.zeros([BLOCK], tl.float32)
        if not PROB_TARGET:
            q = tl.where(z == M, S * inv_total, 1.0 - p)
            dz = h * tl.where(c == y, -q, p)
        if PROB_TARGET or SMOOTH:
            coef = _ce_coefficient(t_row, weight_ptr, c, C, stride_tc, smoothing,
                                   HAS_WEIGHT, PROB_TARGET, SMOOTH)
            dz += A_row * p - coef
        dz = tl.where(valid, g * dz, 0.0)
        tl.store(dx_row + c.to(tl.int64) * stride_dc, to_store(dz * inv_tau, dx_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            tau_acc += tl.where(dz != 0.0, (z - M) * dz, 0.0)
    if TAU_GRAD:
        tl.store(dtau_ptr + r, -inv_tau * tl.sum(tau_acc, 0))


# ----------------------------------------------------------------------------
# Launchers: allocate, choose the block, launch.  Inputs are already checked by
# fused_tau (shapes, dtypes, devices); ``x3`` is the (A, C, B) view of the logits,
# ``tau`` a float32 tensor of one element or of A elements (one per row group).
# ----------------------------------------------------------------------------

def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rows(x3):
    A, C, B = x3.shape
    return A * B, C, B


def _tau_stride(tau):
    return 0 if tau.numel() == 1 else 1


def softmax_fwd(x3, tau, mode):
    """Returns (out, M, S): out is τ·lse (shape (A*B,)) for MODE_LSE, else softmax or
    log_softmax in x3's dtype and contiguous (A, C, B) layout."""
    R, C, B = _rows(x3)
    dev = x3.device
    out = torch.empty(R if mode == MODE_LSE else (x3.shape[0], C, B), device=dev, dtype=x3.dtype)
    m = torch.empty(R, device=dev, dtype=torch.float32)
    s = torch.empty(R, device=dev, dtype=torch.float32)
    block, one_block, num_warps = row_config(C)
    _softmax_fwd_kernel[(R,)](
        x3, out, m, s, tau, C, B, *x3.stride(), _tau_stride(tau),
        MODE=mode, BLOCK=block, ONE_BLOCK=one_block, INTERPRETED=_interpreted(), num_warps=num_warps,
    )
    return out, m, s


def softmax_bwd(y, g, x3, m, s, tau, log, tau_grad):
    """Returns (dx, dτ per row or None); y, g contiguous (A, C, B)."""
    R, C, B = _rows(x3)
    dx = torch.empty_like(y)
    dtau = torch.empty(R, device=y.device, dtype=torch.float32) if tau_grad else m
    block, one_block, num_warps = row_config(C)
    _softmax_bwd_kernel[(R,)](
        y, g, dx, x3, m, s, tau, dtau, C, B, *x3.stride(), _tau_stride(tau),
        LOG=log, TAU_GRAD=tau_grad, BLOCK=block, ONE_BLOCK=one_block, INTERPRETED=_interpreted(),
        num_warps=num_warps,
    )
    return dx, (dtau if tau_grad else None)


def lse_bwd(x3, m, s, tau, g, tau_grad):
    """Returns (dx, dτ per row or None); g is contiguous (A*B,)."""
    R, C, B = _rows(x3)
    dx = torch.empty((x3.shape[0], C, B), device=x3.device, dtype=x3.dtype)
    dtau = torch.empty(R, device=x3.device, dtype=torch.float32) if tau_grad else m
    block, _, num_warps = row_config(C)
    _lse_bwd_kernel[(R,)](
        x3, m, s, tau, g, dx, dtau, C, B, *x3.stride(), _tau_stride(tau),
        TAU_GRAD=tau_grad, BLOCK=block, INTERPRETED=_interpreted(), num_warps=num_warps,
    )
    return dx, (dtau if tau_grad else None)


def ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target):
    """Returns (loss, w_y, M, S, A) per row, fp32.  ``target`` is (A*B,) int64 class
    indices or an (A, C, B) view of probabilities; w_y is None for probabilities and
    A is None without label smoothing or probabilities."""
    R, C, B = _rows(x3)
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
        C, B, *x3.stride(), *t_strides, _tau_stride(tau),
        ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, SMOOTH=smoothing > 0,
        BLOCK=block, num_warps=num_warps,
    )
    return loss, (None if prob_target else wy), m, s, (a if has_a else None)


def ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target,
           tau_grad, inplace=False):
    """Returns (dx, dτ per row or None).  ``g`` is one fp32 scale per row (A*B,) or a
    single element used for every row.  ``inplace`` writes dx over x3."""
    R, C, B = _rows(x3)
    dx = x3 if inplace else torch.empty((x3.shape[0], C, B), device=x3.device, dtype=x3.dtype)
    dtau = torch.empty(R, device=x3.device, dtype=torch.float32) if tau_grad else m
    t_strides = target.stride() if prob_target else (0, 0, 0)
    block, _, num_warps = row_config(C)
    _ce_bwd_kernel[(R,)](
        x3, target, weight if weight is not None else m, tau, m, s, a if a is not None else m, g, dx, dtau,
        C, B, *x3.stride(), *t_strides, *dx.stride(), _tau_stride(tau), 0 if g.numel() == 1 else 1,
        ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, SMOOTH=smoothing > 0,
        TAU_GRAD=tau_grad, BLOCK=block, INTERPRETED=_interpreted(), num_warps=num_warps,
    )
    return dx, (dtau if tau_grad else None)
