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
