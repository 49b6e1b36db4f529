"""The torch path of distillation: the launchers of ``kernels/row_kd.py`` with the same
arguments and results, in torch ops over chunks of rows (fp32; fp64 for fp64 inputs): kd_fwd and
kd_bwd, with their CPU fast paths.  The per-row statistics and the forms of the KL they share
(and the formulas, as the kernel's) are _torch_kd_stats.py; the hard-label epilogue of the target's
cross-entropy is the row engine's (_torch_row_engine.py), as cross-entropy's."""
import torch

from . import _torch_row_engine
from ._tau import compute_dtype
from ._torch_kd_stats import (BLOCK_ELEMENTS, INF, ROW_SUMS, SERIES_BOUND, _in_blocks, _log_ratio, _row_stats,
                              _row_stats_finite, _row_stats_general, _row_sums, _scratch, _stats_from_sums, _tau_col,
                              psi3_series, psi_series)
from ._torch_row_engine import _exp_, _nan_if_posinf, class_target, target_complement, target_nll
from ._torch_threads import for_each, threads_for


def kd_fwd(s2, t2, target, tau, ignore_index, kl, ce, stats, out):
    """Writes kl, ce (None without a target), stats ((R, 8), zero-filled by the caller: (Ms, Ss, Mt, St, KL,
    ν, S1, precise), precise = 1 where the row takes the second-order forms) and the elementwise output
    (None: not wanted), as kernels/row_kd.py's launcher."""
    elementwise = out is not None
    if target is None and not elementwise and s2.device.type == "cpu" and s2.numel():
        _kd_fwd_cpu(s2, t2, tau, kl, stats)
        return
    R, C = s2.shape
    cd = compute_dtype(s2)
    tau_c = _tau_col(tau, R, cd)

    def work_block(sl, scratch):
        s, t = s2[sl].to(cd), t2[sl].to(cd)
        inv = 1.0 / tau_c[sl]
        Ms, Ss, Mt, St, k, nu, precise = _row_stats(s, t, inv, scratch)
        kl[sl] = k
        for i, val in enumerate((Ms, Ss, Mt, St, k, nu)):
            stats[sl, i] = val
        stats[sl, 7] = precise.to(cd)
        if elementwise:
            q = torch.exp((t - Mt.unsqueeze(-1)) * inv - torch.log1p(St).unsqueeze(-1))
            _, w = _log_ratio(s, t, Ms, Ss, Mt, St, k, nu, inv)  # log p - log q
            # q (log q - log p), exactly 0 where q = 0 (as F.kl_div's xlogy); NaN where q is NaN
            out[sl] = torch.where(q != 0, -q * w, 0.0) * tau_c[sl] ** 2
        if target is not None:
            # τ = 1 statistics of the student: the same max (x units)
            e1 = torch.exp(torch.where(s == Ms.unsqueeze(-1), 0.0, s - Ms.unsqueeze(-1)))
            S1 = e1.scatter_(-1, s.argmax(-1, keepdim=True), 0.0).sum(-1)
            S1 = torch.where(Ms == -INF, -1.0, S1)
            S1 = _nan_if_posinf(Ms, S1)
            valid, y = class_target(target, sl, ignore_index)
            ce[sl] = torch.where(valid, target_nll(Ms, s.gather(-1, y).squeeze(-1), torch.log1p(S1)), 0.0)
            stats[sl, 6] = S1

    _in_blocks(R, C, s2.device, cd, work_block)


