"""Row engine core: one program streams one row of logits in fp32, x / τ never divided per element.

Every tensor is seen as ``(A, C, B)``: ``C`` is the softmax dimension, row
``r = a * B + b``.  ``dim=-1`` is ``B = 1`` (Triton specialises the unit stride,
so loads vectorise); class-dim-1 inputs ``(N, C, d1, ...)`` are ``A = N``,
``B = d1 * ...`` read in place, without a transposed copy.

Forward kernels read the logits once (one online pass keeping per-lane
``(max, Σ others)``, see ``tl_math``) and save two fp32 numbers per row, in x units:
``M = max x`` and ``S = Σ_{j ≠ argmax} exp((x_j - M) / τ)`` (so lse(x / τ) = M / τ + log1p(S),
and τ·lse = M + τ log1p(S)).  Every exponent is formed as exp2((x - M)·c), c = log2(e)/τ rounded
once per row (``tl_math.exp2_scale``, with the error bound), and every z - M as (x - M)·(1/τ):
an IEEE division per element (~10 instructions) does not fit a memory-bound loop, and the
difference x - M is exact near the max where z - M is not.  The torch path
(fused_tau/_torch_ce.py) saves the same M.  Backward kernels
recompute probabilities from the logits and these two numbers and write the
gradient once; they also reduce the row's contribution to dL/dτ when τ needs
a gradient, from ``dL/dτ = -(1/τ) Σ_j z_j dL/dz_j = -(1/τ²) Σ_j (x_j - M) dL/dz_j`` (z = x / τ;
Σ_j dL/dz_j = 0), summed in x units: no rounding of x / τ at a large τ or a common offset.

Memory traffic (bytes of the logits dtype, R rows × C): cross-entropy forward
reads R·C, backward reads R·C and writes R·C; no R × C temporary exists.
Offsets are int64 (the row index is widened before any stride product).
"""
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import tile_engine
from .tl_math import gumbel_block

# Largest block a row is streamed in.  4096 fp32 lanes over 8 warps is 16
# registers a lane per live tensor: no spills on sm_80/sm_90 (tests/test_model.py).
MAX_BLOCK = 4096


# Few long rows: a row is split across programs when the rows alone would leave SMs idle, each
# program taking at least MIN_BLOCKS_PER_SPLIT blocks (tests lower it to 1 and shrink the blocks);
# the split count aims at PROGRAMS_PER_SM programs an SM.  The SM count is the device's on CUDA and
# kernels/tile_engine.py's SM_COUNT_OFF_GPU elsewhere (tests raise it; bench/model sets the H100's 132).
# Filling the SMs is not enough: a row loop waits for an iteration's loads before it issues the next's, so
# the programs in flight must hold DRAM's latency times its bandwidth in loads (Little's law, bench/model
# roofline.py: 600 ns × 4.3 TB/s ≈ 2.6 MB on an H200), INFLIGHT_BYTES, at one block a program, up to
# MAX_PROGRAMS_PER_SM: cross-entropy's 4-warp split programs read 4 KiB a block, and 2 an SM held 1 MB
# (64 × 256000 bf16 latency-bound at 41% of the H200's bandwidth in the model).
MIN_BLOCKS_PER_SPLIT = 4
PROGRAMS_PER_SM = 2
INFLIGHT_BYTES = 3 << 20
MAX_PROGRAMS_PER_SM = 8


