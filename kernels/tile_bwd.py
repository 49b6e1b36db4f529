"""The tile engine's backward: the gradients of a softmax over the tiles of y = a @ b.T + bias
(dot units), each tile recomputed, the N × K matrix never stored.

Per row i, over the columns j that count (tile_engine's docstring):
  _tile_bwd_da_kernel  da = Q @ b and zp_i = Σ_j (y_ij - r_i) Q_ij, Q_ij = u_i exp((y_ij - c_i)/τ_i)
  _tile_bwd_db_kernel  db = Qᵀ @ a and dbias = Σ_i Q_ij
The caller picks the per-row shift c (dot units) and scale u: for a softmax cross-entropy with
row weight g, c = the max over every column (positive included) and u = g / (τ Σ_j exp((y_j - c)/τ)),
so that Q = dL/dz / τ, what multiplies b and a.  Since Σ_j dL/dz_ij = 0 over every column,
dL/dτ_i = -(1/τ_i) Σ_j (y_ij - r_i) Q_ij for any reference r_i; the caller takes the positive's
(target's) own dot product, whose term then vanishes: no cancellation against it, and no
dependence on the forward's s agreeing with the backward's tiles to the last bit.
Both kernels recompute their tiles (two kernels, no atomics: deterministic).  The output dimension
of da / db is split into BLOCK_DO-wide programs; each recomputes the tile over all of D; the long
dimension each walks (the columns for da, the rows for db) is split as the forward's
(tile_engine.split_plan), the splits' partial sums added by torch in a fixed order.

FLOPs: 2·N·K·D·(2 + 2·D/BLOCK_DO), i.e. 8·N·K·D for D <= BLOCK_DO (contrastive embeddings, D = 128).
  _tile_bwd_probs_kernel  for D > BLOCK_DO (the LLM head, D in the thousands, where the fused
                          kernels would recompute every tile D / BLOCK_DO times): one
                          recomputation writes ds = Q for a chunk of columns (about N·D
                          elements, the input's size; never the N × K matrix), and two GEMMs
                          give db[chunk] = dsᵀ @ a and da += ds @ b[chunk] (added into da's
                          fp32 sum by cuBLAS, accumulate_mm): 6·N·K·D FLOPs, no atomics;
                          the tiles run in groups of GROUP_M row blocks (L2 reuse).
clip_loss's backward (kernels/tile_clip.py) takes the same two routes (MATERIALIZED_BWD,
MATERIALIZED_CHUNK_ELEMENTS, accumulate_mm).
"""
import torch
import triton
import triton.language as tl

from . import tile_engine
from .tile_engine import (_autotuned, _block_do, _common, _config, _dots_tile, _exp2_scale, _interpreted, _kept,
                          _load_tile, _partial_cap, _row_tau, _split_parts, _sum_parts, _target)
from .tl_math import to_store

# The backward takes the two-GEMM route when D > BLOCK_DO ("auto"; "fused" / "materialized" force
# one, for tests): ds chunks of at least this many elements (about N·D, the size of the input)
MATERIALIZED_BWD = "auto"
MATERIALIZED_CHUNK_ELEMENTS = 1 << 24
GROUP_M = 8  # the probabilities' tiles run in groups of GROUP_M row blocks (L2 reuse of b's tiles)


@triton.jit
def _softmax_scale(g_ptr, g_stride, g_div, e_pos_ptr, e_rest_ptr, tau_ptr, rows, live, N, TAU_PER_ROW: tl.constexpr):
    """u_i = (g_i / g_div) / (τ_i (e_pos_i + e_rest_i)) for the ``live`` rows, 0 elsewhere: the scale that makes
    Q = dL/dz / τ for a softmax over [positive, counted columns] whose forward left e_pos and e_rest (the
    positive's and the other columns' exp((y - shift)/τ)), under the incoming gradient g (one element,
    g_stride 0, or one per row) of a loss summed (g_div 1) or averaged (g_div the rows) over the rows.
    IEEE divisions (once per row): the same u as the composition's g / n / (τ (e_pos + e_rest))."""
    g = tl.load(g_ptr + rows.to(tl.int64) * g_stride, mask=live, other=0.0).to(tl.float32)
    e = tl.load(e_pos_ptr + rows, mask=live, other=1.0) + tl.load(e_rest_ptr + rows, mask=live, other=0.0)
    tau = _row_tau(tau_ptr, tl.where(live, rows, 0), N, TAU_PER_ROW)
    u = tl.math.div_rn(tl.math.div_rn(g, g_div), tau * e)
    return tl.where(live, u, 0.0)


