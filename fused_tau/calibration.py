"""Temperature scaling (Guo et al. 2017): fit the single τ of calibration, and measure it.

``fit_temperature`` minimises fused_tau's own cross-entropy with a learnable τ (its
gradient comes from the same fused backward as the logits').  Both functions are
offline tools, not training-step code: they return Python numbers / run an optimiser.
"""
import math

import torch

from ._checks import check_tensor
from .cross_entropy import cross_entropy
from .softmax import softmax


def _check_logits_labels(logits, labels):
    check_tensor(logits, "logits")
    check_tensor(labels, "labels", floating=False)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold class indices (an integer dtype), got {labels.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("logits must hold at least one row")


def fit_temperature(logits, labels, max_iter=100, init=1.0):
    """The T > 0 minimising ``F.cross_entropy(logits / T, labels)`` (Guo et al. 2017), as a float.

    LBFGS with a strong-Wolfe line search on log T (so T stays positive), each step one
    fused forward and backward of ``fused_tau.cross_entropy(logits, labels, tau=T)``.
    T > 1 softens an over-confident model; divide its logits by T at test time.
    """
    _check_logits_labels(logits, labels)
    if not (isinstance(init, (int, float)) and math.isfinite(init) and init > 0):
        raise ValueError(f"init must be a positive finite float, got {init!r}")
    logits = logits.detach()
    log_t = torch.tensor(math.log(init), dtype=torch.float32, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cross_entropy(logits, labels, tau=log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    return math.exp(log_t.item())  # host-ok: calibration is offline and returns a number


def expected_calibration_error(logits, labels, n_bins=15, *, tau=1.0):
    """ECE of ``softmax(logits / tau)``: Σ_b (|B_b| / N) |accuracy(B_b) - confidence(B_b)| over
    ``n_bins`` equal-width confidence bins (i/n, (i+1)/n] (Guo et al. 2017), as a 0-dim tensor."""
    _check_logits_labels(logits, labels)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    with torch.no_grad():
        conf, pred = softmax(logits, tau=tau).float().max(-1)
        correct = (pred == labels).float()
        edges = torch.linspace(0, 1, n_bins + 1, device=logits.device)
        bins = torch.bucketize(conf, edges[1:-1], right=False)  # (i/n, (i+1)/n] -> i
        acc = torch.zeros(n_bins, device=logits.device).index_add_(0, bins, correct)
        cf = torch.zeros(n_bins, device=logits.device).index_add_(0, bins, conf)
        return ((acc - cf).abs().sum() / logits.shape[0]).to(torch.float32)
