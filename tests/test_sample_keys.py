"""sample's Gumbel-max keys at large |logits| / τ, and NaN logits (issue 12, item 7).

A key formed as x + τ g (or x / τ + g) rounds the noise to the grid of x's ulps once |x| / τ
passes ~1e6: logits [1000, 1000 + 1 ulp] at τ = 1 ulp (6.1e-5) then draw the larger class 62%
of the time instead of softmax's 73%.  Under the Triton interpreter (tests/conftest.py: blocks
of 16 columns) each row is one program and costs a Philox draw, so the triton runs draw
~1000 rows: enough to tell 62% from 73% by 8σ.
"""
import math

import pytest
import torch

from fused_tau.sampling import sample

# one-sided tail of a 4σ band: a correct sampler leaves it with probability 6e-5 (a fixed seed
# makes each run deterministic anyway)
Z_BOUND = 4.0


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def ulp_pair():
    """(1000, the next fp32 after it, the gap between them: 2^-14 = 6.1e-5)."""
    x0 = torch.tensor(1000.0)
    x1 = torch.nextafter(x0, torch.tensor(2000.0))
    return x0.item(), x1.item(), (x1 - x0).item()


def assert_binomial(hits, n, p, what):
    """hits ~ Binomial(n, p), judged by |hits - n p| <= Z_BOUND sd."""
    sd = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= Z_BOUND * sd, \
        f"{what}: {hits}/{n} = {hits / n:.4f}, softmax gives {p:.4f} (bound ±{Z_BOUND * sd / n:.4f})"


def test_noise_survives_large_logits_over_tau(backend, device):
    """Logits [1000, 1000 + 1 ulp] at τ = 1 ulp: softmax gives the larger class sigmoid(1) = 73.1%
    (a key rounded to x's ulps gives 62%).  At n = 1000 the band is 73.1 ± 5.6%, 3.6σ of the
    rounded sampler's spread away from 62%."""
    n = 1000 if interpreted(backend, device) else 20000
    x0, x1, gap = ulp_pair()
    logits = torch.tensor([x0, x1], device=device).expand(n, 2)
    idx = sample(logits, tau=gap, generator=gen(device, 0))
    assert ((idx == 0) | (idx == 1)).all()
    assert_binomial(int(idx.sum()), n, 1 / (1 + math.exp(-1.0)), "larger class at tau = 1 ulp")


def test_noise_survives_within_a_lane_and_per_row_tau(backend, device):
    """Rows of 32 columns, the two finite ones 16 apart (one lane of a 16-column block, so the
    kernel compares them in one lane across blocks), with one τ per row:
    equal logits 1000 at τ = 1/4 ulp draw each class half of the time (a key rounded to x's
    ulps ties and keeps the first: 11%); τ = 0 rows are argmax (the first on ties)."""
    n_noisy = 100 if interpreted(backend, device) else 4000
    x0, x1, gap = ulp_pair()
    first, second = 3, 19
    rows = torch.full((n_noisy + 2, 32), float("-inf"))
    rows[:, first] = x0
    rows[:n_noisy + 1, second] = x0  # equal logits; the last row's second logit is the larger
    rows[n_noisy + 1, second] = x1
    tau = torch.full((n_noisy + 2,), gap / 4)
    tau[n_noisy:] = 0.0  # a greedy tie (-> first), a greedy larger second (-> second)
    idx = sample(rows.to(device), tau=tau.to(device), generator=gen(device, 1))
    assert idx[n_noisy:].tolist() == [first, second]
    noisy = idx[:n_noisy]
    assert ((noisy == first) | (noisy == second)).all()
    assert_binomial(int((noisy == second).sum()), n_noisy, 0.5, "second of two equal logits at tau = ulp / 4")


def test_infinite_logits(backend, device):
    """+inf logits: the first of them, with noise or greedy (softmax's limit puts all mass on
    them; torch.argmax returns the first); a row with no finite logit: 0, as torch.argmax."""
    inf = float("inf")
    x = torch.tensor([[1.0, inf, 3.0, inf] + [0.0] * 16 + [inf],
                      [-inf] * 21,
                      [-inf] * 17 + [2.0] + [-inf] * 3], device=device)
    for tau in (0.5, 0.0, torch.tensor([1e-3, 1e3, 0.0], device=device)):
        assert sample(x, tau=tau, generator=gen(device, 2)).tolist() == [1, 0, 17]


NAN_CASES = {
    "noisy": dict(tau=1.0),
    "greedy": dict(tau=0.0),
    "per-row tau, greedy NaN row": dict(tau=torch.tensor([1.0, 0.0, 2.0])),
    "per-row tau, noisy NaN row": dict(tau=torch.tensor([0.0, 0.5, 0.0])),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_logits_raise(backend, device, case, dtype):
    """A NaN logit anywhere in a row (here in the second block of a 16-column block, among -inf)
    raises naming logits, as torch.multinomial raises on NaN probabilities, on every path;
    the rows without NaN are still drawn."""
    x = torch.randn(3, 40, generator=gen("cpu", 3))
    x[1, :30] = float("-inf")
    x[1, 33] = float("nan")
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in NAN_CASES[case].items()}
    with pytest.raises(ValueError, match="logits holds NaN"):
        sample(x.to(device, dtype), generator=gen(device, 4), **kwargs)
    ok = sample(x[[0, 2]].to(device, dtype), generator=gen(device, 4), tau=kwargs["tau"] if not isinstance(
        kwargs["tau"], torch.Tensor) else kwargs["tau"][[0, 2]])
    assert ((ok >= 0) & (ok < 40)).all()


def test_nan_logits_raise_on_the_reference_backend(monkeypatch, device):
    monkeypatch.setenv("FUSED_TAU_BACKEND", "reference")
    x = torch.zeros(2, 5, device=device)
    x[0, 4] = float("nan")
    for tau in (1.0, 0.0):
        with pytest.raises(ValueError, match="logits holds NaN"):
            sample(x, tau=tau, generator=gen(device, 5))
