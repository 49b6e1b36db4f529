"""gumbel_softmax and sample on every backend: distributions (chi-square at a fixed seed),
straight-through gradients, reproducibility, extreme and masked logits, bad input.

Under the Triton interpreter every row is one program run serially (a Philox draw costs a
few ms per block), so the triton runs draw fewer rows than the torch runs.
"""
import math

import pytest
import torch

import fused_tau._torch_row_engine as torch_row_engine
from fused_tau import reference
from fused_tau import GumbelSoftmax
from fused_tau.sampling import gumbel_softmax, gumbel_tau_schedule, sample

from .tolerances import tol

try:
    from scipy import stats
except ImportError:  # the statistic against hard-coded critical values instead
    stats = None

SEED_004 = [0.7, 0.2, 0.1]  # softmax: [0.464, 0.281, 0.255]
P_VALUE = 1e-3
CRITICAL = {2: 13.816, 3: 16.266, 4: 18.467}  # chi-square critical values at p = 0.001, by df


def chi2_ok(counts, probs):
    """Goodness of fit of ``counts`` to ``probs`` at p = 0.001."""
    counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
    expected = counts.sum() * torch.as_tensor(probs, dtype=torch.float64).cpu()
    stat = ((counts - expected) ** 2 / expected).sum().item()
    df = counts.numel() - 1
    if stats is not None:
        return stats.chi2.sf(stat, df) > P_VALUE
    return stat < CRITICAL[df]


def n_draws(backend, device, interpreted_rows):
    return interpreted_rows if backend == "triton" and device == "cpu" else 21000


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def test_chi2_helper_on_seed_004_printout():
    """Seed 004's torch printout, 10000 draws at τ = 0.2, fits softmax(logits) and not softmax(logits / τ)."""
    q1 = [4670, 2757, 2573]
    logits = torch.tensor(SEED_004, dtype=torch.float64)
    assert torch.allclose(torch.softmax(logits, -1), torch.tensor([0.464, 0.281, 0.255], dtype=torch.float64),
                          atol=1e-3)
    assert chi2_ok(q1, torch.softmax(logits, -1))
    assert not chi2_ok(q1, torch.softmax(logits / 0.2, -1))


