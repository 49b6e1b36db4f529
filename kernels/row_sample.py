"""Row engine, sampling: Gumbel-softmax (forward and backward) and one categorical draw per row
by the Gumbel-max trick (see row_engine.py for the (A, C, B) layout and the saved statistics).

The Gumbel noise never exists in memory.  Element ``c`` of row ``r`` gets the
Philox counter ``r * C + c`` (int64) under one seed per launch, so any pass
over the row regenerates exactly the same noise: the forward's second pass and
the hard backward recompute it instead of reading it.

The seed is drawn from the caller's ``torch.Generator`` by ``torch.randint`` on
the logits' device and read by the kernel through a pointer: no host sync, and
a generator in a given state always gives the same draws.

Memory traffic (bytes of the logits dtype, R rows × C): gumbel_softmax forward
reads R·C (twice for rows longer than one block) and writes R·C; the hard
backward reads x and the gradient and writes dx; sample reads R·C once and
writes R int64.
"""
import torch
import triton
import triton.language as tl

from .row_engine import interpreted, row_config, rows, tau_stride
from .row_softmax import softmax_bwd
from .tl_math import log1p, online_finalize, online_update, to_store

# tl.rand returns k · 2^-31 (k < 2^31), 0 included.  Clamped into [2^-32, 1 - 2^-24], the
# Gumbel value is finite whatever k is: g ∈ [-2.8, 22.2].
_U_MIN = tl.constexpr(2.3283064365386963e-10)
_U_MAX = tl.constexpr(0.99999994)


@triton.jit
def gumbel_noise(seed, offs):
    """g = -log(E), E = -log1p(-u) ~ Exponential(1), u = tl.rand(seed, offs) clamped.

    E is formed with log1p so that small u (large g, the tail a rare class is
    sampled from) keeps full relative precision; -log(u) would round 1 - u first.
    """
    u = tl.rand(seed, offs)
    u = tl.minimum(tl.maximum(u, _U_MIN), _U_MAX)
    return -tl.log(-log1p(-u))


@triton.jit
def _noisy_z(x_row, c, C, stride_xc, tau, seed, noise_row):
    """z = (x + g) / τ for columns ``c`` of a row, -inf past the end (an IEEE division, as load_z)."""
    x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=c < C, other=float("-inf"))
    g = gumbel_noise(seed, noise_row + c)
    return tl.math.div_rn(x.to(tl.float32) + g, tau)


