"""Tile engine: ``z = (a @ b.T + bias) / τ`` streamed tile by tile into an online log-sum-exp
(flash-attention style); the N × K logits are never stored, forward or backward.

Everything is kept in dot units y = a·b + bias (before 1/τ): the running max, the shift of the
backward, the τ-gradient's sum.  A logit enters exp only as a difference of dot products times
one per-row constant, log2(e)/τ rounded once: exp((y - c)/τ) = exp2((y - c)·log2(e)/τ).  So at
small τ exp never sees the difference of two numbers of magnitude 1/τ (an exact tie gives exp2(0)
= 1 exactly), and at large τ the shifted logits stay small (no cancellation of log K against the
positive in dL/dτ).  No division per logit: per logit the forward's epilogue is a subtraction, a
multiply by log2(e)/τ, MUFU.EX2, its share of the max and of the sum, and one select per kind of
excluded column (beyond the last column, the target, the diagonal); padding rows are not masked.

Per row i, over the columns j that count (j < K, j ≠ t_i the row's target, j ≠ i + diag_offset
when self-similarity is excluded):
  _tile_fwd_kernel     m_i = max y_ij, s_i = Σ exp((y_ij - m_i)/τ_i), and y_{i,t_i} from the same tiles
  _tile_combine_kernel the forward's splits of the columns merged: m_i = max_k m_ik, s_i = Σ_k ...
  _tile_bwd_da_kernel  da = Q @ b and zp_i = Σ_j (y_ij - r_i) Q_ij, Q_ij = u_i exp((y_ij - c_i)/τ_i)
  _tile_bwd_db_kernel  db = Qᵀ @ a and dbias = Σ_i Q_ij
The caller picks the per-row shift c (dot units) and scale u: for a softmax cross-entropy with
row weight g, c = the max over every column (positive included) and u = g / (τ Σ_j exp((y_j - c)/τ)),
so that Q = dL/dz / τ, what multiplies b and a.  Since Σ_j dL/dz_ij = 0 over every column,
dL/dτ_i = -(1/τ_i) Σ_j (y_ij - r_i) Q_ij for any reference r_i; the caller takes the positive's
(target's) own dot product, whose term then vanishes: no cancellation against it, and no
dependence on the forward's s agreeing with the backward's tiles to the last bit.
Both backward kernels recompute their tiles (two kernels, no atomics: deterministic).  The
output dimension of da / db is split into BLOCK_DO-wide programs; each recomputes the tile
over all of D.

The grid does not depend on N alone (flash-decoding): the long dimension each program walks (the
columns for the forward and da, the rows for db) is cut into ``splits`` ranges of whole tiles,
chosen by ``split_plan`` from the number of programs, the number of tiles and the SM count.  Each
program writes partial statistics (m, s, y_target) or partial sums (da, zp, db, dbias) for its
range; ``_tile_combine_kernel`` merges the forward's (m, s) in split order, and the backward's
partial sums are summed over the splits by one torch reduction: no atomics, the same bits on every
run.  MoCo N = 256, K = 65536 on 132 SMs: 4 programs walking 1024 tiles each became 128 walking 16.

FLOPs: forward 2·N·K·D; backward 2·N·K·D·(2 + 2·D/BLOCK_DO), i.e. 8·N·K·D for D <= BLOCK_DO
(contrastive embeddings, D = 128).
  _tile_bwd_probs_kernel  for D > BLOCK_DO (the LLM head, D in the thousands, where the fused
                          kernels would recompute every tile D / BLOCK_DO times): one
                          recomputation writes ds = Q for a chunk of columns (about N·D
                          elements, the input's size; never the N × K matrix), and two GEMMs
                          give db[chunk] = dsᵀ @ a and da += ds @ b[chunk] (added into da's
                          fp32 sum by cuBLAS, accumulate_mm): 6·N·K·D FLOPs, no atomics;
                          the tiles run in groups of GROUP_M row blocks (L2 reuse).

clip_loss in one pass (section "CLIP in one pass"): _clip_fwd_kernel feeds each tile to the rows'
and the columns' (m, s), _clip_combine_kernel merges them and forms both directions' losses and the
backward's constants, and _clip_bwd_probs_kernel (ds, then two GEMMs) or _clip_bwd_fused_kernel (16-bit
operands with D <= BLOCK_DO, launched for da and for db) take both directions' gradients from each
recomputed tile.

τ is one element (every row) or one per row (``TAU_PER_ROW``), as the row engine takes it: the
callers never materialise an N-vector.  log2(e)/τ is an IEEE division once per row (once per
program for one τ), never per logit.

fp32 inputs multiply in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set;
fp16 / bf16 multiply on tensor cores with fp32 accumulation.  Interpreter trap (Triton 3.9,
checked): ``tl.dot`` on bf16 operands returns garbage under TRITON_INTERPRET=1, so UPCAST
(set only there) multiplies in fp32.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from . import CLIP_SHIFT_C, CLIP_SHIFT_R, CLIP_W_C, CLIP_W_R
from .tl_math import log1p, to_store

# Tile shapes per architecture, operand kind and D-bin (``tile_config``), from a fixed table: never
# keyed on N (the grid's split of the long dimension adapts to N, split_plan), so the same binary
# serves every batch.  bf16 / fp16: 128-row tiles (two warpgroups of wgmma m64 on sm_90), so each
# byte of a column tile read through L2 feeds 128 rows; for D <= 256 one D-step covers the whole
# row and the row tile stays on-chip across every column tile of the program (RESIDENT): only the
# column tiles stream, pipelined over ``num_stages`` buffers; beyond, 128 × 128 output tiles with
# 64-wide D-steps (the GEMM shape), and 128 × 256 for the LLM head's D in the thousands.  fp32 operands take twice the registers: 64 × 64 tiles with
# capped D-steps and no software pipelining (num_stages=1: with 2-4 stages ptxas spilled 8-24 bytes
# in the forward on sm_80 or sm_90), spill-free on both architectures, IEEE or TF32.  sm_80 takes the same tiles as sm_90 with shared memory within sm_80's 163 KiB, so that
# a launch specialised with the sm_90 entry (the model compiles one launch for both targets)
# compiles spill-free and fits on both; other architectures below sm_90 (sm_86 / sm_89: 99 KiB of
# shared memory a block) take sm_80's tiles with at most two stages.
D_BINS = (128, 256, 512, 4096)  # a D falls in the first bin >= D (the last bin beyond)
_BF16_SMALL = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_DO=128, num_warps=8)
_BF16_LARGE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, BLOCK_DO=128, num_warps=8)
_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, BLOCK_DO=64, num_warps=8, num_stages=1)
TILE_CONFIGS = {}
for _arch in (90, 80):
    # the backward's fused kernels hold a second accumulator (BLOCK_M × BLOCK_DO): da walks 32-wide
    # column tiles and db two stages, within sm_80's registers (mma.sync keeps the fixed tile in them)
    # and shared memory
    TILE_CONFIGS[(_arch, "16", 128)] = dict(_BF16_SMALL, BLOCK_D=128, num_stages=3, da=dict(BLOCK_N=32),
                                            db=dict(num_stages=2))
    TILE_CONFIGS[(_arch, "16", 256)] = dict(_BF16_SMALL, BLOCK_D=256, num_stages=2)
    TILE_CONFIGS[(_arch, "16", 512)] = dict(_BF16_LARGE, num_stages=3)
    # the LLM head (D in the thousands, not resident): 128 × 256 output tiles halve the row tile's reads
    # through L2 against 128 × 128 (the forward's and the probabilities' limit in the model: 19.9 -> 15.3 ms
    # at 8192 × 128256 × 4096); 32-wide D-steps over 4 stages keep them spill-free on sm_90 and sm_80
    TILE_CONFIGS[(_arch, "16", 4096)] = dict(_BF16_LARGE, BLOCK_N=256, BLOCK_D=32, num_stages=4)
    for _bin in D_BINS:
        TILE_CONFIGS[(_arch, "32", _bin)] = dict(_FP32)
# Tests cap every block (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO) so that odd sizes cross tile boundaries
BLOCK_CAP = None
# The architecture off the GPU (CPU tensors: the interpreter, a model compiling for sm_90)
ARCH_OFF_GPU = 90
# FUSED_TAU_TILE_AUTOTUNE=1: the first call of tile_fwd / tile_bwd for each (arch, operand kind,
# D-bin) times AUTOTUNE_CANDIDATES (each laid over the table's entry: tile shape, warps, stages; the
# D-steps stay the table's) and keeps the fastest for the process.  Never keyed on N.  Off by default:
# the table is what runs (and what the model reads).
AUTOTUNE_ENV = "FUSED_TAU_TILE_AUTOTUNE"
AUTOTUNE_CANDIDATES = (
    {},
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
)
_TUNED = {}  # (op, arch, kind, D-bin) -> the chosen candidate
_OVERRIDE = {}  # the candidate in force while one is timed or applied
NUM_WARPS = 8  # the combine's and the table's default
# The backward takes the two-GEMM route when D > BLOCK_DO ("auto"; "fused" / "materialized" force
# one, for tests): ds chunks of at least this many elements (about N·D, the size of the input)
MATERIALIZED_BWD = "auto"
MATERIALIZED_CHUNK_ELEMENTS = 1 << 24
GROUP_M = 8  # the probabilities' tiles run in groups of GROUP_M row blocks (L2 reuse of b's tiles)
# Splits (split_plan): a program walks at least MIN_TILES_PER_SPLIT tiles of its long dimension, and
# the backward's partial sums (splits × the output, fp32) stay within PARTIAL_ELEMENTS elements.  For
# tensors off the GPU the plan assumes SM_COUNT_OFF_GPU SMs: tests raise it (with 1-tile splits) so
# that small shapes cross split boundaries; a model that drives CPU tensors at real shapes sets the
# target's count (132 on H100 / H200) to see the grid a GPU run gets.
MIN_TILES_PER_SPLIT = 4
PROGRAM_OVERHEAD_TILES = 2  # a program's fixed cost (row constants, partial stores), in tiles
PARTIAL_ELEMENTS = 1 << 24
SM_COUNT_OFF_GPU = 4
# The combines (_tile_combine_kernel, _clip_combine_kernel): rows per program, and the most splits'
# partials merged a step (a [splits, rows] tile, one step for the plans split_plan makes for 2 or
# more row blocks on 132 SMs); 4 warps.  MoCo N = 256 on 64 splits: 8 programs of one step each
COMBINE_BLOCK = 32
COMBINE_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _cuda_properties(index):
    return torch.cuda.get_device_properties(index)


def cuda_properties(device):
    """torch.cuda's properties of ``device`` (read once per device), None off the GPU."""
    if device.type != "cuda":
        return None
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def arch_of(device):
    """The compute capability as an int (90 for sm_90): the device's on CUDA, ARCH_OFF_GPU elsewhere."""
    p = cuda_properties(device)
    return p.major * 10 + p.minor if p is not None else ARCH_OFF_GPU


