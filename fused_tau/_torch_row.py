"""The torch path of the row engine: the launchers of ``kernels/row.py`` with the
same arguments and results, written with torch ops, for devices without Triton.

Same numerics as the kernels (the ``(M, S)`` statistics and the exact small-τ
forms), computed in fp32 (fp64 for fp64 inputs) over chunks of rows, so a
temporary is never larger than ``CHUNK_ELEMENTS`` elements whatever the input.
"""
import torch

from ._dispatch import MODE_LSE, MODE_SOFTMAX

CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_rows(t3):
    """(A, C, B) -> (A*B, C); a view when B == 1."""
    A, C, B = t3.shape
    return t3.permute(0, 2, 1).reshape(A * B, C)


def _from_rows(rows, A, B):
    C = rows.shape[1]
    return rows.reshape(A, B, C).permute(0, 2, 1)


def _chunks(R, C):
    step = max(1, CHUNK_ELEMENTS // max(C, 1))
    for lo in range(0, R, step):
        yield slice(lo, min(R, lo + step))


def _tau_rows(tau, A, B, dtype):
    t = tau.to(dtype).reshape(-1)
    return t.expand(A * B) if t.numel() == 1 else t.repeat_interleave(B)


def _stats(z):
    """M = max z and S = Σ_{j ≠ argmax} exp(z_j - M) per row (see kernels/tl_math.py)."""
    M = z.amax(-1, keepdim=True)
    valid = z > float("-inf")
    at_top = valid & (z == M)
    e = torch.exp(torch.where(valid, z - M, float("-inf")))
    # (count - 1) first: adding 1.0 to a sum of 1e-9 and subtracting it again would round to 0.
    S = torch.where(at_top, 0.0, e).sum(-1) + (at_top.sum(-1) - 1).to(z.dtype)
    return M.squeeze(-1), S


def _z(X, sl, tau_r, cd):
    return X[sl].to(cd) / tau_r[sl].unsqueeze(-1)


def softmax_fwd(x3, tau, mode):
    A, C, B = x3.shape
    R, cd = A * B, _compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    m = torch.empty(R, device=x3.device, dtype=cd)
    s = torch.empty_like(m)
    out = torch.empty(R if mode == MODE_LSE else (R, C), device=x3.device, dtype=x3.dtype)
    for sl in _chunks(R, C):
        z = _z(X, sl, tau_r, cd)
        M, S = _stats(z)
        m[sl], s[sl] = M, S
        if mode == MODE_LSE:
            out[sl] = tau_r[sl] * (M + torch.log1p(S))
        elif mode == MODE_SOFTMAX:
            out[sl] = torch.exp(z - M.unsqueeze(-1)) / (1.0 + S).unsqueeze(-1)
        else:
            out[sl] = (z - M.unsqueeze(-1)) - torch.log1p(S).unsqueeze(-1)
    if mode != MODE_LSE:
        out = _from_rows(out, A, B).contiguous()
    return out, m, s


def softmax_bwd(y, g, x3, m, s, tau, log, tau_grad):
    A, C, B = x3.shape
    R, cd = A * B, _compute_dtype(x3)
    Y, G, X, tau_r = _as_rows(y), _as_rows(g), _as_rows(x3), _tau_rows(tau, A, B, cd)
    dx = torch.empty((R, C), device=y.device, dtype=y.dtype)
    dtau = torch.empty(R, device=y.device, dtype=cd) if tau_grad else None
    for sl in _chunks(R, C):
        yy, gg = Y[sl].to(cd), G[sl].to(cd)
        if log:
            dz = gg - torch.exp(yy) * gg.sum(-1, keepdim=True)
        else:
            dz = yy * (gg - (gg * yy).sum(-1, keepdim=True))
        dx[sl] = dz / tau_r[sl].unsqueeze(-1)
        if tau_grad:
            lse = (m[sl] + torch.log1p(s[sl])).unsqueeze(-1)
            z = _z(X, sl, tau_r, cd)
            dtau[sl] = -torch.where(dz != 0, (z - lse) * dz, 0.0).sum(-1) / tau_r[sl]
    return _from_rows(dx, A, B).contiguous(), dtau


def lse_bwd(x3, m, s, tau, g, tau_grad):
    A, C, B = x3.shape
    R, cd = A * B, _compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    dx = torch.empty((R, C), device=x3.device, dtype=x3.dtype)
    dtau = torch.empty(R, device=x3.device, dtype=cd) if tau_grad else None
    for sl in _chunks(R, C):
        z = _z(X, sl, tau_r, cd)
        M = m[sl].unsqueeze(-1)
        p = torch.exp(z - M) / (1.0 + s[sl]).unsqueeze(-1)
        gg = g[sl].to(cd).unsqueeze(-1)
        dx[sl] = gg * p
        if tau_grad:
            gap = torch.where(p != 0, p * (M - z), 0.0).sum(-1)
            dtau[sl] = gg.squeeze(-1) * (torch.log1p(s[sl]) + gap)
    return _from_rows(dx, A, B).contiguous(), dtau


def _coefficients(T, sl, weight, C, smoothing, prob_target, cd, like):
    """a_c of Σ_c a_c (lse - z_c) (see kernels/row.py, _ce_coefficient)."""
    w = weight.to(cd) if weight is not None else torch.ones(C, device=like.device, dtype=cd)
    if prob_target:
        t = T[sl].to(cd)
        if smoothing > 0:
            t = t * (1.0 - smoothing) + smoothing / C
        return w * t
    return (w * (smoothing / C)).expand_as(like)


def _gap(z, M, a):
    """Σ_c a_c (M - z_c), a_c = 0 terms exactly 0."""
    return torch.where(a != 0, a * (M.unsqueeze(-1) - z), 0.0).sum(-1)


def ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target):
    A, C, B = x3.shape
    R, cd = A * B, _compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    T = _as_rows(target) if prob_target else None
    new = dict(device=x3.device, dtype=cd)
    loss, m, s = torch.empty(R, **new), torch.empty(R, **new), torch.empty(R, **new)
    has_a = prob_target or smoothing > 0
    a_rows = torch.empty(R, **new) if has_a else None
    wy = None if prob_target else torch.empty(R, **new)
    for sl in _chunks(R, C):
        z = _z(X, sl, tau_r, cd)
        M, S = _stats(z)
        m[sl], s[sl] = M, S
        L = torch.log1p(S)
        part = torch.zeros_like(M)
        if has_a:
            a = _coefficients(T, sl, weight, C, smoothing, prob_target, cd, z)
            a_rows[sl] = a.sum(-1)
            part = _gap(z, M, a) + a_rows[sl] * L
        if not prob_target:
            y = target[sl]
            valid = y != ignore_index
            y_safe = torch.where(valid, y, 0)
            w_y = weight.to(cd)[y_safe] if weight is not None else torch.ones_like(M)
            w_y = torch.where(valid, w_y, 0.0)
            z_y = z.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1)
            part = (1.0 - smoothing) * w_y * ((M - z_y) + L) + part
            part = torch.where(valid, part, 0.0)
            wy[sl] = w_y
        loss[sl] = part
    return loss, wy, m, s, a_rows


