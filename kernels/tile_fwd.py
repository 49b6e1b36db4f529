"""The tile engine's forward: per row of a, over the columns that count (tile_engine's docstring), in
dot units y = a·b + bias, m = max y and s = Σ exp((y - m)/τ), with the positive's softmax when the rows
have one; the N × K logits never stored.

  _tile_fwd_kernel     per (row block, split of the columns): m_i = max y_ij, s_i = Σ exp((y_ij - m_i)/τ_i),
                       and y_{i,t_i} from the same tiles; with CLIP (clip_loss, kernels/tile_clip.py) also
                       each column's (m, s) over the row block, an epilogue of the same tiles
  _tile_combine_kernel the splits merged in split order: m_i = max_k m_ik, s_i = Σ_k s_ik exp((m_ik - m_i)/τ_i),
                       and the softmax over [positive, counted columns] the losses need; with a loss, the
                       loss itself in the dtype the caller returns (per row, or the rows' mean or sum
                       by the combine's last program): no torch operator after the launch

FLOPs 2·N·K·D.  tile_fwd's statistics feed tile_bwd (kernels/tile_bwd.py) through the caller.
"""
import torch
import triton
import triton.language as tl

from . import tile_engine
from .row_ce_reduce import DENOM_NONE, DENOM_ROWS, _ce_reduce_rows
from .row_engine import last_arrival, tickets
from .tile_engine import (_autotuned, _common, _config, _dots_pair, _dots_tile, _exp2_scale, _infonce_row, _interpreted,
                          _kept, _load_tile, _merge_partials, _row_dots, _row_tau, _splits_block, _target)
from .tl_math import to_store

# the loss a combine writes (LOSS): none (the statistics only), one per row (reduction 'none'), the
# rows' mean or sum (one element)
LOSS_NONE, LOSS_ROWS, LOSS_REDUCED = 0, 1, 2


@triton.jit
def _column_partials(y, tau_ptr, cols, K, TAU_PER_ROW: tl.constexpr):
    """Each column's (m, s) over a tile's rows, in dot units with the column's own τ_j: m = max_i y_ij,
    s = Σ_i exp((y_ij - m)/τ_j) (entries set to -inf count nothing; a column with none: m = -inf, s = 0)."""
    r2c = _exp2_scale(tau_ptr, cols, K, TAU_PER_ROW)
    m_c = tl.max(y, 0)
    safe_c = tl.where(m_c == float("-inf"), 0.0, m_c)
    return m_c, tl.sum(tl.exp2((y - safe_c[None, :]) * r2c[None, :]), 0)


@triton.jit
def _fwd_epilogue(y, rows, cols, tgt, m, s, zy, r2, N, K, diag_offset, col_end, tau_ptr, m_c_ptr, s_c_ptr, col_part,
                  HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, TAU_PER_ROW: tl.constexpr,
                  RESIDENT: tl.constexpr, CLIP: tl.constexpr, EVEN: tl.constexpr = False):
    """One tile y (dot units) folded into the rows' online (m, s) over its counted columns, and into zy (y at
    the target: RESIDENT with targets, or CLIP's diagonal unless EVEN); CLIP: the tile's columns' (m, s)
    over the row block stored (_column_partials).  EVEN (CLIP's paired tiles, no ragged tile): no bounds
    masked, and the diagonal's y left to the combine (the registers of two 128 × 128 tiles).  Returns
    (m, s, zy)."""
    hit = cols[None, :] == tgt[:, None]
    if (HAS_TARGET and RESIDENT) or (CLIP and not EVEN):
        zy += tl.sum(tl.where(hit, y, 0.0), 1)
    if CLIP and EVEN:  # no ragged tile: only the diagonal is left out
        kept = ~hit
    else:
        kept = _kept(rows, cols, K, hit, diag_offset, HAS_TARGET, MASK_DIAG)
        if CLIP:  # the diagonal excluded; padding rows count in no column
            kept &= (rows[:, None] < N) & ~hit
    y = tl.where(kept, y, float("-inf"))
    m_new = tl.maximum(m, tl.max(y, 1))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing counted yet: no -inf - -inf
    s = s * tl.exp2((m - safe) * r2) + tl.sum(tl.exp2((y - safe[:, None]) * r2[:, None]), 1)
    if CLIP:
        m_c, s_c = _column_partials(y, tau_ptr, cols, K, TAU_PER_ROW)
        if EVEN:  # splits of whole pairs of whole tiles: every column is the split's
            tl.store(m_c_ptr + col_part + cols, m_c)
            tl.store(s_c_ptr + col_part + cols, s_c)
        else:
            tl.store(m_c_ptr + col_part + cols, m_c, mask=cols < col_end)
            tl.store(s_c_ptr + col_part + cols, s_c, mask=cols < col_end)
    return m_new, s, zy


