"""The torch path's row engine core, shared by its launchers (the softmax family in _torch_softmax.py,
cross-entropy in _torch_ce.py, kd_loss in _torch_kd.py, Gumbel-softmax and sampling in _torch_sample.py;
_torch_row.py gathers the first two for fused_tau's dispatch), as kernels/row_engine.py is the kernels':
the (A, C, B) -> rows layout, the chunks of rows (threads: _torch_threads.py), the subnormal-safe
exponential ``_exp_``, the row statistics and the hard-label cross-entropy epilogue.

Same numerics as the kernels: the statistics ``M = max x`` (x units, as the kernels save them)
and ``S = Σ_{j ≠ argmax} exp((x_j - M) / τ)`` per row (the argmax's own 1 left out: no
cancellation), and the exact small-τ forms built on them.  Work is done in fp32 (fp64 for fp64
inputs) over chunks of about ``CHUNK_ELEMENTS`` elements, small enough that a
chunk's passes stay in cache and no temporary grows with the input.
"""
import torch

from ._torch_threads import threads_for

CHUNK_ELEMENTS = 1 << 20


def _as_rows(t3):
    """(A, C, B) -> (A*B, C); a view when B == 1."""
    A, C, B = t3.shape
    return t3.permute(0, 2, 1).reshape(A * B, C)


def _from_rows(rows, A, B):
    C = rows.shape[1]
    return rows.reshape(A, B, C).permute(0, 2, 1)


def _rows_of(out3):
    """The (A*B, C) rows to compute the contiguous (A, C, B) output ``out3`` in: its own memory when
    B == 1, else a buffer that _store_rows copies into it (with the transpose)."""
    A, C, B = out3.shape
    return out3.view(A, C) if B == 1 else out3.new_empty((A * B, C))


def _store_rows(rows, out3):
    """out3 = the rows from _rows_of (nothing to do when they are out3's own memory)."""
    if out3.shape[2] != 1:
        out3.copy_(_from_rows(rows, out3.shape[0], out3.shape[2]))


