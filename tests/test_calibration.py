"""fit_temperature recovers a known T; expected_calibration_error against a direct loop."""
import pytest
import torch

import fused_tau
from fused_tau import reference


def _calibrated(n, c, seed=0):
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_known_t(backend, true_t):
    # the interpreter runs one program a row: the kernels' check (the float64 optimum) on 64 rows; the
    # estimator's statistics need thousands, which the torch backend runs
    n = 64 if backend == "triton" else 6000
    z, y = _calibrated(n, 10)
    logits = z * true_t  # scaled: over-confident for T > 1, under-confident for T < 1
    t = fused_tau.fit_temperature(logits, y)
    assert abs(t - reference.fit_temperature(logits, y)) <= 1e-3 * t  # the same optimum as float64
    if backend != "triton":
        assert abs(t - true_t) <= 0.06 * true_t  # statistical error of n labels


def _ece_loop(logits, labels, n_bins):
    p = torch.softmax(logits.double(), -1)
    conf, pred = p.max(-1)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.sum().item() / len(labels) * abs((pred[m] == labels[m]).double().mean().item()
                                                        - conf[m].mean().item())
    return total


def test_expected_calibration_error(backend):
    z, y = _calibrated(300 if backend == "triton" else 3000, 7, seed=1)
    for scale, bins in [(1.0, 15), (3.0, 15), (0.3, 10)]:
        ece = fused_tau.expected_calibration_error(z * scale, y, n_bins=bins)
        assert abs(ece.item() - _ece_loop(z * scale, y, bins)) < 1e-5
    if backend == "triton":
        return  # the statistics below need thousands of rows: the torch backend runs them
    calibrated = fused_tau.expected_calibration_error(z, y).item()
    over = fused_tau.expected_calibration_error(z * 3, y).item()
    assert calibrated < 0.05 < over
    t = fused_tau.fit_temperature(z * 3, y)
    assert fused_tau.expected_calibration_error(z * 3, y, tau=t).item() < 0.05


def test_bad_calibration_input(no_launch):
    z = torch.randn(5, 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        fused_tau.fit_temperature(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits must be \\(N, C\\)"):
        fused_tau.fit_temperature(z[0], torch.tensor(0))
    with pytest.raises(TypeError, match="labels must hold class indices"):
        fused_tau.expected_calibration_error(z, torch.zeros(5))
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        fused_tau.expected_calibration_error(z, torch.zeros(5, dtype=torch.long), n_bins=0)
    with pytest.raises(ValueError, match="init must be a positive"):
        fused_tau.fit_temperature(z, torch.zeros(5, dtype=torch.long), init=-1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fit_temperature_on_half_logits_is_the_fp32_fit(backend, dtype):
    """fp16 / bf16 logits are fitted in fp32: the optimum of their values, not the first LBFGS step
    (a bf16 loss stopped the line search at T = e)."""
    z, y = _calibrated(64, 10, seed=0)
    logits = (z * 2.5).to(dtype)
    t = fused_tau.fit_temperature(logits, y)
    t_ref = reference.fit_temperature(logits.float(), y)
    assert abs(t - t_ref) <= 1e-3 * t_ref, (t, t_ref)


def test_fit_temperature_refuses_nan_logits(no_launch):
    z, y = _calibrated(16, 5, seed=3)
    z[4, 1] = float("nan")
    with pytest.raises(ValueError, match="logits hold NaN"):
        fused_tau.fit_temperature(z, y)


@pytest.mark.parametrize("where", ["+inf", "no finite logit", "label at -inf"])
def test_fit_temperature_refuses_a_loss_infinite_at_every_t(backend, where):
    z, y = _calibrated(16, 5, seed=3)
    if where == "+inf":
        z[2, 0] = float("inf")
    elif where == "no finite logit":
        z[2] = float("-inf")
    else:
        z[2, y[2]] = float("-inf")
    with pytest.raises(ValueError, match="not finite"):
        fused_tau.fit_temperature(z, y)


@pytest.mark.parametrize("bad", [-100, -1, 5])
def test_calibration_refuses_labels_outside_the_classes(no_launch, bad):
    """No ignore_index in calibration: -100 and out-of-range labels raise naming labels (they were
    skipped by the fit, and counted as wrong predictions by the ECE)."""
    z, y = _calibrated(16, 5, seed=4)
    y[7] = bad
    with pytest.raises(ValueError, match=r"labels must hold class indices in \[0, 5\)"):
        fused_tau.expected_calibration_error(z, y)
    with pytest.raises(ValueError, match=r"labels must hold class indices in \[0, 5\)"):
        fused_tau.fit_temperature(z, y)


def test_expected_calibration_error_on_half_logits(backend):
    """Confidences of fp16 / bf16 logits are computed in fp32 (not rounded to the logits' dtype
    before binning)."""
    z, y = _calibrated(300, 7, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        x = (z * 3).to(dtype)
        assert abs(fused_tau.expected_calibration_error(x, y).item() - _ece_loop(x.float(), y, 15)) < 1e-5
