"""Row engine, cross-entropy's reductions: the rows' losses summed (and divided by the mean's
denominator), the denominator itself and the class-index targets' check, in a fixed order, by one
program (``ce_reduce``'s launch, or the last program of a split forward: row_ce.py; the tile engine's
combines reduce their losses with it too)."""
import torch
import triton
import triton.language as tl

from .row_engine import interpreted
from .tl_math import to_store

# ce_reduce's denominators: none ('sum'), the row count (probability targets' 'mean'), Σ w_y over the
# rows whose target is not ignore_index (class indices' 'mean'), a given one (the pre-pass's)
DENOM_NONE, DENOM_ROWS, DENOM_TARGETS, DENOM_GIVEN = 0, 1, 2, 3
REDUCE_BLOCK = 1024
# the block of the split forward's own reduction: rows are split only when they are few (at most about
# PROGRAMS_PER_SM · SMs / 2), and a small block keeps its registers clear of the row loop's (sm_80)
SPLIT_REDUCE_BLOCK = 128


@triton.jit
def _ce_reduce_kernel(
    # pointers: the rows' losses, class-index targets (contiguous (R,)), class weights, a given
    # denominator; out: the reduced loss (fp32 or the input's dtype), the denominator, g = 1/denominator, ok
    loss_ptr, target_ptr, weight_ptr, den_in_ptr, out_ptr, den_ptr, g_ptr, ok_ptr,
    R, C, ignore_index, n_rows_f,
    SUM_LOSS: tl.constexpr, DENOM: tl.constexpr, CHECK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """One program over the R rows (``_ce_reduce_rows``)."""
    _ce_reduce_rows(loss_ptr, target_ptr, weight_ptr, den_in_ptr, out_ptr, den_ptr, g_ptr, ok_ptr, R, C, ignore_index,
                    n_rows_f, SUM_LOSS, DENOM, CHECK, HAS_WEIGHT, BLOCK, INTERPRETED, True)


@triton.jit
def _ce_reduce_rows(loss_ptr, target_ptr, weight_ptr, den_in_ptr, out_ptr, den_ptr, g_ptr, ok_ptr,
                    R, C, ignore_index, n_rows_f,
                    SUM_LOSS: tl.constexpr, DENOM: tl.constexpr, CHECK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, STORE_DEN: tl.constexpr):
    """The R rows in a fixed order (deterministic, whatever program runs it): den = 1 (DENOM_NONE),
    R (DENOM_ROWS), Σ over the rows whose y is not ignore_index of w_y (DENOM_TARGETS; w = 1 without
    weights) or den_in[0] (DENOM_GIVEN); a computed den of 0 is NaN (torch's 0/0).  Writes den and
    g = 1/den when STORE_DEN, Σ loss / den (Σ loss for DENOM_NONE) when SUM_LOSS (IEEE-rounded
    divisions, as torch's; stored in out's dtype, rounded to nearest even as torch's ``.to``), and with
    CHECK ok = 1 when every y is in [0, C) or ignore_index, else 0.  The losses are read through L2
    (``.cg``): the last program of ``_ce_fwd_kernel`` (or of the tile engine's combines,
    kernels/tile_fwd.py and tile_clip.py, which take only the loss) reads what other programs of its
    launch wrote."""
    i = tl.arange(0, BLOCK)
    loss_acc = tl.zeros([BLOCK], tl.float32)
    den_acc = tl.zeros([BLOCK], tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, R, BLOCK):
        rows = start + i
        inside = rows < R
        if SUM_LOSS:
            loss_acc += tl.load(loss_ptr + rows, mask=inside, other=0.0, cache_modifier=".cg").to(tl.float32)
        if CHECK or DENOM == 2:
            y = tl.load(target_ptr + rows, mask=inside, other=ignore_index)
            valid = y != ignore_index
            in_range = valid & (y >= 0) & (y < C)
            if CHECK:
                bad += (valid & ((y < 0) | (y >= C))).to(tl.int32)
            if DENOM == 2:
                if HAS_WEIGHT:
                    den_acc += tl.load(weight_ptr + tl.where(in_range, y, 0), mask=in_range, other=0.0).to(tl.float32)
                else:
                    den_acc += tl.where(valid, 1.0, 0.0)
    if DENOM == 0:
        den = tl.full([], 1.0, tl.float32)
    elif DENOM == 1:
        den = tl.full([], 1.0, tl.float32) * n_rows_f
    elif DENOM == 3:
        den = tl.load(den_in_ptr).to(tl.float32)
    else:
        den = tl.sum(den_acc, 0)
    if DENOM == 1 or DENOM == 2:
        den = tl.where(den == 0.0, float("nan"), den)
    if STORE_DEN:
        tl.store(den_ptr, den)
        tl.store(g_ptr, tl.math.div_rn(tl.full([], 1.0, tl.float32), den))
    if SUM_LOSS:
        total = tl.sum(loss_acc, 0)
        if DENOM != 0:
            total = tl.math.div_rn(total, den)
        tl.store(out_ptr, to_store(total, out_ptr, INTERPRETED))
    if CHECK:
        tl.store(ok_ptr, (tl.sum(bad, 0) == 0).to(tl.int32))


def ce_reduce(device, loss, target, weight, den_in, n_rows, n_classes, ignore_index, denom_mode, check,
              out_dtype=torch.float32):
    """cross_entropy's reduction, the mean's denominator and the class-index targets' check, each pass
    one launch of one program (R·8 bytes or fewer read, where torch takes a dozen small operators).

    ``loss``: the forward's per-row fp32, or None (a pass over the targets only); ``target``: class
    indices, contiguous int64 (R,), or None; ``weight``: fp32 class weights or None; ``den_in``: the
    denominator for DENOM_GIVEN.  Returns (out: 0-dim Σ loss [/ den] in ``out_dtype``, or None, den: 0-dim,
    g: (1,) = 1/den, ok: 0-dim int32 (1: every target in range) or None)."""
    f32 = dict(device=device, dtype=torch.float32)
    den, g = torch.empty((), **f32), torch.empty(1, **f32)
    out = torch.empty((), device=device, dtype=out_dtype) if loss is not None else None
    ok = torch.empty((), device=device, dtype=torch.int32) if check else None
    _ce_reduce_kernel[(1,)](
        *(t if t is not None else g for t in (loss, target, weight, den_in, out)), den, g,
        ok if ok is not None else g, n_rows, n_classes, ignore_index, float(n_rows),
        SUM_LOSS=loss is not None, DENOM=denom_mode, CHECK=check, HAS_WEIGHT=weight is not None,
        BLOCK=REDUCE_BLOCK, INTERPRETED=interpreted(), num_warps=4,
    )
    return out, den, g, ok
