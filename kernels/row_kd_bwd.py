"""Row engine, distillation, the backward: d student, d teacher and dτ of kd_loss per row from the forward's
statistics stats[r] (row_kd_fwd.py, whose module docstring defines q, p, v, ν, u, w, KL and P_m).  The
launchers: row_kd.py.

Backward, for an upstream gradient g (per row; 'none': per element g_c with G1 = Σ g_c q_c and
F = Σ g_c q_c δ_c, δ = -w):  dL/ds = τ g (p - q), dL/dt = -τ g q u (elementwise: τ (p G1 - g q) and
τ q (g (1 - w) - F - G1)), with u and w per element from the form with the smaller rounding: v - ν
(ulp(v) + ulp(ν)) or the gaps to the maxima, (s - Ms)/τ - (t - Mt)/τ + log1p(St) - log1p(Ss).  On the
second-order rows p - q = q expm1(w) where |w| <= 1 (no cancellation where p ≈ q).
dL/dτ = τ g B, B = 2 KL - Σ (s/τ)(p - q) + Σ (t/τ) q u, in its plain form shifted by the maxima in x
units, 2 (τ g KL - Σ (s - Ms)/2 ∂/∂zs - Σ (t - Mt)/2 ∂/∂zt), or on the second-order rows whose kept
|u| are all <= 1 in the third-order form
  B = Σ_q>0 [2 q ψ3(u) - u q ψ(w) - ζ q (ψ(w) - KL)] - Σ_q=0 p ((s - Mt)/τ - ν) - 2 ψ(l) - 2 log(1 - P_m),
ζ = (t - Mt)/τ, ψ3(x) = e^x - 1 - x - x²/2, l = KL + log(1 - P_m), every term of third order in 1/τ.
"""
import triton
import triton.language as tl

from .row_engine import class_target, target_complement
from .row_kd_fwd import _exp, _psi_over_square, _row_terms
from .tl_math import log1p, mul_inv, psi3_series, psi_series, reciprocal_split, to_store


