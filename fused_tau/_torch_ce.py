"""The torch path of cross-entropy: the launchers of ``kernels/row_ce.py`` with the same arguments and
results, in torch ops over chunks of rows (_torch_row_engine.py).  Cross-entropy forms z = x / τ and
saves the logit at its argmax (``_max_logit``); its class-index targets take the hard-label epilogue
shared with kd_loss (_torch_row_engine.py: class_target, target_nll, target_complement)."""
import torch

from ._tau import compute_dtype
from ._torch_row_engine import (_as_rows, _from_rows, _max_argmax_segments, _nan_if_posinf, _rows_in, _rows_of, _stats,
                                _stats_cpu, _stats_sparse, _store_rows, _tau_rows, class_target, row_chunks,
                                row_scratch, target_complement, target_nll)
from ._torch_threads import for_each


def _z(X, sl, tau_r, cd):
    """A fresh compute-dtype buffer holding x / τ (one pass; bf16 / fp32 promotes)."""
    z = torch.div(X[sl], tau_r[sl])
    return z if z.dtype == cd else z.to(cd)


def _max_logit(X, sl, idx, cd):
    """The saved M of a chunk's rows (x units): the logit at ``idx``, the argmax of z = x / τ.  It is
    the row's max x (but for two logits that round to one z), and M / τ is max z exactly."""
    return X[sl].gather(-1, idx).squeeze(-1).to(cd)


def _half_gap_sum(X, sl, M, tau_r, cd, dz):
    """Σ_j (x_j - M τ)/2 · dz_j per row, in x units (kernels/row_engine.py, half_gap); dz = 0 terms
    (masked classes, x = -inf) add 0, a NaN adds NaN."""
    # not in place: X[sl].to(cd) is the caller's logits themselves when they are in cd already
    gap = X[sl].to(cd) * 0.5 - (M * (0.5 * tau_r[sl].squeeze(-1))).unsqueeze(-1)
    return torch.where(dz != 0, gap * dz, 0.0).sum(-1)


def _coefficients(T, sl, weight, C, smoothing, prob_target, cd, device):
    """a_c of Σ_c a_c (lse - z_c) (see kernels/row_ce.py, _ce_coefficient); broadcastable to (rows, C)."""
    w = weight.to(cd) if weight is not None else torch.ones(C, device=device, dtype=cd)
    if prob_target:
        t = T[sl].to(cd)
        if smoothing > 0:
            t = t * (1.0 - smoothing) + smoothing / C
        return w * t
    return w * (smoothing / C)


def _hard_target(target, sl, weight, ignore_index, cd, like):
    valid, y_safe = class_target(target, sl, ignore_index)
    w_y = weight.to(cd)[y_safe.squeeze(-1)] if weight is not None else torch.ones_like(like)
    return valid, y_safe, torch.where(valid, w_y, 0.0)


def ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target, loss_out, wy_out, m_out, s_out, a_rows):
    """Writes (loss, w_y, M, S, A) per row (fused_tau._ops.ce_fwd_outputs), as kernels/row_ce.py's launcher."""
    A, C, B = x3.shape
    R, cd = A * B, compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    T = _as_rows(target) if prob_target else None
    new = dict(device=x3.device, dtype=cd)
    M, s = torch.empty(R, **new), torch.empty(R, **new)
    idx = torch.empty((R, 1), device=x3.device, dtype=torch.int64)
    has_a = a_rows is not None
    gap = torch.empty(R, **new) if has_a else None

    def work(sl, scratch=None):
        # per chunk only what needs the rows (the statistics, Σ a_c (M - z_c)); the rest on all rows at once
        if scratch is None:
            z = _z(X, sl, tau_r, cd)
            M_c, S_c, idx_c = _stats(z)
        else:  # CPU: in the thread's buffers
            # the maxima from x (z = x / τ divided where needed); the sum from the segments above the floor
            # where they are few, else from z whole
            x, t = X[sl], tau_r[sl]
            M_c, idx_c, seg_max = _max_argmax_segments(x, t)
            S_c = _stats_sparse(x, M_c, idx_c, seg_max, t)
            if S_c is None or has_a:
                z = torch.div(x, t, out=_rows_in(scratch[0], sl.stop - sl.start, C))
            if S_c is None:
                M_c, S_c, idx_c, _ = _stats_cpu(z, _rows_in(scratch[1], sl.stop - sl.start, C), (M_c, idx_c))
            else:
                idx_c = idx_c.unsqueeze(-1)
        M[sl], s[sl], idx[sl] = M_c, S_c, idx_c
        if has_a:
            a = _coefficients(T, sl, weight, C, smoothing, prob_target, cd, x3.device)
            a_rows[sl] = a.sum(-1).expand(M_c.shape[0])
            gap[sl] = torch.where(a != 0, a * (M_c.unsqueeze(-1) - z), 0.0).sum(-1)  # Σ a_c (M - z_c) >= 0

    chunks = row_chunks(R, C, x3.device)
    cpu = x3.device.type == "cpu"
    for_each(chunks, work, x3.device, R * C, row_scratch(chunks, C, cd, x3.device, 2) if cpu else None)
    s = _nan_if_posinf(M, s)
    L = torch.log1p(s)
    loss = gap + a_rows * L if has_a else torch.zeros_like(M)
    if not prob_target:
        valid, y_safe, wy = _hard_target(target, slice(None), weight, ignore_index, cd, M)
        z_y = _z(X.gather(-1, y_safe), slice(None), tau_r, cd).squeeze(-1)  # x_y / τ: z's own division
        loss = torch.where(valid, (1.0 - smoothing) * wy * target_nll(M, z_y, L) + loss, 0.0)
        wy_out.copy_(wy)
    loss_out.copy_(loss)
    m_out.copy_(_max_logit(X, slice(None), idx, cd))
    s_out.copy_(s)


