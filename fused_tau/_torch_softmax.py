"""The torch path of the softmax family (softmax, log_softmax, logsumexp; Gumbel-softmax's backward):
the launchers of ``kernels/row_softmax.py`` with the same arguments and results, in torch ops over
chunks of rows (_torch_row_engine.py).  The softmax family works in x units as the kernels do
(``_shifted_z``: (x - M) / τ, exact near the max)."""
import torch

from ._dispatch import MODE_LSE, MODE_SOFTMAX
from ._tau import compute_dtype
from ._torch_row_engine import (_as_rows, _exp, _exp_, _nan_if_posinf, _rows_of, _stats, _store_rows, _tau_rows,
                                row_chunks)
from ._torch_threads import for_each


def _shifted_z(X, sl, tau_r, cd, M=None):
    """``(d, c)``: d = (x - c) / τ for a chunk's rows, c the row's max logit (x units; ``M``: the saved
    one, else taken from the rows) where it is finite, else 0 (a row with ±inf or NaN keeps z = x / τ
    and its special values).  x - c is exact near the max, so d has one rounding relative to itself,
    where z = x / τ rounds relative to |x| / τ: at x ~ 1e4, τ = 1e-3 one ulp of z is 1 in the exponent.
    d's max is 0 where c is the max; the row's statistics follow from d as from z (lse = c/τ + lse(d))."""
    x = X[sl]
    if M is None:
        M = x.amax(-1)
    c = torch.where(torch.isfinite(M), M, 0).to(cd).unsqueeze(-1)
    return torch.sub(x, c).div_(tau_r[sl]), c


def softmax_fwd(x3, tau, mode, out3, m, s):
    """Writes (out, M, S) (fused_tau._ops.softmax_fwd_outputs), as kernels/row_softmax.py's launcher."""
    A, C, B = x3.shape
    R, cd = A * B, compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    out = out3 if mode == MODE_LSE else _rows_of(out3)

    def work(sl):
        z, c = _shifted_z(X, sl, tau_r, cd)
        M, S, _ = _stats(z)  # M = 0 where c is the row's max, else ±inf or NaN
        if mode != MODE_LSE:
            S = _nan_if_posinf(M, S)
        t, c = tau_r[sl].squeeze(-1), c.squeeze(-1)
        m[sl], s[sl] = c + t * M, S  # max x
        if mode == MODE_LSE:
            out[sl] = t * (M + torch.log1p(S)) + c
        elif mode == MODE_SOFTMAX:
            out[sl] = _exp_(z - M.unsqueeze(-1)).div_((1.0 + S).unsqueeze(-1))
        else:
            # log p_j = (z_j - M) - log1p(S): exactly -log1p(S) at the argmax
            out[sl] = z.sub_(M.unsqueeze(-1)).sub_(torch.log1p(S).unsqueeze(-1))

    for_each(row_chunks(R, C, x3.device), work, x3.device, R * C)
    if mode != MODE_LSE:
        _store_rows(out, out3)


def softmax_bwd(y, g, x3, m, s, tau, log, dx3, dtau):
    """Writes dx and dτ per row (None: not wanted), as kernels/row_softmax.py's launcher."""
    A, C, B = x3.shape
    R, cd = A * B, compute_dtype(x3)
    Y, G, X, tau_r = _as_rows(y), _as_rows(g), _as_rows(x3), _tau_rows(tau, A, B, cd)
    dx, tau_grad = _rows_of(dx3), dtau is not None

    def work(sl):
        # .to() returns the saved output itself when the dtype matches: no in-place op on it
        yy, gg = Y[sl].to(cd), G[sl].to(cd)
        p = _exp(yy) if log else yy
        if log:
            dz = gg - p * gg.sum(-1, keepdim=True)
        else:
            dz = yy * (gg - (gg * yy).sum(-1, keepdim=True))
        if tau_grad:
            # -(1/τ²) Σ (x - c) dz (Σ dz = 0), in x units, c = Σ p x: the rounding of the saved y breaks
            # Σ dz = 0 by errors ∝ y |x - c|, least at the p-weighted mean (kernels/row_softmax.py)
            t = tau_r[sl].squeeze(-1)
            x = X[sl].to(cd)  # read only: it may be the caller's logits
            c_half = torch.where(p != 0, p * x, 0.0).sum(-1, keepdim=True) * 0.5
            half = torch.where(dz != 0, (x * 0.5 - c_half) * dz, 0.0).sum(-1)
            dtau[sl] = -(half / t) * (2.0 / t)
        dx[sl] = dz.div_(tau_r[sl])

    for_each(row_chunks(R, C, y.device), work, y.device, R * C)
    _store_rows(dx, dx3)


def lse_bwd(x3, m, s, tau, g, dx3, dtau):
    """Writes dx and dτ per row (None: not wanted), as kernels/row_softmax.py's launcher."""
    A, C, B = x3.shape
    R, cd = A * B, compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    dx, tau_grad = _rows_of(dx3), dtau is not None

    def work(sl):
        z, c = _shifted_z(X, sl, tau_r, cd, m[sl])
        M, S = (m[sl].unsqueeze(-1) - c) / tau_r[sl], s[sl]  # max z: 0, or the row's ±inf / NaN
        # from the forward's statistics: a +inf logit gets NaN, the others 0, as in torch
        p = _exp_(z - M).div_((1.0 + S).unsqueeze(-1))
        gg = g[sl].to(cd)
        if tau_grad:
            gap = torch.where(p != 0, p * z.sub_(M), 0.0).sum(-1)  # Σ p (z - M) <= 0; NaN stays
            dtau[sl] = gg * (torch.log1p(S) - gap)
        dx[sl] = p.mul_(gg.unsqueeze(-1))

    for_each(row_chunks(R, C, x3.device), work, x3.device, R * C)
    _store_rows(dx, dx3)
