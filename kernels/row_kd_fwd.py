"""Row engine, distillation, the forward: ``τ² · KL(softmax(t/τ) ‖ softmax(s/τ))`` per row, optionally
mixed with the hard-label cross-entropy of the student at τ = 1, from one pass over both rows; its numerics
helpers, and the per-element terms (u, w, q) that the backward (row_kd_bwd.py) shares.  The launchers:
row_kd.py.

Per row, in x units (logits; a max is a logit, z = x/τ is never formed, a gap in x units is taken
to z units to one rounding by the pair 1/τ = inv + inv_lo of tl_math.reciprocal_split): q = softmax(t/τ),
p = softmax(s/τ), v = (s - t)/τ, ν = E_q v, u = v - ν, and P_m = the student's mass on the classes
of teacher probability 0.  Then log p - log q = w = u - KL and, since E_q u = 0,

    KL = log E_q e^u - log(1 - P_m) = log1p(E_q ψ(u)) - log(1 - P_m),   ψ(x) = e^x - 1 - x,

which is second order in u: exact where the student is near its teacher, at any τ and under a common
logit offset, where Σ q (zt - zs) - (lse_t - lse_s) cancels to below the ulp of its terms (τ = 1e4
gave a negative KL).  The forward's lanes are threads, each folding a chunk of 2 × 8 classes (two
128-bit loads of bf16 a row) per iteration; a lane keeps, beside the online (max, Σ others) of s and t,
the teacher-weighted moments A = Σ w x and R = Σ w ψ(x) of x = v - v_ref about a reference class, and
the student's mass on the classes of teacher weight 0, rescaled as the teacher's (student's) lane max
moves (once a chunk); one exp2 a logit (the hardware's ex2, results below 2^-126 flushed to 0: a
weight 2^-126 below the lane's max is a class of teacher weight 0), ψ by a degree-7 polynomial in x
times x² for |x| <= 1 (1.7e-8 relative), else as w e^x - w(1 + x) with w e^x one exp.  The
reference class is the lane's teacher max, so that x is small where the teacher's mass is (a fixed
reference, e.g. from the first block, leaves E_q ψ(u) to a cancellation e^|ā| times its size against
a peaked teacher): when the max moves, the sums move with it, Σ w ψ(x - d) = e^-d R + expm1(-d) A +
ψ(-d) W, Σ w (x - d) = A - d W, and at the end every lane's sums move to the class of the row's
teacher max.  x is formed from gaps in x units, ((s - s_ref) - (t - t_ref))/τ, never through v, whose
rounding is that of |s - t|/τ (a student far from its teacher).  With ā = A/W, b̄ = R/W
(W = Σ w = 1 + St): E_q e^u = 1 + e^-ā (b̄ - ψ(ā)), ν = v_ref + ā.  That difference is where the
rounding of the moments is amplified (e^|ā| times, ā of order the spread of u for a flat teacher),
so the lanes add each chunk's plain sums of A and R compensated (Kahan) and are merged in float64
(per row, not per element).
Every class is either in the moments or, with its student mass, in P_m: a class whose teacher weight
a later max makes underflow (in its lane or at the merge) moves its student mass to P_m.  A student
-inf where the teacher has weight gives KL = +inf, outside the moments (the chunk's Σ w x is then not
finite: the lane is marked and the chunk left out of its moments).  A row whose log E_q e^u
reaches 1, or whose P_m reaches 1/2, has no cancellation to avoid and takes the plain form
KL = ((Ms - s_ref) - (Mt - t_ref))/τ - ā + log1p(Ss) - log1p(St).
stats[r] = (Ms, Ss, Mt, St, KL, ν, S1, precise): maxima in x units, precise = 1 where the row takes
the second-order forms.  The torch path (fused_tau/_torch_kd.py) computes the same quantities.
"""
import math

import triton
import triton.language as tl

from .row_engine import class_target, load_x, target_nll
from .tl_math import (exp2_ftz, lane_scale, log1p, mul_inv, nan_if_posinf, online_finalize, online_finalize_x,
                      psi_series, psi_series_f64, reciprocal_split, to_store)

