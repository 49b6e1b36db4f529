"""Row engine, sampling: Gumbel-softmax (forward and backward) and one categorical draw per row
by the Gumbel-max trick (see row_engine.py for the (A, C, B) layout and the saved statistics).

Gumbel-softmax is the softmax kernels of row_softmax.py with their noisy load (NOISY: x + g on
every load, HARD: the one-hot of the argmax); this module holds its launchers and the sample
kernel.  The Gumbel noise (tl_math.gumbel_block) never exists in memory.  Column ``c`` of row
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
backward reads x and the gradient and writes dx; sample reads R·C once and
writes R int64.  Few long rows are split across programs (row_engine.row_splits),
with a few fp32 partials a split, combined by each row's last program in the same launch.
"""
import torch
import triton
import triton.language as tl

from .row_engine import (interpreted, load_x, noise_counter, row_launch, row_splits, row_start, tau_stride,
                         tickets)
from .row_softmax import MODE_SOFTMAX, softmax_bwd, softmax_fwd
from .tl_math import gumbel_block


@triton.jit
def _pick(best_x, best_g, arg, nan_row, tau, C, GREEDY: tl.constexpr):
    """The winner among lanes that each hold their best column ``arg`` and its (x, g): the largest
    (x_best - M) / τ + g_best with M the largest of the lanes' logits (argmax x when GREEDY, τ = 0 or M
    infinite), the first column on ties.  Returns (its column, or -1 when ``nan_row``; its x; its g)."""
    M = tl.max(best_x, 0)  # the lanes' best logits' max (its row's max logit when GREEDY or τ = 0)
    at_top = best_x == M
    if not GREEDY:
        z = (best_x - M) / tau + best_g
        # τ = 0, or M infinite (a +inf logit: the first one, as torch.argmax; no finite logit: 0):
        # argmax x among the lanes
        noisy = (tau > 0) & (M > float("-inf")) & (M < float("inf"))
        at_top = tl.where(noisy, z == tl.max(z, 0), at_top)
    top = tl.min(tl.where(at_top, arg, C), 0)
    winner = at_top & (arg == top)
    x_top = tl.max(tl.where(winner, best_x, float("-inf")), 0)
    g_top = tl.max(tl.where(winner, best_g, float("-inf")), 0)
    return tl.where(nan_row, -1, top), x_top, g_top


