"""Row engine, sampling: Gumbel-softmax (forward and backward) and one categorical draw per row
(see row_engine.py for the (A, C, B) layout and the saved statistics).

Gumbel-softmax is the softmax kernels of row_softmax.py with their noisy load (NOISY: x + g on
every load, HARD: the one-hot of the argmax); this module holds its launchers and sample's kernels.
sample draws by inverting the row's distribution function with one uniform a row (_sample_kernel):
Gumbel-max drew a 10-round Philox word and two logarithms for every class, which bound it by
instruction issue at a quarter of an H200's bandwidth (issue 15); τ = 0 is _argmax_kernel.  The Gumbel
noise (tl_math.gumbel_block) never exists in memory.  Column ``c`` of row
``r`` gets word ``c % 4`` of the Philox counter ``r · ceil(C / 4) + c // 4`` (int64) under one seed
per launch (one 10-round Philox call gives four columns their noise; -log(-log(1 - u)) with the
hardware log2), so any pass over the row, any block size and any split of the row regenerates
exactly the same noise: the forward's second pass and the hard backward recompute it instead of
reading it.  (Until issue 15 a column took one word of its own counter ``r · C + c`` and software
logarithms: a given seed draws different samples since.)

The seed is drawn from the caller's ``torch.Generator`` by ``torch.randint`` on
the logits' device and read by the kernel through a pointer: no host sync, and
a generator in a given state always gives the same draws.

Memory traffic (bytes of the logits dtype, R rows × C): gumbel_softmax forward
reads R·C (twice for rows longer than one block) and writes R·C; the hard
backward reads x and the gradient and writes dx; sample reads R·C once, plus one group of
GROUP_BLOCKS blocks a row again (from L2), and writes R int64.  Few long rows are split across programs
(row_engine.row_splits),
with a few fp32 partials a split, combined by each row's last program in the same launch.
"""
import torch
import triton
import triton.language as tl

from .row_engine import (interpreted, last_arrival, load_x, load_x_full, row_launch, row_splits, row_start,
                         tau_stride, tickets)
from .row_softmax import MODE_SOFTMAX, softmax_bwd, softmax_fwd
from .tl_math import exp2_ftz, exp2_scale


# sample's groups: a draw re-reads one group of its row, GROUP_BLOCKS blocks (16384 columns of the
# 4096-column blocks of a long row: 64 fp32 values a thread over 8 warps when it is read again).  Each group
# ends in its lanes' reductions (_group_mass): at 2 blocks the pass costs 12.4 instructions an element on sm_90,
# at 4 blocks 9.5; 8 blocks spill (python -m bench.model --ops sample)
GROUP_BLOCKS = 4
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _pick_argmax(best_x, arg, nan_row, C):
    """argmax among lanes that each hold their best column ``arg`` and its x: the first column holding
    the lanes' largest x (-1 when ``nan_row``)."""
    M = tl.max(best_x, 0)
    top = tl.min(tl.where(best_x == M, arg, C), 0)
    return tl.where(nan_row, -1, top)


@triton.jit
def _argmax_kernel(
    # pointers: idx is (R,) int64, or (R, splits) when SPLIT, with the rows' (R,) int64 argmax and (R,)
    # int32 tickets (zero between launches); ok: the verdict, set to 0 for a row holding a NaN
    x_ptr, idx_ptr, part_x_ptr, row_idx_ptr, count_ptr, ok_ptr,
    # shapes: x is (R, C); program (r, j) takes columns [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r
    C, span_blocks,
    stride_xr, stride_xc,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
):
    """idx[r] = argmax_c x_rc, the first index on ties, -1 for a row holding a NaN, which also stores 0 to the
    verdict ``ok`` (sample's τ = 0, greedy).
    SPLIT: the argmax of this program's columns and its x, then a ticket of its row (last_arrival), and the
    row's last arriver picks among the splits' (the same pick whichever program it is)."""
    r = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + r * stride_xr
    part = r * tl.num_programs(1) + tl.program_id(1)
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    cols = tl.arange(0, BLOCK)
    best_x = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    for start in range(col0, col_end, BLOCK):
        c = start + cols
        x = load_x(x_row, c, C, stride_xc)
        # best_x turns NaN at a lane's first NaN and stays NaN: the row is refused (idx -1)
        take = x > best_x
        best_x = tl.maximum(best_x, x, propagate_nan=tl.PropagateNan.ALL)
        arg = tl.where(take, c, arg)
    nan_row = tl.max((best_x != best_x).to(tl.int32), 0) > 0
    top = _pick_argmax(best_x, arg, nan_row, C)
    tl.store(idx_ptr + part, top.to(tl.int64))
    if not SPLIT:
        tl.store(ok_ptr, 0, mask=nan_row)
    else:
        x_top = tl.max(tl.where(arg == top, best_x, float("-inf")), 0)
        tl.store(part_x_ptr + part, x_top)
        if last_arrival(count_ptr + r, tl.num_programs(1)):
            j = tl.arange(0, SPLITS_BLOCK)
            mask = j < tl.num_programs(1)
            first = r * tl.num_programs(1)
            args = tl.load(idx_ptr + first + j, mask=mask, other=C, cache_modifier=".cg")
            xs = tl.load(part_x_ptr + first + j, mask=mask, other=float("-inf"), cache_modifier=".cg")
            nan_row = tl.min(args, 0) < 0
            tl.store(row_idx_ptr + r, _pick_argmax(xs, args, nan_row, C).to(tl.int64))
            tl.store(ok_ptr, 0, mask=nan_row)


