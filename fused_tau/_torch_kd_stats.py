"""The torch path of distillation, its shared part: the per-row statistics of kd_fwd (the maxima and sums
of both rows, KL, ν, which form each row takes), the forms of the KL that kd_fwd and kd_bwd both use
(ψ series, log p - log q) and the cache-sized blocks of rows their passes work on.  The launchers are
_torch_kd.py.
The formulas are the kernel's (kernels/row_kd_fwd.py, see its module docstring): the teacher's distribution
q is the base measure, v = (s - t)/τ, ν = E_q v, u = v - ν, KL = log E_q e^u - log(1 - P_m).  A whole
row is in memory here, so the reference ν0 of the kernel is the exact q-weighted mean."""
import torch

from ._torch_row_engine import _exp_, _max_argmax, _nan_if_posinf, row_chunks
from ._torch_threads import for_each

INF = float("inf")
# Taylor coefficients of ψ(x) = e^x - 1 - x = x² Σ_k x^k/(k+2)! and of ψ3(x) = e^x - 1 - x - x²/2
PSI_COEF = [1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800]
PSI3_COEF = PSI_COEF[1:] + [1.0 / 39916800]
# |x| below which the series are used (truncation below 4e-8 relative), above it the closed forms
SERIES_BOUND = 1.0
# a row whose l = log E_q e^u reaches this takes the plain forms (no cancellation to avoid there)
PRECISE_BOUND = 1.0
# ... and so does a row whose student puts this much mass P_m on classes of teacher probability 0
PM_BOUND = 0.5


# rows a chunk's work takes at a time, in elements: its dozen passes over a few buffers of this
# size then stay in cache (a pass over buffers of a whole chunk goes to memory: several times slower)
BLOCK_ELEMENTS = 1 << 19


