"""Pure ``@triton.jit`` math shared by every row-engine kernel (no loads or stores).

The online statistics of a row z = x / τ are kept per lane of a block as
``(m, s)``: the running max ``m`` and ``s = Σ_{j ≠ argmax} exp(z_j - m)``, the sum
over every element *but one* that attains the max.  The log-sum-exp is then
``lse = m + log1p(s)``, and the cross-entropy of the argmax class is ``log1p(s)``
with full relative precision even when it is 1e-9 (where ``log(1 + s)`` rounds
to 0 in fp32).  This is the small-τ promise of DESIGN.md ("Numerics").

The softmax, cross-entropy and Gumbel kernels keep the max in x units, ``m = max x``
(``online_update_log2``: no division by τ per element, see ``exp2_scale`` for the error
bound); ``online_update`` (z units) serves kd_loss's kernel.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice


@triton.jit
def log1p(x):
    """log(1 + x), exact to an ulp, from core ops only.

    ``libdevice.log1p`` returns None under the Triton interpreter, so this is the
    classic compensated form: with u = 1 + x, log1p(x) = log(u) * x / (u - 1).
    """
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


# Gumbel noise from Philox words.  A word k (uint32) becomes u = k · 2^-32 (rounded to fp32, so small
# u keep their full relative precision: the right tail of g, the rare classes a sample may pick)
# clamped into [2^-32, 1 - 2^-24]: g ∈ [-2.8, 22.2], finite whatever k is.
_U_MIN = tl.constexpr(2.3283064365386963e-10)
_U_MAX = tl.constexpr(0.99999994)
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)
# Below _SERIES_BELOW, L = -log2(1 - u) is its series Σ_k u^k / (k ln 2), k = 1..5 (relative truncation
# error < u^5 / 5 < 2^-27); above it, 1 - u is exact to 2^-25 relative to L's 2^-5 / ln 2 and
# log2 is the hardware one (MUFU.LG2, absolute error ≤ 2^-22 near 1): L to ~2^-16 relative there, where
# g < 3.5 (a relative error of L is an absolute error of g).
_SERIES_BELOW = tl.constexpr(0.03125)
_L1 = tl.constexpr(1.4426950408889634)
_L2 = tl.constexpr(0.7213475204444817)
_L3 = tl.constexpr(0.4808983469629878)
_L4 = tl.constexpr(0.36067376022224085)
_L5 = tl.constexpr(0.28853900817779266)
_LN2 = tl.constexpr(0.6931471805599453)
# g = -ln E, E = L·ln 2:  g = -ln 2 · log2(L) - ln(ln 2)
_MINUS_LN_LN2 = tl.constexpr(0.36651292058166435)


@triton.jit
def fast_log2(x, INTERPRETED: tl.constexpr):
    """log2(x) by the hardware's approximation (MUFU.LG2: absolute error ≤ 2^-22 in [0.5, 2], 2 ulp
    elsewhere); tl.log2 is a software polynomial of ~20 instructions.  libdevice returns None under
    the interpreter, which takes tl.log2."""
    if INTERPRETED:
        return tl.log2(x)
    return libdevice.fast_log2f(x)


@triton.jit
def gumbel_of_word(w, INTERPRETED: tl.constexpr):
    """g = -ln(E), E = -ln(1 - u) ~ Exponential(1), u = w · 2^-32 clamped (w a uint32 Philox word).

    Both logarithms are log2 (the hardware's), their ln 2 factors folded into one FMA:
    g = -ln 2 · log2(L) - ln(ln 2) with L = E / ln 2 = -log2(1 - u).  For small u (large g, the tail a
    rare class is sampled from) L is its series in u, which keeps full relative precision where
    1 - u would round it away."""
    u = w.to(tl.float32) * _TWO_POW_M32
    u = tl.minimum(tl.maximum(u, _U_MIN), _U_MAX)
    series = u * (_L1 + u * (_L2 + u * (_L3 + u * (_L4 + u * _L5))))
    L = tl.where(u < _SERIES_BELOW, series, -fast_log2(1.0 - u, INTERPRETED))
    return fast_log2(L, INTERPRETED) * (-_LN2) + _MINUS_LN_LN2


# Philox4x32-10 (Salmon et al., SC'11), the constants of triton.language.random
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def _mul_wide(a, B: tl.constexpr, EMULATED: tl.constexpr):
    """(high, low) words of the 64-bit product of the uint32 ``a`` and Philox's round constant ``B`` (A or B):
    one mul.wide.u32 (IMAD.WIDE.U32), kept in 32-bit registers (a uint64 tensor would move the noise's layout
    through shared memory); EMULATED: the same product as a uint64 multiply (the interpreter runs no PTX)."""
    if EMULATED:
        p = a.to(tl.uint64) * B
        return (p >> 32).to(tl.uint32), p.to(tl.uint32)
    if B == _PHILOX_ROUND_A:
        asm: tl.constexpr = "{ .reg .u64 p; mul.wide.u32 p, $2, 0xD2511F53; mov.b64 {$1, $0}, p; }"
    else:
        asm: tl.constexpr = "{ .reg .u64 p; mul.wide.u32 p, $2, 0xCD9E8D57; mov.b64 {$1, $0}, p; }"
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)


@triton.jit
def philox_rounds(seed, offset, EMULATED: tl.constexpr):
    """The four words of Philox4x32-10 with key ``seed`` (64 bits) and counter (offset's low word, its high
    word, 0, 0), as tl.randint4x computes them, with each round's two 32 × 32-bit products one 64-bit
    multiply each (:func:`_mul_wide`; EMULATED: in uint64 arithmetic, for a CPU test of the rounds)."""
    s = seed.to(tl.uint64)
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    c0 = offset.to(tl.uint32)
    if tl.constexpr(offset.dtype.primitive_bitwidth) > 32:
        c1 = (offset >> 32).to(tl.uint32)
    else:
        c1 = c0 * 0
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        hi_b, lo_b = _mul_wide(c2, _PHILOX_ROUND_B, EMULATED)
        hi_a, lo_a = _mul_wide(c0, _PHILOX_ROUND_A, EMULATED)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def randint4x(seed, offset, INTERPRETED: tl.constexpr):
    """tl.randint4x(seed, offset) bit for bit.  Compiled: :func:`philox_rounds`, whose products are one
    IMAD.WIDE.U32 each where tl.randint4x takes umulhi and mul apart (IMAD.HI and IMAD): two instructions
    fewer a round, 20 a call, 5 an element of Gumbel noise.  The interpreter takes tl.randint4x itself (the
    emulated rounds cost it 40% more time); tests/test_sampling.py checks the rounds against it, and
    bench/gpu_quick.py the compiled words on a GPU."""
    if INTERPRETED:
        return tl.randint4x(seed, offset)
    return philox_rounds(seed, offset, False)


@triton.jit
def gumbel_block(seed, noise_row, start, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """Gumbel(0, 1) noise of columns ``start .. start + BLOCK`` of a row (``start`` a multiple of 4):
    column c gets word c % 4 of the Philox counter ``noise_row + c // 4`` under ``seed`` (noise_row =
    r · ceil(C / 4) for row r), so four columns share one Philox call and the noise is a function of
    (seed, row, column) alone, whatever the block or the split of the row."""
    q = noise_row + start // 4 + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = randint4x(seed, q, INTERPRETED)
    # join(join(a0, a2), join(a1, a3)) flattens to a0[0], a1[0], a2[0], a3[0], a0[1], ...
    g = tl.join(tl.join(gumbel_of_word(w0, INTERPRETED), gumbel_of_word(w2, INTERPRETED)),
                tl.join(gumbel_of_word(w1, INTERPRETED), gumbel_of_word(w3, INTERPRETED)))
    return tl.reshape(g, [BLOCK])


@triton.jit
def exp2_scale(tau):
    """c = log2(e) / τ rounded once to fp32 (formed in fp64): exp((x - m) / τ) = exp2((x - m)·c).

    Why x units and no division per element.  With m the running max of x (x / τ has the same
    argmax, τ > 0), the exponent t = (x - m)·c is rounded three times, each relative to |t| itself:
    x - m (exact by Sterbenz where x ≥ m/2, i.e. near the max), c, and the product; so
    t = t_exact (1 + δ), |δ| ≤ 3u (u = 2^-24), and exp2(t) = exp(a)(1 + ε) with a = (x - m)/τ ≤ 0,
    |ε| ≤ 3u|a| + (exp2's own rounding).  Since |a| e^a ≤ 1/e, every term's absolute error is below
    1.2u whatever τ and however far the logits are from 0.  Forming z = x / τ first (the IEEE
    division, or torch's composition) rounds relative to |x| / τ instead: at an offset row
    (x ≈ 1e4, τ = 1e-3, z ≈ 1e7) one ulp of z is 1 in the exponent."""
    return (tl.full([], 1.4426950408889634, tl.float64) / tau.to(tl.float64)).to(tl.float32)


_FLT_MIN = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def exp2_ftz(x, INTERPRETED: tl.constexpr):
    """2^x by the hardware's ex2 alone (MUFU.EX2, ~2 ulp), results below 2^-126 flushed to 0: tl.exp and
    tl.exp2 may add a subnormal fix-up of three instructions per element (a weight below 2^-126 of the
    row's max is a class of weight 0).  The interpreter takes tl.exp2 and flushes the same."""
    if INTERPRETED:
        y = tl.exp2(x)
        return tl.where(y < _FLT_MIN, 0.0, y)
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def online_update_log2(m, s, x, c):
    """:func:`online_update` in x units: fold a block ``x`` (masked lanes -inf) into per-lane
    ``(m, s)`` with m the running max of x and s = Σ_{j ≠ argmax} exp2((x_j - m)·c), c = log2(e)/τ
    (:func:`exp2_scale`).  One exp2 per element, no division; ties, infinities and NaN as
    online_update."""
    is_new = x > m
    # the exponent -|x - m|·c: the old max's weight when x is the new max, x's own otherwise (one FADD
    # and one FMUL with its abs and negation as operand modifiers); ties (x == m, also ±inf) weigh 1
    e = tl.exp2(tl.where(x == m, 0.0, -tl.abs(x - m) * c))
    s = tl.where(is_new, s * e + e, s + e)
    m = tl.maximum(m, x)
    return m, s


@triton.jit
def online_finalize_log2(m, s, c):
    """:func:`online_finalize` for the lanes of :func:`online_update_log2`: the row's
    ``(M, S)``, M = max x, S = Σ_{j ≠ argmax} exp((x_j - M)/τ), S = -1 for a row with no finite x."""
    M = tl.max(m, 0)
    valid = m > float("-inf")
    at_top = valid & (m == M)
    scale = tl.exp2(tl.where(at_top, 0.0, tl.where(valid, (m - M) * c, float("-inf"))))
    S = tl.sum(s * scale, 0) + tl.sum(tl.where(valid & (m < M), scale, 0.0), 0)
    S = S + (tl.sum(at_top.to(tl.float32), 0) - 1.0)
    return M, S


@triton.jit
def online_update(m, s, z):
    """Fold a block ``z`` (masked lanes are -inf) into per-lane ``(m, s)``.

    One exp per element: a new lane max rescales the old sum and adds the old
    max's own term; otherwise the element is added to the sum of the others.
    """
    is_new = z > m
    d = tl.where(is_new, m - z, z - m)
    # A tie with the lane max adds its 1, also where z - m is inf - inf = NaN: a second +inf (lse
    # stays +inf, as torch's) or a masked -inf while the lane max is still -inf (those ones are
    # wiped, s * 0, by the lane's first finite value, and a lane left at -inf counts for nothing
    # in online_finalize).  A NaN z makes s NaN.
    e = tl.exp(tl.where(z == m, 0.0, d))
    s = tl.where(is_new, s * e + e, s + e)
    m = tl.maximum(m, z)
    return m, s


@triton.jit
def online_finalize(m, s):
    """Reduce per-lane ``(m, s)`` to the row's ``(M, S)``, S = Σ_{j ≠ argmax} exp(z_j - M).

    Lanes whose max is below M contribute their max's term as well; among the
    lanes that attain M all but one contribute their 1.  The -1 only matters
    for a row with no finite element, where S = -1 makes lse = -inf.
    """
    M = tl.max(m, 0)
    valid = m > float("-inf")
    at_top = valid & (m == M)
    # at_top: exp(0), also when M = +inf (inf - inf)
    scale = tl.exp(tl.where(at_top, 0.0, tl.where(valid, m - M, float("-inf"))))
    S = tl.sum(s * scale, 0) + tl.sum(tl.where(valid & (m < M), scale, 0.0), 0)
    S = S + (tl.sum(at_top.to(tl.float32), 0) - 1.0)
    return M, S


@triton.jit
def reciprocal_split(tau):
    """1/τ as a pair (inv, inv_lo), inv + inv_lo = 1/τ to about ε²: x/τ as :func:`mul_inv` is then
    rounded once, where x·fl(1/τ) also carries fl(1/τ)'s own rounding, the same relative error in every
    element (a slightly different τ).  inv is set just below 1/τ so that inv_lo > 0: mul_inv keeps ±inf
    (a remainder of 0, or of the other sign, would make inf·0 or inf - inf)."""
    inv = tl.math.div_rn(1.0, tau) * (1.0 - 1.0 / 2097152)
    return inv, tl.fma(-tau, inv, 1.0) * inv


@triton.jit
def mul_inv(x, inv, inv_lo):
    """x/τ to one rounding from the pair of :func:`reciprocal_split`: one multiply and one fma."""
    return tl.fma(x, inv, x * inv_lo)


@triton.jit
def online_update_x(m, s, x, inv, inv_lo):
    """:func:`online_update` for z = x/τ kept in x units (the max m is a logit, never rounded by a
    division: exp((x - m)/τ) takes one rounding of the gap, not of |x|/τ); (inv, inv_lo) from
    :func:`reciprocal_split`.

    Returns ``(m, s, e, is_new, arg)``: e = exp(arg) is the old sum's rescale where ``is_new`` and the
    element's own weight exp((x - m)·inv) otherwise, so that a caller keeping more sums under the same
    max needs no second exp.
    """
    is_new = x > m
    # a tie adds exp(0) = 1, also at inf - inf (see online_update)
    arg = tl.where(x == m, 0.0, mul_inv(tl.where(is_new, m - x, x - m), inv, inv_lo))
    e = tl.exp(arg)
    s = tl.where(is_new, s * e + e, s + e)
    m = tl.maximum(m, x)
    return m, s, e, is_new, arg


@triton.jit
def lane_scale(m, M, inv, inv_lo):
    """exp((m - M)/τ) per lane: the factor that moves a lane's sums from its max m to the row's max M;
    1 at the lanes that attain M (also M = +inf), 0 at the lanes that saw no finite value."""
    valid = m > float("-inf")
    at_top = valid & (m == M)
    return tl.exp(tl.where(at_top, 0.0, tl.where(valid, mul_inv(m - M, inv, inv_lo), float("-inf")))), valid, at_top


@triton.jit
def online_finalize_x(m, s, inv, inv_lo):
    """:func:`online_finalize` for the lanes of :func:`online_update_x`: ``(M, S)`` with M = max x (x
    units) and S = Σ_{j ≠ argmax} exp((x_j - M)/τ)."""
    M = tl.max(m, 0)
    scale, valid, at_top = lane_scale(m, M, inv, inv_lo)
    S = tl.sum(s * scale, 0) + tl.sum(tl.where(valid & (m < M), scale, 0.0), 0)
    S = S + (tl.sum(at_top.to(tl.float32), 0) - 1.0)
    return M, S


@triton.jit
def psi_series(x):
    """ψ(x) = e^x - 1 - x for |x| <= 1, with full relative precision: x² (1/2 + x·h(x)), h the
    polynomial of :func:`psi3_series` (the truncation is below 3e-9 relative at |x| = 1)."""
    return x * x * (_exp_tail3(x) * x + 0.5)


@triton.jit
def psi_series_f64(x):
    """ψ(x) = e^x - 1 - x for |x| <= 1 in float64 to its precision: x²/2 (1 + x/3 (1 + x/4 (... (1 + x/19)))),
    every coefficient an exact integer (a float literal would be rounded to fp32 first)."""
    h = 1.0 + x / 19.0
    for k in tl.static_range(18, 2, -1):
        h = 1.0 + x / k * h
    return x * x * 0.5 * h


@triton.jit
def _exp_tail3(x):
    """Σ_{k<9} x^k/(k+3)!: (e^x - 1 - x - x²/2)/x³ for |x| <= 1 (Horner)."""
    h = x * (1.0 / 39916800) + 1.0 / 3628800
    h = h * x + 1.0 / 362880
    h = h * x + 1.0 / 40320
    h = h * x + 1.0 / 5040
    h = h * x + 1.0 / 720
    h = h * x + 1.0 / 120
    h = h * x + 1.0 / 24
    return h * x + 1.0 / 6


@triton.jit
def psi3_series(x):
    """e^x - 1 - x - x²/2 for |x| <= 1, with full relative precision: x³ Σ_{k<9} x^k/(k+3)!."""
    return x * x * x * _exp_tail3(x)


@triton.jit
def nan_if_posinf(M, S):
    """S for softmax, log_softmax and the losses: a row with a +inf logit is NaN there, as in torch
    (inf - inf); only τ·logsumexp keeps ``(M, S) = (+inf, #others at +inf)`` and returns +inf."""
    return tl.where(M == float("inf"), float("nan"), S)


@triton.jit
def weighted_gap_update(m, A, D, z, a):
    """Per-lane ``A = Σ a_j`` and ``D = Σ a_j (m - z_j)`` under the *old* lane max ``m`` (in the units of
    m and z: x units in row_ce.py, which scales the row's D by 1/τ once).

    Every term of D is non-negative, so ``Σ_j a_j (lse - z_j) = D + A log1p(S)``
    (after :func:`weighted_gap_finalize`) has no cancellation at small τ.  This is
    the label-smoothing and probability-target part of the cross-entropy.
    Coefficients a_j = 0 contribute exactly 0, also where z_j = -inf.
    """
    m_new = tl.maximum(m, z)
    D = tl.where((z > m) & (A != 0.0), D + A * (z - m), D)
    # A class at -inf costs +inf (as log_softmax = -inf does), even while the lane max is -inf too.
    gap = tl.where(z == float("-inf"), float("inf"), m_new - z)
    D = D + tl.where(a != 0.0, a * gap, 0.0)
    return A + a, D


@triton.jit
def weighted_gap_finalize(m, A, D, M):
    """Reduce per-lane ``(A, D)`` to the row: ``(Σ a_j, Σ a_j (M - z_j))``."""
    D = tl.where(A != 0.0, D + A * (M - m), 0.0)
    return tl.sum(A, 0), tl.sum(D, 0)


@triton.jit
def _bf16_round_nearest_even(x):
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_store(y, ptr, INTERPRETED: tl.constexpr):
    """``y`` cast to the element type of ``ptr``, rounded to nearest even.

    Third interpreter trap (Triton 3.9, checked): under ``TRITON_INTERPRET=1`` an
    fp32 -> bf16 cast truncates (0.99988 -> 0.9961 instead of 1.0), with or
    without ``fp_downcast_rounding``.  Launchers set INTERPRETED only under the
    interpreter; compiled code casts directly (RTNE on the GPU).
    """
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        return _bf16_round_nearest_even(y)
    return y.to(ptr.dtype.element_ty)
