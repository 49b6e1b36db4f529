"""The torch path's CPU fast paths (issue 16, item 6), each against the plain form it replaces and
through its fallback: _exp_ (bitwise torch.exp), _max_argmax (torch.max), the softmax-based row
statistics of cross_entropy, kd_loss's direct second-order form and its per-kind backward, and the
tile engine's in-order accumulation of column chunks."""
import threading

import pytest
import torch

import fused_tau
import fused_tau._torch_kd as torch_kd
import fused_tau._torch_kd_stats as torch_kd_stats
import fused_tau._torch_row_engine as torch_row_engine
import fused_tau._torch_tile as torch_tile

NAN, INF = float("nan"), float("inf")


def _bits(x):
    """x as integers (NaN payloads aside): bitwise comparison, -0.0 told from 0.0."""
    x = torch.where(torch.isnan(x), NAN, x)
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


# ------------------------------------------------------------------ _exp_

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099])
def test_exp_is_bitwise_torch_exp(dtype, n):
    g = torch.Generator().manual_seed(n)
    scale = 130.0 if dtype == torch.float32 else 900.0  # the underflow band of each dtype is reached
    for spread in (1.0, scale):  # no underflow (torch.exp itself), then the band passes
        d = -torch.rand(n, generator=g, dtype=torch.float64).to(dtype) * spread
        d[torch.randint(0, n, (max(1, n // 50),), generator=g)] = float("-inf")
        if n > 3:
            d[1] = NAN
            d[2] = torch_row_engine._EXP_RANGE[dtype][0]  # LOW itself: normal, outside the band's zeroing
        ref = torch.exp(d)
        assert torch.equal(_bits(torch_row_engine._exp_(d.clone())), _bits(ref))
        out = torch.empty_like(d)
        kept = d.clone()
        torch_row_engine._exp_(d, torch.empty(n + 5, dtype=dtype), out=out)
        assert torch.equal(_bits(out), _bits(ref)) and torch.equal(_bits(d), _bits(kept))
        strided = torch.stack([d, d]).T  # not contiguous
        assert torch.equal(_bits(torch_row_engine._exp_(strided.clone().T.contiguous().T)), _bits(torch.exp(strided)))


def test_exp_band_exhaustive():
    """Every fp32 value from below where exp is 0 to above LOW: the band's subnormal values and the
    zeros around it are torch.exp's, wherever they fall among the groups."""
    lo = torch.tensor(-104.5).view(torch.int32).item()
    hi = torch.tensor(-87.0).view(torch.int32).item()
    v = torch.arange(hi, lo + 1, dtype=torch.int32).view(torch.float32)
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(_bits(torch_row_engine._exp_(v.clone())), _bits(torch.exp(v)))


# ------------------------------------------------------------------ _max_argmax

@pytest.mark.parametrize("C", [5, 64, 127, 128, 200, 256, 1000])
def test_max_argmax_is_torch_max(C):
    g = torch.Generator().manual_seed(C)
    z = torch.randn(12, C, generator=g)
    z[1, :] = float("-inf")  # no finite value: index 0
    z[2, C // 2] = NAN
    z[3, C - 1] = NAN  # a NaN in the tail
    z[3, 0] = NAN  # ... and one before it: the first wins
    z[4, C - 1] = 50.0  # the maximum in the tail
    z[5, [0, C // 3, C - 1]] = 60.0  # ties across segments and the tail: the first
    z[6, [C - 2, C - 1]] = 70.0
    z[7, 3] = INF
    z[8] = 1.0  # all tied
    z[9, C - 1] = NAN  # a NaN only in the tail
    M, idx = torch_row_engine._max_argmax(z)
    M_ref, idx_ref = z.max(-1)
    assert torch.equal(_bits(M), _bits(M_ref)) and torch.equal(idx, idx_ref)


# ------------------------------------------------------------------ cross_entropy statistics

def test_stats_cpu_matches_stats():
    """S from the softmax (Σ_{j≠argmax} p_j / p_argmax) against _stats's exp sum: a few ulps, the
    same M and argmax; a row with a +inf max takes the general form (its +inf counted)."""
    g = torch.Generator().manual_seed(0)
    for tau in (0.01, 0.07, 1.0, 20.0):
        z = torch.randn(16, 3000, generator=g) * 4 / tau
        z[1] = float("-inf")
        z[2, 7] = NAN
        z[3, [5, 900]] = z[3].amax()  # a tie: counted 1
        M, S, idx = torch_row_engine._stats(z.clone())
        M2, S2, idx2, p = torch_row_engine._stats_cpu(z.clone(), torch.empty_like(z))
        assert p is not None
        assert torch.equal(_bits(M2), _bits(M)) and torch.equal(idx2, idx)
        torch.testing.assert_close(S2, S, rtol=8 * 2 ** -24, atol=0, equal_nan=True)
        assert S2[1] == -1 and torch.isnan(S2[2])
    z = torch.randn(4, 300, generator=g)
    z[0, [3, 9]] = INF
    M, S, idx = torch_row_engine._stats(z.clone())
    M2, S2, idx2, p = torch_row_engine._stats_cpu(z.clone(), torch.empty_like(z))
    assert p is None and torch.equal(_bits(S2), _bits(S)) and S2[0] == 1.0


def test_cross_entropy_tiny_loss_full_precision():
    """DESIGN.md's example at several chunkings: logits [1, 2, 3], target 2, τ = 0.05 (exact 2.06e-9),
    in a long row of -inf and far classes so that the fast path's segments and groups are crossed."""
    x = torch.full((3, 4099), -1e4)
    x[:, [100, 2000, 4098]] = torch.tensor([1.0, 2.0, 3.0])
    y = torch.full((3,), 4098)
    x[1, 7] = float("-inf")
    loss = fused_tau.cross_entropy(x, y, tau=0.05, reduction="none")
    exact = torch.log1p(torch.tensor(-20.0, dtype=torch.float64).exp() + torch.tensor(-40.0, dtype=torch.float64).exp())
    torch.testing.assert_close(loss.double(), exact.expand(3), rtol=4e-7, atol=0)


def test_softmax_in_place_is_out_of_place():
    """_stats_cpu hands torch.softmax its input as its out: the same values as a fresh output."""
    z = torch.randn(7, 3001, generator=torch.Generator().manual_seed(4)) * 30
    ref = torch.softmax(z, -1)
    assert torch.equal(_bits(torch.softmax(z, -1, out=z)), _bits(ref))


@pytest.mark.parametrize("C", [3000, 3001, 32000])
@pytest.mark.parametrize("tau", [0.01, 0.03])
def test_stats_sparse_matches_stats(C, tau):
    """The segment form of the cross-entropy statistics (only the segments above the floor): _stats's M
    and argmax, S to a few ulps (ties at the max, an argmax in the tail, -inf classes, rows whose S is
    so small the floor could show, recomputed unfloored)."""
    g = torch.Generator().manual_seed(C)
    z = torch.randn(16, C, generator=g) * 4 / tau
    z[3, [5, 900]] = z[3].amax()  # a tie: counted 1
    z[4, 7] = float("-inf")
    z[5, C - 1] = z[5].amax() + 1  # the argmax in the tail (C = 3001)
    z[6, C - 2:] = z[6].amax() + 1  # ... tied there
    z[7, 11] = z[7].amax() + 200  # S exactly 0
    z[8] = -1e4 / tau
    z[8, [100, 2000, C - 1]] = torch.tensor([1.0, 2.0, 3.0]) / tau  # DESIGN.md's tiny loss
    M, S, idx = torch_row_engine._stats(z.clone())
    M2, idx2, seg_max = torch_row_engine._max_argmax_segments(z)
    S2 = torch_row_engine._stats_sparse(z, M2, idx2, seg_max)
    assert S2 is not None  # small τ: most segments are below the floor
    assert torch.equal(_bits(M2), _bits(M)) and torch.equal(idx2, idx.squeeze(-1))
    torch.testing.assert_close(S2, S, rtol=8 * 2 ** -24, atol=0)
    assert S2[7] == 0 and S2[8] > 0


@pytest.mark.parametrize("C", [300, 3000])
def test_floor_with_huge_max(C):
    """Logits so large that M + floor rounds far from it (an ulp of 1e9 is 64, of 3e38 2e31): both forms
    of the statistics still give _stats's S (the floored softmax judges a floored element by
    exp(floor - M) as rounded; the segment form takes segments by their own z - M)."""
    g = torch.Generator().manual_seed(C)
    z = torch.randn(6, C, generator=g) * 300
    z[1] += 1e9
    z[2] = z[2] * 1e6 + 1e9
    z[3, :2] = torch.tensor([3e38, 3e38 * (1 - 2 ** -23)])
    z[4] = z[4] * 1e34
    M, S, idx = torch_row_engine._stats(z.clone())
    M2, S2, idx2, _ = torch_row_engine._stats_cpu(z.clone(), torch.empty_like(z))
    torch.testing.assert_close(S2, S, rtol=8 * 2 ** -24, atol=0)
    S3 = torch_row_engine._stats_sparse(z, *torch_row_engine._max_argmax_segments(z))
    assert S3 is not None
    torch.testing.assert_close(S3, S, rtol=8 * 2 ** -24, atol=0)


def test_stats_sparse_declines_dense_and_special_rows():
    """None (the floored softmax instead) where most segments hold an element above the floor, or a
    row's max is not finite."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, 3000, generator=g)
    assert torch_row_engine._stats_sparse(z, *torch_row_engine._max_argmax_segments(z)) is None
    z = torch.randn(8, 3000, generator=g) * 400
    assert torch_row_engine._stats_sparse(z, *torch_row_engine._max_argmax_segments(z)) is not None
    for special in (NAN, INF):
        z[2, 5] = special
        assert torch_row_engine._stats_sparse(z, *torch_row_engine._max_argmax_segments(z)) is None


def test_cross_entropy_exponentials_skip_the_subnormal_range(monkeypatch):
    """The CPU forward at small τ hands torch.softmax no argument in the subnormal range of exp (each
    such lane costs a microcode assist on x86: the forward was 1.3x slower than eager torch's), and
    keeps float64's loss."""
    seen = []
    softmax = torch.softmax

    def spy(t, dim, *args, **kwargs):
        seen.append(float((t - t.amax(-1, keepdim=True)).min()))
        return softmax(t, dim, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", spy)
    g = torch.Generator().manual_seed(6)
    for C, tau in ((32000, 0.2), (3001, 0.2), (32000, 3.0)):  # the segment form; the floored softmax; no floor
        x = torch.randn(64, C, generator=g) * 4
        y = torch.randint(0, C, (64,), generator=g)
        loss = fused_tau.cross_entropy(x, y, tau=tau, reduction="none")
        ref = torch.nn.functional.cross_entropy(x.double() / tau, y, reduction="none")
        torch.testing.assert_close(loss.double(), ref, rtol=4e-7, atol=0)
    assert seen and min(seen) >= torch_row_engine._EXP_RANGE[torch.float32][0] - 1e-3


# ------------------------------------------------------------------ kd_loss

def _kl64(s, t, tau):
    lp = torch.log_softmax(s.double() / tau, -1)
    lq = torch.log_softmax(t.double() / tau, -1)
    return (lq.exp() * (lq - lp)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kd_direct_and_series_rows(dtype, monkeypatch):
    """One block with rows of each form: far rows (l ~ 0.3, the direct form), near rows (l ~ 1e-7, the
    series, recomputed by _row_stats_finite) and rows past PRECISE_BOUND (plain); each KL to a few
    ulps of float64 (the direct form to a few ulps of float64 too, where the fp32 series stops)."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(9, 700, generator=g, dtype=torch.float64) * 3
    s = t + 1.5 * torch.randn(9, 700, generator=g, dtype=torch.float64)  # l ~ 0.3
    s[3:6] = t[3:6] + 1e-3 * torch.randn(3, 700, generator=g, dtype=torch.float64)
    s[6:] = t[6:] * 4
    s, t = s.to(dtype), t.to(dtype)
    taken = {}
    series = torch_kd_stats._row_stats_finite

    def counted(s_, t_, *a):
        taken["series rows"] = s_.shape[0]
        return series(s_, t_, *a)

    monkeypatch.setattr(torch_kd_stats, "_row_stats_finite", counted)
    inv = torch.full((9, 1), 1 / 2.0, dtype=dtype)
    Ms, Ss, Mt, St, kl, nu, precise = torch_kd_stats._row_stats_cpu(s, t, inv, torch_kd_stats._scratch(s))
    assert taken["series rows"] == 3
    assert precise[:6].all() and not precise[6:].any()
    ref = _kl64(s, t, 2.0)
    eps = torch.finfo(dtype).eps
    rel = ((kl.double() - ref) / ref).abs()
    assert rel[:3].max() < 16 * eps  # direct
    assert rel[3:6].max() < (1e-6 if dtype == torch.float64 else 64 * eps)  # series: truncated for fp32
    assert rel[6:].max() < 1e-5


def test_kd_direct_factor_sends_rows_to_the_series(monkeypatch):
    """DIRECT_FACTOR 0: every second-order row recomputed by the series, with the same KL as the
    direct form to the precision of each."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(5, 300, generator=g) * 3
    s = torch.randn(5, 300, generator=g) * 3
    inv = torch.full((5, 1), 0.25)
    direct = torch_kd_stats._row_stats_cpu(s, t, inv, torch_kd_stats._scratch(s))
    monkeypatch.setattr(torch_kd_stats, "DIRECT_FACTOR", 0.0)
    series = torch_kd_stats._row_stats_cpu(s, t, inv, torch_kd_stats._scratch(s))
    assert torch.equal(direct[6], series[6]) and direct[6].any()
    torch.testing.assert_close(direct[4], series[4], rtol=1e-6, atol=0)
    torch.testing.assert_close(direct[5], series[5], rtol=1e-6, atol=1e-7)


def _kd_grad(s, t, tau):
    s = s.detach().clone().requires_grad_()
    fused_tau.kd_loss(s, t, tau=tau).backward()
    return s.grad


def test_kd_backward_groups_and_fallbacks(monkeypatch):
    """Rows of both kinds interleaved (gathered groups), a run of one kind (a slice), a second-order
    row with a class of teacher probability 0 and one failing the v - ν bound (both to the general
    form): every gradient to float64's at fp32 precision, and the same as the general form's."""
    monkeypatch.setattr(torch_row_engine, "CHUNK_ELEMENTS", 4 * 500)  # several groups per kind
    g = torch.Generator().manual_seed(3)
    t = torch.randn(14, 500, generator=g) * 3
    s = torch.randn(14, 500, generator=g) * 3
    near = torch.tensor([0, 2, 4, 6, 8, 9, 10, 11])
    s[near] = t[near] + 0.05 * torch.randn(len(near), 500, generator=g)
    t[2, 17] = float("-inf")  # q = 0 on a second-order row: the general form
    s[4] = t[4] + 200.0  # ν large: the v - ν bound fails there (the shifted-gap forms)
    tau = 1.5
    kinds = []
    plain_kind = torch_kd._bwd_kind

    def seen(*a):
        kinds.append((a[8], a[0].shape[0]))
        return plain_kind(*a)

    monkeypatch.setattr(torch_kd, "_bwd_kind", seen)
    ours = _kd_grad(s, t, tau)
    assert {k for k, _ in kinds} == {True, False}
    s64 = s.double().requires_grad_()
    lp = torch.log_softmax(s64 / tau, -1)
    lq = torch.log_softmax(t.double() / tau, -1)
    q = lq.exp()
    (tau ** 2 * torch.where(q > 0, q * (lq - lp), 0.0).sum() / s.shape[0]).backward()
    scale = s64.grad.abs().max().item()  # a row's gradient is p - q: its rounding is relative to the largest
    torch.testing.assert_close(ours.double(), s64.grad, rtol=2e-5, atol=2e-6 * scale)
    monkeypatch.setattr(torch_kd, "kd_bwd", torch_kd._kd_bwd)  # the general form for every row
    torch.testing.assert_close(_kd_grad(s, t, tau), ours, rtol=2e-5, atol=2e-6 * scale)


# ------------------------------------------------------------------ the tile engine's chunk order

def test_in_chunk_order_applies_in_order_without_waiting():
    """Chunks finishing out of order: the later ones' updates wait (their threads go on) and are
    applied in chunk order by whichever thread finds the next one ready; a thread further ahead than
    the backlog waits for its turn."""
    order = torch_tile._InChunkOrder(backlog=3)
    applied = []
    ahead = threading.Thread(target=lambda: (order.run(1, lambda: applied.append(1)),
                                             order.run(2, lambda: applied.append(2))), daemon=True)
    ahead.start()
    ahead.join(5)
    assert not ahead.is_alive()  # both returned at once, chunk 0 not done (its thread would wait for it)
    assert applied == []
    blocked = threading.Event()

    def far_ahead():
        order.run(3, lambda: applied.append(3))
        blocked.set()

    th = threading.Thread(target=far_ahead)
    th.start()
    assert not blocked.wait(0.2)  # 3 >= next + backlog: it waits
    order.run(0, lambda: applied.append(0))
    th.join(5)
    assert blocked.is_set() and applied == [0, 1, 2, 3]


def test_in_chunk_order_failure_releases_waiters():
    order = torch_tile._InChunkOrder(backlog=1)
    done = []

    def waiter():
        try:
            order.run(2, lambda: done.append(2))
        except RuntimeError:
            done.append("released")

    th = threading.Thread(target=waiter)
    th.start()
    order.fail()
    th.join(5)
    assert done == ["released"]