def _blocks(sl, C):
    """sl cut into slices of about BLOCK_ELEMENTS elements (whole rows)."""
    step = max(1, BLOCK_ELEMENTS // max(C, 1))
    return [slice(lo, min(sl.stop, lo + step)) for lo in range(sl.start, sl.stop, step)]


def _in_blocks(R, C, device, cd, work_block):
    """for_each over the cache-sized blocks of the chunks of R rows with ``work_block(block, scratch)``,
    the scratch buffers (_scratch) made once per thread."""
    # each block a task of its own: the threads' shares even out to a block, not a chunk
    blocks = [b for sl in row_chunks(R, C, device) for b in _blocks(sl, C)]
    rows = max((b.stop - b.start for b in blocks), default=0)
    for_each(blocks, work_block, device, R * C,
             scratch=lambda: _scratch(torch.empty((rows, C), device=device, dtype=cd)))


def _tau_col(tau, R, cd):
    t = tau.to(cd).reshape(-1)
    return (t.expand(R) if t.numel() == 1 else t).unsqueeze(-1)


def _horner(x, coef):
    acc = torch.full_like(x, coef[-1])
    for c in reversed(coef[:-1]):
        acc = acc * x + c
    return acc


def psi_series(x):
    """e^x - 1 - x for |x| <= SERIES_BOUND, with full relative precision."""
    return x * x * _horner(x, PSI_COEF)


def psi3_series(x):
    """e^x - 1 - x - x²/2 for |x| <= SERIES_BOUND, with full relative precision."""
    return x * x * x * _horner(x, PSI3_COEF)


def _stats_x(x, inv_tau):
    """(M, S) of z = x/τ with M in x units: M = max x, S = Σ_{j≠argmax} exp((x_j - M)/τ) (the
    kernels' semantics: ties count 1, a row with no finite value has M = -inf, S = -1; NaN propagates)."""
    M, idx = x.max(-1, keepdim=True)
    e = torch.exp(torch.where(x == M, 0.0, (x - M) * inv_tau))
    S = e.scatter_(-1, idx, 0.0).sum(-1)
    M = M.squeeze(-1)
    return M, torch.where(M == -INF, -1.0, S)


def _row_stats(s, t, inv, scratch=None):
    """The forward's statistics of rows s, t (x units, compute dtype): (Ms, Ss, Mt, St, KL, ν, precise).
    On CPU a fast path for rows of finite logits (the common case): the exponentials computed once, no
    masks, few passes in the given scratch buffers (see _scratch), the plain KL only on the rows that
    take it; any non-finite statistic (a non-finite logit makes v - ν0 non-finite, so A = Σ w (v - ν0)
    is) sends the block to the general form."""
    if s.device.type != "cpu":  # the fast path reads per-row tests on the host: CPU only
        return _row_stats_general(s, t, inv)
    fast = _row_stats_cpu(s, t, inv, scratch or _scratch(s))
    return fast if fast is not None else _row_stats_general(s, t, inv)


def _scratch(like):
    """The buffers of _row_stats_cpu, _bwd_fast and _bwd_kind (5 of like's shape and dtype), reused
    for each block: on CPU a fresh buffer costs its first-touch page faults, as much as a pass."""
    return [torch.empty_like(like) for _ in range(5)]


def _exp_shifted(x, inv, out):
    """(M, S, w): M = max x, w = exp((x - M)/τ) in out (w = 1 at every tie), S = Σ_{j≠argmax} w_j, for
    rows whose max is finite (the caller checks)."""
    M = x.amax(-1, keepdim=True)  # (max with its index: several times slower on CPU)
    w = _exp_(torch.sub(x, M, out=out).mul_(inv))
    # Σ_j w_j - 1 (the argmax's w is 1): as precise as the sum without it where S >= 1
    S = w.sum(-1) - 1.0
    if not bool((S >= 1.0).all()):  # host-ok: per-row values
        idx = x.argmax(-1, keepdim=True)
        S = w.scatter_(-1, idx, 0.0).sum(-1)
        w.scatter_(-1, idx, 1.0)
    return M.squeeze(-1), S, w


def _dot(a, b, tmp):
    """Σ_j a_j b_j per row, the products in tmp."""
    return torch.mul(a, b, out=tmp).sum(-1)


def _psi_series_(x, out):
    """psi_series(x) into out (another buffer of x's shape): the same series, x² applied last."""
    acc = torch.mul(x, PSI_COEF[-1], out=out).add_(PSI_COEF[-2])
    for c in reversed(PSI_COEF[:-2]):
        acc.mul_(x).add_(c)
    return acc.mul_(x).mul_(x)


def _row_stats_finite(s, t, inv, scratch):
    n = s.shape[0]
    b_wt, b_ws, b_psi, b_tmp, b_big = (b[:n] for b in scratch)
    Mt, St, wt = _exp_shifted(t, inv, b_wt)
    Ms, Ss, ws = _exp_shifted(s, inv, b_ws)
    if not bool(torch.isfinite(Ms).all() & torch.isfinite(Mt).all()):  # host-ok: per-row values
        return None
    Wt = 1.0 + St
    if bool((wt.amin(-1) > 0).all()):  # host-ok: no class of teacher probability 0
        Pm = torch.zeros_like(Ms)
    else:
        Pm = torch.where(wt != 0, 0.0, ws).sum(-1) / (1.0 + Ss)
    v = torch.sub(s, t, out=ws).mul_(inv)  # ws is spent
    nu0 = _dot(wt, v, b_tmp) / Wt
    if not bool(torch.isfinite(nu0).all()):  # host-ok
        return None
    x = v.sub_(nu0.unsqueeze(-1))
    A = _dot(wt, x, b_tmp)
    if not bool(torch.isfinite(A).all()):  # host-ok
        return None
    # w ψ(x): the series on x clamped to [-1, 1], the closed form where |x| > SERIES_BOUND (at the
    # few such classes by index, else densely)
    x_c = torch.clamp(x, -SERIES_BOUND, SERIES_BOUND, out=b_tmp)
    big = torch.ne(x_c, x, out=b_big)
    terms = _psi_series_(x_c, b_psi).mul_(wt)
    n_big = int(big.sum())  # host-ok: a CPU tensor
    if 0 < n_big <= big.numel() // 64:
        at = big.nonzero(as_tuple=True)
        xb = x[at]
        zt_b = (t[at] - Mt[at[0]]) * (inv.expand_as(x)[at])
        # a class whose teacher weight underflowed to 0 adds nothing here: its student mass is in P_m
        terms.index_put_(at, torch.where(wt[at] != 0, torch.exp(zt_b + xb) - wt[at] * (1.0 + xb), 0.0))
    elif n_big:
        # w e^x as one exp (no overflow of e^x where w is tiny)
        closed = torch.sub(t, Mt.unsqueeze(-1), out=b_tmp).mul_(inv).add_(x).exp_()
        closed.sub_(torch.mul(x, wt, out=b_ws).add_(wt))  # v, x are spent
        closed.masked_fill_(wt == 0, 0.0)  # teacher weight underflowed to 0: its student mass is in P_m
        # the blend by products with the masks (torch.where is several times slower on CPU); an
        # overflowing e^x of a class it drops (inf · 0) leaves a NaN: such blocks go to the general form
        terms.mul_(big.logical_not_()).add_(closed.mul_(big.logical_not_()))
    Rr = terms.sum(-1)
    if not bool(torch.isfinite(Rr).all()):  # host-ok
        return None
    a_bar = A.double() / Wt.double()
    b_bar = Rr.double() / Wt.double()
    l = (torch.log1p(a_bar + b_bar) - a_bar).to(s.dtype)
    nu = nu0 + a_bar.to(s.dtype)
    kl = l - torch.log1p(-Pm)
    precise = (l < PRECISE_BOUND) & (Pm < PM_BOUND)
    if not bool(precise.all()):  # host-ok
        # plain: Σ q δ - D, δ = (t - Mt)/τ - (s - Ms)/τ (see _row_stats_general); dense over the block
        delta = torch.sub(t, Mt.unsqueeze(-1), out=b_tmp).mul_(inv)
        delta.sub_(torch.sub(s, Ms.unsqueeze(-1), out=b_psi).mul_(inv))
        kl_plain = _dot(wt, delta, b_psi) / Wt + (torch.log1p(Ss) - torch.log1p(St))
        kl = torch.where(precise, kl, kl_plain)
    return Ms, Ss, Mt, St, kl, nu, precise


# the plain KL's rounding bound, relative to the magnitude of its terms (sums of at most 2^31 terms: a
# few dozen ulps at most), for the rows that take it without the second-order forms (_row_stats_cpu)
PLAIN_SLACK = {torch.float32: 2.0 ** -16, torch.float64: 2.0 ** -45}
# A second-order row's l = log E_q e^u takes the direct form log(E/W) - A/W (E = Σ w e^x: one exp, no
# series) where its rounding is within this factor of the series form's (see _row_stats_cpu)
DIRECT_FACTOR = 8.0


def _softmax_shifted(x, inv, shifted, out):
    """(M, S, w, W, a) for rows whose max is finite (the caller checks): M = max x, a = (x - M)/τ (x
    units) in ``shifted``, w = softmax(a) in ``out`` by torch's fused kernel (its exponentials as
    precise as torch.exp's, without its slow path and in fewer passes), W = Σ w (1 but for rounding),
    S = Σ_{j≠argmax} w_j / w_argmax = Σ_{j≠argmax} exp(a_j) (every tie counting 1), as the sum less the
    argmax's own w where that leaves S >= 1 (no cancellation), else with the argmax's w left out."""
    M = x.amax(-1, keepdim=True)
    a = torch.sub(x, M, out=shifted).mul_(inv)
    w = torch.softmax(a, -1, out=out)
    W = w.sum(-1)
    S = W / w.amax(-1) - 1.0
    if not bool((S >= 1.0).all()):  # host-ok: per-row values (NaN where a max is not finite: the caller checks)
        idx = _max_argmax(a)[1].unsqueeze(-1)
        w_max = w.gather(-1, idx)
        S = w.scatter_(-1, idx, 0.0).sum(-1) / w_max.squeeze(-1)
        w.scatter_(-1, idx, w_max)
    return M.squeeze(-1), S, w, W, a


def _row_stats_cpu(s, t, inv, scratch):
    """_row_stats_finite in fewer passes (CPU, rows of finite logits; None sends the block to the
    general form): the same statistics, decisions and forms, with three differences.
    - The teacher's and the student's probabilities q and p come from torch's softmax
      (_softmax_shifted); every form here is homogeneous in the weights, so q stands for w.
    - The plain KL is formed first, on every row; the second-order forms only on the rows whose
      decision it leaves open (see PLAIN_SLACK).
    - There, l takes the direct form log(E/W) - A/W, E = Σ w e^x (one exp, no series), where its
      rounding is within DIRECT_FACTOR of the series form's: with γ the rounding of a sum, the direct
      form is off by at most about γ (2 + (Σ w|x| + |A|)/W) and the series form by about
      γ l (1 + Σ w|x| / W).  The other rows are recomputed by _row_stats_finite.
    The passes are _row_sums's, the per-row decisions _stats_from_sums's."""
    sums = _row_sums(s, t, inv, scratch)

    def series(rows):
        k = rows.numel()
        old = _row_stats_finite(s[rows], t[rows], inv if inv.shape[0] == 1 else inv[rows],
                                [b[:k] for b in scratch[:4]] + [torch.empty((k, s.shape[1]), dtype=torch.bool)])
        return None if old is None else old[4:7]

    *stats, general = _stats_from_sums(sums, series)
    if bool(general.any()):  # host-ok: per-row values
        return None
    return tuple(stats)


# the per-row sums of _row_sums, the columns of its result in this order
ROW_SUMS = ("Ms", "Ss", "Mt", "St", "Wt", "Pm", "nu0", "A", "kl_dot", "d_abs", "E", "abs_x")


def _row_sums(s, t, inv, scratch):
    """The passes of _row_stats_cpu over a block of rows (scratch: _scratch's buffers): the per-row
    sums ROW_SUMS as the columns of a (rows, 12) tensor; a row whose logits are not all finite gets a
    non-finite Ms, Mt, ν0 or A (then _stats_from_sums sends it to the general form).  E = Σ w e^x and
    Σ w |x| only on the rows whose plain KL leaves the decision open (_plain_kl); the other per-row
    decisions are made for all rows at once (_stats_from_sums: few small ops per block)."""
    n = s.shape[0]
    b_at, b_as, b_w, b_x, b_tmp = (b[:n] for b in scratch)
    Mt, St, wt, Wt, a_t = _softmax_shifted(t, inv, b_at, b_w)
    Ms, Ss, ps, _, a_s = _softmax_shifted(s, inv, b_as, b_x)
    if bool((wt.amin(-1) > 0).all()):  # host-ok: no class of teacher probability 0
        Pm = torch.zeros_like(Ms)
    else:
        Pm = torch.where(wt != 0, 0.0, ps).sum(-1)
    v = torch.sub(s, t, out=b_x).mul_(inv)  # ps is spent
    nu0 = _dot(wt, v, b_tmp) / Wt
    x = v.sub_(nu0.unsqueeze(-1))
    A = _dot(wt, x, b_tmp)
    # the plain KL's sum: Σ q δ, δ = (t - Mt)/τ - (s - Ms)/τ (see _row_stats_general), and max |δ|
    delta = torch.sub(a_t, a_s, out=b_as)
    kl_dot = _dot(wt, delta, b_tmp)
    # (amax and amin: several times faster than aminmax on CPU)
    d_abs = torch.maximum(delta.amax(-1), -delta.amin(-1))
    # E = Σ w e^x and Σ w |x| on the rows that may take the second-order forms (0 on the others)
    rows = _may_be_second_order(Ss, St, Wt, Pm, kl_dot, d_abs).nonzero().squeeze(1)  # host-ok: CPU
    k = rows.numel()
    E, abs_x = torch.zeros_like(Ms), torch.zeros_like(Ms)
    if k:
        # the rows gathered into the spent buffers of a_t and δ (index_select: several times faster than x[rows])
        x_r, w_r = (x, wt) if k == n else (torch.index_select(x, 0, rows, out=b_at[:k]),
                                           torch.index_select(wt, 0, rows, out=b_as[:k]))
        E.index_copy_(0, rows, _exp_(x_r, out=b_tmp[:k]).mul_(w_r).sum(-1))
        abs_x.index_copy_(0, rows, torch.abs(x_r, out=b_tmp[:k]).mul_(w_r).sum(-1))
    return torch.stack((Ms, Ss, Mt, St, Wt, Pm, nu0, A, kl_dot, d_abs, E, abs_x), -1)


def _plain_kl(Ss, St, Wt, Pm, kl_dot, d_abs):
    """(the plain KL, log1p(-Pm), whether the row may take the second-order forms): a row whose
    l = KL + log1p(-Pm) is past PRECISE_BOUND even with the plain form off by PLAIN_SLACK of its terms'
    magnitudes (Σ q |δ| <= W max |δ|) takes the plain form, as it would after the second-order forms:
    they are taken only on the other rows."""
    log_s, log_t, log_kept = torch.log1p(Ss), torch.log1p(St), torch.log1p(-Pm)
    kl_plain = kl_dot / Wt + (log_s - log_t)
    slack = PLAIN_SLACK[Ss.dtype] * (d_abs + log_s + log_t + kl_plain.abs() - log_kept + 1.0)
    return kl_plain, log_kept, ~((Pm >= PM_BOUND) | (kl_plain + log_kept - slack >= PRECISE_BOUND))


def _may_be_second_order(Ss, St, Wt, Pm, kl_dot, d_abs):
    """Whether each row's plain KL leaves open that it takes the second-order forms (_plain_kl)."""
    return _plain_kl(Ss, St, Wt, Pm, kl_dot, d_abs)[2]


def _stats_from_sums(sums, series):
    """(Ms, Ss, Mt, St, KL, ν, precise, general) of _row_stats_cpu from _row_sums's columns, for any
    number of rows at once; ``series(rows)``: (KL, ν, precise) of _row_stats_finite on those rows (the
    second-order rows whose direct form is not precise enough), or None.  general: the rows that need
    the general form (a non-finite statistic, or series gave None)."""
    Ms, Ss, Mt, St, Wt, Pm, nu0, A, kl_dot, d_abs, E, abs_x = sums.unbind(-1)
    dt = sums.dtype
    general = ~(torch.isfinite(Ms) & torch.isfinite(Mt) & torch.isfinite(nu0) & torch.isfinite(A))
    a_bar = A.double() / Wt.double()
    nu = nu0 + a_bar.to(dt)
    kl_plain, log_kept, second = _plain_kl(Ss, St, Wt, Pm, kl_dot, d_abs)
    general |= second & ~torch.isfinite(abs_x)
    # l = log1p(ā + b̄) - ā with b̄ = R/W, R = E - W - A: ā + b̄ = (E - W)/W
    l = (torch.log1p((E.double() - Wt.double()) / Wt.double()) - a_bar).to(dt)
    direct = torch.isfinite(E) & (2.0 * Wt + abs_x + A.abs() <= DIRECT_FACTOR * l.abs() * (Wt + abs_x))
    precise = second & (l < PRECISE_BOUND) & (Pm < PM_BOUND)
    kl = torch.where(precise, l - log_kept, kl_plain)
    redo = (second & ~direct & ~general).nonzero().squeeze(1)  # host-ok: the CPU fast path
    if redo.numel():  # the series form on the rows where the direct one is not precise enough
        old = series(redo)
        if old is None:
            general[redo] = True
        else:
            kl[redo], nu[redo], precise[redo] = old
    return Ms, Ss, Mt, St, kl, nu, precise, general


def _row_stats_general(s, t, inv):
    Ms, Ss = _stats_x(s, inv)
    Mt, St = _stats_x(t, inv)
    Ss, St = _nan_if_posinf(Ms, Ss), _nan_if_posinf(Mt, St)
    # teacher weights relative to its max and the student's, in x units
    wt = torch.exp((t - Mt.unsqueeze(-1)) * inv)
    ws = torch.exp((s - Ms.unsqueeze(-1)) * inv)
    Wt = 1.0 + St
    q_nonzero = wt != 0
    v = (s - t) * inv
    # ν0: the q-weighted mean of v (exact up to rounding: the whole row is here)
    nu0 = torch.where(q_nonzero, wt * v, 0.0).sum(-1) / Wt
    nu0 = torch.where(torch.isfinite(nu0), nu0, 0.0).unsqueeze(-1)
    x = v - nu0
    small = x.abs() <= SERIES_BOUND
    # w ψ(x); for large x, w e^x as one exp (no overflow of e^x where w is tiny)
    wpsi = torch.where(small, wt * psi_series(torch.where(small, x, 0.0)),
                       torch.exp((t - Mt.unsqueeze(-1)) * inv + x) - wt * (1.0 + x))
    A = torch.where(q_nonzero, wt * x, 0.0).sum(-1)
    Rr = torch.where(q_nonzero, wpsi, 0.0).sum(-1)
    Pm = torch.where(q_nonzero, 0.0, ws).sum(-1) / (1.0 + Ss)
    # l = log E_q e^u = log1p(ā + b̄) - ā: in float64 (a per-row scalar; ā may be a few rounding errors)
    a_bar = A.double() / Wt.double()
    b_bar = Rr.double() / Wt.double()
    l = (torch.log1p(a_bar + b_bar) - a_bar).to(s.dtype)
    nu = nu0.squeeze(-1) + a_bar.to(s.dtype)
    kl_precise = l - torch.log1p(-Pm)
    # plain: Σ q δ - D with δ = (t - Mt)/τ - (s - Ms)/τ, each shifted in x units (never through ν,
    # which is as large as the logits / τ and would leave their ulp in a KL of order 1)
    delta = _shifted_gap(s, t, Ms, Mt, inv)
    kl_plain = torch.where(q_nonzero, wt * delta, 0.0).sum(-1) / Wt + (torch.log1p(Ss) - torch.log1p(St))
    precise = (l < PRECISE_BOUND) & (Pm < PM_BOUND)
    kl = torch.where(precise, kl_precise, kl_plain)
    bad = (Ms == -INF) | (Mt == -INF) | torch.isnan(Ss) | torch.isnan(St)
    kl = torch.where(bad, float("nan"), kl)
    return Ms, Ss, Mt, St, kl, nu, precise


def _shifted_gap(s, t, Ms, Mt, inv):
    """(t - Mt)/τ - (s - Ms)/τ = log q - log p + log1p(St) - log1p(Ss), each shift in x units."""
    return (t - Mt.unsqueeze(-1)) * inv - (s - Ms.unsqueeze(-1)) * inv


def _log_ratio(s, t, Ms, Ss, Mt, St, kl, nu, inv):
    """(u, w) per element, w = log p - log q = u - KL, u = v - ν (ν the q-mean of v = (s - t)/τ).
    Each from the form with the smaller rounding: through v - ν (ulp(v) + ulp(ν): exact where the
    student is near its teacher, also at large τ or with a common offset), or through the gap shifted
    by the maxima, (zs - Ms) - (zt - Mt) + log1p(St) - log1p(Ss) (a student far from its teacher,
    where v and ν are as large as the logits / τ).  u carries KL · 0, so that a row whose KL is NaN
    or inf has NaN gradients."""
    v = (s - t) * inv
    nu, kl = _col(nu), _col(kl)
    u_mean = v - nu + kl * 0.0
    zs_gap = (s - _col(Ms)) * inv
    zt_gap = (t - _col(Mt)) * inv
    log_t, log_s = _col(torch.log1p(St)), _col(torch.log1p(Ss))
    w_gap = (zs_gap - zt_gap) + (log_t - log_s) + kl * 0.0
    err_mean = v.abs() + nu.abs()
    err_gap = zs_gap.abs() + zt_gap.abs() + log_t + log_s
    u = torch.where(err_mean <= err_gap + kl.abs(), u_mean, w_gap + kl)
    w = torch.where(err_mean + kl.abs() <= err_gap, u_mean - kl, w_gap)
    return u, w


def _col(x):
    return x if x.dim() == 2 else x.unsqueeze(-1)