def row_splits(n_rows, n_cols, block, device, block_bytes=0):
    """(splits, span): each of ``n_rows`` rows is taken by ``splits`` programs of ``span`` columns
    (a multiple of ``block``, the last one partial); (1, a span covering the row) when rows fill the
    SMs or a row is too short to split.  ``block_bytes``: the bytes a program loads a block, for the
    loads in flight (INFLIGHT_BYTES)."""
    n_blocks = triton.cdiv(n_cols, block)
    sms = tile_engine.sm_count(device)
    target = PROGRAMS_PER_SM * sms
    if block_bytes:
        target = max(target, min(triton.cdiv(INFLIGHT_BYTES, block_bytes), MAX_PROGRAMS_PER_SM * sms))
    splits = min(target // max(n_rows, 1), n_blocks // MIN_BLOCKS_PER_SPLIT)
    if splits < 2:
        return 1, max(n_blocks, 1) * block
    span = triton.cdiv(n_blocks, splits) * block
    return triton.cdiv(n_cols, span), span


# Tickets of a split row's programs (row_ce.py, row_sample.py): int32 counters, zero between launches (the
# last arriver, which the atomic elects, puts its counter back), one buffer a (device, stream) so that
# launches on two streams never share one; a buffer made while a CUDA graph is captured is the graph's own
# (its memory is the graph's pool) and is not kept.
_TICKETS = {}


def tickets(device, n):
    """An int32 buffer of at least ``n`` zeros for a kernel's tickets, kept for the next launch."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = None if capturing else _TICKETS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        if not capturing:
            _TICKETS[key] = buf
    elif interpreted():
        buf.zero_()  # an interpreted launch that raised half-way must not leave a ticket taken
    return buf


@triton.jit
def last_arrival(count_ptr, arrivals):
    """Takes a ticket at ``count_ptr`` once this program's stores are done: True for the last of the
    ``arrivals`` programs, which puts the ticket back to 0 for the next launch.  Memory order: a CTA
    barrier, then the atomic (acquire-release at GPU scope) publishes the program's stores; the last
    arriver reads the others' through L2 (``cache_modifier=".cg"``).  The ticket only elects which
    program goes on: what it computes must not depend on which one that is.  Under the interpreter
    programs run one after another: the grid's last program is elected."""
    tl.debug_barrier()  # every thread's stores before the ticket
    last = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    if last:
        tl.store(count_ptr, 0)
    return last


# A kernel that streams its row twice (cross-entropy's forward that also writes the gradient) reads it
# the second time from L2 only while the rows in flight fit there: about 32 resident warps an SM, i.e.
# ROWS_PER_SM 8-warp programs.  Off the GPU the L2 is the H100's (bench/model's target; tests lower it).
L2_BYTES_OFF_GPU = 50_000_000
ROWS_PER_SM = 4


def l2_bytes(device):
    """The L2's bytes: the device's on CUDA, L2_BYTES_OFF_GPU elsewhere."""
    p = tile_engine.cuda_properties(device)
    return p.L2_cache_size if p is not None else L2_BYTES_OFF_GPU


# Launch configuration of every row-engine pass, per architecture and pass kind (``row_launch``), from a
# fixed table: never keyed on the row count (the split of a long row across programs adapts to the rows,
# row_splits).  An entry:
#   max_block  the largest block a row is streamed in, in MAX_BLOCKs (4096 columns on the GPU; tests lower
#              MAX_BLOCK so that small rows cross block boundaries, and every kind's block shrinks with it);
#              a shorter row takes its power of two, at least 16 columns
#   warps      ((largest block, warps), ..., (None, warps)) for the block taken, or one count
#   num_stages Triton's pipelining depth (3, its default on CUDA)
#   elements_per_thread  at most this many columns a thread: more warps where the ladder gives fewer
#   chunk, runs  kd_loss: a lane (a thread) folds ``runs`` runs of ``chunk`` contiguous classes an
#              iteration; lanes = max_block's block / (2 × chunk), the kernel's block runs × lanes × chunk
#   long       the entry that replaces it for a row longer than its block: always ("past_block"), or
#              ("past_l2") when ROWS_PER_SM such rows an SM, ``col_bytes`` a column, overflow the L2
#   min_block  a floor under max_block's block when tests shrink MAX_BLOCK (2 where not given)
# sm_80 takes the same entries as sm_90 (the model compiles one launch, specialised with the sm_90 entry, for
# both targets, spill-free on each); architectures below sm_90 read sm_80's.
_ROW_WARPS = ((1024, 4), (4096, 8), (None, 16))
ROW_CONFIGS = {}
for _arch in (90, 80):
    # softmax / log_softmax forward, every backward that reads its rows once (ce_bwd, lse_bwd, softmax_bwd
    # with dL/dτ or one block), sample (its draw and its argmax); also the block every split is planned with.  4096 fp32 lanes
    # over 8 warps is 16 registers a lane per live tensor: no spills on sm_80/sm_90 (tests/test_model.py)
    ROW_CONFIGS[(_arch, "row")] = dict(max_block=1, warps=_ROW_WARPS, num_stages=3)
    # the Gumbel kernels (gumbel_softmax forward and its hard backward) draw a Philox
    # word per element: at 16 elements a thread the hard forward needs more registers than ptxas gives it
    # on sm_90 (8 bytes spilled, tests/test_aot.py); at most 8 a thread, with more warps (same block)
    ROW_CONFIGS[(_arch, "noisy")] = dict(max_block=1, warps=_ROW_WARPS, elements_per_thread=8, num_stages=3)
    # a kernel that streams each row twice (cross-entropy's forward that also writes the gradient; the
    # softmax backward over several blocks without dL/dτ: with it, the 32-warp program needs a stack frame
    # on sm_90): "row" while ROWS_PER_SM rows an SM fit in L2; longer rows take one 32-warp program an SM
    # (1024 threads, so one resident), a block of 8 elements a thread (128-bit loads of bf16, within the 64
    # registers a thread has there), and their rows in flight (one an SM) keep the second read in L2
    ROW_CONFIGS[(_arch, "reread")] = dict(max_block=1, warps=_ROW_WARPS, num_stages=3,
                                          long=dict(when="past_l2", max_block=2, warps=32, num_stages=3))
    # the same beside the weighted sums (A, D) of label smoothing / probability targets: half the lanes,
    # clear of sm_80's registers
    ROW_CONFIGS[(_arch, "reread_sums")] = dict(max_block=1 / 2, warps=_ROW_WARPS, num_stages=3,
                                               long=dict(when="past_l2", max_block=1, warps=32, num_stages=3))
    # a one-pass streamed reduction whose per-row finalize is a large share of its instructions
    # (cross-entropy's forward without the gradient): a row longer than a block runs "row"'s 16 elements a
    # thread over half the warps and half the block.  The ragged last block then wastes half as many lanes
    # and the finalize's cross-warp reductions span 4 warps, not 8: at C = 32000 on sm_90, 17.4 -> 14.7
    # instructions an element over the kernel (bench/NOTES.md), spill-free on sm_80 and sm_90.  A split
    # row's span is planned in these blocks (row_ce._fwd_plan)
    _stream_long = dict(when="past_block", max_block=1 / 2, warps=((512, 2), (2048, 4), (None, 8)), num_stages=3)
    ROW_CONFIGS[(_arch, "stream")] = dict(max_block=1, warps=_ROW_WARPS, num_stages=3, long=_stream_long)
    # the same for a split row with the weighted sums (A, D) combined in the same program: half the lanes
    # again (spill-free on sm_80, Triton 3.6, with fp32 logits)
    ROW_CONFIGS[(_arch, "stream_split_sums")] = dict(max_block=1, warps=_ROW_WARPS, num_stages=3,
                                                     long=dict(_stream_long, max_block=1 / 4, min_block=8,
                                                               warps=((256, 2), (1024, 4), (None, 8))))
    # kd_loss: fourteen per-lane accumulators, one lane a thread (kernels/row_kd_fwd.py): half the engine's
    # block (128 lanes over 4 warps, two runs of 8 classes a lane: 128-bit loads of bf16) is spill-free on sm_80
    # and sm_90 (python -m bench.model --variants); the backward streams half of it, 8 a thread (16 spill on
    # sm_80 with the target's and τ's terms)
    _kd_warps = ((512, 1), (1024, 2), (None, 4))
    ROW_CONFIGS[(_arch, "kd_fwd")] = dict(max_block=1 / 2, warps=_kd_warps, chunk=8, runs=2, num_stages=3)
    ROW_CONFIGS[(_arch, "kd_bwd")] = dict(max_block=1 / 2, warps=_kd_warps, chunk=8, runs=1, num_stages=3)
ROW_KINDS = ("row", "noisy", "reread", "reread_sums", "stream", "stream_split_sums", "kd_fwd", "kd_bwd")


class RowLaunch(NamedTuple):
    """A row kernel's launch configuration (``row_launch``): its BLOCK, whether the row fits one block
    (loaded once and kept in registers for the write pass), warps, stages, and kd_loss's lanes and chunk
    (0 for the others)."""
    block: int
    one_block: bool
    num_warps: int
    num_stages: int
    lanes: int = 0
    chunk: int = 0


def _warps(warps, block):
    if isinstance(warps, int):
        return warps
    return next(w for largest, w in warps if largest is None or block <= largest)


def _entry_launch(entry, n_cols):
    cap = max(int(MAX_BLOCK * entry["max_block"]), entry.get("min_block", 2))
    block = min(max(triton.next_power_of_2(n_cols), 16), cap)
    warps = _warps(entry["warps"], block)
    if entry.get("elements_per_thread"):
        warps = max(warps, block // (32 * entry["elements_per_thread"]))
    if "chunk" not in entry:
        return RowLaunch(block, n_cols <= block, warps, entry["num_stages"])
    chunk = min(entry["chunk"], max(block // 4, 1))
    lanes = block // (2 * chunk)
    return RowLaunch(entry["runs"] * lanes * chunk, n_cols <= block, warps, entry["num_stages"], lanes, chunk)


def row_launch(kind, n_cols, device, col_bytes=0):
    """The launch configuration (a RowLaunch) of a row kernel of pass ``kind`` (a key of ROW_CONFIGS) over
    rows of ``n_cols`` columns on ``device`` (its architecture: tile_engine.arch_of), ``col_bytes`` the
    bytes a column of the tensors a "reread" kernel reads twice (their element sizes, summed)."""
    arch = tile_engine.arch_of(device)
    entry = ROW_CONFIGS[(90 if arch >= 90 else 80, kind)]
    plain = _entry_launch(entry, n_cols)
    long = entry.get("long")
    if long is None or plain.one_block:
        return plain
    in_flight = tile_engine.sm_count(device) * ROWS_PER_SM * n_cols * col_bytes
    if long["when"] == "past_l2" and in_flight <= l2_bytes(device):
        return plain
    return _entry_launch(long, n_cols)._replace(one_block=False)  # one_block: within the plain entry's block


@triton.jit
def row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau):
    """The program's row: ``(r, a, b, x_row, τ)``, r = a·B + b (int64 before any stride product),
    ``x_row`` the pointer to its first logit, τ its temperature in fp32 (τ's stride over a is 0 for
    one τ, 1 for one τ per a)."""
    r = tl.program_id(0).to(tl.int64)
    a = r // B
    b = r % B
    tau = tl.load(tau_ptr + a * stride_tau).to(tl.float32)
    return r, a, b, x_ptr + a * stride_xa + b * stride_xb, tau


@triton.jit
def load_x(x_row, c, C, stride_xc):
    """The logits x of columns ``c`` in fp32, -inf past the end."""
    return tl.load(x_row + c.to(tl.int64) * stride_xc, mask=c < C, other=float("-inf")).to(tl.float32)


@triton.jit
def load_x_full(x_row, c, stride_xc):
    """load_x of columns ``c`` all inside the row: no mask (its compare and the -inf fill cost about an
    instruction an element)."""
    return tl.load(x_row + c.to(tl.int64) * stride_xc).to(tl.float32)


@triton.jit
def load_v(x_row, start, C, stride_xc, seed, noise_row, NOISY: tl.constexpr, BLOCK: tl.constexpr,
           INTERPRETED: tl.constexpr):
    """``load_x`` of columns ``start .. start + BLOCK``, plus, when NOISY, the Gumbel noise of each
    element: v = x + g (fp32), g from ``tl_math.gumbel_block`` (noise_row = r · ceil(C / 4)), -inf past
    the end.  The noise depends on (seed, row, column) only, so any pass over the row regenerates the
    same v."""
    x = load_x(x_row, start + tl.arange(0, BLOCK), C, stride_xc)
    if NOISY:
        x = x + gumbel_block(seed, noise_row, start, BLOCK, INTERPRETED)
    return x


@triton.jit
def noise_counter(r, C):
    """The first Philox counter of row r's noise (four columns a counter, tl_math.gumbel_block)."""
    return r * ((C + 3) // 4)


@triton.jit
def half_gap(x, M, tau):
    """(x - M·τ) / 2 for a max M in z units (kd_loss's kernel; the other kernels keep M in x units and
    take τ = 1): the logit's distance to the row's max in x units, halved so that it stays finite for
    logits of ±3e38.  The τ gradient sums these (Σ_j dL/dz_j = 0 makes any shift exact): in x units the
    shift is exact (no rounding of x / τ at a large τ or a common offset), and one FMA an element."""
    return x * 0.5 - M * (0.5 * tau)


@triton.jit
def load_z(x_row, c, C, stride_xc, tau):
    """z = x / τ for columns ``c`` of a row, -inf past the end, by an IEEE-rounded division (kd_loss's
    kernel only: the others work in x units, see the module docstring)."""
    x = tl.load(x_row + c.to(tl.int64) * stride_xc, mask=c < C, other=float("-inf"))
    return tl.math.div_rn(x.to(tl.float32), tau)


# The hard-label cross-entropy epilogue, -log p_y of a row's class index y (cross-entropy's class-index
# targets; kd_loss's target, at τ = 1): the target, its loss from the row's statistics (M, S) and the
# target's share of the gradient p - onehot(y).

@triton.jit
def class_target(target_ptr, r, C, ignore_index):
    """Row r's class index and whether it counts: ``(y, valid)``, y = 0 where it is ignore_index (or outside
    [0, C): reported before the launch), so that a load at y never reads out of bounds."""
    y = tl.load(target_ptr + r)
    valid = y != ignore_index
    return tl.where(valid & (y >= 0) & (y < C), y, 0), valid


@triton.jit
def target_nll(M, x_y, log_total, inv_tau):
    """-log p_y = lse(z) - z_y = (M - x_y)·(1/τ) + log1p(S) (M = max x, log_total = log1p(S)): the gap in x
    units, 0 when y is the argmax, so the loss keeps full relative precision at small τ (DESIGN.md)."""
    return (M - x_y) * inv_tau + log_total


@triton.jit
def target_complement(x_y, M, S, p_y, inv_total):
    """q_y = 1 - p_y, the target's gradient -q_y in p - onehot(y) (p_y from the row's statistics,
    inv_total = 1/(1 + S)): Σ_{j ≠ y} p_j = S/(1 + S) when y is the argmax, where 1 - p_y would round to 0
    at small τ and the row's gradient would no longer sum to zero."""
    return tl.where(x_y == M, S * inv_total, 1.0 - p_y)


@triton.jit
def recompute_p(x_row, c, C, stride_xc, scale, M, inv_total):
    """The backward's (x, p) for columns ``c``: p = exp((x - M)/τ) / (1 + S) = exp2((x - M)·scale)·inv_total
    from the forward's saved row statistics (M = max x, inv_total = 1 / (1 + S), scale = log2(e)/τ);
    p = 0 past the row's end."""
    x = load_x(x_row, c, C, stride_xc)
    return x, tl.exp2((x - M) * scale) * inv_total


# Shared by the launchers of row_softmax.py and row_ce.py.  Launchers choose the block and launch,
# writing into the outputs fused_tau/_ops.py allocated (scratch of their own aside); inputs are already checked by
# fused_tau (shapes, dtypes, devices); ``x3`` is the (A, C, B) view of the logits,
# ``tau`` a float32 tensor of one element or of A elements (one per row group).

def interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rows(x3):
    A, C, B = x3.shape
    return A * B, C, B


def tau_stride(tau):
    return 0 if tau.numel() == 1 else 1


def dtau_parts(dtau, n_rows, splits, unused):
    """Where a backward kernel writes its (n_rows, splits) partials of dτ: the output ``dtau`` itself for
    unsplit rows, else a scratch that sum_dtau_parts reduces into it; ``unused`` (any tensor) when no dτ is
    wanted (``dtau`` None)."""
    if dtau is None:
        return unused
    return dtau if splits == 1 else torch.empty((n_rows, splits), device=dtau.device, dtype=torch.float32)


def sum_dtau_parts(parts, dtau):
    """dτ of a split row: the sum of its programs' partials, in a fixed order."""
    if dtau is not None and parts is not dtau:
        torch.sum(parts, 1, out=dtau)
