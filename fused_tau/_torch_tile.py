"""The torch path of the tile engine: the launchers of ``kernels/tile.py`` with the same
arguments and results, written with torch matmuls over chunks of columns, so the N × K
logits matrix never exists (a chunk holds about ``CHUNK_ELEMENTS`` logits).

The engine computes, for z_ij = (a_i · b_j + bias_j) / τ_i over the columns j that
count (j < K, j ≠ t_i the row's target, j ≠ i + diag_offset when self-similarity is
excluded):
  forward   m_i = max_j z_ij,  s_i = Σ_j exp(z_ij - m_i),  and z_{i,t_i} (read from the same tiles)
  backward  P_ij = c_i exp(z_ij - lse_i) over the same columns, and from it
            da = (P / τ) @ b,  db = (P / τ)ᵀ @ a,  dbias = Σ_i P_ij / τ_i,
            zp_i = Σ_j (z_ij - lse_i) P_ij  (for dL/dτ).
The target column and any rank-one terms are the caller's (fused_tau/contrastive.py).
"""
import torch

CHUNK_ELEMENTS = 1 << 20


def _col_chunks(N, K):
    step = max(1, CHUNK_ELEMENTS // max(N, 1))
    for lo in range(0, K, step):
        yield lo, min(K, lo + step)


def _compute_dtype(a):
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _logits(a_c, b, bias, tau_col, lo, hi, cd):
    # products of half-precision inputs accumulate and stay in fp32, as the kernels' tl.dot does
    z = a_c @ b[lo:hi].to(cd).T
    if bias is not None:
        z += bias[lo:hi].to(cd)
    return z.div_(tau_col)


def _excluded_columns(N, lo, hi, target, diag_offset, device):
    """Per excluded kind (target, self), the chunk-local column of each row and whether it is in the chunk."""
    out = []
    if target is not None:
        out.append(target)
    if diag_offset is not None:
        out.append(torch.arange(N, device=device) + diag_offset)
    return [((c - lo).clamp(0, hi - lo - 1).unsqueeze(-1), ((c >= lo) & (c < hi)).unsqueeze(-1)) for c in out]


def _exclude_(z, excluded, fill):
    """Set the excluded (row, column) entries of the chunk to ``fill``: an O(N) scatter, no N × chunk mask."""
    for col, hit in excluded:
        z.scatter_(1, col, torch.where(hit, torch.full_like(col, 0, dtype=z.dtype) + fill, z.gather(1, col)))
    return z


def tile_fwd(a, b, bias, tau_rows, target, diag_offset):
    """Returns (m, s, z_target or None), fp32 (fp64 for fp64 inputs), one per row of ``a``."""
    N, K = a.shape[0], b.shape[0]
    cd = _compute_dtype(a)
    a_c = a.to(cd)
    tau_col = tau_rows.to(cd).unsqueeze(-1)
    m = torch.full((N,), float("-inf"), device=a.device, dtype=cd)
    s = torch.zeros(N, device=a.device, dtype=cd)
    zy = torch.zeros(N, device=a.device, dtype=cd) if target is not None else None
    for lo, hi in _col_chunks(N, K):
        z = _logits(a_c, b, bias, tau_col, lo, hi, cd)
        excluded = _excluded_columns(N, lo, hi, target, diag_offset, a.device)
        if target is not None:
            col, hit = excluded[0]
            zy = torch.where(hit.squeeze(-1), z.gather(1, col).squeeze(-1), zy)
        _exclude_(z, excluded, float("-inf"))
        m_new = torch.maximum(m, z.amax(1))
        safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no -inf - -inf
        s = s * torch.exp(m - safe) + z.sub_(safe.unsqueeze(-1)).exp_().sum(1)
        m = m_new
    return m, s, zy


def tile_bwd(a, b, bias, tau_rows, target, diag_offset, lse, coef, need_da, need_db, need_zp):
    """Returns (da, db, dbias, zp), each None when not asked for (dbias only with a bias)."""
    N, K = a.shape[0], b.shape[0]
    cd = _compute_dtype(a)
    a_c = a.to(cd)
    tau_col = tau_rows.to(cd).unsqueeze(-1)
    da = torch.zeros(a.shape, device=a.device, dtype=cd) if need_da else None
    db = torch.empty(b.shape, device=b.device, dtype=b.dtype) if need_db else None
    dbias = torch.empty(K, device=b.device, dtype=cd) if (need_db and bias is not None) else None
    zp = torch.zeros(N, device=a.device, dtype=cd) if need_zp else None
    scale = coef.to(cd).unsqueeze(-1)
    for lo, hi in _col_chunks(N, K):
        z = _logits(a_c, b, bias, tau_col, lo, hi, cd).sub_(lse.unsqueeze(-1))
        P = _exclude_(torch.exp(z).mul_(scale), _excluded_columns(N, lo, hi, target, diag_offset, a.device), 0.0)
        if need_zp:
            zp += (z * P).sum(1)  # z is finite here (no column was set to -inf): 0 · z = 0
        P.div_(tau_col)
        if need_da:
            da += P @ b[lo:hi].to(cd)
        if need_db:
            db[lo:hi] = (P.T @ a_c).to(b.dtype)
            if dbias is not None:
                dbias[lo:hi] = P.sum(0)
    return (da.to(a.dtype) if need_da else None), db, dbias, zp