@triton.jit
def _gumbel_fwd_kernel(
    # pointers
    x_ptr, out_ptr, m_ptr, s_ptr, tau_ptr, seed_ptr,
    # shapes: x is (A, C, B), row r = a * B + b; out is contiguous
    C, B,
    # strides of x, and of τ (0: one τ; 1: one τ per a)
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    HARD: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """y = softmax((x_r + g_r) / τ) with g_r ~ Gumbel(0, 1) from Philox; HARD: the one-hot of
    argmax y (first index on ties).  Saves M = max z and S = Σ_{j ≠ argmax} exp(z_j - M)."""
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    x_row = x_ptr + a * stride_xa + b * stride_xb
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    seed = tl.load(seed_ptr)
    noise_row = r * C
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    # per lane, the first column holding the lane's max (columns arrive in increasing order)
    arg = tl.zeros([BLOCK], tl.int32)
    if ONE_BLOCK:
        z_kept = _noisy_z(x_row, cols, C, stride_xc, tau, seed, noise_row)
        arg = tl.where(z_kept > m, cols, arg)
        m, s = online_update(m, s, z_kept)
    else:
        for start in range(0, C, BLOCK):
            c = start + cols
            z = _noisy_z(x_row, c, C, stride_xc, tau, seed, noise_row)
            arg = tl.where(z > m, c, arg)
            m, s = online_update(m, s, z)
    M, S = online_finalize(m, s)
    tl.store(m_ptr + r, M)
    tl.store(s_ptr + r, S)
    out_row = out_ptr + a * C * B + b
    if HARD:
        # a row with no finite z has every lane at M = -inf and all arg = 0: index 0, as torch.argmax
        top = tl.min(tl.where(m == M, arg, C), 0)
        for start in range(0, C, BLOCK):
            c = start + cols
            y = tl.where(c == top, 1.0, 0.0)
            tl.store(out_row + c.to(tl.int64) * B, to_store(y, out_ptr, INTERPRETED), mask=c < C)
    else:
        inv_total = 1.0 / (1.0 + S)
        for start in range(0, C, BLOCK):
            c = start + cols
            if ONE_BLOCK:
                z = z_kept
            else:
                z = _noisy_z(x_row, c, C, stride_xc, tau, seed, noise_row)
            y = tl.exp(z - M) * inv_total
            tl.store(out_row + c.to(tl.int64) * B, to_store(y, out_ptr, INTERPRETED), mask=c < C)


@triton.jit
def _gumbel_bwd_kernel(
    # pointers: g (the output's gradient) and dx are contiguous (A, C, B)
    x_ptr, g_ptr, dx_ptr, m_ptr, s_ptr, tau_ptr, seed_ptr,
    # shapes
    C, B,
    # strides of x and of τ
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Straight-through backward: dx = y (g - Σ g y) / τ with the soft sample
    y = exp(z - M) / (1 + S), z = (x + g_noise) / τ regenerated from the forward's seed."""
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    x_row = x_ptr + a * stride_xa + b * stride_xb
    base = a * C * B + b
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    inv_tau = 1.0 / tau
    seed = tl.load(seed_ptr)
    noise_row = r * C
    M = tl.load(m_ptr + r)
    inv_total = 1.0 / (1.0 + tl.load(s_ptr + r))
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        offs = cols.to(tl.int64) * B
        y_kept = tl.exp(_noisy_z(x_row, cols, C, stride_xc, tau, seed, noise_row) - M) * inv_total
        g_kept = tl.load(g_ptr + base + offs, mask=cols < C, other=0.0).to(tl.float32)
        red = tl.sum(g_kept * y_kept, 0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, C, BLOCK):
            c = start + cols
            y = tl.exp(_noisy_z(x_row, c, C, stride_xc, tau, seed, noise_row) - M) * inv_total
            acc += y * tl.load(g_ptr + base + c.to(tl.int64) * B, mask=c < C, other=0.0).to(tl.float32)
        red = tl.sum(acc, 0)
    for start in range(0, C, BLOCK):
        c = start + cols
        offs = c.to(tl.int64) * B
        if ONE_BLOCK:
            y = y_kept
            g = g_kept
        else:
            y = tl.exp(_noisy_z(x_row, c, C, stride_xc, tau, seed, noise_row) - M) * inv_total
            g = tl.load(g_ptr + base + offs, mask=c < C, other=0.0).to(tl.float32)
        dx = y * (g - red) * inv_tau
        tl.store(dx_ptr + base + offs, to_store(dx, dx_ptr, INTERPRETED), mask=c < C)


@triton.jit
def _sample_kernel(
    # pointers: idx is (R,) int64
    x_ptr, idx_ptr, tau_ptr, seed_ptr,
    # shapes: x is (R, C)
    C,
    # strides of x, and of τ (0: one τ; 1: one τ per row)
    stride_xr, stride_xc, stride_tau,
    # constants
    GREEDY: tl.constexpr, BLOCK: tl.constexpr,
):
    """idx[r] = argmax_c (x_rc / τ + g_rc), g ~ Gumbel(0, 1): a draw from softmax(x_r / τ)
    (Gumbel-max); τ = 0 is argmax x.  GREEDY: argmax x, no noise drawn.  One pass; the first
    index wins ties; a row holding a NaN gets idx -1 (the caller raises).

    The key x / τ + g is never formed: at |x| / τ ≳ 1e6 its rounding (or that of x + τ g)
    swallows the noise.  Each lane keeps its best column's (x, g) and compares a new column
    by the sign of (x - x_best) + τ (g - g_best), which has only the relative rounding of
    the two differences; the lanes' winners are compared in z units relative to the largest
    of their logits M, (x_best - M) / τ + g_best, which keeps the noise's digits near the top."""
    r = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + r * stride_xr
    cols = tl.arange(0, BLOCK)
    best_x = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    if not GREEDY:
        tau = tl.load(tau_ptr + r * stride_tau).to(tl.float32)
        seed = tl.load(seed_ptr)
        noise_row = r * C
        best_g = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        c = start + cols
        x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=c < C, other=float("-inf")).to(tl.float32)
        # best_x turns NaN at a lane's first NaN and stays NaN: the row is refused (idx -1)
        if GREEDY:
            take = x > best_x
            best_x = tl.maximum(best_x, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            # τ = 0 (a greedy row of a per-row τ) leaves x - best_x: argmax x as well.  -inf - -inf
            # and inf - inf are NaN: not taken, so the first of equal infinite logits is kept.
            g = gumbel_noise(seed, noise_row + c)
            take = (tl.fma(tau, g - best_g, x - best_x) > 0) | (x != x)
            best_g = tl.where(take, g, best_g)
            best_x = tl.where(take, x, best_x)
        arg = tl.where(take, c, arg)
    nan_row = tl.max((best_x != best_x).to(tl.int32), 0) > 0
    M = tl.max(best_x, 0)  # the lanes' best logits' max (its row's max logit when GREEDY or τ = 0)
    at_top = best_x == M
    if not GREEDY:
        z = (best_x - M) / tau + best_g
        # τ = 0, or M infinite (a +inf logit: the first one, as torch.argmax; no finite logit: 0):
        # argmax x among the lanes
        noisy = (tau > 0) & (M > float("-inf")) & (M < float("inf"))
        at_top = tl.where(noisy, z == tl.max(z, 0), at_top)
    top = tl.min(tl.where(at_top, arg, C), 0)
    tl.store(idx_ptr + r, tl.where(nan_row, -1, top).to(tl.int64))


# Launchers (the torch path, fused_tau/_torch_sample.py, has the same names and arguments).
# Inputs are already checked by fused_tau.sampling; ``tau`` is a float32 tensor of one element
# or one per row group, ``seed`` a one-element int64 tensor on the logits' device (drawn by
# fused_tau._ops.draw_seed from the caller's generator, so no host sync).

def gumbel_fwd(x3, tau, seed, hard, need_grad):
    """Returns (out, aux): out is the soft sample, or the one-hot of its argmax when ``hard``,
    in x3's dtype and contiguous (A, C, B) layout; aux = (M, S) of each row, which gumbel_bwd
    takes.  ``need_grad`` is unused here: the backward regenerates the noise from the seed."""
    R, C, B = rows(x3)
    dev = x3.device
    out = torch.empty((x3.shape[0], C, B), device=dev, dtype=x3.dtype)
    m = torch.empty(R, device=dev, dtype=torch.float32)
    s = torch.empty(R, device=dev, dtype=torch.float32)
    block, one_block, num_warps = row_config(C)
    _gumbel_fwd_kernel[(R,)](
        x3, out, m, s, tau, seed, C, B, *x3.stride(), tau_stride(tau),
        HARD=hard, BLOCK=block, ONE_BLOCK=one_block, INTERPRETED=interpreted(), num_warps=num_warps,
    )
    return out, (m, s)


def gumbel_bwd(g, tau, hard, src, seed, aux):
    """dx of the soft sample (the straight-through gradient when ``hard``), contiguous (A, C, B);
    ``g`` is the output's gradient, contiguous (A, C, B); ``src`` is the logits x3 when ``hard``
    (the noise is regenerated from ``seed``), else the soft sample itself."""
    m, s = aux
    if not hard:
        return softmax_bwd(src, g, src, m, s, tau, False, False)[0]
    R, C, B = rows(src)
    dx = torch.empty_like(g, dtype=src.dtype)
    block, one_block, num_warps = row_config(C)
    _gumbel_bwd_kernel[(R,)](
        src, g, dx, m, s, tau, seed, C, B, *src.stride(), tau_stride(tau),
        BLOCK=block, ONE_BLOCK=one_block, INTERPRETED=interpreted(), num_warps=num_warps,
    )
    return dx


def sample_fwd(x2, tau, seed, greedy):
    """One index per row of the (R, C) logits ``x2`` (C >= 1), int64 of shape (R,); -1 for a
    row that holds a NaN.  ``greedy``: argmax, ``seed`` and ``tau`` unread."""
    R, C = x2.shape
    idx = torch.empty(R, device=x2.device, dtype=torch.int64)
    block, _, num_warps = row_config(C)
    _sample_kernel[(R,)](
        x2, idx, tau, idx if greedy else seed, C, *x2.stride(), tau_stride(tau),
        GREEDY=greedy, BLOCK=block, num_warps=num_warps,
    )
    return idx