@triton.jit
def _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, g_ptr, g_stride, g_div, e_rest_ptr,
                   HAS_TARGET: tl.constexpr, TAU_PER_ROW: tl.constexpr, SCALE_FROM_G: tl.constexpr):
    """log2(e)/τ, the shift c (dot units), the scale u and the target column of a block of rows
    (padding rows inert: c = +inf, u = 0).  u is ``scale_ptr``'s, or with SCALE_FROM_G formed from the
    incoming gradient and the forward's statistics (_softmax_scale, ``scale_ptr`` then holds e_pos)."""
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    # padding rows: exp2((y - inf) r2) = 0 and u = 0, so Q = 0 without a mask per logit
    shift = tl.load(shift_ptr + rows, mask=rows < N, other=float("inf"))
    if SCALE_FROM_G:
        u = _softmax_scale(g_ptr, g_stride, g_div, scale_ptr, e_rest_ptr, tau_ptr, rows, rows < N, N, TAU_PER_ROW)
    else:
        u = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
    return r2, shift, u, _target(target_ptr, rows, N, HAS_TARGET)


@triton.jit
def _grad_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D, r2, shift, u, tgt, diag_offset,
               stride_am, stride_ad, stride_bk, stride_bd, a_fixed, b_fixed,
               HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               A_FIXED: tl.constexpr, B_FIXED: tl.constexpr):
    """The backward's recomputed tile: (y, Q) with Q_ij = u_i exp((y_ij - c_i) / τ_i) on the counted
    columns and 0 elsewhere.  y - c is a difference of dot products (exact near the max, whatever
    1/τ), so exp never sees two large numbers' difference."""
    y = _dots_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D, stride_am, stride_ad, stride_bk,
                   stride_bd, a_fixed, b_fixed, HAS_BIAS, BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, A_FIXED,
                   B_FIXED)
    kept = _kept(rows, cols, K, cols[None, :] == tgt[:, None], diag_offset, HAS_TARGET, MASK_DIAG)
    return y, tl.where(kept, u[:, None] * tl.exp2((y - shift[:, None]) * r2[:, None]), 0.0)


@triton.jit
def _tile_bwd_da_kernel(
    # pointers; da (splits, N, D) and zp (splits, N) are fp32 partials (the outputs for one split)
    a_ptr, b_ptr, bias_ptr, tau_ptr, target_ptr, shift_ptr, scale_ptr, ref_ptr, da_ptr, zp_ptr,
    # the incoming gradient, its row stride and divisor, and e_rest (SCALE_FROM_G: _softmax_scale)
    g_ptr, g_stride, g_div, e_rest_ptr,
    # shapes; program (i-block, do-block, split) walks the columns [split · split_cols, + split_cols)
    N, K, D, diag_offset, split_cols,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, NEED_ZP: tl.constexpr,
    TAU_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr,
    SCALE_FROM_G: tl.constexpr,
):
    """da[rows, do] = Σ_j Q_ij b[j, do] and zp_i = Σ_j (y_ij - ref_i) Q_ij over the split's columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    split = tl.program_id(2)
    col0 = split * split_cols
    col_end = tl.minimum(K, col0 + split_cols)
    r2, shift, u, tgt = _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, g_ptr, g_stride, g_div,
                                       e_rest_ptr, HAS_TARGET, TAU_PER_ROW, SCALE_FROM_G)
    ref = tl.load(ref_ptr + rows, mask=rows < N, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    zp = tl.zeros([BLOCK_M], tl.float32)
    a_fixed = 0.0
    if RESIDENT:  # the rows' tile, read once for every column tile
        a_fixed = _load_tile(a_ptr, rows, N, D, stride_am, stride_ad, BLOCK_D, UPCAST)
    for n0 in range(col0, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        y, Q = _grad_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D, r2, shift, u, tgt, diag_offset,
                          stride_am, stride_ad, stride_bk, stride_bd, a_fixed, 0.0, HAS_BIAS, HAS_TARGET, MASK_DIAG,
                          BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, RESIDENT, False)
        if NEED_ZP:
            zp += tl.sum(tl.where(Q != 0.0, (y - ref[:, None]) * Q, 0.0), 1)
        b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_bk + do.to(tl.int64)[None, :] * stride_bd,
                    mask=(cols[:, None] < K) & (do[None, :] < D), other=0.0)
        if UPCAST:
            acc = tl.dot(Q, b.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(Q.to(b.dtype), b, acc, input_precision=PRECISION)
    part = split.to(tl.int64) * N  # this split's (N, D) slice of the partials
    tl.store(da_ptr + part * D + rows.to(tl.int64)[:, None] * D + do[None, :], acc,
             mask=(rows[:, None] < N) & (do[None, :] < D))
    if NEED_ZP:
        if tl.program_id(1) == 0:  # every do-block computed zp; one writes it
            tl.store(zp_ptr + part + rows, zp, mask=rows < N)


@triton.jit
def _tile_bwd_db_kernel(
    # pointers; db (splits, K, D) and dbias (splits, K) are fp32 partials (the outputs for one split)
    a_ptr, b_ptr, bias_ptr, tau_ptr, target_ptr, shift_ptr, scale_ptr, db_ptr, dbias_ptr,
    # the incoming gradient, its row stride and divisor, and e_rest (SCALE_FROM_G: _softmax_scale)
    g_ptr, g_stride, g_div, e_rest_ptr,
    # shapes; program (j-block, do-block, split) walks the rows [split · split_rows, + split_rows)
    N, K, D, diag_offset, split_rows,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, TAU_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr, SCALE_FROM_G: tl.constexpr,
):
    """db[cols, do] = Σ_i Q_ij a[i, do] and dbias[cols] = Σ_i Q_ij over the split's rows."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    split = tl.program_id(2)
    row0 = split * split_rows
    row_end = tl.minimum(N, row0 + split_rows)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    b_fixed = 0.0
    if RESIDENT:  # the columns' tile, read once for every row tile
        b_fixed = _load_tile(b_ptr, cols, K, D, stride_bk, stride_bd, BLOCK_D, UPCAST)
    for m0 in range(row0, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r2, shift, u, tgt = _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, g_ptr, g_stride,
                                           g_div, e_rest_ptr, HAS_TARGET, TAU_PER_ROW, SCALE_FROM_G)
        _, Q = _grad_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D, r2, shift, u, tgt, diag_offset,
                          stride_am, stride_ad, stride_bk, stride_bd, 0.0, b_fixed, HAS_BIAS, HAS_TARGET, MASK_DIAG,
                          BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, False, RESIDENT)
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + do.to(tl.int64)[None, :] * stride_ad,
                    mask=(rows[:, None] < N) & (do[None, :] < D), other=0.0)
        if UPCAST:
            acc = tl.dot(tl.trans(Q), a.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(Q.to(a.dtype)), a, acc, input_precision=PRECISION)
        if HAS_BIAS:
            dbias += tl.sum(Q, 0)
    part = split.to(tl.int64) * K  # this split's (K, D) slice of the partials
    tl.store(db_ptr + part * D + cols.to(tl.int64)[:, None] * D + do[None, :], acc,
             mask=(cols[:, None] < K) & (do[None, :] < D))
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            tl.store(dbias_ptr + part + cols, dbias, mask=cols < K)


