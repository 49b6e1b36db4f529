"""Row engine, softmax family: softmax, log_softmax and τ·logsumexp along a dimension, forward
and backward (see row_engine.py for the layout and the saved statistics).  Gumbel-softmax is the
same kernels with a noisy load (NOISY: x + g, the noise regenerated from a Philox seed on every
pass; HARD: the one-hot of the argmax); its launchers are in row_sample.py."""
import torch
import triton
import triton.language as tl

from . import MODE_LOG_SOFTMAX, MODE_LSE, MODE_SOFTMAX  # noqa: F401 (kernels/row.py re-exports them)
from .row_engine import (dtau_parts, interpreted, load_v, load_x, noise_counter, recompute_p, row_launch,
                         row_splits, row_start, rows, sum_dtau_parts, tau_stride, tickets)
from .tl_math import exp2_scale, log1p, nan_if_posinf, online_finalize_log2, online_update_log2, to_store



@triton.jit
def _softmax_fwd_kernel(
    # pointers (seed_ptr: the Philox seed, read only when NOISY); part_*: (R, splits) partials of a split row
    x_ptr, out_ptr, m_ptr, s_ptr, tau_ptr, seed_ptr, part_m_ptr, part_s_ptr, part_arg_ptr,
    # MODE 0, PHASE 1: (R,) int32 tickets, zero between launches
    count_ptr,
    # shapes: x is (A, C, B), row r = a * B + b; out is contiguous; program (r, j) takes columns
    # [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r
    C, B, span_blocks, splits,
    # strides of x, and of τ (0: one τ; 1: one τ per a)
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    MODE: tl.constexpr, NOISY: tl.constexpr, HARD: tl.constexpr, PHASE: tl.constexpr, BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """MODE 0: out[r] = τ·logsumexp(x_r / τ); 1: softmax(x_r / τ); 2: log_softmax(x_r / τ).

    NOISY (Gumbel-softmax, MODE 1): every x is loaded as x + g, g ~ Gumbel(0, 1) regenerated from
    the seed (load_v); HARD: out is the one-hot of the row's argmax (the first index on ties; index 0
    for a row with no finite value, as torch.argmax) instead of the softmax.

    PHASE 0: one program a row.  A row split across programs (row_engine.row_splits) takes two
    launches: PHASE 1 folds each program's columns into their (M_j, S_j) (and the first argmax) as
    one lane's statistics; PHASE 2 reduces the row's partials as lanes (online_finalize_log2: the
    same reduction as within a program, in a fixed order, so deterministic) and writes its columns.
    τ·logsumexp (MODE 0) writes no columns: in PHASE 1 each program takes a ticket of its row after its
    partials, and the row's last arriver reduces them (``_lse_combine``), in the same launch (memory
    order as row_ce.py's ``_ce_fwd_kernel``: a CTA barrier, an acquire-release atomic, reads through L2).

    In x units (row_engine.py): v = x (+ g), M = max v, exp((v - M)/τ) = exp2((v - M)·c),
    log_softmax = (v - M)·(1/τ) - log1p(S), τ·logsumexp = M + τ·log1p(S)."""
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    scale = exp2_scale(tau)
    seed = 0
    noise_row = r
    if NOISY:
        seed = tl.load(seed_ptr)
        noise_row = noise_counter(r, C)
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    first = r * splits
    cols = tl.arange(0, BLOCK)
    if PHASE == 2:
        j = tl.arange(0, SPLITS_BLOCK)
        m = tl.load(part_m_ptr + first + j, mask=j < splits, other=float("-inf"))
        s = tl.load(part_s_ptr + first + j, mask=j < splits, other=0.0)
        arg = tl.zeros([SPLITS_BLOCK], tl.int32)
        if HARD:
            arg = tl.load(part_arg_ptr + first + j, mask=j < splits, other=C)
    else:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        # HARD: per lane, the first column holding the lane's max (columns arrive in increasing order)
        arg = tl.zeros([BLOCK], tl.int32)
        if ONE_BLOCK:
            v_kept = load_v(x_row, 0, C, stride_xc, seed, noise_row, NOISY, BLOCK, INTERPRETED)
            if HARD:
                arg = tl.where(v_kept > m, cols, arg)
            m, s = online_update_log2(m, s, v_kept, scale)
        else:
            for start in range(col0, col_end, BLOCK):
                c = start + cols
                v = load_v(x_row, start, C, stride_xc, seed, noise_row, NOISY, BLOCK, INTERPRETED)
                if HARD:
                    arg = tl.where(v > m, c, arg)
                m, s = online_update_log2(m, s, v, scale)
    M, S = online_finalize_log2(m, s, scale)
    # a row (or split) with no finite value has every lane at M = -inf and all arg = 0: index 0
    top = tl.min(tl.where(m == M, arg, C), 0)
    if PHASE == 1:
        tl.store(part_m_ptr + first + tl.program_id(1), M)
        tl.store(part_s_ptr + first + tl.program_id(1), S)
        if HARD:
            tl.store(part_arg_ptr + first + tl.program_id(1), top)
        if MODE == 0:
            tl.debug_barrier()  # every thread's stores before the ticket
            if tl.atomic_add(count_ptr + r, 1, sem="acq_rel", scope="gpu") == splits - 1:
                tl.store(count_ptr + r, 0)
                _lse_combine(out_ptr, m_ptr, s_ptr, part_m_ptr, part_s_ptr, r, first, splits, tau, scale,
                             SPLITS_BLOCK, INTERPRETED)
    else:
        if MODE != 0:
            S = nan_if_posinf(M, S)
        row_owner = tl.program_id(1) == 0
        tl.store(m_ptr + r, M, mask=row_owner)
        tl.store(s_ptr + r, S, mask=row_owner)
        if MODE == 0:
            tl.store(out_ptr + r, to_store(M + tau * log1p(S), out_ptr, INTERPRETED), mask=row_owner)
        else:
            out_row = out_ptr + a * C * B + b
            if not HARD:
                inv_total = 1.0 / (1.0 + S)
                log_total = log1p(S)
                inv_tau = 1.0 / tau
            for start in range(col0, col_end, BLOCK):
                c = start + cols
                if HARD:
                    y = tl.where(c == top, 1.0, 0.0)
                else:
                    if ONE_BLOCK:
                        v = v_kept
                    else:
                        v = load_v(x_row, start, C, stride_xc, seed, noise_row, NOISY, BLOCK, INTERPRETED)
                    if MODE == 1:
                        y = tl.exp2((v - M) * scale) * inv_total
                    else:
                        # exactly -log1p(S) at the argmax
                        y = (v - M) * inv_tau - log_total
                tl.store(out_row + c.to(tl.int64) * B, to_store(y, out_ptr, INTERPRETED), mask=c < C)


@triton.jit
def _lse_combine(out_ptr, m_ptr, s_ptr, part_m_ptr, part_s_ptr, r, first, splits, tau, scale,
                 SPLITS_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """τ·logsumexp of a split row from its programs' (M_j, S_j), reduced as lanes in split order (PHASE 2's
    reduction), read through L2 (other programs of the launch wrote them)."""
    j = tl.arange(0, SPLITS_BLOCK)
    m = tl.load(part_m_ptr + first + j, mask=j < splits, other=float("-inf"), cache_modifier=".cg")
    s = tl.load(part_s_ptr + first + j, mask=j < splits, other=0.0, cache_modifier=".cg")
    M, S = online_finalize_log2(m, s, scale)
    tl.store(m_ptr + r, M)
    tl.store(s_ptr + r, S)
    tl.store(out_ptr + r, to_store(M + tau * log1p(S), out_ptr, INTERPRETED))


@triton.jit
def _softmax_output(y_ptr, base, start, C, B, x_row, stride_xc, scale, M, inv_total, seed, noise_row,
                    LOG: tl.constexpr, NOISY: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """The forward's output y at columns ``c = start .. start + BLOCK``: loaded from y_ptr (padding lanes must give dz = 0:
    y = 0 for softmax, log y = -inf for log_softmax), or, NOISY, the soft Gumbel sample recomputed
    from the logits, the regenerated noise and the row's saved statistics (y = 0 past the end)."""
    if NOISY:
        v = load_v(x_row, start, C, stride_xc, seed, noise_row, True, BLOCK, INTERPRETED)
        return tl.exp2((v - M) * scale) * inv_total
    c = start + tl.arange(0, BLOCK)
    ptrs = y_ptr + base + c.to(tl.int64) * B
    if LOG:
        return tl.load(ptrs, mask=c < C, other=float("-inf")).to(tl.float32)
    return tl.load(ptrs, mask=c < C, other=0.0).to(tl.float32)


@triton.jit
def _softmax_bwd_kernel(
    # pointers: y (the forward's output), g (its gradient) and dx share y's contiguous layout
    y_ptr, g_ptr, dx_ptr, x_ptr, m_ptr, s_ptr, tau_ptr, dtau_ptr, seed_ptr,
    # a split row's (R, splits, BLOCK) lanes' partial sums of Σ g y (Σ g for log_softmax)
    part_ptr,
    # shapes; program (r, j) takes columns [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r
    # (dtau: (R, splits))
    C, B, span_blocks, splits,
    # strides of x (read for dL/dτ, or for the noisy y) and of τ
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    LOG: tl.constexpr, NOISY: tl.constexpr, TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr, PHASE: tl.constexpr, SPLITS_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """dz = y (g - Σ g y) for softmax, dz = g - exp(y) Σ g for log_softmax; dx = dz / τ.

    NOISY (the Gumbel-softmax's backward, straight-through when the forward was hard): y is not
    read but recomputed, the soft sample y = exp2((x + g_noise - M)·c) / (1 + S), c = log2(e)/τ, from
    the forward's seed and saved statistics (y_ptr unread, τ gets no gradient).

    dL/dτ of the row is -(1/τ²) Σ (x - c) dz: the shift c changes nothing (Σ dz = 0); taken in
    x units (half_gap) the terms carry no rounding of x / τ, at any τ and any common offset.

    PHASE 0: one program a row.  A row split across programs (row_engine.row_splits): PHASE 1 (grid
    (R, splits)) writes each program's lanes' sums of the row's reduction, PHASE 2 (same grid) adds the
    row's programs' lanes in column order (deterministic), reduces them and writes its columns' dx (and
    dτ's share).
    """
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    base = a * C * B + b
    inv_tau = 1.0 / tau
    seed = 0
    noise_row = r
    M = 0.0
    inv_total = 1.0
    scale = 1.0
    if NOISY:
        scale = exp2_scale(tau)
        seed = tl.load(seed_ptr)
        noise_row = noise_counter(r, C)
        M = tl.load(m_ptr + r)
        inv_total = 1.0 / (1.0 + tl.load(s_ptr + r))
    cols = tl.arange(0, BLOCK)
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    part = r * splits + tl.program_id(1)
    y_kept = 0.0
    g_kept = 0.0
    if ONE_BLOCK:
        offs = cols.to(tl.int64) * B
        y_kept = _softmax_output(y_ptr, base, 0, C, B, x_row, stride_xc, scale, M, inv_total, seed, noise_row,
                                 LOG, NOISY, BLOCK, INTERPRETED)
        g_kept = tl.load(g_ptr + base + offs, mask=cols < C, other=0.0).to(tl.float32)
        if LOG:
            red = tl.sum(g_kept, 0)
        else:
            red = tl.sum(g_kept * y_kept, 0)
    elif PHASE == 2:
        # the lanes' sums of the row's programs, added in column order: the unsplit program's own
        # order when a program takes one block (so a split changes no rounding there)
        acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(SPLITS_BLOCK):
            acc += tl.load(part_ptr + (r * splits + j) * BLOCK + cols, mask=j * BLOCK + cols < splits * BLOCK,
                           other=0.0)
        red = tl.sum(acc, 0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(col0, col_end, BLOCK):
            c = start + cols
            offs = c.to(tl.int64) * B
            g = tl.load(g_ptr + base + offs, mask=c < C, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                acc += g * _softmax_output(y_ptr, base, start, C, B, x_row, stride_xc, scale, M, inv_total, seed,
                                           noise_row, LOG, NOISY, BLOCK, INTERPRETED)
        red = tl.sum(acc, 0)
    if PHASE == 1:
        tl.store(part_ptr + part * BLOCK + cols, acc)
    else:
        _softmax_bwd_write(y_ptr, g_ptr, dx_ptr, m_ptr, dtau_ptr, r, part, base, x_row, C, B, stride_xc, col0,
                           col_end, red, inv_tau, scale, M, inv_total, seed, noise_row, y_kept, g_kept,
                           LOG, NOISY, TAU_GRAD, BLOCK, ONE_BLOCK, INTERPRETED)


@triton.jit
def _softmax_bwd_write(y_ptr, g_ptr, dx_ptr, m_ptr, dtau_ptr, r, part, base, x_row, C, B, stride_xc, col0, col_end,
                       red, inv_tau, scale, M, inv_total, seed, noise_row, y_kept, g_kept,
                       LOG: tl.constexpr, NOISY: tl.constexpr, TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                       ONE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """_softmax_bwd_kernel's write pass over columns [col0, col_end), with the row's reduction ``red``
    (y_kept, g_kept: the row's one block, ONE_BLOCK); dτ's share goes to dtau_ptr[part]."""
    cols = tl.arange(0, BLOCK)
    if TAU_GRAD:
        # The shift c of Σ (x - c) dz: exact whatever c in exact arithmetic (Σ dz = 0), but the rounded
        # y break that, by errors ∝ y |x - c|: the p-weighted mean of x is the best c.  A row that is
        # one block has x in registers for it; a longer row takes the max M (one read of x).
        if ONE_BLOCK:
            x_kept = load_x(x_row, cols, C, stride_xc)
            if LOG:
                p_kept = tl.exp(y_kept)
            else:
                p_kept = y_kept
            c_half = 0.5 * tl.sum(tl.where(p_kept != 0.0, p_kept * x_kept, 0.0), 0)
        else:
            c_half = tl.load(m_ptr + r) * 0.5
        tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(col0, col_end, BLOCK):
        c = start + cols
        offs = c.to(tl.int64) * B
        if ONE_BLOCK:
            y = y_kept
            g = g_kept
        else:
            y = _softmax_output(y_ptr, base, start, C, B, x_row, stride_xc, scale, M, inv_total, seed, noise_row,
                                LOG, NOISY, BLOCK, INTERPRETED)
            g = tl.load(g_ptr + base + offs, mask=c < C, other=0.0).to(tl.float32)
        if LOG:
            dz = g - tl.exp(y) * red
        else:
            dz = y * (g - red)
        tl.store(dx_ptr + base + offs, to_store(dz * inv_tau, dx_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            if ONE_BLOCK:
                x = x_kept
            else:
                x = load_x(x_row, c, C, stride_xc)
            # (x - c) / 2 (half_gap); dz = 0 past the end and at masked classes (x = -inf): those add
            # 0, a NaN dz adds NaN
            tau_acc += tl.where(dz != 0.0, (x * 0.5 - c_half) * dz, 0.0)
    if TAU_GRAD:
        tl.store(dtau_ptr + part, -(tl.sum(tau_acc, 0) * inv_tau) * (2.0 * inv_tau))


@triton.jit
def _lse_bwd_kernel(
    # pointers
    x_ptr, m_ptr, s_ptr, tau_ptr, g_ptr, dx_ptr, dtau_ptr,
    # shapes; program (r, j) takes columns [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r
    # (dtau: (R, splits))
    C, B, span_blocks,
    # strides of x and τ; dx is contiguous
    stride_xa, stride_xc, stride_xb, stride_tau,
    # constants
    TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """out = τ·lse(x/τ): dx = g·softmax(x/τ); dL/dτ = g·(lse - Σ p z) = g·(log1p(S) + Σ p (M - x) / τ)
    (M = max x: every term ≥ 0)."""
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    scale = exp2_scale(tau)
    dx_row = dx_ptr + a * C * B + b
    M = tl.load(m_ptr + r)
    S = tl.load(s_ptr + r)
    g = tl.load(g_ptr + r).to(tl.float32)
    inv_total = 1.0 / (1.0 + S)
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    cols = tl.arange(0, BLOCK)
    tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(col0, col_end, BLOCK):
        c = start + cols
        x, p = recompute_p(x_row, c, C, stride_xc, scale, M, inv_total)
        tl.store(dx_row + c.to(tl.int64) * B, to_store(g * p, dx_ptr, INTERPRETED), mask=c < C)
        if TAU_GRAD:
            tau_acc += tl.where(p != 0.0, p * (M - x), 0.0)
    if TAU_GRAD:
        # log1p(S) once a row: in the first split's partial
        first_split = tl.where(tl.program_id(1) == 0, log1p(S), 0.0)
        tl.store(dtau_ptr + r * tl.num_programs(1) + tl.program_id(1),
                 g * (first_split + tl.sum(tau_acc, 0) * (1.0 / tau)))


def softmax_fwd(x3, tau, mode, out, m, s, seed=None, hard=False):
    """Writes (out, M, S) (fused_tau._ops.softmax_fwd_outputs): out is τ·lse (shape (A*B,)) for MODE_LSE,
    else softmax or log_softmax in x3's dtype and contiguous (A, C, B) layout.  ``seed`` (a one-element int64
    tensor; MODE_SOFTMAX only): the Gumbel-softmax of x3 with that seed's noise, or, ``hard``,
    the one-hot of its argmax (kernels/row_sample.py's gumbel_fwd).  Few long rows are split across
    programs (row_engine.row_splits): a launch for the partial statistics, R·splits·12 bytes, then
    one that reduces them and writes the output (τ·logsumexp: the first launch's rows' last programs
    reduce them, one launch)."""
    R, C, B = rows(x3)
    dev = x3.device
    cfg = row_launch("row" if seed is None else "noisy", C, dev)
    block = cfg.block
    # the Gumbel noise makes a noisy pass issue-bound (Philox), not latency-bound: the SMs filled, no more
    # programs for loads in flight (each split program's own finalize is what more of them would cost)
    splits, span = row_splits(R, C, block, dev, block * x3.element_size() if seed is None else 0)
    args = (x3, out, m, s, tau, m if seed is None else seed)
    consts = dict(MODE=mode, NOISY=seed is not None, HARD=hard, BLOCK=block, ONE_BLOCK=cfg.one_block,
                  INTERPRETED=interpreted(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = (*x3.stride(), tau_stride(tau))
    if splits == 1:
        _softmax_fwd_kernel[(R, 1)](*args, m, s, m, m, C, B, span // block, 1, *strides, PHASE=0, SPLITS_BLOCK=1,
                                    **consts)
        return
    part_m = torch.empty(R * splits, device=dev, dtype=torch.float32)
    part_s = torch.empty_like(part_m)
    part_arg = torch.empty(R * splits, device=dev, dtype=torch.int32) if hard else part_m
    ticket_buf = tickets(dev, R) if mode == MODE_LSE else m
    splits_block = max(triton.next_power_of_2(splits), 2)
    # τ·logsumexp: PHASE 1 alone (its rows' last arrivers combine); softmax: PHASE 2 writes the columns
    for phase in ((1,) if mode == MODE_LSE else (1, 2)):
        _softmax_fwd_kernel[(R, splits)](*args, part_m, part_s, part_arg, ticket_buf, C, B, span // block, splits,
                                         *strides, PHASE=phase, SPLITS_BLOCK=splits_block, **consts)


def softmax_bwd(y, g, x3, m, s, tau, log, dx, dtau, seed=None):
    """Writes dx (contiguous (A, C, B), x3's dtype) and dτ per row (None: not wanted); y, g contiguous (A, C, B).  ``seed``: the backward of the
    Gumbel-softmax drawn with it, y recomputed from the logits x3 (``y`` is then unread).  Few long rows
    are split across programs (row_engine.row_splits): a launch for the lanes' partial sums,
    R·splits·block·4 bytes, then one that writes dx; a split row's dτ is the sum of its (R, splits) partials."""
    R, C, B = rows(x3)
    tau_grad = dtau is not None
    # a row longer than a block reads y and g twice (the reduction, then the gradient): "reread", except
    # with dL/dτ (x read as well), where its 32-warp program needs a stack frame on sm_90
    kind = "noisy" if seed is not None else "row" if tau_grad else "reread"
    cfg = row_launch(kind, C, g.device, y.element_size() + g.element_size())
    block = cfg.block
    splits, span = row_splits(R, C, block, g.device,
                              block * (y.element_size() + g.element_size()) if seed is None else 0)
    dtau_split = dtau_parts(dtau, R, splits, m)
    part = torch.empty(R * splits * block, device=g.device, dtype=torch.float32) if splits > 1 else m
    args = (y, g, dx, x3, m, s, tau, dtau_split, m if seed is None else seed, part, C, B, span // block, splits,
            *x3.stride(), tau_stride(tau))
    consts = dict(LOG=log, NOISY=seed is not None, TAU_GRAD=tau_grad, BLOCK=block, ONE_BLOCK=cfg.one_block,
                  SPLITS_BLOCK=triton.next_power_of_2(splits), INTERPRETED=interpreted(), num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    for phase in ((0,) if splits == 1 else (1, 2)):
        _softmax_bwd_kernel[(R, splits)](*args, PHASE=phase, **consts)
    sum_dtau_parts(dtau_split, dtau)


def lse_bwd(x3, m, s, tau, g, dx, dtau):
    """Writes dx (contiguous (A, C, B), x3's dtype) and dτ per row (None: not wanted); g is contiguous
    (A*B,).  Few long rows are split across programs (row_engine.row_splits); a split row's dτ is the
    sum of its (R, splits) partials."""
    R, C, B = rows(x3)
    cfg = row_launch("row", C, x3.device)
    block = cfg.block
    splits, span = row_splits(R, C, block, x3.device, block * x3.element_size())
    dtau_split = dtau_parts(dtau, R, splits, m)
    _lse_bwd_kernel[(R, splits)](
        x3, m, s, tau, g, dx, dtau_split, C, B, span // block, *x3.stride(), tau_stride(tau),
        TAU_GRAD=dtau is not None, BLOCK=block, INTERPRETED=interpreted(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    sum_dtau_parts(dtau_split, dtau)
