"""Row engine, distillation: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`` per row, optionally mixed
with the hard-label cross-entropy of the student at τ = 1, from one pass over both rows.

Per row r, with zs = s/τ, zt = t/τ, q = softmax(zt), p = softmax(zs), d = zt - zs and
D = lse(zt) - lse(zs):  KL = Σ_c q_c (log q_c - log p_c) = Σ_c q_c d_c - D.
The forward keeps the online statistics of zs, of zt, of s (τ = 1, when a target is
given) and the q-weighted sum of d, rescaled as the teacher's max moves
(flash-attention style), so both rows are read once.  Classes where the teacher
puts zero probability contribute exactly 0 (as F.kl_div's xlogy does), never NaN.

Backward, for an upstream gradient g_c of the element τ² q_c δ_c (δ = log q - log p;
g_c = g for every reduction but 'none'), with G1 = Σ g_c q_c and G2 = Σ g_c q_c (δ_c + 1):
  dL/ds_j = τ (p_j G1 - g_j q_j)        dL/dt_j = τ q_j (g_j (δ_j + 1) - G2)
and dL/dτ = 2τ F - τ Σ_j [(zs_j - Ms) ∂F/∂zs_j + (zt_j - Mt) ∂F/∂zt_j], F = Σ g_c q_c δ_c, where
τ (z_j - M) = x_j - M τ is taken in x units.  A NaN or +inf logit, or a teacher row with no finite
logit, makes the row's loss and every gradient NaN, as the composition; a masked teacher class
(-inf, q = 0) adds exactly 0.
"""
import torch
import triton
import triton.language as tl

from .row_engine import half_gap, interpreted, load_x, load_z, row_config, tau_stride

# seven per-lane accumulators (student, teacher, τ = 1 statistics and the q-weighted sum):
# a quarter of the engine's block over 8 warps is spill-free on sm_80 and sm_90 at 48-75
# registers (python -m bench.aot; the full block needs 255, half a block over 8 warps
# still spills 16-24 bytes, a quarter over 4 warps 8 bytes on sm_90)
LANES_PER_BLOCK = 4
NUM_WARPS = 8
from .tl_math import log1p, nan_if_posinf, online_finalize, online_update, to_store


@triton.jit
def _weighted_mean_update(m, w, z, d):
    """Per lane, under the lane max ``m`` of z *before* this block: w = Σ exp(z_j - m) d_j.
    Lanes whose weight is 0 (z = -inf) add nothing, whatever d is."""
    is_new = z > m
    scale = tl.exp(tl.where(is_new & (m > float("-inf")), m - z, 0.0))
    w = tl.where(is_new, w * scale, w)
    e = tl.exp(tl.where(z > float("-inf"), z - tl.maximum(m, z), float("-inf")))
    return w + tl.where(e != 0.0, e * d, 0.0)