@triton.jit
def _tile_bwd_probs_kernel(
    # pointers
    a_ptr, b_ptr, bias_ptr, tau_ptr, target_ptr, shift_ptr, scale_ptr, ref_ptr, ds_ptr, zp_ptr, dbias_ptr,
    # the incoming gradient, its row stride and divisor, and e_rest (SCALE_FROM_G: _softmax_scale)
    g_ptr, g_stride, g_div, e_rest_ptr,
    # shapes: the chunk is columns [col0, col_end) of the K; ds is a contiguous (N, col_end - col0)
    # buffer, zp a contiguous (N, cdiv(col_end - col0, BLOCK_N)) fp32 one, dbias a contiguous
    # (cdiv(N, BLOCK_M), col_end - col0) fp32 one
    N, col0, col_end, D, diag_offset,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, NEED_ZP: tl.constexpr,
    TAU_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_FROM_G: tl.constexpr,
):
    """ds[i, j - col0] = Q_ij for one (i-block, j-block) tile of a chunk of columns, and the tile's
    shares of zp_i = Σ_j (y_ij - ref_i) Q_ij and (with a bias) of dbias_j, summed in fp32 before ds is rounded to its dtype;
    the launcher multiplies ds into da and db with GEMMs (the large-D backward)."""
    # grouped order: consecutive programs cover GROUP_M row blocks × every column block, so the
    # programs in flight share a few row tiles of a and column tiles of b in L2
    width = col_end - col0
    col_blocks = tl.cdiv(width, BLOCK_N)
    per_group = GROUP_M * col_blocks
    pid = tl.program_id(0)
    first = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(N, BLOCK_M) - first, GROUP_M)
    row_block = first + (pid % per_group) % group_rows
    col_block = (pid % per_group) // group_rows
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    local = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + local
    r2, shift, u, tgt = _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, g_ptr, g_stride, g_div,
                                       e_rest_ptr, HAS_TARGET, TAU_PER_ROW, SCALE_FROM_G)
    # columns past col_end read as out of range: the chunk's own bound
    y, Q = _grad_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, col_end, D, r2, shift, u, tgt, diag_offset,
                       stride_am, stride_ad, stride_bk, stride_bd, 0.0, 0.0, HAS_BIAS, HAS_TARGET, MASK_DIAG, BLOCK_D,
                       UPCAST, PRECISION, BLOCK_M, BLOCK_N, False, False)
    ds_ptrs = ds_ptr + rows.to(tl.int64)[:, None] * width + local[None, :]
    tl.store(ds_ptrs, to_store(Q, ds_ptr, INTERPRETED), mask=(rows[:, None] < N) & (local[None, :] < width))
    if HAS_BIAS:
        tl.store(dbias_ptr + row_block.to(tl.int64) * width + local, tl.sum(Q, 0), mask=local < width)
    if NEED_ZP:
        ref = tl.load(ref_ptr + rows, mask=rows < N, other=0.0)
        tl.store(zp_ptr + rows.to(tl.int64) * col_blocks + col_block,
                 tl.sum(tl.where(Q != 0.0, (y - ref[:, None]) * Q, 0.0), 1), mask=rows < N)


def tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp):
    """Writes (da, db, dbias, zp): see _tile_bwd (FUSED_TAU_TILE_AUTOTUNE: _autotuned)."""
    _autotuned("bwd", a, lambda: _tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp))


def _tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp):
    """Writes da in a's dtype, db in b's dtype, dbias fp32 and zp fp32 (each None when not wanted; dbias
    only with db and a bias), for Q_ij = scale_i exp((y_ij - shift_i) / τ_i) over the counted columns and
    zp_i = Σ_j (y_ij - ref_i) Q_ij (shift and ref in dot units).  The splits' partial sums are added
    by torch reductions over the split dimension (fixed order: deterministic)."""
    D = a.shape[1]
    shift = shift.to(torch.float32).contiguous()
    scale = scale.to(torch.float32).contiguous()
    ref = ref.to(torch.float32).contiguous()
    bdo = _block_do(D, _config(a, "da"))
    if _materialized(D, bdo, a, b):
        _tile_bwd_materialized(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp,
                               _config(a, "probs"))
        return
    da_part, zp_part, db_part, dbias_part = _fused_parts(a, b, bias, tau, target, diag_offset, shift, scale, ref, da,
                                                         db, dbias, zp, bdo)
    for part, out in ((da_part, da), (zp_part, zp), (db_part, db), (dbias_part, dbias)):
        if part is not None:
            _sum_parts(part, out)


_NO_SOFT = None  # the scale is the caller's tensor (SCALE_FROM_G off)


def _soft_args(soft, dummy):
    """The kernels' (g_ptr, g_stride, g_div, e_rest_ptr) and SCALE_FROM_G for ``soft`` = (g, g_stride, g_div,
    e_rest) (_softmax_scale), or dummies when the scale is a tensor."""
    if soft is None:
        return (dummy, 0, 1.0, dummy), False
    return tuple(soft), True


def _fused_parts(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp, bdo, soft=_NO_SOFT):
    """The fused kernels' partial sums over the splits, (da, zp, db, dbias) each (splits, ...) fp32 or None
    when its output is None (_split_parts: the output itself for one fp32 split)."""
    N, D = a.shape
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    strides = (*a.stride(), *b.stride())
    sms = tile_engine.sm_count(a.device)
    g_args, from_g = _soft_args(soft, shift)
    need_da, need_zp = da is not None, zp is not None
    da_part = zp_part = db_part = dbias_part = None
    if need_da or need_zp:
        cfg = _config(a, "da")
        common = _common(a, b, bias, tau, target, diag_offset, cfg)
        BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
        row_blocks, do_blocks = triton.cdiv(N, BLOCK_M), triton.cdiv(D, bdo)
        splits, per = tile_engine.split_plan(row_blocks * do_blocks, triton.cdiv(K, BLOCK_N), sms, _partial_cap(N * D))
        da_part = _split_parts(da, splits, (N, D)) if need_da else torch.empty((splits, N, D), **f32)
        zp_part = _split_parts(zp, splits, (N,))
        _tile_bwd_da_kernel[(row_blocks, do_blocks, splits)](
            a, b, bias if bias is not None else shift, tau, target if target is not None else shift, shift, scale,
            ref, da_part, zp_part if zp_part is not None else shift, *g_args, N, K, D, diag_offset or 0,
            per * BLOCK_N, *strides, NEED_ZP=need_zp, BLOCK_DO=bdo, RESIDENT=cfg["RESIDENT"], SCALE_FROM_G=from_g,
            **common,
        )
        if not need_da:
            da_part = None
    if db is not None:
        cfg = _config(a, "db")
        common = _common(a, b, bias, tau, target, diag_offset, cfg)
        BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
        col_blocks, do_blocks = triton.cdiv(K, BLOCK_N), triton.cdiv(D, bdo)
        splits, per = tile_engine.split_plan(col_blocks * do_blocks, triton.cdiv(N, BLOCK_M), sms, _partial_cap(K * D))
        db_part = _split_parts(db, splits, (K, D))
        dbias_part = _split_parts(dbias, splits, (K,))
        _tile_bwd_db_kernel[(col_blocks, do_blocks, splits)](
            a, b, bias if bias is not None else shift, tau, target if target is not None else shift, shift, scale,
            db_part, dbias_part if dbias_part is not None else shift, *g_args, N, K, D, diag_offset or 0,
            per * BLOCK_M, *strides, BLOCK_DO=bdo, RESIDENT=cfg["RESIDENT"], SCALE_FROM_G=from_g, **common,
        )
    return da_part, zp_part, db_part, dbias_part