@triton.jit
def _third_order(p, q, u, q_psi_w, keep, zt_gap, xs, Mt, inv, inv_lo, nu, kl, e_kl):
    """One element's terms of B (module docstring) less the plain part: the kept classes' body and
    the masked classes' p ((s - Mt)/τ - ν)."""
    small_u = tl.abs(u) <= 1.0
    q_psi3_u = tl.where(small_u, q * psi3_series(tl.where(small_u, u, 0.0)),
                        p * e_kl - q * (1.0 + u + 0.5 * u * u))
    body = tl.where(keep, 2.0 * q_psi3_u - u * q_psi_w - zt_gap * (q_psi_w - q * kl), 0.0)
    return body - tl.where(keep | (p == 0.0), 0.0, p * (mul_inv(xs - Mt, inv, inv_lo) - nu))


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
    """ds = τ g (p - q) + g_ce (softmax(s) - onehot(y)); dt = -τ g q u; dτ (module docstring); g is per
    row (ELEMENTWISE: per element, g_ptr holds an (R, C) gradient)."""
    r = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + r * stride_s
    t_row = t_ptr + r * stride_t
    tau = tl.load(tau_ptr + r * stride_tau).to(tl.float32)
    inv, inv_lo = reciprocal_split(tau)
    base = stats_ptr + r * 8
    Ms = tl.load(base + 0)
    Ss = tl.load(base + 1)
    Mt = tl.load(base + 2)
    St = tl.load(base + 3)
    kl = tl.load(base + 4)
    nu = tl.load(base + 5)
    precise = tl.load(base + 7) != 0.0
    # the series bound of w on the second-order rows, -1 (never) on the others
    w_bound = tl.where(precise, 1.0, -1.0)
    log_t, log_s = log1p(St), log1p(Ss)
    # p = exp((s - Ms)/τ) / (1 + Ss), q likewise: the normaliser's log in the exponent would add its
    # rounding, ulp(log C) relative, to every probability
    inv_s = tl.math.div_rn(1.0, 1.0 + Ss)
    inv_t = tl.math.div_rn(1.0, 1.0 + St)
    cols = tl.arange(0, BLOCK)
    if ELEMENTWISE:
        G1, F = _elementwise_sums(s_row, t_row, g_ptr + r * C, cols, C, Ms, Mt, inv, inv_lo, nu, kl, log_t, log_s,
                                  inv_t, BLOCK, INTERPRETED)
        g = 0.0
    else:
        g = tl.load(g_ptr + r * stride_g).to(tl.float32)
        G1 = g
        F = g * kl
    if HAS_TARGET:
        S1 = tl.load(base + 6)
        inv1 = tl.math.div_rn(1.0, 1.0 + S1)
        y, valid = class_target(target_ptr, r, C, ignore_index)
        g_ce = tl.where(valid, tl.load(gce_ptr + r * stride_g).to(tl.float32), 0.0)
        # the target's share of softmax(s) - onehot(y), once a row: p_y as the loop forms p1
        s_y = tl.load(s_row + y).to(tl.float32)
        q_y = target_complement(s_y, Ms, S1, _exp(s_y - Ms, INTERPRETED) * inv1, inv1)
        y = tl.where(valid, y, -1).to(tl.int32)  # compared with int32 columns: one instruction an element
    e_kl = tl.exp(kl)
    tau_acc = tl.zeros([BLOCK], tl.float32)
    b_acc = tl.zeros([BLOCK], tl.float32)
    pm_acc = tl.zeros([BLOCK], tl.float32)
    u_max = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        xs, xt, zs_gap, zt_gap, q, u, w = _row_terms(s_row, t_row, c, C, Ms, Mt, inv, inv_lo, inv_t, nu, kl, log_t,
                                                     log_s, INTERPRETED)
        p = _exp(zs_gap, INTERPRETED) * inv_s
        # q = 0 (a masked teacher class) adds exactly 0; a NaN q (a non-finite teacher row) stays NaN
        keep = q != 0.0
        small_w = tl.abs(w) <= w_bound
        # ψ(w) where small_w (a select elsewhere: the polynomial's value there does not matter)
        w_h = w * _psi_over_square(w)
        if ELEMENTWISE:
            gc = tl.load(g_ptr + r * C + c, mask=c < C, other=0.0).to(tl.float32)
            gq = tl.where(keep, gc * q, 0.0)
            dzs = p * G1 - gq
            dzt = tl.where(keep, q * (gc * (1.0 - w) - (F + G1)), 0.0)
        else:
            # p - q = q expm1(w): no cancellation where p ≈ q (the second-order rows)
            dzs = g * tl.where(keep, tl.where(small_w, q * tl.fma(w, w_h, w), p - q), p)
            dzt = tl.where(keep, -g * q * u, 0.0)
        ds = tau * dzs
        if HAS_TARGET:
            ds += g_ce * tl.where(c == y, -q_y, _exp(xs - Ms, INTERPRETED) * inv1)
        tl.store(ds_ptr + r * C + c, to_store(ds, ds_ptr, INTERPRETED), mask=c < C)
        if TEACHER_GRAD:
            tl.store(dt_ptr + r * C + c, to_store(tau * dzt, dt_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            # shifted by the maxima in x units and halved (finite for logits of ±3e38)
            tau_acc += (tl.where(dzs != 0.0, (xs * 0.5 - Ms * 0.5) * dzs, 0.0)
                        + tl.where(dzt != 0.0, (xt * 0.5 - Mt * 0.5) * dzt, 0.0))
            if not ELEMENTWISE:
                q_psi_w = tl.where(small_w, q * (w * w_h), (p - q) - q * w)
                b_acc += _third_order(p, q, u, q_psi_w, keep, zt_gap, xs, Mt, inv, inv_lo, nu, kl, e_kl)
                pm_acc += tl.where(keep, 0.0, p)
                u_max = tl.maximum(u_max, tl.where(keep, tl.abs(u), 0.0))
    if TAU_GRAD:
        shifted = tl.sum(tau_acc, 0)
        if ELEMENTWISE:
            tl.store(dtau_ptr + r, 2.0 * (tau * F - shifted))
        else:
            log_kept = log1p(-tl.sum(pm_acc, 0))
            l = kl + log_kept
            psi_l = tl.where(tl.abs(l) <= 1.0, psi_series(l), tl.exp(l) - 1.0 - l)
            B = tl.sum(b_acc, 0) - 2.0 * psi_l - 2.0 * log_kept
            # the third-order terms are small only where every kept u is: a class far from the rest (a
            # student far from its teacher) makes them large and cancelling, the plain form exact
            third = precise & (tl.max(u_max, 0) <= 1.0)
            tl.store(dtau_ptr + r, tl.where(third, tau * g * B, 2.0 * (tau * g * kl - shifted)))


@triton.jit
def _elementwise_sums(s_row, t_row, g_row, cols, C, Ms, Mt, inv, inv_lo, nu, kl, log_t, log_s, inv_t,
                      BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """G1 = Σ g q and F = Σ g q δ (δ = log q - log p = -w) of a row with a per-element gradient g."""
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        _xs, _xt, _zs, _zt, q, _u, w = _row_terms(s_row, t_row, c, C, Ms, Mt, inv, inv_lo, inv_t, nu, kl, log_t, log_s,
                                                  INTERPRETED)
        gq = tl.where(q != 0.0, tl.load(g_row + c, mask=c < C, other=0.0).to(tl.float32) * q, 0.0)
        acc1 += gq
        acc2 += tl.where(q != 0.0, -gq * w, 0.0)
    return tl.sum(acc1, 0), tl.sum(acc2, 0)
