"""clip_loss in one pass.

clip_loss = (infonce(a, b) + infonce(b, a)) / 2 from one N × N matrix y = a @ b.T: row i's softmax
(a -> b) and column j's (b -> a, whose row j is y's column j: b_j · a_i = y_ij), positives on the
diagonal.  The forward's tiles feed both: each row's online (m, s) over its split of the columns and
each column's (m, s) over the program's row block, partials merged by _clip_combine_kernel (rows in
split order, columns in row-block order: deterministic).  The backward's tiles give
G_ij = Qr_ij + Qc_ij off the diagonal (Qr = u_i exp((y - c_i)/τ_i) the rows', Qc = v_j exp((y - c'_j)/τ_j)
the columns') and the two positives' g (p - 1)/τ on it, so that da = G @ b and db = Gᵀ @ a.
The per-index statistics: the CLIP_* rows of a (CLIP_STATS, N) tensor (kernels/__init__.py).

  _tile_fwd_kernel        (kernels/tile_fwd.py) with CLIP: each tile fed to the rows' and the
                          columns' (m, s), the tile engine's forward with a column epilogue
  _clip_combine_kernel    both merged, both directions' losses and the backward's constants; the
                          loss itself (their mean, by the last program) in the dtype the caller returns
  _clip_bwd_probs_kernel  (ds = G, then two GEMMs) or _clip_bwd_fused_kernel (16-bit operands with
                          D <= BLOCK_DO, launched for da and for db): both directions' gradients from
                          each recomputed tile, the routes of kernels/tile_bwd.py
"""
import torch
import triton
import triton.language as tl

from . import CLIP_SHIFT_C, CLIP_SHIFT_R, CLIP_W_C, CLIP_W_R, tile_bwd, tile_engine, tile_fwd
from .row_ce_reduce import DENOM_ROWS, _ce_reduce_rows
from .row_engine import last_arrival, tickets
from .tile_engine import (_block_do, _common, _config, _dots_tile, _exp2_scale, _infonce_row, _interpreted, _load_tile,
                          _merge_partials, _partial_cap, _precision, _row_dots, _row_tau, _split_parts, _splits_block,
                          _sum_parts)
from .tl_math import to_store