# How this torch multiplies 16-bit operands into an fp32 sum, per device type (accumulate_mm): found
# on first use, from the most direct way down
_FP32_OUT_GEMM = {}


def accumulate_mm(acc, x, w):
    """acc += x @ w, acc fp32, x and w in the operands' dtype: the product accumulated in fp32 and added
    without being rounded to x's dtype.  For bf16 / fp16 operands, in order: cuBLAS adding into acc
    (``torch.addmm(acc, x, w, out_dtype=float32, out=acc)``: no temporary), an fp32-output GEMM then an
    add (one (N, D) fp32 temporary), the operands upcast (CPU: the interpreter's tests)."""
    if x.dtype == torch.float32:
        acc.addmm_(x, w)
        return
    how = _FP32_OUT_GEMM.get(acc.device.type)
    if how in (None, "addmm"):
        try:
            torch.addmm(acc, x, w, out_dtype=torch.float32, out=acc)
            _FP32_OUT_GEMM[acc.device.type] = "addmm"
            return
        except (RuntimeError, TypeError, NotImplementedError):  # an older torch, or no such kernel here
            how = _FP32_OUT_GEMM[acc.device.type] = "mm"
    if how == "mm":
        try:
            acc += torch.mm(x, w, out_dtype=torch.float32)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            how = _FP32_OUT_GEMM[acc.device.type] = "upcast"
    acc.addmm_(x.to(torch.float32), w.to(torch.float32))


def _materialized(D, bdo, a, b):
    """The fused kernels recompute every tile once per BLOCK_DO-wide slice of D: beyond one slice (the
    LLM head, D in the thousands) the backward writes the tiles' P / τ once, a chunk of rows at a
    time, and multiplies them with cuBLAS."""
    if b.shape[0] == 0:  # no columns: the fused kernels' empty loops give the zero gradients
        return False
    if MATERIALIZED_BWD != "auto":
        return MATERIALIZED_BWD == "materialized"
    return D > bdo and a.dtype == b.dtype


