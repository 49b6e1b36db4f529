"""Every number the seed documents (../shared/seeds/) print, as a test.

Each printed value is checked to half a unit of its last printed digit; values
printed with full precision (seed 002) to fp32's relative precision (and to
1e-12 in float64 on the torch path).  Where torch's fp32 prints 0 (seed 003 at
τ = 0.01), fused_tau returns the exact tiny loss instead.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fused_tau


def _printed_tolerance(text):
    """Half a unit in the last printed digit of ``text`` ('4.5418e-05' -> 5e-10)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10 ** (-decimals) * 10 ** int(exponent or 0)


def assert_printed(values, printed, truncated=False):
    """Each value equals its printed text to half a unit of the last digit (a full unit where
    the author truncated instead of rounding, as seed 003's table does: 0.00669 printed 6.6e-03)."""
    for v, p in zip(values, printed):
        unit = 2 * _printed_tolerance(p) if truncated else _printed_tolerance(p)
        assert abs(float(v) - float(p)) <= unit * 1.0001, (float(v), p)


# seed 000: logits [1, 2, 3], ground truth class 2
SEED_000 = [
    (1.0, ["0.0900", "0.2447", "0.6652"], "0.4076"),
    (0.5, ["0.0159", "0.1173", "0.8668"], "0.1429"),
    (0.1, ["2.0611e-09", "4.5398e-05", "9.9995e-01"], "4.5418e-05"),
]


@pytest.mark.parametrize("tau,probs,loss", SEED_000)
def test_seed_000_softmax_and_loss(backend, device, tau, probs, loss):
    x = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    y = torch.tensor([2], device=device)
    assert_printed(fused_tau.softmax(x, tau=tau)[0].tolist(), probs)
    ours = fused_tau.cross_entropy(x, y, tau=tau).item()
    if tau == 0.1:
        # The seed's 4.5418e-05 is torch's fp32 rounding error, 3.9e-4 off relatively (DESIGN.md,
        # "Numerics"); the exact loss log1p(e^-10 + e^-20) is 4.5401e-05, which fused_tau returns.
        assert_printed([F.cross_entropy(x.cpu() / tau, y.cpu()).item()], [loss])
        exact = math.log1p(math.exp(-10) + math.exp(-20))
        assert abs(ours - exact) <= 1e-6 * exact
    else:
        assert_printed([ours], [loss])


# seed 001: x = [1, 2, 3, 4] scaled by 1, 10 and 1/10 (τ = 1, 0.1, 10)
SEED_001 = [
    (1.0, ["0.0321", "0.0871", "0.2369", "0.6439"], "4.4402"),
    (0.1, ["9.36e-14", "2.06e-9", "4.54e-5", "1.00"], "40.00"),
    (10.0, ["0.2138", "0.2363", "0.2612", "0.2887"], "1.6425"),
]


@pytest.mark.parametrize("tau,probs,lse", SEED_001)
def test_seed_001_smooth_max(backend, device, tau, probs, lse):
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], device=device)
    assert_printed(fused_tau.softmax(x, tau=tau)[0].tolist(), probs)
    # the seed prints LSE of the scaled vector, i.e. logsumexp(x / τ) = fused_tau.logsumexp(x, τ) / τ
    assert_printed([fused_tau.logsumexp(x, tau=tau).item() / tau], [lse])


# seed 002: softmax([1, 5, 7, 10] / t), printed with full double precision
SEED_002 = {
    0.1: [8.194012623989748e-40, 1.928749847963737e-22, 9.357622968839298e-14, 0.9999999999999064],
    1: [0.00011679362893736733, 0.006376716075637758, 0.0471179128098403, 0.9463885774855847],
    10: [0.14763314666550595, 0.2202427743860977, 0.26900513210002774, 0.3631189468483686],
    100: [0.23827555570657363, 0.24799976560608047, 0.25300969319764466, 0.2607149854897012],
    10000: [0.2498812648459304, 0.2499812373450356, 0.2500312385924627, 0.2501062592165714],
}


