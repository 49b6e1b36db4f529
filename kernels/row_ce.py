"""Row engine, cross-entropy: class-index and probability targets, class weights, ignore_index and
label smoothing, forward and backward (see row_engine.py for the layout and the saved statistics)."""
import torch
import triton
import triton.language as tl

from .row_engine import (class_target, dtau_parts, half_gap, interpreted, last_arrival, load_x, row_launch,
                         row_splits, row_start, rows, sum_dtau_parts, target_complement, target_nll,
                         tau_stride, tickets)
from .row_ce_reduce import DENOM_NONE, SPLIT_REDUCE_BLOCK, _ce_reduce_rows, ce_reduce
from .tl_math import (exp2_scale, log1p, nan_if_posinf, online_finalize_log2, online_update_log2, to_store,
                      weighted_gap_finalize, weighted_gap_update)


@triton.jit
def _ce_coefficient(t_row, w_ptr, c, C, stride_tc, smoothing,
                    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr):
    """a_c of the loss term Σ_c a_c (lse - z_c): w_c·((1-ε) t_c + ε/C) for probability
    targets, w_c·ε/C (label smoothing) for class-index targets."""
    mask = c < C
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB_TARGET:
        t = tl.load(t_row + c.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(tl.float32)
        if SMOOTH:
            t = t * (1.0 - smoothing) + smoothing / C
        return w * t
    else:
        return w * (smoothing / C)


@triton.jit
def _ce_fwd_kernel(
    # pointers
    x_ptr, target_ptr, weight_ptr, tau_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr,
    # (R, splits) partials of a split row: M_j, S_j, A_j, D_j
    part_m_ptr, part_s_ptr, part_a_ptr, part_d_ptr,
    # WRITE_GRAD: the incoming gradient's scale g (one fp32), the gradient dx and the rows' dL/dτ
    g_ptr, dx_ptr, dtau_ptr,
    # (R + 1,) int32 tickets, zero between launches: a split row's arrivals, then the rows' (REDUCE)
    count_ptr,
    # REDUCE: the reduced loss, a given denominator, the denominator, 1/denominator, the targets' verdict
    out_ptr, den_in_ptr, den_ptr, gscale_ptr, ok_ptr,
    # shapes: x is (A, C, B), R = A·B rows; class-index targets are contiguous (R,); program (r, j) of
    # PHASE 1 takes columns [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r
    R, C, B, span_blocks, splits,
    # strides of x, of probability targets and of τ
    stride_xa, stride_xc, stride_xb, stride_ta, stride_tc, stride_tb, stride_da, stride_dc, stride_db, stride_tau,
    # runtime scalars
    ignore_index, smoothing, n_rows_f,
    # constants
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr, PHASE: tl.constexpr,
    WRITE_GRAD: tl.constexpr, TAU_GRAD: tl.constexpr, BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
    REDUCE: tl.constexpr, DENOM: tl.constexpr, CHECK: tl.constexpr, REDUCE_ROWS_BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Per row, z = x/τ, lse = M/τ + log1p(S) (M = max x, row_engine.py):
    class index y: loss = (1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c), 0 if y == ignore_index;
    probabilities t: loss = Σ_c w_c ((1-ε) t_c + ε/C) (lse - z_c).
    lse - z_y is formed as (M - x_y)·(1/τ) + log1p(S): exact when y is the argmax at small τ, and
    Σ_c a_c (M - x_c) (non-negative terms) is summed in x units and scaled by 1/τ once.

    PHASE 0: one program a row.  PHASE 1, a row split across programs (row_engine.row_splits, grid
    (R, splits)): each program reduces its columns to (M_j, S_j, A_j, D_j), one lane's statistics, and
    takes a ticket of its row; the row's last arriver reduces the row's partials as lanes, in a fixed
    order, and forms the loss (``_ce_row_combine``).  REDUCE (PHASE 1): a row's loss written, its
    combining program takes a ticket of the rows; the last one reduces the R losses in a fixed order
    (``_ce_reduce_rows``: the mean's denominator, the targets' check).  Many rows (PHASE 0) leave the
    reduction to ``_ce_reduce_kernel``: a last program of 8192 would read every row's loss after the
    others, where a launch of its own costs its start.  The tickets only elect which program
    combines: what is summed, and in which order, never depends on timing, so the results are
    bit-identical run to run.  The elected program puts its ticket back to 0 for the next launch.
    Memory order: a CTA barrier, then the ticket's atomic (acquire-release at GPU scope) publishes the
    program's stores; the elected program reads the others' through L2 (``.cg``).  Under the
    interpreter programs run one after another: the last program of a row (of the grid) is elected.

    WRITE_GRAD (PHASE 0): the program then streams its row again, while it is still in L2, and writes
    the gradient for an incoming gradient g (``_ce_grad_block``, the backward kernel's formula) and,
    with TAU_GRAD, the row's dL/dτ: forward + backward read the logits from HBM once and write the
    gradient once (two passes where a separate backward makes three)."""
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    t_row = target_ptr + a * stride_ta + b * stride_tb
    scale = exp2_scale(tau)
    inv_tau = 1.0 / tau
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    A = tl.zeros([BLOCK], tl.float32)
    D = tl.zeros([BLOCK], tl.float32)
    for start in range(col0, col_end, BLOCK):
        c = start + cols
        x = load_x(x_row, c, C, stride_xc)
        if PROB_TARGET or SMOOTH:
            coef = _ce_coefficient(t_row, weight_ptr, c, C, stride_tc, smoothing,
                                   HAS_WEIGHT, PROB_TARGET, SMOOTH)
            A, D = weighted_gap_update(m, A, D, x, coef)
        m, s = online_update_log2(m, s, x, scale)
    M, S = online_finalize_log2(m, s, scale)
    if PHASE == 1:
        part = r * splits + tl.program_id(1)
        tl.store(part_m_ptr + part, M)
        tl.store(part_s_ptr + part, S)
        if PROB_TARGET or SMOOTH:
            A_part, D_part = weighted_gap_finalize(m, A, D, M)
            # a split without a finite logit: its classes at -inf cost +inf (M - m would be -inf - -inf)
            D_part = tl.where(M == float("-inf"), tl.where(A_part != 0.0, float("inf"), 0.0), D_part)
            tl.store(part_a_ptr + part, A_part)
            tl.store(part_d_ptr + part, D_part)
        if not PROB_TARGET:
            # the target's logit, parked in the row's loss slot for the combine (which then reads no logits)
            tl.store(loss_ptr + r, tl.load(x_row + class_target(target_ptr, r, C, ignore_index)[0] * stride_xc),
                     mask=tl.program_id(1) == 0)
        tl.debug_barrier()  # every thread's stores before the ticket
        if tl.atomic_add(count_ptr + r, 1, sem="acq_rel", scope="gpu") == splits - 1:
            tl.store(count_ptr + r, 0)
            _ce_row_combine(x_row, target_ptr, weight_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr, part_m_ptr,
                            part_s_ptr, part_a_ptr, part_d_ptr, r, splits, C, stride_xc, scale, inv_tau, ignore_index,
                            smoothing, HAS_WEIGHT, PROB_TARGET, SMOOTH, SPLITS_BLOCK)
            if REDUCE:
                _ce_rows_done(loss_ptr, target_ptr, weight_ptr, count_ptr, out_ptr, den_in_ptr, den_ptr, gscale_ptr,
                              ok_ptr, R, C, ignore_index, n_rows_f, DENOM, CHECK, HAS_WEIGHT, REDUCE_ROWS_BLOCK,
                              INTERPRETED)
    else:
        S, A_row = _ce_loss(x_row, target_ptr, weight_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr, r, m, A, D, M, S,
                            C, stride_xc, inv_tau, ignore_index, smoothing, HAS_WEIGHT, PROB_TARGET, SMOOTH, False)
        if WRITE_GRAD:
            dx_row = dx_ptr + a * stride_da + b * stride_db
            g = tl.load(g_ptr).to(tl.float32)
            K, G, y, D_y, valid = _ce_grad_row(x_row, t_row, target_ptr, weight_ptr, r, C, stride_xc, stride_tc, scale,
                                               inv_tau, M, S, A_row, g, ignore_index, smoothing, HAS_WEIGHT,
                                               PROB_TARGET, SMOOTH)
            tau_acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, C, BLOCK):
                tau_acc += _ce_grad_block(x_row, t_row, weight_ptr, dx_row, dx_ptr, start + cols, C, stride_xc,
                                          stride_tc, stride_dc, scale, M, K, G, y, D_y, valid, smoothing, HAS_WEIGHT,
                                          PROB_TARGET, SMOOTH, INTERPRETED)
            if TAU_GRAD:
                tl.store(dtau_ptr + r, -tl.sum(tau_acc, 0) * (2.0 * inv_tau))


@triton.jit
def _ce_row_combine(x_row, target_ptr, weight_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr, part_m_ptr, part_s_ptr,
                    part_a_ptr, part_d_ptr, r, splits, C, stride_xc, scale, inv_tau, ignore_index, smoothing,
                    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
                    SPLITS_BLOCK: tl.constexpr):
    """A split row's loss (and saved statistics) from its programs' partials, reduced as lanes in the
    order of the splits (read through L2: other programs of the launch wrote them)."""
    j = tl.arange(0, SPLITS_BLOCK)
    first = r * splits
    m = tl.load(part_m_ptr + first + j, mask=j < splits, other=float("-inf"), cache_modifier=".cg")
    s = tl.load(part_s_ptr + first + j, mask=j < splits, other=0.0, cache_modifier=".cg")
    if PROB_TARGET or SMOOTH:
        A = tl.load(part_a_ptr + first + j, mask=j < splits, other=0.0, cache_modifier=".cg")
        D = tl.load(part_d_ptr + first + j, mask=j < splits, other=0.0, cache_modifier=".cg")
    else:
        A = tl.zeros([SPLITS_BLOCK], tl.float32)
        D = tl.zeros([SPLITS_BLOCK], tl.float32)
    M, S = online_finalize_log2(m, s, scale)
    _ce_loss(x_row, target_ptr, weight_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr, r, m, A, D, M, S,
             C, stride_xc, inv_tau, ignore_index, smoothing, HAS_WEIGHT, PROB_TARGET, SMOOTH, True)


@triton.jit
def _ce_rows_done(loss_ptr, target_ptr, weight_ptr, count_ptr, out_ptr, den_in_ptr, den_ptr, gscale_ptr, ok_ptr,
                  R, C, ignore_index, n_rows_f, DENOM: tl.constexpr, CHECK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """A row's loss is written: its program takes a ticket of the rows (count_ptr[R]); the last one
    reduces the R losses (``_ce_reduce_rows``) and puts the ticket back to 0 (``last_arrival``)."""
    if last_arrival(count_ptr + R, R):
        _ce_reduce_rows(loss_ptr, target_ptr, weight_ptr, den_in_ptr, out_ptr, den_ptr, gscale_ptr, ok_ptr, R, C,
                        ignore_index, n_rows_f, True, DENOM, CHECK, HAS_WEIGHT, BLOCK, INTERPRETED, True)


@triton.jit
def _ce_loss(x_row, target_ptr, weight_ptr, loss_ptr, wy_ptr, m_ptr, s_ptr, a_ptr, r, m, A, D, M, S, C,
             stride_xc, inv_tau, ignore_index, smoothing,
             HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr, X_Y_PARKED: tl.constexpr):
    """The row's loss (and saved M, S, A, w_y) from its reduced statistics: (M, S) and the lanes'
    (m, A, D) of weighted_gap_update.  X_Y_PARKED: the target's logit is read from the loss slot.
    Returns the saved S and A = Σ_c a_c (0.0 without probabilities or smoothing)."""
    S = nan_if_posinf(M, S)
    log_total = log1p(S)
    tl.store(m_ptr + r, M)
    tl.store(s_ptr + r, S)
    loss = 0.0
    A_row = 0.0
    if PROB_TARGET or SMOOTH:
        A_row, D_row = weighted_gap_finalize(m, A, D, M)
        tl.store(a_ptr + r, A_row)
        loss = D_row * inv_tau + A_row * log_total
    if not PROB_TARGET:
        y_safe, valid, w_y = _ce_target(target_ptr, weight_ptr, r, C, ignore_index, 0.0, HAS_WEIGHT, PROB_TARGET)
        if X_Y_PARKED:  # written by another program of the launch: read through L2
            x_y = tl.load(loss_ptr + r, cache_modifier=".cg").to(tl.float32)
        else:
            x_y = tl.load(x_row + y_safe * stride_xc).to(tl.float32)
        loss = (1.0 - smoothing) * w_y * target_nll(M, x_y, log_total, inv_tau) + loss
        loss = tl.where(valid, loss, 0.0)
        tl.store(wy_ptr + r, w_y)
    tl.store(loss_ptr + r, loss)
    return S, A_row


@triton.jit
def _ce_target(target_ptr, weight_ptr, r, C, ignore_index, smoothing,
               HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr):
    """Row r's (y, valid, h): its class index (0 where ignored: never read out of bounds), whether it
    counts, and h = (1-ε) w_y, the weight of its hard-label term (0 where ignored).  Probability
    targets: (-1, True, 0)."""
    if PROB_TARGET:
        return -1, True, 0.0
    else:
        y, valid = class_target(target_ptr, r, C, ignore_index)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y).to(tl.float32)
        else:
            w_y = 1.0
        return y, valid, tl.where(valid, (1.0 - smoothing) * w_y, 0.0)


@triton.jit
def _ce_grad_row(x_row, t_row, target_ptr, weight_ptr, r, C, stride_xc, stride_tc, scale, inv_tau, M, S, A_row, g,
                 ignore_index, smoothing, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr):
    """The row's constants of ``_ce_grad_block``: (K, G, y, D_y, valid).

    dx_c = (g/τ) dL/dz_c, dL/dz_c = h (p_c - δ_{c,y}) + A p_c - a_c (h = (1-ε) w_y, A = Σ a_c), is
    K e_c - G a_c off the target, e_c = exp2((x_c - M)·scale) = p_c (1 + S), G = g/τ, K = G (h + A)/(1 + S);
    at the target, D_y = G (A p_y - h q_y - a_y) with q_y = 1 - p_y, or S/(1 + S) when y is the argmax
    (so the row's gradient still sums to zero at small τ), formed once a row.  S = -1 marks a row with no
    finite logit: NaN everywhere, as the composition's softmax (not ±inf)."""
    inv_total = tl.where(S == -1.0, float("nan"), 1.0 / (1.0 + S))
    G = g * inv_tau
    y, valid, h = _ce_target(target_ptr, weight_ptr, r, C, ignore_index, smoothing, HAS_WEIGHT, PROB_TARGET)
    K = G * (h + A_row) * inv_total
    D_y = 0.0
    if not PROB_TARGET:
        x_y = tl.load(x_row + y * stride_xc).to(tl.float32)
        p_y = tl.exp2((x_y - M) * scale) * inv_total
        D_y = A_row * p_y - h * target_complement(x_y, M, S, p_y, inv_total)
        if SMOOTH:
            D_y -= _ce_coefficient(t_row, weight_ptr, y, C, stride_tc, smoothing, HAS_WEIGHT, PROB_TARGET, SMOOTH)
        D_y = G * D_y
        y = y.to(tl.int32)  # compared with int32 columns (C < 2^31): one instruction an element, not four
    return K, G, y, D_y, valid


@triton.jit
def _ce_grad_block(x_row, t_row, weight_ptr, dx_row, dx_ptr, c, C, stride_xc, stride_tc, stride_dc, scale, M, K, G, y,
                   D_y, valid, smoothing, HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
                   INTERPRETED: tl.constexpr):
    """Writes dx_c = K e_c - G a_c (D_y at the target) for columns ``c`` (``_ce_grad_row``'s constants;
    0 on an ignored row, also where its logits are NaN) and returns their terms of the τ gradient's sum,
    (x - M)/2 · dx: dL/dτ = -(1/τ) Σ (x - M) dx (row_engine.py)."""
    x = load_x(x_row, c, C, stride_xc)
    v = K * tl.exp2((x - M) * scale)
    if PROB_TARGET or SMOOTH:
        v -= G * _ce_coefficient(t_row, weight_ptr, c, C, stride_tc, smoothing, HAS_WEIGHT, PROB_TARGET, SMOOTH)
    if not PROB_TARGET:
        v = tl.where(c == y, D_y, v)
    v = tl.where(valid, v, 0.0)
    tl.store(dx_row + c.to(tl.int64) * stride_dc, to_store(v, dx_ptr, INTERPRETED), mask=c < C)
    # masked classes (v = 0) add 0, NaN adds NaN; M in x units: half_gap's τ is 1
    return tl.where(v != 0.0, half_gap(x, M, 1.0) * v, 0.0)


@triton.jit
def _ce_bwd_kernel(
    # pointers
    x_ptr, target_ptr, weight_ptr, tau_ptr, m_ptr, s_ptr, a_ptr, g_ptr, den_ptr, dx_ptr, dtau_ptr,
    # shapes; program (r, j) takes columns [j·span, (j + 1)·span), span = span_blocks·BLOCK, of row r (dtau: (R, splits))
    C, B, span_blocks,
    # strides of x, of probability targets, of dx, of τ, of g (0: one scale for all rows)
    stride_xa, stride_xc, stride_xb, stride_ta, stride_tc, stride_tb,
    stride_da, stride_dc, stride_db, stride_tau, stride_g,
    # runtime scalars
    ignore_index, smoothing,
    # constants
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, SMOOTH: tl.constexpr,
    TAU_GRAD: tl.constexpr, HAS_DEN: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """dL/dz_c = g_r [h (p_c - δ_{c,y}) + A p_c - a_c], h = (1-ε) w_y, A = Σ a_c; dx = dL/dz / τ
    (``_ce_grad_block``); dL/dτ = -(1/τ²) Σ (x - M) dL/dz (row_engine.py).  HAS_DEN: g_r = g / den
    (the mean's denominator, an IEEE division as torch's)."""
    r, a, b, x_row, tau = row_start(x_ptr, tau_ptr, B, stride_xa, stride_xb, stride_tau)
    t_row = target_ptr + a * stride_ta + b * stride_tb
    dx_row = dx_ptr + a * stride_da + b * stride_db
    scale = exp2_scale(tau)
    inv_tau = 1.0 / tau
    M = tl.load(m_ptr + r)
    S = tl.load(s_ptr + r)
    g = tl.load(g_ptr + r * stride_g).to(tl.float32)
    if HAS_DEN:
        g = tl.math.div_rn(g, tl.load(den_ptr).to(tl.float32))
    A_row = 0.0
    if PROB_TARGET or SMOOTH:
        A_row = tl.load(a_ptr + r)
    K, G, y, D_y, valid = _ce_grad_row(x_row, t_row, target_ptr, weight_ptr, r, C, stride_xc, stride_tc, scale,
                                       inv_tau, M, S, A_row, g, ignore_index, smoothing, HAS_WEIGHT, PROB_TARGET,
                                       SMOOTH)
    col0 = tl.program_id(1) * span_blocks * BLOCK  # a multiple of BLOCK: aligned loads
    col_end = tl.minimum(col0 + span_blocks * BLOCK, C)
    cols = tl.arange(0, BLOCK)
    tau_acc = tl.zeros([BLOCK], tl.float32)
    for start in range(col0, col_end, BLOCK):
        tau_acc += _ce_grad_block(x_row, t_row, weight_ptr, dx_row, dx_ptr, start + cols, C, stride_xc, stride_tc,
                                  stride_dc, scale, M, K, G, y, D_y, valid, smoothing, HAS_WEIGHT, PROB_TARGET, SMOOTH,
                                  INTERPRETED)
    if TAU_GRAD:
        tl.store(dtau_ptr + r * tl.num_programs(1) + tl.program_id(1), -tl.sum(tau_acc, 0) * (2.0 * inv_tau))


@triton.jit
def _ce_grad_rescale_kernel(dx_ptr, g_ptr, n, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    """dx *= g in place, and nothing read or written when g == 1 (the usual ``loss.backward()``): the
    check is on the device, so the host never waits for g."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(dx_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        tl.store(dx_ptr + i, to_store(v * g, dx_ptr, INTERPRETED), mask=i < n)


def ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target, loss, wy, m, s, a):
    """Writes (loss, w_y, M, S, A) per row, fp32 (fused_tau._ops.ce_fwd_outputs).  ``target`` is (A*B,)
    int64 class indices or an (A, C, B) view of probabilities; w_y is None for probabilities and
    A is None without label smoothing or probabilities.  Few long rows are split across programs
    (row_engine.row_splits): the programs of a row write partial statistics (R·splits·16 bytes) and the
    last to finish combines them, in the same launch."""
    _ce_fwd_launch(x3, target, weight, tau, ignore_index, smoothing, prob_target, (loss, wy, m, s, a))


def ce_fwd_grad(x3, target, weight, tau, ignore_index, smoothing, prob_target, g, loss, wy, m, s, a, dx, dtau):
    """``ce_fwd`` and, in the same pass over the logits, what ``ce_bwd`` writes for the incoming
    gradient ``g`` (one fp32 element for every row): dx and dτ per row (None: not wanted).
    A split row (few long rows) takes ce_fwd's two launches and then ce_bwd's."""
    R, C, B = rows(x3)
    if _fwd_plan(x3, C, prob_target or smoothing > 0, True)[1] > 1:  # a second launch either way: the backward's
        ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target, loss, wy, m, s, a)
        ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, dx, dtau)
        return
    _ce_fwd_launch(x3, target, weight, tau, ignore_index, smoothing, prob_target, (loss, wy, m, s, a), g, dx, dtau)


def _fwd_plan(x3, C, has_a, write_grad):
    """(the row_launch the forward's splits are planned with, splits, span): the forward that writes the
    gradient reads each row twice and runs it ("reread"; "reread_sums" beside the weighted sums (A, D) of
    smoothing / probabilities); the forward alone runs "stream"'s block (see _ce_fwd_launch), what a program
    keeps in flight (row_engine.row_splits), and plans its splits in those blocks: at 64 × 256000 on 132 SMs,
    12 splits (768 programs, 0.97 of the SMs' last wave busy) where "row"'s twice larger block gave 11 (704,
    0.89)."""
    R = rows(x3)[0]
    if write_grad:
        cfg = row_launch("reread_sums" if has_a else "reread", C, x3.device, x3.element_size())
        running = cfg.block
    else:
        cfg = row_launch("row", C, x3.device)
        running = row_launch("stream", C, x3.device).block
    return (cfg, *row_splits(R, C, running, x3.device, running * x3.element_size()))


def ce_fwd_reduced(x3, target, weight, tau, ignore_index, smoothing, prob_target, denom_mode, check, out_dtype,
                   stats, g=None, dx=None, dtau=None, den_in=None):
    """``ce_fwd`` (``ce_fwd_grad`` when ``g`` is given: rows that are not split, ``ce_rows_split``) into
    ``stats`` = (loss, w_y, M, S, A) and dx, dτ, and ``ce_reduce``'s reduction of the rows' losses, for
    cross_entropy's reductions on the device (eager, Triton).  Rows split across programs (few long rows):
    in the same launch, the last program to finish a row's loss sums the R losses in a fixed order
    (deterministic); many rows: ce_reduce's launch after the forward's.  ``denom_mode``, ``check`` and
    ``den_in`` (DENOM_GIVEN) as ce_reduce's; the reduced loss is returned in ``out_dtype``, rounded once.
    Returns (out, den, g = 1/den, ok or None)."""
    return _ce_fwd_launch(x3, target, weight, tau, ignore_index, smoothing, prob_target, stats, g, dx, dtau,
                          (denom_mode, check, out_dtype, den_in))


def ce_rows_split(x3, prob_target, smoothing, write_grad=False):
    """Whether the forward (``write_grad``: the one that also writes the gradient, planned with its own
    block) splits the rows of ``x3`` across programs (few long rows)."""
    C = rows(x3)[1]
    return _fwd_plan(x3, C, prob_target or smoothing > 0, write_grad)[1] > 1


def _ce_fwd_launch(x3, target, weight, tau, ignore_index, smoothing, prob_target, stats, g=None, dx=None, dtau=None,
                   reduced=None):
    """Writes ``stats`` = (loss, w_y, M, S, A) (w_y, A None where not wanted) and, ``g`` given, dx and dτ;
    ``reduced`` = (denom_mode, check, out_dtype, den_in): also the rows' reduction, returned as
    (out, den, g = 1/den, ok or None) (ce_fwd_reduced)."""
    R, C, B = rows(x3)
    dev = x3.device
    f32 = dict(device=dev, dtype=torch.float32)
    loss, wy, m, s, a = stats
    has_a = a is not None
    t_strides = target.stride() if prob_target else (0, 0, 0)
    write_grad = g is not None
    tau_grad = write_grad and dtau is not None
    cfg, splits, span = _fwd_plan(x3, C, has_a, write_grad)
    assert splits == 1 or not write_grad, "a split row's gradient is ce_bwd's (ce_fwd_grad, ce_fwd_reduced)"
    if not write_grad:  # "stream"'s block, in which the span was planned ("stream_split_sums": half of it)
        cfg = row_launch("stream_split_sums" if splits > 1 and has_a else "stream", C, dev)
    block = cfg.block
    parts = [torch.empty(R * splits, **f32) for _ in range(4)] if splits > 1 else [m] * 4
    reduce_here = reduced is not None and splits > 1  # else ce_reduce's launch after this one
    denom_mode, check, out_dtype, den_in = reduced if reduce_here else (DENOM_NONE, False, None, None)
    out = torch.empty((), device=dev, dtype=out_dtype) if reduce_here else None
    den, gscale = (torch.empty((), **f32), torch.empty(1, **f32)) if reduce_here else (None, None)
    ok = torch.empty((), device=dev, dtype=torch.int32) if check else None
    ticket_buf = tickets(dev, R + 1) if splits > 1 else m
    dx = dx if write_grad else x3
    args = (x3, target, weight if weight is not None else m, tau, loss, wy if wy is not None else m, m, s,
            a if has_a else m, *parts, g if write_grad else m, dx, dtau if tau_grad else m, ticket_buf,
            *(t if t is not None else m for t in (out, den_in, den, gscale, ok)),
            R, C, B, span // block, splits,
            *x3.stride(), *t_strides, *dx.stride(), tau_stride(tau), ignore_index, float(smoothing), float(R))
    consts = dict(HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, SMOOTH=smoothing > 0, BLOCK=block,
                  SPLITS_BLOCK=max(triton.next_power_of_2(splits), 2), WRITE_GRAD=write_grad,
                  TAU_GRAD=tau_grad, REDUCE=reduce_here, DENOM=denom_mode, CHECK=check,
                  REDUCE_ROWS_BLOCK=SPLIT_REDUCE_BLOCK, INTERPRETED=interpreted())
    _ce_fwd_kernel[(R, splits)](*args, PHASE=0 if splits == 1 else 1, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages, **consts)
    if reduced is None:
        return None
    if not reduce_here:
        denom_mode, check, out_dtype, den_in = reduced
        out, den, gscale, ok = ce_reduce(dev, loss, None if prob_target else target, weight, den_in, R, C,
                                         ignore_index, denom_mode, check, out_dtype)
    return out, den, gscale, ok


RESCALE_BLOCK = 4096


def ce_grad_rescale(dx, g):
    """dx *= g (one fp32 element) in place, on the device, reading and writing nothing when g == 1."""
    n = dx.numel()
    _ce_grad_rescale_kernel[(triton.cdiv(n, RESCALE_BLOCK),)](dx, g, n, BLOCK=RESCALE_BLOCK,
                                                             INTERPRETED=interpreted(), num_warps=8)


def ce_bwd(x3, target, weight, tau, m, s, a, g, ignore_index, smoothing, prob_target, dx, dtau, den=None):
    """Writes dx ((A, C, B), x3's dtype; x3 itself to write the gradient over the logits) and dτ per row
    (None: not wanted).  ``g`` is one scale per row (A*B,) or a single element used for every row (read as
    fp32, whatever its dtype), divided by ``den`` (one element, the mean's denominator) when given.  Few
    long rows are split across programs (row_engine.row_splits); a split row's dτ is the sum of its
    programs' (R, splits) partials, in a fixed order."""
    R, C, B = rows(x3)
    t_strides = target.stride() if prob_target else (0, 0, 0)
    cfg = row_launch("row", C, x3.device)
    block = cfg.block
    splits, span = row_splits(R, C, block, x3.device, block * x3.element_size())
    dtau_split = dtau_parts(dtau, R, splits, m)
    _ce_bwd_kernel[(R, splits)](
        x3, target, weight if weight is not None else m, tau, m, s, a if a is not None else m, g,
        den if den is not None else g, dx, dtau_split,
        C, B, span // block, *x3.stride(), *t_strides, *dx.stride(), tau_stride(tau), 0 if g.numel() == 1 else 1,
        ignore_index, float(smoothing),
        HAS_WEIGHT=weight is not None, PROB_TARGET=prob_target, SMOOTH=smoothing > 0,
        TAU_GRAD=dtau is not None, HAS_DEN=den is not None, BLOCK=block, INTERPRETED=interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    sum_dtau_parts(dtau_split, dtau)