@triton.jit
def _tile_fwd_kernel(
    # pointers; m, s, zy are (splits, N) fp32 partials (the outputs themselves for one split); m_c, s_c
    # (CLIP) (row blocks, K) fp32 column partials
    a_ptr, b_ptr, bias_ptr, tau_ptr, target_ptr, m_ptr, s_ptr, zy_ptr, m_c_ptr, s_c_ptr,
    # shapes: a (N, D), b (K, D); diag_offset: column excluded from row i is i + diag_offset;
    # program (i-block, split) walks the columns [split · split_cols, (split + 1) · split_cols)
    N, K, D, diag_offset, split_cols,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, TAU_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr, CLIP: tl.constexpr,
    PAIR: tl.constexpr = 1,
):
    """Per row and split of the columns, in dot units y = a·b + bias: m = max y, s = Σ exp((y - m) / τ)
    over the counted columns, and, RESIDENT, y at the target column (0 where the target is in another
    split; beyond one D-step the combine forms it from b's target row instead: the tile's sum over it
    cost the registers of 128 × 256 tiles).  The running max stays in dot units: each logit costs a
    subtraction and a multiply by log2(e)/τ before exp2.

    CLIP (clip_loss's square y = a @ b.T, K = N, no bias, no target): the positive is the diagonal,
    excluded from both directions and summed into y_ii at any D; each tile's real rows also give each
    of its columns j its (m, s) over the row block with τ_j (_column_partials: the b -> a direction,
    complete for this (row block, column): one program sees it), a second subtraction, multiply and
    exp2 per logit.  PAIR 2 (CLIP with no ragged tile, clip_fwd): two adjacent column tiles a step from
    one walk over D (_dots_pair: the row tile's L2 reads of a BLOCK_M × 2·BLOCK_N tile), folded in turn."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * split_cols
    col_end = tl.minimum(K, col0 + split_cols)
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    if CLIP:
        tgt = rows
    else:
        tgt = _target(target_ptr, rows, N, HAS_TARGET)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    zy = tl.zeros([BLOCK_M], tl.float32)
    a_fixed = 0.0
    if RESIDENT:  # the rows' tile, read once for every column tile
        a_fixed = _load_tile(a_ptr, rows, N, D, stride_am, stride_ad, BLOCK_D, UPCAST)
    col_part = tl.program_id(0).to(tl.int64) * K  # CLIP: this row block's row of the column partials
    for n0 in range(col0, col_end, BLOCK_N * PAIR):
        cols = n0 + tl.arange(0, BLOCK_N)
        if PAIR == 2:
            y, y_next = _dots_pair(a_ptr, b_ptr, rows, cols, N, K, D, stride_am, stride_ad, stride_bk, stride_bd,
                                   BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, True)
            m, s, zy = _fwd_epilogue(y, rows, cols, tgt, m, s, zy, r2, N, K, diag_offset, col_end, tau_ptr,
                                     m_c_ptr, s_c_ptr, col_part, HAS_TARGET, MASK_DIAG, TAU_PER_ROW, RESIDENT, CLIP,
                                     True)
            m, s, zy = _fwd_epilogue(y_next, rows, cols + BLOCK_N, tgt, m, s, zy, r2, N, K, diag_offset, col_end,
                                     tau_ptr, m_c_ptr, s_c_ptr, col_part, HAS_TARGET, MASK_DIAG, TAU_PER_ROW, RESIDENT,
                                     CLIP, True)
        else:
            y = _dots_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D, stride_am, stride_ad, stride_bk,
                           stride_bd, a_fixed, 0.0, HAS_BIAS, BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, RESIDENT,
                           False)
            m, s, zy = _fwd_epilogue(y, rows, cols, tgt, m, s, zy, r2, N, K, diag_offset, col_end, tau_ptr,
                                     m_c_ptr, s_c_ptr, col_part, HAS_TARGET, MASK_DIAG, TAU_PER_ROW, RESIDENT, CLIP)
    part = tl.program_id(1).to(tl.int64) * N  # this split's row of the partials
    tl.store(m_ptr + part + rows, m, mask=rows < N)
    tl.store(s_ptr + part + rows, s, mask=rows < N)
    if (HAS_TARGET and RESIDENT) or (CLIP and PAIR == 1):  # paired tiles leave the diagonal to the combine
        tl.store(zy_ptr + part + rows, zy, mask=rows < N)


@triton.jit
def _tile_combine_kernel(
    # pointers: (splits, N) fp32 partials of the forward; a, key and bias (POSITIVE 2 and 3); stats
    # (TILE_STATS_POS or TILE_STATS_LSE, N) fp32, the results; the loss (LOSS: (N,) or one element, in
    # its own dtype) and its int32 ticket (LOSS_REDUCED; 0 between launches)
    tau_ptr, m_part_ptr, s_part_ptr, zy_part_ptr, a_ptr, key_ptr, bias_ptr, target_ptr, stats_ptr, loss_ptr, count_ptr,
    N, K, D, splits, stride_am, stride_ad, stride_km, stride_kd, n_rows_f,
    POSITIVE: tl.constexpr, HAS_BIAS: tl.constexpr, TAU_PER_ROW: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, LOSS: tl.constexpr, DENOM: tl.constexpr, REDUCE_BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Per row: the forward's splits merged in split order (_merge_partials), SPLITS_BLOCK splits a
    step (one step for every plan of split_plan up to SPLITS_BLOCK splits), into the TILE_* rows of
    stats: m = max_k m_k and s = Σ_k s_k exp((m_k - m)/τ).  With a positive (POSITIVE 1: y at the
    target column, the sum of the splits' partials, one of which holds it; 2: a_i · key_i in fp32;
    3: y at the target column as a_i · key_{t_i} + bias_{t_i} in fp32, 0 for a target outside [0, K)),
    the softmax over [positive, counted columns] as the losses need it (_infonce_row):
    pos, nll = softplus(log s + (m - pos)/τ), shift = max(m, pos), e_pos = exp((pos - shift)/τ) and
    e_rest = s exp((m - shift)/τ).

    The loss (with a positive): LOSS_ROWS, each row's nll in loss's dtype (rounded to nearest even);
    LOSS_REDUCED, Σ_i nll_i (DENOM_NONE) or Σ_i nll_i / N (DENOM_ROWS) in fp32, rounded once to loss's
    dtype: each program takes a ticket once its rows' nll are stored (last_arrival), and the last one
    sums the N rows in row order (row_ce_reduce._ce_reduce_rows: the same bits whichever program
    arrives last)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < N
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    pos = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, splits, SPLITS_BLOCK):
        k = k0 + tl.arange(0, SPLITS_BLOCK)
        mask = (k[:, None] < splits) & live[None, :]
        offs = k.to(tl.int64)[:, None] * N + rows[None, :]
        m, s = _merge_partials(m, s, m_part_ptr, s_part_ptr, offs, mask, r2)
        if POSITIVE == 1:
            pos += tl.sum(tl.load(zy_part_ptr + offs, mask=mask, other=0.0), 0)
    tl.store(stats_ptr + 0 * N + rows, m, mask=live)  # TILE_M
    tl.store(stats_ptr + 1 * N + rows, s, mask=live)  # TILE_S
    if POSITIVE != 0:
        if POSITIVE >= 2:
            krow = rows
            k_live = live
            if POSITIVE == 3:
                krow = tl.load(target_ptr + rows, mask=live, other=-1)
                k_live = live & (krow >= 0) & (krow < K)
            pos += _row_dots(a_ptr, key_ptr, rows, krow, live, k_live, D, stride_am, stride_ad, stride_km,
                             stride_kd, BLOCK_D)
            if HAS_BIAS:
                pos += tl.load(bias_ptr + krow, mask=k_live, other=0.0).to(tl.float32)
        nll, shift, e_pos, e_rest = _infonce_row(m, s, pos, _row_tau(tau_ptr, rows, N, TAU_PER_ROW))
        tl.store(stats_ptr + 2 * N + rows, pos, mask=live)  # TILE_POS
        tl.store(stats_ptr + 3 * N + rows, nll, mask=live)  # TILE_NLL
        tl.store(stats_ptr + 4 * N + rows, shift, mask=live)  # TILE_SHIFT
        tl.store(stats_ptr + 5 * N + rows, e_pos, mask=live)  # TILE_E_POS
        tl.store(stats_ptr + 6 * N + rows, e_rest, mask=live)  # TILE_E_REST
        if LOSS == 1:  # LOSS_ROWS
            tl.store(loss_ptr + rows, to_store(nll, loss_ptr, INTERPRETED), mask=live)
        if LOSS == 2:  # LOSS_REDUCED
            if last_arrival(count_ptr, tl.num_programs(0)):
                nll_row = stats_ptr + 3 * N  # TILE_NLL
                _ce_reduce_rows(nll_row, nll_row, nll_row, nll_row, loss_ptr, nll_row, nll_row, nll_row, N, 0, 0,
                                n_rows_f, True, DENOM, False, False, REDUCE_BLOCK, INTERPRETED, False)


def tile_fwd(a, b, bias, tau, target, diag_offset, key, reduction, stats, loss):
    """Writes tile_fwd's statistics into ``stats`` and the loss into ``loss``: see _tile_fwd
    (FUSED_TAU_TILE_AUTOTUNE: _autotuned)."""
    _autotuned("fwd", a, lambda: _tile_fwd(a, b, bias, tau, target, diag_offset, key, reduction, stats, loss))


def _tile_fwd(a, b, bias, tau, target, diag_offset, key, reduction, stats, loss):
    """Writes per row of ``a``, in dot units y = a·b + bias over the counted columns (see the module
    docstring), the fp32 rows TILE_* of ``stats``, (TILE_STATS_POS, N) when the rows have a positive, the
    target's y (``target``) or a_i · key_i (``key``, (N, D)), else (TILE_STATS_LSE, N): m = max y,
    s = Σ exp((y - m)/τ), and with a positive pos, nll, shift, e_pos, e_rest (_tile_combine_kernel).
    ``tau``: one element, or one per row of ``a``.  ``loss`` (rows with a positive; None: no loss), in
    its own dtype: the rows' nll for ``reduction`` 'none' ((N,)), their mean or sum for 'mean' or 'sum'
    (one element), written by the combine.  Two launches: the tiles, the combine."""
    N, D = a.shape
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    cfg = _config(a)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_blocks = triton.cdiv(N, BLOCK_M)
    splits, per = tile_engine.split_plan(row_blocks, triton.cdiv(K, BLOCK_N), tile_engine.sm_count(a.device))
    # the positive: the target's y from the tiles (resident row tile), from b's target row, or a_i · key_i
    positive = (1 if cfg["RESIDENT"] else 3) if target is not None else 2 if key is not None else 0
    m_part, s_part = torch.empty((splits, N), **f32), torch.empty((splits, N), **f32)
    zy_part = torch.empty((splits, N), **f32) if positive == 1 else m_part
    common = _common(a, b, bias, tau, target, diag_offset, cfg)
    _tile_fwd_kernel[(row_blocks, splits)](
        a, b, bias if bias is not None else m_part, tau, target if target is not None else m_part, m_part, s_part,
        zy_part, m_part, s_part, N, K, D, diag_offset or 0, per * BLOCK_N, *a.stride(), *b.stride(),
        RESIDENT=cfg["RESIDENT"], CLIP=False, **common,
    )
    key = b if positive == 3 else key if key is not None else a
    loss_mode = LOSS_NONE if loss is None else LOSS_ROWS if reduction == "none" else LOSS_REDUCED
    _tile_combine_kernel[(triton.cdiv(N, tile_engine.COMBINE_BLOCK),)](
        tau, m_part, s_part, zy_part, a, key, bias if bias is not None else m_part,
        target if target is not None else m_part, stats, loss if loss is not None else stats,
        tickets(a.device, 1) if loss_mode == LOSS_REDUCED else stats, N, K, D, splits, *a.stride(), *key.stride(),
        float(N), POSITIVE=positive, HAS_BIAS=positive == 3 and bias is not None, TAU_PER_ROW=common["TAU_PER_ROW"],
        SPLITS_BLOCK=_splits_block(splits), BLOCK=tile_engine.COMBINE_BLOCK,
        BLOCK_D=min(triton.next_power_of_2(D), 64), LOSS=loss_mode,
        DENOM=DENOM_ROWS if reduction == "mean" else DENOM_NONE, REDUCE_BLOCK=tile_engine.COMBINE_REDUCE_BLOCK,
        INTERPRETED=_interpreted(), num_warps=4,
    )