def ce_bwd(x3, target, weight, tau, m, s, a_rows, g, ignore_index, smoothing, prob_target,
           tau_grad, inplace=False):
    A, C, B = x3.shape
    R, cd = A * B, _compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    T = _as_rows(target) if prob_target else None
    g = g.to(cd).reshape(-1).expand(R)
    dx = torch.empty((R, C), device=x3.device, dtype=x3.dtype)
    dtau = torch.empty(R, device=x3.device, dtype=cd) if tau_grad else None
    cols = torch.arange(C, device=x3.device)
    for sl in _chunks(R, C):
        z = _z(X, sl, tau_r, cd)
        M, S = m[sl].unsqueeze(-1), s[sl].unsqueeze(-1)
        p = torch.exp(z - M) / (1.0 + S)
        dz = torch.zeros_like(z)
        valid = torch.ones_like(M, dtype=torch.bool)
        if not prob_target:
            y = target[sl].unsqueeze(-1)
            valid = y != ignore_index
            w_y = weight.to(cd)[torch.where(valid, y, 0)] if weight is not None else torch.ones_like(M)
            q = torch.where(z == M, S / (1.0 + S), 1.0 - p)
            dz = (1.0 - smoothing) * w_y * torch.where(cols == y, -q, p)
        if a_rows is not None:
            a = _coefficients(T, sl, weight, C, smoothing, prob_target, cd, z)
            dz = dz + a_rows[sl].unsqueeze(-1) * p - a
        dz = torch.where(valid, g[sl].unsqueeze(-1) * dz, 0.0)
        dx[sl] = dz / tau_r[sl].unsqueeze(-1)
        if tau_grad:
            dtau[sl] = -torch.where(dz != 0, (z - M) * dz, 0.0).sum(-1) / tau_r[sl]
    dx = _from_rows(dx, A, B)
    if inplace:
        return x3.copy_(dx), dtau
    return dx.contiguous(), dtau