@triton.jit
def _clip_combine_kernel(
    # loss (LOSS): one element in its own dtype, and its int32 ticket (0 between launches)
    # a, b (POS_FROM_ROWS): the embeddings, (N, D) each
    tau_ptr, m_r_ptr, s_r_ptr, zy_ptr, m_c_ptr, s_c_ptr, stats_ptr, loss_ptr, count_ptr, a_ptr, b_ptr,
    N, D, splits, row_blocks, n_rows_f, stride_am, stride_ad, stride_bm, stride_bd,
    TAU_PER_ROW: tl.constexpr, SPLITS_BLOCK: tl.constexpr, BLOCK: tl.constexpr, LOSS: tl.constexpr,
    DENOM: tl.constexpr, REDUCE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, POS_FROM_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per index k: the row's partials merged over the splits, the column's over the row blocks (each in
    order, SPLITS_BLOCK a step: _merge_partials), and from them both directions' nll and the backward's
    constants (the CLIP_* rows of stats): loss = (nll_r + nll_c)/2, the shifts c,
    w = 1/(2N τ (e_pos + e_neg)) (Q = g w exp((y - c)/τ) for the incoming gradient g of the mean over
    the N indices), the diagonal's dpos = -(w_r e_neg_r + w_c e_neg_c), and the positive's y_kk: the sum of
    the splits' zy, or POS_FROM_ROWS (the forward's paired tiles leave the diagonal out) a_k · b_k in fp32.
    LOSS: clip_loss = Σ_k loss_k / N (DENOM = DENOM_ROWS) in fp32, rounded once to loss's dtype: each
    program takes a ticket once its indices are stored (last_arrival), and the last one sums the N
    indices in order (row_ce_reduce._ce_reduce_rows: the same bits whichever program arrives last)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = idx < N
    r2 = _exp2_scale(tau_ptr, idx, N, TAU_PER_ROW)
    tau = _row_tau(tau_ptr, idx, N, TAU_PER_ROW)
    m_r = tl.full([BLOCK], float("-inf"), tl.float32)
    s_r = tl.zeros([BLOCK], tl.float32)
    pos = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, splits, SPLITS_BLOCK):
        k = k0 + tl.arange(0, SPLITS_BLOCK)
        mask = (k[:, None] < splits) & live[None, :]
        offs = k.to(tl.int64)[:, None] * N + idx[None, :]
        m_r, s_r = _merge_partials(m_r, s_r, m_r_ptr, s_r_ptr, offs, mask, r2)
        if not POS_FROM_ROWS:
            pos += tl.sum(tl.load(zy_ptr + offs, mask=mask, other=0.0), 0)
    if POS_FROM_ROWS:
        pos += _row_dots(a_ptr, b_ptr, idx, idx, live, live, D, stride_am, stride_ad, stride_bm, stride_bd, BLOCK_D)
    m_c = tl.full([BLOCK], float("-inf"), tl.float32)
    s_c = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, row_blocks, SPLITS_BLOCK):
        k = k0 + tl.arange(0, SPLITS_BLOCK)
        mask = (k[:, None] < row_blocks) & live[None, :]
        m_c, s_c = _merge_partials(m_c, s_c, m_c_ptr, s_c_ptr, k.to(tl.int64)[:, None] * N + idx[None, :], mask, r2)
    nll_r, shift_r, e_pos_r, e_neg_r = _infonce_row(m_r, s_r, pos, tau)
    nll_c, shift_c, e_pos_c, e_neg_c = _infonce_row(m_c, s_c, pos, tau)
    # the mean over N indices of (nll_r + nll_c) / 2: each Q carries 1 / (2N)
    w_r = 1.0 / ((2 * N) * tau * (e_pos_r + e_neg_r))
    w_c = 1.0 / ((2 * N) * tau * (e_pos_c + e_neg_c))
    tl.store(stats_ptr + 0 * N + idx, (nll_r + nll_c) * 0.5, mask=live)
    tl.store(stats_ptr + 1 * N + idx, shift_r, mask=live)
    tl.store(stats_ptr + 2 * N + idx, w_r, mask=live)
    tl.store(stats_ptr + 3 * N + idx, shift_c, mask=live)
    tl.store(stats_ptr + 4 * N + idx, w_c, mask=live)
    tl.store(stats_ptr + 5 * N + idx, -(w_r * e_neg_r + w_c * e_neg_c), mask=live)
    tl.store(stats_ptr + 6 * N + idx, pos, mask=live)
    if LOSS:
        if last_arrival(count_ptr, tl.num_programs(0)):
            _ce_reduce_rows(stats_ptr, stats_ptr, stats_ptr, stats_ptr, loss_ptr, stats_ptr, stats_ptr, stats_ptr, N, 0,
                            0, n_rows_f, True, DENOM, False, False, REDUCE_BLOCK, INTERPRETED, False)


