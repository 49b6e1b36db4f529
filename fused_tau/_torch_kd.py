"""The torch path of distillation: the launchers of ``kernels/row_kd.py`` with the same
arguments and results, in torch ops over chunks of rows (fp32; fp64 for fp64 inputs).
The formulas are the kernel's (see its module docstring): the teacher's distribution q is the
base measure, v = (s - t)/τ, ν = E_q v, u = v - ν, KL = log E_q e^u - log(1 - P_m).  A whole row is
in memory here, so the reference ν0 of the kernel is the exact q-weighted mean."""
import torch

from . import _torch_row
from ._tau import compute_dtype
from ._torch_row import (_exp_, _max_argmax, _nan_if_posinf, class_target, for_each, row_chunks, target_complement,
                         target_nll, threads_for)

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


def _flat(x):
    return x.squeeze(-1) if x.dim() == 2 else x


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
    elements = min(_torch_row.CHUNK_ELEMENTS, BLOCK_ELEMENTS)
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