# fourteen per-lane accumulators (the student's and teacher's (max, Σ others), the moments A and R and
# their compensations, the reference class (s, t), the mark of infinite x, the student's masked mass,
# the τ = 1 sum), one lane a thread: each iteration a lane folds 2 × CHUNK classes (two runs of CHUNK
# contiguous classes, one 128-bit load each of bf16) into its sums at once, so that a moving max
# rescales and recentres the lane's sums once per chunk, not per element, and the moments' compensated
# (Kahan) add takes the chunk's plain sum.  Lanes, chunk, block and warps: row_engine.ROW_CONFIGS's
# "kd_fwd" and "kd_bwd" (blocks shrunk by the tests keep 2 lanes of two runs of 2).


@triton.jit
def _recentre(A, R, W, c, E, d, psi_d, small):
    """Moments moved to a reference d higher and scaled by c: Σ c w ψ(x - d) = E R + c expm1(-d) A +
    c ψ(-d) W and Σ c w (x - d) = c (A - d W), given E = c e^-d and psi_d = ψ(d) where |d| <= 1
    (small): c ψ(-d) = E (d² + (d - 1) ψ(d)) there, E - c + c d elsewhere.  Sums that are dropped
    (c = 0: no finite teacher logit yet, or weights that underflow) give 0, also where they overflowed."""
    c_psi = tl.where(small, E * (d * d + (d - 1.0) * psi_d), E - c + c * d)
    dropped = c == 0.0
    return (tl.where(dropped, 0.0, c * (A - d * W)),
            tl.where(dropped, 0.0, E * R + (c_psi - c * d) * A + c_psi * W))


@triton.jit
def _kahan_add(total, comp, term):
    """total + term with the compensated (Kahan) sum: the exact sum is total - comp to a rounding or two
    of the whole, where a lane's plain running sum of n terms drifts by about √n roundings."""
    y = term - comp
    t = total + y
    return t, (t - total) - y


def _psi_over_square_coefficients(degree):
    """Monomial coefficients of the polynomial of ``degree`` that interpolates h(x) = ψ(x)/x² =
    Σ_k x^k/(k+2)! at the Chebyshev nodes of [-1, 1] (float64; a near-minimax fit: at degree 7 and
    rounded to fp32 it is within 1.7e-8 of h relative, where the Taylor polynomial needs degree 8 for
    4e-8)."""
    n = degree + 1
    nodes = [math.cos(math.pi * (j + 0.5) / n) for j in range(n)]
    rows = [[x ** k for k in range(n)] + [sum(x ** k / math.factorial(k + 2) for k in range(30))] for x in nodes]
    for i in range(n):  # Gauss-Jordan with partial pivoting
        piv = max(range(i, n), key=lambda r: abs(rows[r][i]))
        rows[i], rows[piv] = rows[piv], rows[i]
        for r in range(n):
            if r != i:
                f = rows[r][i] / rows[i][i]
                rows[r] = [a - f * b for a, b in zip(rows[r], rows[i])]
    return [rows[i][n] / rows[i][i] for i in range(n)]


_H = _psi_over_square_coefficients(7)
_H0, _H1, _H2, _H3 = (tl.constexpr(v) for v in _H[:4])
_H4, _H5, _H6, _H7 = (tl.constexpr(v) for v in _H[4:])


@triton.jit
def _psi_over_square(x):
    """ψ(x)/x² = (e^x - 1 - x)/x² for |x| <= 1 to 1.7e-8 relative (_psi_over_square_coefficients)."""
    h = x * _H7 + _H6
    h = h * x + _H5
    h = h * x + _H4
    h = h * x + _H3
    h = h * x + _H2
    h = h * x + _H1
    return h * x + _H0


_LOG2E = tl.constexpr(1.4426950408889634)
@triton.jit
def exp2_split(tau):
    """log2(e)/τ as a pair (k2, k2_lo), k2 + k2_lo = log2(e)/τ to about ε² (formed in float64), for
    mul_inv: a gap in x units to an exponent of 2 in one rounding.  k2 is set just below so that
    k2_lo > 0 (mul_inv keeps ±inf, as reciprocal_split)."""
    k = _LOG2E / tau.to(tl.float64)
    k2 = (k * (1.0 - 1.0 / 2097152)).to(tl.float32)
    return k2, (k - k2.to(tl.float64)).to(tl.float32)