@triton.jit
def _sample_kernel(
    # pointers: idx (R,) int64; group_m, group_t: (R, n_groups) fp32, each group's (M_g, T_g); the rows' (R,)
    # int32 tickets (zero between launches) when SPLIT; ok: the verdict, set to 0 for a row holding a NaN
    x_ptr, idx_ptr, group_m_ptr, group_t_ptr, tau_ptr, seed_ptr, count_ptr, ok_ptr,
    # shapes: x is (R, C) in groups of GROUP = BLOCK · GROUP_BLOCKS columns; program (r, j) takes groups
    # [j·span_groups, (j + 1)·span_groups) of row r
    C, span_groups, n_groups,
    # strides of x, and of τ (0: one τ; 1: one τ per row)
    stride_xr, stride_xc, stride_tau,
    # constants
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, GROUP_BLOCKS: tl.constexpr, GROUPS_BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """idx[r]: a draw from softmax(x_r / τ) by inversion of its distribution function, one uniform a row.

    One pass over the row keeps, for each group of GROUP columns, its (M_g, T_g) in x units
    (M_g = max x, T_g = Σ_j exp((x_j - M_g)/τ), _group_mass); then the
    row's last program (the row's only one, or the last arriver of its split programs: last_arrival)
    draws u ~ U[0, 1) from Philox (seed, r) and finds the class whose cumulative probability first
    exceeds u: among the groups by their masses w_g = T_g exp((M_g - M)/τ), then within the group
    chosen by reading its GROUP columns again (from L2: its program read them just before) and
    summing exp((x_j - M)/τ) in column order (_draw_in_group).  The row is read once, plus one group
    of it; the noise of Gumbel-max (a Philox word and two logarithms a class) is not drawn at all.

    τ = 0 (a greedy row of a per-row τ; also a τ below 4.2e-39, whose log2(e)/τ overflows fp32) or a
    +inf logit: the first index holding the row's max (as
    torch.argmax); no finite logit: 0; a NaN logit: -1, and 0 stored to the verdict ``ok`` (the caller
    raises).  Exponents are formed in x
    units relative to the row's max, exp2((x - M)·log2(e)/τ), so the draw keeps its precision at any
    |x| / τ.  Deterministic for a seed: the ticket only elects the program that draws."""
    r, _, _, x_row, tau = row_start(x_ptr, tau_ptr, 1, stride_xr, 0, stride_tau)
    scale = exp2_scale(tau)
    GROUP: tl.constexpr = BLOCK * GROUP_BLOCKS
    stats = r * n_groups
    g0 = tl.program_id(1) * span_groups
    g_end = tl.minimum(g0 + span_groups, n_groups)
    # the full groups' loads need no mask; a ragged last group is its program's last
    for start in range(g0 * GROUP, tl.minimum(g_end, C // GROUP) * GROUP, GROUP):
        M_g, T_g = _group_mass(x_row, start, C, stride_xc, scale, False, BLOCK, GROUP_BLOCKS, INTERPRETED)
        tl.store(group_m_ptr + stats + start // GROUP, M_g)
        tl.store(group_t_ptr + stats + start // GROUP, T_g)
    if (g_end == n_groups) & (C % GROUP != 0) & (g0 < g_end):
        M_g, T_g = _group_mass(x_row, (g_end - 1) * GROUP, C, stride_xc, scale, True, BLOCK, GROUP_BLOCKS,
                               INTERPRETED)
        tl.store(group_m_ptr + stats + g_end - 1, M_g)
        tl.store(group_t_ptr + stats + g_end - 1, T_g)
    if SPLIT:
        draws = last_arrival(count_ptr + r, tl.num_programs(1))
    else:
        tl.debug_barrier()  # every thread's group statistics stored before any thread reads them
        draws = True
    if draws:
        j = tl.arange(0, GROUPS_BLOCK)
        live = j < n_groups
        M_g = tl.load(group_m_ptr + stats + j, mask=live, other=float("-inf"), cache_modifier=".cg")
        T_g = tl.load(group_t_ptr + stats + j, mask=live, other=0.0, cache_modifier=".cg")
        nan_row = tl.max((T_g != T_g).to(tl.int32), 0) > 0  # a NaN logit makes its group's mass NaN
        M = tl.max(M_g, 0)
        at_top = live & (M_g == M)
        # each group's mass relative to the row's max (a group with no finite logit has none)
        w = tl.where(M_g == M, T_g, tl.where(M_g > float("-inf"), T_g * tl.exp2((M_g - M) * scale), 0.0))
        cum = tl.cumsum(w, 0)
        total = tl.max(tl.where(live, cum, 0.0), 0)  # cum is non-decreasing: its last value
        t = _uniform(tl.load(seed_ptr), r) * total
        # the first group whose cumulative mass exceeds t (never past the last group with mass: t can round
        # up to the total)
        g_draw = tl.minimum(tl.sum((live & (cum <= t)).to(tl.int32), 0), tl.max(tl.where(live & (w > 0), j, 0), 0))
        before = tl.sum(tl.where(j == g_draw - 1, cum, 0.0), 0)
        greedy = (scale == float("inf")) | (M == float("inf"))
        g_top = tl.min(tl.where(at_top, j, GROUPS_BLOCK), 0)
        g = tl.where(greedy, g_top, g_draw)
        k = _draw_in_group(x_row, g * GROUP, C, stride_xc, M, scale, t - before, greedy, GROUP)
        k = tl.where(M == float("-inf"), 0, k)
        tl.store(idx_ptr + r, tl.where(nan_row, -1, k).to(tl.int64))
        tl.store(ok_ptr, 0, mask=nan_row)


@triton.jit
def _group_mass(x_row, start, C, stride_xc, scale, MASKED: tl.constexpr, BLOCK: tl.constexpr,
                GROUP_BLOCKS: tl.constexpr, INTERPRETED: tl.constexpr):
    """The group [start, start + BLOCK · GROUP_BLOCKS) of a row as (M_g, T_g): M_g = max x,
    T_g = Σ_j exp((x_j - M_g)/τ) (0 with no finite logit; NaN when it holds a NaN).

    Two levels instead of the online update: the group is loaded whole as GROUP_BLOCKS × BLOCK, each
    lane (a column of that tile) takes its max m first, then sums 2^((x - m)·c) over its GROUP_BLOCKS
    values: a max, a subtraction, a multiply, an exp2 and an add an element, against the online
    update's rescaling test and select (python -m bench.model --ops sample: 15.7 -> 9.5 instructions an
    element on sm_90).  The lanes' sums meet at the group's max once, at the end.

    Specials at the lane level: a lane with no finite x takes 0 as its reference (its terms are all
    2^-inf = 0); a +inf lane takes FLT_MAX, so its +inf terms are +inf, never inf - inf: T_g is +inf,
    the row is greedy (M = +inf), and T_g stays NaN only for a NaN logit, whatever max does with NaN.
    c is capped at FLT_MAX (τ = 0: 0 · c = 0 at the lane's max, not NaN), which only moves the weights
    of a greedy row's groups (log2(e)/τ overflows fp32 below τ = 4.2e-39, where sample is greedy)."""
    k = start + tl.arange(0, GROUP_BLOCKS)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    if MASKED:
        x = load_x(x_row, k, C, stride_xc)
    else:
        x = load_x_full(x_row, k, stride_xc)
    c = tl.minimum(scale, _FLT_MAX)
    m = tl.max(x, 0)
    ref = tl.where(m > float("-inf"), tl.minimum(m, _FLT_MAX), 0.0)
    s = tl.sum(exp2_ftz((x - ref[None, :]) * c, INTERPRETED), 0)
    M_g = tl.max(m, 0)
    lane = tl.where(m == M_g, 1.0, exp2_ftz((m - M_g) * c, INTERPRETED))
    return M_g, tl.sum(s * lane, 0)


@triton.jit
def _uniform(seed, r):
    """u ~ U[0, 1) on the grid of 2^-24 (exact in fp32, never 1) from row r's Philox word under ``seed``."""
    w = tl.randint(seed, r)
    return (w >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _draw_in_group(x_row, start, C, stride_xc, M, scale, t, greedy, GROUP: tl.constexpr):
    """The column of the group [start, start + GROUP) where the running sum of exp((x_j - M)/τ), in column
    order, first exceeds t (the last column with mass if rounding leaves t at or past the group's sum);
    ``greedy``: the first column holding M."""
    k = start + tl.arange(0, GROUP)
    x = load_x(x_row, k, C, stride_xc)
    p = tl.where(x == M, 1.0, tl.exp2((x - M) * scale))
    cum = tl.cumsum(p, 0)
    i_draw = tl.minimum(tl.sum((cum <= t).to(tl.int32), 0), tl.max(tl.where(p > 0, k - start, 0), 0))
    i_top = tl.min(tl.where(x == M, k - start, GROUP), 0)
    return start + tl.where(greedy, i_top, i_draw)


# Launchers (the torch path, fused_tau/_torch_sample.py, has the same names and arguments).
# Inputs are already checked by fused_tau.sampling; ``tau`` is a float32 tensor of one element
# or one per row group, ``seed`` a one-element int64 tensor on the logits' device (drawn by
# fused_tau._ops.draw_seed from the caller's generator, so no host sync).

def gumbel_fwd(x3, tau, seed, hard, out, aux):
    """Writes out, the soft sample, or the one-hot of its argmax when ``hard``, in x3's dtype and
    contiguous (A, C, B) layout, and aux = (M, S) of each row, which gumbel_bwd takes (the backward
    regenerates the noise from the seed).  The softmax kernel with its noisy load (row_softmax.py,
    NOISY and HARD)."""
    m, s = aux
    softmax_fwd(x3, tau, MODE_SOFTMAX, out, m, s, seed=seed, hard=hard)


def gumbel_bwd(g, tau, hard, src, seed, aux, dx):
    """Writes dx of the soft sample (the straight-through gradient when ``hard``), contiguous (A, C, B);
    ``g`` is the output's gradient, contiguous (A, C, B); ``src`` is the logits x3 when ``hard``
    (the soft sample is recomputed from them and the noise regenerated from ``seed``), else the
    soft sample itself.  The softmax backward kernel (row_softmax.py, NOISY when ``hard``)."""
    m, s = aux
    if not hard:
        softmax_bwd(src, g, src, m, s, tau, False, dx, None)
    else:
        softmax_bwd(g, g, src, m, s, tau, False, dx, None, seed=seed)


def sample_fwd(x2, tau, seed, greedy, idx, ok):
    """Writes one index per row of the (R, C) logits ``x2`` (C >= 1) into ``idx``, int64 of shape (R,); -1 for a
    row that holds a NaN, which also stores 0 to the one-element int32 verdict ``ok`` (left alone otherwise: a
    kept flag holding 1, fused_tau._ops.sample).  ``greedy``: argmax (_argmax_kernel), ``seed`` and ``tau``
    unread; else a draw by
    inversion (_sample_kernel), groups of GROUP_BLOCKS blocks.  Few long rows are split across programs
    (row_engine.row_splits), finished by each row's last program in the same launch."""
    R, C = x2.shape
    cfg = row_launch("row", C, x2.device)
    block = cfg.block
    in_flight = block * x2.element_size()
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if greedy:
        splits, span = row_splits(R, C, block, x2.device, in_flight)
        part_idx = idx if splits == 1 else torch.empty(R * splits, device=x2.device, dtype=torch.int64)
        part_x = torch.empty(R * splits, device=x2.device, dtype=torch.float32) if splits > 1 else idx
        _argmax_kernel[(R, splits)](
            x2, part_idx, part_x, idx, tickets(x2.device, R) if splits > 1 else idx, ok, C, span // block, *x2.stride(),
            SPLIT=splits > 1, BLOCK=block, SPLITS_BLOCK=max(triton.next_power_of_2(splits), 2), **launch)
        return
    group_blocks = GROUP_BLOCKS if C > block else 1
    group = block * group_blocks
    n_groups = triton.cdiv(C, group)
    splits, span = row_splits(R, C, group, x2.device, in_flight)
    group_stats = torch.empty((2, R * n_groups), device=x2.device, dtype=torch.float32)
    _sample_kernel[(R, splits)](
        x2, idx, group_stats[0], group_stats[1], tau, seed, tickets(x2.device, R) if splits > 1 else idx, ok,
        C, span // group, n_groups, *x2.stride(), tau_stride(tau), SPLIT=splits > 1, BLOCK=block,
        GROUP_BLOCKS=group_blocks, GROUPS_BLOCK=max(triton.next_power_of_2(n_groups), 2), INTERPRETED=interpreted(),
        **launch)
