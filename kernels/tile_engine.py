"""Tile engine core: ``z = (a @ b.T + bias) / τ`` streamed tile by tile into an online log-sum-exp
(flash-attention style); the N × K logits are never stored, forward or backward.  This module holds
what the engine's kernels share: the tile table (``tile_config``), the split of the long dimension
(``split_plan``), the opt-in autotuning, the @triton.jit helpers of a tile (its dot products, the
columns that count, log2(e)/τ, the merge of split partials, the softmax over [positive, negatives])
and the launchers' common arguments.  The kernels and their launchers: ``tile_fwd`` (the forward and
its combine), ``tile_bwd`` (the backward's fused and materialized routes), ``tile_clip`` (clip_loss in
one pass); ``tile`` gathers their launchers for fused_tau's dispatch.

Everything is kept in dot units y = a·b + bias (before 1/τ): the running max, the shift of the
backward, the τ-gradient's sum.  A logit enters exp only as a difference of dot products times
one per-row constant, log2(e)/τ rounded once: exp((y - c)/τ) = exp2((y - c)·log2(e)/τ).  So at
small τ exp never sees the difference of two numbers of magnitude 1/τ (an exact tie gives exp2(0)
= 1 exactly), and at large τ the shifted logits stay small (no cancellation of log K against the
positive in dL/dτ).  No division per logit: per logit the forward's epilogue is a subtraction, a
multiply by log2(e)/τ, MUFU.EX2, its share of the max and of the sum, and one select per kind of
excluded column (beyond the last column, the target, the diagonal); padding rows are not masked.
Per row i the columns that count are j < K, j ≠ t_i the row's target, j ≠ i + diag_offset when
self-similarity is excluded (``_kept``).

The grid does not depend on N alone (flash-decoding): the long dimension each program walks (the
columns for the forward and da, the rows for db) is cut into ``splits`` ranges of whole tiles,
chosen by ``split_plan`` from the number of programs, the number of tiles and the SM count.  Each
program writes partial statistics (m, s, y_target) or partial sums (da, zp, db, dbias) for its
range; the forward's combine merges (m, s) in split order (``_merge_partials``), and the backward's
partial sums are summed over the splits by one torch reduction (``_sum_parts``): no atomics, the
same bits on every run.  MoCo N = 256, K = 65536 on 132 SMs: 4 programs walking 1024 tiles each
became 128 walking 16.

τ is one element (every row) or one per row (``TAU_PER_ROW``), as the row engine takes it: the
callers never materialise an N-vector.  log2(e)/τ is an IEEE division once per row (once per
program for one τ), never per logit.

fp32 inputs multiply in IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set;
fp16 / bf16 multiply on tensor cores with fp32 accumulation.  Interpreter trap (Triton 3.9,
checked): ``tl.dot`` on bf16 operands returns garbage under TRITON_INTERPRET=1, so UPCAST
(set only there) multiplies in fp32.

Tests and the performance model set this module's globals (BLOCK_CAP, SM_COUNT_OFF_GPU,
ARCH_OFF_GPU, MIN_TILES_PER_SPLIT, COMBINE_*, split_plan, sm_count): the other tile modules read them
through the module (``tile_engine.split_plan(...)``), so that a patched value reaches every launcher.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .tl_math import log1p


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
# compiles spill-free and fits on both (one exception, clip_loss's paired forward tiles: below the table);
# other architectures below sm_90 (sm_86 / sm_89: 99 KiB of shared memory a block) take sm_80's tiles
# with at most two stages.
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
    # clip_loss's probabilities with τ's gradient (zp per row and per column beside the tile) spilled 744 bytes
    # on sm_90 in 128 × 128 tiles: 128 × 64 ("probs_zp")
    TILE_CONFIGS[(_arch, "16", 512)] = dict(_BF16_LARGE, num_stages=3, probs_zp=dict(BLOCK_N=64))
    # the LLM head (D in the thousands, not resident): 128 × 256 output tiles halve the row tile's reads
    # through L2 against 128 × 128 (the forward's and the probabilities' limit in the model: 19.9 -> 15.3 ms
    # at 8192 × 128256 × 4096); 32-wide D-steps over 4 stages keep them spill-free on sm_90 and sm_80
    TILE_CONFIGS[(_arch, "16", 4096)] = dict(_BF16_LARGE, BLOCK_N=256, BLOCK_D=32, num_stages=4)
    for _bin in D_BINS:
        TILE_CONFIGS[(_arch, "32", _bin)] = dict(_FP32)
# clip_loss's forward on sm_90: paired 128 × 128 tiles (PAIR, kernels/tile_fwd.py; where no tile is ragged) read
# the row tile through L2 once for 256 columns (the forward's limit in the model: 40.1 -> 30.2 µs at 4096 × 512),
# in 16-wide D-steps, spill-free on sm_90 under Triton 3.9 and 3.6.  Not on sm_80: Triton 3.6 parks one value
# there (an 8-byte stack frame; 32-wide D-steps: 168 bytes under 3.9), so sm_80 keeps single tiles (the model
# runs the code as each architecture and compiles each one's own launch).
TILE_CONFIGS[(90, "16", 512)]["clip"] = dict(PAIR=2, BLOCK_D=16)
# infonce / NT-Xent's da at D = 128 on sm_90: 64-wide column tiles make it tensor-bound where 32-wide ones re-read
# the row tile from shared memory for every 64 × 32 wgmma (the kernel's limit in the model); sm_80 keeps 32 (an
# 8-byte stack frame there in the τ-gradient and clip variants)
TILE_CONFIGS[(90, "16", 128)]["da"] = dict(BLOCK_N=64)
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
# A combine that reduces the rows' losses (the mean or sum of infonce, nt_xent, clip_loss): its last
# program sums them COMBINE_REDUCE_BLOCK rows a step (8 a thread of 4 warps, row_ce_reduce's
# REDUCE_BLOCK): N = 4096 is 4 dependent steps of L2 reads after the others' tickets
COMBINE_REDUCE_BLOCK = 1024


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
    "da", "db", "probs", "probs_zp": clip_loss's with τ's gradient) picks the entry's overrides for that
    kernel."""
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
    return _load_dstep(ptr, idx.to(tl.int64), idx, n, tl.arange(0, BLOCK_D), D, stride_i, stride_d, False, UPCAST)


