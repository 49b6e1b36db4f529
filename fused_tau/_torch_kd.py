"""The torch path of distillation: the launchers of ``kernels/row_kd.py`` with the same
arguments and results, in torch ops over chunks of rows (fp32; fp64 for fp64 inputs).
The formulas are the kernel's (see its module docstring)."""
import torch

from ._torch_row import _compute_dtype, _exp, _nan_if_posinf, _stats, for_each, row_chunks


def _tau_col(tau, R, cd):
    t = tau.to(cd).reshape(-1)
    return (t.expand(R) if t.numel() == 1 else t).unsqueeze(-1)


def _rows(s2, t2, sl, tau_c, cd):
    zs = torch.div(s2[sl], tau_c[sl]).to(cd)
    zt = torch.div(t2[sl], tau_c[sl]).to(cd)
    Ms, Ss, _ = _stats(zs)
    Mt, St, _ = _stats(zt)
    Ss, St = _nan_if_posinf(Ms, Ss), _nan_if_posinf(Mt, St)
    # (z - M) - log1p(S): M + log1p(S) would round the lse to |M|'s ulp
    lp = (zs - Ms.unsqueeze(-1)) - torch.log1p(Ss).unsqueeze(-1)
    lq = (zt - Mt.unsqueeze(-1)) - torch.log1p(St).unsqueeze(-1)
    return zs, zt, lp, lq, (Ms, Ss, Mt, St)


def _xlogy_gap(q, lq, lp):
    """q (log q - log p), exactly 0 where q = 0 (as F.kl_div's xlogy); NaN where q is NaN."""
    return torch.where(q != 0, q * (lq - lp), 0.0)


def kd_fwd(s2, t2, target, tau, ignore_index, elementwise):
    R, C = s2.shape
    cd = _compute_dtype(s2)
    tau_c = _tau_col(tau, R, cd)
    kl = torch.empty(R, device=s2.device, dtype=cd)
    stats = torch.zeros(R, 7, device=s2.device, dtype=cd)
    ce = torch.empty(R, device=s2.device, dtype=cd) if target is not None else None
    out = torch.empty((R, C), device=s2.device, dtype=s2.dtype) if elementwise else None

    def work(sl):
        zs, zt, lp, lq, (Ms, Ss, Mt, St) = _rows(s2, t2, sl, tau_c, cd)
        elem = _xlogy_gap(_exp(lq), lq, lp)
        kl[sl] = elem.sum(-1)
        stats[sl, 0], stats[sl, 1], stats[sl, 2], stats[sl, 3], stats[sl, 4] = Ms, Ss, Mt, St, kl[sl]
        if elementwise:
            out[sl] = elem * tau_c[sl] ** 2
        if target is not None:
            s1 = s2[sl].to(cd)
            M1, S1, _ = _stats(s1)
            S1 = _nan_if_posinf(M1, S1)
            y = target[sl]
            valid = y != ignore_index
            s_y = s1.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
            ce[sl] = torch.where(valid, (M1 - s_y) + torch.log1p(S1), 0.0)
            stats[sl, 5], stats[sl, 6] = M1, S1

    for_each(row_chunks(R, C, s2.device), work, s2.device, R * C)
    return kl, ce, stats, out


def kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, teacher_grad, tau_grad):
    R, C = s2.shape
    cd = _compute_dtype(s2)
    tau_c = _tau_col(tau, R, cd)
    ds = torch.empty((R, C), device=s2.device, dtype=s2.dtype)
    dt = torch.empty((R, C), device=s2.device, dtype=t2.dtype) if teacher_grad else None
    dtau = torch.empty(R, device=s2.device, dtype=cd) if tau_grad else None
    if not elementwise:
        g = g.to(cd).reshape(-1).expand(R)
    # the teacher's and τ's terms need log q - log p; the student's alone needs only p and q
    need_delta = elementwise or teacher_grad or tau_grad

    def work(sl):
        t = tau_c[sl]
        zs = torch.div(s2[sl], t).to(cd)
        zt = torch.div(t2[sl], t).to(cd)
        p = torch.softmax(zs, -1)
        q = torch.softmax(zt, -1)  # NaN for a row with a NaN, a +inf or no finite logit
        gc = g[sl].to(cd) if elementwise else g[sl].unsqueeze(-1)
        gq = q * gc  # q = 0 exactly where the teacher is -inf: those classes add nothing
        if need_delta:
            Ms, Ss, Mt, St = (stats[sl, i].to(cd).unsqueeze(-1) for i in range(4))
            # log q - log p = (zt - zs) - D, D = lse_t - lse_s from the statistics, as the kernel: the
            # difference of the two log-softmaxes would cancel their O(range) parts
            D = (Mt - Ms) + (torch.log1p(St) - torch.log1p(Ss))
            delta = (zt - zs) - D
            if elementwise:
                G1 = gq.sum(-1, keepdim=True)
                F = torch.where(q != 0, gq * delta, 0.0).sum(-1, keepdim=True)
            else:
                G1, F = gc, gc * stats[sl, 4].to(cd).unsqueeze(-1)  # g · KL of the forward
        else:
            G1 = gc
        dzs = p.mul_(G1).sub_(gq)  # ∂F/∂zs = p G1 - g q
        if target is not None:
            s1 = s2[sl].to(cd)
            M1, S1 = stats[sl, 5].to(cd), stats[sl, 6].to(cd)
            y = target[sl]
            valid = y != ignore_index
            y_safe = torch.where(valid, y, 0).unsqueeze(-1)
            p1 = torch.softmax(s1, -1)
            at_top = s1.gather(-1, y_safe).squeeze(-1) == M1
            q1 = torch.where(at_top, S1 / (1.0 + S1), 1.0 - p1.gather(-1, y_safe).squeeze(-1))
            gce = torch.where(valid, g_ce.to(cd).reshape(-1).expand(R)[sl], 0.0).unsqueeze(-1)
            ds[sl] = t * dzs + gce * p1.scatter_(-1, y_safe, -q1.unsqueeze(-1))
        else:
            ds[sl] = t * dzs
        if teacher_grad or tau_grad:
            dzt = torch.where(q != 0, q * (gc * (delta + 1.0) - (F + G1)), 0.0)
        if teacher_grad:
            dt[sl] = t * dzt
        if tau_grad:
            # τ (z - M) = x - M τ, in x units and halved (kernels/row_engine.py, half_gap)
            half = t * 0.5
            shifted = (torch.where(dzs != 0, (s2[sl].to(cd) * 0.5 - Ms * half) * dzs, 0.0)
                       + torch.where(dzt != 0, (t2[sl].to(cd) * 0.5 - Mt * half) * dzt, 0.0)).sum(-1)
            dtau[sl] = 2.0 * (t.squeeze(-1) * F.squeeze(-1) - shifted)

    for_each(row_chunks(R, C, s2.device), work, s2.device, R * C)
    return ds, dt, dtau
