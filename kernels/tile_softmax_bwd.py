"""The tile engine's backward for a softmax cross-entropy over [positive, counted columns of y = a @ b.T]
(infonce, MoCo queue or in-batch, and NT-Xent): the tiles' kernels of tile_bwd.py form u from the incoming
gradient and the forward's TILE_* statistics (SCALE_FROM_G), and one _tile_bwd_rows_kernel launch a gradient
sums their splits' partials and adds the positive's rank-one terms, rounded once: no torch operator between
the forward's statistics and the gradients."""
import torch
import triton
import triton.language as tl

from .tile_bwd import _fused_parts, _materialized, _softmax_scale, _tile_bwd_materialized
from .tile_engine import _block_do, _config, _interpreted, _row_tau
from .tl_math import to_store

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