def test_gumbel_argmax_follows_softmax_of_logits(backend, device):
    """The argmax of a Gumbel-softmax sample is a draw from softmax(logits) whatever τ
    (argmax((x + g) / τ) = argmax(x + g)): seed 004, pooled over τ and per τ, hard one-hots."""
    n = n_draws(backend, device, 900)
    taus = torch.tensor([0.2, 1.0, 5.0], device=device).repeat(n // 3)
    logits = torch.tensor(SEED_004, device=device).expand(n, 3)
    y = gumbel_softmax(logits, taus, hard=True, generator=gen(device, 4))
    assert y.shape == (n, 3) and y.dtype == torch.float32
    assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all()
    probs = torch.softmax(torch.tensor(SEED_004, dtype=torch.float64), -1)
    assert chi2_ok(y.sum(0), probs)
    for i in range(3):
        assert chi2_ok(y[i::3].sum(0), probs), taus[i].item()


def test_sample_follows_softmax_over_tau(backend, device):
    """sample draws from softmax(logits / τ): seed 004 at τ = 0.2, 1, 5 (one τ per row, one launch)."""
    n = n_draws(backend, device, 900)
    tau_values = [0.2, 1.0, 5.0]
    taus = torch.tensor(tau_values, device=device).repeat(n // 3)
    logits = torch.tensor(SEED_004, device=device).expand(n, 3)
    idx = sample(logits, tau=taus, generator=gen(device, 4))
    assert idx.shape == (n,) and idx.dtype == torch.int64
    for i, t in enumerate(tau_values):
        counts = torch.bincount(idx[i::3], minlength=3)
        assert chi2_ok(counts, torch.softmax(torch.tensor(SEED_004, dtype=torch.float64) / t, -1)), t


def test_sample_float_tau(backend, device):
    n = n_draws(backend, device, 300)
    logits = torch.tensor(SEED_004, device=device).expand(n, 3)
    counts = torch.bincount(sample(logits, tau=0.5, generator=gen(device, 5)), minlength=3)
    assert chi2_ok(counts, torch.softmax(torch.tensor(SEED_004, dtype=torch.float64) / 0.5, -1))


def test_gumbel_noise_differences_are_logistic(backend, device):
    """Equal logits at τ = 1: y_j / (y_j + y_k) = sigmoid(g_j - g_k), and the difference of two
    independent Gumbel(0, 1) is Logistic(0, 1), so the ratios over disjoint pairs are i.i.d. U(0, 1)."""
    rows = 150 if backend == "triton" and device == "cpu" else 3000
    y = gumbel_softmax(torch.zeros(rows, 16, device=device), 1.0, generator=gen(device, 12)).double()
    u = (y[:, 0::2] / (y[:, 0::2] + y[:, 1::2])).flatten().sort().values.cpu()
    n = u.numel()
    ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(ecdf_hi - u, u - (ecdf_hi - 1.0 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n), ks  # Kolmogorov-Smirnov at p = 0.001


try:
    import triton
    import triton.language as tl

    from fused_tau.kernels.tl_math import gumbel_of_word, philox_rounds

    @triton.jit
    def _gumbel_transform(w_ptr, g_ptr, n, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
        i = tl.arange(0, BLOCK)
        w = tl.load(w_ptr + i, mask=i < n, other=0).to(tl.uint32)
        tl.store(g_ptr + i, gumbel_of_word(w, INTERPRETED), mask=i < n)

    @triton.jit
    def _philox_words(seed_ptr, q_ptr, ours_ptr, triton_ptr, n, BLOCK: tl.constexpr, EMULATED: tl.constexpr):
        i = tl.arange(0, BLOCK)
        q = tl.load(q_ptr + i, mask=i < n, other=0)
        seed = tl.load(seed_ptr)
        a0, a1, a2, a3 = philox_rounds(seed, q, EMULATED)
        b0, b1, b2, b3 = tl.randint4x(seed, q)
        tl.store(ours_ptr + i, a0.to(tl.int64), mask=i < n)
        tl.store(ours_ptr + BLOCK + i, a1.to(tl.int64), mask=i < n)
        tl.store(ours_ptr + 2 * BLOCK + i, a2.to(tl.int64), mask=i < n)
        tl.store(ours_ptr + 3 * BLOCK + i, a3.to(tl.int64), mask=i < n)
        tl.store(triton_ptr + i, b0.to(tl.int64), mask=i < n)
        tl.store(triton_ptr + BLOCK + i, b1.to(tl.int64), mask=i < n)
        tl.store(triton_ptr + 2 * BLOCK + i, b2.to(tl.int64), mask=i < n)
        tl.store(triton_ptr + 3 * BLOCK + i, b3.to(tl.int64), mask=i < n)
except ImportError:
    _gumbel_transform = _philox_words = None


def test_gumbel_transform_matches_float64_over_the_tail(device):
    """The kernels' word-to-Gumbel transform (tl_math.gumbel_of_word: hardware log2, the series below
    u = 1/32) against -log(-log1p(-u)) in float64 for the same u = w · 2^-32 (clamped), over words
    from 0 (g = 22.2, the far right tail a rare class is drawn from) to 2^32 - 1 (g = -2.8), both
    sides of the series' threshold included.  The bound is the hardware log2's (2^-22 absolute near
    1, relative to L = -log2(1 - u) ≥ 0.045 above the threshold)."""
    if _gumbel_transform is None:
        pytest.skip("triton is not installed")
    from fused_tau.kernels.row_engine import interpreted

    if device == "cpu" and not interpreted():
        pytest.skip("kernels on CPU tensors need the interpreter")
    threshold = 2 ** 27  # u = 1/32
    words = sorted({0, 1, 2, 3, 2 ** 32 - 1, 2 ** 32 - 256, threshold - 1, threshold, threshold + 1}
                   | {int(2 ** (k / 4)) for k in range(128)}
                   | set(torch.randint(0, 2 ** 32, (300,), generator=torch.Generator().manual_seed(0)).tolist()))
    w = torch.tensor(words, dtype=torch.int64)
    g = torch.empty(len(words), dtype=torch.float32, device=device)
    _gumbel_transform[(1,)](w.to(device), g, len(words), BLOCK=1024, INTERPRETED=interpreted())
    u = (w.to(torch.float32) * 2.0 ** -32).clamp(2.0 ** -32, 1.0 - 2.0 ** -24).double()
    expected = -torch.log(-torch.log1p(-u))
    assert expected.max() > 22.0 and expected.min() < -2.7
    torch.testing.assert_close(g.cpu().double(), expected, atol=2e-5, rtol=1e-6)


def test_philox_is_tritons_bit_for_bit(device):
    """tl_math.philox_rounds (one 64-bit product a multiply; on CPU tensors its uint64 emulation, the
    interpreter runs no PTX) gives tl.randint4x's four words for 64-bit seeds and counters (high words set,
    negative ones), and Random123's known answer for key 0, counter 0 (philox4x32_10: 6627e8d5 e169c58d
    bc57ac4c 9b00dbd8)."""
    if _philox_words is None:
        pytest.skip("triton is not installed")
    from fused_tau.kernels.row_engine import interpreted

    if device == "cpu" and not interpreted():
        pytest.skip("kernels on CPU tensors need the interpreter")
    q = torch.tensor([0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 3 * 2 ** 40 + 17, -1, -2 ** 40],
                     dtype=torch.int64)
    q = torch.cat([q, torch.randint(0, 2 ** 62, (55,), generator=torch.Generator().manual_seed(3))]).to(device)
    for seed in (0, 1, 2 ** 31 - 1, 0x1234_5678_9ABC_DEF0):
        ours = torch.empty(4, 64, dtype=torch.int64, device=device)
        theirs = torch.empty_like(ours)
        _philox_words[(1,)](torch.tensor([seed], device=device), q, ours, theirs, len(q), BLOCK=64,
                            EMULATED=interpreted())
        assert torch.equal(ours, theirs), seed
        if seed == 0:
            assert (ours[:, 0] & 0xFFFFFFFF).tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_noise_does_not_depend_on_the_block(device, monkeypatch):
    """The kernels' noise is a function of (seed, row, column) alone: the same seed draws the same
    samples and the same Gumbel-softmax (forward and hard backward) whether a row of 50 classes is
    streamed in blocks of 16 (a partial last one) or held in one block."""
    pytest.importorskip("triton")
    import fused_tau.kernels.row_engine as row_engine

    monkeypatch.setenv("FUSED_TAU_BACKEND", "triton")
    x = torch.randn(6, 50, device=device, requires_grad=True)
    w = torch.randn(6, 50, device=device)
    taus = torch.tensor([0.3, 1.0, 3.0, 0.3, 1.0, 3.0], device=device).unsqueeze(1)

    def draws():
        idx = sample(x.detach(), tau=taus.squeeze(1), generator=gen(device, 5))
        soft = gumbel_softmax(x, 0.7, generator=gen(device, 6))
        hard = gumbel_softmax(x, 0.7, hard=True, generator=gen(device, 6))
        (dx,) = torch.autograd.grad((hard * w).sum(), x)
        return idx, soft.detach(), hard.detach(), dx

    results = []
    for block in (16, 64):
        monkeypatch.setattr(row_engine, "MAX_BLOCK", block)
        results.append(draws())
    (i16, s16, h16, d16), (i64, s64, h64, d64) = results
    assert torch.equal(i16, i64) and torch.equal(h16, h64)
    torch.testing.assert_close(s16, s64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d16, d64, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape,dim", [((5, 37), -1), ((3, 41, 2), 1), ((4, 3), 0)])
def test_hard_is_one_hot_with_the_soft_gradient(backend, device, monkeypatch, shape, dim):
    """Same generator seed: the hard sample is the one-hot of the soft one's argmax, and both have
    the gradient y (g - Σ g y) / τ of the soft sample y."""
    monkeypatch.setattr(torch_row_engine, "CHUNK_ELEMENTS", 64)  # the torch path over several chunks
    x = (torch.randn(shape, device=device) * 2).requires_grad_()
    g = torch.randn(shape, device=device)
    tau = 0.7
    soft = gumbel_softmax(x, tau, dim=dim, generator=gen(device, 11))
    kept = soft.detach().clone()
    (soft * g).sum().backward()
    assert torch.equal(soft.detach(), kept)  # the backward leaves the output alone
    grad_soft, x.grad = x.grad, None
    hard = gumbel_softmax(x, tau, hard=True, dim=dim, generator=gen(device, 11))
    (hard * g).sum().backward()

    index = soft.argmax(dim, keepdim=True)
    assert torch.equal(hard.detach(), torch.zeros_like(soft).scatter_(dim, index, 1.0))
    y, gg = soft.detach().double(), g.double()
    expected = y * (gg - (gg * y).sum(dim, keepdim=True)) / tau
    t = tol(torch.float32)
    torch.testing.assert_close(grad_soft.double(), expected, **t)
    torch.testing.assert_close(x.grad.double(), expected, **t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, device, dtype):
    x = (torch.randn(6, 37, device=device) * 3).to(dtype).requires_grad_()
    g = torch.randn(6, 37, device=device)
    soft = gumbel_softmax(x, 0.5, generator=gen(device, 2))
    hard = gumbel_softmax(x, 0.5, hard=True, generator=gen(device, 2))
    assert soft.dtype == dtype and hard.dtype == dtype
    t = tol(dtype)
    torch.testing.assert_close(soft.double().sum(-1), torch.ones(6, dtype=torch.float64, device=device),
                               atol=37 * t["atol"] + t["rtol"], rtol=0)
    assert torch.equal(hard, torch.zeros_like(hard).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0))
    (hard.double() * g).sum().backward()
    y = soft.detach().double()
    expected = y * (g.double() - (g.double() * y).sum(-1, keepdim=True)) / 0.5
    torch.testing.assert_close(x.grad.double(), expected, atol=4 * t["atol"], rtol=4 * t["rtol"])
    idx = sample(x.detach(), tau=0.5, generator=gen(device, 2))
    assert idx.shape == (6,) and ((idx >= 0) & (idx < 37)).all()


def test_soft_sample_properties(backend, device):
    """Rows sum to 1; small τ is nearly one-hot, large τ nearly uniform; one seed is one noise:
    the sample at τ2 is softmax(τ1 log y1 / τ2) of the sample at τ1."""
    x = torch.randn(40, 10, device=device)
    for tau in (0.01, 1.0, 100.0):
        y = gumbel_softmax(x, tau, generator=gen(device, 3))
        torch.testing.assert_close(y.sum(-1), torch.ones(40, device=device), atol=1e-5, rtol=0)
    sharp = gumbel_softmax(x, 0.01, generator=gen(device, 3))
    assert sharp.max(-1).values.mean() > 0.95
    flat = gumbel_softmax(x, 100.0, generator=gen(device, 3))
    assert (flat - 0.1).abs().max() < 0.02
    y1 = gumbel_softmax(x, 1.0, generator=gen(device, 3)).double()
    y2 = gumbel_softmax(x, 2.0, generator=gen(device, 3)).double()
    torch.testing.assert_close(y2, torch.softmax(torch.log(y1) / 2.0, -1), atol=1e-5, rtol=1e-4)


def test_reproducible_with_a_generator(backend, device):
    x = torch.randn(8, 21, device=device)
    a = gumbel_softmax(x, 0.5, generator=gen(device, 123))
    b = gumbel_softmax(x, 0.5, generator=gen(device, 123))
    c = gumbel_softmax(x, 0.5, generator=gen(device, 124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = gen(device, 123)
    first, second = sample(x, tau=2.0, generator=g), sample(x, tau=2.0, generator=g)
    assert torch.equal(first, sample(x, tau=2.0, generator=gen(device, 123)))
    assert not torch.equal(first, second)  # the generator advances
    torch.manual_seed(7)
    d = sample(x, tau=2.0)
    torch.manual_seed(7)
    assert torch.equal(d, sample(x, tau=2.0))  # the device's default generator


def test_rows_get_independent_noise(backend, device):
    """Identical rows (and identical columns) get different noise."""
    y = gumbel_softmax(torch.zeros(6, 16, device=device), 1.0, generator=gen(device, 9))
    assert len({tuple(r.tolist()) for r in y}) == 6
    assert (y[:, 1:] != y[:, :1]).all()


@pytest.mark.parametrize("tau", [1e-3, 1.0, 1e3])
def test_extreme_and_masked_logits(backend, device, tau):
    x = torch.randn(8, 20, device=device)
    x[:, 3] = 1e4
    x[:, 7] = -1e4
    x[:, 10:12] = float("-inf")
    x[5] = float("-inf")
    x[5, 15] = -1e4  # one finite class
    x.requires_grad_()
    y = gumbel_softmax(x, tau, generator=gen(device, 1))
    assert torch.isfinite(y).all() and (y[:, 10:12] == 0).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(8, device=device), atol=1e-5, rtol=0)
    assert y[5, 15] == 1
    hard = gumbel_softmax(x, tau, hard=True, generator=gen(device, 1))
    (hard * torch.randn_like(hard)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 10:12] == 0).all()
    assert (hard.argmax(-1)[torch.arange(8) != 5] == 3).all() and hard[5, 15] == 1
    idx = sample(x.detach(), tau=tau, generator=gen(device, 1))
    assert (idx[torch.arange(8) != 5] == 3).all() and idx[5] == 15


def test_sample_tau_zero_is_argmax(backend, device):
    x = torch.randn(9, 40, device=device)
    x[2, [4, 30]] = 10.0  # a tie: the first index, as torch.argmax
    x[3] = float("-inf")  # no finite logit: 0, as torch.argmax
    assert torch.equal(sample(x, tau=0.0), x.argmax(-1))
    assert torch.equal(sample(x.to(torch.bfloat16), tau=0), x.to(torch.bfloat16).argmax(-1))
    taus = torch.tensor([0.0, 1.0] * 4 + [0.0], device=device)  # per-row τ, zeros are greedy
    idx = sample(x, tau=taus, generator=gen(device, 0))
    assert torch.equal(idx[::2], x.argmax(-1)[::2])
    assert sample(x[0], tau=0.0).shape == () and sample(torch.randn(2, 3, 5, device=device), tau=0.3).shape == (2, 3)


def test_long_row(backend, device, monkeypatch):
    """A 5000-class row streamed in several blocks (a partial last one): masked classes are never
    drawn, and the draws follow softmax(x / τ) (sample) and softmax(x) (the Gumbel argmax)."""
    import fused_tau.kernels.row_engine as row_engine

    interpreted = backend == "triton" and device == "cpu"
    if interpreted:
        monkeypatch.setattr(row_engine, "MAX_BLOCK", 1024)  # 5 blocks a row, the last one partial
    n = 100 if interpreted else 3000
    C, tau = 5000, 0.8
    x = torch.full((C,), float("-inf"), dtype=torch.float64)
    singles = [5, 777, 2600, 4999]
    x[singles] = torch.tensor([1.0, 0.2, 0.5, -0.3], dtype=torch.float64)
    band = slice(1000, 2000)
    x[band] = -6.0

    def bins(idx):
        counts = [(idx == c).sum() for c in singles]
        in_band = ((idx >= band.start) & (idx < band.stop)).sum()
        assert sum(counts) + in_band == idx.numel()  # never a masked class
        return torch.stack(counts + [in_band]).cpu()

    def probs(t):
        p = torch.softmax(x / t, -1)
        return torch.cat([p[singles], p[band].sum().reshape(1)])

    logits = x.float().to(device).expand(n, C)
    assert chi2_ok(bins(sample(logits, tau=tau, generator=gen(device, 8))), probs(tau))
    hard = gumbel_softmax(logits, tau, hard=True, generator=gen(device, 8))
    assert (hard.sum(-1) == 1).all()
    assert chi2_ok(bins(hard.argmax(-1)), probs(1.0))


def test_posinf_logit_gives_compositions_nan(backend, device):
    """A +inf logit makes F.gumbel_softmax's soft sample NaN in its whole row (inf - inf): ours too,
    on both backends (the kernel gave NaN at the +inf and 0 elsewhere); the other rows are untouched."""
    x = torch.randn(3, 21, device=device)
    x[1, 4] = float("inf")
    y = gumbel_softmax(x, 0.5, generator=gen(device, 2))
    composition = torch.nn.functional.gumbel_softmax(x.cpu(), 0.5)
    assert torch.isnan(composition[1]).all()
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()


def test_tau_tensor_gets_no_gradient(backend, device):
    x = torch.randn(4, 9, device=device, requires_grad=True)
    tau = torch.tensor(0.5, device=device, requires_grad=True)
    gumbel_softmax(x, tau, generator=gen(device, 0)).pow(2).sum().backward()
    assert x.grad is not None and tau.grad is None


def test_module_and_schedule(backend, device):
    x = torch.randn(5, 12, device=device)
    m = GumbelSoftmax(tau=0.5, hard=True)
    assert "hard=True" in repr(m)
    assert torch.equal(m(x, generator=gen(device, 6)), gumbel_softmax(x, 0.5, True, generator=gen(device, 6)))
    assert gumbel_tau_schedule(0) == 1.0
    assert gumbel_tau_schedule(1000) == pytest.approx(math.exp(-0.1))
    assert gumbel_tau_schedule(10**6) == 0.5
    assert gumbel_tau_schedule(100, tau0=2.0, rate=1e-2, tau_min=0.1) == pytest.approx(2.0 * math.exp(-1.0))


def test_non_contiguous_and_empty(backend, device):
    base = torch.randn(23, 40, device=device)
    x = base.t()[3:, ::2]
    before = base.clone()
    y = gumbel_softmax(x, 0.7, generator=gen(device, 0))
    torch.testing.assert_close(y.sum(-1), torch.ones(37, device=device), atol=1e-5, rtol=0)
    idx = sample(x, tau=0.7, generator=gen(device, 0))
    assert idx.shape == (37,) and ((idx >= 0) & (idx < 12)).all()
    assert torch.equal(sample(x, tau=0.0), x.argmax(-1))
    assert torch.equal(base, before)
    assert gumbel_softmax(torch.randn(0, 7, device=device)).shape == (0, 7)
    assert sample(torch.randn(0, 7, device=device)).shape == (0,)


def test_reference_backend(monkeypatch, device):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "reference")
    x = torch.randn(6, 5, device=device)
    assert torch.equal(gumbel_softmax(x, 0.3, hard=True, generator=gen(device, 1)),
                       reference.gumbel_softmax(x, 0.3, True, generator=gen(device, 1)))
    assert torch.equal(sample(x, tau=0.3, generator=gen(device, 1)), reference.sample(x, tau=0.3, generator=gen(device, 1)))
    idx = sample(x, tau=torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], device=device))
    assert idx.shape == (6,) and torch.equal(idx[::2], x.argmax(-1)[::2])


X = torch.randn(4, 7)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: gumbel_softmax([1.0, 2.0]), TypeError, "logits must be a torch.Tensor"),
    (lambda: gumbel_softmax(torch.arange(5)), TypeError, "logits must be float16"),
    (lambda: gumbel_softmax(X, dim=2), IndexError, "dim=2"),
    (lambda: gumbel_softmax(X, 0.0), ValueError, "tau must be positive"),
    (lambda: gumbel_softmax(X, -1.0), ValueError, "tau must be positive"),
    (lambda: gumbel_softmax(X, float("nan")), ValueError, "tau must be positive"),
    (lambda: gumbel_softmax(X, torch.tensor([0.5, 0.0, 1.0, 2.0])), ValueError, "tau must be positive"),
    (lambda: gumbel_softmax(X, torch.tensor([0.5, 1.0])), ValueError, "tau must be a float, a one-element"),
    (lambda: gumbel_softmax(X, "0.5"), TypeError, "tau must be a float"),
    (lambda: gumbel_softmax(X, generator=123), TypeError, "generator must be a torch.Generator"),
    (lambda: sample([1.0, 2.0]), TypeError, "logits must be a torch.Tensor"),
    (lambda: sample(torch.arange(5)), TypeError, "logits must be float16"),
    (lambda: sample(torch.tensor(1.0)), ValueError, "logits must have at least one dimension"),
    (lambda: sample(torch.randn(3, 0)), ValueError, "logits must have at least one class"),
    (lambda: sample(X, tau=-0.5), ValueError, "tau must be non-negative and finite"),
    (lambda: sample(X, tau=float("inf")), ValueError, "tau must be non-negative and finite"),
    (lambda: sample(X, tau=float("nan")), ValueError, "tau must be non-negative and finite"),
    (lambda: sample(X, tau=torch.tensor([1.0, -1.0, 1.0, 1.0])), ValueError, "tau must be non-negative"),
    (lambda: sample(X, tau=torch.tensor([1.0, 1.0])), ValueError, "tau must be a float, a one-element"),
    (lambda: sample(X, tau=True), TypeError, "tau must be a float"),
    (lambda: sample(X, generator="seed"), TypeError, "generator must be a torch.Generator"),
])
def test_bad_input(no_launch, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