def ds_chunk_width(N, D, K, BLOCK_N):
    """The materialized backward's chunk of columns: about max(N·D, MATERIALIZED_CHUNK_ELEMENTS) elements
    of ds (the input's size), whole BLOCK_N-wide tiles, at most K."""
    width = max(N * D, MATERIALIZED_CHUNK_ELEMENTS) // max(N, 1)
    return min(K, max(BLOCK_N, width // BLOCK_N * BLOCK_N))


def ds_gemms(a, b, da, db, width, fill_ds):
    """The materialized backward's GEMMs over chunks [c0, c1) of b's K rows, ``width`` wide:
    ``fill_ds(ds, c0, c1)`` writes ds, the (N, c1 - c0) gradient of the loss with respect to the chunk's
    dot products (in a's dtype), then db[c0:c1] = dsᵀ @ a (complete: one GEMM over all rows) and
    da = Σ_chunks ds @ b[c0:c1], summed in fp32 in chunk order and rounded once (accumulate_mm; one
    chunk: one GEMM into da).  da, db: None when not wanted."""
    N, D = a.shape
    K = b.shape[0]
    ds_buf = torch.empty(N * width, device=a.device, dtype=a.dtype)
    # one chunk multiplies into da; several sum da in fp32 (into da itself when it is fp32, also when the
    # operands are 16-bit: the caller's fp32 sum)
    single = width >= K and (da is None or da.dtype == a.dtype)
    da_sum = (None if single or da is None else da.zero_() if da.dtype == torch.float32
              else torch.zeros((N, D), device=a.device, dtype=torch.float32))
    for c0 in range(0, K, width):
        c1 = min(K, c0 + width)
        ds = ds_buf[:N * (c1 - c0)].view(N, c1 - c0)
        fill_ds(ds, c0, c1)
        if da is not None:
            if single:
                torch.mm(ds, b, out=da)
            else:
                accumulate_mm(da_sum, ds, b[c0:c1])
        if db is not None:
            if db.dtype == ds.dtype:
                torch.mm(ds.t(), a, out=db[c0:c1])
            else:  # an fp32 db for 16-bit operands: the chunk's product unrounded
                accumulate_mm(db[c0:c1].zero_(), ds.t(), a)
    if da_sum is not None and da_sum is not da:
        da.copy_(da_sum)


def _tile_bwd_materialized(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp, cfg,
                           soft=_NO_SOFT):
    """Chunks of columns: ds = Q = P / τ (N × chunk, in the operands' dtype, fp32 for fp32) from one
    recomputation of the tiles (_tile_bwd_probs_kernel), then db[chunk] = dsᵀ @ a and da += ds @ b[chunk]
    (ds_gemms).  Chunking the columns, not the rows, makes the running sum the (N, D) da rather than the
    (K, D) db, which is far larger for an LLM head.  FLOPs 6·N·K·D whatever D; extra memory one chunk,
    about max(N·D, MATERIALIZED_CHUNK_ELEMENTS) elements, and da's fp32 sum."""
    N, D = a.shape
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    width = ds_chunk_width(N, D, K, BLOCK_N)
    common = _common(a, b, bias, tau, target, diag_offset, cfg)
    need_db, need_zp = db is not None, zp is not None
    zp_buf = torch.empty(N * triton.cdiv(width, BLOCK_N), **f32) if need_zp else shift
    row_blocks = triton.cdiv(N, BLOCK_M)
    dbias_buf = torch.empty(row_blocks * width, **f32) if need_db and bias is not None else shift
    if need_zp:
        zp.zero_()
    g_args, from_g = _soft_args(soft, shift)

    def fill_ds(ds, c0, c1):
        n_blocks = triton.cdiv(c1 - c0, BLOCK_N)
        _tile_bwd_probs_kernel[(row_blocks * n_blocks,)](
            a, b, bias if bias is not None else shift, tau, target if target is not None else shift, shift, scale, ref,
            ds, zp_buf, dbias_buf, *g_args, N, c0, c1, D, diag_offset or 0, *a.stride(), *b.stride(),
            NEED_ZP=need_zp, INTERPRETED=_interpreted(), GROUP_M=GROUP_M, SCALE_FROM_G=from_g, **common,
        )
        if need_db and dbias is not None:
            dbias[c0:c1] = dbias_buf[:row_blocks * (c1 - c0)].view(row_blocks, c1 - c0).sum(0)
        if need_zp:
            zp.add_(zp_buf[:N * n_blocks].view(N, n_blocks).sum(1))

    ds_gemms(a, b, da, db, width, fill_ds)


# ------------------------------------------------------------------ a softmax over [positive, tiles]

@triton.jit
def _tile_bwd_rows_kernel(
    # pointers: part (splits, R, D) partial sums (any float dtype), other / other2 (rows, D), out (R, D) and
    # out2 (N, D) in their dtypes; zp_part (splits, N) fp32 and dtau (N,) fp32; the softmax's statistics
    part_ptr, other_ptr, out_ptr, other2_ptr, out2_ptr, zp_part_ptr, dtau_ptr, tau_ptr, g_ptr, e_pos_ptr,
    e_rest_ptr, extra_ptr,
    # shapes: out's R rows; the N rows i of the softmax; row r of out takes row i = r - row_off's positive
    R, N, D, splits, row_off, other_off, g_stride, g_div,
    # strides of other and other2
    stride_om, stride_od, stride_o2m, stride_o2d,
    # constants
    NEED_OUT: tl.constexpr, HAS_OTHER: tl.constexpr, HAS_OUT2: tl.constexpr, NEED_DTAU: tl.constexpr,
    WRAP: tl.constexpr, HAS_EXTRA: tl.constexpr, TAU_PER_ROW: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """The gradients' rows with the positive's terms, after the tiles' partial sums.  With
    c_i = dL/dpos_i = -u_i e_rest_i = g_i (p_pos,i - 1)/τ_i (u of _softmax_scale), the gradient of the
    positive's dot product pos_i = a_i · p_i (dot units):
      out[r]   = Σ_s part[s, r] + c_i other[i + other_off] (+ extra[r])   (i = r - row_off in [0, N); the sum
                 alone elsewhere; WRAP: both indices modulo N, every row has its i: NT-Xent's pairs)
      out2[i]  = c_i other2[i]                                (HAS_OUT2, rows i < N; R = N, row_off = 0)
      dtau[i]  = -(Σ_s zp[s, i]) / τ_i + 0 · c_i             (NEED_DTAU: dL/dτ_i, NaN with its row)
    summed in fp32 in split order and rounded once to the outputs' dtypes (``extra``: an fp32 (R, D) sum)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = rows < R
    mask = live[:, None] & (dd[None, :] < D)
    rows64 = rows.to(tl.int64)
    dd64 = dd.to(tl.int64)
    k = tl.arange(0, SPLITS_BLOCK)
    i = rows - row_off
    if WRAP:
        i = (i % N + N) % N
    has = live & (i >= 0) & (i < N)
    safe = tl.where(has, i, 0).to(tl.int64)
    c = -_softmax_scale(g_ptr, g_stride, g_div, e_pos_ptr, e_rest_ptr, tau_ptr, i, has, N, TAU_PER_ROW) \
        * tl.load(e_rest_ptr + safe, mask=has, other=0.0)
    if NEED_OUT:
        # SPLITS_BLOCK splits' (BLOCK_R, BLOCK_D) slices a step, all loads of a step in flight at once
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for k0 in range(0, splits, SPLITS_BLOCK):
            kk = (k0 + k).to(tl.int64)
            offs = (kk[:, None, None] * R + rows64[None, :, None]) * D + dd64[None, None, :]
            acc += tl.sum(tl.load(part_ptr + offs, mask=(kk[:, None, None] < splits) & mask[None, :, :],
                                  other=0.0).to(tl.float32), 0)
        if HAS_OTHER:
            orow = safe + other_off
            if WRAP:
                orow = orow % N
            p = tl.load(other_ptr + orow[:, None] * stride_om + dd64[None, :] * stride_od,
                        mask=has[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
            acc += c[:, None] * p
        if HAS_EXTRA:
            acc += tl.load(extra_ptr + rows64[:, None] * D + dd64[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + rows64[:, None] * D + dd64[None, :], to_store(acc, out_ptr, INTERPRETED), mask=mask)
    if HAS_OUT2:
        q = tl.load(other2_ptr + safe[:, None] * stride_o2m + dd64[None, :] * stride_o2d,
                    mask=has[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        tl.store(out2_ptr + rows64[:, None] * D + dd64[None, :], to_store(c[:, None] * q, out2_ptr, INTERPRETED),
                 mask=has[:, None] & (dd[None, :] < D))
    if NEED_DTAU:
        if tl.program_id(1) == 0:
            zp = tl.zeros([BLOCK_R], tl.float32)
            for k0 in range(0, splits, SPLITS_BLOCK):
                kk = (k0 + k).to(tl.int64)
                zp += tl.sum(tl.load(zp_part_ptr + kk[:, None] * N + safe[None, :],
                                     mask=(kk[:, None] < splits) & has[None, :], other=0.0), 0)
            tau = _row_tau(tau_ptr, safe, N, TAU_PER_ROW)
            tl.store(dtau_ptr + safe, tl.math.div_rn(-zp, tau) + 0.0 * c, mask=has)


# _tile_bwd_rows_kernel: a program sums a [splits, rows, features] block of about ROWS_ELEMENTS partials a
# step (at most ROWS_SPLITS splits, 128 features, ROWS_MAX rows; 8 warps for a full block, else 4): MoCo
# N = 256 on 64 splits is 256 programs of one row, each with its 64 splits' 128 features in flight at
# once; tests shrink them
ROWS_ELEMENTS = 8192
ROWS_SPLITS = 64
ROWS_MAX = 32


def _rows(soft, e_pos, tau, N, D, R, part=None, out=None, other=None, other_off=0, row_off=0, other2=None, out2=None,
          zp_part=None, dtau=None, wrap=False, extra=None):
    """One launch of _tile_bwd_rows_kernel (see there): ``part`` (splits, R, D) or None (no sum), ``soft`` =
    (g, g_stride, g_div, e_rest) of _softmax_scale."""
    g, g_stride, g_div, e_rest = soft
    dummy = e_pos
    flat = e_pos[:1].view(1, 1)
    other_t = other if other is not None else flat
    other2_t = other2 if other2 is not None else flat
    splits = part.shape[0] if part is not None else zp_part.shape[0] if zp_part is not None else 0
    block_d = min(max(triton.next_power_of_2(D), 16), 128)
    splits_block = min(max(triton.next_power_of_2(splits), 1), ROWS_SPLITS)
    block_r = max(1, min(ROWS_MAX, triton.next_power_of_2(R), ROWS_ELEMENTS // (splits_block * block_d)))
    _tile_bwd_rows_kernel[(triton.cdiv(R, block_r), triton.cdiv(D, block_d))](
        part if part is not None else dummy, other_t, out if out is not None else dummy, other2_t,
        out2 if out2 is not None else dummy, zp_part if zp_part is not None else dummy,
        dtau if dtau is not None else dummy, tau, g, e_pos, e_rest, extra if extra is not None else dummy, R, N, D,
        splits, row_off, other_off, g_stride, g_div, *other_t.stride(), *other2_t.stride(),
        NEED_OUT=out is not None, HAS_OTHER=other is not None, HAS_OUT2=out2 is not None, NEED_DTAU=dtau is not None,
        WRAP=wrap, HAS_EXTRA=extra is not None, TAU_PER_ROW=tau.numel() != 1, SPLITS_BLOCK=splits_block, BLOCK_R=block_r, BLOCK_D=block_d,
        INTERPRETED=_interpreted(), num_warps=8 if splits_block * block_r * block_d >= ROWS_ELEMENTS else 4,
    )


def infonce_bwd(a, b, tau, target, key, shift, ref, e_pos, e_rest, g, g_div, label_offset, da, db, dkey, dtau):
    """The gradients of rows i of a softmax cross-entropy over [positive, counted columns of y = a @ b.T]
    (dot units; the forward's TILE_* statistics shift, ref = pos, e_pos, e_rest), under the incoming
    gradient ``g`` (one element or one per row) of a loss summed over the rows and divided by ``g_div``:
    da (a's dtype), db (b's dtype), dkey (key's dtype) and dtau = dL/dτ_i per row (fp32), each written
    when not None.  The positive's dot product is pos_i = a_i · key_i (``key``, a MoCo queue's positives:
    its gradient dkey) or, with ``target`` (in-batch), y at column t_i = i + label_offset.

    The tiles' kernels form u from g and the statistics (SCALE_FROM_G), their partial sums over the
    splits and the positive's rank-one terms are added by _tile_bwd_rows_kernel (one launch for a's
    rows, one for b's): no torch operator between the forward's statistics and the gradients."""
    N, D = a.shape
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    g = g.reshape(-1)
    soft = (g, 0 if g.numel() == 1 else g.stride(0), float(g_div), e_rest)
    zp = torch.empty(N, **f32) if dtau is not None else None
    bdo = _block_do(D, _config(a, "da"))
    if _materialized(D, bdo, a, b):
        # da, and in-batch db (its positive's terms still to add), as fp32 sums: one rounding to their dtypes
        da_part = torch.empty(a.shape, **f32) if da is not None else None
        db_part = db if db is not None and target is None else torch.empty(b.shape, **f32) if db is not None else None
        _tile_bwd_materialized(a, b, None, tau, target, None, shift, e_pos, ref, da_part, db_part, None, zp,
                               _config(a, "probs"), soft)
        da_part, db_part, zp_part = (t.unsqueeze(0) if t is not None else None for t in (da_part, db_part, zp))
    else:
        da_part, zp_part, db_part, _ = _fused_parts(a, b, None, tau, target, None, shift, e_pos, ref, da, db, None, zp,
                                                    bdo, soft)
    in_batch = target is not None
    if da is not None or dtau is not None or dkey is not None:
        _rows(soft, e_pos, tau, N, D, N, part=da_part, out=da, other=b if in_batch else key,
              other_off=label_offset if in_batch else 0, other2=None if in_batch else a, out2=dkey, zp_part=zp_part,
              dtau=dtau)
    if db is not None and db_part is not None and db_part.data_ptr() != db.data_ptr():
        _rows(soft, e_pos, tau, N, D, K, part=db_part, out=db, other=a if in_batch else None,
              row_off=label_offset if in_batch else 0)
    elif db is not None and in_batch:
        _rows(soft, e_pos, tau, N, D, K, part=db_part, out=db, other=a, row_off=label_offset)


def ntxent_bwd(z, tau, target, shift, ref, e_pos, e_rest, g, g_div, dz, dtau):
    """NT-Xent's gradients from the forward's TILE_* statistics: rows i of z (2N views, z the normalised
    embeddings) each a softmax over [positive, the other views] of y = z @ z.T, the positive column
    ``target`` t_i = (i + N) mod 2N, the diagonal excluded; dz (z's dtype) = da + db with both positive
    terms, c_i z_{t_i} into row i and c_i z_i into row t_i (t is an involution: row r takes c_{t_r} z_{t_r}),
    and dtau = dL/dτ_i per row (fp32), each written when not None (``g``, ``g_div`` as infonce_bwd's).
    The tiles' two kernels (u from the statistics), then two _tile_bwd_rows_kernel launches: da's rows
    into an fp32 scratch, then db's rows with it added, rounded once."""
    n2, D = z.shape
    half = n2 // 2
    f32 = dict(device=z.device, dtype=torch.float32)
    g = g.reshape(-1)
    soft = (g, 0 if g.numel() == 1 else g.stride(0), float(g_div), e_rest)
    zp = torch.empty(n2, **f32) if dtau is not None else None
    da_part = torch.empty((n2, D), **f32)
    db_part = torch.empty((n2, D), **f32) if dz is not None else None
    bdo = _block_do(D, _config(z, "da"))
    if _materialized(D, bdo, z, z):
        _tile_bwd_materialized(z, z, None, tau, target, 0, shift, e_pos, ref, da_part, db_part, None, zp,
                               _config(z, "probs"), soft)
        da_part, db_part, zp_part = (t.unsqueeze(0) if t is not None else None for t in (da_part, db_part, zp))
    else:
        da_part, zp_part, db_part, _ = _fused_parts(z, z, None, tau, target, 0, shift, e_pos, ref, da_part, db_part,
                                                    None, zp, bdo, soft)
    da = torch.empty((n2, D), **f32)
    _rows(soft, e_pos, tau, n2, D, n2, part=da_part, out=da, other=z, other_off=half, zp_part=zp_part, dtau=dtau,
          wrap=True)
    if dz is not None:
        _rows(soft, e_pos, tau, n2, D, n2, part=db_part, out=dz, other=z, row_off=half, wrap=True, extra=da)