@triton.jit
def _load_dstep(ptr, idx64, idx, n, dd, D, stride_i, stride_d, EVEN: tl.constexpr, UPCAST: tl.constexpr):
    """ptr[idx, dd] as a (len(idx), len(dd)) tile: one D-step of the rows ``idx`` (``idx64`` the same, int64);
    rows >= n and features >= D read as 0 unless EVEN (neither can occur)."""
    ptrs = ptr + idx64[:, None] * stride_i + dd.to(tl.int64)[None, :] * stride_d
    if EVEN:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=(idx[:, None] < n) & (dd[None, :] < D), other=0.0)
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
            a = _load_dstep(a_ptr, rows64, rows, N, dd, D, stride_am, stride_ad, False, UPCAST)
            b = _load_dstep(b_ptr, cols64, cols, K, dd, D, stride_bk, stride_bd, False, UPCAST)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _row_dots(a_ptr, b_ptr, rows, krow, live, k_live, D, stride_am, stride_ad, stride_bk, stride_bd,
              BLOCK_D: tl.constexpr):
    """Σ_d a[rows, d] · b[krow, d] in fp32 (0 where ``live`` or ``k_live`` is False): the combines' positives
    formed from the rows (MoCo's a_i · key_i, a target's a_i · b_{t_i}, CLIP's diagonal a_k · b_k)."""
    acc = tl.zeros([rows.shape[0]], tl.float32)
    rows64 = rows.to(tl.int64)
    krow64 = krow.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dd64 = dd.to(tl.int64)
        dmask = live[:, None] & (dd[None, :] < D)
        q = tl.load(a_ptr + rows64[:, None] * stride_am + dd64[None, :] * stride_ad, mask=dmask, other=0.0)
        k = tl.load(b_ptr + krow64[:, None] * stride_bk + dd64[None, :] * stride_bd, mask=dmask & k_live[:, None],
                    other=0.0)
        acc += tl.sum(q.to(tl.float32) * k.to(tl.float32), 1)
    return acc


@triton.jit
def _dots_pair(a_ptr, b_ptr, rows, cols, N, K, D, stride_am, stride_ad, stride_bk, stride_bd,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, EVEN: tl.constexpr):
    """(a[rows] @ b[cols].T, a[rows] @ b[cols + BLOCK_N].T): two adjacent fp32 (BLOCK_M, BLOCK_N) tiles in dot
    units from one walk over D, each D-step's row tile loaded once for both (the L2 reads of a BLOCK_M ×
    2·BLOCK_N tile), while the caller's epilogue holds one tile's per-column statistics at a time.  EVEN:
    N, K and D are multiples of the blocks (no masks)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_next = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    cols_next = cols + BLOCK_N
    rows64, cols64, cols_next64 = rows.to(tl.int64), cols.to(tl.int64), cols_next.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        a = _load_dstep(a_ptr, rows64, rows, N, dd, D, stride_am, stride_ad, EVEN, UPCAST)
        b = _load_dstep(b_ptr, cols64, cols, K, dd, D, stride_bk, stride_bd, EVEN, UPCAST)
        b_next = _load_dstep(b_ptr, cols_next64, cols_next, K, dd, D, stride_bk, stride_bd, EVEN, UPCAST)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        acc_next = tl.dot(a, tl.trans(b_next), acc_next, input_precision=PRECISION)
    return acc, acc_next


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


# ---------------------------------------------------------------------------- launchers' common parts

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


def _splits_block(splits):
    """The combines' SPLITS_BLOCK: the partials of this many splits merged a step."""
    return min(max(triton.next_power_of_2(splits), 2), COMBINE_SPLITS)


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
