"""The torch path of the tile engine's losses, and the namespace fused_tau's dispatch takes for it
(kernels/tile.py's names): the engine's own launchers tile_fwd and tile_bwd (_torch_tile.py: chunks of
columns, the statistics in dot units), and the contrastive losses written on them as kernels/tile_softmax_bwd.py
and kernels/tile_clip.py write theirs on the kernels: infonce's and NT-Xent's backward (the tiles' softmax
backward plus the positive's terms) and clip_loss in both directions."""
import torch

from ._tau import compute_dtype
from ._torch_tile import _infonce_rows, _tile_lse, _write_loss, tile_bwd, tile_fwd
from .kernels import CLIP_DPOS, CLIP_LOSS, CLIP_POS, CLIP_SHIFT_C, CLIP_SHIFT_R, CLIP_W_C, CLIP_W_R

__all__ = ["tile_fwd", "tile_bwd", "infonce_bwd", "ntxent_bwd", "clip_fwd", "clip_bwd"]


def _softmax_scale(g, g_div, tau, e_pos, e_rest, n, cd):
    """u_i = (g_i / g_div) / (τ_i (e_pos_i + e_rest_i)), the tiles' Q = u exp((y - shift)/τ) = g p / τ of a
    softmax over [positive, counted columns] (kernels/tile_bwd.py's _softmax_scale)."""
    return (g.to(cd).reshape(-1) / g_div).expand(n) / (tau.to(cd).expand(n) * (e_pos + e_rest))


def infonce_bwd(a, b, tau, target, key, shift, ref, e_pos, e_rest, g, g_div, label_offset, da, db, dkey, dtau):
    """kernels/tile_bwd.py's infonce_bwd: the gradients of a softmax cross-entropy over [positive, counted
    columns] from the forward's statistics, here with tile_bwd and torch operators for the positive's
    terms (c_i = dL/dpos_i = -u_i e_rest_i; da_i += c_i p_i, the positive's partner p_i = key_i or
    b[t_i]; c_i a_i into dkey_i or db[t_i]); dtau_i = -zp_i / τ_i + 0 · c_i."""
    N = a.shape[0]
    cd = compute_dtype(a)
    u = _softmax_scale(g, g_div, tau, e_pos, e_rest, N, cd)
    zp = torch.empty(N, device=a.device, dtype=cd) if dtau is not None else None
    in_batch = target is not None
    db_tiles = db if db is not None else None
    if da is not None or db_tiles is not None or zp is not None:
        tile_bwd(a, b, None, tau, target, None, shift, u, ref, da, db_tiles, None, zp)
    c = -u * e_rest  # dL/d(a_i · p_i) = g (p_pos - 1) / τ, the same rounding as the tiles' Q at a tie
    if dtau is not None:
        # Σ_j dL/dy_ij = 0 with the positive's own term 0; + 0 · c: a NaN row stays NaN
        torch.add(-zp / tau.to(cd).expand(N), 0.0 * c, out=dtau)
    c = c.unsqueeze(-1)
    if da is not None:
        partner = b[label_offset:label_offset + N] if in_batch else key
        da += (c * partner).to(da.dtype)
    if in_batch and db is not None:
        db[label_offset:label_offset + N] += (c * a).to(db.dtype)
    if dkey is not None:
        dkey.copy_(c * a)


def ntxent_bwd(z, tau, target, shift, ref, e_pos, e_rest, g, g_div, dz, dtau):
    """kernels/tile_bwd.py's ntxent_bwd: dz = da + db of the 2N views' softmaxes over [positive, the other
    views] with both positive terms (c_i z_{t_i} into row i, c_i z_i into row t_i), summed in the compute
    dtype and rounded once, and dtau_i = -zp_i / τ_i + 0 · c_i; here with tile_bwd and torch operators."""
    n2 = z.shape[0]
    cd = compute_dtype(z)
    tau_c = tau.to(cd).expand(n2)
    u = _softmax_scale(g, g_div, tau, e_pos, e_rest, n2, cd)
    need_dz = dz is not None
    zp = torch.empty(n2, device=z.device, dtype=cd) if dtau is not None else None
    da = torch.empty(z.shape, device=z.device, dtype=cd)
    db = torch.empty(z.shape, device=z.device, dtype=cd) if need_dz else None
    tile_bwd(z, z, None, tau, target, 0, shift, u, ref, da, db, None, zp)
    c = -u * e_rest
    if dtau is not None:
        torch.add(-zp / tau_c, 0.0 * c, out=dtau)
    if need_dz:
        c = c.unsqueeze(-1)
        z_c = z.to(cd)
        total = da.add_(db).add_(c * z_c[target])
        total.index_add_(0, target, c * z_c)
        dz.copy_(total)


