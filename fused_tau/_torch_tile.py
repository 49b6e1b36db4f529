"""The torch path of the tile engine: the launchers of ``kernels/tile.py`` with the same
arguments and results, written with torch matmuls over chunks of columns, so the N × K
logits matrix never exists (a chunk holds about ``CHUNK_ELEMENTS`` logits).

The engine works in dot units y_ij = a_i · b_j + bias_j (before 1/τ_i) over the columns j
that count (j < K, j ≠ t_i the row's target, j ≠ i + diag_offset when self-similarity is
excluded); exp only ever sees a difference of dot products divided by τ (kernels/tile.py):
  forward   m_i = max_j y_ij,  s_i = Σ_j exp((y_ij - m_i) / τ_i),  and y_{i,t_i} (from the same tiles)
  backward  Q_ij = u_i exp((y_ij - c_i) / τ_i) over the same columns, for the caller's per-row
            shift c (dot units) and scale u, and from it
            da = Q @ b,  db = Qᵀ @ a,  dbias = Σ_i Q_ij,  and for dL/dτ zp_i = Σ_j (y_ij - r_i) Q_ij
            with the caller's reference r (dot units).
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


def _dots(a_c, b, bias, lo, hi, cd):
    """y = a @ b[lo:hi].T + bias[lo:hi]: products of half-precision inputs accumulate and stay in
    fp32, as the kernels' tl.dot does."""
    y = a_c @ b[lo:hi].to(cd).T
    if bias is not None:
        y += bias[lo:hi].to(cd)
    return y


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
    """Returns (m, s, y_target or None) in dot units, fp32 (fp64 for fp64 inputs), one per row of ``a``."""
    N, K = a.shape[0], b.shape[0]
    cd = _compute_dtype(a)
    a_c = a.to(cd)
    tau_col = tau_rows.to(cd).unsqueeze(-1)
    m = torch.full((N,), float("-inf"), device=a.device, dtype=cd)
    s = torch.zeros(N, device=a.device, dtype=cd)
    zy = torch.zeros(N, device=a.device, dtype=cd) if target is not None else None
    for lo, hi in _col_chunks(N, K):
        y = _dots(a_c, b, bias, lo, hi, cd)
        excluded = _excluded_columns(N, lo, hi, target, diag_offset, a.device)
        if target is not None:
            col, hit = excluded[0]
            zy = torch.where(hit.squeeze(-1), y.gather(1, col).squeeze(-1), zy)
        _exclude_(y, excluded, float("-inf"))
        m_new = torch.maximum(m, y.amax(1))
        safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no -inf - -inf
        s = s * torch.exp((m - safe) / tau_rows.to(cd)) + y.sub_(safe.unsqueeze(-1)).div_(tau_col).exp_().sum(1)
        m = m_new
    return m, s, zy


def tile_bwd(a, b, bias, tau_rows, target, diag_offset, shift, scale, ref, need_da, need_db, need_zp):
    """Returns (da, db, dbias, zp), each None when not asked for (dbias only with a bias), for
    Q_ij = scale_i exp((y_ij - shift_i) / τ_i) over the counted columns and zp_i = Σ_j (y_ij - ref_i) Q_ij."""
    N, K = a.shape[0], b.shape[0]
    cd = _compute_dtype(a)
    a_c = a.to(cd)
    tau_col = tau_rows.to(cd).unsqueeze(-1)
    da = torch.zeros(a.shape, device=a.device, dtype=cd) if need_da else None
    db = torch.empty(b.shape, device=b.device, dtype=b.dtype) if need_db else None
    dbias = torch.empty(K, device=b.device, dtype=cd) if (need_db and bias is not None) else None
    zp = torch.zeros(N, device=a.device, dtype=cd) if need_zp else None
    shift_col = shift.to(cd).unsqueeze(-1)
    scale_col = scale.to(cd).unsqueeze(-1)
    ref_col = ref.to(cd).unsqueeze(-1)
    for lo, hi in _col_chunks(N, K):
        y = _dots(a_c, b, bias, lo, hi, cd)
        Q = _exclude_(((y - shift_col) / tau_col).exp_().mul_(scale_col),
                      _excluded_columns(N, lo, hi, target, diag_offset, a.device), 0.0)
        if need_zp:
            zp += (y.sub_(ref_col) * Q).sum(1)  # y is finite here (no column was set to -inf): 0 · y = 0
        if need_da:
            da += Q @ b[lo:hi].to(cd)
        if need_db:
            db[lo:hi] = (Q.T @ a_c).to(b.dtype)
            if dbias is not None:
                dbias[lo:hi] = Q.sum(0)
    return (da.to(a.dtype) if need_da else None), db, dbias, zp