def _kd_fwd_cpu(s2, t2, tau, kl_out, stats_out):
    """kd_fwd without elementwise loss or target on CPU: _row_sums's passes block by block, then the
    per-row decisions and forms for all rows at once (_stats_from_sums), the rows that need the series
    or the general form taken again from the logits, a block of them at a time."""
    R, C = s2.shape
    cd = compute_dtype(s2)
    inv = 1.0 / _tau_col(tau, R, cd)
    sums = torch.empty(R, len(ROW_SUMS), device=s2.device, dtype=cd)

    def work_block(sl, scratch):
        sums[sl] = _row_sums(s2[sl].to(cd), t2[sl].to(cd), inv[sl], scratch)

    _in_blocks(R, C, s2.device, cd, work_block)
    step = max(1, BLOCK_ELEMENTS // max(C, 1))

    def pieces(rows):
        for lo in range(0, rows.numel(), step):
            part = rows[lo:lo + step]
            yield part, s2.index_select(0, part).to(cd), t2.index_select(0, part).to(cd), inv.index_select(0, part)

    def series(rows):
        out = []
        for _, s, t, inv_r in pieces(rows):
            old = _row_stats_finite(s, t, inv_r, _scratch(s)[:4] + [torch.empty(s.shape, dtype=torch.bool)])
            if old is None:
                return None
            out.append(old[4:7])
        return tuple(torch.cat(parts) for parts in zip(*out))

    Ms, Ss, Mt, St, kl, nu, precise, general = _stats_from_sums(sums, series)
    columns = [Ms, Ss, Mt, St, kl, nu]
    rows = general.nonzero().squeeze(1)  # host-ok: CPU
    for part, s, t, inv_r in pieces(rows):
        res = _row_stats_general(s, t, inv_r)
        for col, val in zip(columns, res[:6]):
            col[part] = val
        precise[part] = res[6]
    # (Ms, Ss, Mt, St, KL, ν, S1, precise): precise = 1 where the row takes the second-order forms
    torch.stack(columns + [torch.zeros_like(kl), precise.to(cd)], -1, out=stats_out)
    kl_out.copy_(kl)


def _bwd_fast(s, t, Ms, Ss, Mt, St, kl, nu, precise, inv, gc, tc, ds, dt, sl, scratch):
    """kd_bwd's KL gradients (no elementwise loss, no target, no τ gradient) in fewer passes, for a
    block of finite statistics: dzs = p - q on the rows of the plain forms; on the second-order rows
    (all of whose classes must be kept, and every element take the v - ν forms of _log_ratio, by the
    per-row bound max |v| + |ν| + |KL| <= log1p(St) + log1p(Ss) of its per-element test) u = v - ν,
    w = u - KL as _log_ratio gives them, dzs = q expm1(w) where |w| <= SERIES_BOUND.  Returns False
    (nothing written) for any other block."""
    precise = (precise != 0).unsqueeze(-1)
    any_precise = bool(precise.any())  # host-ok: per-row values
    if dt is not None and not bool(precise.all()):  # host-ok
        return False
    log_t, log_s = torch.log1p(St), torch.log1p(Ss)
    if not bool((torch.isfinite(Ms) & torch.isfinite(Mt) & torch.isfinite(kl) & torch.isfinite(nu)
                 & torch.isfinite(log_t) & torch.isfinite(log_s)).all()):  # host-ok
        return False
    n = s.shape[0]
    b_q, b_v, b_p, b_w, b_small = (b[:n] for b in scratch)
    q = _exp_(torch.sub(t, Mt, out=b_q).mul_(inv).sub_(log_t))
    if any_precise and not bool(((q.amin(-1, keepdim=True) > 0) | ~precise).all()):  # host-ok
        return False
    u = None
    if any_precise:
        v = torch.sub(s, t, out=b_v).mul_(inv)
        # (amax and amin: several times faster than aminmax on CPU)
        v_abs_max = torch.maximum(v.amax(-1, keepdim=True), -v.amin(-1, keepdim=True))
        if not bool((v_abs_max + nu.abs() + kl.abs() <= log_t + log_s).logical_or_(~precise).all()):  # host-ok
            return False
        u = v.sub_(nu)
    dzs = _exp_(torch.sub(s, Ms, out=b_p).mul_(inv)).div_(1.0 + Ss).sub_(q)  # p - q
    if any_precise:
        w = torch.sub(u, kl, out=b_w)
        # the blend by products with the masks (torch.where is several times slower on CPU), all
        # factors finite: w clamped to SERIES_BOUND where it is not taken
        if dt is None:  # u is spent
            w_c = torch.clamp(w, -SERIES_BOUND, SERIES_BOUND, out=b_v)
            small_w = torch.le(w.abs_(), SERIES_BOUND, out=b_small)
        else:
            small_w = torch.le(w.abs(), SERIES_BOUND, out=b_small)
            w_c = w.clamp_(-SERIES_BOUND, SERIES_BOUND)
        if not bool(precise.all()):  # host-ok
            small_w[(~precise).squeeze(-1).nonzero(as_tuple=True)[0]] = False
        q_expm1_w = w_c.expm1_().mul_(q)
        dzs.mul_(small_w.logical_not()).add_(q_expm1_w.mul_(small_w))
    if dt is not None:
        dt[sl] = tc * (-gc * q * u)
    torch.mul(tc, dzs.mul_(gc), out=ds[sl])
    return True


def _row_groups(precise, C, device):
    """The rows of each kind (second-order, then plain), in groups of about BLOCK_ELEMENTS elements, at
    least one per thread of for_each: (second-order?, rows) with rows a slice where they are
    consecutive, else an index tensor."""
    R = precise.numel()
    # (at most BLOCK_ELEMENTS: the group's five buffers of every thread then stay in cache together)
    elements = min(_torch_row_engine.CHUNK_ELEMENTS, BLOCK_ELEMENTS)
    step = max(1, min(elements // max(C, 1), -(-R // threads_for(device, R * C))))
    groups = []
    # the second-order groups first: the costlier tasks taken first, the threads' shares end more evenly
    for kind in (True, False):
        rows = (precise == kind).nonzero().squeeze(1)  # host-ok: the torch path (CUDA only for fp64 or forced)
        for lo in range(0, rows.numel(), step):
            part = rows[lo:lo + step]
            first, last = int(part[0]), int(part[-1])  # host-ok: CPU
            groups.append((kind, slice(first, last + 1) if last - first + 1 == part.numel() else part))
    return groups


def _bwd_kind(s, t, Ms, Ss, Mt, St, kl, nu, precise, inv, scratch):
    """dzs = p - q for a group of rows of one kind (kd_bwd without elementwise loss, target, teacher or
    τ gradient, CPU), in few passes, p and q by torch's softmax of the shifted logits (as
    _softmax_shifted): on plain rows p - q; on second-order rows q expm1(w) at every class
    (w = log p - log q = (v - ν) - KL as _log_ratio's v - ν form, which the per-row bound
    max |v| + |ν| + |KL| <= log1p(St) + log1p(Ss) makes its choice at every element; where |w| > 1,
    q expm1(w) is as precise as p - q: both carry the rounding of exponentials of arguments of that
    size).  None (nothing computed) where a statistic is not finite or, on second-order rows, a
    class has q = 0 or the bound fails: the caller takes the general form."""
    log_t, log_s = torch.log1p(St), torch.log1p(Ss)
    if not bool((torch.isfinite(Ms) & torch.isfinite(Mt) & torch.isfinite(kl) & torch.isfinite(nu)
                 & torch.isfinite(log_t) & torch.isfinite(log_s)).all()):  # host-ok: per-row values
        return None
    n = s.shape[0]
    b_q, b_x, b_tmp = (b[:n] for b in scratch[:3])
    q = torch.softmax(torch.sub(t, Mt, out=b_tmp).mul_(inv), -1, out=b_q)
    if not precise:
        return torch.softmax(torch.sub(s, Ms, out=b_tmp).mul_(inv), -1, out=b_x).sub_(q)  # p - q
    if not bool((q.amin(-1) > 0).all()):  # host-ok
        return None
    v = torch.sub(s, t, out=b_x).mul_(inv)
    # (amax and amin: several times faster than aminmax on CPU)
    v_abs_max = torch.maximum(v.amax(-1, keepdim=True), -v.amin(-1, keepdim=True))
    if not bool((v_abs_max + nu.abs() + kl.abs() <= log_t + log_s).all()):  # host-ok
        return None
    return v.sub_(nu).sub_(kl).expm1_().mul_(q)  # q expm1(w)


def kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, ds, dt, dtau):
    """Writes d student, d teacher and dτ per row (None: not wanted), as kernels/row_kd.py's launcher."""
    if target is None and not elementwise and dt is None and dtau is None and s2.device.type == "cpu" and s2.numel():
        _kd_bwd_cpu(s2, t2, tau, stats, g, ds)
        return
    _kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, ds, dt, dtau)


def _runs(rows):
    """(slice of positions in ``rows``, slice of rows) for each run of consecutive values of the sorted
    CPU index tensor ``rows``."""
    r = rows.tolist()  # host-ok: a CPU tensor (the CPU path)
    out, lo = [], 0
    for i in range(1, len(r) + 1):
        if i == len(r) or r[i] != r[i - 1] + 1:
            out.append((slice(lo, i), slice(r[lo], r[i - 1] + 1)))
            lo = i
    return out


def _kd_bwd_cpu(s2, t2, tau, stats, g, ds):
    """kd_bwd's student gradient ``ds`` on CPU without elementwise loss, target, teacher or τ gradient: the
    rows of each kind in their own groups (_bwd_kind), a group the general form cannot serve in few
    passes sent to it."""
    R, C = s2.shape
    cd = compute_dtype(s2)
    tau_c = _tau_col(tau, R, cd)
    g = g.to(cd).reshape(-1).expand(R)
    groups = _row_groups(stats[:, 7] != 0, C, s2.device)
    size = max((r.stop - r.start if isinstance(r, slice) else r.numel()) for _, r in groups)
    general = []

    def work(group, scratch):
        precise, rows = group
        gathered = not isinstance(rows, slice)
        n = rows.numel() if gathered else rows.stop - rows.start
        if gathered:
            s = torch.index_select(s2, 0, rows, out=scratch[3][:n]) if s2.dtype == cd else s2[rows].to(cd)
            t = torch.index_select(t2, 0, rows, out=scratch[4][:n]) if t2.dtype == cd else t2[rows].to(cd)
        else:
            s, t = s2[rows].to(cd), t2[rows].to(cd)
        Ms, Ss, Mt, St, kl, nu = stats[rows, :6].to(cd).unsqueeze(-1).unbind(1)
        tc = tau_c[rows]
        dzs = _bwd_kind(s, t, Ms, Ss, Mt, St, kl, nu, precise, 1.0 / tc, scratch)
        if dzs is None:
            general.append(rows)
            return
        scale = tc * g[rows].unsqueeze(-1)  # ds = τ g dzs
        if gathered:
            # written run by run of consecutive rows, the scaling with it (index_copy_ on CPU is several
            # times slower than a pass)
            for at, dst in _runs(rows):
                if ds.dtype == cd:
                    torch.mul(dzs[at], scale[at], out=ds[dst])
                else:
                    ds[dst] = dzs[at].mul_(scale[at])
        elif ds.dtype == cd:
            torch.mul(dzs, scale, out=ds[rows])
        else:
            ds[rows] = dzs.mul_(scale)

    def buffers():
        return [torch.empty((size, C), device=s2.device, dtype=cd) for _ in range(5)]

    for_each(groups, work, s2.device, R * C, scratch=buffers)
    for rows in general:  # after the parallel part: its rows are its own, in any order
        s_rows = s2[rows]
        part = torch.empty_like(s_rows)
        _kd_bwd(s_rows, t2[rows], None, tau_c[rows], stats[rows], g[rows], None, 0, False, part, None, None)
        ds[rows] = part


def _kd_bwd(s2, t2, target, tau, stats, g, g_ce, ignore_index, elementwise, ds, dt, dtau):
    """kd_bwd in its general form, for every row."""
    R, C = s2.shape
    cd = compute_dtype(s2)
    tau_c = _tau_col(tau, R, cd)
    teacher_grad, tau_grad = dt is not None, dtau is not None
    if not elementwise:
        g = g.to(cd).reshape(-1).expand(R)

    def work_block(sl, scratch):
        tc = tau_c[sl]
        inv = 1.0 / tc
        s, t = s2[sl].to(cd), t2[sl].to(cd)
        Ms, Ss, Mt, St, kl, nu = (stats[sl, i].to(cd).unsqueeze(-1) for i in range(6))
        if target is None and not elementwise and not tau_grad and s.device.type == "cpu" and _bwd_fast(
                s, t, Ms, Ss, Mt, St, kl, nu, stats[sl, 7], inv, g[sl].unsqueeze(-1), tc, ds, dt, sl, scratch):
            return
        p = torch.exp((s - Ms) * inv) / (1.0 + Ss)
        q = torch.exp((t - Mt) * inv - torch.log1p(St))  # NaN for a row with a NaN, a +inf or no finite logit
        # kl · 0: a row whose KL is NaN or inf (a NaN or +inf logit, a student -inf where q > 0) has
        # the composition's NaN teacher gradient (its δ - KL is inf - inf)
        precise = stats[sl, 7].unsqueeze(-1) != 0
        u, w = _log_ratio(s, t, Ms, Ss, Mt, St, kl, nu, inv)  # w = log p - log q
        keep = q != 0
        small_w = precise & (w.abs() <= SERIES_BOUND)
        # p - q = q expm1(w) with no cancellation where p ≈ q (second-order rows); ψ(w) itself only
        # for τ's gradient (expm1 has the series' relative precision)
        psi_w = psi_series(torch.where(small_w, w, 0.0)) if tau_grad else None
        dcore = torch.where(keep, torch.where(small_w, q * torch.expm1(w), p - q), p)
        gc = g[sl].to(cd) if elementwise else g[sl].unsqueeze(-1)
        if elementwise:
            # F = Σ g q δ, δ = log q - log p = -w
            gq = torch.where(keep, q * gc, 0.0)
            G1 = gq.sum(-1, keepdim=True)
            F = torch.where(keep, -gq * w, 0.0).sum(-1, keepdim=True)
            dzs = p * G1 - gq
            dzt = torch.where(keep, q * (gc * (1.0 - w) - (F + G1)), 0.0)
        else:
            dzs = gc * dcore
            dzt = torch.where(keep, -gc * q * u, 0.0)  # ∂KL/∂zt = q (δ - KL) = -q u
        if target is not None:
            valid, y = class_target(target, sl, ignore_index)
            p1 = torch.softmax(s, -1)
            q_y = target_complement(p1, s, y, Ms.squeeze(-1), stats[sl, 6].to(cd))[1]
            gce = torch.where(valid, g_ce.to(cd).reshape(-1).expand(R)[sl], 0.0).unsqueeze(-1)
            ds[sl] = tc * dzs + gce * p1.scatter_(-1, y, -q_y.unsqueeze(-1))  # softmax(s) - onehot(y)
        else:
            ds[sl] = tc * dzs
        if teacher_grad:
            dt[sl] = tc * dzt
        if tau_grad:
            # plain: τ dF/dτ = 2F - Σ s ∂F/∂s - Σ t ∂F/∂t, shifted by the maxima, in x units, halved
            hs = s * 0.5 - Ms * 0.5
            ht = t * 0.5 - Mt * 0.5
            shifted = (torch.where(dzs != 0, hs * dzs, 0.0) + torch.where(dzt != 0, ht * dzt, 0.0)).sum(-1)
            if elementwise:
                dtau[sl] = 2.0 * (tc.squeeze(-1) * F.squeeze(-1) - shifted)
                return
            plain = 2.0 * (tc.squeeze(-1) * gc.squeeze(-1) * kl.squeeze(-1) - shifted)
            # precise (see the kernel's docstring): every term of third order in 1/τ
            q_psi_w = torch.where(small_w, q * psi_w, (p - q) - q * w)
            small_u = u.abs() <= SERIES_BOUND
            q_psi3_u = torch.where(small_u, q * psi3_series(torch.where(small_u, u, 0.0)),
                                   p * torch.exp(kl) - q * (1.0 + u + 0.5 * u * u))
            zeta = (t - Mt) * inv
            body = torch.where(keep, 2.0 * q_psi3_u - u * q_psi_w - zeta * (q_psi_w - q * kl), 0.0)
            masked = torch.where(keep | (p == 0), 0.0, p * ((s - Mt) * inv - nu))
            Pm = torch.where(keep, 0.0, p).sum(-1)
            log_kept = torch.log1p(-Pm)
            l = kl.squeeze(-1) + log_kept
            small_l = l.abs() <= SERIES_BOUND
            psi_l = torch.where(small_l, psi_series(torch.where(small_l, l, 0.0)), torch.expm1(l) - l)
            B = (body - masked).sum(-1) - 2.0 * psi_l - 2.0 * log_kept
            # the third-order terms are small only where every kept u is: a class far from the rest
            # (a student far from its teacher) makes them large and cancelling, the plain form exact
            u_small = torch.where(keep, u.abs() <= SERIES_BOUND, True).all(-1)
            dtau[sl] = torch.where(precise.squeeze(-1) & u_small, tc.squeeze(-1) * gc.squeeze(-1) * B, plain)

    _in_blocks(R, C, s2.device, cd, work_block)