def ce_bwd(x3, target, weight, tau, m, s, a_rows, g, ignore_index, smoothing, prob_target, dx3, dtau):
    """Writes dx3 (x3 itself to write the gradient over the logits) and dτ per row (None: not wanted), as
    kernels/row_ce.py's launcher."""
    A, C, B = x3.shape
    R, cd = A * B, compute_dtype(x3)
    X, tau_r = _as_rows(x3), _tau_rows(tau, A, B, cd)
    T = _as_rows(target) if prob_target else None
    g = g.to(cd).reshape(-1).expand(R)
    inplace, tau_grad = dx3 is x3, dtau is not None
    # in place, the rows are written apart and copied over x3 at the end: the chunks still read x
    dx = torch.empty((R, C), device=x3.device, dtype=x3.dtype) if inplace else _rows_of(dx3)

    direct = dx.dtype == cd  # softmax written into the gradient's rows, then scaled there

    def work(sl, scratch=None):
        if scratch is None:
            z = _z(X, sl, tau_r, cd)
            p = torch.softmax(z, -1)
        else:  # CPU: in the thread's buffers
            z = torch.div(X[sl], tau_r[sl], out=_rows_in(scratch[0], sl.stop - sl.start, C))
            p = torch.softmax(z, -1, out=dx[sl] if direct else _rows_in(scratch[1], sl.stop - sl.start, C))
        M, S = m[sl] / tau_r[sl].squeeze(-1), s[sl]  # max z, exactly (_max_logit)
        A_row = a_rows[sl] if a_rows is not None else torch.zeros_like(S)
        scale = g[sl] / tau_r[sl].squeeze(-1)  # dx = (g / τ) dz
        if prob_target:
            h = torch.zeros_like(S)
        else:
            valid, y_safe, w_y = _hard_target(target, sl, weight, ignore_index, cd, S)
            h = (1.0 - smoothing) * w_y
            scale = torch.where(valid, scale, 0.0)
        # dz = h (p - δ_y) + A p - a
        if not prob_target:
            p_y, q_y = target_complement(p, z, y_safe, M, S)
            fix = scale * (-h * q_y + A_row * p_y)
        dz = p.mul_((scale * (h + A_row)).unsqueeze(-1))
        if not prob_target:
            dz.scatter_(-1, y_safe, fix.unsqueeze(-1))
        if a_rows is not None:
            dz.sub_(_coefficients(T, sl, weight, C, smoothing, prob_target, cd, x3.device)
                    * scale.unsqueeze(-1))
        if tau_grad:
            # dL/dτ = -(1/τ) Σ z dL/dz = -(1/τ) Σ (x - M τ) dx  (Σ dz = 0), in x units
            dtau[sl] = -_half_gap_sum(X, sl, M, tau_r, cd, dz) * (2.0 / tau_r[sl].squeeze(-1))
        if scratch is None or not direct:
            dx[sl] = dz

    chunks = row_chunks(R, C, x3.device)
    cpu = x3.device.type == "cpu"
    for_each(chunks, work, x3.device, R * C, row_scratch(chunks, C, cd, x3.device, 1 if direct else 2) if cpu else None)
    if inplace:
        x3.copy_(_from_rows(dx, A, B))
    else:
        _store_rows(dx, dx3)


def ce_fwd_grad(x3, target, weight, tau, ignore_index, smoothing, prob_target, g, loss, wy, m, s, a_rows, dx, dtau):
    """``ce_fwd``, then ``ce_bwd`` for the incoming gradient ``g`` (one element for every row), as
    kernels/row_ce.py's launcher of the same name."""
    ce_fwd(x3, target, weight, tau, ignore_index, smoothing, prob_target, loss, wy, m, s, a_rows)
    ce_bwd(x3, target, weight, tau, m, s, a_rows, g, ignore_index, smoothing, prob_target, dx, dtau)


def ce_grad_rescale(dx, g):
    """dx *= g in place; on the CPU nothing is touched when g == 1 (elsewhere the check would wait for
    the device: the product is taken)."""
    if g.device.type == "cpu" and bool(g.reshape(()) == 1):  # host-ok: a CPU tensor
        return
    cd = torch.promote_types(dx.dtype, torch.float32)
    g = g.reshape(()).to(cd)
    if dx.dtype == cd:
        dx.mul_(g)
    else:  # a half-precision gradient is scaled in fp32 and rounded once
        dx.copy_(dx.to(cd).mul_(g))