@triton.jit
def _lane_max(x):
    """The max of each lane's classes of a chunk [lanes, k, 2] (within a thread)."""
    return tl.max(tl.max(x, 2), 1)


@triton.jit
def _lane_sum(x):
    """The sum of each lane's classes of a chunk [lanes, k, 2] (within a thread)."""
    return tl.sum(tl.sum(x, 2), 1)


@triton.jit
def _widen(x, INTERPRETED: tl.constexpr):
    """x in fp32.  bf16 pairs by one instruction each (a bf16 is the high half of its fp32): the low
    class shifted up, the high one masked in place, where .to(tl.float32) moves the high one down and
    back up (PRMT and SHF)."""
    if INTERPRETED or x.dtype != tl.bfloat16:
        return x.to(tl.float32)
    return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def load_chunk(x_row, start, cols2, C, HALF: tl.constexpr, MASKED: tl.constexpr, INTERPRETED: tl.constexpr):
    """The chunk [lanes, k, 2] of columns start + cols2 and start + HALF + cols2 (cols2 = lane·k + 0..k-1):
    two contiguous runs of k classes a lane, one 128-bit load each at k = 8 bf16; -inf past the end
    where MASKED (the row's last block), no mask on the others."""
    c = start + cols2
    if MASKED:
        return tl.join(load_x(x_row, c, C, 1), load_x(x_row, c + HALF, C, 1))
    return tl.join(_widen(tl.load(x_row + c), INTERPRETED), _widen(tl.load(x_row + (c + HALF)), INTERPRETED))