def _vectors(like, count):
    """``count`` compute-dtype vectors of one element per row of ``like``."""
    return [like.new_empty(like.shape[0], dtype=compute_dtype(like)) for _ in range(count)]


def clip_fwd(a, b, tau, stats, loss):
    """kernels/tile.py's clip_fwd: writes the (CLIP_STATS, N) statistics of clip_loss, here from two passes
    of tile_fwd (a's rows against b, b's rows against a, the positives on the diagonal), and clip_loss
    (the mean of CLIP_LOSS) into ``loss`` (None: not written) in its own dtype."""
    N = a.shape[0]
    target = torch.arange(N, device=a.device)
    tau_c = tau.to(compute_dtype(a)).expand(N)
    m_r, s_r, pos, m_c, s_c, pos_c = _vectors(a, 6)
    _tile_lse(a, b, None, tau, target, None, m_r, s_r, pos)
    _tile_lse(b, a, None, tau, target, None, m_c, s_c, pos_c)
    nll_r, shift_r, e_pos_r, e_neg_r = _infonce_rows(m_r, s_r, pos, tau_c)
    nll_c, shift_c, e_pos_c, e_neg_c = _infonce_rows(m_c, s_c, pos, tau_c)
    w_r = 1.0 / ((2 * N) * tau_c * (e_pos_r + e_neg_r))  # the mean's 1/N and the two directions' 1/2
    w_c = 1.0 / ((2 * N) * tau_c * (e_pos_c + e_neg_c))
    torch.stack([(nll_r + nll_c) * 0.5, shift_r, w_r, shift_c, w_c, -(w_r * e_neg_r + w_c * e_neg_c), pos], out=stats)
    _write_loss(loss, stats[CLIP_LOSS], "mean")


def _add_into(out, x, y):
    """out = x + y, rounded once to out's dtype."""
    if out.dtype == x.dtype:
        torch.add(x, y, out=out)
    else:
        out.copy_(x + y)


def clip_bwd(a, b, tau, stats, g, da, db, zp):
    """kernels/tile.py's clip_bwd: writes da, db and zp (each None when not wanted) for G = g (Qr + Qc) off
    the diagonal and g·dpos on it, here from two passes of tile_bwd (a's rows against b, b's rows against
    a) in the compute dtype, rounded once to the inputs' dtype."""
    N = a.shape[0]
    cd = compute_dtype(a)
    a_c, b_c, g = a.to(cd), b.to(cd), g.to(cd)
    target = torch.arange(N, device=a.device)
    pos = stats[CLIP_POS]
    need_da, need_db, need_zp = da is not None, db is not None, zp is not None
    da_r, da_c = (torch.empty_like(a_c) for _ in range(2)) if need_da else (None, None)
    db_r, db_c = (torch.empty_like(b_c) for _ in range(2)) if need_db else (None, None)
    zp_r, zp_c = _vectors(a_c, 2) if need_zp else (None, None)
    tile_bwd(a_c, b_c, None, tau, target, None, stats[CLIP_SHIFT_R], g * stats[CLIP_W_R], pos, da_r, db_r, None, zp_r)
    tile_bwd(b_c, a_c, None, tau, target, None, stats[CLIP_SHIFT_C], g * stats[CLIP_W_C], pos, db_c, da_c, None, zp_c)
    dpos = (g * stats[CLIP_DPOS]).unsqueeze(-1)
    if need_da:
        _add_into(da, da_r + da_c, dpos * b_c)
    if need_db:
        _add_into(db, db_r + db_c, dpos * a_c)
    if need_zp:
        torch.add(zp_r, zp_c, out=zp)