@triton.jit
def _clip_bwd_probs_kernel(
    a_ptr, b_ptr, tau_ptr, stats_ptr, g_ptr, ds_ptr, zp_r_ptr, zp_c_ptr,
    # the chunk is columns [col0, col_end) of the N; ds a contiguous (N, col_end - col0) buffer, zp_r a
    # contiguous (N, cdiv(col_end - col0, BLOCK_N)) fp32 one, zp_c a contiguous (row splits,
    # col_end - col0) fp32 one; program (column block, split) walks the rows [split · split_rows, + split_rows)
    N, col0, col_end, D, split_rows,
    stride_am, stride_ad, stride_bk, stride_bd,
    NEED_ZP: tl.constexpr, TAU_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    """ds[i, j - col0] = G_ij = g (Qr_ij + Qc_ij) off the diagonal, g·dpos_i on it (g the incoming
    gradient, one element; the statistics' w and dpos carry the mean's 1/(2N)), for one block of a
    chunk's columns over a split of the rows, and the shares of zp_r_i = Σ_j (y_ij - y_ii) Qr_ij and
    zp_c_j = Σ_i (y_ij - y_jj) Qc_ij, summed in fp32 before ds is rounded to its dtype; the launcher
    multiplies ds into da and db with GEMMs.  The columns' constants are loaded once a program, the
    rows' once a tile."""
    width = col_end - col0
    col_block = tl.program_id(0)
    split = tl.program_id(1)
    local = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + local
    col_live = cols < col_end
    g = tl.load(g_ptr).to(tl.float32)
    r2c = _exp2_scale(tau_ptr, cols, N, TAU_PER_ROW)
    shift_c = tl.load(stats_ptr + 3 * N + cols, mask=col_live, other=0.0)
    v = g * tl.load(stats_ptr + 4 * N + cols, mask=col_live, other=0.0)
    pos_c = tl.load(stats_ptr + 6 * N + cols, mask=col_live, other=0.0)
    zp_c = tl.zeros([BLOCK_N], tl.float32)
    b_fixed = 0.0
    if RESIDENT:  # the columns' tile, read once for every row tile
        b_fixed = _load_tile(b_ptr, cols, col_end, D, stride_bk, stride_bd, BLOCK_D, UPCAST)
    row0 = split * split_rows
    row_end = tl.minimum(N, row0 + split_rows)
    for m0 in range(row0, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_live = rows < N
        r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
        shift_r = tl.load(stats_ptr + 1 * N + rows, mask=row_live, other=0.0)
        u = g * tl.load(stats_ptr + 2 * N + rows, mask=row_live, other=0.0)
        dpos = g * tl.load(stats_ptr + 5 * N + rows, mask=row_live, other=0.0)
        # columns past col_end read as out of range: the chunk's own bound
        y = _dots_tile(a_ptr, b_ptr, 0, rows, cols, N, col_end, D, stride_am, stride_ad, stride_bk, stride_bd,
                       0.0, b_fixed, False, BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, False, RESIDENT)
        diag = cols[None, :] == rows[:, None]
        live = row_live[:, None] & col_live[None, :]
        kept = live & ~diag
        Qr = tl.where(kept, u[:, None] * tl.exp2((y - shift_r[:, None]) * r2[:, None]), 0.0)
        Qc = tl.where(kept, v[None, :] * tl.exp2((y - shift_c[None, :]) * r2c[None, :]), 0.0)
        G = tl.where(diag & live, dpos[:, None], Qr + Qc)
        ds_ptrs = ds_ptr + rows.to(tl.int64)[:, None] * width + local[None, :]
        tl.store(ds_ptrs, to_store(G, ds_ptr, INTERPRETED), mask=live)
        if NEED_ZP:
            pos_r = tl.load(stats_ptr + 6 * N + rows, mask=row_live, other=0.0)
            tl.store(zp_r_ptr + rows.to(tl.int64) * tl.cdiv(width, BLOCK_N) + col_block,
                     tl.sum(tl.where(Qr != 0.0, (y - pos_r[:, None]) * Qr, 0.0), 1), mask=row_live)
            zp_c += tl.sum(tl.where(Qc != 0.0, (y - pos_c[None, :]) * Qc, 0.0), 0)
    if NEED_ZP:
        tl.store(zp_c_ptr + split.to(tl.int64) * width + local, zp_c, mask=local < width)


@triton.jit
def _clip_bwd_fused_kernel(
    # x (N, D) the side whose gradient this launch gives, z (N, D) the other; dx (splits, N, D) and zp
    # (splits, N) fp32 partials.  da: x = a, z = b, the rows' constants at SHIFT_X / W_X = CLIP_SHIFT_R /
    # CLIP_W_R and the columns' at CLIP_SHIFT_C / CLIP_W_C; db: x = b, z = a, the offsets swapped (Gᵀ is
    # the G of b's rows against a's, each direction's constants trading places)
    x_ptr, z_ptr, tau_ptr, stats_ptr, g_ptr, dx_ptr, zp_ptr,
    # program (x-block, do-block, split) walks z's rows [split · split_cols, + split_cols)
    N, D, split_cols, SHIFT_X, W_X, SHIFT_Z, W_Z,
    stride_xm, stride_xd, stride_zk, stride_zd,
    NEED_ZP: tl.constexpr, TAU_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    """dx[rows, do] = Σ_j G_ij z[j, do] over the split's j, G_ij = g (u_i exp((y_ij - c_i)/τ_i) +
    v_j exp((y_ij - c'_j)/τ_j)) off the diagonal and g·dpos_i on it (y = x @ zᵀ, the x side's constants
    u, c, the z side's v, c'), and zp_i = Σ_j (y_ij - y_ii) u_i exp(...)_ij: the x side's share of dτ.
    The backward for D <= BLOCK_DO, as _tile_bwd_da_kernel: no ds written."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    split = tl.program_id(2)
    col0 = split * split_cols
    col_end = tl.minimum(N, col0 + split_cols)
    row_live = rows < N
    g = tl.load(g_ptr).to(tl.float32)
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    shift_x = tl.load(stats_ptr + SHIFT_X * N + rows, mask=row_live, other=0.0)
    u = g * tl.load(stats_ptr + W_X * N + rows, mask=row_live, other=0.0)
    dpos = g * tl.load(stats_ptr + 5 * N + rows, mask=row_live, other=0.0)
    pos = tl.load(stats_ptr + 6 * N + rows, mask=row_live, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    zp = tl.zeros([BLOCK_M], tl.float32)
    x_fixed = 0.0
    if RESIDENT:  # the rows' tile, read once for every column tile
        x_fixed = _load_tile(x_ptr, rows, N, D, stride_xm, stride_xd, BLOCK_D, UPCAST)
    for n0 in range(col0, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_live = cols < N
        r2c = _exp2_scale(tau_ptr, cols, N, TAU_PER_ROW)
        shift_z = tl.load(stats_ptr + SHIFT_Z * N + cols, mask=col_live, other=0.0)
        v = g * tl.load(stats_ptr + W_Z * N + cols, mask=col_live, other=0.0)
        y = _dots_tile(x_ptr, z_ptr, 0, rows, cols, N, N, D, stride_xm, stride_xd, stride_zk, stride_zd,
                       x_fixed, 0.0, False, BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, RESIDENT, False)
        diag = cols[None, :] == rows[:, None]
        live = row_live[:, None] & col_live[None, :]
        kept = live & ~diag
        Qx = tl.where(kept, u[:, None] * tl.exp2((y - shift_x[:, None]) * r2[:, None]), 0.0)
        Qz = tl.where(kept, v[None, :] * tl.exp2((y - shift_z[None, :]) * r2c[None, :]), 0.0)
        if NEED_ZP:
            zp += tl.sum(tl.where(Qx != 0.0, (y - pos[:, None]) * Qx, 0.0), 1)
        G = tl.where(diag & live, dpos[:, None], Qx + Qz)
        zt = tl.load(z_ptr + cols.to(tl.int64)[:, None] * stride_zk + do.to(tl.int64)[None, :] * stride_zd,
                     mask=col_live[:, None] & (do[None, :] < D), other=0.0)
        if UPCAST:
            acc = tl.dot(G, zt.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(G.to(zt.dtype), zt, acc, input_precision=PRECISION)
    part = split.to(tl.int64) * N  # this split's (N, D) slice of the partials
    tl.store(dx_ptr + part * D + rows.to(tl.int64)[:, None] * D + do[None, :], acc,
             mask=row_live[:, None] & (do[None, :] < D))
    if NEED_ZP:
        if tl.program_id(1) == 0:  # every do-block computed zp; one writes it
            tl.store(zp_ptr + part + rows, zp, mask=row_live)


def clip_fwd(a, b, tau, stats, loss):
    """CLIP's forward in one pass over y = a @ b.T (a, b both (N, D)): writes the (CLIP_STATS, N) fp32
    statistics (CLIP_LOSS: (nll_r + nll_c)/2 per index, whose mean is clip_loss; the rest the
    backward's, see _clip_combine_kernel) and clip_loss itself into ``loss`` (one element, its own
    dtype; None: not written).  ``tau``: one element, or one per index (row i of a -> b and row i of
    b -> a take τ_i)."""
    N, D = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    cfg = _config(a, "clip")
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # paired tiles (the table's PAIR, beyond one D-step) where no tile is ragged: their epilogue has no
    # bounds to mask and leaves the diagonal's y to the combine, which keeps it spill-free
    even = N % BLOCK_M == 0 and N % (2 * BLOCK_N) == 0 and D % cfg["BLOCK_D"] == 0
    pair = 2 if cfg.get("PAIR", 1) == 2 and not cfg["RESIDENT"] and even else 1
    row_blocks = triton.cdiv(N, BLOCK_M)
    splits, per = tile_engine.split_plan(row_blocks, triton.cdiv(N, BLOCK_N * pair), tile_engine.sm_count(a.device))
    m_r, s_r, zy = (torch.empty((splits, N), **f32) for _ in range(3))
    m_c, s_c = torch.empty((row_blocks, N), **f32), torch.empty((row_blocks, N), **f32)
    common = _common(a, b, None, tau, None, None, cfg)
    # the tile engine's forward with its column epilogue (read through its module, where tests stand in for it)
    tile_fwd._tile_fwd_kernel[(row_blocks, splits)](
        a, b, m_r, tau, m_r, m_r, s_r, zy, m_c, s_c, N, N, D, 0, per * BLOCK_N * pair, *a.stride(), *b.stride(),
        RESIDENT=cfg["RESIDENT"], CLIP=True, PAIR=pair, **common,
    )
    _clip_combine_kernel[(triton.cdiv(N, tile_engine.COMBINE_BLOCK),)](
        tau, m_r, s_r, zy, m_c, s_c, stats, loss if loss is not None else stats,
        tickets(a.device, 1) if loss is not None else stats, a, b, N, D, splits, row_blocks, float(N),
        *a.stride(), *b.stride(), TAU_PER_ROW=common["TAU_PER_ROW"],
        SPLITS_BLOCK=_splits_block(max(splits, row_blocks)), BLOCK=tile_engine.COMBINE_BLOCK, LOSS=loss is not None,
        DENOM=DENOM_ROWS, REDUCE_BLOCK=tile_engine.COMBINE_REDUCE_BLOCK, INTERPRETED=_interpreted(),
        POS_FROM_ROWS=pair == 2, BLOCK_D=min(triton.next_power_of_2(D), 128), num_warps=4,
    )


def clip_bwd(a, b, tau, stats, g, da, db, zp):
    """Writes da in a's dtype, db in b's dtype and zp fp32 (each None when not wanted), for
    G = g (Qr + Qc) off the diagonal and g·dpos on it (clip_fwd's statistics, ``g`` the incoming
    gradient, one element): da = G @ b, db = Gᵀ @ a, zp_k = Σ_j (y_kj - y_kk) Qr_kj + Σ_i (y_ik - y_kk) Qc_ik
    (so that dL/dτ_k = -zp_k / τ_k).  Chunks of columns as the materialized backward
    (_tile_bwd_materialized): one recomputation of each tile, ds = G written once a chunk, two GEMMs
    (tile_bwd.ds_gemms: db's chunk complete, da summed in chunk order in fp32 when there are several);
    each program walks a split of the rows for one block of columns (tile_engine.split_plan); the
    partial sums are added in a fixed order: no atomics."""
    N, D = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    bdo = _block_do(D, _config(a, "da"))
    if _clip_fused(D, bdo, a):
        _clip_bwd_fused(a, b, tau, stats, g, da, db, zp, bdo)
        return
    need_zp = zp is not None
    cfg = _config(a, "probs_zp" if need_zp else "probs")
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    width = tile_bwd.ds_chunk_width(N, D, N, BLOCK_N)
    splits, per = tile_engine.split_plan(triton.cdiv(width, BLOCK_N), triton.cdiv(N, BLOCK_M),
                                         tile_engine.sm_count(a.device))
    zp_r_buf = torch.empty(N * triton.cdiv(width, BLOCK_N), **f32) if need_zp else stats
    zp_c_buf = torch.empty(splits * width, **f32) if need_zp else stats
    if need_zp:
        zp.zero_()

    def fill_ds(ds, c0, c1):
        n_blocks = triton.cdiv(c1 - c0, BLOCK_N)
        _clip_bwd_probs_kernel[(n_blocks, splits)](
            a, b, tau, stats, g, ds, zp_r_buf, zp_c_buf, N, c0, c1, D, per * BLOCK_M, *a.stride(), *b.stride(),
            NEED_ZP=need_zp, TAU_PER_ROW=tau.numel() != 1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=cfg["BLOCK_D"],
            UPCAST=_interpreted(), PRECISION=_precision(a), INTERPRETED=_interpreted(), RESIDENT=cfg["RESIDENT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if need_zp:
            zp.add_(zp_r_buf[:N * n_blocks].view(N, n_blocks).sum(1))
            zp[c0:c1] += zp_c_buf[:splits * (c1 - c0)].view(splits, c1 - c0).sum(0)

    tile_bwd.ds_gemms(a, b, da, db, width, fill_ds)


def _clip_fused(D, bdo, a):
    """clip_bwd's route: fused for 16-bit operands with D <= BLOCK_DO; the chunks of ds beyond, and for
    fp32 (its fused kernel spills at D = 64: 192 bytes on sm_80); tile_bwd.MATERIALIZED_BWD forces one (tests)."""
    if tile_bwd.MATERIALIZED_BWD != "auto":
        return tile_bwd.MATERIALIZED_BWD == "fused"
    return D <= bdo and a.dtype != torch.float32


def _clip_bwd_fused(a, b, tau, stats, g, da, db, zp, bdo):
    """clip_bwd for D <= BLOCK_DO: one launch of _clip_bwd_fused_kernel for da (a's rows against b)
    and one for db (b's rows against a, the directions' constants swapped), each recomputing the
    tiles; split partials summed over the splits by torch (fixed order).  zp = the rows' share from
    the first launch + the columns' from the second."""
    N, D = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    cfg = _config(a, "da")
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_blocks, do_blocks = triton.cdiv(N, BLOCK_M), triton.cdiv(D, bdo)
    splits, per = tile_engine.split_plan(row_blocks * do_blocks, triton.cdiv(N, BLOCK_N),
                                         tile_engine.sm_count(a.device), _partial_cap(N * D))
    need_zp, zp_rows = zp is not None, None
    for dx, x, z, offsets in ((da, a, b, (CLIP_SHIFT_R, CLIP_W_R, CLIP_SHIFT_C, CLIP_W_C)),
                              (db, b, a, (CLIP_SHIFT_C, CLIP_W_C, CLIP_SHIFT_R, CLIP_W_R))):
        if dx is None and not need_zp:
            continue
        dx_part = _split_parts(dx, splits, (N, D)) if dx is not None else torch.empty((splits, N, D), **f32)
        zp_part = torch.empty((splits, N), **f32) if need_zp else stats
        _clip_bwd_fused_kernel[(row_blocks, do_blocks, splits)](
            x, z, tau, stats, g, dx_part, zp_part, N, D, per * BLOCK_N, *offsets, *x.stride(), *z.stride(),
            NEED_ZP=need_zp, TAU_PER_ROW=tau.numel() != 1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=cfg["BLOCK_D"],
            BLOCK_DO=bdo, UPCAST=_interpreted(), PRECISION=_precision(a), RESIDENT=cfg["RESIDENT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _sum_parts(dx_part, dx)
        if need_zp:  # the rows' share from the first launch, + the columns' from the second
            part = zp_part[0] if splits == 1 else zp_part.sum(0)
            if zp_rows is None:
                zp_rows = part
            else:
                torch.add(zp_rows, part, out=zp)