def _chunks(R, C, parts=1):
    """Slices of rows of about CHUNK_ELEMENTS elements, at least ``parts`` of them when there are rows enough."""
    step = max(1, min(CHUNK_ELEMENTS // max(C, 1), -(-R // max(parts, 1))))
    return [slice(lo, min(R, lo + step)) for lo in range(0, R, step)]


def row_chunks(R, C, device):
    """The chunks of rows a launcher works on: at least one per thread of ``for_each``."""
    return _chunks(R, C, threads_for(device, R * C))


def _tau_rows(tau, A, B, dtype):
    t = tau.to(dtype).reshape(-1)
    return (t.expand(A * B) if t.numel() == 1 else t.repeat_interleave(B)).unsqueeze(-1)


# Below LOW, exp(x) is subnormal (or 0) and torch.exp on x86 takes a slow path for each lane holding
# such an argument (measured: 10 ns per lane below -104 in fp32, where exp is 0, and 30 ns between -104
# and -87.3, where it is subnormal, against 0.8 ns; -inf 3x).  z - M reaches them whenever x / τ spans
# more than about 90 (small τ), where most of a row's elements can lie there.
_EXP_RANGE = {torch.float32: (-87.3, -104.0), torch.float64: (-708.3, -746.0)}  # (LOW, exp(x) = 0 below)
_EXP_LOW = {dt: float(torch.tensor(low, dtype=dt).exp()) for dt, (low, _) in _EXP_RANGE.items()}  # host-ok: CPU
# the next value above LOW: the band of _exp_ is (zero_below, LOW], i.e. below this
_EXP_ABOVE_LOW = {dt: float(torch.nextafter(torch.tensor(low, dtype=dt), torch.tensor(0.0, dtype=dt)))  # host-ok: CPU
                  for dt, (low, _) in _EXP_RANGE.items()}
# _exp_ looks for band elements in strided groups of this many (a reduction across rows of a
# (BAND_GROUP, n / BAND_GROUP) view: vectorised, unlike one over short contiguous segments)
BAND_GROUP = 16


def _exp_(d, scratch=None, out=None):
    """exp(d) in place (or into ``out``, a contiguous tensor of d's shape, d kept): bitwise the values
    of ``d.exp_()``, several times faster on CPU where many elements underflow: every element gets
    exp(max(d, LOW)), those at or below LOW are set to 0, and those between where exp is 0 and LOW (the
    band, subnormal; a band of width 17 in fp32, few elements) get torch.exp of themselves.  The band
    is found with float passes: t = d, or just above LOW where d is at or below where exp is 0, so that
    the band is where t is below that value; the minimum of t over strided groups of BAND_GROUP
    elements (one vectorised pass) names the groups to search elementwise.  ``scratch``: a contiguous
    buffer of d's dtype with at least d's number of elements (else one is made where needed)."""
    if out is None:
        out = d
    if d.device.type != "cpu" or d.dtype not in _EXP_RANGE or d.numel() == 0:
        return torch.exp(d, out=out)
    if not d.is_contiguous() or not out.is_contiguous():
        return out.copy_(_exp_(d.clone(memory_format=torch.contiguous_format), scratch))  # d kept
    low, zero_below = _EXP_RANGE[d.dtype]
    flat, n = d.view(-1), d.numel()
    if not float(flat.amin()) <= low:  # host-ok: a CPU tensor. Nothing underflows, or a NaN (min is NaN)
        return torch.exp(d, out=out)
    groups = n // BAND_GROUP
    g_len = groups * BAND_GROUP
    above = _EXP_ABOVE_LOW[d.dtype]
    t = scratch.view(-1)[:n] if scratch is not None else torch.empty_like(flat)
    # t = d where d > zero_below, else `above` (exp(d) = 0 there): band elements are those with t < above
    torch.ops.aten.threshold.out(flat, zero_below, above, out=t)
    parts = []
    if groups:
        t_groups = t[:g_len].view(BAND_GROUP, groups)
        # _exp_ takes this band path on CPU tensors only: the nonzero below read no device
        cols = (t_groups.amin(0) < above).nonzero().squeeze(1)  # host-ok: CPU; the groups holding a band element
        if cols.numel():
            at = (t_groups.index_select(1, cols) < above).nonzero()  # host-ok: CPU; (member, group) of each
            parts.append(at[:, 0] * groups + cols[at[:, 1]])
    if g_len < n:
        parts.append((t[g_len:] < above).nonzero().squeeze(1) + g_len)  # host-ok: CPU
    band = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else None
    subnormal = t[band].exp_() if band is not None and band.numel() else None
    result = torch.clamp(flat, min=low, out=out.view(-1)).exp_()
    torch.nn.functional.threshold_(result, _EXP_LOW[d.dtype], 0.0)  # exp(LOW) -> 0
    if subnormal is not None:
        result.index_copy_(0, band, subnormal)
    return out


def _exp(d):
    """_exp_ out of place."""
    return _exp_(d.clone())


def _stats(z):
    """(M, S, idx): M = max z, S = Σ_{j≠argmax} exp(z_j - M), idx the argmax; the kernels' semantics
    (kernels/tl_math.py): ties with the max count 1 (a second +inf too), a row with no finite value gets
    M = -inf and S = -1 (so lse = M + log1p(S) = -inf), a NaN gives M and S NaN."""
    M, idx = z.max(-1, keepdim=True)  # NaN propagates
    # a tie with a finite max: z - M = 0, exp 1
    S = _exp_(z - M).scatter_(-1, idx, 0.0).sum(-1)
    M = M.squeeze(-1)
    # a +inf max: z - M is NaN at each +inf (inf - inf), each of which but the argmax counts 1
    posinf = M == float("inf")
    if z.device.type != "cpu" or bool(posinf.any()):  # host-ok: a CPU tensor (checked, to skip a pass)
        S = torch.where(posinf, (z == float("inf")).sum(-1).to(S.dtype) - 1.0, S)
    return M, torch.where(M == float("-inf"), -1.0, S), idx


# _max_argmax's segments: a reduction over an inner dimension this long is vectorised (over 16, several
# times slower than a pass; over 64, about one)
ARGMAX_SEGMENT = 64


def _max_argmax(z):
    """``z.max(-1)`` (the maximum and the first index holding it, a NaN counting as the maximum) for a
    contiguous 2-D CPU z, in about one vectorised pass (torch's max with indices is several times
    slower than one): the maximum over segments of ARGMAX_SEGMENT elements of each row, the first
    segment holding the row's maximum, the first index of it there."""
    return _max_argmax_segments(z)[:2]


def _max_argmax_segments(z, tau=None):
    """``_max_argmax(z)`` and the maxima of the segments of ARGMAX_SEGMENT elements of z's rows (the
    tail of a row that does not fill one left out), or None where it takes torch's max.  With ``tau``
    (a column of the rows' τ), z = x / τ for the rows x given, divided only where needed (x / τ rounds
    monotonically: the maximum of a segment's z is its maximum x's, divided)."""
    def div(part, rows_tau=tau):
        return part if tau is None else torch.div(part, rows_tau)

    rows, C = z.shape
    n_seg = C // ARGMAX_SEGMENT
    if n_seg < 2 or not z.is_contiguous():
        return div(z).max(-1) + (None,)
    segs = z.as_strided((rows, n_seg, ARGMAX_SEGMENT), (C, ARGMAX_SEGMENT, 1))
    seg_max = div(segs.amax(-1))
    best, seg = seg_max.max(-1)
    at = div(segs.gather(1, seg.view(rows, 1, 1).expand(rows, 1, ARGMAX_SEGMENT)).squeeze(1)).argmax(-1)
    idx = seg * ARGMAX_SEGMENT + at
    if n_seg * ARGMAX_SEGMENT < C:
        tail_best, tail_at = div(z[:, n_seg * ARGMAX_SEGMENT:]).max(-1)
        later = (tail_best > best) | (torch.isnan(tail_best) & ~torch.isnan(best))
        best = torch.where(later, tail_best, best)
        idx = torch.where(later, tail_at + n_seg * ARGMAX_SEGMENT, idx)
    return best, idx, seg_max


def _rows_in(buffer, rows, C):
    """The first rows × C elements of a flat scratch buffer, as a contiguous (rows, C) tensor."""
    return buffer[:rows * C].view(rows, C)


def row_scratch(chunks, C, dtype, device, count):
    """A function making ``count`` flat buffers of the largest chunk's size (for_each's scratch)."""
    size = max((sl.stop - sl.start for sl in chunks), default=0) * C
    return lambda: [torch.empty(size, dtype=dtype, device=device) for _ in range(count)]


# _stats_cpu's floor, below the max, of the arguments it hands softmax: exp of anything lower is subnormal
# or 0, which x86 computes by a microcode assist per lane (measured: softmax of z / 0.07 logits, 99% of
# them there, 1.6-2x slower than of the same logits floored), as torch's own log_softmax does
_SOFTMAX_FLOOR = {dt: low for dt, (low, _) in _EXP_RANGE.items()}
# a row whose S is at least this many times (C - 1) exp(floor) keeps the floored S: the floored
# elements' error, below exp(floor) each, is then below 2^-27 of S (2^-56 in fp64), a fraction of its
# rounding; the other rows are recomputed from z unfloored
_FLOOR_MARGIN = {torch.float32: 2.0 ** 27, torch.float64: 2.0 ** 56}


def _stats_cpu(z, p, maxima=None):
    """``_stats(z)`` for a contiguous 2-D CPU z in fewer passes, as (M, S, idx, p): the max and argmax
    in one pass (_max_argmax; ``maxima``: (M, idx) already taken), p = softmax(max(z, M + floor)) into
    the buffer ``p`` (z's shape) by torch's fused kernel (its exponentials are as precise as torch.exp's,
    several times faster where many underflow, see _exp_; the floor, _SOFTMAX_FLOOR, keeps its arguments
    out of the subnormal range), then S = Σ_{j≠argmax} p_j / p_argmax: the same sum of exp(z_j - M) as
    _stats's, with no cancellation (the normaliser cancels in the ratio; each term carries the rounding
    of one division more).  A floored element adds exp(floor) where its own term is smaller: the rows
    where that could show are recomputed unfloored (_unfloored_rows).  z is left as it was; p is left
    with 0 at the argmax; None where a row's max is +inf (then the general form: a +inf is counted)."""
    M, idx = maxima if maxima is not None else _max_argmax(z)
    if bool((M == float("inf")).any()):  # host-ok: a CPU tensor
        return _stats(z) + (None,)
    idx = idx.unsqueeze(-1)
    floor = M + _SOFTMAX_FLOOR[z.dtype]  # a NaN max: NaN (recomputed)
    if bool((z.amin(-1) >= floor).all()):  # host-ok: a CPU tensor. Nothing to floor (a pass less)
        S = _others_over_max(torch.softmax(z, -1, out=p), idx)
        return M, torch.where(M == float("-inf"), -1.0, S), idx, p
    torch.clamp(z, min=floor.unsqueeze(-1), out=p)
    p = torch.softmax(p, -1, out=p)  # in place (checked: tests/test_torch_path.py)
    # a floored element's term: exp(floor - M) as softmax forms it (not exp(floor) where M's ulp is large)
    S = _unfloored_rows(z, M, idx, _others_over_max(p, idx), torch.exp(floor - M), p)
    return M, S, idx, p


def _unfloored_rows(z, M, idx, S, floor_term, p=None, tau=None):
    """S with the rows where the floor could show in it (S below _FLOOR_MARGIN (C - 1) ``floor_term``,
    the most a floored or skipped element adds, a NaN, or no finite value) recomputed from z unfloored
    (and p's rows with them, where given; with ``tau``, z = x / τ for the rows x given)."""
    floored_ok = S >= (z.shape[-1] - 1) * _FLOOR_MARGIN[S.dtype] * floor_term
    if bool(floored_ok.all()):  # host-ok: a CPU tensor
        return S
    rows = (~floored_ok).nonzero().squeeze(1)  # host-ok: CPU
    z_r, idx_r = z.index_select(0, rows), idx.index_select(0, rows)
    if tau is not None:
        z_r = torch.div(z_r, tau.index_select(0, rows))
    p_r = torch.softmax(z_r, -1)
    S_r = _others_over_max(p_r, idx_r)
    S.index_copy_(0, rows, torch.where(M.index_select(0, rows) == float("-inf"), -1.0, S_r))
    if p is not None:
        p.index_copy_(0, rows, p_r)
    return S


# _stats_sparse takes a chunk where at most this share of its segments hold an element above the floor
# (beyond it, the floored softmax's passes cost less than gathering the segments)
SPARSE_SHARE = 0.4


def _stats_sparse(z, M, idx, seg_max, tau=None):
    """S of _stats_cpu from the segments of z's rows (_max_argmax_segments: ``M``, ``idx``, ``seg_max``)
    holding an element above the floor M + _SOFTMAX_FLOOR only, or None (nothing computed) where more
    than SPARSE_SHARE of them do, or a row's max is not finite: Σ_{j≠argmax} exp(max(z_j - M, floor))
    by torch.exp (bitwise _exp_ at those arguments) over those segments and the tail, each skipped
    element's term being below exp(floor) as a floored one's is, the rows where that could show
    recomputed unfloored (_unfloored_rows).  Where the floor removes most of z (small τ), most of the
    exponentials are skipped.  With ``tau`` (a column of the rows' τ), z = x / τ for the rows x given,
    divided only in the segments taken."""
    if seg_max is None or not bool(torch.isfinite(M).all()):  # host-ok: a CPU tensor
        return None
    rows, C = z.shape
    n_seg = seg_max.shape[1]
    body = n_seg * ARGMAX_SEGMENT
    low = _SOFTMAX_FLOOR[M.dtype]
    # a segment is taken where its max's z - M (rounded, as each element's) is above the floor
    sel = (seg_max - M.unsqueeze(-1) >= low).view(-1).nonzero().squeeze(1)  # host-ok: CPU; row-major
    if sel.numel() > SPARSE_SHARE * seg_max.numel():
        return None
    sel_row = sel.div(n_seg, rounding_mode="floor")
    segs = z.as_strided((rows * n_seg, ARGMAX_SEGMENT), (ARGMAX_SEGMENT, 1)) if body == C else \
        z.as_strided((rows, n_seg, ARGMAX_SEGMENT), (C, ARGMAX_SEGMENT, 1)).reshape(-1, ARGMAX_SEGMENT)
    e = segs.index_select(0, sel)
    if tau is not None:
        e = torch.div(e, tau.index_select(0, sel_row))
    e = e.sub_(M.index_select(0, sel_row).unsqueeze(-1)).clamp_(min=low).exp_()
    # the argmax's own 1 left out: its segment holds the max, so it is among those taken (or in the tail)
    in_body = (idx < body).nonzero().squeeze(1)  # host-ok: CPU
    arg_b = idx.index_select(0, in_body)
    at = torch.searchsorted(sel, in_body * n_seg + arg_b.div(ARGMAX_SEGMENT, rounding_mode="floor"))
    e.index_put_((at, arg_b.remainder(ARGMAX_SEGMENT)), torch.zeros((), dtype=e.dtype))
    S = torch.zeros(rows, dtype=M.dtype).index_add_(0, sel_row, e.sum(-1))
    if body < C:
        tail = z[:, body:] if tau is None else torch.div(z[:, body:], tau)
        tail = tail.sub(M.unsqueeze(-1)).clamp_(min=low).exp_()
        in_tail = (idx >= body).nonzero().squeeze(1)  # host-ok: CPU
        tail.index_put_((in_tail, idx.index_select(0, in_tail) - body), torch.zeros((), dtype=M.dtype))
        S += tail.sum(-1)
    return _unfloored_rows(z, M, idx.unsqueeze(-1), S, _EXP_LOW[M.dtype], tau=tau)


def _others_over_max(p, idx):
    """Σ_{j≠idx} p_j / p_idx per row; p is left with 0 at idx."""
    p_max = p.gather(-1, idx).squeeze(-1)
    return p.scatter_(-1, idx, 0.0).sum(-1) / p_max


def _nan_if_posinf(M, S):
    """S for everything but τ·logsumexp: NaN in a row with a +inf logit, as torch's inf - inf."""
    return torch.where(M == float("inf"), float("nan"), S)


# The hard-label cross-entropy epilogue, -log p_y of a row's class index y (cross-entropy's class-index
# targets; kd_loss's target, at τ = 1), as kernels/row_engine.py's: the target, its loss from the row's
# statistics and the target's share of the gradient p - onehot(y).

def class_target(target, sl, ignore_index):
    """The rows' class indices and whether they count: ``(valid, y)``, y a column (rows, 1), 0 where it is
    ignore_index (a target outside [0, C) was reported before: CPU tensors raise)."""
    y = target[sl]
    valid = y != ignore_index
    return valid, torch.where(valid, y, 0).unsqueeze(-1)


def target_nll(M, z_y, log_total):
    """-log p_y = lse(z) - z_y = (M - z_y) + log1p(S) (M = max z, log_total = log1p(S)): 0 + log1p(S) when y
    is the argmax, full relative precision at small τ."""
    return (M - z_y) + log_total


def target_complement(p, z, y, M, S):
    """``(p_y, q_y)``, q_y = 1 - p_y, the target's gradient -q_y in p - onehot(y) (p = softmax(z), M = max z,
    y a column): Σ_{j ≠ y} p_j = S/(1 + S) when y is the argmax, where 1 - p_y would round to 0 at small τ.
    S = -1 marks a row with no finite logit: NaN, as the composition's softmax (not ±inf)."""
    p_y = p.gather(-1, y).squeeze(-1)
    at_top = z.gather(-1, y).squeeze(-1) == M
    return p_y, torch.where(at_top, torch.where(S == -1.0, float("nan"), S / (1.0 + S)), 1.0 - p_y)