def d_bin(D):
    return next((b for b in D_BINS if D <= b), D_BINS[-1])


def tile_config(arch, dtype, D, kernel="fwd"):
    """The launch configuration for operands of ``dtype`` (a torch dtype) with D features on ``arch``
    (a dict: BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, num_warps, num_stages, BLOCK_CAP applied, and
    RESIDENT: one D-step covers D, so a program's fixed tile is loaded once).  ``kernel`` ("fwd",
    "da", "db", "probs") picks the entry's overrides for that kernel."""
    kind = "32" if dtype == torch.float32 else "16"
    entry = TILE_CONFIGS[(90 if arch >= 90 else 80, kind, d_bin(D))]
    cfg = {k: v for k, v in entry.items() if not isinstance(v, dict)}
    cfg.update(entry.get(kernel, {}))
    cfg.update(_OVERRIDE)
    if arch < 90 and arch != 80:
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    # a D-step no wider than D's power of two (D = 64 in the 128 bin: no MMA on zero padding)
    cfg["BLOCK_D"] = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(D)))
    if BLOCK_CAP is not None:
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO"):
            cfg[name] = min(cfg[name], BLOCK_CAP)
    cfg["RESIDENT"] = D <= cfg["BLOCK_D"]
    return cfg


@triton.jit
def _load_tile(ptr, idx, n, D, stride_i, stride_d, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """ptr[idx, :BLOCK_D] as a (len(idx), BLOCK_D) tile, rows >= n and features >= D read as 0: the
    whole row when D <= BLOCK_D (a program's fixed tile, loaded once)."""
    dd = tl.arange(0, BLOCK_D)
    t = tl.load(ptr + idx.to(tl.int64)[:, None] * stride_i + dd.to(tl.int64)[None, :] * stride_d,
                mask=(idx[:, None] < n) & (dd[None, :] < D), other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _dots_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D,
               stride_am, stride_ad, stride_bk, stride_bd, a_fixed, b_fixed,
               HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, A_FIXED: tl.constexpr, B_FIXED: tl.constexpr):
    """y = a[rows] @ b[cols].T + bias[cols], the logits in dot units (before 1/τ), an fp32
    (BLOCK_M, BLOCK_N) tile.  A_FIXED / B_FIXED (only when D <= BLOCK_D): ``a_fixed`` / ``b_fixed``
    is that side's tile, loaded once by the caller (_load_tile) and kept on-chip across its loop."""
    if A_FIXED or B_FIXED:
        if A_FIXED:
            a = a_fixed
        else:
            a = _load_tile(a_ptr, rows, N, D, stride_am, stride_ad, BLOCK_D, UPCAST)
        if B_FIXED:
            b = b_fixed
        else:
            b = _load_tile(b_ptr, cols, K, D, stride_bk, stride_bd, BLOCK_D, UPCAST)
        acc = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dd64 = dd.to(tl.int64)
            a = tl.load(a_ptr + rows64[:, None] * stride_am + dd64[None, :] * stride_ad,
                        mask=(rows[:, None] < N) & (dd[None, :] < D), other=0.0)
            b = tl.load(b_ptr + cols64[:, None] * stride_bk + dd64[None, :] * stride_bd,
                        mask=(cols[:, None] < K) & (dd[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _kept(rows, cols, K, hit, diag_offset, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr):
    """The tile's entries that enter the row's log-sum-exp over negatives: real columns (j < K), not
    the row's target (``hit``, the tile's j == t_i, when the rows have targets) and not its own
    diagonal j = i + diag_offset.  Padding rows are not masked: the forward never stores them, and
    the backward gives them Q = 0 through their shift (+inf) and scale (0)."""
    kept = cols[None, :] < K
    if HAS_TARGET:
        kept &= ~hit
    if MASK_DIAG:
        kept &= cols[None, :] != rows[:, None] + diag_offset
    return kept


@triton.jit
def _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW: tl.constexpr):
    """log2(e) / τ per row, rounded once: exp((y - c) / τ) = exp2((y - c) * this), one multiply per
    logit (no division, no separate log2(e) multiply).  One τ: one division for the block.  Padding
    rows read τ = 1."""
    if TAU_PER_ROW:
        tau = tl.load(tau_ptr + rows, mask=rows < N, other=1.0).to(tl.float32)
        return 1.4426950408889634 / tau
    return tl.zeros([rows.shape[0]], tl.float32) + 1.4426950408889634 / tl.load(tau_ptr).to(tl.float32)


@triton.jit
def _target(target_ptr, rows, N, HAS_TARGET: tl.constexpr):
    """The rows' target columns as int32 (columns are < 2^31; a 32-bit compare per logit instead of a
    64-bit one), -1 for padding rows and without targets."""
    tgt = tl.full([rows.shape[0]], -1, tl.int32)
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows, mask=rows < N, other=-1).to(tl.int32)
    return tgt


@triton.jit
def _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, HAS_TARGET: tl.constexpr,
                   TAU_PER_ROW: tl.constexpr):
    """log2(e)/τ, the shift c (dot units), the scale u and the target column of a block of rows
    (padding rows inert: c = +inf, u = 0)."""
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    # padding rows: exp2((y - inf) r2) = 0 and u = 0, so Q = 0 without a mask per logit
    shift = tl.load(shift_ptr + rows, mask=rows < N, other=float("inf"))
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
def _tile_fwd_kernel(
    # pointers; m, s, zy are (splits, N) fp32 partials (the outputs themselves for one split)
    a_ptr, b_ptr, bias_ptr, tau_ptr, target_ptr, m_ptr, s_ptr, zy_ptr,
    # shapes: a (N, D), b (K, D); diag_offset: column excluded from row i is i + diag_offset;
    # program (i-block, split) walks the columns [split · split_cols, (split + 1) · split_cols)
    N, K, D, diag_offset, split_cols,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, TAU_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr,
):
    """Per row and split of the columns, in dot units y = a·b + bias: m = max y, s = Σ exp((y - m) / τ)
    over the counted columns, and, RESIDENT, y at the target column (0 where the target is in another
    split; beyond one D-step the combine forms it from b's target row instead: the tile's sum over it
    cost the registers of 128 × 256 tiles).  The running max stays in dot units: each logit costs a
    subtraction and a multiply by log2(e)/τ before exp2."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * split_cols
    col_end = tl.minimum(K, col0 + split_cols)
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    tgt = _target(target_ptr, rows, N, HAS_TARGET)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    zy = tl.zeros([BLOCK_M], tl.float32)
    a_fixed = 0.0
    if RESIDENT:  # the rows' tile, read once for every column tile
        a_fixed = _load_tile(a_ptr, rows, N, D, stride_am, stride_ad, BLOCK_D, UPCAST)
    for n0 in range(col0, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        y = _dots_tile(a_ptr, b_ptr, bias_ptr, rows, cols, N, K, D, stride_am, stride_ad, stride_bk,
                       stride_bd, a_fixed, 0.0, HAS_BIAS, BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, RESIDENT,
                       False)
        hit = cols[None, :] == tgt[:, None]
        if HAS_TARGET and RESIDENT:
            zy += tl.sum(tl.where(hit, y, 0.0), 1)
        y = tl.where(_kept(rows, cols, K, hit, diag_offset, HAS_TARGET, MASK_DIAG), y, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing counted yet: no -inf - -inf
        s = s * tl.exp2((m - safe) * r2) + tl.sum(tl.exp2((y - safe[:, None]) * r2[:, None]), 1)
        m = m_new
    part = tl.program_id(1).to(tl.int64) * N  # this split's row of the partials
    tl.store(m_ptr + part + rows, m, mask=rows < N)
    tl.store(s_ptr + part + rows, s, mask=rows < N)
    if HAS_TARGET and RESIDENT:
        tl.store(zy_ptr + part + rows, zy, mask=rows < N)


@triton.jit
def _merge_partials(m, s, m_part_ptr, s_part_ptr, offs, mask, r2):
    """(m, s) after one block of splits' partials (a [splits, rows] tile at ``offs``) merged into it:
    m' = max(m, max_k m_k), s' = s exp((m - m')/τ) + Σ_k s_k exp((m_k - m')/τ), the online update of
    one program walking the splits in order (dot units; r2 = log2(e)/τ per row)."""
    m_k = tl.load(m_part_ptr + offs, mask=mask, other=float("-inf"))
    s_k = tl.load(s_part_ptr + offs, mask=mask, other=0.0)
    m_new = tl.maximum(m, tl.max(m_k, 0))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no column counted: s = 0, not NaN
    s = s * tl.exp2((m - safe) * r2) + tl.sum(s_k * tl.exp2((m_k - safe[None, :]) * r2[None, :]), 0)
    return m_new, s


@triton.jit
def _row_tau(tau_ptr, rows, N, TAU_PER_ROW: tl.constexpr):
    """τ of each row in fp32 (padding rows read 1)."""
    if TAU_PER_ROW:
        return tl.load(tau_ptr + rows, mask=rows < N, other=1.0).to(tl.float32)
    return tl.zeros([rows.shape[0]], tl.float32) + tl.load(tau_ptr).to(tl.float32)


@triton.jit
def _tile_combine_kernel(
    # pointers: (splits, N) fp32 partials of the forward; a, key and bias (POSITIVE 2 and 3); stats
    # (TILE_STATS_POS or TILE_STATS_LSE, N) fp32, the results
    tau_ptr, m_part_ptr, s_part_ptr, zy_part_ptr, a_ptr, key_ptr, bias_ptr, target_ptr, stats_ptr,
    N, K, D, splits, stride_am, stride_ad, stride_km, stride_kd,
    POSITIVE: tl.constexpr, HAS_BIAS: tl.constexpr, TAU_PER_ROW: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row: the forward's splits merged in split order (_merge_partials), SPLITS_BLOCK splits a
    step (one step for every plan of split_plan up to SPLITS_BLOCK splits), into the TILE_* rows of
    stats: m = max_k m_k and s = Σ_k s_k exp((m_k - m)/τ).  With a positive (POSITIVE 1: y at the
    target column, the sum of the splits' partials, one of which holds it; 2: a_i · key_i in fp32;
    3: y at the target column as a_i · key_{t_i} + bias_{t_i} in fp32, 0 for a target outside [0, K)),
    the softmax over [positive, counted columns] as the losses need it (_infonce_row):
    pos, nll = softplus(log s + (m - pos)/τ), shift = max(m, pos), e_pos = exp((pos - shift)/τ) and
    e_rest = s exp((m - shift)/τ)."""
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
            rows64 = rows.to(tl.int64)
            krow64 = krow.to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dd64 = dd.to(tl.int64)
                dmask = live[:, None] & (dd[None, :] < D)
                q = tl.load(a_ptr + rows64[:, None] * stride_am + dd64[None, :] * stride_ad, mask=dmask, other=0.0)
                kk = tl.load(key_ptr + krow64[:, None] * stride_km + dd64[None, :] * stride_kd,
                             mask=dmask & k_live[:, None], other=0.0)
                pos += tl.sum(q.to(tl.float32) * kk.to(tl.float32), 1)
            if HAS_BIAS:
                pos += tl.load(bias_ptr + krow, mask=k_live, other=0.0).to(tl.float32)
        nll, shift, e_pos, e_rest = _infonce_row(m, s, pos, _row_tau(tau_ptr, rows, N, TAU_PER_ROW))
        tl.store(stats_ptr + 2 * N + rows, pos, mask=live)  # TILE_POS
        tl.store(stats_ptr + 3 * N + rows, nll, mask=live)  # TILE_NLL
        tl.store(stats_ptr + 4 * N + rows, shift, mask=live)  # TILE_SHIFT
        tl.store(stats_ptr + 5 * N + rows, e_pos, mask=live)  # TILE_E_POS
        tl.store(stats_ptr + 6 * N + rows, e_rest, mask=live)  # TILE_E_REST


@triton.jit
def _infonce_row(m, s, pos, tau):
    """(nll, shift, e_pos, e_neg) of one softmax over [positive, negatives] from the negatives' (m, s) and
    the positive's dot product (dot units): nll = softplus(log s + (m - pos)/τ) (exact when tiny; NaN where
    a logit is +inf, as the composition's inf - inf), shift = max(m, pos), e_pos = exp((pos - shift)/τ),
    e_neg = s exp((m - shift)/τ): p_pos = e_pos / (e_pos + e_neg) and 1 - p_pos = e_neg / (e_pos + e_neg),
    each with full relative precision."""
    x = tl.log(s) + (m - pos) / tau
    nll = tl.where(x > 20.0, x, log1p(tl.exp(x)))  # F.softplus (threshold 20)
    nll = tl.where(tl.maximum(m, pos) == float("inf"), float("nan"), nll)
    shift = tl.maximum(m, pos)
    return nll, shift, tl.exp((pos - shift) / tau), s * tl.exp((m - shift) / tau)


@triton.jit
def _tile_bwd_da_kernel(
    # pointers; da (splits, N, D) and zp (splits, N) are fp32 partials (the outputs for one split)
    a_ptr, b_ptr, bias_ptr, tau_ptr, target_ptr, shift_ptr, scale_ptr, ref_ptr, da_ptr, zp_ptr,
    # shapes; program (i-block, do-block, split) walks the columns [split · split_cols, + split_cols)
    N, K, D, diag_offset, split_cols,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, NEED_ZP: tl.constexpr,
    TAU_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr,
):
    """da[rows, do] = Σ_j Q_ij b[j, do] and zp_i = Σ_j (y_ij - ref_i) Q_ij over the split's columns."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    split = tl.program_id(2)
    col0 = split * split_cols
    col_end = tl.minimum(K, col0 + split_cols)
    r2, shift, u, tgt = _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, HAS_TARGET, TAU_PER_ROW)
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
    # shapes; program (j-block, do-block, split) walks the rows [split · split_rows, + split_rows)
    N, K, D, diag_offset, split_rows,
    # strides
    stride_am, stride_ad, stride_bk, stride_bd,
    # constants
    HAS_BIAS: tl.constexpr, HAS_TARGET: tl.constexpr, MASK_DIAG: tl.constexpr, TAU_PER_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr,
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
        r2, shift, u, tgt = _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, HAS_TARGET,
                                           TAU_PER_ROW)
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
    r2, shift, u, tgt = _row_constants(tau_ptr, shift_ptr, scale_ptr, target_ptr, rows, N, HAS_TARGET, TAU_PER_ROW)
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


# ---------------------------------------------------------------------------- CLIP in one pass
# clip_loss = (infonce(a, b) + infonce(b, a)) / 2 from one N × N matrix y = a @ b.T: row i's softmax
# (a -> b) and column j's (b -> a, whose row j is y's column j: b_j · a_i = y_ij), positives on the
# diagonal.  The forward's tiles feed both: each row's online (m, s) over its split of the columns and
# each column's (m, s) over the program's row block, partials merged by _clip_combine_kernel (rows in
# split order, columns in row-block order: deterministic).  The backward's tiles give
# G_ij = Qr_ij + Qc_ij off the diagonal (Qr = u_i exp((y - c_i)/τ_i) the rows', Qc = v_j exp((y - c'_j)/τ_j)
# the columns') and the two positives' g (p - 1)/τ on it, so that da = G @ b and db = Gᵀ @ a.
# The per-index statistics: the CLIP_* rows of a (CLIP_STATS, N) tensor (kernels/__init__.py).


@triton.jit
def _clip_fwd_kernel(
    # pointers: m_r, s_r, zy (splits, N) fp32 row partials; m_c, s_c (row blocks, N) fp32 column partials
    a_ptr, b_ptr, tau_ptr, m_r_ptr, s_r_ptr, zy_ptr, m_c_ptr, s_c_ptr,
    N, D, split_cols,
    stride_am, stride_ad, stride_bk, stride_bd,
    TAU_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESIDENT: tl.constexpr,
):
    """One (row block, split of the columns) of y = a @ b.T (both N × D), in dot units, over the
    off-diagonal entries: per row m = max y, s = Σ exp((y - m)/τ_i) and y_ii (0 where the diagonal is
    in another split); per column j of the split, over the block's rows, m = max y and
    s = Σ exp((y - m)/τ_j).  Each logit costs a subtraction, a multiply and an exp2 per direction."""
    rb = tl.program_id(0)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * split_cols
    col_end = tl.minimum(N, col0 + split_cols)
    r2 = _exp2_scale(tau_ptr, rows, N, TAU_PER_ROW)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    zy = tl.zeros([BLOCK_M], tl.float32)
    a_fixed = 0.0
    if RESIDENT:  # the rows' tile, read once for every column tile
        a_fixed = _load_tile(a_ptr, rows, N, D, stride_am, stride_ad, BLOCK_D, UPCAST)
    col_part = rb.to(tl.int64) * N  # this row block's row of the column partials
    for n0 in range(col0, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        y = _dots_tile(a_ptr, b_ptr, 0, rows, cols, N, N, D, stride_am, stride_ad, stride_bk, stride_bd,
                       a_fixed, 0.0, False, BLOCK_D, UPCAST, PRECISION, BLOCK_M, BLOCK_N, RESIDENT, False)
        diag = cols[None, :] == rows[:, None]
        zy += tl.sum(tl.where(diag, y, 0.0), 1)
        y = tl.where((cols[None, :] < N) & (rows[:, None] < N) & ~diag, y, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing counted yet: no -inf - -inf
        s = s * tl.exp2((m - safe) * r2) + tl.sum(tl.exp2((y - safe[:, None]) * r2[:, None]), 1)
        m = m_new
        # the columns' share over this block of rows, complete (one program sees each (row block, column))
        r2c = _exp2_scale(tau_ptr, cols, N, TAU_PER_ROW)
        m_c = tl.max(y, 0)
        safe_c = tl.where(m_c == float("-inf"), 0.0, m_c)
        s_c = tl.sum(tl.exp2((y - safe_c[None, :]) * r2c[None, :]), 0)
        tl.store(m_c_ptr + col_part + cols, m_c, mask=cols < col_end)
        tl.store(s_c_ptr + col_part + cols, s_c, mask=cols < col_end)
    part = tl.program_id(1).to(tl.int64) * N  # this split's row of the row partials
    tl.store(m_r_ptr + part + rows, m, mask=rows < N)
    tl.store(s_r_ptr + part + rows, s, mask=rows < N)
    tl.store(zy_ptr + part + rows, zy, mask=rows < N)


@triton.jit
def _clip_combine_kernel(
    tau_ptr, m_r_ptr, s_r_ptr, zy_ptr, m_c_ptr, s_c_ptr, stats_ptr,
    N, splits, row_blocks,
    TAU_PER_ROW: tl.constexpr, SPLITS_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per index k: the row's partials merged over the splits, the column's over the row blocks (each in
    order, SPLITS_BLOCK a step: _merge_partials), and from them both directions' nll and the backward's
    constants (the CLIP_* rows of stats): loss = (nll_r + nll_c)/2, the shifts c,
    w = 1/(2N τ (e_pos + e_neg)) (Q = g w exp((y - c)/τ) for the incoming gradient g of the mean over
    the N indices), the diagonal's dpos = -(w_r e_neg_r + w_c e_neg_c), and the positive's y_kk."""
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
        pos += tl.sum(tl.load(zy_ptr + offs, mask=mask, other=0.0), 0)
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


# ---------------------------------------------------------------------------- launchers

def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(a):
    if a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _config(a, kernel="fwd"):
    """tile_config for the operands ``a`` (N, D) on their device."""
    return tile_config(arch_of(a.device), a.dtype, a.shape[1], kernel)


def _common(a, b, bias, tau, target, diag_offset, cfg):
    return dict(HAS_BIAS=bias is not None, HAS_TARGET=target is not None, MASK_DIAG=diag_offset is not None,
                TAU_PER_ROW=tau.numel() != 1, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_D=cfg["BLOCK_D"], UPCAST=_interpreted(), PRECISION=_precision(a), num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _block_do(D, cfg):
    return min(max(triton.next_power_of_2(D), 16), cfg["BLOCK_DO"])


def sm_count(device):
    """The SMs the grid should fill: the device's on CUDA, SM_COUNT_OFF_GPU elsewhere (the interpreter)."""
    p = cuda_properties(device)
    return p.multi_processor_count if p is not None else SM_COUNT_OFF_GPU


def split_plan(programs, tiles, sms, max_splits=None):
    """(splits, tiles per split) for a grid of ``programs`` programs that each walk ``tiles`` tiles.

    Time is taken as waves × (tiles per program + PROGRAM_OVERHEAD_TILES), waves =
    ceil(programs · splits / sms), one 8-warp tile program per SM (python -m bench.model: 1-2
    resident a SM): the fewest splits that reach the least time, each of at least
    MIN_TILES_PER_SPLIT tiles and at most ``max_splits`` of them.  On 132 SMs with the sm_90 table's
    128-row tiles: MoCo N = 256, K = 65536 (2 row blocks × 1024 column tiles of 64) -> 64 splits of 16
    tiles, 128 programs; N = 4096 (32 row blocks) -> 4 splits, 128 programs; the LLM head N = 8192,
    V = 128256 (64 row blocks × 501 column tiles of 256) -> 2 splits."""
    return _split_plan(programs, tiles, sms, MIN_TILES_PER_SPLIT, PROGRAM_OVERHEAD_TILES, max_splits)


@functools.lru_cache(maxsize=4096)
def _split_plan(programs, tiles, sms, min_tiles, overhead, max_splits):
    if tiles <= 0 or programs <= 0:
        return 1, max(tiles, 0)
    most = max(1, tiles // max(min_tiles, 1))
    if max_splits is not None:
        most = max(1, min(most, max_splits))
    best = (triton.cdiv(programs, sms) * (tiles + overhead), 1, tiles)
    for want in range(2, most + 1):
        per = triton.cdiv(tiles, want)
        splits = triton.cdiv(tiles, per)
        time = triton.cdiv(programs * splits, sms) * (per + overhead)
        if time < best[0]:
            best = (time, splits, per)
    return best[1], best[2]


def _partial_cap(output_elements):
    """The most splits whose fp32 partial sums of an output of this size stay within PARTIAL_ELEMENTS."""
    return max(1, PARTIAL_ELEMENTS // max(output_elements, 1))


def _time_call(call, device):
    """Seconds one call takes (CUDA: triton's do_bench, median of repeats)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(call, return_mode="median") * 1e-3
    import time
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _autotuned(op, a, call):
    """call() under the table's configuration, or with FUSED_TAU_TILE_AUTOTUNE=1 under the fastest of
    AUTOTUNE_CANDIDATES for (op, arch, operand kind, D-bin), timed on the first call (each call
    overwrites its outputs whole: repeating them is harmless).  A candidate that fails to compile or
    launch (out of shared memory or registers) is skipped."""
    global _OVERRIDE
    if os.environ.get(AUTOTUNE_ENV, "0") != "1" or _OVERRIDE:
        return call()
    key = (op, arch_of(a.device), "32" if a.dtype == torch.float32 else "16", d_bin(a.shape[1]))
    if key not in _TUNED:
        best = (float("inf"), {})
        for cand in AUTOTUNE_CANDIDATES:
            _OVERRIDE = dict(cand)
            try:
                call()  # compile outside the timing
                seconds = _time_call(call, a.device)
            except Exception:  # noqa: BLE001 - triton's OutOfResources and compile errors vary by version
                continue
            finally:
                _OVERRIDE = {}
            if seconds < best[0]:
                best = (seconds, cand)
        _TUNED[key] = best[1]
    _OVERRIDE = dict(_TUNED[key])
    try:
        return call()
    finally:
        _OVERRIDE = {}


def tile_fwd(a, b, bias, tau, target, diag_offset, key, stats):
    """Writes tile_fwd's statistics into ``stats``: see _tile_fwd (FUSED_TAU_TILE_AUTOTUNE: _autotuned)."""
    _autotuned("fwd", a, lambda: _tile_fwd(a, b, bias, tau, target, diag_offset, key, stats))


def _splits_block(splits):
    return min(max(triton.next_power_of_2(splits), 2), COMBINE_SPLITS)


def _tile_fwd(a, b, bias, tau, target, diag_offset, key, stats):
    """Writes per row of ``a``, in dot units y = a·b + bias over the counted columns (see the module
    docstring), the fp32 rows TILE_* of ``stats``, (TILE_STATS_POS, N) when the rows have a positive, the
    target's y (``target``) or a_i · key_i (``key``, (N, D)), else (TILE_STATS_LSE, N): m = max y,
    s = Σ exp((y - m)/τ), and with a positive pos, nll, shift, e_pos, e_rest (_tile_combine_kernel).
    ``tau``: one element, or one per row of ``a``.  Two launches: the tiles, the combine."""
    N, D = a.shape
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    cfg = _config(a)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_blocks = triton.cdiv(N, BLOCK_M)
    splits, per = split_plan(row_blocks, triton.cdiv(K, BLOCK_N), sm_count(a.device))
    # the positive: the target's y from the tiles (resident row tile), from b's target row, or a_i · key_i
    positive = (1 if cfg["RESIDENT"] else 3) if target is not None else 2 if key is not None else 0
    m_part, s_part = torch.empty((splits, N), **f32), torch.empty((splits, N), **f32)
    zy_part = torch.empty((splits, N), **f32) if positive == 1 else m_part
    common = _common(a, b, bias, tau, target, diag_offset, cfg)
    _tile_fwd_kernel[(row_blocks, splits)](
        a, b, bias if bias is not None else m_part, tau, target if target is not None else m_part, m_part, s_part,
        zy_part, N, K, D, diag_offset or 0, per * BLOCK_N, *a.stride(), *b.stride(),
        RESIDENT=cfg["RESIDENT"], **common,
    )
    key = b if positive == 3 else key if key is not None else a
    _tile_combine_kernel[(triton.cdiv(N, COMBINE_BLOCK),)](
        tau, m_part, s_part, zy_part, a, key, bias if bias is not None else m_part,
        target if target is not None else m_part, stats, N, K, D, splits, *a.stride(), *key.stride(),
        POSITIVE=positive, HAS_BIAS=positive == 3 and bias is not None, TAU_PER_ROW=common["TAU_PER_ROW"],
        SPLITS_BLOCK=_splits_block(splits),
        BLOCK=COMBINE_BLOCK, BLOCK_D=min(triton.next_power_of_2(D), 64), num_warps=4,
    )


def _split_parts(out, splits, shape):
    """Where a kernel writes its (splits, *shape) fp32 partial sums of ``out`` (None: not wanted): ``out``
    itself when there is one split and it is fp32, else a scratch that _sum_parts reduces into it."""
    if out is None:
        return None
    if splits == 1 and out.dtype == torch.float32:
        return out.unsqueeze(0)
    return torch.empty((splits, *shape), device=out.device, dtype=torch.float32)


def _sum_parts(parts, out):
    """out = the sum of the partials over the splits (fixed order), rounded once to out's dtype."""
    if out is None or parts.data_ptr() == out.data_ptr():
        return
    if parts.shape[0] == 1:
        out.copy_(parts[0])
    elif out.dtype == torch.float32:
        torch.sum(parts, 0, out=out)
    else:
        out.copy_(parts.sum(0))


def tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp):
    """Writes (da, db, dbias, zp): see _tile_bwd (FUSED_TAU_TILE_AUTOTUNE: _autotuned)."""
    _autotuned("bwd", a, lambda: _tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp))


def _tile_bwd(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp):
    """Writes da in a's dtype, db in b's dtype, dbias fp32 and zp fp32 (each None when not wanted; dbias
    only with db and a bias), for Q_ij = scale_i exp((y_ij - shift_i) / τ_i) over the counted columns and
    zp_i = Σ_j (y_ij - ref_i) Q_ij (shift and ref in dot units).  The splits' partial sums are added
    by torch reductions over the split dimension (fixed order: deterministic)."""
    N, D = a.shape
    shift = shift.to(torch.float32).contiguous()
    scale = scale.to(torch.float32).contiguous()
    ref = ref.to(torch.float32).contiguous()
    bdo = _block_do(D, _config(a, "da"))
    if _materialized(D, bdo, a, b):
        _tile_bwd_materialized(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp,
                               _config(a, "probs"))
        return
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    strides = (*a.stride(), *b.stride())
    sms = sm_count(a.device)
    need_da, need_zp = da is not None, zp is not None
    if need_da or need_zp:
        cfg = _config(a, "da")
        common = _common(a, b, bias, tau, target, diag_offset, cfg)
        BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
        row_blocks, do_blocks = triton.cdiv(N, BLOCK_M), triton.cdiv(D, bdo)
        splits, per = split_plan(row_blocks * do_blocks, triton.cdiv(K, BLOCK_N), sms, _partial_cap(N * D))
        da_part = _split_parts(da, splits, (N, D)) if need_da else torch.empty((splits, N, D), **f32)
        zp_part = _split_parts(zp, splits, (N,))
        _tile_bwd_da_kernel[(row_blocks, do_blocks, splits)](
            a, b, bias if bias is not None else shift, tau, target if target is not None else shift, shift, scale,
            ref, da_part, zp_part if zp_part is not None else shift, N, K, D, diag_offset or 0, per * BLOCK_N,
            *strides, NEED_ZP=need_zp, BLOCK_DO=bdo, RESIDENT=cfg["RESIDENT"], **common,
        )
        _sum_parts(da_part, da)
        _sum_parts(zp_part, zp)
    if db is not None:
        cfg = _config(a, "db")
        common = _common(a, b, bias, tau, target, diag_offset, cfg)
        BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
        col_blocks, do_blocks = triton.cdiv(K, BLOCK_N), triton.cdiv(D, bdo)
        splits, per = split_plan(col_blocks * do_blocks, triton.cdiv(N, BLOCK_M), sms, _partial_cap(K * D))
        db_part = _split_parts(db, splits, (K, D))
        dbias_part = _split_parts(dbias, splits, (K,))
        _tile_bwd_db_kernel[(col_blocks, do_blocks, splits)](
            a, b, bias if bias is not None else shift, tau, target if target is not None else shift, shift, scale,
            db_part, dbias_part if dbias_part is not None else shift, N, K, D, diag_offset or 0, per * BLOCK_M,
            *strides, BLOCK_DO=bdo, RESIDENT=cfg["RESIDENT"], **common,
        )
        _sum_parts(db_part, db)
        _sum_parts(dbias_part, dbias)


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


def _tile_bwd_materialized(a, b, bias, tau, target, diag_offset, shift, scale, ref, da, db, dbias, zp, cfg):
    """Chunks of columns: ds = Q = P / τ (N × chunk, in the operands' dtype, fp32 for fp32) from one
    recomputation of the tiles, then db[chunk] = dsᵀ @ a (complete: one GEMM over all rows) and
    da += ds @ b[chunk] (fp32, in chunk order: deterministic).  Chunking the columns, not the rows,
    makes the running sum the (N, D) da rather than the (K, D) db, which is far larger for an LLM
    head.  FLOPs 6·N·K·D whatever D; extra memory one chunk, about max(N·D,
    MATERIALIZED_CHUNK_ELEMENTS) elements, and da's fp32 sum."""
    N, D = a.shape
    K = b.shape[0]
    f32 = dict(device=a.device, dtype=torch.float32)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    width = max(N * D, MATERIALIZED_CHUNK_ELEMENTS) // max(N, 1)
    width = min(K, max(BLOCK_N, width // BLOCK_N * BLOCK_N))
    common = _common(a, b, bias, tau, target, diag_offset, cfg)
    need_da, need_db, need_zp = da is not None, db is not None, zp is not None
    ds_buf = torch.empty(N * width, device=a.device, dtype=a.dtype)
    zp_buf = torch.empty(N * triton.cdiv(width, BLOCK_N), **f32) if need_zp else shift
    row_blocks = triton.cdiv(N, BLOCK_M)
    dbias_buf = torch.empty(row_blocks * width, **f32) if need_db and bias is not None else shift
    single = width >= K
    # several chunks sum da in fp32 (into da itself when it is fp32)
    da_sum = None if single or not need_da else da.zero_() if da.dtype == torch.float32 else torch.zeros((N, D), **f32)
    if need_zp:
        zp.zero_()
    for c0 in range(0, K, width):
        c1 = min(K, c0 + width)
        n_blocks = triton.cdiv(c1 - c0, BLOCK_N)
        ds = ds_buf[:N * (c1 - c0)].view(N, c1 - c0)
        _tile_bwd_probs_kernel[(row_blocks * n_blocks,)](
            a, b, bias if bias is not None else shift, tau, target if target is not None else shift, shift, scale, ref,
            ds, zp_buf, dbias_buf, N, c0, c1, D, diag_offset or 0, *a.stride(), *b.stride(),
            NEED_ZP=need_zp, INTERPRETED=_interpreted(), GROUP_M=GROUP_M, **common,
        )
        if need_da:
            if single:
                torch.mm(ds, b, out=da)
            else:
                accumulate_mm(da_sum, ds, b[c0:c1])
        if need_db:
            torch.mm(ds.t(), a, out=db[c0:c1])
            if dbias is not None:
                dbias[c0:c1] = dbias_buf[:row_blocks * (c1 - c0)].view(row_blocks, c1 - c0).sum(0)
        if need_zp:
            zp += zp_buf[:N * n_blocks].view(N, n_blocks).sum(1)
    if da_sum is not None and da_sum is not da:
        da.copy_(da_sum)


def clip_fwd(a, b, tau, stats):
    """CLIP's forward in one pass over y = a @ b.T (a, b both (N, D)): writes the (CLIP_STATS, N) fp32
    statistics (CLIP_LOSS: (nll_r + nll_c)/2 per index, whose mean is clip_loss; the rest the
    backward's, see _clip_combine_kernel).  ``tau``: one element, or one per index (row i of a -> b
    and row i of b -> a take τ_i)."""
    N, D = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    cfg = _config(a, "clip")
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_blocks = triton.cdiv(N, BLOCK_M)
    splits, per = split_plan(row_blocks, triton.cdiv(N, BLOCK_N), sm_count(a.device))
    m_r, s_r, zy = (torch.empty((splits, N), **f32) for _ in range(3))
    m_c, s_c = torch.empty((row_blocks, N), **f32), torch.empty((row_blocks, N), **f32)
    tau_per_row = tau.numel() != 1
    _clip_fwd_kernel[(row_blocks, splits)](
        a, b, tau, m_r, s_r, zy, m_c, s_c, N, D, per * BLOCK_N, *a.stride(), *b.stride(),
        TAU_PER_ROW=tau_per_row, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=cfg["BLOCK_D"], UPCAST=_interpreted(),
        PRECISION=_precision(a), RESIDENT=cfg["RESIDENT"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _clip_combine_kernel[(triton.cdiv(N, COMBINE_BLOCK),)](
        tau, m_r, s_r, zy, m_c, s_c, stats, N, splits, row_blocks,
        TAU_PER_ROW=tau_per_row, SPLITS_BLOCK=_splits_block(max(splits, row_blocks)), BLOCK=COMBINE_BLOCK, num_warps=4,
    )


def clip_bwd(a, b, tau, stats, g, da, db, zp):
    """Writes da in a's dtype, db in b's dtype and zp fp32 (each None when not wanted), for
    G = g (Qr + Qc) off the diagonal and g·dpos on it (clip_fwd's statistics, ``g`` the incoming
    gradient, one element): da = G @ b, db = Gᵀ @ a, zp_k = Σ_j (y_kj - y_kk) Qr_kj + Σ_i (y_ik - y_kk) Qc_ik
    (so that dL/dτ_k = -zp_k / τ_k).  Chunks of columns as the materialized backward
    (_tile_bwd_materialized): one recomputation of each tile, ds = G written once a chunk, two GEMMs
    (db's chunk complete, da summed in chunk order in fp32 when there are several); each program walks
    a split of the rows for one block of columns (split_plan); the partial sums are added in a fixed
    order: no atomics."""
    N, D = a.shape
    f32 = dict(device=a.device, dtype=torch.float32)
    bdo = _block_do(D, _config(a, "da"))
    if _clip_fused(D, bdo, a):
        _clip_bwd_fused(a, b, tau, stats, g, da, db, zp, bdo)
        return
    need_da, need_db, need_zp = da is not None, db is not None, zp is not None
    cfg = _config(a, "probs")
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    width = max(N * D, MATERIALIZED_CHUNK_ELEMENTS) // max(N, 1)
    width = min(N, max(BLOCK_N, width // BLOCK_N * BLOCK_N))
    splits, per = split_plan(triton.cdiv(width, BLOCK_N), triton.cdiv(N, BLOCK_M), sm_count(a.device))
    ds_buf = torch.empty(N * width, device=a.device, dtype=a.dtype)
    zp_r_buf = torch.empty(N * triton.cdiv(width, BLOCK_N), **f32) if need_zp else stats
    zp_c_buf = torch.empty(splits * width, **f32) if need_zp else stats
    single = width >= N
    # several chunks sum da in fp32 (into da itself when it is fp32)
    da_sum = None if single or not need_da else da.zero_() if da.dtype == torch.float32 else torch.zeros((N, D), **f32)
    if need_zp:
        zp.zero_()
    for c0 in range(0, N, width):
        c1 = min(N, c0 + width)
        n_blocks = triton.cdiv(c1 - c0, BLOCK_N)
        ds = ds_buf[:N * (c1 - c0)].view(N, c1 - c0)
        _clip_bwd_probs_kernel[(n_blocks, splits)](
            a, b, tau, stats, g, ds, zp_r_buf, zp_c_buf, N, c0, c1, D, per * BLOCK_M, *a.stride(), *b.stride(),
            NEED_ZP=need_zp, TAU_PER_ROW=tau.numel() != 1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=cfg["BLOCK_D"],
            UPCAST=_interpreted(), PRECISION=_precision(a), INTERPRETED=_interpreted(), RESIDENT=cfg["RESIDENT"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if need_da:
            if single:
                torch.mm(ds, b, out=da)
            else:
                accumulate_mm(da_sum, ds, b[c0:c1])
        if need_db:
            torch.mm(ds.t(), a, out=db[c0:c1])
        if need_zp:
            zp += zp_r_buf[:N * n_blocks].view(N, n_blocks).sum(1)
            zp[c0:c1] += zp_c_buf[:splits * (c1 - c0)].view(splits, c1 - c0).sum(0)
    if da_sum is not None and da_sum is not da:
        da.copy_(da_sum)


def _clip_fused(D, bdo, a):
    """clip_bwd's route: fused for 16-bit operands with D <= BLOCK_DO; the chunks of ds beyond, and for
    fp32 (its fused kernel spills at D = 64: 192 bytes on sm_80); MATERIALIZED_BWD forces one (tests)."""
    if MATERIALIZED_BWD != "auto":
        return MATERIALIZED_BWD == "fused"
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
    splits, per = split_plan(row_blocks * do_blocks, triton.cdiv(N, BLOCK_N), sm_count(a.device), _partial_cap(N * D))
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