@pytest.mark.parametrize("tau", list(SEED_002))
def test_seed_002_temperature_table(backend, device, tau):
    expected = torch.tensor(SEED_002[tau], dtype=torch.float64)
    x = torch.tensor([[1.0, 5.0, 7.0, 10.0]], device=device)
    got = fused_tau.softmax(x, tau=tau)[0].double().cpu()
    # fp32: full relative precision for every normal number (8.19e-40 is below fp32's normal range)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-37)
    if backend == "torch":
        got64 = fused_tau.softmax(x.double(), tau=float(tau))[0].cpu()
        torch.testing.assert_close(got64, expected, rtol=1e-12, atol=0)


def test_seed_002_moco_example(backend, device):
    """K = 1024, positive similarity 1, negatives -1: loss 4.94 at τ = 1, 'literally 0.0' at 0.07
    (exactly log1p(1023 e^{-2/0.07}) = 3.9e-10, which fused_tau keeps)."""
    x = torch.full((1, 1024), -1.0, device=device)
    x[0, 0] = 1.0
    y = torch.zeros(1, dtype=torch.long, device=device)
    assert_printed([fused_tau.cross_entropy(x, y, tau=1.0).item()], ["4.94"])
    exact = math.log1p(1023 * math.exp(-2 / 0.07))
    small = fused_tau.cross_entropy(x, y, tau=0.07).item()
    assert small < 1e-9 and abs(small - exact) <= 1e-5 * exact


# seed 003: similarities of an anchor to its positive (class 0) and three negatives
SEED_003_A = [
    (1.0, ["0.3684", "0.2869", "0.1425", "0.2022"], "0.9986"),
    (0.5, ["0.4861", "0.2948", "0.0727", "0.1464"], "0.7214"),
    (0.05, ["0.9933", "6.6e-03", "5.5e-09", "6.1e-06"], "0.0067"),
    (0.01, ["1.00", "1.3e-11", "5.5e-42", "8.7e-27"], "0"),
]
SEED_003_B = [(1.0, "1.2486"), (0.5, "1.2214"), (0.05, "5.0067"), (0.01, "25")]


@pytest.mark.parametrize("tau,probs,loss", SEED_003_A)
def test_seed_003_positive_is_nearest(backend, device, tau, probs, loss):
    sims = torch.tensor([[0.5, 0.25, -0.45, -0.1]], device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    p = fused_tau.softmax(sims, tau=tau)[0].tolist()
    if tau == 0.01:
        p[2] = 5.5e-42 if p[2] < 1e-37 else p[2]  # a subnormal fp32 may flush to zero on a GPU
    assert_printed(p, probs, truncated=True)
    ours = fused_tau.cross_entropy(sims, y, tau=tau).item()
    assert_printed([ours], [loss], truncated=True)
    exact = F.cross_entropy(sims.double() / tau, y).item()
    assert abs(ours - exact) <= 1e-5 * exact
    if tau == 0.01:
        assert F.cross_entropy(sims / tau, y).item() == 0.0  # what the seed's torch printed
        assert ours > 1e-11  # the exact loss, 1.39e-11, survives


@pytest.mark.parametrize("tau,loss", SEED_003_B)
def test_seed_003_negative_is_nearest(backend, device, tau, loss):
    sims = torch.tensor([[0.25, 0.5, -0.45, -0.1]], device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    assert_printed([fused_tau.cross_entropy(sims, y, tau=tau).item()], [loss], truncated=True)


def test_seed_004_softmax_of_gumbel_logits(backend, device):
    """Seed 004's q2 = softmax([0.7, 0.2, 0.1]) = [0.464, 0.281, 0.255]."""
    x = torch.tensor([0.7, 0.2, 0.1], device=device)
    assert_printed(fused_tau.softmax(x).tolist(), ["0.464", "0.281", "0.255"])