@triton.jit
def _fold_block(s_row, t_row, start, cols2, C, ms, ss, s1, pm, mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, inv,
                inv_lo, k2, k2_lo, k1, k1_lo, HALF: tl.constexpr, MASKED: tl.constexpr, HAS_TARGET: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """One block of both rows into the lanes' sums (the forward's loop body)."""
    xs = load_chunk(s_row, start, cols2, C, HALF, MASKED, INTERPRETED)
    xt = load_chunk(t_row, start, cols2, C, HALF, MASKED, INTERPRETED)
    if HAS_TARGET:  # τ = 1 under the same lane max
        s1 = _online_chunk(ms, s1, xs, xs, k1, k1_lo, INTERPRETED, True)[1]
    ss_old = ss
    ms, ss, p, _g, scale, _g_scale, _is_new, _y, _gap = _online_chunk(ms, ss, xs, xs, k2, k2_lo, INTERPRETED,
                                                                      True)
    mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, p_masked, drop = _moments_update(
        mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, xs, xt, p, inv, inv_lo, k2, k2_lo, INTERPRETED)
    # the student's mass on the classes of teacher weight 0 (pm) under the student's lane max; a
    # drop moves the lane's whole mass so far, 1 + ss, there: every class in the moments or in P_m
    pm = tl.where(drop, ss_old + 1.0, pm) * scale + p_masked
    return ms, ss, s1, pm, mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass


@triton.jit
def _online_chunk(m, s, x, y, k2, k2_lo, INTERPRETED: tl.constexpr, FLOOR_TIES: tl.constexpr):
    """:func:`online_update_x` of a chunk x [lanes, k, 2] at once: the lane's max m' = max(m, max_k x), the
    old sum rescaled once by c = exp((m - m')/τ) where the max moves, and s' = Σ_{j ≠ argmax} e_j with
    e = 2^g, g = (x - m')·log2(e)/τ per element ((k2, k2_lo) of exp2_split): one exp a logit, 1 at m'
    (ties count 1 each, all but one of them in s), 0 at -inf (also while the lane is still at -inf), NaN
    at a NaN (and at +inf: its row is NaN).  The chunk's ties with m' are counted as the sum of the
    chunk's e less the sum without them (an exact integer after rounding: the plain sum of e would lose
    the others' full relative precision beside the 1s); FLOOR_TIES (the student, whose tops' y nobody
    reads) counts them as Σ floor(e) beside Σ (e - floor(e)), e = 1 at a tie and below 1 elsewhere but
    where it rounds to 1 (then counted with the ties: the same sum), with no compare a class: Triton
    3.6's ptxas kept the tops' predicates as bit masks in registers (about 4 instructions a class).
    Returns (m', s', e, g, c = 2^g_c, g_c, whether the max moved, the largest y of the chunk's classes at
    m' (-inf if none): the teacher's tops' student logits, read beside the ties' count, and the gaps
    x - m' in x units (x itself while the lane is at -inf))."""
    m_new = tl.maximum(m, _lane_max(x))
    is_new = m_new > m
    m_gap = tl.where(m_new == float("-inf"), 0.0, m_new)
    gap = x - m_gap[:, None, None]
    g = mul_inv(gap, k2, k2_lo)
    e = exp2_ftz(g, INTERPRETED)
    if FLOOR_TIES:
        whole = tl.floor(e)
        s_rest = _lane_sum(e - whole)
        n_top = _lane_sum(whole)
        y_top = _lane_max(tl.where(g == 0.0, y, float("-inf")))
    else:
        top = g == 0.0
        s_rest = _lane_sum(tl.where(top, 0.0, e))
        y_top = _lane_max(tl.where(top, y, float("-inf")))
        n_top = tl.floor((_lane_sum(e) - s_rest) + 0.5)
    g_c = tl.where(is_new, mul_inv(m - m_new, k2, k2_lo), 0.0)
    c = exp2_ftz(g_c, INTERPRETED)
    # a moved max: the old max's own term c joins the others and one of the chunk's tops is the argmax
    s = tl.where(is_new, s * c + c + (n_top - 1.0), s + n_top) + s_rest
    return m_new, s, e, g, c, g_c, is_new, y_top, gap


@triton.jit
def _moments_update(mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, xs, xt, p, inv, inv_lo, k2, k2_lo,
                    INTERPRETED: tl.constexpr):
    """One chunk [lanes, k, 2] into the teacher's lane (max, Σ others) and the moments A = Σ w x, R = Σ w ψ(x)
    of x = v - v_ref under w = exp((t - mt)/τ), compensated sums (cA, cR).  The reference is the class of
    the lane's teacher max, (s_ref, t_ref), so that x is small where the teacher's mass is, and x is
    formed from gaps in x units, ((s - s_ref) - (t - t_ref))/τ: never through v itself, whose rounding
    is that of the logits' magnitude over τ (a student far from its teacher).  inf_mass: 1 under the lane
    max where a chunk held a class of teacher weight whose x is not finite (a student -inf where the
    teacher has weight: KL = +inf), scaled as the sums (0 once a later max drops them); such a chunk is
    left out of the moments.  Returns as well the student's mass (p, under its new lane max) on the
    chunk's classes of teacher weight 0 (they go to P_m) and, per lane, whether a new max dropped the
    old sums (their weights underflow: their classes' student mass goes to P_m too)."""
    W = st + 1.0  # Σ w of the old sums (st starts at -1: 0 before the lane's first finite logit)
    # a new max moves the reference to its class (of the chunk's tied tops, the largest student)
    mt, st, w, g, c, g_c, is_new, s_top, t_gap = _online_chunk(mt, st, xt, xs, k2, k2_lo, INTERPRETED, False)
    d = ((s_top - s_ref) - (mt - t_ref)) * (inv + inv_lo)
    move = is_new & (tl.abs(d) < float("inf"))
    d = tl.where(move, d, 0.0)
    s_ref = tl.where(move, s_top, s_ref)
    t_ref = tl.where(move, mt, t_ref)
    small_d = tl.abs(d) <= 1.0
    E_old = exp2_ftz(g_c - d * _LOG2E, INTERPRETED)  # c e^-d
    A_new, R_new = _recentre(A - cA, R - cR, W, c, E_old, d, psi_series(tl.where(small_d, d, 0.0)), small_d)
    A = tl.where(is_new, A_new, A)
    R = tl.where(is_new, R_new, R)
    cA = tl.where(is_new, 0.0, cA)
    cR = tl.where(is_new, 0.0, cR)
    kept = w != 0.0
    # x = ((s - s_ref) - (t - t_ref))·fl(1/τ), as d above, not the pair's one rounding: fl(1/τ)'s own
    # rounding δ scales every x of the row alike, the moments of the student s + δτx at τ (a change in
    # proportion to the student's distance from its teacher: the KL moves by O(δ) relative, 2δ where it
    # is second order), which the teacher's weights, on the pair, do not see.  t - t_ref is the
    # teacher's gap t - mt already formed for w wherever the reference sits at the lane max: always, but
    # after a new max whose x is not finite (the lane is then marked, and its sums count only where a
    # later max drops them); s_ref takes the difference
    s_eff = s_ref + (tl.where(mt == float("-inf"), 0.0, mt) - t_ref)
    x = tl.where(kept, ((xs - s_eff[:, None, None]) - t_gap) * (inv + inv_lo), 0.0)
    # w ψ(x) where |x| > 1 as w e^x - w (1 + x), w e^x = 2^(g + x log2 e) one exp (no overflow where w is
    # tiny); the series' value where it is not taken does not matter (a select, not a product)
    wx = w * x
    w_psi = tl.where(tl.abs(x) <= 1.0, wx * (x * _psi_over_square(x)),
                     exp2_ftz(g + x * _LOG2E, INTERPRETED) - w * (1.0 + x))
    # a class of teacher weight whose x is not finite makes the chunk's Σ w x so: the lane is marked
    # (KL = +inf unless a later max drops it) and the chunk left out of the moments
    sum_wx = _lane_sum(wx)
    finite = tl.abs(sum_wx) < float("inf")
    inf_mass = inf_mass * c + tl.where(finite, 0.0, 1.0)
    A, cA = _kahan_add(A, cA, tl.where(finite, sum_wx, 0.0))
    R, cR = _kahan_add(R, cR, tl.where(finite, _lane_sum(w_psi), 0.0))
    # the student's mass on the classes of teacher weight 0, under the student's new lane max
    return (mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, _lane_sum(tl.where(kept, 0.0, p)),
            is_new & (c == 0.0))


@triton.jit
def _psi_f64(x):
    """ψ(x) = e^x - 1 - x in float64."""
    return tl.where(tl.abs(x) <= 1.0, psi_series_f64(x), tl.exp(x) - 1.0 - x)


@triton.jit
def _moments_finalize(mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, Mt, inv, inv_lo):
    """The lanes' moments moved to the row's teacher max Mt and to the reference class of a lane that
    holds it, in float64 (the merge is where the moments cancel: E_q ψ(u) = e^-ā (b̄ - ψ(ā)) is a
    difference of terms e^|ā| times its size).  Returns (ā, l = log E_q e^u, Σ q over the classes of
    infinite x, s_ref, t_ref) of the row and the lanes it dropped (weights that underflow)."""
    valid = mt > float("-inf")
    at_top = valid & (mt == Mt)
    s0 = tl.max(tl.where(at_top, s_ref, float("-inf")), 0)
    t0 = tl.max(tl.where(at_top & (s_ref == s0), t_ref, float("-inf")), 0)
    # the lanes' weights as the backward's q: 0 (dropped, their sums may have overflowed) where fp32 underflows
    c32 = lane_scale(mt, Mt, inv, inv_lo)[0]
    dropped = c32 == 0.0
    c = c32.to(tl.float64)
    inv64 = inv.to(tl.float64) + inv_lo.to(tl.float64)
    d = tl.where(valid, ((s0.to(tl.float64) - s_ref.to(tl.float64)) - (t0.to(tl.float64) - t_ref.to(tl.float64)))
                 * inv64, 0.0)
    e_neg_d = tl.exp(-d)
    psi_neg_d = tl.where(tl.abs(d) <= 1.0, psi_series_f64(-d), e_neg_d - 1.0 + d)
    W = tl.where(dropped, 0.0, c * (st.to(tl.float64) + 1.0))
    A = tl.where(dropped, 0.0, A.to(tl.float64) - cA.to(tl.float64))
    R = tl.where(dropped, 0.0, c * (e_neg_d * (R.to(tl.float64) - cR.to(tl.float64)) + (psi_neg_d - d) * A)
                 + psi_neg_d * W)
    W_row = tl.sum(W, 0)
    a = tl.sum(c * A - d * W, 0) / W_row
    l = log1p(tl.exp(-a) * (tl.sum(R, 0) / W_row - _psi_f64(a)))
    return a, l, tl.sum(tl.where(dropped, 0.0, c * inf_mass.to(tl.float64)), 0) / W_row, s0, t0, dropped


@triton.jit
def _row_kl(a, l, inf_q, Pm, Ss, St, gap):
    """(KL, precise) of the row from its moments (float64; module docstring); gap = (Ms - Mt)/τ - v_ref."""
    pm = Pm / (1.0 + Ss)
    precise = (l < 1.0) & (pm < 0.5) & (inf_q == 0.0)  # NaN or inf l: the plain form
    kl = tl.where(precise, (l - log1p(-pm.to(tl.float64))).to(tl.float32),
                  ((gap - a).to(tl.float32) + (log1p(Ss) - log1p(St))))
    return tl.where(inf_q > 0.0, float("inf"), kl), precise


@triton.jit
def _log_ratio(xs, xt, zs_gap, zt_gap, inv, inv_lo, nu, kl, log_t, log_s):
    """(u, w) per element, w = log p - log q = u - KL, each from the form with the smaller rounding:
    v - ν (ulp(v) + ulp(ν)) or the gaps to the maxima zs_gap - zt_gap + log1p(St) - log1p(Ss).  Both
    carry KL·0: a row whose KL is NaN or inf has NaN u and w."""
    kz = kl * 0.0
    v = mul_inv(xs - xt, inv, inv_lo)
    u_mean = (v - nu) + kz
    w_gap = (zs_gap - zt_gap) + ((log_t - log_s) + kz)
    err_mean = tl.abs(v) + tl.abs(nu)
    err_gap = (tl.abs(zs_gap) + tl.abs(zt_gap)) + (log_t + log_s)
    u = tl.where(err_mean <= err_gap + tl.abs(kl), u_mean, w_gap + kl)
    w = tl.where(err_mean + tl.abs(kl) <= err_gap, u_mean - kl, w_gap)
    return u, w


@triton.jit
def _exp(x, INTERPRETED: tl.constexpr):
    """e^x as tl.exp computes it, 2^(x log2 e), by the hardware's ex2 alone (:func:`tl_math.exp2_ftz`: results below
    2^-126 are 0)."""
    return exp2_ftz(x * _LOG2E, INTERPRETED)


@triton.jit
def _row_terms(s_row, t_row, c, C, Ms, Mt, inv, inv_lo, inv_t, nu, kl, log_t, log_s, INTERPRETED: tl.constexpr):
    """Per class c of a row, from its row statistics: the logits (xs, xt), the gaps zs_gap = (s - Ms)/τ and
    zt_gap = (t - Mt)/τ, q = e^zt_gap / (1 + St) and (u, w) of :func:`_log_ratio`."""
    xs = load_x(s_row, c, C, 1)
    xt = load_x(t_row, c, C, 1)
    zs_gap = mul_inv(xs - Ms, inv, inv_lo)
    zt_gap = mul_inv(xt - Mt, inv, inv_lo)
    q = _exp(zt_gap, INTERPRETED) * inv_t
    u, w = _log_ratio(xs, xt, zs_gap, zt_gap, inv, inv_lo, nu, kl, log_t, log_s)
    return xs, xt, zs_gap, zt_gap, q, u, w


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
    HAS_TARGET: tl.constexpr, ELEMENTWISE: tl.constexpr, LANES: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """kd[r] = KL of the row (without τ²); ce[r] = CE of s at τ = 1 (0 if ignored); stats[r] as the
    module docstring; ELEMENTWISE also writes out = τ² q (log q - log p).  An iteration reads BLOCK = LANES ×
    CHUNK classes, CHUNK contiguous a lane."""
    r = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + r * stride_s
    t_row = t_ptr + r * stride_t
    tau = tl.load(tau_ptr + r * stride_tau).to(tl.float32)
    inv, inv_lo = reciprocal_split(tau)
    k2, k2_lo = exp2_split(tau)
    cols = tl.arange(0, BLOCK)
    cols2 = tl.arange(0, LANES)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    ms = tl.full([LANES], float("-inf"), tl.float32)
    mt = tl.full([LANES], float("-inf"), tl.float32)
    ss = tl.full([LANES], -1.0, tl.float32)
    st = tl.full([LANES], -1.0, tl.float32)  # see _moments_update
    A = tl.zeros([LANES], tl.float32)
    cA = tl.zeros([LANES], tl.float32)
    R = tl.zeros([LANES], tl.float32)
    cR = tl.zeros([LANES], tl.float32)
    inf_mass = tl.zeros([LANES], tl.float32)
    s_ref = tl.zeros([LANES], tl.float32)
    t_ref = tl.zeros([LANES], tl.float32)
    pm = tl.zeros([LANES], tl.float32)
    s1 = tl.full([LANES], -1.0, tl.float32)
    k1, k1_lo = exp2_split(tl.full([], 1.0, tl.float32))
    # the full blocks unmasked, then the ragged last one
    for start in range(0, C - C % BLOCK, BLOCK):
        ms, ss, s1, pm, mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass = _fold_block(
            s_row, t_row, start, cols2, C, ms, ss, s1, pm, mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, inv, inv_lo,
            k2, k2_lo, k1, k1_lo, LANES * CHUNK, False, HAS_TARGET, INTERPRETED)
    if C % BLOCK != 0:
        ms, ss, s1, pm, mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass = _fold_block(
            s_row, t_row, C - C % BLOCK, cols2, C, ms, ss, s1, pm, mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, inv,
            inv_lo, k2, k2_lo, k1, k1_lo, LANES * CHUNK, True, HAS_TARGET, INTERPRETED)
    # a +inf or NaN logit, or a row with no finite logit, makes the row NaN (as the composition)
    Ms, Ss = online_finalize_x(ms, ss, inv, inv_lo)
    Ss = nan_if_posinf(Ms, Ss)
    Mt, St = online_finalize_x(mt, st, inv, inv_lo)
    St = nan_if_posinf(Mt, St)
    a, l, inf_q, s_ref, t_ref, dropped = _moments_finalize(mt, st, A, cA, R, cR, s_ref, t_ref, inf_mass, Mt, inv,
                                                           inv_lo)
    scale_s = lane_scale(ms, Ms, inv, inv_lo)[0]
    pm = tl.where(scale_s == 0.0, 0.0, tl.where(dropped, ss + 1.0, pm) * scale_s)
    # (Ms - Mt)/τ - v_ref from gaps in x units (never the magnitude of v_ref)
    gap = ((Ms.to(tl.float64) - s_ref) - (Mt.to(tl.float64) - t_ref)) * (inv.to(tl.float64) + inv_lo)
    kl, precise = _row_kl(a, l, inf_q, tl.sum(pm, 0), Ss, St, gap)
    kl = tl.where((Ms == float("-inf")) | (Mt == float("-inf")) | (Ss != Ss) | (St != St), float("nan"), kl)
    # ν = v_ref + ā about v_ref rounded as the backward rounds v = (s - t)·inv: where the teacher's mass
    # sits on the reference class its u = v - ν is then exactly 0, not ulp(v)
    nu = (mul_inv(s_ref - t_ref, inv, inv_lo).to(tl.float64) + a).to(tl.float32)
    tl.store(kd_ptr + r, kl)
    base = stats_ptr + r * 8
    tl.store(base + 0, Ms)
    tl.store(base + 1, Ss)
    tl.store(base + 2, Mt)
    tl.store(base + 3, St)
    tl.store(base + 4, kl)
    tl.store(base + 5, nu)
    tl.store(base + 7, precise.to(tl.float32))
    if HAS_TARGET:
        S1 = online_finalize(ms, s1)[1]
        S1 = nan_if_posinf(Ms, S1)
        y, valid = class_target(target_ptr, r, C, ignore_index)
        s_y = tl.load(s_row + y).to(tl.float32)
        tl.store(ce_ptr + r, tl.where(valid, target_nll(Ms, s_y, log1p(S1), 1.0), 0.0))
        tl.store(base + 6, S1)
    if ELEMENTWISE:
        log_t, log_s, inv_t = log1p(St), log1p(Ss), tl.math.div_rn(1.0, 1.0 + St)
        for start in range(0, C, BLOCK):
            c = start + cols
            _xs, _xt, _zs, _zt, q, _u, w = _row_terms(s_row, t_row, c, C, Ms, Mt, inv, inv_lo, inv_t, nu, kl, log_t,
                                                      log_s, INTERPRETED)
            # q = 0 (a masked teacher class) adds exactly 0; a NaN q stays NaN
            val = tl.where(q != 0.0, -(tau * tau) * q * w, 0.0)
            tl.store(out_ptr + r * C + c, to_store(val, out_ptr, INTERPRETED), mask=c < C)