@triton.jit
def _kd_fwd_kernel(
    # pointers
    s_ptr, t_ptr, target_ptr, tau_ptr, kd_ptr, ce_ptr, stats_ptr, out_ptr,
    # shapes
    C,
    # strides (rows; the class stride is 1)
    stride_s, stride_t, stride_tau,
    # runtime scalars
    ignore_index,
    # constants
    HAS_TARGET: tl.constexpr, ELEMENTWISE: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """kd[r] = KL of the row (without τ²); ce[r] = CE of s at τ = 1 (0 if ignored);
    stats[r] = (Ms, Ss, Mt, St, KL, M1, S1); ELEMENTWISE also writes out = τ² q (log q - log p)."""
    r = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + r * stride_s
    t_row = t_ptr + r * stride_t
    tau = tl.load(tau_ptr + r * stride_tau).to(tl.float32)
    cols = tl.arange(0, BLOCK)
    ms = tl.full([BLOCK], float("-inf"), tl.float32)
    ss = tl.zeros([BLOCK], tl.float32)
    mt = tl.full([BLOCK], float("-inf"), tl.float32)
    st = tl.zeros([BLOCK], tl.float32)
    w = tl.zeros([BLOCK], tl.float32)
    m1 = tl.full([BLOCK], float("-inf"), tl.float32)
    s1 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        zs = load_z(s_row, c, C, 1, tau)
        zt = load_z(t_row, c, C, 1, tau)
        w = _weighted_mean_update(mt, w, zt, zt - zs)
        mt, st = online_update(mt, st, zt)
        ms, ss = online_update(ms, ss, zs)
        if HAS_TARGET:
            m1, s1 = online_update(m1, s1, load_z(s_row, c, C, 1, 1.0))
    # a +inf or NaN logit, or a row with no finite teacher logit, makes the row NaN (as the composition)
    Ms, Ss = online_finalize(ms, ss)
    Ss = nan_if_posinf(Ms, Ss)
    Mt, St = online_finalize(mt, st)
    St = nan_if_posinf(Mt, St)
    w_row = tl.sum(tl.where(w != 0.0, w * tl.exp(mt - Mt), 0.0), 0)
    D = (Mt - Ms) + (log1p(St) - log1p(Ss))
    kl = w_row / (1.0 + St) - D
    tl.store(kd_ptr + r, kl)
    base = stats_ptr + r * 8
    tl.store(base + 0, Ms)
    tl.store(base + 1, Ss)
    tl.store(base + 2, Mt)
    tl.store(base + 3, St)
    tl.store(base + 4, kl)
    if HAS_TARGET:
        M1, S1 = online_finalize(m1, s1)
        S1 = nan_if_posinf(M1, S1)
        y = tl.load(target_ptr + r)
        valid = y != ignore_index
        y_safe = tl.where(valid & (y >= 0) & (y < C), y, 0)
        s_y = tl.load(s_row + y_safe).to(tl.float32)
        tl.store(ce_ptr + r, tl.where(valid, (M1 - s_y) + log1p(S1), 0.0))
        tl.store(base + 5, M1)
        tl.store(base + 6, S1)
    if ELEMENTWISE:
        log_total_t = log1p(St)
        for start in range(0, C, BLOCK):
            c = start + cols
            zs = load_z(s_row, c, C, 1, tau)
            zt = load_z(t_row, c, C, 1, tau)
            q = tl.exp((zt - Mt) - log_total_t)
            # q = 0 (a masked teacher class) adds exactly 0; a NaN q stays NaN
            val = tl.where(q != 0.0, tau * tau * q * ((zt - zs) - D), 0.0)
            tl.store(out_ptr + r * C + c, to_store(val, out_ptr, INTERPRETED), mask=c < C)


@triton.jit
def _kd_bwd_kernel(
    # pointers
    s_ptr, t_ptr, target_ptr, tau_ptr, stats_ptr, g_ptr, gce_ptr, ds_ptr, dt_ptr, dtau_ptr,
    # shapes
    C,
    # strides (rows; the class stride is 1); stride_g = 0 for one upstream scale for all rows
    stride_s, stride_t, stride_tau, stride_g,
    # runtime scalars
    ignore_index,
    # constants
    HAS_TARGET: tl.constexpr, ELEMENTWISE: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """ds = τ (p G1 - g q) + g_ce (softmax(s) - onehot(y)); dt = τ q (g (δ + 1) - G2) (see the module
    docstring); g is per row (ELEMENTWISE: per element, g_ptr holds an (R, C) gradient)."""
    r = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + r * stride_s
    t_row = t_ptr + r * stride_t
    tau = tl.load(tau_ptr + r * stride_tau).to(tl.float32)
    base = stats_ptr + r * 8
    Ms = tl.load(base + 0)
    Ss = tl.load(base + 1)
    Mt = tl.load(base + 2)
    St = tl.load(base + 3)
    kl = tl.load(base + 4)
    log_total_t = log1p(St)
    # lse_t - lse_s without rounding either lse (M + log1p(S) loses |M| ulps): as the forward
    D = (Mt - Ms) + (log_total_t - log1p(Ss))
    cols = tl.arange(0, BLOCK)
    if ELEMENTWISE:
        acc1 = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            c = start + cols
            zs = load_z(s_row, c, C, 1, tau)
            zt = load_z(t_row, c, C, 1, tau)
            q = tl.exp((zt - Mt) - log_total_t)
            gc = tl.load(g_ptr + r * C + c, mask=c < C, other=0.0).to(tl.float32)
            gq = tl.where(q != 0.0, gc * q, 0.0)
            acc1 += gq
            acc2 += tl.where(q != 0.0, gq * ((zt - zs) - D), 0.0)
        G1 = tl.sum(acc1, 0)
        F = tl.sum(acc2, 0)
        G2 = F + G1
        g = 0.0
    else:
        g = tl.load(g_ptr + r * stride_g).to(tl.float32)
        G1 = g
        F = g * kl
        G2 = F + g
    if HAS_TARGET:
        M1 = tl.load(base + 5)
        S1 = tl.load(base + 6)
        inv1 = 1.0 / (1.0 + S1)
        y = tl.load(target_ptr + r)
        g_ce = tl.where(y != ignore_index, tl.load(gce_ptr + r * stride_g).to(tl.float32), 0.0)
    inv_s = 1.0 / (1.0 + Ss)
    tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        xs = load_x(s_row, c, C, 1)
        xt = load_x(t_row, c, C, 1)
        zs = tl.math.div_rn(xs, tau)
        zt = tl.math.div_rn(xt, tau)
        p = tl.exp(zs - Ms) * inv_s
        q = tl.exp((zt - Mt) - log_total_t)
        if ELEMENTWISE:
            gc = tl.load(g_ptr + r * C + c, mask=c < C, other=0.0).to(tl.float32)
        else:
            gc = g
        # q = 0 (a masked teacher class) adds exactly 0; a NaN q (a non-finite teacher row) stays NaN
        gq = tl.where(q != 0.0, gc * q, 0.0)
        dzs = p * G1 - gq
        ds = tau * dzs
        if HAS_TARGET:
            s1 = load_z(s_row, c, C, 1, 1.0)
            p1 = tl.exp(s1 - M1) * inv1
            q1 = tl.where(s1 == M1, S1 * inv1, 1.0 - p1)
            ds += g_ce * tl.where(c == y, -q1, p1)
        tl.store(ds_ptr + r * C + c, to_store(ds, ds_ptr, INTERPRETED), mask=c < C)
        if TEACHER_GRAD or TAU_GRAD:
            delta = (zt - zs) - D
            dzt = tl.where(q != 0.0, q * (gc * (delta + 1.0) - G2), 0.0)
        if TEACHER_GRAD:
            tl.store(dt_ptr + r * C + c, to_store(tau * dzt, dt_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            # τ (z - M) = x - M τ: in x units (half_gap), no rounding of x / τ in the shift
            tau_acc += (tl.where(dzs != 0.0, half_gap(xs, Ms, tau) * dzs, 0.0)
                        + tl.where(dzt != 0.0, half_gap(xt, Mt, tau) * dzt, 0.0))
    if TAU_GRAD:
        tl.store(dtau_ptr + r, 2.0 * (tau * F - tl.sum(tau_acc, 0)))


# ---------------------------------------------------------------------------- launchers

def kd_fwd(s2, t2, target, tau, ignore_index, elementwise):
    """Rows (R, C) of student and teacher logits (class stride 1).  Returns (kl, ce or None,
    stats (R, 8) fp32, elementwise output or None)."""
    R, C = s2.shape
    dev = s2.device
    kl = torch.empty(R, device=dev, dtype=torch.float32)
    stats = torch.zeros(R, 8, device=dev, dtype=torch.float32)  # the torch path's width; column 7 unused here
    ce = torch.empty(R, device=dev, dtype=torch.float32) if target is not None else kl
    out = torch.empty((R, C), device=dev, dtype=s2.dtype) if elementwise else kl
    block, _, _ = row_config(C, LANES_PER_BLOCK)
    num_warps = NUM_WARPS
    _kd_fwd_kernel[(R,)](
        s2, t2, target if target is not None else kl, tau, kl, ce, stats, out,
        C, s2.stride(0), t2.stride(0), tau_stride(tau), ignore_index,
        HAS_TARGET=target is not None, ELEMENTWISE=elementwise, BLOCK=block, INTERPRETED=interpreted(),
        num_warps=num_warps,
    )
    return kl, (ce if target is not None else None), stats, (out if elementwise else None)


def kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, teacher_grad, tau_grad):
    """Returns (d student, d teacher or None, dτ per row or None).  ``g``: one fp32 scale for all
    rows (1 element), one per row, or (elementwise) an (R, C) gradient; ``g_ce`` likewise, per row."""
    R, C = s2.shape
    dev = s2.device
    ds = torch.empty((R, C), device=dev, dtype=s2.dtype)
    dt = torch.empty((R, C), device=dev, dtype=t2.dtype) if teacher_grad else ds
    dtau = torch.empty(R, device=dev, dtype=torch.float32) if tau_grad else stats
    if elementwise:
        g = g.contiguous()
    stride_g = 0 if (elementwise or g.numel() == 1) else 1
    block, _, _ = row_config(C, LANES_PER_BLOCK)
    num_warps = NUM_WARPS
    _kd_bwd_kernel[(R,)](
        s2, t2, target if target is not None else stats, tau, stats, g, g_ce if g_ce is not None else stats,
        ds, dt, dtau, C, s2.stride(0), t2.stride(0), tau_stride(tau), stride_g, ignore_index,
        HAS_TARGET=target is not None, ELEMENTWISE=elementwise, TEACHER_GRAD=teacher_grad,
        TAU_GRAD=tau_grad, BLOCK=block, INTERPRETED=interpreted(), num_warps=num_warps,
    )
    return ds, (dt if teacher_grad else None), (dtau if tau_grad else None)