@triton.jit
def _sample_kernel(
    # pointers: idx is (R,) int64, or (R, splits) when SPLIT, with part_x, part_g (R, splits) fp32, the
    # rows' (R,) int64 draws and (R,) int32 tickets (zero between launches)
    x_ptr, idx_ptr, part_x_ptr, part_g_ptr, tau_ptr, seed_ptr, row_idx_ptr, count_ptr,
    # shapes: x is (R, C); program (r, j) takes columns [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r
    C, span_blocks,
    # strides of x, and of τ (0: one τ; 1: one τ per row)
    stride_xr, stride_xc, stride_tau,
    # constants
    GREEDY: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """idx[r] = argmax_c (x_rc / τ + g_rc), g ~ Gumbel(0, 1): a draw from softmax(x_r / τ)
    (Gumbel-max); τ = 0 is argmax x.  GREEDY: argmax x, no noise drawn.  One pass; the first
    index wins ties; a row holding a NaN gets idx -1 (the caller raises).  SPLIT: the winner of
    this program's columns, its x and g; then a ticket of its row, and the row's last arriver picks
    the row's draw among the splits' winners (``_sample_combine``), in the same launch.  The ticket
    only elects the program: the pick is the same whichever it is (deterministic).  Memory order as
    row_ce.py's ``_ce_fwd_kernel``: a CTA barrier, an acquire-release atomic, reads through L2.

    The key x / τ + g is never formed: at |x| / τ ≳ 1e6 its rounding (or that of x + τ g)
    swallows the noise.  Each lane keeps its best column's (x, g) and compares a new column
    by the sign of (x - x_best) + τ (g - g_best), which has only the relative rounding of
    the two differences; the lanes' winners are compared in z units relative to the largest
    of their logits M, (x_best - M) / τ + g_best, which keeps the noise's digits near the top."""
    r, _, _, x_row, tau = row_start(x_ptr, tau_ptr, 1, stride_xr, 0, stride_tau)
    part = r * tl.num_programs(1) + tl.program_id(1)
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    cols = tl.arange(0, BLOCK)
    best_x = tl.full([BLOCK], float("-inf"), tl.float32)
    best_g = tl.zeros([BLOCK], tl.float32)
    arg = tl.zeros([BLOCK], tl.int32)
    if not GREEDY:
        seed = tl.load(seed_ptr)
        noise_row = noise_counter(r, C)
    for start in range(col0, col_end, BLOCK):
        c = start + cols
        x = load_x(x_row, c, C, stride_xc)
        # best_x turns NaN at a lane's first NaN and stays NaN: the row is refused (idx -1)
        if GREEDY:
            take = x > best_x
            best_x = tl.maximum(best_x, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            # τ = 0 (a greedy row of a per-row τ) leaves x - best_x: argmax x as well.  -inf - -inf
            # and inf - inf are NaN: not taken, so the first of equal infinite logits is kept.
            g = gumbel_block(seed, noise_row, start, BLOCK, INTERPRETED)
            take = (tl.fma(tau, g - best_g, x - best_x) > 0) | (x != x)
            best_g = tl.where(take, g, best_g)
            best_x = tl.where(take, x, best_x)
        arg = tl.where(take, c, arg)
    nan_row = tl.max((best_x != best_x).to(tl.int32), 0) > 0
    top, x_top, g_top = _pick(best_x, best_g, arg, nan_row, tau, C, GREEDY)
    tl.store(idx_ptr + part, top.to(tl.int64))
    if SPLIT:
        tl.store(part_x_ptr + part, x_top)
        tl.store(part_g_ptr + part, g_top)
        tl.debug_barrier()  # every thread's stores before the ticket
        splits = tl.num_programs(1)
        if tl.atomic_add(count_ptr + r, 1, sem="acq_rel", scope="gpu") == splits - 1:
            tl.store(count_ptr + r, 0)
            _sample_combine(row_idx_ptr, idx_ptr, part_x_ptr, part_g_ptr, r, tau, C, splits, GREEDY, SPLITS_BLOCK)


@triton.jit
def _sample_combine(row_idx_ptr, part_idx_ptr, part_x_ptr, part_g_ptr, r, tau, C, splits,
                    GREEDY: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
    """idx[r]: the winner among the splits' winners of row r, picked as the lanes of one program
    (_pick: the same keys and tie rule), -1 when a split saw a NaN; the partials are read through L2
    (other programs of the launch wrote them)."""
    j = tl.arange(0, SPLITS_BLOCK)
    mask = j < splits
    first = r * splits
    arg = tl.load(part_idx_ptr + first + j, mask=mask, other=C, cache_modifier=".cg")
    best_x = tl.load(part_x_ptr + first + j, mask=mask, other=float("-inf"), cache_modifier=".cg")
    best_g = tl.load(part_g_ptr + first + j, mask=mask, other=0.0, cache_modifier=".cg")
    nan_row = tl.min(arg, 0) < 0
    top, _, _ = _pick(best_x, best_g, arg, nan_row, tau, C, GREEDY)
    tl.store(row_idx_ptr + r, top.to(tl.int64))


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


def sample_fwd(x2, tau, seed, greedy, idx):
    """Writes one index per row of the (R, C) logits ``x2`` (C >= 1) into ``idx``, int64 of shape (R,); -1 for a
    row that holds a NaN.  ``greedy``: argmax, ``seed`` and ``tau`` unread.  Few long rows are
    split across programs (row_engine.row_splits) and their winners combined by each row's last
    program, in the same launch."""
    R, C = x2.shape
    cfg = row_launch("row" if greedy else "noisy", C, x2.device)
    block = cfg.block
    # a draw is issue-bound (Philox), not latency-bound: the SMs filled, no more programs for loads in flight
    splits, span = row_splits(R, C, block, x2.device, block * x2.element_size() if greedy else 0)
    f32 = dict(device=x2.device, dtype=torch.float32)
    part_idx = idx if splits == 1 else torch.empty(R * splits, device=x2.device, dtype=torch.int64)
    part_x = torch.empty(R * splits, **f32) if splits > 1 else idx
    part_g = torch.empty(R * splits, **f32) if splits > 1 else idx
    ticket_buf = tickets(x2.device, R) if splits > 1 else idx
    _sample_kernel[(R, splits)](
        x2, part_idx, part_x, part_g, tau, idx if greedy else seed, idx, ticket_buf, C, span // block, *x2.stride(),
        tau_stride(tau), GREEDY=greedy, SPLIT=splits > 1, BLOCK=block,
        SPLITS_BLOCK=max(triton.next_power_of_2(splits), 2), INTERPRETED=interpreted(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
